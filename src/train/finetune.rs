//! Fine-tuning: `--init-from CKPT` starts a new run from a checkpoint's weights and model config
//! (asa's own run folders and `best/`, `.safetensors` files, converted or raw reference `.pt`);
//! `--freeze PATTERN...` and `trainable = [...]` keep parameters fixed by name.
//!
//! A frozen parameter gets no update, no weight decay and no optimizer moments (they stay
//! zero), and its gradient is left out of the global norm that clipping uses, as with
//! `requires_grad = False` in PyTorch. The backward still computes it (no time is saved).

use std::path::{Path, PathBuf};

use globset::{Glob, GlobMatcher};

use crate::config::ModelConfig;
use crate::error::{AsaError, Result};
use crate::model::params::ParamStore;

use super::{load_weights, weights_file};

/// Model fields a fine-tune may set apart from its checkpoint: regularisation, the seed (of
/// dropout and data order) and, without learned absolute positions, the window length. Every
/// other field is the architecture and must match.
pub const FINETUNE_FREE_FIELDS: &[&str] = &["dropout", "slot_dropout", "slotspace_dropout", "seed"];

/// A checkpoint to start from.
pub struct InitFrom {
    /// as the user gave it
    pub path: PathBuf,
    pub cfg: ModelConfig,
    pub params: ParamStore,
}

/// Loads `--init-from`: a run folder (its `model.safetensors`), `best/`, a `.safetensors` file or
/// a reference `.pt`.
pub fn load_init(path: &Path) -> Result<InitFrom> {
    if !path.exists() {
        return Err(AsaError::Checkpoint(format!(
            "--init-from {}: no such file or folder",
            path.display()
        )));
    }
    let (cfg, params) = load_weights(&weights_file(path))?;
    Ok(InitFrom {
        path: path.to_path_buf(),
        cfg,
        params,
    })
}

