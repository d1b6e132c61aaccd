//! The training loop that `train` and `train-mini` share ([`run_loop`]): steps on an
//! [`Engine`], validation, metrics, checkpoints and the progress bar.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::Precision;
use crate::config::{ModelConfig, Place};
use crate::data::batch::Batches;
use crate::engine::{Engine, StepBatch};
use crate::error::{AsaError, Result};
use crate::model::params::ParamStore;
use crate::optim::AdamW;

use super::*;

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub final_train_loss: f64,
    pub final_val_loss: f64,
    pub first_val_loss: Option<f64>,
    pub tokens_per_sec: f64,
    pub seconds: f64,
}

/// Mean validation loss over the fixed windows of `data`: each batch's mean loss from
/// `batch_loss(inputs, targets, rows)`, weighted by its rows (one rule for every engine).
pub fn mean_val_loss(
    data: &dyn Batches,
    s: &TrainSettings,
    mut batch_loss: impl FnMut(&[u32], &[i64], usize) -> Result<f64>,
) -> Result<f64> {
    let (mut sum, mut rows) = (0.0f64, 0usize);
    for (inp, tgt, r) in data.val_batches(s.micro().0, s.seq_len, s.stride(), s.eval_windows) {
        sum += batch_loss(&inp, &tgt, r)? * r as f64;
        rows += r;
    }
    if rows == 0 {
        return Err(AsaError::Input("no validation windows".into()));
    }
    Ok(sum / rows as f64)
}

/// Everything a training loop needs; `run_loop` drives train-mini and train alike.
pub struct LoopArgs<'a> {
    pub label: &'static str,
    /// the flag that extends a run's total steps on `--resume`, for messages
    pub extend_flag: &'static str,
    pub run: RunDir,
    pub cfg: ModelConfig,
    pub params: ParamStore,
    pub adam: AdamW,
    pub settings: TrainSettings,
    pub state: TrainState,
    pub resume: bool,
    pub data: &'a dyn Batches,
    pub place: Place,
    pub precision: Precision,
    pub stop_at: Option<usize>,
    pub quiet: bool,
    /// also keep the checkpoint of the best validation loss in `<run>/best`
    pub keep_best: bool,
    /// what the data is, for the first log line
    pub data_name: String,
}

