//! Training: the learning-rate schedule, run directories (weights, optimizer state, metrics,
//! exact-resume state) and `train-mini`, the small end-to-end run on the embedded default data.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::cuda::Precision;
use crate::checkpoint::{self, AnyTensor};
use crate::config::{ModelConfig, Place};
use crate::data::batch::TokenData;
use crate::data::corpus;
use crate::data::tokenizer::{Tokenizer, TokenizerKind};
use crate::engine::{Engine, StepBatch};
use crate::error::{AsaError, Result};
use crate::model::asa::AsaOptions;
use crate::model::lm::{Lm, LmCache};
use crate::model::params::ParamStore;
use crate::optim::{AdamW, AdamWConfig};

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `total` steps (`step` counts from 0).
pub fn lr_at(step: usize, lr: f64, min_lr: f64, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Settings of one training run (saved as `train.json` in the run directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainSettings {
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub eval_interval: usize,
    pub eval_windows: usize,
    pub val_frac: f64,
    pub seed: u64,
    pub tokenizer: String,
    pub data: Vec<PathBuf>,
    /// share of generated fact sentences in the embedded default text (ignored with `data`)
    #[serde(default = "default_fact_frac")]
    pub fact_frac: f64,
    /// rows per forward/backward pass (0: the whole batch); `batch_size` must be a multiple
    #[serde(default)]
    pub micro_batch_size: usize,
    /// validation windows start every `val_stride` tokens (0: T/2)
    #[serde(default)]
    pub val_stride: usize,
    /// skip (and count) a step whose loss or gradient is not finite instead of stopping
    #[serde(default)]
    pub skip_nonfinite: bool,
}

impl TrainSettings {
    /// (micro-batch rows, micro-batches per optimizer step)
    pub fn micro(&self) -> (usize, usize) {
        let m = if self.micro_batch_size == 0 {
            self.batch_size
        } else {
            self.micro_batch_size
        };
        (m, self.batch_size / m.max(1))
    }
    fn stride(&self) -> usize {
        if self.val_stride == 0 {
            (self.seq_len / 2).max(1)
        } else {
            self.val_stride
        }
    }
}

fn default_fact_frac() -> f64 {
    0.6
}

/// Where a run stands: enough to resume it exactly (the generators' stream positions included).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    /// ChaCha8 word position of the data sampler, as a decimal string (u128)
    pub data_rng_pos: String,
    /// ChaCha8 word position of the model's dropout / noise generator
    pub model_rng_pos: String,
    pub best_val: Option<f64>,
    pub tokens_seen: u64,
    /// steps skipped for a non-finite loss or gradient (`skip_nonfinite`)
    #[serde(default)]
    pub skipped_steps: u64,
    /// the run's first validation loss (kept across resumes for `report.json`; runs saved before
    /// this field fall back to the first `val_loss` of `metrics.jsonl`)
    #[serde(default)]
    pub first_val_loss: Option<f64>,
}

impl TrainState {
    /// The state of a run that has not trained yet.
    pub fn start() -> Self {
        TrainState {
            step: 0,
            data_rng_pos: "0".into(),
            model_rng_pos: "0".into(),
            best_val: None,
            tokens_seen: 0,
            skipped_steps: 0,
            first_val_loss: None,
        }
    }
}

/// Files of a run directory `runs/<name>/`.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// everything needed to resume, in one atomically written file
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("train_state.json")
    }
    pub fn settings(&self) -> PathBuf {
        self.dir.join("train.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
}

fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| AsaError::Other(format!("cannot serialise {}: {e}", path.display())))?;
    checkpoint::write_bytes_atomic(path, text.as_bytes())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| AsaError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        AsaError::Checkpoint(format!("{} is not a valid run file: {e}", path.display()))
    })
}

