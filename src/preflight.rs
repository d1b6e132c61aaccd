//! Memory preflight: before a run allocates anything, estimate what it will hold and refuse
//! clearly when that cannot fit, instead of an allocation abort ("memory allocation of N bytes
//! failed") or a machine swapping itself to death.
//!
//! The estimate counts the buffers this implementation allocates, all f32:
//! - parameters, gradients and the two AdamW moments (P floats each); a gradient-accumulation
//!   sum on the GPU; on the GPU path the host keeps the parameters, a template copy and the
//!   AdamW moments as well, and the device a bf16 copy of the parameters (P/2 floats);
//! - activations: the per-token, per-layer buffers of `BlockCache` + `AsaCache` (model/lm.rs,
//!   model/layer.rs; on the GPU those of backend/cuda/layer.rs and lm.rs, which keep the serial scan's
//!   state), times B*T*L, plus one layer's worth of backward temporaries;
//! - the [B*T, V] logits and softmax buffers (on the GPU, the fused classifier's capped block).
//!
//! The figures are within 2x of the peak resident size (they leave out allocator slack and
//! small per-call buffers, and count a few caches that some configs leave empty); the check
//! refuses only when the estimate exceeds what is available, so a run it lets through may still
//! be tight, and one it refuses needed at least about half the estimate.

use crate::config::{param_count, size_overflow, ModelConfig, Place};
use crate::error::{AsaError, Result};
pub use crate::host::{host_available, human};

const F32: u64 = 4;
/// Floats of the fused classifier's logits block on the GPU (`GpuLm::logits_budget`).
const GPU_LOGITS_BUDGET: u64 = 1 << 25;

/// Floats of activations kept per token and per layer for the backward: the GPU caches
/// (backend/cuda/layer.rs, lm.rs) with `cuda`, else the CPU's `BlockCache` + `AsaCache`.
pub fn floats_per_token_layer(cfg: &ModelConfig, place: Place) -> Option<u64> {
    if place.is_cuda() {
        gpu_floats_per_token_layer(cfg)
    } else {
        cpu_floats_per_token_layer(cfg)
    }
}

/// (C, H, K, M, hidden) of `cfg`, as u64.
fn cache_dims(cfg: &ModelConfig) -> (u64, u64, u64, u64, u64) {
    let u = |x: usize| x as u64;
    (
        u(cfg.embed_dim),
        u(cfg.num_heads),
        u(cfg.num_slots),
        u(cfg.slotspace_dim),
        u(cfg.hidden_dim()),
    )
}

/// The CPU caches (model/lm.rs, model/layer.rs) of a training step. Without dropout no mask or
/// dropped copy is kept; the chunk form keeps one `[K, d]` carry per write chunk instead of the
/// `[K, d]` state of every position (the intervene variant still runs the serial scan).
fn cpu_floats_per_token_layer(cfg: &ModelConfig) -> Option<u64> {
    let (c, h, k, m, hid) = cache_dims(cfg);
    let hk = h.checked_mul(k)?;
    // block: x, x1, ln2 (3 C); h, g (2 hid); 4 LayerNorm statistics; with dropout gd, gmask
    // (2 hid) and the residual mask (C)
    let mut block = c
        .checked_mul(3)?
        .checked_add(hid.checked_mul(2)?)?
        .checked_add(4)?;
    if cfg.dropout > 0.0 {
        block = block.checked_add(hid.checked_mul(2)?)?.checked_add(c)?;
    }
    // attention: x, k_n, k_r, v_h, q_h, merged (6 C), k_norm (H); raw, wl, den, rmax, alpha, E,
    // lkey, lcont, logits, noisy, rw (11 [H,K]); the chunk carries; with dropout its mask (C)
    let mut attn = c
        .checked_mul(6)?
        .checked_add(h)?
        .checked_add(hk.checked_mul(11)?)?;
    if cfg.variant == crate::config::Variant::Intervene {
        // the serial scan's state history [K, d] per head, and out1
        attn = attn.checked_add(k.checked_mul(c)?)?.checked_add(c)?;
    } else {
        attn = attn.checked_add(
            k.checked_mul(c)?
                .div_ceil(cfg.write_chunk_size.max(1) as u64),
        )?;
    }
    if cfg.dropout > 0.0 {
        attn = attn.checked_add(c)?;
    }
    if cfg.use_slotspace_refine {
        // u, qs, ks, qf, kf, vs, u2 ([H,M] each), z, sw, sw_pre ([H,K] each), den (H); with its
        // dropout u2d and the mask
        attn = attn
            .checked_add(h.checked_mul(m)?.checked_mul(7)?)?
            .checked_add(hk.checked_mul(3)?)?
            .checked_add(h)?;
        if cfg.slotspace_dropout > 0.0 {
            attn = attn.checked_add(h.checked_mul(m)?.checked_mul(2)?)?;
        }
        if cfg.variant == crate::config::Variant::Intervene {
            attn = attn.checked_add(c)?; // delta
        }
    }
    block.checked_add(attn)
}

