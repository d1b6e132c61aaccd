//! `asa train --config run.toml`: the reference notebooks' training recipe on prepared token
//! shards (`asa prepare`), with exact resume, `best` and `last` checkpoints and JSON-lines
//! metrics, through the loop that `train-mini` uses ([`super::run_loop`]).

use std::path::{Path, PathBuf};

use crate::config::Precision;
use crate::config::{ModelConfig, Place};
use crate::data::batch::ShardBatches;
use crate::data::shards::open_prepared;
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::optim::AdamW;

use super::*;

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
    /// start a new run from this checkpoint's weights and model (`--init-from`)
    pub init_from: Option<PathBuf>,
    /// parameter-name globs kept fixed (`--freeze`, added to the config's `freeze`)
    pub freeze: Vec<String>,
    /// parameter-name globs that train (`--trainable`, in place of the config's `trainable`)
    pub trainable: Option<Vec<String>>,
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
        "init_from",
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
    if a.init_from.is_some() && a.resume {
        return Err(AsaError::Config(
            "--init-from starts a new run; --resume continues one (it keeps the weights it started from)".into(),
        ));
    }
    let mode = run_mode(a.resume, a.force);
    if mode != RunMode::Resume {
        check_stop_at(a.stop_at, 0, rc.total_steps)?;
    }
    // the model keys the user set: the config's own, and the seed when --seed gives it
    let mut given = rc.model_keys.clone();
    if a.seed.is_some() && !given.iter().any(|k| k == "seed") {
        given.push("seed".into());
    }
    let what = a.config.display().to_string();
    // an --init-from checkpoint is loaded (and checked against the config) before the run
    // folder is touched
    let init = match &a.init_from {
        Some(p) => {
            let init = finetune::load_init(p)?;
            model = finetune::finetune_model(&init.cfg, &model, &given, &what, &|k| k.into(), p)?;
            Some(init)
        }
        None => None,
    };
    let mut freeze = rc.freeze.clone();
    freeze.extend(a.freeze.iter().cloned());
    let _lock = open_run_dir(&run, mode, "train")?;
    let resume = mode == RunMode::Resume;
    let mut new_settings = settings_from(&rc, &model);
    new_settings.freeze = freeze;
    if a.trainable.is_some() {
        new_settings.trainable = a.trainable.clone();
    }
    new_settings.init_from = init.as_ref().map(|i| i.path.display().to_string());
    let (cfg, params, adam, mut settings, state) = if resume {
        let (cfg, params, adam, mut settings, state) = load_run(&run)?;
        if let Some(from) = &settings.init_from {
            // a fine-tune's model is its checkpoint's: the config may leave it out
            model = finetune::finetune_model(
                &cfg,
                &model,
                &given,
                &what,
                &|k| k.into(),
                Path::new(from),
            )?;
            new_settings = settings_from(&rc, &model);
            new_settings.freeze = rc.freeze.clone();
            new_settings.freeze.extend(a.freeze.iter().cloned());
            if a.trainable.is_some() {
                new_settings.trainable = a.trainable.clone();
            }
        }
        // the run's own freeze / trainable lists go on unless the user names others
        if a.freeze.is_empty() && rc.freeze.is_empty() {
            new_settings.freeze = settings.freeze.clone();
        }
        if a.trainable.is_none() && rc.trainable.is_none() {
            new_settings.trainable = settings.trainable.clone();
        }
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
        let params = match init {
            Some(i) => i.params,
            None => Lm::new(&model)?.1,
        };
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
