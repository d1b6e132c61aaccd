//! Binary token shards: `asa prepare` tokenizes text files into `train_NNN.bin` shards, a held-out
//! `val.bin` shard and a `meta.json`; the trainer reads them back with [`open_prepared`].
//!
//! Shard format (little-endian): a 32-byte header
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `b"ASATOK\0\0"` |
//! | 8..12 | version (u32, = 1) |
//! | 12..16 | dtype: bytes per token (u32, 2 = u16, 4 = u32) |
//! | 16..24 | count: number of tokens (u64) |
//! | 24..28 | vocab_size (u32) |
//! | 28..32 | reserved (u32, = 0) |
//!
//! followed by `count` token ids. The dtype is u16 iff `vocab_size <= 65536`, else u32.
//!
//! Preparation streams: each input is read in chunks of about 1 MB cut at a line boundary (chosen
//! so that GPT-2-style pre-tokenization gives the same tokens as on the whole text), the chunks
//! are encoded (a batch of them in parallel, written in order) and appended to the current shard.
//! Shards are written to `<name>.tmp-<pid>`, their header count is patched at the end, then they
//! are fsynced and renamed, so nothing half-written ever sits under a final name. Every k-th chunk
//! (k = round(1 / val_frac)) goes to the validation shard; when there are fewer than k chunks (a
//! small corpus: each input file is at least one chunk), the last `round(val_frac * tokens)`
//! tokens (at least one) are held out instead, from the end of the last chunk.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::checkpoint::st::{tmp_path_for, write_bytes_atomic};
use crate::data::tokenizer::{Tokenizer, GPT2_EOT};
use crate::error::{AsaError, Result};

/// First 8 bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"ASATOK\0\0";
/// The shard format version written and accepted.
pub const SHARD_VERSION: u32 = 1;
/// Size of the shard header in bytes.
pub const SHARD_HEADER_BYTES: usize = 32;
/// Default fraction of the data held out for validation.
pub const DEFAULT_VAL_FRAC: f64 = 0.005;
/// Default maximum number of tokens per training shard.
pub const DEFAULT_SHARD_TOKENS: usize = 100_000_000;
/// Name of the metadata file in a prepared folder.
pub const META_FILE: &str = "meta.json";
/// Name of the validation shard in a prepared folder.
pub const VAL_FILE: &str = "val.bin";
/// `format` field of `meta.json`.
const META_FORMAT: &str = "asa-token-shards";
/// Target size of one text chunk.
const CHUNK_BYTES: usize = 1 << 20;
/// Smallest chunk size accepted internally (a chunk must hold a whole UTF-8 character).
const MIN_CHUNK_BYTES: usize = 16;
/// Candidate end-of-text tokens, tried in order; the first that is a single token of the
/// tokenizer and decodes back to itself is inserted between input files.
const EOT_CANDIDATES: [&str; 4] = [GPT2_EOT, "</s>", "<|end_of_text|>", "<eos>"];

/// Name of the `i`-th training shard: `train_000.bin`, `train_001.bin`, ...
pub fn train_shard_name(i: usize) -> String {
    format!("train_{i:03}.bin")
}

/// Bytes per token for a vocabulary: 2 (u16) iff every id fits in a u16, else 4 (u32).
pub fn dtype_bytes_for_vocab(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

fn dtype_name(dtype_bytes: u32) -> &'static str {
    if dtype_bytes == 2 {
        "u16"
    } else {
        "u32"
    }
}

fn input_err(msg: String) -> AsaError {
    AsaError::Input(msg)
}

/// `train_<digits>.bin`
fn is_train_shard_name(name: &str) -> bool {
    name.strip_prefix("train_")
        .and_then(|s| s.strip_suffix(".bin"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

// ---------------------------------------------------------------------------------------------
// Options and report
// ---------------------------------------------------------------------------------------------

/// What `asa prepare` does.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// UTF-8 text files, tokenized in this order.
    pub inputs: Vec<PathBuf>,
    /// Output folder (created if missing).
    pub outdir: PathBuf,
    pub tokenizer: Tokenizer,
    /// Fraction held out for validation, in (0, 1); default [`DEFAULT_VAL_FRAC`].
    pub val_frac: f64,
    /// Maximum tokens per training shard; default [`DEFAULT_SHARD_TOKENS`].
    pub shard_tokens: usize,
    /// Replace an existing prepared folder (its shards and meta.json are removed first).
    pub force: bool,
    /// Show a progress bar (on input bytes) on stderr.
    pub progress: bool,
}

impl PrepareOptions {
    /// Options with the defaults: `val_frac` 0.005, 100M tokens per shard, no force, progress on.
    pub fn new(inputs: Vec<PathBuf>, outdir: PathBuf, tokenizer: Tokenizer) -> Self {
        PrepareOptions {
            inputs,
            outdir,
            tokenizer,
            val_frac: DEFAULT_VAL_FRAC,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            force: false,
            progress: true,
        }
    }
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareReport {
    pub train_shards: Vec<PathBuf>,
    pub val_shard: PathBuf,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub vocab_size: usize,
    /// "u16" or "u32".
    pub dtype: &'static str,
}

// ---------------------------------------------------------------------------------------------
// Shard writing
// ---------------------------------------------------------------------------------------------

fn encode_header(dtype_bytes: u32, count: u64, vocab_size: u32) -> [u8; SHARD_HEADER_BYTES] {
    let mut h = [0u8; SHARD_HEADER_BYTES];
    h[0..8].copy_from_slice(&SHARD_MAGIC);
    h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&dtype_bytes.to_le_bytes());
    h[16..24].copy_from_slice(&count.to_le_bytes());
    h[24..28].copy_from_slice(&vocab_size.to_le_bytes());
    // 28..32: reserved, 0
    h
}

/// Writes one shard to `<path>.tmp-<pid>`; [`ShardWriter::finish`] patches the header count,
/// fsyncs and renames it to `path`. Dropped unfinished, it removes the temporary file.
struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<BufWriter<File>>,
    dtype_bytes: u32,
    vocab_size: u32,
    count: u64,
    scratch: Vec<u8>,
}

impl ShardWriter {
    fn create(path: &Path, vocab_size: usize) -> Result<Self> {
        let vocab = u32::try_from(vocab_size).map_err(|_| {
            input_err(format!(
                "vocabulary size {vocab_size} does not fit the shard format (u32)"
            ))
        })?;
        let tmp = tmp_path_for(path);
        let dtype_bytes = dtype_bytes_for_vocab(vocab_size);
        let file = File::create(&tmp).map_err(|e| AsaError::io(&tmp, e))?;
        let mut sw = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            w: Some(BufWriter::with_capacity(1 << 20, file)),
            dtype_bytes,
            vocab_size: vocab,
            count: 0,
            scratch: Vec::new(),
        };
        // Placeholder header (count 0) until finish().
        let h = encode_header(dtype_bytes, 0, vocab);
        sw.write_raw(&h)?;
        Ok(sw)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.w.as_mut().expect("shard writer used after finish");
        w.write_all(bytes).map_err(|e| AsaError::io(&self.tmp, e))
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(&bad) = ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(AsaError::Other(format!(
                "tokenizer produced id {bad} outside its vocabulary ({})",
                self.vocab_size
            )));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.reserve(ids.len() * self.dtype_bytes as usize);
        if self.dtype_bytes == 2 {
            for &id in ids {
                scratch.extend_from_slice(&(id as u16).to_le_bytes());
            }
        } else {
            for &id in ids {
                scratch.extend_from_slice(&id.to_le_bytes());
            }
        }
        let r = self.write_raw(&scratch);
        self.scratch = scratch;
        r?;
        self.count += ids.len() as u64;
        Ok(())
    }

    /// Patches the header, fsyncs and renames to the final path. Returns (path, token count).
    fn finish(mut self) -> Result<(PathBuf, u64)> {
        let w = self.w.take().expect("shard writer finished twice");
        let tmp = self.tmp.clone();
        let header = encode_header(self.dtype_bytes, self.count, self.vocab_size);
        let res = (|| -> std::io::Result<()> {
            let mut file = w.into_inner().map_err(|e| e.into_error())?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&header)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &self.path)?;
            Ok(())
        })();
        // On error, Drop removes the temporary file (w is gone, so check the path exists).
        res.map_err(|e| AsaError::io(&self.path, e))?;
        sync_dir(&self.path);
        let path = std::mem::take(&mut self.path);
        self.tmp = PathBuf::new(); // renamed: nothing left to clean up
        Ok((path, self.count))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        self.w = None;
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Best effort: makes a rename in `path`'s folder durable.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Training shards of at most `shard_tokens` tokens each, created on demand.
struct TrainSink {
    dir: PathBuf,
    vocab_size: usize,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    done: Vec<(PathBuf, u64)>,
}