/// The GPU caches: the buffers of the serial scan's layer, the `[K, d]` state per head included.
fn gpu_floats_per_token_layer(cfg: &ModelConfig) -> Option<u64> {
    let (c, h, k, m, hid) = cache_dims(cfg);
    // block: x, ln1, attn_out, x1, ln2, m, md, mmask; h, g, gd, gmask; 4 LayerNorm statistics
    let block = c
        .checked_mul(8)?
        .checked_add(hid.checked_mul(4)?)?
        .checked_add(4)?;
    // attention: x, kp, vp, qp, k_h, k_n, k_r, v_h, q_h, out1, out_h, merged, proj, drop (14 C),
    // the slot state [K, d] per head (K*C), 9 [H,K] score buffers per token, k_norm
    let mut attn = c
        .checked_mul(14)?
        .checked_add(k.checked_mul(c)?)?
        .checked_add(h.checked_mul(k)?.checked_mul(9)?)?
        .checked_add(h)?;
    if cfg.use_slotspace_refine {
        // u, qs0, ks0, vs0, qs, ks, qf, kf, vs, u2, drop, u2d ([H,M] each), z, sw_pre, sw
        // ([H,K] each), delta (C), den (H)
        attn = attn
            .checked_add(h.checked_mul(m)?.checked_mul(12)?)?
            .checked_add(h.checked_mul(k)?.checked_mul(3)?)?
            .checked_add(c)?
            .checked_add(h)?;
    }
    block.checked_add(attn)
}

/// What a run of `cfg` on `batch` rows of `seq_len` tokens holds, by part.
#[derive(Debug, Clone)]
pub struct Estimate {
    pub params: u64,
    /// (what, bytes) on the host
    pub host: Vec<(String, u64)>,
    /// (what, bytes) on the GPU (empty on the CPU path)
    pub device: Vec<(String, u64)>,
}

impl Estimate {
    pub fn host_total(&self) -> u64 {
        self.host.iter().map(|(_, b)| b).sum()
    }
    pub fn device_total(&self) -> u64 {
        self.device.iter().map(|(_, b)| b).sum()
    }
}

