//! `asa smoke`: a tiny model, one forward and one optimizer step on dummy data with shifted
//! next-token targets, across the feature toggles; checks shapes and that every output and
//! gradient is finite and that the step changed the weights.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::model::asa::AsaOptions;
use crate::model::lm::{Lm, LmCache};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};

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
    let (mut lm, mut params) = Lm::new(cfg)?;
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
    let opts = AsaOptions {
        training: true,
        ..Default::default()
    };
    let mut cache = LmCache::default();
    lm.forward(&params, &ids, b, t, &opts, &mut cache)?;
    let loss = lm.loss(&mut cache, &targets, None)?;
    let mut grads = params.zeros_like();
    lm.backward(&params, &mut cache, &opts, &mut grads);
    let grad_norm = clip_grad_norm(&mut grads, 1.0);
    let before = params.data.clone();
    let mut adam = AdamW::new(
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
        &params,
    );
    adam.step(&mut params, &grads, 1e-3);

    let mut problems = Vec::new();
    let logits_shape = vec![b, t, cfg.vocab_size];
    if cache.logits.len() != b * t * cfg.vocab_size {
        problems.push(format!(
            "logits have {} values, expected {:?}",
            cache.logits.len(),
            logits_shape
        ));
    }
    let mut all_finite =
        loss.is_finite() && grad_norm.is_finite() && cache.logits.iter().all(|x| x.is_finite());
    for (name, g) in grads.names.iter().zip(&grads.data) {
        if !g.iter().all(|x| x.is_finite()) {
            all_finite = false;
            problems.push(format!("gradient of {name} is not finite"));
        }
    }
    for (name, p) in params.names.iter().zip(&params.data) {
        if !p.iter().all(|x| x.is_finite()) {
            all_finite = false;
            problems.push(format!("{name} is not finite after the step"));
        }
    }
    if !all_finite && problems.is_empty() {
        problems.push("loss, gradient norm or logits are not finite".into());
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