/// Saves a run. The source of truth for resuming is `checkpoint.safetensors`: parameters,
/// AdamW moments (`exp_avg.<name>`, `exp_avg_sq.<name>`) and, in its metadata, the config, the
/// settings and the state, written as one file atomically (temp file + rename). A kill at any
/// moment therefore leaves either the previous or the new checkpoint, never a mix. The files
/// for people and other tools (`model.safetensors` with the reference names, `config.json`,
/// `train.json`, `train_state.json`) are written after it, each atomically too.
pub fn save_run(
    run: &RunDir,
    cfg: &ModelConfig,
    settings: &TrainSettings,
    params: &ParamStore,
    adam: &AdamW,
    state: &TrainState,
) -> Result<()> {
    std::fs::create_dir_all(&run.dir).map_err(|e| AsaError::io(&run.dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (i, name) in params.names.iter().enumerate() {
        tensors.push((name.clone(), params.shapes[i].clone(), &params.data[i]));
        tensors.push((
            format!("exp_avg.{name}"),
            adam.m.shapes[i].clone(),
            &adam.m.data[i],
        ));
        tensors.push((
            format!("exp_avg_sq.{name}"),
            adam.v.shapes[i].clone(),
            &adam.v.data[i],
        ));
    }
    let json = |v: &dyn erased::Json| v.to_json();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "asa-train-checkpoint-1".to_string());
    meta.insert("config".to_string(), json(cfg)?);
    meta.insert("settings".to_string(), json(settings)?);
    meta.insert("state".to_string(), json(state)?);
    meta.insert("adam_step".to_string(), adam.step.to_string());
    checkpoint::write_safetensors(&run.checkpoint(), &tensors, Some(meta))?;
    checkpoint::save_params(&run.model(), params, cfg.tie_weights, Some(cfg))?;
    write_json_atomic(&run.config(), cfg)?;
    write_json_atomic(&run.settings(), settings)?;
    write_json_atomic(&run.state(), state)
}

mod erased {
    use crate::error::{AsaError, Result};
    /// Serialises any of the run structs to a JSON string.
    pub trait Json {
        fn to_json(&self) -> Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String> {
            serde_json::to_string(self)
                .map_err(|e| AsaError::Other(format!("cannot serialise run state: {e}")))
        }
    }
}

/// Loads a run from its `checkpoint.safetensors`: config, parameters, optimizer, settings, state.
pub fn load_run(
    run: &RunDir,
) -> Result<(ModelConfig, ParamStore, AdamW, TrainSettings, TrainState)> {
    let path = run.checkpoint();
    if !path.is_file() {
        return Err(AsaError::Checkpoint(format!(
            "{} holds no run to resume (no checkpoint.safetensors)",
            run.dir.display()
        )));
    }
    let (tensors, meta) = checkpoint::read_safetensors_with_metadata(&path)?;
    let bad =
        |what: &str| AsaError::Checkpoint(format!("{}: missing or invalid {what}", path.display()));
    let field = |k: &str| meta.get(k).ok_or_else(|| bad(k));
    let cfg: ModelConfig = serde_json::from_str(field("config")?).map_err(|_| bad("config"))?;
    cfg.validate()?;
    checkpoint::ensure_config_fits(&cfg, &tensors, &path.display().to_string())?;
    let settings: TrainSettings =
        serde_json::from_str(field("settings")?).map_err(|_| bad("settings"))?;
    let state: TrainState = serde_json::from_str(field("state")?).map_err(|_| bad("state"))?;
    let (_, mut params) = Lm::new(&cfg)?;
    let mut adam = AdamW::new(adam_config(&settings), &params);
    adam.step = field("adam_step")?.parse().map_err(|_| bad("adam_step"))?;
    for (i, name) in params.names.clone().iter().enumerate() {
        for (key, dst) in [
            (name.clone(), &mut params.data[i]),
            (format!("exp_avg.{name}"), &mut adam.m.data[i]),
            (format!("exp_avg_sq.{name}"), &mut adam.v.data[i]),
        ] {
            let t: &AnyTensor = tensors
                .get(&key)
                .ok_or_else(|| bad(&format!("tensor '{key}'")))?;
            *dst = t
                .to_f32()
                .filter(|v| v.len() == dst.len())
                .ok_or_else(|| bad(&format!("tensor '{key}'")))?;
            checkpoint::ensure_finite(&format!("{}: tensor '{key}'", path.display()), dst)?;
        }
    }
    Ok((cfg, params, adam, settings, state))
}

pub fn adam_config(s: &TrainSettings) -> AdamWConfig {
    AdamWConfig {
        lr: s.lr,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: 1e-8,
        weight_decay: s.weight_decay,
    }
}

/// Options of `asa train-mini`.
#[derive(Debug, Clone)]
pub struct TrainMiniArgs {
    pub outdir: PathBuf,
    pub name: String,
    pub seed: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub eval_interval: usize,
    pub data: Vec<PathBuf>,
    pub tokenizer: String,
    pub resume: bool,
    /// delete the run already in the folder and start a new one
    pub force: bool,
    /// on `--resume`, the flags the user typed (only those are compared with the run's own
    /// values); `None` compares every flag
    pub explicit: Option<Vec<&'static str>>,
    pub embed_dim: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_slots: usize,
    pub fact_frac: f64,
    /// stop after this step (saving a checkpoint), as an interrupted run would; `--resume` goes on
    pub stop_at: Option<usize>,
    /// on `--resume`, a new total step count (the schedule follows it); `None` keeps the run's
    pub resume_steps: Option<usize>,
    /// where the steps run (`--device`)
    pub place: Place,
    /// GEMM precision of the GPU path
    pub precision: Precision,
    pub quiet: bool,
}

impl Default for TrainMiniArgs {
    fn default() -> Self {
        TrainMiniArgs {
            outdir: PathBuf::from("runs"),
            name: "mini".into(),
            seed: 1337,
            steps: 500,
            batch_size: 16,
            seq_len: 32,
            lr: 3e-3,
            eval_interval: 50,
            data: vec![],
            tokenizer: "gpt2".into(),
            resume: false,
            force: false,
            explicit: None,
            embed_dim: 128,
            num_layers: 4,
            num_heads: 4,
            num_slots: 16,
            fact_frac: default_fact_frac(),
            stop_at: None,
            resume_steps: None,
            place: Place::Cpu,
            precision: Precision::Bf16,
            quiet: false,
        }
    }
}

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

/// The train-mini model: small enough for a few minutes on two CPU cores.
pub fn mini_config(a: &TrainMiniArgs, vocab: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        max_seq_len: a.seq_len,
        embed_dim: a.embed_dim,
        num_layers: a.num_layers,
        num_heads: a.num_heads,
        num_slots: a.num_slots,
        mlp_ratio: 4.0,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        slotspace_dim: 16,
        write_chunk_size: a.seq_len,
        slotspace_chunk_size: a.seq_len,
        seed: a.seed,
        mlp_bias: Some(true),
        ..Default::default()
    }
}

