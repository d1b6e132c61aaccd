//! `asa train --config run.toml`: the reference notebooks' training recipe on prepared token
//! shards (`asa prepare`), with exact resume, `best` and `last` checkpoints and JSON-lines
//! metrics. The loop itself is the one `train-mini` uses (`train::run_loop`).
//!
//! The config is one flat TOML table with the reference `ASMTrainConfig` field names (model and
//! training fields side by side, as the reference's config is), plus our own keys: `data` (the
//! prepared folder), `outdir`, `name` (default: `tag`), `min_lr`, `val_windows`,
//! `skip_nonfinite`, `precision`. Every key is optional except `data`.

use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::backend::cuda::Precision;
use crate::config::{
    check_kinds, check_known_keys, Kind, ModelConfig, Place, MODEL_FIELDS,
    REFERENCE_IGNORED_FIELDS, REFERENCE_TRAIN_FIELDS,
};
use crate::data::shards::{open_prepared, ShardSet};
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::optim::AdamW;
use crate::train::{
    adam_config, check_run_name, check_stop_at, extend_total, load_run, open_run_dir, run_mode,
    Batches, RunDir, RunMode, TrainReport, TrainSettings, TrainState,
};

fn d_name() -> String {
    "asa_run".into()
}
fn d_outdir() -> PathBuf {
    PathBuf::from("runs")
}
fn d_batch() -> usize {
    64
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    3e-4
}
fn d_wd() -> f64 {
    0.01
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn d_clip() -> f64 {
    1.0
}
fn d_warmup() -> usize {
    1000
}
fn d_total() -> usize {
    75_000
}
fn d_eval() -> usize {
    1000
}
fn d_stride() -> f64 {
    0.5
}
fn d_val_windows() -> usize {
    256
}
fn d_precision() -> String {
    "bf16".into()
}

/// The training half of a run config (reference names where the reference has the field).
#[derive(Debug, Clone, Deserialize)]
pub struct RunConfig {
    /// folder written by `asa prepare`
    pub data: PathBuf,
    #[serde(default = "d_outdir")]
    pub outdir: PathBuf,
    /// run name (default: the reference's `tag`)
    pub name: Option<String>,
    #[serde(default = "d_name")]
    pub tag: String,
    /// rows per forward/backward pass when `micro_batch_size` is 0 (`grad_accum_steps` passes
    /// make one optimizer step); with `micro_batch_size` set it must equal
    /// `micro_batch_size * grad_accum_steps` when given in a TOML config
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// rows per forward/backward pass; 0 means `batch_size`
    #[serde(default)]
    pub micro_batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum_steps: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// end of the cosine decay (the reference decays to 0)
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: usize,
    #[serde(default = "d_total")]
    pub total_steps: usize,
    #[serde(default = "d_eval")]
    pub eval_interval: usize,
    /// validation windows start every `stride_frac_val * T` tokens
    #[serde(default = "d_stride")]
    pub stride_frac_val: f64,
    /// at most this many validation windows per evaluation
    #[serde(default = "d_val_windows")]
    pub val_windows: usize,
    #[serde(default)]
    pub skip_nonfinite: bool,
    #[serde(default = "d_precision")]
    pub precision: String,
}

/// Our own keys of a run config (beside the model's and the reference's training fields).
pub const RUN_FIELDS: &[(&str, Kind)] = &[
    ("data", Kind::Str),
    ("outdir", Kind::Str),
    ("name", Kind::OptStr),
    ("min_lr", Kind::Float),
    ("val_windows", Kind::UInt),
    ("skip_nonfinite", Kind::Bool),
    ("precision", Kind::Str),
];

impl RunConfig {
    /// Rows of one forward/backward pass.
    pub fn micro_rows(&self) -> usize {
        if self.micro_batch_size == 0 {
            self.batch_size
        } else {
            self.micro_batch_size
        }
    }

    /// The memory preflight of a new run of `model` with these settings (`preflight::check_run`).
    pub fn preflight(&self, model: &ModelConfig, place: Place) -> Result<()> {
        let accumulate = self.grad_accum_steps > 1;
        crate::preflight::check_run(
            model,
            self.micro_rows(),
            model.max_seq_len,
            accumulate,
            place,
            crate::backend::cuda::free_memory_at(place),
        )
        .map(|_| ())
    }
}

/// TOML has `nan` and `inf`, JSON has not (they become `null` on the way, and serde then says
/// "invalid type: null" without a name): find them first, naming the key.
fn check_toml_finite(v: &toml::Value, path: &str) -> Result<()> {
    match v {
        toml::Value::Float(x) if !x.is_finite() => Err(AsaError::Config(format!(
            "`{path} = {x}` is not a finite number"
        ))),
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_toml_finite(x, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        toml::Value::Table(t) => {
            for (k, x) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                check_toml_finite(x, &p)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Reads a run config: TOML (`.toml`) or JSON (any other extension, e.g. a reference config
/// dumped with `json.dump(asdict(cfg))`). Returns the model config and the run config.
///
/// Every key must be a model field, a field of the reference's `ASMTrainConfig` or one of
/// [`RUN_FIELDS`] (an unknown key is an error naming the closest known one), every value has
/// its type and range checked, naming the key; the reference fields this trainer does not use
/// (dataset names, caches, logging) are accepted and listed once on stderr as ignored.
pub fn read_run_config(path: &Path) -> Result<(ModelConfig, RunConfig)> {
    let at = |e: AsaError| match e {
        AsaError::Config(m) => AsaError::Config(format!("{}: {m}", path.display())),
        other => other,
    };
    let text = std::fs::read_to_string(path).map_err(|e| AsaError::io(path, e))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let value: serde_json::Value = if is_toml {
        let t: toml::Value = toml::from_str(&text).map_err(|e| {
            // one line: toml's own Display draws the source line over several
            let at = e.span().map_or(String::new(), |sp| {
                let before = &text[..sp.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {col}")
            });
            AsaError::Config(format!(
                "{}: invalid TOML{at}: {}",
                path.display(),
                e.message().trim().replace('\n', "; ")
            ))
        })?;
        check_toml_finite(&t, "").map_err(at)?;
        serde_json::to_value(t).map_err(|e| AsaError::Config(format!("{}: {e}", path.display())))?
    } else {
        serde_json::from_str(&text)
            .map_err(|e| AsaError::Config(format!("{}: invalid JSON: {e}", path.display())))?
    };
    let map = value.as_object().ok_or_else(|| {
        AsaError::Config(format!(
            "{}: a run config is one table of keys, got {}",
            path.display(),
            crate::config::json_kind(&value)
        ))
    })?;
    let own: Vec<&str> = RUN_FIELDS.iter().map(|(k, _)| *k).collect();
    let known: Vec<&str> = MODEL_FIELDS
        .iter()
        .map(|(k, _)| *k)
        .chain(REFERENCE_TRAIN_FIELDS.iter().map(|(k, _)| *k))
        .chain(REFERENCE_IGNORED_FIELDS.iter().copied())
        .chain(own.iter().copied())
        .collect();
    check_known_keys(map, &known).map_err(at)?;
    check_kinds(map, RUN_FIELDS).map_err(at)?;
    check_kinds(map, REFERENCE_TRAIN_FIELDS).map_err(at)?;
    let model = ModelConfig::from_json_value_known(&value, &own).map_err(at)?;
    model.validate().map_err(at)?;
    let run: RunConfig = serde_json::from_value(value.clone())
        .map_err(|e| AsaError::Config(format!("{}: {e}", path.display())))?;
    check_run_config(&run, is_toml && map.contains_key("batch_size")).map_err(at)?;
    let ignored: Vec<&str> = REFERENCE_IGNORED_FIELDS
        .iter()
        .copied()
        .filter(|k| map.contains_key(*k))
        .collect();
    if !ignored.is_empty() {
        eprintln!(
            "note: {}: reference fields not used by asa train (ignored): {}",
            path.display(),
            ignored.join(", ")
        );
    }
    Ok((model, run))
}

/// Range checks of the training fields, each error naming the field. `batch_given`: the file
/// sets `batch_size` itself (checked against the micro-batches then; a reference JSON always
/// carries a `batch_size` that its trainer ignores once `micro_batch_size` is set).
pub fn check_run_config(run: &RunConfig, batch_given: bool) -> Result<()> {
    let err = |m: String| Err(AsaError::Config(m));
    for (name, v) in [
        ("batch_size", run.batch_size),
        ("grad_accum_steps", run.grad_accum_steps),
        ("total_steps", run.total_steps),
        ("eval_interval", run.eval_interval),
        ("val_windows", run.val_windows),
    ] {
        if v == 0 {
            return err(format!("{name} must be >= 1, got 0"));
        }
    }
    if run.warmup_steps > run.total_steps {
        return err(format!(
            "warmup_steps ({}) must be <= total_steps ({})",
            run.warmup_steps, run.total_steps
        ));
    }
    if run.micro_batch_size > 0 && batch_given {
        let rows = run.micro_batch_size.checked_mul(run.grad_accum_steps);
        if rows != Some(run.batch_size) {
            return err(format!(
                "batch_size ({}) must equal micro_batch_size ({}) x grad_accum_steps ({}): with micro-batches an optimizer step takes micro_batch_size x grad_accum_steps rows (leave batch_size out, or set micro_batch_size = 0)",
                run.batch_size, run.micro_batch_size, run.grad_accum_steps
            ));
        }
    }
    let lr = run.learning_rate;
    if !(lr.is_finite() && lr > 0.0) {
        return err(format!("learning_rate must be finite and > 0, got {lr}"));
    }
    if !(run.min_lr.is_finite() && run.min_lr >= 0.0 && run.min_lr <= lr) {
        return err(format!(
            "min_lr must be >= 0 and <= learning_rate ({lr}), got {}",
            run.min_lr
        ));
    }
    if !(run.weight_decay.is_finite() && run.weight_decay >= 0.0) {
        return err(format!(
            "weight_decay must be finite and >= 0, got {}",
            run.weight_decay
        ));
    }
    for (i, b) in run.betas.iter().enumerate() {
        if !(0.0..1.0).contains(b) {
            return err(format!("betas[{i}] must be in [0, 1), got {b}"));
        }
    }
    // clip_grad_norm_ with max_norm 0 zeroes every gradient (torch's too): nothing would train
    if !(run.grad_clip.is_finite() && run.grad_clip > 0.0) {
        return err(format!(
            "grad_clip must be finite and > 0 (0 zeroes every gradient; a large value turns clipping off), got {}",
            run.grad_clip
        ));
    }
    if !(run.stride_frac_val > 0.0 && run.stride_frac_val <= 1.0) {
        return err(format!(
            "stride_frac_val must be in (0, 1], got {}",
            run.stride_frac_val
        ));
    }
    run.precision.parse::<Precision>().map_err(|_| {
        AsaError::Config(format!(
            "precision must be f32 or bf16, got \"{}\"",
            run.precision
        ))
    })?;
    if run.data.as_os_str().is_empty() {
        return err("data must name the folder written by `asa prepare`, got \"\"".into());
    }
    // one rule for run names, the one train-mini's --name follows
    match &run.name {
        Some(n) => crate::train::check_run_name(n, "name")?,
        None => {
            crate::train::check_run_name(&run.tag, "tag (the run name when `name` is not set)")?
        }
    }
    Ok(())
}

/// Prepared shards as training windows: a random shard (weighted by its length), a random
/// offset; validation windows at a fixed stride over the validation shard.
pub struct ShardBatches {
    set: ShardSet,
    /// cumulative window counts of the train shards
    cum: Vec<u64>,
    t: usize,
}

impl ShardBatches {
    pub fn new(set: ShardSet, t: usize) -> Result<Self> {
        let mut cum = Vec::new();
        let mut acc = 0u64;
        for s in &set.train {
            acc += s.tokens.len().saturating_sub(t) as u64;
            cum.push(acc);
        }
        if acc == 0 {
            return Err(AsaError::Input(format!(
                "the training shards hold no window of {} tokens (max_seq_len + 1)",
                t + 1
            )));
        }
        if set.val.tokens.len() <= t {
            return Err(AsaError::Input(format!(
                "the validation shard ({} tokens) is shorter than one window of {} tokens",
                set.val.tokens.len(),
                t + 1
            )));
        }
        Ok(ShardBatches { set, cum, t })
    }
}

impl Batches for ShardBatches {
    fn sample_train(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
        use rand::Rng;
        debug_assert_eq!(t, self.t);
        let total = *self.cum.last().expect("at least one shard");
        let (mut inp, mut tgt) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for _ in 0..b {
            let w = rng.gen_range(0..total);
            let si = self.cum.partition_point(|&c| c <= w);
            let start = (w - if si == 0 { 0 } else { self.cum[si - 1] }) as usize;
            let toks = self.set.train[si].tokens.window(start, t + 1);
            inp.extend_from_slice(&toks[..t]);
            tgt.extend(toks[1..].iter().map(|&x| x as i64));
        }
        (inp, tgt)
    }

    fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)> {
        let v = &self.set.val.tokens;
        let starts: Vec<usize> = (0..v.len().saturating_sub(t))
            .step_by(stride.max(1))
            .take(max)
            .collect();
        starts
            .chunks(b.max(1))
            .map(|ch| {
                let (mut inp, mut tgt) = (Vec::new(), Vec::new());
                for &s in ch {
                    let w = v.window(s, t + 1);
                    inp.extend_from_slice(&w[..t]);
                    tgt.extend(w[1..].iter().map(|&x| x as i64));
                }
                (inp, tgt, ch.len())
            })
            .collect()
    }

    fn sizes(&self) -> (usize, usize) {
        (
            self.set.train.iter().map(|s| s.tokens.len()).sum(),
            self.set.val.tokens.len(),
        )
    }
}

/// Options of `asa train` beside the config file.
#[derive(Debug, Clone, Default)]
pub struct TrainArgs {
    pub config: PathBuf,
    pub seed: Option<u64>,
    pub resume: bool,
    /// delete the run already in the folder and start a new one
    pub force: bool,
    /// with `resume`: the run's new total step count (extends a finished run)
    pub total_steps: Option<usize>,
    pub place: Place,
    pub stop_at: Option<usize>,
    pub quiet: bool,
}

/// The training settings a config file describes (`tokenizer` is filled from the data).
fn settings_from(rc: &RunConfig, model: &ModelConfig) -> TrainSettings {
    let micro = if rc.micro_batch_size == 0 {
        rc.batch_size
    } else {
        rc.micro_batch_size
    };
    let t = model.max_seq_len;
    TrainSettings {
        steps: rc.total_steps,
        batch_size: micro * rc.grad_accum_steps,
        seq_len: t,
        lr: rc.learning_rate,
        min_lr: rc.min_lr,
        warmup_steps: rc.warmup_steps,
        weight_decay: rc.weight_decay,
        beta1: rc.betas[0],
        beta2: rc.betas[1],
        grad_clip: rc.grad_clip,
        eval_interval: rc.eval_interval,
        eval_windows: rc.val_windows,
        val_frac: 0.0,
        seed: model.seed,
        tokenizer: String::new(),
        data: vec![rc.data.clone()],
        fact_frac: 0.0,
        micro_batch_size: micro,
        val_stride: ((rc.stride_frac_val * t as f64).round() as usize).max(1),
        skip_nonfinite: rc.skip_nonfinite,
    }
}

/// The config-file name of a `TrainSettings` field, for messages.
fn config_key(settings_key: &str) -> &str {
    match settings_key {
        "steps" => "total_steps",
        "lr" => "learning_rate",
        "beta1" => "betas[0]",
        "beta2" => "betas[1]",
        "eval_windows" => "val_windows",
        "val_stride" => "stride_frac_val (validation stride in tokens)",
        "batch_size" => "rows per step (batch_size x grad_accum_steps)",
        "micro_batch_size" => "micro_batch_size (rows per pass)",
        k => k,
    }
}

/// The fields (top-level keys of their JSON form) whose values differ, as "key: old -> new".
fn json_changes<T: serde::Serialize>(
    old: &T,
    new: &T,
    skip: &[&str],
    name: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["(the run's settings could not be compared)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
            (x != y).then(|| format!("{}: {x} -> {y}", name(k)))
        })
        .collect()
}

/// Two data paths name the same folder (as written, or once resolved).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// On `--resume`: what the config file changes against the run, each field named. The seed
/// (`--seed` or the config's), the model and every training setting must match, except
/// `skip_nonfinite` (may be switched on to get past a non-finite step) and `total_steps`, which
/// only `--total-steps` changes (it is reported here when the config alone changes it).
fn resume_changes(
    run_cfg: &ModelConfig,
    run_s: &TrainSettings,
    model: &ModelConfig,
    new_s: &TrainSettings,
    total_given: bool,
) -> Vec<String> {
    let mut out = json_changes(run_cfg, model, &[], &|k| match k {
        "seed" => "seed (the config's, or --seed)".into(),
        k => k.to_string(),
    });
    // seed and seq_len are compared as the model's seed and max_seq_len; the rest below
    let skip = [
        "tokenizer",
        "skip_nonfinite",
        "seed",
        "seq_len",
        "data",
        "steps",
        "val_frac",
    ];
    if !total_given && run_s.steps != new_s.steps {
        out.push(format!(
            "total_steps: {} -> {} (to extend the run, pass --total-steps {} and leave total_steps as it was)",
            run_s.steps, new_s.steps, new_s.steps
        ));
    }
    if !matches!((run_s.data.first(), new_s.data.first()), (Some(a), Some(b)) if same_path(a, b)) {
        out.push(format!("data: {:?} -> {:?}", run_s.data, new_s.data));
    }
    out.extend(json_changes(run_s, new_s, &skip, &|k| {
        config_key(k).to_string()
    }));
    out
}

/// `asa train`: trains on prepared shards; `--resume` continues `<outdir>/<name>` exactly.
pub fn train(a: &TrainArgs) -> Result<TrainReport> {
    let (mut model, rc) = read_run_config(&a.config)?;
    if let Some(s) = a.seed {
        model.seed = s;
    }
    if model.mlp_bias.is_none() {
        model.mlp_bias = Some(true);
    }
    let (name, what) = match &rc.name {
        Some(n) => (n.clone(), "name"),
        None => (rc.tag.clone(), "tag (the run name when `name` is not set)"),
    };
    check_run_name(&name, what)?;
    let run = RunDir {
        dir: rc.outdir.join(&name),
    };
    let precision: Precision = rc.precision.parse()?;
    if a.total_steps.is_some() && !a.resume {
        return Err(AsaError::Config(
            "--total-steps extends a run on --resume; for a new run set total_steps in the config"
                .into(),
        ));
    }
    let mode = run_mode(a.resume, a.force);
    if mode != RunMode::Resume {
        check_stop_at(a.stop_at, 0, rc.total_steps)?;
    }
    let _lock = open_run_dir(&run, mode, "train")?;
    let resume = mode == RunMode::Resume;
    let new_settings = settings_from(&rc, &model);
    let (cfg, params, adam, mut settings, state) = if resume {
        let (cfg, params, adam, mut settings, state) = load_run(&run)?;
        let changed = resume_changes(
            &cfg,
            &settings,
            &model,
            &new_settings,
            a.total_steps.is_some(),
        );
        if !changed.is_empty() {
            return Err(AsaError::Config(format!(
                "--resume: {} differs from the run in {}: {}; restore these values to continue the run, or start a new run (another name, or --force)",
                a.config.display(),
                run.dir.display(),
                changed.join("; ")
            )));
        }
        settings.skip_nonfinite = new_settings.skip_nonfinite;
        if let Some(n) = a.total_steps {
            settings.steps = extend_total(n, &state, "--total-steps")?;
        }
        (cfg, params, adam, settings, state)
    } else {
        rc.preflight(&model, a.place)?;
        let (_, params) = Lm::new(&model)?;
        let adam = AdamW::new(adam_config(&new_settings), &params);
        (model, params, adam, new_settings, TrainState::start())
    };
    // the data is checked before anything trains: shards, headers, vocabulary
    let data_dir = settings
        .data
        .first()
        .cloned()
        .unwrap_or_else(|| rc.data.clone());
    let set = open_prepared(&data_dir, cfg.vocab_size)?;
    let tokenizer = set
        .meta
        .get("tokenizer")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    // recorded in train.json so that `probe` and other readers decode with the data's tokenizer
    // (runs saved before this have it empty and get it on their next save)
    if settings.tokenizer.is_empty() {
        settings.tokenizer = tokenizer.clone();
    }
    let data = ShardBatches::new(set, settings.seq_len)?;
    crate::train::run_loop(crate::train::LoopArgs {
        label: "train",
        extend_flag: "--total-steps",
        run,
        cfg,
        params,
        adam,
        settings,
        state,
        resume,
        data: &data,
        place: a.place,
        precision,
        stop_at: a.stop_at,
        quiet: a.quiet,
        keep_best: true,
        data_name: format!(
            "{} shards, {}",
            data_dir.display(),
            if tokenizer.is_empty() {
                "?"
            } else {
                &tokenizer
            }
        ),
    })
}
