//! `asa smoke`: a tiny model, one optimizer step through the training engine on dummy data
//! with shifted next-token targets, across the feature toggles; checks that the loss and the
//! gradient are finite, that the step changed the weights and that the updated model's logits
//! have their shape and are finite.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelConfig, Variant};
use crate::engine::{Engine, StepBatch};
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::optim::{AdamW, AdamWConfig};

/// One configuration's result.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeCase {
    pub name: String,
    pub logits_shape: Vec<usize>,
    pub loss: f64,
    pub grad_norm: f64,
    pub all_finite: bool,
    pub weights_changed: bool,
    pub ok: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmokeSummary {
    pub ok: bool,
    pub seed: u64,
    pub device: String,
    pub cases: Vec<SmokeCase>,
}

/// The tiny config used by the smoke test.
pub fn tiny_config(seed: u64) -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        max_seq_len: 32,
        embed_dim: 32,
        num_layers: 2,
        num_heads: 4,
        num_slots: 8,
        slotspace_dim: 8,
        write_chunk_size: 8,
        slotspace_chunk_size: 8,
        dropout: 0.1,
        slot_dropout: 0.05,
        slotspace_dropout: 0.05,
        seed,
        ..Default::default()
    }
}

fn run_case(name: &str, cfg: &ModelConfig, seed: u64) -> Result<SmokeCase> {
    let (b, t) = (2, 24);
    let (lm, params) = Lm::new(cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // dummy data: random tokens; targets are the inputs shifted by one (next token)
    let stream: Vec<u32> = (0..b * (t + 1))
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let mut ids = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for r in 0..b {
        let row = &stream[r * (t + 1)..(r + 1) * (t + 1)];
        ids.extend_from_slice(&row[..t]);
        targets.extend(row[1..].iter().map(|&x| x as i64));
    }
    let adam = AdamW::new(
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
        &params,
    );
    let before = params.data.clone();
    // one step through the training engine (dropouts on), then an eval-mode forward of the
    // updated model
    let mut engine = Engine::on_cpu(lm, params, adam);
    let (loss, grad_norm) = engine.step(StepBatch::whole(&ids, &targets, b, t), 1e-3, Some(1.0))?;
    let logits = engine.logits(&ids, b, t)?;
    let params = engine.params()?;

    let mut problems = Vec::new();
    let logits_shape = vec![b, t, cfg.vocab_size];
    if logits.len() != b * t * cfg.vocab_size {
        problems.push(format!(
            "logits have {} values, expected {:?}",
            logits.len(),
            logits_shape
        ));
    }
    let mut all_finite = loss.is_finite() && grad_norm.is_finite();
    if !grad_norm.is_finite() {
        problems.push(format!(
            "the gradient is not finite (global norm {grad_norm})"
        ));
    }
    if !logits.iter().all(|x| x.is_finite()) {
        all_finite = false;
        problems.push("logits are not finite after the step".into());
    }
    for (name, p) in params.names.iter().zip(&params.data) {
        if !p.iter().all(|x| x.is_finite()) {
            all_finite = false;
            problems.push(format!("{name} is not finite after the step"));
        }
    }
    if !all_finite && problems.is_empty() {
        problems.push("the loss is not finite".into());
    }
    let weights_changed = before.iter().zip(&params.data).any(|(a, b)| a != b);
    if !weights_changed {
        problems.push("the optimizer step changed no weight".into());
    }
    let ok = problems.is_empty();
    Ok(SmokeCase {
        name: name.into(),
        logits_shape,
        loss,
        grad_norm,
        all_finite,
        weights_changed,
        ok,
        problems,
    })
}

/// Runs every toggle combination and writes `smoke.json` to `outdir`.
pub fn run_smoke(seed: u64, outdir: &Path, device: &str) -> Result<SmokeSummary> {
    let base = tiny_config(seed);
    let mut cases = Vec::new();
    for content in [true, false] {
        for refine in [true, false] {
            let cfg = ModelConfig {
                use_content_read: content,
                use_slotspace_refine: refine,
                ..base.clone()
            };
            let name = format!("content_read={content},slotspace_refine={refine}");
            cases.push(run_case(&name, &cfg, seed)?);
        }
    }
    for variant in [Variant::Online, Variant::Intervene] {
        let cfg = ModelConfig {
            variant,
            ..base.clone()
        };
        cases.push(run_case(
            &format!("variant={variant:?}").to_lowercase(),
            &cfg,
            seed,
        )?);
    }
    let summary = SmokeSummary {
        ok: cases.iter().all(|c| c.ok),
        seed,
        device: device.into(),
        cases,
    };
    crate::error::ensure_dir(outdir)?;
    let text =
        serde_json::to_string_pretty(&summary).map_err(|e| AsaError::Other(e.to_string()))?;
    // a report, not a checkpoint: the error says so
    crate::checkpoint::write_bytes_atomic(&outdir.join("smoke.json"), text.as_bytes()).map_err(
        |e| match e {
            AsaError::Checkpoint(m) => AsaError::Other(format!("cannot write smoke.json: {m}")),
            other => other,
        },
    )?;
    Ok(summary)
}
