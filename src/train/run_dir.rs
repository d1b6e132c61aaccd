//! The run directory: weights, optimizer state, metrics and the exact-resume state
//! ([`save_run`], [`load_run`]: written to temporary files and renamed), the `best` checkpoint,
//! the checks of a resume, opening a run folder ([`open_run_dir`]) and cleaning what a killed
//! run left, and loading a run or checkpoint for analysis ([`load_for_analysis`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, AnyTensor};
use crate::config::ModelConfig;
use crate::data::tokenizer::Tokenizer;
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::model::params::ParamStore;
use crate::optim::AdamW;

use super::*;

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

pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| AsaError::Other(format!("cannot serialise {}: {e}", path.display())))?;
    checkpoint::write_bytes_atomic(path, text.as_bytes())
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
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
pub(crate) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
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
pub(crate) fn first_val_in_metrics(path: &Path) -> Option<f64> {
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
pub(crate) fn save_best(
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

pub(crate) fn parse_pos(s: &str) -> Result<u128> {
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

/// `--ckpt`, or by default the most recently saved run under `runs/` (said on stderr).
pub fn resolve_checkpoint(ckpt: Option<&Path>) -> Result<PathBuf> {
    match ckpt {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let p = latest_run(Path::new("runs"))?;
            eprintln!(
                "using {} (the most recently saved run under runs/; --ckpt picks another)",
                p.display()
            );
            Ok(p)
        }
    }
}

/// The model config and weights of a checkpoint file (`.safetensors` with its config in the
/// metadata or beside it, or a reference `.pt`), checked against each other.
pub fn load_weights(file: &Path) -> Result<(ModelConfig, ParamStore)> {
    let loaded = checkpoint::read_checkpoint(file)?;
    let cfg = loaded.config.ok_or_else(|| {
        AsaError::Checkpoint(format!(
            "{}: no model config found (looked in the file and for config.json beside it)",
            file.display()
        ))
    })?;
    cfg.validate()?;
    checkpoint::ensure_config_fits(&cfg, &loaded.tensors, &file.display().to_string())?;
    let (_, mut params) = Lm::new(&cfg)?;
    checkpoint::load_into(&mut params, &loaded.tensors, &file.display().to_string())?;
    Ok((cfg, params))
}

/// The weights file of a checkpoint path: a run folder's (or `best/`'s) `model.safetensors`,
/// else the path itself.
pub fn weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        RunDir {
            dir: path.to_path_buf(),
        }
        .model()
    } else {
        path.to_path_buf()
    }
}

/// Loads a model for analysis from a run directory, a `.safetensors` file or a reference `.pt`
/// file (default: the latest run under `runs/`), with its tokenizer (the run's own, else the
/// one named, else GPT-2). Returns the model, its parameters, the tokenizer and a display name.
pub fn load_for_analysis(
    ckpt: Option<&Path>,
    tokenizer: Option<&str>,
) -> Result<(Lm, ParamStore, Tokenizer, String)> {
    let path = resolve_checkpoint(ckpt)?;
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
    let (cfg, params) = load_weights(&file)?;
    let (mut lm, _) = Lm::new(&cfg)?;
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