/// Loads the tokenizer named by a run ("gpt2", "byte" or "file:<path>" / a path).
pub fn tokenizer_by_name(name: &str) -> Result<Tokenizer> {
    if let Some(p) = name.strip_prefix("file:") {
        return Tokenizer::from_file(Path::new(p));
    }
    match name.parse::<TokenizerKind>() {
        Ok(k) => Tokenizer::from_kind(k),
        Err(_) if Path::new(name).is_file() => Tokenizer::from_file(Path::new(name)),
        Err(e) => Err(e),
    }
}

/// The tokenizer recorded in a prepared data folder's `meta.json` (`asa prepare`).
pub fn data_tokenizer(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(crate::data::shards::META_FILE)).ok()?;
    let meta: serde_json::Value = serde_json::from_str(&text).ok()?;
    meta.get("tokenizer")?
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// A source of training windows and fixed validation windows.
pub trait Batches {
    /// `b` random windows: inputs [B,T] and next-token targets [B,T]
    fn sample_train(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>);
    /// fixed validation windows at `stride`, at most `max` of them, in batches of up to `b` rows
    fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)>;
    /// (train tokens, validation tokens)
    fn sizes(&self) -> (usize, usize);
}

impl Batches for TokenData {
    fn sample_train(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
        TokenData::sample_train(self, rng, b, t)
    }
    fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)> {
        TokenData::val_batches(self, b, t, stride, max)
    }
    fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }
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

/// Mean validation loss over fixed windows (the CPU model).
pub fn evaluate(
    lm: &mut Lm,
    params: &ParamStore,
    data: &dyn Batches,
    s: &TrainSettings,
) -> Result<f64> {
    let opts = AsaOptions::default();
    let mut cache = LmCache::default();
    mean_val_loss(data, s, |inp, tgt, r| {
        lm.forward(params, inp, r, s.seq_len, &opts, &mut cache)?;
        lm.loss(&mut cache, tgt, None)
    })
}

/// `asa train-mini`: trains a small ASM on the embedded default data (or `--data` files).
pub fn train_mini(a: &TrainMiniArgs) -> Result<TrainReport> {
    check_run_name(&a.name, "--name")?;
    check_mini_flags(a)?;
    let run = RunDir {
        dir: a.outdir.join(&a.name),
    };
    let mode = run_mode(a.resume, a.force);
    if mode != RunMode::Resume {
        check_stop_at(a.stop_at, 0, a.steps)?;
    }
    let _lock = open_run_dir(&run, mode, "train-mini")?;
    let resume = mode == RunMode::Resume;
    let (cfg, params, adam, settings, state) = if resume {
        let (cfg, params, adam, mut settings, state) = load_run(&run)?;
        let changed = mini_changes(a, &cfg, &settings)?;
        if !changed.is_empty() {
            return Err(AsaError::Config(format!(
                "--resume: these flags differ from the run in {}: {}; drop them to continue the run as it was, or start a new run (another --name, or --force)",
                run.dir.display(),
                changed.join(", ")
            )));
        }
        if let Some(s) = a.resume_steps {
            settings.steps = extend_total(s, &state, "--steps")?;
        }
        (cfg, params, adam, settings, state)
    } else {
        let tok = tokenizer_by_name(&a.tokenizer)?;
        let cfg = mini_config(a, tok.vocab_size());
        crate::preflight::check_run(
            &cfg,
            a.batch_size,
            a.seq_len,
            false,
            a.place,
            crate::backend::cuda::free_memory_at(a.place),
        )?;
        let (_, params) = Lm::new(&cfg)?;
        let settings = mini_settings(a, tok.name());
        let adam = AdamW::new(adam_config(&settings), &params);
        (cfg, params, adam, settings, TrainState::start())
    };
    let tok = tokenizer_by_name(&settings.tokenizer)?;
    if tok.vocab_size() != cfg.vocab_size {
        return Err(AsaError::Config(format!(
            "tokenizer '{}' has {} tokens but the model's vocab_size is {}",
            tok.name(),
            tok.vocab_size(),
            cfg.vocab_size
        )));
    }
    let text = if settings.data.is_empty() {
        corpus::default_training_text(settings.seed, settings.fact_frac)
    } else {
        crate::data::read_text_files(&settings.data)?
    };
    let data = TokenData::new(tok.encode(&text)?, settings.val_frac, settings.seq_len)?;
    run_loop(LoopArgs {
        label: "train-mini",
        extend_flag: "--steps",
        run,
        cfg,
        params,
        adam,
        settings,
        state,
        resume,
        data: &data,
        place: a.place,
        precision: a.precision,
        stop_at: a.stop_at,
        quiet: a.quiet,
        keep_best: false,
        data_name: tok.name().to_string(),
    })
}

