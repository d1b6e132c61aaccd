//! `asa generate`: sampling from a checkpoint by recurrent decoding, with the reference's
//! sampling controls (`_top_k_top_p_filtering`, `_apply_repetition_penalty` and
//! `_no_repeat_ngram_ban` in `building_blocks/working _example.py`), applied in its order:
//!
//! 1. repetition penalty over the distinct *generated* tokens (not the prompt's): a positive
//!    logit is divided by R, a negative one multiplied by R;
//! 2. no-repeat n-gram ban over the whole sequence (prompt and generated): every token that
//!    followed an earlier occurrence of the last n-1 tokens gets -inf;
//! 3. temperature (`--temperature 0`: greedy, the first largest logit after 1-2);
//! 4. top-k: logits below the k-th largest get -inf (ties with it stay);
//! 5. top-p: sorted descending, tokens whose cumulative probability *including their own*
//!    exceeds p are dropped, the first one always kept (the reference's rule, which drops the
//!    token that crosses p, unlike Hugging Face's);
//! 6. a draw from the softmax of what is left.
//!
//! The model side is a `NextLogits`: the recurrent decoder, or (for tests and the benchmark's
//! baseline) the full forward re-run over the whole sequence for every token.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{AsaError, Result};
use crate::model::decode::Decoder;
use crate::model::lm::{Lm, LmCache};
use crate::model::params::ParamStore;
use crate::vocab::options::AsaOptions;

/// A model that, fed one token at a time, gives the logits that predict the next one.
pub trait NextLogits {
    /// Feeds `token` at the next position; returns the logits [V] predicting the one after.
    fn feed(&mut self, token: u32) -> Result<&[f32]>;
    /// Tokens fed so far.
    fn position(&self) -> usize;
    /// Bytes of the state carried from one token to the next.
    fn state_bytes(&self) -> usize;
    /// Where it runs, for reports.
    fn name(&self) -> String;
    /// Back to position 0 (a new sequence).
    fn reset(&mut self) -> Result<()>;
}

/// Recurrent decoding on the CPU (`model::decode::Decoder`).
pub struct CpuRecurrent {
    pub lm: Lm,
    pub params: ParamStore,
    dec: Decoder,
    logits: Vec<f32>,
}

impl CpuRecurrent {
    pub fn new(lm: Lm, params: ParamStore) -> Result<Self> {
        let dec = Decoder::new(&lm)?;
        let v = lm.cfg.vocab_size;
        Ok(CpuRecurrent {
            lm,
            params,
            dec,
            logits: vec![0.0; v],
        })
    }

    /// Numbers in the recurrent state.
    pub fn state_len(&self) -> usize {
        self.dec.state_len()
    }
}

impl NextLogits for CpuRecurrent {
    fn feed(&mut self, token: u32) -> Result<&[f32]> {
        self.dec
            .step(&self.lm, &self.params, token, &mut self.logits)?;
        Ok(&self.logits)
    }
    fn position(&self) -> usize {
        self.dec.position()
    }
    fn state_bytes(&self) -> usize {
        // the sums are f64, the running maxima f32; counted as 8 bytes each (an upper bound)
        self.dec.state_len() * 8
    }
    fn name(&self) -> String {
        "cpu (recurrent)".into()
    }
    fn reset(&mut self) -> Result<()> {
        self.dec.reset();
        Ok(())
    }
}

/// Recurrent decoding on a GPU (`backend::cuda::decode::GpuDecoder`, its twin).
pub struct GpuRecurrent<B: crate::backend::cuda::Backend = crate::backend::cuda::CudaBackend> {
    dec: crate::backend::cuda::decode::GpuDecoder<B>,
    name: String,
}

impl GpuRecurrent {
    /// The decoder of `lm`'s config with `params` on device 0.
    pub fn new(lm: &Lm, params: &ParamStore) -> Result<Self> {
        let dec = crate::backend::cuda::decode::GpuDecoder::new(&lm.cfg, params)?;
        let name = format!("cuda (recurrent, {})", dec.backend().device_name);
        Ok(GpuRecurrent { dec, name })
    }
}

impl<B: crate::backend::cuda::Backend> GpuRecurrent<B> {
    /// On any backend (the tests' emulator too).
    pub fn with_decoder(dec: crate::backend::cuda::decode::GpuDecoder<B>, name: &str) -> Self {
        GpuRecurrent {
            dec,
            name: name.to_string(),
        }
    }
}