/// The reference's gate summaries: mean over layers of the ALiBi strength, the content-read
/// gamma and the slotspace gate, as the layers compute them.
pub fn gate_summaries(p: &ParamStore, cfg: &ModelConfig) -> Vec<(&'static str, f64)> {
    use crate::model::params::softplus;
    let mean = |suffix: &str, f: &dyn Fn(f64) -> f64| {
        let v: Vec<f64> = (0..cfg.num_layers)
            .filter_map(|l| {
                p.get(&format!("blocks.{l}.attn.{suffix}"))
                    .map(|x| f(x[0] as f64))
            })
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut out = Vec::new();
    if let Some(v) = mean("_alibi_strength_param", &|r| softplus(r) + cfg.min_strength) {
        out.push(("alibi_strength_mean", v));
    }
    let mx = cfg.content_read_max_gamma;
    if let Some(v) = mean("_content_read_gamma_raw", &|r| {
        if mx > 0.0 {
            softplus(r).min(mx)
        } else {
            softplus(r)
        }
    }) {
        out.push(("content_read_gamma_mean", v));
    }
    if let Some(v) = mean("_slotspace_gate_raw", &softplus) {
        out.push(("slotspace_gate_mean", v));
    }
    out
}

/// The progress bar and the run's messages (printed above the bar; nothing when quiet).
struct Progress {
    bar: ProgressBar,
    quiet: bool,
}

impl Progress {
    fn new(quiet: bool, steps: usize, at: usize) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(steps as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(at as u64);
        Progress { bar, quiet }
    }

    fn say(&self, msg: String) {
        if self.quiet {
        } else if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    fn tick(&self, step: usize, msg: String) {
        self.bar.set_position(step as u64);
        self.bar.set_message(msg);
    }
}

/// Refuses a resume that has nothing left to do, and fills in the first validation loss of
/// runs saved before the state kept it.
fn check_resume(lp: &LoopArgs, state: &mut TrainState) -> Result<()> {
    check_stop_at(lp.stop_at, state.step, lp.settings.steps)?;
    if !lp.resume {
        return Ok(());
    }
    if state.step >= lp.settings.steps {
        return Err(AsaError::Config(format!(
            "{} is already at step {} of {}; pass {} with a larger total to extend it",
            lp.run.dir.display(),
            state.step,
            lp.settings.steps,
            lp.extend_flag
        )));
    }
    if state.first_val_loss.is_none() {
        state.first_val_loss = first_val_in_metrics(&lp.run.metrics());
    }
    Ok(())
}

/// The metrics file, appended to: cut back to `step` on a resume, started afresh otherwise.
fn open_metrics(run: &RunDir, resume: bool, step: usize) -> Result<std::fs::File> {
    if resume {
        truncate_metrics(&run.metrics(), step)?;
    } else if run.metrics().exists() {
        std::fs::remove_file(run.metrics()).map_err(|e| AsaError::io(run.metrics(), e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.metrics())
        .map_err(|e| AsaError::io(run.metrics(), e))
}

/// The mean validation loss on the engine, recorded in `rec` with its perplexity and the
/// gate summaries of the current parameters.
fn validate(
    engine: &mut Engine,
    data: &dyn Batches,
    settings: &TrainSettings,
    cfg: &ModelConfig,
    rec: &mut serde_json::Value,
) -> Result<f64> {
    let val = mean_val_loss(data, settings, |i, tg, r| {
        engine.eval_loss(i, tg, r, settings.seq_len)
    })?;
    rec["val_loss"] = serde_json::json!(val);
    rec["val_ppl"] = serde_json::json!(val.exp());
    for (k, v) in gate_summaries(engine.params()?, cfg) {
        rec[k] = serde_json::json!(v);
    }
    Ok(val)
}

/// Trains from `lp.state` to the end (or `stop_at`): a step on the engine, its metrics line,
/// validation every `eval_interval` steps (and at the first and last), and a checkpoint of the
/// whole state (weights, AdamW, generators' positions) at each validation; `best/` when the
/// validation loss improves.
pub fn run_loop(lp: LoopArgs) -> Result<TrainReport> {
    let mut state = lp.state.clone();
    check_resume(&lp, &mut state)?;
    let LoopArgs {
        label,
        run,
        cfg,
        params,
        adam,
        settings,
        resume,
        data,
        place,
        precision,
        stop_at,
        quiet,
        keep_best,
        data_name,
        ..
    } = lp;
    let mut adam = adam;
    let frozen = if settings.freeze.is_empty() && settings.trainable.is_none() {
        Vec::new()
    } else {
        let f = super::finetune::frozen_names(
            &params.names,
            &settings.freeze,
            settings.trainable.as_deref(),
        )?;
        adam.frozen = super::finetune::frozen_mask(&params, &f);
        f
    };
    let frozen_note =
        (!frozen.is_empty()).then(|| super::finetune::describe_frozen(&params, &frozen));
    let mut engine = Engine::new(&cfg, params, adam, place, precision)?;
    engine.set_model_rng(settings.seed ^ 0xd0_0d, parse_pos(&state.model_rng_pos)?);
    let mut data_rng = ChaCha8Rng::seed_from_u64(settings.seed);
    data_rng.set_word_pos(parse_pos(&state.data_rng_pos)?);
    let mut metrics = open_metrics(&run, resume, state.step)?;
    let progress = Progress::new(quiet, settings.steps, state.step);
    let (train_tokens, val_tokens) = data.sizes();
    progress.say(format!(
        "{label}: {} params, {train_tokens} train / {val_tokens} val tokens ({data_name}), T={} B={}, device {}",
        engine.params()?.num_elements(),
        settings.seq_len,
        settings.batch_size,
        engine.name()
    ));

    if let Some(from) = &settings.init_from {
        progress.say(format!("{label}: weights from {from}"));
    }
    if let Some(note) = frozen_note {
        progress.say(format!("{label}: {note}"));
    }
    let peak = engine.peak_flops();
    let flops_per_token = crate::engine::train_flops_per_token(&cfg);
    let started = Instant::now();
    let (mut last_loss, mut last_val) = (f64::NAN, f64::NAN);
    let tokens_per_step = (settings.batch_size * settings.seq_len) as u64;
    let start_step = state.step;
    let end = stop_at.map_or(settings.steps, |s| s.min(settings.steps));
    while state.step < end {
        let step = state.step;
        let lr = lr_at(
            step,
            settings.lr,
            settings.min_lr,
            settings.warmup_steps,
            settings.steps,
        );
        let (inp, tgt) = data.sample_train(&mut data_rng, settings.batch_size, settings.seq_len);
        let batch = StepBatch {
            inputs: &inp,
            targets: &tgt,
            rows: settings.batch_size,
            seq_len: settings.seq_len,
            micro_rows: settings.micro().0,
        };
        let (loss, norm) = engine.step(batch, lr, Some(settings.grad_clip))?;
        if !loss.is_finite() || !norm.is_finite() {
            if !settings.skip_nonfinite {
                return Err(AsaError::Other(format!(
                    "step {}: non-finite loss ({loss}) or gradient norm ({norm}); stopped without applying it, the last saved checkpoint is intact (set skip_nonfinite to skip such steps)",
                    step + 1
                )));
            }
            state.skipped_steps += 1;
            progress.say(format!(
                "step {}: non-finite loss or gradient, step skipped ({} so far)",
                step + 1,
                state.skipped_steps
            ));
        }
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        last_loss = loss;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let tps = ((state.step - start_step) as u64 * tokens_per_step) as f64 / secs;
        let mfu = peak.map(|p| tps * flops_per_token / p);
        let mfu_text = mfu
            .map(|m| format!(" MFU {:.1}%", 100.0 * m))
            .unwrap_or_default();
        progress.tick(
            state.step,
            format!("loss {loss:.3} lr {lr:.2e} {tps:.0} tok/s{mfu_text}"),
        );
        let mut rec = serde_json::json!({"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_sec": tps});
        if let Some(m) = mfu {
            rec["mfu"] = serde_json::json!(m);
        }
        let mut improved = false;
        if state.step.is_multiple_of(settings.eval_interval)
            || state.step == settings.steps
            || step == 0
        {
            let val = validate(&mut engine, data, &settings, &cfg, &mut rec)?;
            state.first_val_loss.get_or_insert(val);
            last_val = val;
            improved = state.best_val.is_none_or(|b| val < b);
            state.best_val = Some(state.best_val.map_or(val, |b: f64| b.min(val)));
            progress.say(format!(
                "step {:>5}  train {loss:.4}  val {val:.4}  ({tps:.0} tok/s)",
                state.step
            ));
        }
        writeln!(metrics, "{rec}").map_err(|e| AsaError::io(run.metrics(), e))?;
        let save = state.step.is_multiple_of(settings.eval_interval)
            || state.step == settings.steps
            || state.step == end;
        let save_best_now = improved && keep_best;
        if save || save_best_now {
            // the generators' positions after this step: the main checkpoint and best/ both
            // hold the whole state of the same step, so either resumes exactly
            state.data_rng_pos = data_rng.get_word_pos().to_string();
            state.model_rng_pos = engine.model_rng_pos().to_string();
            let (params, adam) = engine.state()?;
            if save {
                save_run(&run, &cfg, &settings, params, adam, &state)?;
            }
            if save_best_now {
                save_best(&run, &cfg, &settings, params, adam, &state)?;
            }
        }
    }
    progress.bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if last_val.is_nan() {
        last_val = mean_val_loss(data, &settings, |i, tg, r| {
            engine.eval_loss(i, tg, r, settings.seq_len)
        })?;
    }
    let report = TrainReport {
        run_dir: run.dir.clone(),
        steps: state.step,
        final_train_loss: last_loss,
        final_val_loss: last_val,
        first_val_loss: state.first_val_loss,
        tokens_per_sec: ((state.step - start_step) as u64 * tokens_per_step) as f64
            / seconds.max(1e-9),
        seconds,
    };
    write_json_atomic(&run.dir.join("report.json"), &report)?;
    Ok(report)
}
