//! `asa eval`: the test perplexity of a checkpoint by sliding windows, as the reference's
//! notebooks compute their validation loss (`build_or_load_validation_windows` and `evaluate`
//! in `building_blocks/ASAResearch.ipynb`):
//!
//! - windows of `T + 1` tokens start at 0, `stride`, `2 stride`, ... while a whole window fits
//!   the stream, with `stride = max(1, floor(T * stride_frac))` (`stride_frac_val`, 0.5 by
//!   default): a window's inputs are its first `T` tokens, its targets the last `T`;
//! - every window is scored on all its `T` targets, in eval mode (no dropout);
//! - the loss is the mean over windows of each window's mean token loss (the reference's mean of
//!   batch means, the same number whenever its batches are full), the perplexity its `exp`.
//!
//! Overlapping windows score a token once per window that holds it as a target, as the
//! reference does; `--stride-frac 1` scores every token once.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::engine::Engine;
use crate::error::{AsaError, Result};

/// How to cut the stream into windows and score them.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// T: tokens a window predicts
    pub seq_len: usize,
    /// the stride as a share of T (the reference's `stride_frac_val`)
    pub stride_frac: f64,
    /// windows per forward
    pub batch: usize,
    /// score at most this many windows (the first ones)
    pub max_windows: Option<usize>,
    /// no progress bar
    pub quiet: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            seq_len: 256,
            stride_frac: 0.5,
            batch: 8,
            max_windows: None,
            quiet: false,
        }
    }
}

/// What `asa eval` reports (and writes with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub checkpoint: String,
    pub data: String,
    /// mean token loss (nats)
    pub loss: f64,
    pub perplexity: f64,
    pub windows: usize,
    /// targets scored: windows x T
    pub tokens_scored: usize,
    pub stream_tokens: usize,
    pub seq_len: usize,
    pub stride: usize,
    pub device: String,
    pub seconds: f64,
    /// the forward controls the windows ran with (absent: the model as trained)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_controls: Option<crate::controls::ForwardControls>,
}

/// The reference's stride for windows of `t` tokens.
pub fn stride_of(t: usize, stride_frac: f64) -> usize {
    ((t as f64 * stride_frac).floor() as usize).max(1)
}

/// The start of every window of `t + 1` tokens of a stream of `n` tokens, `stride` apart (at
/// most `max`).
pub fn window_starts(n: usize, t: usize, stride: usize, max: Option<usize>) -> Vec<usize> {
    if n < t + 1 {
        return Vec::new();
    }
    let last = n - (t + 1);
    (0..=last)
        .step_by(stride.max(1))
        .take(max.unwrap_or(usize::MAX))
        .collect()
}

/// Checks the options before anything is loaded.
pub fn check_options(o: &EvalOptions) -> Result<()> {
    if o.seq_len == 0 {
        return Err(AsaError::Input("--seq-len must be >= 1, got 0".into()));
    }
    if !(o.stride_frac.is_finite() && o.stride_frac > 0.0 && o.stride_frac <= 1.0) {
        return Err(AsaError::Input(format!(
            "--stride-frac must be in (0, 1], got {}",
            o.stride_frac
        )));
    }
    if o.batch == 0 {
        return Err(AsaError::Input("--batch must be >= 1, got 0".into()));
    }
    if o.max_windows == Some(0) {
        return Err(AsaError::Input("--max-windows must be >= 1, got 0".into()));
    }
    Ok(())
}