/// The model of a fine-tune: the checkpoint's config, with the fields in `given` (those the user
/// set, by config key) taken from `asked` where they are free to differ
/// ([`FINETUNE_FREE_FIELDS`], and `max_seq_len` unless positions are learned). A given field
/// that contradicts the checkpoint is an error naming it; `what` names where it was given and
/// `flag` turns a config key into the name the user typed.
pub fn finetune_model(
    ckpt: &ModelConfig,
    asked: &ModelConfig,
    given: &[String],
    what: &str,
    flag: &dyn Fn(&str) -> String,
    init: &Path,
) -> Result<ModelConfig> {
    let to = |c: &ModelConfig| {
        serde_json::to_value(c).map_err(|e| AsaError::Other(format!("model config: {e}")))
    };
    let (mut out, want) = (to(ckpt)?, to(asked)?);
    let mut clashes = Vec::new();
    for k in given {
        let (Some(old), Some(new)) = (out.get(k).cloned(), want.get(k).cloned()) else {
            continue;
        };
        let free =
            FINETUNE_FREE_FIELDS.contains(&k.as_str()) || (k == "max_seq_len" && !ckpt.use_abs_pos);
        if free {
            out[k] = new;
        } else if old != new {
            clashes.push(format!("{}: {new} (the checkpoint has {old})", flag(k)));
        }
    }
    if !clashes.is_empty() {
        return Err(AsaError::Config(format!(
            "{what} contradicts the model of --init-from {}: {}; leave these out (the model comes from the checkpoint) or match them",
            init.display(),
            clashes.join("; ")
        )));
    }
    let cfg: ModelConfig =
        serde_json::from_value(out).map_err(|e| AsaError::Other(format!("model config: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}

fn matchers(patterns: &[String], what: &str) -> Result<Vec<(String, GlobMatcher)>> {
    patterns
        .iter()
        .map(|p| {
            Glob::new(p)
                .map(|g| (p.clone(), g.compile_matcher()))
                .map_err(|e| AsaError::Config(format!("{what} '{p}' is not a valid glob: {e}")))
        })
        .collect()
}

/// The parameters kept fixed: those matching a `freeze` glob, and with `trainable` given, those
/// matching none of its globs. Globs match whole PyTorch names (`*` crosses dots:
/// `blocks.*.attn.slot_*`). A glob that matches no parameter, or freezing everything, is an error.
pub fn frozen_names(
    names: &[String],
    freeze: &[String],
    trainable: Option<&[String]>,
) -> Result<Vec<String>> {
    let hint = || {
        let mut ex: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
        ex.push("...");
        format!("parameter names look like {}", ex.join(", "))
    };
    let fz = matchers(freeze, "--freeze pattern")?;
    let tr = match trainable {
        Some(t) => Some(matchers(t, "trainable pattern")?),
        None => None,
    };
    for (p, m) in fz.iter().chain(tr.iter().flatten()) {
        if !names.iter().any(|n| m.is_match(n)) {
            return Err(AsaError::Config(format!(
                "the pattern '{p}' matches no parameter of the model ({})",
                hint()
            )));
        }
    }
    let frozen: Vec<String> = names
        .iter()
        .filter(|n| {
            fz.iter().any(|(_, m)| m.is_match(n))
                || tr
                    .as_ref()
                    .is_some_and(|t| !t.iter().any(|(_, m)| m.is_match(n)))
        })
        .cloned()
        .collect();
    if frozen.len() == names.len() {
        return Err(AsaError::Config(
            "--freeze / trainable leave no parameter to train".into(),
        ));
    }
    Ok(frozen)
}

/// `frozen[i]` for every parameter of `params` (AdamW's mask).
pub fn frozen_mask(params: &ParamStore, frozen: &[String]) -> Vec<bool> {
    params.names.iter().map(|n| frozen.contains(n)).collect()
}

/// The start-of-run listing of what is frozen: one line, then the names.
pub fn describe_frozen(params: &ParamStore, frozen: &[String]) -> String {
    let mask = frozen_mask(params, frozen);
    let total: usize = params.data.iter().map(Vec::len).sum();
    let fixed: usize = params
        .data
        .iter()
        .zip(&mask)
        .filter(|(_, &f)| f)
        .map(|(d, _)| d.len())
        .sum();
    let trained: Vec<&str> = params
        .names
        .iter()
        .zip(&mask)
        .filter(|(_, &f)| !f)
        .map(|(n, _)| n.as_str())
        .collect();
    format!(
        "frozen: {} of {} parameters ({fixed} of {total} values); training {} ({} values): {}",
        frozen.len(),
        params.names.len(),
        trained.len(),
        total - fixed,
        trained.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lm::Lm;

    fn names() -> Vec<String> {
        let cfg = ModelConfig {
            vocab_size: 16,
            embed_dim: 8,
            num_layers: 2,
            num_heads: 2,
            num_slots: 2,
            slotspace_dim: 4,
            ..Default::default()
        };
        Lm::new(&cfg).unwrap().1.names
    }

    #[test]
    fn globs_select_by_whole_name() {
        let n = names();
        // the notebooks' slotspace fine-tune: train slot_in/q/k/v/out and the gate only
        let tr: Vec<String> = [
            "*.slot_in.weight",
            "*.slot_[qkv].weight",
            "*.slot_out.weight",
            "*_slotspace_gate_raw",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = frozen_names(&n, &[], Some(&tr)).unwrap();
        let trained: Vec<&String> = n.iter().filter(|x| !f.contains(x)).collect();
        assert_eq!(trained.len(), 2 * 6, "{trained:?}");
        assert!(trained
            .iter()
            .all(|x| x.contains(".slot_") || x.ends_with("_slotspace_gate_raw")));
        // freeze: layer 0 and the embeddings
        let f = frozen_names(&n, &["blocks.0.*".into(), "token_emb.weight".into()], None).unwrap();
        assert!(f
            .iter()
            .all(|x| x.starts_with("blocks.0.") || x == "token_emb.weight"));
        assert!(f.contains(&"token_emb.weight".to_string()));
        // a pattern matching nothing, a bad glob, everything frozen: errors naming the problem
        let e = frozen_names(&n, &["blocks.9.*".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'blocks.9.*' matches no parameter"), "{e}");
        assert!(frozen_names(&n, &["[".into()], None).is_err());
        let e = frozen_names(&n, &["*".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no parameter to train"), "{e}");
    }

    #[test]
    fn the_checkpoint_decides_the_architecture() {
        let ck = ModelConfig {
            vocab_size: 16,
            embed_dim: 8,
            num_heads: 2,
            dropout: 0.0,
            ..Default::default()
        };
        let asked = ModelConfig {
            embed_dim: 16,
            dropout: 0.1,
            num_layers: 7,
            ..ck.clone()
        };
        let id = |k: &str| k.to_string();
        // only the keys the user gave count: dropout is free, num_layers equal to ... not given
        let m = finetune_model(&ck, &asked, &["dropout".into()], "x", &id, Path::new("c")).unwrap();
        assert_eq!(
            (m.dropout, m.embed_dim, m.num_layers),
            (0.1, 8, ck.num_layers)
        );
        let e = finetune_model(
            &ck,
            &asked,
            &["embed_dim".into(), "num_layers".into()],
            "run.toml",
            &|k| format!("--{}", k.replace('_', "-")),
            Path::new("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--embed-dim: 16 (the checkpoint has 8)"), "{e}");
        assert!(e.contains("--num-layers: 7"), "{e}");
    }
}