fn parts_line(parts: &[(String, u64)]) -> String {
    parts
        .iter()
        .map(|(w, b)| format!("{w} {}", human(*b)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Estimates the memory of a training run (see the module doc for what is counted).
/// `accumulate`: gradient accumulation over micro-batches (a GPU sum buffer).
pub fn estimate(
    cfg: &ModelConfig,
    batch: usize,
    seq_len: usize,
    accumulate: bool,
    place: Place,
) -> Result<Estimate> {
    let of = || size_overflow(cfg);
    let p = param_count(cfg).ok_or_else(of)?;
    let pb = p.checked_mul(F32).ok_or_else(of)?;
    let tokens = (batch as u64).checked_mul(seq_len as u64).ok_or_else(of)?;
    let per_tl = floats_per_token_layer(cfg, place).ok_or_else(of)?;
    let layer_bytes = tokens
        .checked_mul(per_tl)
        .and_then(|x| x.checked_mul(F32))
        .ok_or_else(of)?;
    let c = cfg.embed_dim as u64;
    let acts = layer_bytes
        .checked_mul(cfg.num_layers as u64)
        // the backward's temporaries: about one layer's activations at a time
        .and_then(|x| x.checked_add(layer_bytes))
        // embeddings, dropout mask, final residual and LayerNorm: 5 C per token
        .and_then(|x| x.checked_add(tokens.checked_mul(5 * c + 3)?.checked_mul(F32)?))
        .ok_or_else(of)?;
    // logits and the softmax rows (turned into dlogits in place)
    let logits_full = tokens
        .checked_mul(cfg.vocab_size as u64)
        .and_then(|x| x.checked_mul(2 * F32))
        .ok_or_else(of)?;
    let shape = format!(
        "activations (B={batch} x T={seq_len}, {} layers)",
        cfg.num_layers
    );
    let mut e = Estimate {
        params: p,
        host: Vec::new(),
        device: Vec::new(),
    };
    if place.is_cuda() {
        e.host.push(("weights + template copy".into(), 2 * pb));
        e.host.push(("AdamW moments".into(), 2 * pb));
        e.device.push(("weights".into(), pb));
        // their bf16 copy (bf16 runs; counted always, it is small)
        e.device.push(("bf16 weight copy".into(), pb / 2));
        e.device.push(("gradients".into(), pb));
        e.device.push(("AdamW moments".into(), 2 * pb));
        if accumulate {
            e.device.push(("gradient sum".into(), pb));
        }
        e.device.push((shape, acts));
        let block = GPU_LOGITS_BUDGET * 2 * F32;
        e.device
            .push(("logits block".into(), logits_full.min(block)));
    } else {
        e.host.push(("weights".into(), pb));
        e.host.push(("gradients".into(), pb));
        e.host.push(("AdamW moments".into(), 2 * pb));
        e.host.push((shape, acts));
        e.host.push(("logits".into(), logits_full));
    }
    Ok(e)
}

/// The preflight of `train`, `train-mini` and `bench`: estimates the run and refuses, with the
/// estimate and what is available, when it cannot fit in host memory (MemAvailable) or, on the
/// GPU path (`cuda`), in the device's free memory (`device_free`, from the caller:
/// `backend::cuda::device_free_memory`; None: not known).
pub fn check_run(
    cfg: &ModelConfig,
    batch: usize,
    seq_len: usize,
    accumulate: bool,
    place: Place,
    device_free: Option<u64>,
) -> Result<Estimate> {
    cfg.validate()?;
    let e = estimate(cfg, batch, seq_len, accumulate, place)?;
    let advice = "lower batch_size / micro_batch_size, max_seq_len (seq-len) or the model sizes";
    if let Some(avail) = host_available() {
        if e.host_total() > avail {
            return Err(AsaError::Config(format!(
                "this run needs about {} of memory ({}; {} parameters) but {} is available (MemAvailable); {advice}",
                human(e.host_total()),
                parts_line(&e.host),
                e.params,
                human(avail)
            )));
        }
    }
    if place.is_cuda() {
        if let Some(free) = device_free {
            if e.device_total() > free {
                return Err(AsaError::Config(format!(
                    "this run needs about {} of GPU memory ({}; {} parameters) but the GPU has {} free; {advice}",
                    human(e.device_total()),
                    parts_line(&e.device),
                    e.params,
                    human(free)
                )));
            }
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::params::LmIds;

    fn small() -> ModelConfig {
        ModelConfig {
            vocab_size: 37,
            embed_dim: 16,
            num_layers: 2,
            num_heads: 2,
            num_slots: 3,
            slotspace_dim: 4,
            ..Default::default()
        }
    }

    #[test]
    fn param_count_matches_the_built_store() {
        for (tie, bias, abs, refine) in [
            (true, true, false, true),
            (false, false, true, false),
            (true, false, true, true),
        ] {
            let cfg = ModelConfig {
                tie_weights: tie,
                mlp_bias: Some(bias),
                use_abs_pos: abs,
                use_slotspace_refine: refine,
                ..small()
            };
            let (store, _) = LmIds::build(&cfg);
            assert_eq!(
                param_count(&cfg).unwrap(),
                store.num_elements() as u64,
                "tie {tie} bias {bias} abs {abs} refine {refine}"
            );
        }
    }

    #[test]
    fn huge_sizes_are_refused_without_allocating() {
        let wide = ModelConfig {
            embed_dim: 1 << 20,
            ..Default::default()
        };
        let e = wide.validate().unwrap_err().to_string();
        assert!(e.contains("parameters") && e.contains("available"), "{e}");
        let deep = ModelConfig {
            num_layers: 100_000,
            ..Default::default()
        };
        assert!(deep.validate().is_err());
        let overflowing = ModelConfig {
            embed_dim: 1 << 40,
            num_heads: 1,
            ..Default::default()
        };
        let e = overflowing.validate().unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
    }

    #[test]
    fn estimate_counts_activations_and_logits() {
        let cfg = small();
        let a = estimate(&cfg, 2, 8, false, Place::Cpu).unwrap();
        let b = estimate(&cfg, 4, 8, false, Place::Cpu).unwrap();
        // twice the tokens: the weight terms stay, the activation and logit terms double
        let fixed = 4 * 4 * param_count(&cfg).unwrap();
        assert_eq!(b.host_total() - fixed, 2 * (a.host_total() - fixed));
        let g = estimate(&cfg, 2, 8, true, Place::Cuda).unwrap();
        assert!(g.device_total() > 0 && g.device.iter().any(|(w, _)| w == "gradient sum"));
        // a practice-run step on the CPU needs tens of GiB (the slot state dominates)
        let pr = ModelConfig {
            max_seq_len: 1024,
            embed_dim: 768,
            num_layers: 27,
            num_heads: 8,
            num_slots: 16,
            write_chunk_size: 512,
            slotspace_chunk_size: 512,
            ..Default::default()
        };
        let e = estimate(&pr, 8, 1024, false, Place::Cpu).unwrap();
        assert!(e.host_total() > 20 << 30, "{}", human(e.host_total()));
    }
}