/// Scores `stream` on `engine` by the reference's sliding windows: (mean loss, windows, stride).
/// An error when the stream holds no whole window or a token id is not below `vocab`.
pub fn evaluate(
    engine: &mut Engine,
    stream: &[u32],
    vocab: usize,
    o: &EvalOptions,
) -> Result<(f64, usize, usize)> {
    check_options(o)?;
    let t = o.seq_len;
    if let Some((i, &id)) = stream
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(AsaError::Input(format!(
            "token {i} of the stream is id {id}, not below the model's vocab_size {vocab} (was the data prepared with another tokenizer?)"
        )));
    }
    let stride = stride_of(t, o.stride_frac);
    let starts = window_starts(stream.len(), t, stride, o.max_windows);
    if starts.is_empty() {
        return Err(AsaError::Input(format!(
            "the data holds {} tokens: fewer than one window of --seq-len {t} + 1",
            stream.len()
        )));
    }
    let bar = if o.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(starts.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} windows {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut sum = 0.0f64;
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for chunk in starts.chunks(o.batch) {
        inputs.clear();
        targets.clear();
        for &s in chunk {
            inputs.extend_from_slice(&stream[s..s + t]);
            targets.extend(stream[s + 1..s + t + 1].iter().map(|&x| x as i64));
        }
        // the batch's mean over its windows' targets = the mean of the windows' means
        let loss = engine.eval_loss(&inputs, &targets, chunk.len(), t)?;
        if !loss.is_finite() {
            return Err(AsaError::Other(format!(
                "the loss of windows {}..{} is not finite ({loss})",
                chunk[0],
                chunk[chunk.len() - 1] + t
            )));
        }
        sum += loss * chunk.len() as f64;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((sum / starts.len() as f64, starts.len(), stride))
}

/// Runs `evaluate` and fills the report.
pub fn run(
    engine: &mut Engine,
    stream: &[u32],
    vocab: usize,
    o: &EvalOptions,
    (checkpoint, data): (String, String),
) -> Result<EvalReport> {
    let started = Instant::now();
    let (loss, windows, stride) = evaluate(engine, stream, vocab, o)?;
    Ok(EvalReport {
        checkpoint,
        data,
        loss,
        perplexity: loss.exp(),
        windows,
        tokens_scored: windows * o.seq_len,
        stream_tokens: stream.len(),
        seq_len: o.seq_len,
        stride,
        device: engine.name(),
        seconds: started.elapsed().as_secs_f64(),
        forward_controls: None,
    })
}

/// The tokens a training run held out, as it held them out: a `train` run's prepared folder's
/// `val.bin`, or the last `val_frac` of a `train-mini` run's text (the embedded default data,
/// or its `--data` files) tokenized with `tok`. With a description for the report.
pub fn run_validation_stream(
    run_dir: &Path,
    tok: &crate::data::tokenizer::Tokenizer,
    vocab: usize,
) -> Result<(Vec<u32>, String)> {
    use crate::train::{read_json, RunDir, TrainSettings};
    let run = RunDir {
        dir: run_dir.to_path_buf(),
    };
    let s: TrainSettings = read_json(&run.settings())?;
    if let [dir] = s.data.as_slice() {
        if dir.join("meta.json").is_file() {
            let set = crate::data::shards::open_prepared(dir, vocab)?;
            return Ok((
                set.val.tokens.to_vec(),
                format!("{} (val.bin)", dir.display()),
            ));
        }
    }
    let (text, what) = if s.data.is_empty() {
        (
            crate::data::corpus::default_training_text(s.seed, s.fact_frac),
            "the embedded default data".to_string(),
        )
    } else {
        let names: Vec<String> = s.data.iter().map(|p| p.display().to_string()).collect();
        (crate::data::read_text_files(&s.data)?, names.join(", "))
    };
    let data = crate::data::batch::TokenData::new(tok.encode(&text)?, s.val_frac, s.seq_len)?;
    Ok((
        data.val,
        format!(
            "{what}: the held-out last {} of the run's tokens",
            s.val_frac
        ),
    ))
}

/// The reference notebooks' token stream of a text (`build_or_load_token_stream` in
/// `building_blocks/ASAResearch.ipynb`, one dataset row per line as Hugging Face's WikiText rows
/// are): each line stripped, lines with no tokens skipped, each tokenized alone and followed by
/// the end-of-text token.
pub fn line_stream(text: &str, tok: &crate::data::tokenizer::Tokenizer) -> Result<Vec<u32>> {
    let eos = tok.single_token("<|endoftext|>").ok_or_else(|| {
        AsaError::Input(format!(
            "--per-line needs an end-of-text token (<|endoftext|>), which tokenizer '{}' does not have",
            tok.name()
        ))
    })?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let ids = tok.encode(line)?;
        if ids.is_empty() {
            continue;
        }
        out.extend_from_slice(&ids);
        out.push(eos);
    }
    Ok(out)
}