impl<B: crate::backend::cuda::Backend> NextLogits for GpuRecurrent<B> {
    fn feed(&mut self, token: u32) -> Result<&[f32]> {
        self.dec.step(token)
    }
    fn position(&self) -> usize {
        self.dec.position()
    }
    fn state_bytes(&self) -> usize {
        self.dec.state_len() * 8
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn reset(&mut self) -> Result<()> {
        self.dec.reset()
    }
}

/// The baseline: the full forward over the whole sequence so far, for every token (what a model
/// without a recurrent form would do without a cache). Its cost grows with the position.
pub struct CpuFullForward {
    pub lm: Lm,
    pub params: ParamStore,
    ids: Vec<u32>,
    cache: LmCache,
    logits: Vec<f32>,
    /// the options of every forward (forward controls; no attention mask)
    opts: AsaOptions,
}

impl CpuFullForward {
    pub fn new(lm: Lm, params: ParamStore) -> Self {
        let v = lm.cfg.vocab_size;
        CpuFullForward {
            lm,
            params,
            ids: Vec::new(),
            cache: LmCache::default(),
            logits: vec![0.0; v],
            opts: AsaOptions::default(),
        }
    }

    /// Runs every forward with `opts` (routing mode, noise, slot mask: the forward controls,
    /// which the recurrent decoder does not take).
    pub fn with_options(mut self, opts: AsaOptions) -> Self {
        self.opts = opts;
        self
    }
}

impl CpuFullForward {
    /// Takes `ids` as the sequence so far without running the forward (the next `feed` runs it
    /// over all of them).
    pub fn prime(&mut self, ids: &[u32]) {
        self.ids.clear();
        self.ids.extend_from_slice(ids);
    }
}

impl NextLogits for CpuFullForward {
    fn feed(&mut self, token: u32) -> Result<&[f32]> {
        self.ids.push(token);
        let t = self.ids.len();
        let v = self.lm.cfg.vocab_size;
        let r = self
            .lm
            .forward(&self.params, &self.ids, 1, t, &self.opts, &mut self.cache);
        if let Err(e) = r {
            self.ids.pop();
            return Err(e);
        }
        self.logits
            .copy_from_slice(&self.cache.logits[(t - 1) * v..t * v]);
        Ok(&self.logits)
    }
    fn position(&self) -> usize {
        self.ids.len()
    }
    fn state_bytes(&self) -> usize {
        // the token history; the forward's activations grow with it too
        self.ids.len() * 4
    }
    fn name(&self) -> String {
        "cpu (full forward per token)".into()
    }
    fn reset(&mut self) -> Result<()> {
        self.ids.clear();
        Ok(())
    }
}

/// Sampling controls (the reference's defaults).
#[derive(Debug, Clone, Serialize)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// 0: greedy
    pub temperature: f64,
    /// 0: off
    pub top_k: usize,
    /// 1: off
    pub top_p: f64,
    /// 1: off
    pub repetition_penalty: f64,
    /// 0 or 1: off
    pub no_repeat_ngram: usize,
    pub seed: u64,
    /// stop after generating this token (the tokenizer's end of text)
    pub eos: Option<u32>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            max_new_tokens: 128,
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9,
            repetition_penalty: 1.05,
            no_repeat_ngram: 3,
            seed: 0,
            eos: None,
        }
    }
}

impl SampleOptions {
    /// Greedy decoding with no repetition controls.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SampleOptions {
            max_new_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram: 0,
            ..Default::default()
        }
    }

    /// Checks the controls before anything is loaded.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(AsaError::Input(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "--temperature must be >= 0 (0: greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "--repetition-penalty must be > 0 (1: off), got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// The reference's repetition penalty and n-gram ban, in place (steps 1-2 of the module docs).
