//! `asa train-mini`: trains a small ASM on the embedded default data (or `--data` files).

use std::path::{Path, PathBuf};

use crate::config::Precision;
use crate::config::{ModelConfig, Place};
use crate::data::batch::TokenData;
use crate::data::corpus;
use crate::data::tokenizer::{Tokenizer, TokenizerKind};
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::optim::AdamW;

use super::*;

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
    /// start from this checkpoint's weights and model (`--init-from`)
    pub init_from: Option<PathBuf>,
    /// parameter-name globs kept fixed (`--freeze`)
    pub freeze: Vec<String>,
    /// parameter-name globs that train, all others fixed (`--trainable`)
    pub trainable: Option<Vec<String>>,
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
            init_from: None,
            freeze: Vec::new(),
            trainable: None,
        }
    }
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

/// `asa train-mini`: trains a small ASM on the embedded default data (or `--data` files).
pub fn train_mini(a: &TrainMiniArgs) -> Result<TrainReport> {
    check_run_name(&a.name, "--name")?;
    check_mini_flags(a)?;
    let run = RunDir {
        dir: a.outdir.join(&a.name),
    };
    if a.init_from.is_some() && a.resume {
        return Err(AsaError::Config(
            "--init-from starts a new run; --resume continues one (it keeps the weights it started from)".into(),
        ));
    }
    let mode = run_mode(a.resume, a.force);
    if mode != RunMode::Resume {
        check_stop_at(a.stop_at, 0, a.steps)?;
    }
    // an --init-from checkpoint is loaded and checked before the run folder is touched
    let init = match &a.init_from {
        Some(p) => Some(mini_init(a, p)?),
        None => None,
    };
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
        let (cfg, init_params) = match init {
            Some((cfg, p)) => (cfg, Some(p)),
            None => (mini_config(a, tok.vocab_size()), None),
        };
        crate::preflight::check_run(
            &cfg,
            a.batch_size,
            a.seq_len,
            false,
            a.place,
            crate::backend::cuda::free_memory_at(a.place),
        )?;
        let params = match init_params {
            Some(p) => p,
            None => Lm::new(&cfg)?.1,
        };
        let mut settings = mini_settings(a, tok.name());
        settings.freeze = a.freeze.clone();
        settings.trainable = a.trainable.clone();
        settings.init_from = a.init_from.as_ref().map(|p| p.display().to_string());
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

/// The model and weights of `train-mini --init-from`: the checkpoint's, with the seed when
/// `--seed` is typed; a model flag typed (`--embed-dim`, ...) must agree with the checkpoint.
fn mini_init(
    a: &TrainMiniArgs,
    path: &Path,
) -> Result<(ModelConfig, crate::model::params::ParamStore)> {
    let init = finetune::load_init(path)?;
    let typed = |f: &str| a.explicit.as_ref().is_some_and(|l| l.contains(&f));
    let mut given: Vec<String> = Vec::new();
    for (flag, key) in [
        ("embed-dim", "embed_dim"),
        ("num-layers", "num_layers"),
        ("num-heads", "num_heads"),
        ("num-slots", "num_slots"),
        ("seed", "seed"),
    ] {
        if typed(flag) {
            given.push(key.into());
        }
    }
    let asked = mini_config(a, init.cfg.vocab_size);
    let flag = |k: &str| format!("--{}", k.replace('_', "-"));
    let cfg = finetune::finetune_model(&init.cfg, &asked, &given, "the flags", &flag, path)?;
    Ok((cfg, init.params))
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
        freeze: Vec::new(),
        trainable: None,
        init_from: None,
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