/// Writes the report as JSON (temporary file, then renamed).
pub fn write_json(report: &EvalReport, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(|e| AsaError::Other(e.to_string()))?;
    crate::checkpoint::write_bytes_atomic(path, text.as_bytes()).map_err(|e| match e {
        AsaError::Checkpoint(m) => AsaError::Other(format!("cannot write {}: {m}", path.display())),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, Place, Precision};
    use crate::model::lm::{Lm, LmCache};
    use crate::vocab::options::AsaOptions;

    #[test]
    fn the_line_stream_is_the_notebooks() {
        let tok = crate::data::tokenizer::Tokenizer::gpt2().unwrap();
        let eos = tok.single_token("<|endoftext|>").unwrap();
        let s = line_stream(" = Title = \n\n  Some text .\n \n", &tok).unwrap();
        let mut want = tok.encode("= Title =").unwrap();
        want.push(eos);
        want.extend(tok.encode("Some text .").unwrap());
        want.push(eos);
        assert_eq!(s, want);
        assert!(line_stream("x", &crate::data::tokenizer::Tokenizer::byte()).is_err());
    }

    #[test]
    fn windows_follow_the_reference_rule() {
        // T = 4, stride_frac 0.5 -> stride 2; a stream of 11 tokens holds windows of 5 at
        // 0, 2, 4, 6 (the next, at 8, would need tokens 8..13)
        assert_eq!(stride_of(4, 0.5), 2);
        assert_eq!(stride_of(5, 0.5), 2);
        assert_eq!(stride_of(3, 0.1), 1);
        assert_eq!(window_starts(11, 4, 2, None), vec![0, 2, 4, 6]);
        assert_eq!(window_starts(10, 4, 2, None), vec![0, 2, 4]);
        assert_eq!(window_starts(5, 4, 2, None), vec![0]);
        assert!(window_starts(4, 4, 2, None).is_empty());
        assert_eq!(window_starts(11, 4, 2, Some(2)), vec![0, 2]);
    }

    #[test]
    fn the_loss_is_the_mean_of_the_windows_losses() {
        let cfg = ModelConfig {
            vocab_size: 32,
            embed_dim: 16,
            num_layers: 1,
            num_heads: 2,
            num_slots: 4,
            slotspace_dim: 4,
            write_chunk_size: 3,
            slotspace_chunk_size: 3,
            seed: 5,
            ..Default::default()
        };
        let (mut lm, params) = Lm::new(&cfg).unwrap();
        let stream: Vec<u32> = (0..23u32).map(|i| (i * 7 + 3) % 32).collect();
        let t = 6;
        // each window alone, by the CPU model
        let mut cache = LmCache::default();
        let mut want = 0.0;
        let starts = window_starts(stream.len(), t, stride_of(t, 0.5), None);
        for &s in &starts {
            lm.forward(
                &params,
                &stream[s..s + t],
                1,
                t,
                &AsaOptions::default(),
                &mut cache,
            )
            .unwrap();
            let tg: Vec<i64> = stream[s + 1..s + t + 1].iter().map(|&x| x as i64).collect();
            want += lm.loss(&mut cache, &tg, None).unwrap();
        }
        want /= starts.len() as f64;
        let mut engine = Engine::for_eval(lm, params, Place::Cpu, Precision::F32).unwrap();
        for batch in [1, 2, 5] {
            let o = EvalOptions {
                seq_len: t,
                batch,
                quiet: true,
                ..Default::default()
            };
            let (loss, windows, stride) = evaluate(&mut engine, &stream, 32, &o).unwrap();
            assert_eq!((windows, stride), (starts.len(), 3));
            assert!(
                (loss - want).abs() < 1e-5 * want,
                "batch {batch}: {loss} vs {want}"
            );
        }
        // an evaluation engine cannot step
        let batch = crate::engine::StepBatch::whole(&stream[..t], &[0; 6], 1, t);
        assert!(engine.step(batch, 1e-3, None).is_err());
    }

    #[test]
    fn bad_streams_and_options_are_refused() {
        let cfg = ModelConfig {
            vocab_size: 8,
            embed_dim: 8,
            num_layers: 1,
            num_heads: 2,
            num_slots: 2,
            slotspace_dim: 4,
            ..Default::default()
        };
        let (lm, params) = Lm::new(&cfg).unwrap();
        let mut engine = Engine::for_eval(lm, params, Place::Cpu, Precision::F32).unwrap();
        let o = EvalOptions {
            seq_len: 4,
            quiet: true,
            ..Default::default()
        };
        let e = evaluate(&mut engine, &[1, 2, 3], 8, &o).unwrap_err();
        assert!(e.to_string().contains("fewer than one window"), "{e}");
        let e = evaluate(&mut engine, &[1, 2, 9, 3, 4, 5], 8, &o).unwrap_err();
        assert!(e.to_string().contains("id 9"), "{e}");
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let o = EvalOptions {
                stride_frac: bad,
                ..o.clone()
            };
            assert!(check_options(&o).is_err(), "{bad}");
        }
    }
}
