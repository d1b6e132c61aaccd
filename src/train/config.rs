//! What a training run is asked to do: [`TrainSettings`] (saved as `train.json` in the run
//! directory, compared on resume) and the `asa train --config run.toml` file it comes from
//! ([`RunConfig`], [`read_run_config`]): one flat TOML table with the reference `ASMTrainConfig`
//! field names (model and training fields side by side, as the reference's config is), plus our
//! own keys: `data` (the prepared folder), `outdir`, `name` (default: `tag`), `min_lr`,
//! `val_windows`, `skip_nonfinite`, `precision`. Every key is optional except `data`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Precision;
use crate::config::{
    check_kinds, check_known_keys, Kind, ModelConfig, Place, MODEL_FIELDS,
    REFERENCE_IGNORED_FIELDS, REFERENCE_TRAIN_FIELDS,
};
use crate::error::{AsaError, Result};

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
    /// parameter-name globs kept fixed (`--freeze`, `freeze` in a run config)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
    /// parameter-name globs that train, the others fixed (`trainable` in a run config)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable: Option<Vec<String>>,
    /// the checkpoint the run's weights started from (`--init-from`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
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
    pub(crate) fn stride(&self) -> usize {
        if self.val_stride == 0 {
            (self.seq_len / 2).max(1)
        } else {
            self.val_stride
        }
    }
}

pub(crate) fn default_fact_frac() -> f64 {
    0.6
}

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
    /// parameter-name globs that train; every other parameter is kept fixed (fine-tuning)
    #[serde(default)]
    pub trainable: Option<Vec<String>>,
    /// parameter-name globs kept fixed (added to `--freeze`)
    #[serde(default)]
    pub freeze: Vec<String>,
    /// the model keys the file itself sets (the rest are defaults): with `--init-from` these
    /// must agree with the checkpoint's config
    #[serde(skip)]
    pub model_keys: Vec<String>,
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
    ("trainable", Kind::StrList),
    ("freeze", Kind::StrList),
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
    let mut run: RunConfig = serde_json::from_value(value.clone())
        .map_err(|e| AsaError::Config(format!("{}: {e}", path.display())))?;
    run.model_keys = MODEL_FIELDS
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| map.contains_key(k))
        .collect();
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

/// The training settings a config file describes (`tokenizer` is filled from the data).
pub(crate) fn settings_from(rc: &RunConfig, model: &ModelConfig) -> TrainSettings {
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
        freeze: rc.freeze.clone(),
        trainable: rc.trainable.clone(),
        init_from: None,
    }
}