/// The training settings of a new train-mini run.
/// Range checks of the train-mini flags, each error naming the flag (the sizes are checked by
/// `ModelConfig::validate` and the memory preflight). Values that only look odd are accepted;
/// these would train nothing, divide by zero or feed NaN into the schedule.
fn check_mini_flags(a: &TrainMiniArgs) -> Result<()> {
    let bad = |m: String| Err(AsaError::Config(m));
    for (flag, v) in [
        ("--steps", a.steps),
        ("--batch-size", a.batch_size),
        ("--seq-len", a.seq_len),
        ("--eval-interval", a.eval_interval),
    ] {
        if v == 0 {
            return bad(format!("{flag} must be >= 1, got 0"));
        }
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return bad(format!("--lr must be a finite number > 0, got {}", a.lr));
    }
    if !(0.0..=1.0).contains(&a.fact_frac) {
        return bad(format!(
            "--fact-frac is a share and must be in [0, 1], got {}",
            a.fact_frac
        ));
    }
    Ok(())
}

fn mini_settings(a: &TrainMiniArgs, tokenizer: &str) -> TrainSettings {
    TrainSettings {
        steps: a.steps,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        lr: a.lr,
        min_lr: a.lr * 0.1,
        warmup_steps: (a.steps / 10).clamp(1, 100),
        weight_decay: 0.01,
        beta1: 0.9,
        beta2: 0.95,
        grad_clip: 1.0,
        eval_interval: a.eval_interval.max(1),
        eval_windows: 32,
        val_frac: 0.05,
        seed: a.seed,
        tokenizer: tokenizer.to_string(),
        data: a.data.clone(),
        fact_frac: a.fact_frac,
        micro_batch_size: 0,
        val_stride: 0,
        skip_nonfinite: false,
    }
}

/// On `train-mini --resume`: the flags the user gave (all of them for a library caller that does
/// not say, `explicit: None`) whose value differs from the run's, as "--flag: old -> new".
fn mini_changes(a: &TrainMiniArgs, cfg: &ModelConfig, s: &TrainSettings) -> Result<Vec<String>> {
    let given = |f: &str| a.explicit.as_ref().is_none_or(|l| l.contains(&f));
    let text = |x: &dyn std::fmt::Display| x.to_string();
    // (flag, the run's value, the value typed)
    let mut pairs = vec![
        ("seed", text(&s.seed), text(&a.seed)),
        ("batch-size", text(&s.batch_size), text(&a.batch_size)),
        ("seq-len", text(&s.seq_len), text(&a.seq_len)),
        ("lr", text(&s.lr), text(&a.lr)),
        (
            "eval-interval",
            text(&s.eval_interval),
            text(&a.eval_interval),
        ),
        ("data", format!("{:?}", s.data), format!("{:?}", a.data)),
        ("embed-dim", text(&cfg.embed_dim), text(&a.embed_dim)),
        ("num-layers", text(&cfg.num_layers), text(&a.num_layers)),
        ("num-heads", text(&cfg.num_heads), text(&a.num_heads)),
        ("num-slots", text(&cfg.num_slots), text(&a.num_slots)),
        ("fact-frac", text(&s.fact_frac), text(&a.fact_frac)),
    ];
    if given("tokenizer") {
        let name = tokenizer_by_name(&a.tokenizer)?.name().to_string();
        pairs.push(("tokenizer", s.tokenizer.clone(), name));
    }
    Ok(pairs
        .into_iter()
        .filter(|(flag, old, new)| given(flag) && old != new)
        .map(|(flag, old, new)| format!("--{flag}: {old} -> {new}"))
        .collect())
}

/// `--resume` with a new total step count (train-mini `--steps`, train `--total-steps`): the
/// total must lie beyond the step the run is at.
pub fn extend_total(total: usize, state: &TrainState, flag: &str) -> Result<usize> {
    if total <= state.step {
        return Err(AsaError::Config(format!(
            "{flag} {total}: the run is already at step {}; give a larger total to train further",
            state.step
        )));
    }
    Ok(total)
}

/// `--stop-at`: a step after the current one, at most the total.
pub fn check_stop_at(stop_at: Option<usize>, step: usize, total: usize) -> Result<()> {
    match stop_at {
        Some(0) => Err(AsaError::Config(
            "--stop-at 0: give the step to stop after (at least 1)".into(),
        )),
        Some(s) if s > total => Err(AsaError::Config(format!(
            "--stop-at {s} is beyond the run's last step ({total})"
        ))),
        Some(s) if s <= step => Err(AsaError::Config(format!(
            "--stop-at {s}: the run is already at step {step}"
        ))),
        _ => Ok(()),
    }
}

/// The run-folder mode of `--resume` / `--force` (clap makes them exclusive).
pub fn run_mode(resume: bool, force: bool) -> RunMode {
    if resume {
        RunMode::Resume
    } else if force {
        RunMode::Replace
    } else {
        RunMode::New
    }
}

/// Keeps the metric records of steps up to `step` (those after the last save are redone).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    copy_metrics(path, path, step)
}

/// Writes the metric records of `src` up to `step` to `dst` (atomically; nothing when `src`
/// does not exist).
fn copy_metrics(src: &Path, dst: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(src) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_bytes_atomic(dst, kept.as_bytes())
}

/// The first `val_loss` recorded in a metrics file.
fn first_val_in_metrics(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v["val_loss"].as_f64())
    })
}