/// `seq`: the prompt and the tokens generated so far; `prompt_len` of them are the prompt.
pub fn apply_repetition_controls(
    logits: &mut [f32],
    seq: &[u32],
    prompt_len: usize,
    o: &SampleOptions,
) {
    let r = o.repetition_penalty as f32;
    if o.repetition_penalty != 1.0 {
        let mut seen = std::collections::BTreeSet::new();
        for &id in &seq[prompt_len.min(seq.len())..] {
            if seen.insert(id) {
                let l = &mut logits[id as usize];
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
    }
    let n = o.no_repeat_ngram;
    if n > 1 && seq.len() >= n - 1 {
        let prefix = &seq[seq.len() - (n - 1)..];
        for i in 0..(seq.len() + 1).saturating_sub(n) {
            if &seq[i..i + n - 1] == prefix {
                logits[seq[i + n - 1] as usize] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Steps 3-5 of the module docs: temperature, top-k and top-p, in place (f64 logits).
pub fn filter_logits(logits: &mut [f64], o: &SampleOptions) {
    if o.temperature > 0.0 {
        logits.iter_mut().for_each(|l| *l /= o.temperature);
    }
    let v = logits.len();
    if o.top_k > 0 && o.top_k < v {
        let mut sorted: Vec<f64> = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[o.top_k - 1];
        logits
            .iter_mut()
            .filter(|l| **l < kth)
            .for_each(|l| *l = f64::NEG_INFINITY);
    }
    if o.top_p < 1.0 {
        let mut idx: Vec<usize> = (0..v).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mx = logits[idx[0]];
        if mx.is_finite() {
            let sum: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
            let mut cum = 0.0;
            for (rank, &i) in idx.iter().enumerate() {
                cum += (logits[i] - mx).exp() / sum;
                if rank > 0 && cum > o.top_p {
                    logits[i] = f64::NEG_INFINITY;
                }
            }
        }
    }
}

/// The first index of the largest value.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from the model's logits for the sequence `seq` (steps 1-6).
pub fn choose(
    logits: &[f32],
    seq: &[u32],
    prompt_len: usize,
    o: &SampleOptions,
    rng: &mut ChaCha8Rng,
    work: &mut Vec<f32>,
) -> u32 {
    work.clear();
    work.extend_from_slice(logits);
    apply_repetition_controls(work, seq, prompt_len, o);
    if o.temperature == 0.0 {
        return argmax(work) as u32;
    }
    let mut l: Vec<f64> = work.iter().map(|&x| x as f64).collect();
    filter_logits(&mut l, o);
    let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !mx.is_finite() {
        // everything banned: fall back to the unfiltered best
        return argmax(logits) as u32;
    }
    let sum: f64 = l.iter().map(|x| (x - mx).exp()).sum();
    let mut u = rng.gen::<f64>() * sum;
    let mut last = 0;
    for (i, x) in l.iter().enumerate() {
        let p = (x - mx).exp();
        if p > 0.0 {
            last = i;
            if u < p {
                return i as u32;
            }
            u -= p;
        }
    }
    last as u32
}

/// What one generation produced.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// seconds the prompt took (all its tokens fed)
    pub prompt_seconds: f64,
    /// seconds per generated token
    pub token_seconds: Vec<f64>,
}

/// Feeds the prompt, then generates up to `o.max_new_tokens`, calling `on_token` with each new id
/// as it comes (to stream it). Stops early after `o.eos`.
pub fn generate(
    model: &mut dyn NextLogits,
    prompt: &[u32],
    o: &SampleOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    o.check()?;
    if prompt.is_empty() {
        return Err(AsaError::Input(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let mut seq = prompt.to_vec();
    let mut work = Vec::new();
    let started = std::time::Instant::now();
    let mut logits = Vec::new();
    for &id in prompt {
        logits.clear();
        logits.extend_from_slice(model.feed(id)?);
    }
    let prompt_seconds = started.elapsed().as_secs_f64();
    let mut token_seconds = Vec::with_capacity(o.max_new_tokens);
    for i in 0..o.max_new_tokens {
        let t0 = std::time::Instant::now();
        let next = choose(&logits, &seq, prompt.len(), o, &mut rng, &mut work);
        seq.push(next);
        on_token(next)?;
        let done = o.eos == Some(next) || i + 1 == o.max_new_tokens;
        if !done {
            logits.clear();
            logits.extend_from_slice(model.feed(next)?);
        }
        token_seconds.push(t0.elapsed().as_secs_f64());
        if done {
            break;
        }
    }
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        generated_ids: seq[prompt.len()..].to_vec(),
        prompt_seconds,
        token_seconds,
    })
}

/// Streams text decoded from a growing list of ids: prints only what is new, holding back an
/// incomplete UTF-8 character (a byte-level BPE token may end inside one).
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    pub fn new() -> Self {
        TextStream {
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds `id`; returns the text that is new and complete.
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        self.ids.push(id);
        let text = decode(&self.ids)?;
        let end = if text.ends_with('\u{FFFD}') {
            text.len() - '\u{FFFD}'.len_utf8()
        } else {
            text.len()
        };
        if end <= self.printed || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let new = text[self.printed..end].to_string();
        self.printed = end;
        Ok(new)
    }

    /// What is left to print at the end (a trailing incomplete character included).
    pub fn finish(&mut self, decode: impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        let text = decode(&self.ids)?;
        if self.printed >= text.len() || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let rest = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(rest)
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_controls_follow_the_reference() {
        // penalty 2 over generated tokens only: prompt [0, 1], generated [2, 3, 2]
        let o = SampleOptions {
            repetition_penalty: 2.0,
            no_repeat_ngram: 0,
            ..SampleOptions::greedy(1)
        };
        let mut l = vec![1.0f32, -1.0, 4.0, -2.0, 3.0];
        apply_repetition_controls(&mut l, &[0, 1, 2, 3, 2], 2, &o);
        assert_eq!(l, vec![1.0, -1.0, 2.0, -4.0, 3.0]);
        // trigram ban: sequence 5 6 7 5 6 -> after "5 6" came 7 -> 7 banned
        let o = SampleOptions {
            no_repeat_ngram: 3,
            ..SampleOptions::greedy(1)
        };
        let mut l = vec![0.0f32; 8];
        apply_repetition_controls(&mut l, &[5, 6, 7, 5, 6], 5, &o);
        assert_eq!(l[7], f32::NEG_INFINITY);
        assert!(l.iter().filter(|x| x.is_infinite()).count() == 1);
        // a sequence shorter than n-1 bans nothing
        let mut l = vec![0.0f32; 8];
        apply_repetition_controls(&mut l, &[5], 1, &o);
        assert!(l.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn top_k_and_top_p_follow_the_reference() {
        let o = SampleOptions {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            ..Default::default()
        };
        let mut l = vec![1.0, 3.0, 2.0, 3.0, 0.0];
        filter_logits(&mut l, &o);
        // the 2nd largest is 3 (a tie): both 3s stay, everything below goes
        assert_eq!(
            l,
            vec![
                f64::NEG_INFINITY,
                3.0,
                f64::NEG_INFINITY,
                3.0,
                f64::NEG_INFINITY
            ]
        );
        // probabilities 0.5, 0.3, 0.2 (log): top_p 0.7 keeps the first (0.5 <= 0.7) and drops
        // the second, whose cumulative 0.8 exceeds 0.7
        let o = SampleOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
            ..Default::default()
        };
        let mut l: Vec<f64> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        filter_logits(&mut l, &o);
        assert!(l[0].is_finite() && l[1].is_infinite() && l[2].is_infinite());
        // the first token is always kept
        let o = SampleOptions { top_p: 0.1, ..o };
        let mut l: Vec<f64> = [0.2f64, 0.5, 0.3].iter().map(|p| p.ln()).collect();
        filter_logits(&mut l, &o);
        assert!(l[1].is_finite() && l[0].is_infinite() && l[2].is_infinite());
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let o = SampleOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram: 0,
            ..Default::default()
        };
        let logits: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut work = Vec::new();
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[choose(&logits, &[0], 1, &o, &mut rng, &mut work) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.6, 0.3, 0.1]) {
            let f = *c as f64 / 20_000.0;
            assert!((f - p).abs() < 0.015, "{counts:?}");
        }
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..50)
                .map(|_| choose(&logits, &[0], 1, &o, &mut rng, &mut work.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn the_text_stream_holds_back_a_split_character() {
        // ids are bytes; "é" is two bytes
        let dec = |ids: &[u32]| -> Result<String> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        let mut s = TextStream::new();
        let bytes = "aé!".as_bytes();
        let out: Vec<String> = bytes
            .iter()
            .map(|&b| s.push(b as u32, dec).unwrap())
            .collect();
        assert_eq!(out, vec!["a", "", "é", "!"]);
        assert_eq!(s.finish(dec).unwrap(), "");
    }

    #[test]
    fn bad_controls_are_refused() {
        for o in [
            SampleOptions {
                temperature: -1.0,
                ..Default::default()
            },
            SampleOptions {
                top_p: 0.0,
                ..Default::default()
            },
            SampleOptions {
                top_p: 1.5,
                ..Default::default()
            },
            SampleOptions {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert!(o.check().is_err());
        }
    }
}