impl TrainSink {
    fn push(&mut self, mut ids: &[u32], written: &mut Vec<PathBuf>) -> Result<()> {
        while !ids.is_empty() {
            if self.current.is_none() {
                let path = self.dir.join(train_shard_name(self.done.len()));
                self.current = Some(ShardWriter::create(&path, self.vocab_size)?);
            }
            let cur = self.current.as_mut().expect("current shard");
            let room = (self.shard_tokens - cur.count).min(ids.len() as u64) as usize;
            cur.push(&ids[..room])?;
            ids = &ids[room..];
            if cur.count >= self.shard_tokens {
                self.close_current(written)?;
            }
        }
        Ok(())
    }

    fn close_current(&mut self, written: &mut Vec<PathBuf>) -> Result<()> {
        if let Some(w) = self.current.take() {
            let (path, n) = w.finish()?;
            written.push(path.clone());
            self.done.push((path, n));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked UTF-8 reading
// ---------------------------------------------------------------------------------------------

/// Length of the UTF-8 sequence a lead byte starts (1 for ASCII and for invalid bytes).
fn utf8_seq_len(b: u8) -> usize {
    match b {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

/// Whether `bytes` starts with a complete character that is not whitespace.
fn starts_with_non_ws(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(4)];
    let valid = match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or(""),
    };
    valid.chars().next().is_some_and(|c| !c.is_whitespace())
}

/// Where to cut a full (not final) buffer: a position `0 < p < len` such that `buf[..p]` is the
/// chunk. Preference:
/// 1. just before the last `\n` of a blank-line run followed by a non-space character, in the
///    second half of the buffer (a paragraph boundary);
/// 2. just before the last `\n` of any whitespace run followed by a non-space character;
/// 3. after the last `\n`;
/// 4. before a UTF-8 character that the buffer does not hold completely (else the whole buffer).
///
/// Cutting before the last newline of a whitespace run that a word follows gives GPT-2's
/// pre-tokenizer (`\s+(?!\S)|\s+`) the same pieces on the chunks as on the whole text.
fn cut_point(buf: &[u8]) -> usize {
    let n = buf.len();
    let half = n / 2;
    let mut line = None;
    for p in (1..n.saturating_sub(1)).rev() {
        if p < half && line.is_some() {
            break;
        }
        if buf[p] != b'\n' || !starts_with_non_ws(&buf[p + 1..]) {
            continue;
        }
        let para = buf[p - 1] == b'\n' || (buf[p - 1] == b'\r' && p >= 2 && buf[p - 2] == b'\n');
        if para && p >= half {
            return p;
        }
        line.get_or_insert(p);
    }
    if let Some(p) = line {
        return p;
    }
    if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
        return i + 1;
    }
    // No newline at all: do not split the last character.
    let mut i = n;
    while i > 0 && n - i < 4 {
        i -= 1;
        if buf[i] & 0xC0 != 0x80 {
            if i + utf8_seq_len(buf[i]) > n && i > 0 {
                return i;
            }
            break;
        }
    }
    n
}

/// Reads a file as UTF-8 text chunks of about `chunk_bytes` (see [`cut_point`]); a leading BOM is
/// skipped. Invalid UTF-8 is an input error naming the file and the byte offset.
struct ChunkReader {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    offset: u64,
    chunk_bytes: usize,
    eof: bool,
    started: bool,
}

impl ChunkReader {
    fn open(path: &Path, chunk_bytes: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| AsaError::io(path, e))?;
        Ok(ChunkReader {
            path: path.to_path_buf(),
            file,
            buf: Vec::new(),
            offset: 0,
            chunk_bytes: chunk_bytes.max(MIN_CHUNK_BYTES),
            eof: false,
            started: false,
        })
    }

    /// The next chunk and the number of file bytes it covers (BOM included), or None at the end.
    fn next_chunk(&mut self) -> Result<Option<(String, u64)>> {
        if !self.eof && self.buf.len() < self.chunk_bytes {
            let want = self.chunk_bytes - self.buf.len();
            self.buf.reserve(want);
            let got = (&mut self.file)
                .take(want as u64)
                .read_to_end(&mut self.buf)
                .map_err(|e| AsaError::io(&self.path, e))?;
            if got < want {
                self.eof = true;
            }
        }
        let mut skipped = 0u64;
        if !self.started {
            self.started = true;
            if self.buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
                self.buf.drain(..3);
                self.offset += 3;
                skipped = 3;
            }
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let cut = if self.eof {
            self.buf.len()
        } else {
            cut_point(&self.buf)
        };
        let rest = self.buf.split_off(cut);
        let chunk = std::mem::replace(&mut self.buf, rest);
        let start = self.offset;
        self.offset += cut as u64;
        match String::from_utf8(chunk) {
            Ok(s) => Ok(Some((s, cut as u64 + skipped))),
            Err(e) => Err(input_err(format!(
                "{} is not UTF-8 text (invalid byte at offset {})",
                self.path.display(),
                start + e.utf8_error().valid_up_to() as u64
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// prepare
// ---------------------------------------------------------------------------------------------

/// The tokenizer's end-of-text token, if it has one (GPT-2: 50256; the byte tokenizer: none).
pub fn end_of_text_token(tok: &Tokenizer) -> Option<u32> {
    EOT_CANDIDATES.iter().find_map(|&s| {
        let id = tok.single_token(s)?;
        (tok.decode(&[id]).ok()? == s).then_some(id)
    })
}

/// Prepared-data files present in `dir`: meta.json, val.bin, train_NNN.bin.
fn existing_outputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(AsaError::io(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| AsaError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == META_FILE || name == VAL_FILE || is_train_shard_name(name) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Tokenizes `opts.inputs` into `opts.outdir` (see the module docs). Refuses a folder that already
/// holds shards or a meta.json unless `opts.force`. On error, every file this call created is
/// removed.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    prepare_with_chunk(opts, CHUNK_BYTES)
}

fn prepare_with_chunk(opts: &PrepareOptions, chunk_bytes: usize) -> Result<PrepareReport> {
    if opts.inputs.is_empty() {
        return Err(input_err("no input text files given".into()));
    }
    if !(opts.val_frac.is_finite() && opts.val_frac > 0.0 && opts.val_frac < 1.0) {
        return Err(input_err(format!(
            "validation fraction must be in (0, 1), got {}",
            opts.val_frac
        )));
    }
    if opts.shard_tokens == 0 {
        return Err(input_err("tokens per shard must be at least 1".into()));
    }
    let mut sources = Vec::with_capacity(opts.inputs.len());
    let mut total_bytes = 0u64;
    for p in &opts.inputs {
        let md = std::fs::metadata(p).map_err(|e| AsaError::io(p, e))?;
        if !md.is_file() {
            return Err(input_err(format!("{} is not a file", p.display())));
        }
        total_bytes += md.len();
        sources.push(json!({"path": p.display().to_string(), "bytes": md.len()}));
    }
    let dir = &opts.outdir;
    if let Some(e) = crate::error::not_a_folder(dir) {
        return Err(e);
    }
    let existing = existing_outputs(dir)?;
    if !existing.is_empty() {
        if !opts.force {
            let names: Vec<String> = existing
                .iter()
                .take(3)
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            return Err(input_err(format!(
                "{} already holds prepared data ({}{}); use --force to overwrite it",
                dir.display(),
                names.join(", "),
                if existing.len() > 3 { ", ..." } else { "" }
            )));
        }
        // meta.json first, so that a half-removed folder is never taken for a prepared one.
        let mut existing = existing;
        existing.sort_by_key(|p| p.file_name().map(|n| n != META_FILE));
        for p in &existing {
            std::fs::remove_file(p).map_err(|e| AsaError::io(p, e))?;
        }
    }
    crate::error::ensure_dir(dir)?;

    let mut written = Vec::new();
    let res = write_prepared(opts, chunk_bytes, total_bytes, sources, &mut written);
    if res.is_err() {
        for p in &written {
            let _ = std::fs::remove_file(p);
        }
    }
    res
}

fn write_prepared(
    opts: &PrepareOptions,
    chunk_bytes: usize,
    total_bytes: u64,
    sources: Vec<Value>,
    written: &mut Vec<PathBuf>,
) -> Result<PrepareReport> {
    let tok = &opts.tokenizer;
    let vocab = tok.vocab_size();
    let dir = &opts.outdir;
    let dtype_bytes = dtype_bytes_for_vocab(vocab);
    let eot = end_of_text_token(tok);
    let k = ((1.0 / opts.val_frac).round() as u64).max(2);
    let batch_n = rayon::current_num_threads().clamp(1, 32);

    let bar = if opts.progress {
        ProgressBar::new(total_bytes)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let mut train = TrainSink {
        dir: dir.clone(),
        vocab_size: vocab,
        shard_tokens: opts.shard_tokens as u64,
        current: None,
        done: Vec::new(),
    };
    let val_path = dir.join(VAL_FILE);
    let mut val = ShardWriter::create(&val_path, vocab)?;
    let mut val_chunks = 0u64;
    // The last chunk is held back: where it goes depends on whether it is the last one.
    let mut pending: Option<Vec<u32>> = None;
    let mut n_chunks = 0u64;

    for (fi, path) in opts.inputs.iter().enumerate() {
        bar.set_message(path.display().to_string());
        let mut reader = ChunkReader::open(path, chunk_bytes)?;
        let mut first = true;
        let mut nonblank = false;
        loop {
            let mut batch = Vec::with_capacity(batch_n);
            let mut bytes = 0u64;
            while batch.len() < batch_n {
                match reader.next_chunk()? {
                    Some((s, b)) => {
                        bytes += b;
                        batch.push(s);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            nonblank = nonblank || batch.iter().any(|s| s.chars().any(|c| !c.is_whitespace()));
            let encoded: Vec<Result<Vec<u32>>> = batch.par_iter().map(|s| tok.encode(s)).collect();
            for ids in encoded {
                let mut ids = ids?;
                if first && fi > 0 {
                    if let Some(e) = eot {
                        ids.insert(0, e);
                    }
                }
                first = false;
                if let Some(prev) = pending.take() {
                    let i = n_chunks - 1;
                    if i % k == k - 1 {
                        val.push(&prev)?;
                        val_chunks += 1;
                    } else {
                        train.push(&prev, written)?;
                    }
                }
                pending = Some(ids);
                n_chunks += 1;
            }
            bar.inc(bytes);
        }
        if !nonblank {
            return Err(input_err(format!(
                "{} is empty (no text to tokenize)",
                path.display()
            )));
        }
    }
    let last = pending.take().unwrap_or_default();
    let train_so_far = |t: &TrainSink| -> u64 {
        t.done.iter().map(|d| d.1).sum::<u64>() + t.current.as_ref().map_or(0, |w| w.count)
    };
    if n_chunks > 1 && (n_chunks - 1) % k == k - 1 {
        val.push(&last)?;
    } else if val_chunks == 0 {
        // Fewer than k chunks (a small corpus, or many small files: each file is at least one
        // chunk): the every-k-th-chunk rule picked nothing. Hold out the last val_frac of all
        // tokens (at least one) from the end of the last chunk, not the whole last chunk (which
        // was a whole file: 14% of a 7-file corpus at --val-frac 0.005). When the last chunk is
        // shorter than that, all of it is validation (less than val_frac).
        let total = train_so_far(&train) + last.len() as u64;
        let n = last.len();
        let n_val = (((total as f64 * opts.val_frac).round() as u64).max(1) as usize).min(n);
        if n_val < n {
            train.push(&last[..n - n_val], written)?;
            val.push(&last[n - n_val..])?;
        } else if n_chunks > 1 {
            val.push(&last)?;
        } else {
            // one chunk too short to split: no validation tokens (refused below)
            train.push(&last, written)?;
        }
    } else {
        train.push(&last, written)?;
    }
    let train_tokens: u64 = train_so_far(&train);
    let val_tokens = val.count;
    if train_tokens == 0 || val_tokens == 0 {
        return Err(input_err(format!(
            "not enough text: {} produced {train_tokens} training and {val_tokens} validation \
             tokens; both must be non-empty",
            if opts.inputs.len() == 1 {
                opts.inputs[0].display().to_string()
            } else {
                format!("{} files", opts.inputs.len())
            }
        )));
    }
    train.close_current(written)?;
    let (val_path, _) = val.finish()?;
    written.push(val_path.clone());

    let shard_entries: Vec<Value> = train
        .done
        .iter()
        .map(|(p, n)| {
            json!({
                "file": p.file_name().map(|s| s.to_string_lossy().into_owned()),
                "tokens": n,
            })
        })
        .collect();
    let meta = json!({
        "format": META_FORMAT,
        "format_version": SHARD_VERSION,
        "asa_version": env!("CARGO_PKG_VERSION"),
        "tokenizer": tok.name(),
        "vocab_size": vocab,
        "dtype": dtype_name(dtype_bytes),
        "eot_token": eot,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "val_frac": opts.val_frac,
        "val_every_k_chunks": k,
        "chunks": n_chunks,
        "shard_tokens": opts.shard_tokens,
        "train_shards": shard_entries,
        "val_shard": {"file": VAL_FILE, "tokens": val_tokens},
        "sources": sources,
    });
    let text = serde_json::to_string_pretty(&meta)
        .map_err(|e| AsaError::Other(format!("meta.json: {e}")))?;
    write_bytes_atomic(&dir.join(META_FILE), format!("{text}\n").as_bytes())?;
    bar.finish_and_clear();
    Ok(PrepareReport {
        train_shards: train.done.into_iter().map(|d| d.0).collect(),
        val_shard: val_path,
        train_tokens,
        val_tokens,
        vocab_size: vocab,
        dtype: dtype_name(dtype_bytes),
    })
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// One token shard: its header checked, its tokens memory-mapped and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub path: PathBuf,
    pub vocab_size: u32,
    pub tokens: Tokens,
}

/// The token ids of a shard, read on demand from the memory-mapped file (little-endian u16 or
/// u32 after the header). Nothing is copied at open: the page cache holds a corpus once, however
/// large, and training reads only the windows it samples. The file must not be rewritten while
/// a run has it open (`asa prepare` refuses to overwrite without `--force`).
#[derive(Clone)]
pub struct Tokens {
    map: std::sync::Arc<memmap2::Mmap>,
    /// bytes per id: 2 or 4
    width: usize,
    len: usize,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn body(&self) -> &[u8] {
        &self.map[SHARD_HEADER_BYTES..SHARD_HEADER_BYTES + self.len * self.width]
    }

    /// Token `i` (panics when out of range, as slice indexing).
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len,
            "token {i} out of range for a shard of {}",
            self.len
        );
        let at = SHARD_HEADER_BYTES + i * self.width;
        let b = &self.map[at..at + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    /// Appends tokens `start..start + n` to `out` (panics when out of range).
    pub fn extend_window(&self, out: &mut Vec<u32>, start: usize, n: usize) {
        assert!(
            start + n <= self.len,
            "window {start}..{} out of range for a shard of {}",
            start + n,
            self.len
        );
        let bytes = &self.body()[start * self.width..(start + n) * self.width];
        if self.width == 2 {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            );
        } else {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
    }

    /// Tokens `start..start + n` as a vector.
    pub fn window(&self, start: usize, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        self.extend_window(&mut out, start, n);
        out
    }

    /// All tokens as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        self.window(0, self.len)
    }

    /// The first token id >= `vocab` and its index, scanning in parallel blocks.
    fn first_out_of_vocab(&self, vocab: u32) -> Option<(usize, u32)> {
        const BLOCK: usize = 1 << 20;
        let nblocks = self.len.div_ceil(BLOCK);
        (0..nblocks).into_par_iter().find_map_first(|blk| {
            let start = blk * BLOCK;
            let ids = self.window(start, BLOCK.min(self.len - start));
            ids.iter()
                .position(|&id| id >= vocab)
                .map(|i| (start + i, ids[i]))
        })
    }
}

impl PartialEq for Tokens {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && (0..self.len).all(|i| self.get(i) == other.get(i))
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} x u{})", self.len, self.width * 8)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Opens a shard and checks everything: header size, magic, version, dtype (and that it matches
/// the vocabulary), that `count` matches the file length, that it is not empty, the vocabulary
/// against `expected_vocab`, and that every token id is inside the vocabulary. The tokens stay
/// in the memory-mapped file. Every failure is an [`AsaError::Input`] naming the file.
pub fn read_shard(path: &Path, expected_vocab: Option<usize>) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            input_err(format!("token shard {} does not exist", path.display()))
        } else {
            AsaError::io(path, e)
        }
    })?;
    let file_len = file.metadata().map_err(|e| AsaError::io(path, e))?.len();
    let mut head = [0u8; SHARD_HEADER_BYTES];
    let have = (file_len as usize).min(SHARD_HEADER_BYTES);
    {
        use std::io::Read;
        (&file)
            .read_exact(&mut head[..have])
            .map_err(|e| AsaError::io(path, e))?;
    }
    let (dtype, count, vocab) = check_header(&head[..have], file_len, path, expected_vocab)?;
    // SAFETY: the map is read-only; the file is not modified while mapped (documented on
    // `Tokens`: prepared shards are written once).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| AsaError::io(path, e))?;
    let tokens = Tokens {
        map: std::sync::Arc::new(map),
        width: dtype as usize,
        len: count as usize,
    };
    if let Some((i, id)) = tokens.first_out_of_vocab(vocab) {
        return Err(input_err(format!(
            "token shard {}: token {i} has id {id}, outside the vocabulary (size {vocab})",
            path.display()
        )));
    }
    Ok(Shard {
        path: path.to_path_buf(),
        vocab_size: vocab,
        tokens,
    })
}

/// Checks a shard header (`head`: the file's first bytes, at most the header) against the file
/// length and the expected vocabulary; returns (dtype bytes, count, vocab).
fn check_header(
    head: &[u8],
    file_len: u64,
    path: &Path,
    expected_vocab: Option<usize>,
) -> Result<(u32, u64, u32)> {
    let name = path.display();
    let bad = |what: String| input_err(format!("token shard {name}: {what}"));
    if head.len() < SHARD_HEADER_BYTES {
        return Err(bad(format!(
            "{} bytes is shorter than the {SHARD_HEADER_BYTES}-byte header (truncated?)",
            head.len()
        )));
    }
    if head[0..8] != SHARD_MAGIC {
        return Err(bad("bad magic: not an asa token shard".into()));
    }
    let version = u32_at(head, 8);
    if version != SHARD_VERSION {
        return Err(bad(format!(
            "unknown format version {version} (this asa reads version {SHARD_VERSION})"
        )));
    }
    let dtype = u32_at(head, 12);
    if dtype != 2 && dtype != 4 {
        return Err(bad(format!(
            "unknown dtype {dtype} (expected 2 for u16 or 4 for u32)"
        )));
    }
    let count = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    let vocab = u32_at(head, 24);
    let reserved = u32_at(head, 28);
    if reserved != 0 {
        return Err(bad(format!(
            "reserved header field is {reserved}, expected 0"
        )));
    }
    if vocab == 0 {
        return Err(bad("vocabulary size is 0".into()));
    }
    if dtype != dtype_bytes_for_vocab(vocab as usize) {
        return Err(bad(format!(
            "dtype {} does not match vocabulary size {vocab} (u16 iff vocab <= 65536)",
            dtype_name(dtype)
        )));
    }
    if count == 0 {
        return Err(bad("empty (0 tokens)".into()));
    }
    let body = file_len - SHARD_HEADER_BYTES as u64;
    let expected_body = count.checked_mul(dtype as u64);
    if expected_body != Some(body) {
        let have = body / dtype as u64;
        return Err(bad(if expected_body.is_none_or(|e| body < e) {
            format!("truncated: header says {count} tokens, file holds {have}")
        } else {
            format!(
                "{} trailing bytes after the {count} tokens the header declares",
                body - expected_body.unwrap_or(0)
            )
        }));
    }
    if usize::try_from(count).is_err() {
        return Err(bad(format!(
            "{count} tokens do not fit this machine's memory"
        )));
    }
    if let Some(ev) = expected_vocab {
        if vocab as usize != ev {
            return Err(bad(format!(
                "vocabulary size {vocab} does not match the model's {ev} (prepared with another \
                 tokenizer?)"
            )));
        }
    }
    Ok((dtype, count, vocab))
}

/// All shards of a prepared folder, checked against its meta.json and the model's vocabulary.
#[derive(Debug, Clone)]
pub struct ShardSet {
    /// Training shards in order (train_000, train_001, ...).
    pub train: Vec<Shard>,
    pub val: Shard,
    /// The folder's meta.json.
    pub meta: Value,
}

impl ShardSet {
    /// Total training tokens.
    pub fn train_tokens(&self) -> u64 {
        self.train.iter().map(|s| s.tokens.len() as u64).sum()
    }

    /// The training shards as one token stream (copied into memory).
    pub fn train_concat(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.train_tokens() as usize);
        for s in &self.train {
            s.tokens.extend_window(&mut out, 0, s.tokens.len());
        }
        out
    }
}

/// Opens a folder written by [`prepare`]: reads meta.json and every shard it lists, and checks
/// them against each other and against `expected_vocab` (the model's vocabulary size). Every
/// failure is an [`AsaError::Input`] naming the file.
pub fn open_prepared(dir: &Path, expected_vocab: usize) -> Result<ShardSet> {
    let meta_path = dir.join(META_FILE);
    if !dir.is_dir() {
        return Err(input_err(format!(
            "{} is not a folder of prepared token shards (run `asa prepare` first)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&meta_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            input_err(format!(
                "{} is missing: {} is not a prepared data folder (run `asa prepare` first)",
                meta_path.display(),
                dir.display()
            ))
        } else {
            AsaError::io(&meta_path, e)
        }
    })?;
    let mp = meta_path.display();
    let meta: Value = serde_json::from_str(&text)
        .map_err(|e| input_err(format!("{mp} is not valid JSON: {e}")))?;
    let bad = |what: String| input_err(format!("{mp}: {what}"));
    let field_u64 = |v: &Value, key: &str| -> Result<u64> {
        v.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("missing or invalid field \"{key}\"")))
    };
    if meta.get("format").and_then(Value::as_str) != Some(META_FORMAT) {
        return Err(bad(format!("\"format\" is not \"{META_FORMAT}\"")));
    }
    let vocab = field_u64(&meta, "vocab_size")?;
    let tok_name = meta.get("tokenizer").and_then(Value::as_str).unwrap_or("?");
    if vocab != expected_vocab as u64 {
        return Err(input_err(format!(
            "{} was prepared with tokenizer {tok_name} (vocabulary {vocab}), but the model's \
             vocabulary is {expected_vocab}",
            dir.display()
        )));
    }
    let dtype = meta.get("dtype").and_then(Value::as_str);
    let want_dtype = dtype_name(dtype_bytes_for_vocab(expected_vocab));
    if dtype != Some(want_dtype) {
        return Err(bad(format!(
            "dtype {dtype:?} does not match vocabulary {vocab} (expected \"{want_dtype}\")"
        )));
    }
    let entry = |e: &Value| -> Result<(String, u64)> {
        let file = e
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a shard entry has no \"file\"".into()))?;
        // Only plain names inside the folder.
        if Path::new(file).file_name().and_then(|n| n.to_str()) != Some(file) || file == ".." {
            return Err(bad(format!("shard name {file:?} is not a plain file name")));
        }
        Ok((file.to_string(), field_u64(e, "tokens")?))
    };
    let load = |file: &str, tokens: u64| -> Result<Shard> {
        let shard = read_shard(&dir.join(file), Some(expected_vocab))?;
        if shard.tokens.len() as u64 != tokens {
            return Err(input_err(format!(
                "token shard {} holds {} tokens but {mp} says {tokens}",
                shard.path.display(),
                shard.tokens.len()
            )));
        }
        Ok(shard)
    };
    let entries = meta
        .get("train_shards")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or invalid field \"train_shards\"".into()))?;
    if entries.is_empty() {
        return Err(bad("lists no training shards".into()));
    }
    let mut listed = std::collections::HashSet::new();
    let mut files = Vec::with_capacity(entries.len());
    for e in entries {
        let (file, n) = entry(e)?;
        if !listed.insert(file.clone()) {
            return Err(bad(format!("lists {file} twice")));
        }
        files.push((file, n));
    }
    // A training shard on disk that meta.json does not list means a mixed-up folder.
    let rd = std::fs::read_dir(dir).map_err(|e| AsaError::io(dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| AsaError::io(dir, e))?;
        let name = ent.file_name();
        if let Some(name) = name.to_str() {
            if is_train_shard_name(name) && !listed.contains(name) {
                return Err(bad(format!(
                    "does not list {} found in the folder (re-run `asa prepare --force`)",
                    ent.path().display()
                )));
            }
        }
    }
    let mut train = Vec::with_capacity(files.len());
    for (file, n) in &files {
        train.push(load(file, *n)?);
    }
    let train_sum: u64 = train.iter().map(|s| s.tokens.len() as u64).sum();
    let train_tokens = field_u64(&meta, "train_tokens")?;
    if train_sum != train_tokens {
        return Err(bad(format!(
            "says {train_tokens} training tokens, the shards hold {train_sum}"
        )));
    }
    let (val_file, val_n) = entry(
        meta.get("val_shard")
            .ok_or_else(|| bad("missing field \"val_shard\"".into()))?,
    )?;
    let val = load(&val_file, val_n)?;
    let val_tokens = field_u64(&meta, "val_tokens")?;
    if val_tokens != val_n {
        return Err(bad(format!(
            "says {val_tokens} validation tokens, the shard holds {val_n}"
        )));
    }
    Ok(ShardSet { train, val, meta })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(inputs: Vec<PathBuf>, outdir: &Path, tok: Tokenizer) -> PrepareOptions {
        let mut o = PrepareOptions::new(inputs, outdir.to_path_buf(), tok);
        o.progress = false;
        o
    }

    /// The chunks `ChunkReader` cuts a file into.
    fn chunks_of(path: &Path, chunk_bytes: usize) -> Vec<String> {
        let mut r = ChunkReader::open(path, chunk_bytes).unwrap();
        let mut out = Vec::new();
        while let Some((s, _)) = r.next_chunk().unwrap() {
            out.push(s);
        }
        out
    }

    fn sample_text(paragraphs: usize) -> String {
        let mut s = String::new();
        for i in 0..paragraphs {
            s.push_str(&format!(
                "Paragraph {i}: the capital of France is Paris, caf\u{e9} \u{4e2d}\u{6587}.\n\
                 It's a line with  two spaces\tand a tab.\r\n\n"
            ));
        }
        s
    }

    fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn no_tmp_files(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
    }

    fn input_msg(e: AsaError) -> String {
        match e {
            AsaError::Input(m) => m,
            other => panic!("expected an input error, got {other}"),
        }
    }

    #[test]
    fn byte_round_trip_u16_with_rotation_and_eot_free_join() {
        let td = tempfile::tempdir().unwrap();
        let a = sample_text(20);
        let b = "second file\nwith two lines\n".repeat(10);
        let pa = write(td.path(), "a.txt", a.as_bytes());
        let pb = write(td.path(), "b.txt", b.as_bytes());
        let out = td.path().join("out");
        let mut o = opts(vec![pa.clone(), pb.clone()], &out, Tokenizer::byte());
        o.val_frac = 0.25; // k = 4
        o.shard_tokens = 300;
        let rep = prepare_with_chunk(&o, 64).unwrap();
        assert_eq!(rep.dtype, "u16");
        assert_eq!(rep.vocab_size, 256);
        assert_eq!(
            rep.train_tokens + rep.val_tokens,
            (a.len() + b.len()) as u64
        );
        assert!(rep.train_shards.len() >= 2);
        assert_eq!(rep.train_shards[0], out.join("train_000.bin"));
        assert!(no_tmp_files(&out));

        // Header bytes as specified.
        let raw = std::fs::read(&rep.train_shards[0]).unwrap();
        assert_eq!(&raw[..8], b"ASATOK\0\0");
        assert_eq!(u32_at(&raw, 8), 1);
        assert_eq!(u32_at(&raw, 12), 2);
        assert_eq!(u64::from_le_bytes(raw[16..24].try_into().unwrap()), 300);
        assert_eq!(u32_at(&raw, 24), 256);
        assert_eq!(u32_at(&raw, 28), 0);
        assert_eq!(raw.len(), 32 + 2 * 300);

        let set = open_prepared(&out, 256).unwrap();
        assert_eq!(set.train.len(), rep.train_shards.len());
        assert!(set.train.iter().all(|s| s.tokens.len() <= 300));
        assert_eq!(set.train_tokens(), rep.train_tokens);
        assert_eq!(set.val.tokens.len() as u64, rep.val_tokens);
        assert_eq!(set.meta["tokenizer"], "byte");
        assert_eq!(set.meta["dtype"], "u16");
        assert_eq!(set.meta["vocab_size"], 256);
        assert_eq!(set.meta["eot_token"], Value::Null);
        assert_eq!(set.meta["sources"][1]["bytes"], b.len() as u64);
        assert_eq!(set.meta["asa_version"], env!("CARGO_PKG_VERSION"));

        // Exact contents: chunks in order, every 4th to val (byte tokenizer: no EOT).
        let chunks: Vec<String> = chunks_of(&pa, 64)
            .into_iter()
            .chain(chunks_of(&pb, 64))
            .collect();
        let (mut tr, mut va) = (Vec::new(), Vec::new());
        for (i, c) in chunks.iter().enumerate() {
            let dst = if i % 4 == 3 { &mut va } else { &mut tr };
            dst.extend(c.bytes().map(u32::from));
        }
        assert_eq!(set.train_concat(), tr);
        assert_eq!(set.val.tokens.to_vec(), va);
    }

    #[test]
    fn chunks_never_split_utf8_and_rejoin_exactly() {
        let td = tempfile::tempdir().unwrap();
        // No newlines: the cut falls back to character boundaries.
        let text = "\u{e9}\u{4e2d}\u{1f600}a".repeat(50);
        let p = write(td.path(), "u.txt", text.as_bytes());
        let chunks = chunks_of(&p, 17);
        assert!(chunks.len() > 10);
        assert_eq!(chunks.concat(), text);
        // With a BOM: skipped.
        let mut bom = vec![0xEF, 0xBB, 0xBF];
        bom.extend_from_slice(sample_text(5).as_bytes());
        let p = write(td.path(), "bom.txt", &bom);
        assert_eq!(chunks_of(&p, 40).concat(), sample_text(5));
    }

    #[test]
    fn non_utf8_input_names_file_and_offset_and_leaves_nothing() {
        let td = tempfile::tempdir().unwrap();
        let good = write(td.path(), "good.txt", sample_text(10).as_bytes());
        let mut bytes = sample_text(3).into_bytes();
        let at = bytes.len() + 5;
        bytes.extend_from_slice(b"hello");
        bytes.push(0xFF);
        bytes.extend_from_slice(b" more text\n");
        let bad = write(td.path(), "bad.txt", &bytes);
        let out = td.path().join("out");
        let mut o = opts(vec![good, bad], &out, Tokenizer::byte());
        o.shard_tokens = 50; // finished shards exist when the error comes
        o.val_frac = 0.5;
        let e = input_msg(prepare_with_chunk(&o, 32).unwrap_err());
        assert!(
            e.contains("bad.txt") && e.contains(&format!("offset {at}")),
            "{e}"
        );
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn u32_shards_for_vocab_over_65536() {
        let td = tempfile::tempdir().unwrap();
        // Hand-made u32 shard.
        let ids = [0u32, 65535, 65536, 69_999];
        let mut raw = encode_header(4, ids.len() as u64, 70_000).to_vec();
        for id in ids {
            raw.extend_from_slice(&id.to_le_bytes());
        }
        let p = write(td.path(), "u32.bin", &raw);
        let s = read_shard(&p, Some(70_000)).unwrap();
        assert_eq!(s.tokens.to_vec(), ids);
        assert_eq!(s.vocab_size, 70_000);
        // Writer path.
        let q = td.path().join("w.bin");
        let mut w = ShardWriter::create(&q, 70_000).unwrap();
        w.push(&ids).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&q).unwrap(), raw);

        // Whole prepare with a tokenizer.json whose largest id is 70000.
        let json = r#"{
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 70000},
                      "unk_token": "[UNK]"}
        }"#;
        let tp = write(td.path(), "tokenizer.json", json.as_bytes());
        let tok = Tokenizer::from_file(&tp).unwrap();
        assert_eq!(tok.vocab_size(), 70_001);
        assert_eq!(end_of_text_token(&tok), None); // [UNK] is not taken for an EOT
        let input = write(td.path(), "t.txt", "hello world ".repeat(100).as_bytes());
        let out = td.path().join("out");
        let mut o = opts(vec![input], &out, tok);
        o.val_frac = 0.1;
        let rep = prepare(&o).unwrap();
        assert_eq!(rep.dtype, "u32");
        assert_eq!((rep.train_tokens, rep.val_tokens), (180, 20));
        let set = open_prepared(&out, 70_001).unwrap();
        assert_eq!(set.train[0].tokens.window(0, 2), [1, 70_000]);
        let raw = std::fs::read(&rep.val_shard).unwrap();
        assert_eq!(u32_at(&raw, 12), 4);
        assert_eq!(raw.len(), 32 + 4 * 20);
    }

    #[test]
    fn split_is_deterministic() {
        let td = tempfile::tempdir().unwrap();
        let p = write(td.path(), "a.txt", sample_text(40).as_bytes());
        let run = |name: &str| {
            let out = td.path().join(name);
            let mut o = opts(vec![p.clone()], &out, Tokenizer::byte());
            o.val_frac = 0.2; // k = 5
            let rep = prepare_with_chunk(&o, 100).unwrap();
            let files: Vec<Vec<u8>> = rep
                .train_shards
                .iter()
                .chain([&rep.val_shard])
                .map(|f| std::fs::read(f).unwrap())
                .collect();
            (rep.train_tokens, rep.val_tokens, files)
        };
        let (t1, v1, f1) = run("o1");
        let (t2, v2, f2) = run("o2");
        assert_eq!((t1, v1), (t2, v2));
        assert_eq!(f1, f2);
        let chunks = chunks_of(&p, 100);
        let val: usize = chunks.iter().skip(4).step_by(5).map(|c| c.len()).sum();
        assert!(chunks.len() >= 10);
        assert_eq!(v1 as usize, val);

        // Fewer chunks than k: the last val_frac of the tokens (from the last chunk).
        let out = td.path().join("o3");
        let mut o = opts(vec![p.clone()], &out, Tokenizer::byte());
        o.val_frac = 0.001;
        let rep = prepare_with_chunk(&o, 1000).unwrap();
        let chunks = chunks_of(&p, 1000);
        assert!(chunks.len() >= 2 && chunks.len() < 1000);
        let total = rep.train_tokens + rep.val_tokens;
        assert_eq!(
            rep.val_tokens,
            ((total as f64 * 0.001).round() as u64).max(1)
        );
        let all: Vec<u32> = std::fs::read(&p)
            .unwrap()
            .into_iter()
            .map(u32::from)
            .collect();
        let set = open_prepared(&out, 256).unwrap();
        assert_eq!(
            set.val.tokens.to_vec(),
            all[all.len() - rep.val_tokens as usize..]
        );

        // One chunk: its last val_frac of tokens.
        let out = td.path().join("o4");
        let text = "0123456789".repeat(10);
        let q = write(td.path(), "one.txt", text.as_bytes());
        let mut o = opts(vec![q], &out, Tokenizer::byte());
        o.val_frac = 0.1;
        let rep = prepare(&o).unwrap();
        assert_eq!((rep.train_tokens, rep.val_tokens), (90, 10));
        let set = open_prepared(&out, 256).unwrap();
        assert_eq!(
            set.val.tokens.to_vec(),
            "0123456789".bytes().map(u32::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn many_small_files_hold_out_the_fraction_not_a_whole_file() {
        // The README's `asa prepare my_corpus/*.txt`: seven small files, one chunk each, at the
        // default 0.005. The last file (1/7 = 14% of the tokens) used to be the validation set.
        let td = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..7)
            .map(|i| write(td.path(), &format!("f{i}.txt"), sample_text(30).as_bytes()))
            .collect();
        let out = td.path().join("o");
        let o = opts(files, &out, Tokenizer::byte());
        assert_eq!(o.val_frac, DEFAULT_VAL_FRAC);
        let rep = prepare(&o).unwrap();
        let total = rep.train_tokens + rep.val_tokens;
        let frac = rep.val_tokens as f64 / total as f64;
        assert!(total > 7 * 1000, "{total}");
        assert!((frac - DEFAULT_VAL_FRAC).abs() < 0.001, "held out {frac}");
        // A tiny last file: all of it (less than the fraction), never training data alone.
        let mut files: Vec<PathBuf> = (0..3)
            .map(|i| write(td.path(), &format!("g{i}.txt"), sample_text(30).as_bytes()))
            .collect();
        files.push(write(td.path(), "tiny.txt", b"ab\n"));
        let out = td.path().join("o2");
        let mut o = opts(files, &out, Tokenizer::byte());
        o.val_frac = 0.1;
        let rep = prepare(&o).unwrap();
        assert!(
            rep.val_tokens >= 3 && rep.val_tokens <= 4,
            "{}",
            rep.val_tokens
        );
    }

    #[test]
    fn outdir_that_is_a_file_is_named() {
        let td = tempfile::tempdir().unwrap();
        let p = write(td.path(), "a.txt", sample_text(10).as_bytes());
        let file = write(td.path(), "taken", b"x");
        for out in [file.clone(), file.join("sub")] {
            let o = opts(vec![p.clone()], &out, Tokenizer::byte());
            let e = prepare(&o).unwrap_err().to_string();
            assert!(
                e.contains(&file.display().to_string()) && e.contains("is not a folder"),
                "{e}"
            );
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn refuses_overwrite_without_force_and_overwrites_with_force() {
        let td = tempfile::tempdir().unwrap();
        let p = write(td.path(), "a.txt", sample_text(10).as_bytes());
        let out = td.path().join("out");
        let mut o = opts(vec![p.clone()], &out, Tokenizer::byte());
        o.shard_tokens = 200;
        let first = prepare(&o).unwrap();
        assert!(first.train_shards.len() > 2);
        let meta_before = std::fs::read(out.join(META_FILE)).unwrap();
        let e = input_msg(prepare(&o).unwrap_err());
        assert!(e.contains("--force") && e.contains("out"), "{e}");
        assert_eq!(std::fs::read(out.join(META_FILE)).unwrap(), meta_before);
        // A folder with only a stray shard is refused too.
        let other = td.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("train_007.bin"), b"x").unwrap();
        let mut o2 = opts(vec![p.clone()], &other, Tokenizer::byte());
        assert!(prepare(&o2).is_err());
        o2.force = true;
        prepare(&o2).unwrap();
        assert!(!other.join("train_007.bin").exists());
        // Force with bigger shards: the old extra shards are gone, other files stay.
        std::fs::write(out.join("notes.txt"), b"keep").unwrap();
        o.force = true;
        o.shard_tokens = DEFAULT_SHARD_TOKENS;
        let second = prepare(&o).unwrap();
        assert_eq!(second.train_shards.len(), 1);
        assert!(!out.join("train_001.bin").exists());
        assert!(out.join("notes.txt").exists());
        open_prepared(&out, 256).unwrap();
        assert!(no_tmp_files(&out));
    }

    #[test]
    fn option_and_input_errors() {
        let td = tempfile::tempdir().unwrap();
        let p = write(td.path(), "a.txt", b"some text\n");
        let out = td.path().join("out");
        let mut o = opts(vec![], &out, Tokenizer::byte());
        assert!(matches!(prepare(&o), Err(AsaError::Input(_))));
        o.inputs = vec![p.clone()];
        for f in [0.0, 1.0, -0.1, f64::NAN] {
            o.val_frac = f;
            assert!(matches!(prepare(&o), Err(AsaError::Input(_))), "{f}");
        }
        o.val_frac = 0.1;
        o.inputs = vec![td.path().join("missing.txt")];
        let e = prepare(&o).unwrap_err().to_string();
        assert!(e.contains("missing.txt"), "{e}");
        o.inputs = vec![write(td.path(), "blank.txt", b"  \n\n")];
        let e = input_msg(prepare(&o).unwrap_err());
        assert!(e.contains("blank.txt") && e.contains("empty"), "{e}");
        o.inputs = vec![write(td.path(), "one.txt", b"x")];
        let e = input_msg(prepare(&o).unwrap_err());
        assert!(e.contains("not enough"), "{e}");
        assert!(existing_outputs(&out).unwrap().is_empty());
        assert!(no_tmp_files(&out));
    }

    #[test]
    fn mapped_tokens_read_windows_and_check_every_block() {
        let td = tempfile::tempdir().unwrap();
        // u32 ids over more than one 1M-token check block
        let n = (1 << 20) + 4321;
        let ids: Vec<u32> = (0..n as u64).map(|i| (i * 7919 % 70_000) as u32).collect();
        let mut raw = encode_header(4, n as u64, 70_000).to_vec();
        ids.iter()
            .for_each(|id| raw.extend_from_slice(&id.to_le_bytes()));
        let p = write(td.path(), "big.bin", &raw);
        let s = read_shard(&p, Some(70_000)).unwrap();
        assert_eq!(s.tokens.len(), n);
        assert_eq!(s.tokens.get(n - 1), ids[n - 1]);
        assert_eq!(s.tokens.window(n - 10, 10), ids[n - 10..]);
        let mut out = vec![7];
        s.tokens.extend_window(&mut out, 1 << 20, 3);
        assert_eq!(
            out,
            [7, ids[1 << 20], ids[(1 << 20) + 1], ids[(1 << 20) + 2]]
        );
        assert_eq!(s.tokens.to_vec(), ids);
        // a bad id in the second block is found and named
        let at = (1 << 20) + 17;
        raw[SHARD_HEADER_BYTES + 4 * at..SHARD_HEADER_BYTES + 4 * at + 4]
            .copy_from_slice(&70_000u32.to_le_bytes());
        let p = write(td.path(), "bad.bin", &raw);
        let e = input_msg(read_shard(&p, None).unwrap_err());
        assert!(e.contains(&format!("token {at} has id 70000")), "{e}");
    }

    #[test]
    fn reader_errors_name_the_file() {
        let td = tempfile::tempdir().unwrap();
        let good = {
            let mut raw = encode_header(2, 4, 256).to_vec();
            for id in [1u16, 2, 3, 255] {
                raw.extend_from_slice(&id.to_le_bytes());
            }
            raw
        };
        let ok = write(td.path(), "ok.bin", &good);
        assert_eq!(
            read_shard(&ok, Some(256)).unwrap().tokens.to_vec(),
            [1, 2, 3, 255]
        );
        assert_eq!(read_shard(&ok, None).unwrap().vocab_size, 256);

        let patch = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        let cases: Vec<(&str, Vec<u8>, Option<usize>, &str)> = vec![
            ("short.bin", good[..20].to_vec(), None, "shorter than"),
            ("magic.bin", patch(&|b| b[0] = b'X'), None, "magic"),
            ("version.bin", patch(&|b| b[8] = 2), None, "version 2"),
            ("dtype.bin", patch(&|b| b[12] = 3), None, "dtype 3"),
            (
                "dtype_vocab.bin",
                patch(&|b| b[12] = 4),
                None,
                "does not match vocabulary",
            ),
            (
                "truncated.bin",
                good[..good.len() - 1].to_vec(),
                None,
                "truncated",
            ),
            (
                "trailing.bin",
                patch(&|b| b.extend_from_slice(&[0, 0])),
                None,
                "trailing",
            ),
            (
                "empty.bin",
                encode_header(2, 0, 256).to_vec(),
                None,
                "empty",
            ),
            (
                "vocab.bin",
                good.clone(),
                Some(50257),
                "does not match the model",
            ),
            ("reserved.bin", patch(&|b| b[28] = 1), None, "reserved"),
            (
                "big_id.bin",
                patch(&|b| b[32 + 7] = 1),
                None,
                "token 3 has id 511",
            ),
        ];
        for (name, bytes, ev, want) in cases {
            let p = write(td.path(), name, &bytes);
            let e = input_msg(read_shard(&p, ev).unwrap_err());
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
        let e = input_msg(read_shard(&td.path().join("nope.bin"), None).unwrap_err());
        assert!(
            e.contains("nope.bin") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn open_prepared_errors() {
        let td = tempfile::tempdir().unwrap();
        let p = write(td.path(), "a.txt", sample_text(5).as_bytes());
        let out = td.path().join("out");
        let mut o = opts(vec![p], &out, Tokenizer::byte());
        o.shard_tokens = 200;
        o.val_frac = 0.1;
        prepare(&o).unwrap();
        open_prepared(&out, 256).unwrap();
        let meta_text = std::fs::read_to_string(out.join(META_FILE)).unwrap();
        let meta: Value = serde_json::from_str(&meta_text).unwrap();

        // Wrong model vocabulary.
        let e = input_msg(open_prepared(&out, 50257).unwrap_err());
        assert!(e.contains("byte") && e.contains("50257"), "{e}");

        let with_meta = |m: &Value, want: &str| {
            std::fs::write(out.join(META_FILE), serde_json::to_string(m).unwrap()).unwrap();
            let e = input_msg(open_prepared(&out, 256).unwrap_err());
            assert!(e.contains(want), "{want}: {e}");
            std::fs::write(out.join(META_FILE), &meta_text).unwrap();
        };
        let mut m = meta.clone();
        m["train_shards"][0]["tokens"] = json!(199);
        with_meta(&m, "train_000.bin holds 200 tokens");
        let mut m = meta.clone();
        m["train_tokens"] = json!(1);
        with_meta(&m, "training tokens");
        let mut m = meta.clone();
        m["val_shard"]["tokens"] = json!(1);
        with_meta(&m, "val.bin holds");
        let mut m = meta.clone();
        m["dtype"] = json!("u32");
        with_meta(&m, "dtype");
        let mut m = meta.clone();
        m["train_shards"][0]["file"] = json!("../a.txt");
        with_meta(&m, "plain file name");
        let mut m = meta.clone();
        m["train_shards"].as_array_mut().unwrap().pop();
        with_meta(&m, "does not list");

        // A missing shard.
        let t1 = out.join("train_001.bin");
        std::fs::rename(&t1, out.join("moved")).unwrap();
        let e = input_msg(open_prepared(&out, 256).unwrap_err());
        assert!(e.contains("train_001.bin does not exist"), "{e}");
        std::fs::rename(out.join("moved"), &t1).unwrap();

        // A corrupted shard is reported by name.
        let t1 = out.join("train_001.bin");
        let raw = std::fs::read(&t1).unwrap();
        std::fs::write(&t1, &raw[..raw.len() - 3]).unwrap();
        let e = input_msg(open_prepared(&out, 256).unwrap_err());
        assert!(
            e.contains("train_001.bin") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&t1, &raw).unwrap();

        // Missing meta.json / not JSON.
        std::fs::write(out.join(META_FILE), "{").unwrap();
        let e = input_msg(open_prepared(&out, 256).unwrap_err());
        assert!(e.contains("meta.json") && e.contains("JSON"), "{e}");
        std::fs::remove_file(out.join(META_FILE)).unwrap();
        let e = input_msg(open_prepared(&out, 256).unwrap_err());
        assert!(e.contains("meta.json") && e.contains("missing"), "{e}");
        let e = input_msg(open_prepared(&td.path().join("nowhere"), 256).unwrap_err());
        assert!(e.contains("nowhere"), "{e}");
    }

    #[test]
    fn gpt2_token_counts_match_encoding() {
        let tok = Tokenizer::gpt2().unwrap();
        assert_eq!(end_of_text_token(&tok), Some(50256));
        let td = tempfile::tempdir().unwrap();
        let a = sample_text(6);
        let b = "To be, or not to be,--that is the question:--\n\nWhether 'tis nobler.\n";
        let pa = write(td.path(), "a.txt", a.as_bytes());
        let pb = write(td.path(), "b.txt", b.as_bytes());
        let enc_a = tok.encode(&a).unwrap();
        let enc_b = tok.encode(b).unwrap();

        // Chunk cuts do not change GPT-2 tokens.
        let chunks = chunks_of(&pa, 64);
        assert!(chunks.len() > 5);
        let joined: Vec<u32> = chunks.iter().flat_map(|c| tok.encode(c).unwrap()).collect();
        assert_eq!(joined, enc_a);

        // One small file: train ++ val is exactly its encoding.
        let out = td.path().join("one");
        let mut o = opts(vec![pa.clone()], &out, tok.clone());
        o.val_frac = 0.1;
        let rep = prepare(&o).unwrap();
        assert_eq!(rep.dtype, "u16");
        assert_eq!(rep.vocab_size, 50257);
        let set = open_prepared(&out, 50257).unwrap();
        let mut all = set.train_concat();
        all.extend_from_slice(&set.val.tokens.to_vec());
        assert_eq!(all, enc_a);
        assert_eq!(set.meta["eot_token"], 50256);

        // Two files: joined by <|endoftext|>; the last val_frac of the tokens is validation.
        let out = td.path().join("two");
        let o = opts(vec![pa, pb], &out, tok.clone());
        let rep = prepare(&o).unwrap();
        let mut want = enc_a.clone();
        want.push(50256);
        want.extend_from_slice(&enc_b);
        let n_val = ((want.len() as f64 * DEFAULT_VAL_FRAC).round() as usize).max(1);
        assert_eq!(rep.val_tokens as usize, n_val);
        assert_eq!(rep.train_tokens as usize, want.len() - n_val);
        let set = open_prepared(&out, 50257).unwrap();
        let mut all = set.train_concat();
        all.extend_from_slice(&set.val.tokens.to_vec());
        assert_eq!(all, want);
    }
}