/// Saves `<run>/best` as one unit: the whole run (checkpoint, files for people, the metrics up
/// to this step) goes into `best.tmp-<pid>/`, then the old `best/` is renamed to
/// `best.old-<pid>/`, the new one renamed into place and the old one removed. A kill at any point
/// leaves a whole `best/` (or a whole `best.old-<pid>/` that the next start renames back, see
/// `clean_leftovers`), never a mix of two steps.
fn save_best(
    run: &RunDir,
    cfg: &ModelConfig,
    settings: &TrainSettings,
    params: &ParamStore,
    adam: &AdamW,
    state: &TrainState,
) -> Result<()> {
    let pid = std::process::id();
    let tmp = RunDir {
        dir: run.dir.join(format!("best.tmp-{pid}")),
    };
    if tmp.dir.exists() {
        std::fs::remove_dir_all(&tmp.dir).map_err(|e| AsaError::io(&tmp.dir, e))?;
    }
    save_run(&tmp, cfg, settings, params, adam, state)?;
    copy_metrics(&run.metrics(), &tmp.metrics(), state.step)?;
    let best = run.dir.join("best");
    let old = run.dir.join(format!("best.old-{pid}"));
    if best.exists() {
        std::fs::rename(&best, &old).map_err(|e| AsaError::io(&best, e))?;
    }
    std::fs::rename(&tmp.dir, &best).map_err(|e| AsaError::io(&tmp.dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| AsaError::io(&old, e))?;
    }
    Ok(())
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

pub fn run_loop(lp: LoopArgs) -> Result<TrainReport> {
    let label = lp.label;
    let quiet = lp.quiet;
    let run = lp.run;
    let cfg = lp.cfg;
    let mut params = lp.params;
    let mut adam = lp.adam;
    let settings = lp.settings;
    let mut state = lp.state;
    let resume = lp.resume;
    let data = lp.data;
    check_stop_at(lp.stop_at, state.step, settings.steps)?;
    if resume && state.step >= settings.steps {
        return Err(AsaError::Config(format!(
            "{} is already at step {} of {}; pass {} with a larger total to extend it",
            run.dir.display(),
            state.step,
            settings.steps,
            lp.extend_flag
        )));
    }
    if resume && state.first_val_loss.is_none() {
        // runs saved before TrainState kept it: the first val_loss of the metrics
        state.first_val_loss = first_val_in_metrics(&run.metrics());
    }
    let mut engine = Engine::new(&cfg, &params, &adam, lp.place, lp.precision)?;
    engine.set_model_rng(settings.seed ^ 0xd0_0d, parse_pos(&state.model_rng_pos)?);
    let mut data_rng = ChaCha8Rng::seed_from_u64(settings.seed);
    data_rng.set_word_pos(parse_pos(&state.data_rng_pos)?);

    if resume {
        truncate_metrics(&run.metrics(), state.step)?;
    } else if run.metrics().exists() {
        std::fs::remove_file(run.metrics()).map_err(|e| AsaError::io(run.metrics(), e))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.metrics())
        .map_err(|e| AsaError::io(run.metrics(), e))?;
    let say = |bar: &ProgressBar, msg: String| {
        if quiet {
        } else if bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            bar.println(msg);
        }
    };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(settings.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(state.step as u64);
    say(
        &bar,
        format!(
            "{label}: {} params, {} train / {} val tokens ({}), T={} B={}, device {}",
            params.num_elements(),
            data.sizes().0,
            data.sizes().1,
            lp.data_name,
            settings.seq_len,
            settings.batch_size,
            engine.name()
        ),
    );

    let peak = engine.peak_flops();
    let flops_per_token = crate::engine::train_flops_per_token(&cfg);
    let started = Instant::now();
    let (mut last_loss, mut last_val) = (f64::NAN, f64::NAN);
    let tokens_per_step = (settings.batch_size * settings.seq_len) as u64;
    let start_step = state.step;
    let end = lp.stop_at.map_or(settings.steps, |s| s.min(settings.steps));
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
        let (loss, norm) = engine.step(
            &mut params,
            &mut adam,
            batch,
            lr,
            &adam_config(&settings),
            settings.grad_clip,
        )?;
        if !loss.is_finite() || !norm.is_finite() {
            if !settings.skip_nonfinite {
                return Err(AsaError::Other(format!(
                    "step {}: non-finite loss ({loss}) or gradient norm ({norm}); stopped without applying it, the last saved checkpoint is intact (set skip_nonfinite to skip such steps)",
                    step + 1
                )));
            }
            state.skipped_steps += 1;
            say(
                &bar,
                format!(
                    "step {}: non-finite loss or gradient, step skipped ({} so far)",
                    step + 1,
                    state.skipped_steps
                ),
            );
        }
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        last_loss = loss;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let tps = ((state.step - start_step) as u64 * tokens_per_step) as f64 / secs;
        bar.set_position(state.step as u64);
        let mfu = peak.map(|p| tps * flops_per_token / p);
        let mfu_text = mfu
            .map(|m| format!(" MFU {:.1}%", 100.0 * m))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {loss:.3} lr {lr:.2e} {tps:.0} tok/s{mfu_text}"
        ));
        let mut rec = serde_json::json!({"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_sec": tps});
        if let Some(m) = mfu {
            rec["mfu"] = serde_json::json!(m);
        }
        let mut improved = false;
        if state.step.is_multiple_of(settings.eval_interval)
            || state.step == settings.steps
            || step == 0
        {
            let val = mean_val_loss(data, &settings, |i, tg, r| {
                engine.eval_loss(&params, i, tg, r, settings.seq_len)
            })?;
            state.first_val_loss.get_or_insert(val);
            last_val = val;
            improved = state.best_val.is_none_or(|b| val < b);
            state.best_val = Some(state.best_val.map_or(val, |b: f64| b.min(val)));
            rec["val_loss"] = serde_json::json!(val);
            rec["val_ppl"] = serde_json::json!(val.exp());
            for (k, v) in gate_summaries(&engine.params_view(&params)?, &cfg) {
                rec[k] = serde_json::json!(v);
            }
            say(
                &bar,
                format!(
                    "step {:>5}  train {loss:.4}  val {val:.4}  ({tps:.0} tok/s)",
                    state.step
                ),
            );
        }
        writeln!(metrics, "{rec}").map_err(|e| AsaError::io(run.metrics(), e))?;
        let save = state.step.is_multiple_of(settings.eval_interval)
            || state.step == settings.steps
            || state.step == end;
        let save_best_now = improved && lp.keep_best;
        if save || save_best_now {
            // the generators' positions after this step: the main checkpoint and best/ both
            // hold the whole state of the same step, so either resumes exactly
            state.data_rng_pos = data_rng.get_word_pos().to_string();
            state.model_rng_pos = engine.model_rng_pos().to_string();
            engine.sync_to_host(&mut params, &mut adam)?;
        }
        if save {
            save_run(&run, &cfg, &settings, &params, &adam, &state)?;
        }
        if save_best_now {
            save_best(&run, &cfg, &settings, &params, &adam, &state)?;
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if last_val.is_nan() {
        last_val = mean_val_loss(data, &settings, |i, tg, r| {
            engine.eval_loss(&params, i, tg, r, settings.seq_len)
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

fn parse_pos(s: &str) -> Result<u128> {
    s.parse().map_err(|_| {
        AsaError::Checkpoint(format!(
            "invalid generator position '{s}' in train_state.json"
        ))
    })
}

/// The most recently saved run under `runs_dir`: of its direct subfolders holding a
/// `checkpoint.safetensors` (runs of `train-mini` and of `train` alike; a run's `best/` is inside
/// its run folder and never picked), the one whose checkpoint was written last.
pub fn latest_run(runs_dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(runs_dir).map_err(|e| {
        AsaError::Checkpoint(format!(
            "no --ckpt given and no runs found in {} ({e}); run `asa train-mini` first",
            runs_dir.display()
        ))
    })?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in entries.flatten() {
        let state = e.path().join("checkpoint.safetensors");
        if let Ok(t) = state.metadata().and_then(|m| m.modified()) {
            // equal times (coarse clocks): the name decides, so the pick does not depend on
            // the order read_dir happens to return
            if best
                .as_ref()
                .is_none_or(|(bt, bp)| t > *bt || (t == *bt && e.path() > *bp))
            {
                best = Some((t, e.path()));
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        AsaError::Checkpoint(format!(
            "no --ckpt given and no run in {}; run `asa train-mini` first",
            runs_dir.display()
        ))
    })
}

/// Loads a model for analysis from a run directory, a `.safetensors` file or a reference `.pt`
/// file (default: the latest run under `runs/`), with its tokenizer (the run's own, else the
/// one named, else GPT-2). Returns the model, its parameters, the tokenizer and a display name.
pub fn load_for_analysis(
    ckpt: Option<&Path>,
    tokenizer: Option<&str>,
) -> Result<(Lm, ParamStore, Tokenizer, String)> {
    let path = match ckpt {
        Some(p) => p.to_path_buf(),
        None => {
            let p = latest_run(Path::new("runs"))?;
            eprintln!(
                "using {} (the most recently saved run under runs/; --ckpt picks another)",
                p.display()
            );
            p
        }
    };
    let (file, run_tok) = if path.is_dir() {
        let run = RunDir { dir: path.clone() };
        let tok = match read_json::<TrainSettings>(&run.settings()) {
            Ok(s) if !s.tokenizer.is_empty() => Some(s.tokenizer),
            // runs of `asa train` saved before the tokenizer was recorded: the data's own
            Ok(s) if tokenizer.is_none() => Some(s.data.first().and_then(|d| data_tokenizer(d)).ok_or_else(|| {
                AsaError::Config(format!(
                    "{} does not record its tokenizer and its data folder's meta.json is not readable; pass --tokenizer (gpt2, byte or a tokenizer.json path)",
                    run.settings().display()
                ))
            })?),
            _ => None,
        };
        (run.model(), tok)
    } else {
        (path.clone(), None)
    };
    let loaded = checkpoint::read_checkpoint(&file)?;
    let cfg = loaded.config.ok_or_else(|| {
        AsaError::Checkpoint(format!(
            "{}: no model config found (looked in the file and for config.json beside it)",
            file.display()
        ))
    })?;
    cfg.validate()?;
    checkpoint::ensure_config_fits(&cfg, &loaded.tensors, &file.display().to_string())?;
    let (mut lm, mut params) = Lm::new(&cfg)?;
    checkpoint::load_into(&mut params, &loaded.tensors, &file.display().to_string())?;
    lm.reseed(cfg.seed);
    let tok_name = tokenizer
        .map(str::to_string)
        .or(run_tok)
        .unwrap_or_else(|| "gpt2".into());
    let tok = tokenizer_by_name(&tok_name)?;
    if tok.vocab_size() != cfg.vocab_size {
        return Err(AsaError::Config(format!(
            "tokenizer '{}' has {} tokens but the checkpoint's vocab_size is {}",
            tok.name(),
            tok.vocab_size(),
            cfg.vocab_size
        )));
    }
    Ok((lm, params, tok, path.display().to_string()))
}

// ---------------------------------------------------------------------------------------------
// Run folders: names, the exclusive lock, refusing to overwrite a run, leftovers of killed saves.

/// The files and folders that make a folder a run (`.lock` alone does not).
const RUN_FILES: &[&str] = &[
    "checkpoint.safetensors",
    "model.safetensors",
    "config.json",
    "train.json",
    "train_state.json",
    "metrics.jsonl",
    "report.json",
    "best",
];

/// A run name (`--name`, or `name`/`tag` of a run config) must be one normal path component, so
/// that the run lands in `<outdir>/<name>` and nowhere else.
pub fn check_run_name(name: &str, what: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(AsaError::Config(format!(
            "{what} '{name}' is not a valid run name: {why}; use a plain folder name such as 'run1'"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name == "." || name == ".." {
        return bad("it names the current or the parent folder");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("a run name is a single path component (no '/' or '\\')");
    }
    if name.contains('\0') {
        return bad("it contains a NUL character");
    }
    if name.starts_with(".lock") || name.contains(".tmp-") {
        return bad("names with '.tmp-' or starting with '.lock' are reserved for temporary files");
    }
    Ok(())
}

/// Whether a process with this id exists (on this machine).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Who held a run's lock, as its lock file says: (pid, host, start time in Unix seconds).
fn parse_lock_text(text: &str) -> Option<(i32, String, u64)> {
    let mut pid = None;
    let (mut host, mut started) = (String::from("?"), 0u64);
    for line in text.lines() {
        match line.split_once('=') {
            Some(("pid", v)) => pid = v.trim().parse().ok(),
            Some(("host", v)) => host = v.trim().to_string(),
            Some(("started_unix", v)) => started = v.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    pid.map(|p| (p, host, started))
}

fn describe_holder(pid: i32, host: &str, started: u64) -> String {
    let ago = unix_now().saturating_sub(started);
    if started == 0 {
        format!("pid {pid} on host {host}")
    } else {
        format!("pid {pid} on host {host}, started {ago} s ago")
    }
}

/// An exclusive lock on a run folder, held for the life of a training process.
///
/// `<run>/.lock` is locked with `flock(LOCK_EX | LOCK_NB)`: the kernel releases an advisory
/// lock when its process dies, so a crashed or killed run never blocks the next one. The file's
/// text (pid, host, start time) only serves the messages: a second process names the holder, and
/// a process that finds the text of a dead holder says it takes over a stale lock. The file is
/// never removed (removing a locked file lets two processes lock two different files); on drop
/// its text is cleared and the lock released.
pub struct RunLock {
    file: std::fs::File,
}

impl RunLock {
    /// Locks `<dir>/.lock` (creating `dir`). Errors when another process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek};
        use std::os::unix::io::AsRawFd;
        std::fs::create_dir_all(dir).map_err(|e| AsaError::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| AsaError::io(&path, e))?;
        // SAFETY: flock on a file descriptor we own; LOCK_NB makes it return at once.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(AsaError::io(&path, err));
            }
            let who = parse_lock_text(&text)
                .map(|(p, h, s)| describe_holder(p, &h, s))
                .unwrap_or_else(|| "another process".into());
            return Err(AsaError::Other(format!(
                "run folder {} is in use by another asa process ({who}); wait for it to finish or stop it (lock file {})",
                dir.display(),
                path.display()
            )));
        }
        if let Some((pid, host, started)) = parse_lock_text(&text) {
            let me = std::process::id() as i32;
            if pid != me {
                let why = if host != host_name() {
                    "it was taken on another host and is not held now"
                } else if pid_alive(pid) {
                    "that pid is alive but does not hold the lock (a reused pid, or a copied run folder)"
                } else {
                    "that process is gone (killed or crashed)"
                };
                eprintln!(
                    "note: {}: taking over the stale lock of {}: {why}",
                    dir.display(),
                    describe_holder(pid, &host, started)
                );
            }
        }
        let text = format!(
            "pid={}\nhost={}\nstarted_unix={}\n",
            std::process::id(),
            host_name(),
            unix_now()
        );
        let written = (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(text.as_bytes())?;
            file.sync_data()
        })();
        written.map_err(|e| AsaError::io(&path, e))?;
        Ok(RunLock { file })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // cleared text means "released cleanly"; the flock itself goes with the descriptor
        let _ = self.file.set_len(0);
    }
}

/// The pid of a temporary name `<x>.tmp-<pid>` (files of `write_atomic`) or `best.tmp-<pid>` /
/// `best.old-<pid>` (folders of `save_best`).
fn temp_pid(name: &str) -> Option<i32> {
    let (_, pid) = name
        .rsplit_once(".tmp-")
        .or_else(|| name.strip_prefix("best.old-").map(|p| ("", p)))?;
    pid.parse()
        .ok()
        .filter(|_| pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes what killed saves left in a run folder (and its `best/`): `*.tmp-<pid>` files and
/// `best.tmp-<pid>` folders. Called with the run's lock held, so no live asa process is writing
/// them; our own pid is spared. A `best/` that a kill left missing between the two renames of
/// `save_best` is first restored from `best.old-<pid>`. Returns (entries removed, bytes freed).
pub fn clean_leftovers(dir: &Path) -> Result<(usize, u64)> {
    let best = dir.join("best");
    let me = std::process::id() as i32;
    let entries = |d: &Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    // a kill between "best -> best.old-PID" and "best.tmp-PID -> best": the old one is whole
    if !best.exists() {
        if let Some((_, old)) = entries(dir)
            .into_iter()
            .filter(|(n, _)| n.starts_with("best.old-") && temp_pid(n).is_some_and(|p| p != me))
            .max_by_key(|(_, p)| p.metadata().and_then(|m| m.modified()).ok())
        {
            std::fs::rename(&old, &best).map_err(|e| AsaError::io(&old, e))?;
            eprintln!(
                "note: {}: restored best/ from {} (a save of best/ was interrupted)",
                dir.display(),
                old.display()
            );
        }
    }
    let (mut n, mut bytes) = (0usize, 0u64);
    for d in [dir.to_path_buf(), best] {
        for (name, path) in entries(&d) {
            if temp_pid(&name).is_none_or(|p| p == me) {
                continue;
            }
            let size = dir_size(&path);
            let res = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            res.map_err(|e| AsaError::io(&path, e))?;
            n += 1;
            bytes += size;
        }
    }
    Ok((n, bytes))
}

fn dir_size(p: &Path) -> u64 {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// What a command does with a run folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// a new run: the folder must not hold one
    New,
    /// `--resume`: continue the run in the folder
    Resume,
    /// `--force`: delete the run in the folder and start a new one
    Replace,
}

/// Opens a run folder for a training command: checks the name was valid, takes the lock, refuses
/// to start over an existing run without `--force` (or `--resume` without a run), deletes the
/// old run's files on `--force`, and removes leftovers of killed saves. The lock must be kept
/// until the command ends.
pub fn open_run_dir(run: &RunDir, mode: RunMode, cmd: &str) -> Result<RunLock> {
    if let Some(parent) = run.dir.parent().filter(|p| p.exists() && !p.is_dir()) {
        return Err(AsaError::Input(format!(
            "the output folder {} is a file, not a folder; choose another --outdir",
            parent.display()
        )));
    }
    if mode == RunMode::Resume && !run.checkpoint().is_file() && !run.dir.is_dir() {
        // nothing to lock: say so without creating the folder
        return Err(AsaError::Checkpoint(format!(
            "--resume: {} does not exist, so there is no run to resume (check --outdir and the run name)",
            run.dir.display()
        )));
    }
    if run.dir.exists() && !run.dir.is_dir() {
        return Err(AsaError::Input(format!(
            "{} exists and is not a folder; choose another --name/--outdir",
            run.dir.display()
        )));
    }
    let lock = RunLock::acquire(&run.dir)?;
    let present: Vec<&str> = RUN_FILES
        .iter()
        .copied()
        .filter(|f| run.dir.join(f).exists())
        .collect();
    match mode {
        RunMode::New if !present.is_empty() => {
            return Err(AsaError::Input(format!(
                "{} already holds a run ({}); pass --resume to continue it, or --force to delete it and start over",
                run.dir.display(),
                present.join(", ")
            )));
        }
        RunMode::Resume if !run.checkpoint().is_file() => {
            return Err(AsaError::Checkpoint(format!(
                "--resume: {} holds no run to resume (no checkpoint.safetensors){}",
                run.dir.display(),
                if present.is_empty() {
                    String::new()
                } else {
                    format!("; it holds {}: pass --force instead of --resume to delete them and start over", present.join(", "))
                }
            )));
        }
        RunMode::Replace => {
            // only the run's own files go; anything else the user keeps there stays
            for f in &present {
                let p = run.dir.join(f);
                let res = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                res.map_err(|e| AsaError::io(&p, e))?;
            }
            if !present.is_empty() {
                eprintln!(
                    "{cmd}: --force: deleted the previous run in {} ({})",
                    run.dir.display(),
                    present.join(", ")
                );
            }
        }
        _ => {}
    }
    let (n, bytes) = clean_leftovers(&run.dir)?;
    if n > 0 {
        eprintln!(
            "note: {}: removed {n} temporary file(s) of an interrupted save ({:.1} MB)",
            run.dir.display(),
            bytes as f64 / 1e6
        );
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((lr_at(0, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        let mid = lr_at(55, 1.0, 0.1, 10, 100);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn run_names_are_one_plain_component() {
        for good in ["mini", "run-1", "a.b", "x_y"] {
            assert!(check_run_name(good, "--name").is_ok(), "{good}");
        }
        for bad in [
            "", ".", "..", "../x", "a/b", "/abs", "a\\b", "x.tmp-12", ".lock", "a/",
        ] {
            assert!(check_run_name(bad, "--name").is_err(), "{bad}");
        }
    }

    #[test]
    fn temp_names_give_their_pid() {
        assert_eq!(temp_pid("checkpoint.safetensors.tmp-123"), Some(123));
        assert_eq!(temp_pid("best.tmp-9"), Some(9));
        assert_eq!(temp_pid("best.old-77"), Some(77));
        assert_eq!(temp_pid("metrics.jsonl"), None);
        assert_eq!(temp_pid("notes.tmp-draft"), None);
        assert_eq!(temp_pid("x.tmp-+5"), None);
        assert_eq!(temp_pid("best"), None);
    }
}
