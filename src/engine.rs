//! One engine for a training step, on the CPU model (`model::lm`) or the CUDA backend
//! (`backend::cuda::GpuLm`): `train`, `train-mini` and `bench` run their steps, validation
//! losses and state through it.
//!
//! On the CPU the host's parameters and AdamW state are the model's; on the GPU they live on
//! the device, and [`Engine::sync_to_host`] copies them back (before a checkpoint).

use crate::backend::cuda::graph::GraphStats;
use crate::backend::cuda::{GpuLm, Precision};
use crate::config::{AdamWConfig, ModelConfig, Place};
use crate::error::Result;
use crate::model::asa::AsaOptions;
use crate::model::lm::{Lm, LmCache};
use crate::model::params::ParamStore;
use crate::optim::{clip_grad_norm, AdamW};

/// One step's batch: `rows` sequences of `seq_len` inputs and next-token targets, run as
/// micro-batches of `micro_rows` (gradient accumulation when fewer than `rows`).
#[derive(Clone, Copy, Debug)]
pub struct StepBatch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [i64],
    pub rows: usize,
    pub seq_len: usize,
    pub micro_rows: usize,
}

/// Where the training step runs: the CPU reference path, or the CUDA backend (weights and
/// optimizer state on the device).
pub enum Engine {
    Cpu {
        lm: Box<Lm>,
        cache: Box<LmCache>,
        grads: ParamStore,
    },
    Cuda(Box<GpuLm>),
}

impl Engine {
    /// The model of `cfg` with `params` and the AdamW state of `adam` at `place` (`precision`:
    /// the GPU's GEMM precision).
    pub fn new(
        cfg: &ModelConfig,
        params: &ParamStore,
        adam: &AdamW,
        place: Place,
        precision: Precision,
    ) -> Result<Self> {
        if place.is_cuda() {
            let mut gpu = GpuLm::new(cfg, params, precision)?;
            if adam.step > 0 {
                gpu.set_adam_state(&adam.m, &adam.v, adam.step)?;
            }
            Ok(Engine::Cuda(Box::new(gpu)))
        } else {
            let (lm, _) = Lm::new(cfg)?;
            Ok(Engine::Cpu {
                lm: Box::new(lm),
                cache: Box::default(),
                grads: params.zeros_like(),
            })
        }
    }

    /// Peak dense bf16 FLOP/s of the GPU, for MFU (None on the CPU or an unknown GPU).
    pub fn peak_flops(&self) -> Option<f64> {
        match self {
            Engine::Cpu { .. } => None,
            Engine::Cuda(g) => peak_bf16_flops(&g.backend().device_name),
        }
    }

    /// "cpu", or "cuda (bf16 GEMMs)".
    pub fn name(&self) -> String {
        match self {
            Engine::Cpu { .. } => "cpu".into(),
            Engine::Cuda(g) => format!("cuda ({:?} GEMMs)", g.precision).to_lowercase(),
        }
    }

    /// The GPU's name (None on the CPU).
    pub fn device_name(&self) -> Option<String> {
        match self {
            Engine::Cpu { .. } => None,
            Engine::Cuda(g) => Some(g.backend().device_name.clone()),
        }
    }

    /// How the GPU's steps used CUDA graphs (None on the CPU).
    pub fn graph_stats(&self) -> Option<GraphStats> {
        match self {
            Engine::Cpu { .. } => None,
            Engine::Cuda(g) => Some(g.graph_stats()),
        }
    }

    /// Seeds the dropout generator and moves it to a saved stream position.
    pub fn set_model_rng(&mut self, seed: u64, pos: u128) {
        match self {
            Engine::Cpu { lm, .. } => {
                lm.reseed(seed);
                lm.rng_mut().set_word_pos(pos);
            }
            Engine::Cuda(g) => {
                g.reseed(seed);
                g.rng_mut().set_word_pos(pos);
            }
        }
    }

    /// The dropout generator's stream position (saved with a checkpoint).
    pub fn model_rng_pos(&mut self) -> u128 {
        match self {
            Engine::Cpu { lm, .. } => lm.rng_mut().get_word_pos(),
            Engine::Cuda(g) => g.rng_mut().get_word_pos(),
        }
    }

    /// One optimizer step (dropouts on) at learning rate `lr` with `adam_cfg`'s other settings
    /// (the GPU's; the CPU's `adam` carries its own) and the gradient clipped to a global norm
    /// of `clip`: each micro-batch's mean loss weighs `micro_rows / rows`. A non-finite loss or
    /// norm skips the update. Returns (loss, gradient norm before clipping).
    pub fn step(
        &mut self,
        params: &mut ParamStore,
        adam: &mut AdamW,
        batch: StepBatch,
        lr: f64,
        adam_cfg: &AdamWConfig,
        clip: f64,
    ) -> Result<(f64, f64)> {
        let StepBatch {
            inputs,
            targets,
            rows,
            seq_len: t,
            micro_rows: mb,
        } = batch;
        match self {
            Engine::Cpu { lm, cache, grads } => {
                let accum = rows / mb.max(1);
                let opts = AsaOptions {
                    training: true,
                    ..Default::default()
                };
                grads.zero();
                let mut loss = 0.0;
                // gradient accumulation: each micro-batch's mean loss weighs 1/accum
                for k in 0..accum {
                    let span = k * mb * t..(k + 1) * mb * t;
                    lm.forward(params, &inputs[span.clone()], mb, t, &opts, cache)?;
                    loss += lm.loss(cache, &targets[span], None)? / accum as f64;
                    lm.backward(params, cache, &opts, grads);
                }
                if accum > 1 {
                    let scale = 1.0 / accum as f32;
                    grads.data.iter_mut().flatten().for_each(|g| *g *= scale);
                }
                let norm = clip_grad_norm(grads, clip);
                if loss.is_finite() && norm.is_finite() {
                    adam.step(params, grads, lr);
                }
                Ok((loss, norm))
            }
            Engine::Cuda(g) => {
                g.train_step_accum(inputs, targets, rows, t, mb, lr, adam_cfg, Some(clip), true)
            }
        }
    }

    /// Mean loss of an eval-mode forward of `rows` sequences of `seq_len` (validation).
    pub fn eval_loss(
        &mut self,
        params: &ParamStore,
        inputs: &[u32],
        targets: &[i64],
        rows: usize,
        seq_len: usize,
    ) -> Result<f64> {
        match self {
            Engine::Cpu { lm, cache, .. } => {
                lm.forward(params, inputs, rows, seq_len, &AsaOptions::default(), cache)?;
                lm.loss(cache, targets, None)
            }
            Engine::Cuda(g) => g.eval_loss(inputs, targets, rows, seq_len),
        }
    }

    /// The parameters as they are now: the host's on the CPU, downloaded on the GPU.
    pub fn params_view(&mut self, host: &ParamStore) -> Result<ParamStore> {
        match self {
            Engine::Cpu { .. } => Ok(host.clone()),
            Engine::Cuda(g) => g.download_params(),
        }
    }

    /// Copies device weights and optimizer state to the host (before a checkpoint).
    pub fn sync_to_host(&mut self, params: &mut ParamStore, adam: &mut AdamW) -> Result<()> {
        if let Engine::Cuda(g) = self {
            *params = g.download_params()?;
            if let Some((m, v, step)) = g.adam_state()? {
                adam.m = m;
                adam.v = v;
                adam.step = step;
            }
        }
        Ok(())
    }
}

/// Model FLOPs per token of one training step (forward + backward = 3 x forward; a
/// multiply-add counts 2), an estimate that counts the matrix products only:
/// ```text
/// per layer:  8 C^2                      Wk_write, Wv_write, Wq_read, out_proj
///           + 4 C hid                    MLP
///           + 10 K C                     write logits, write scan, read logits, content read,
///                                        slot mix (2 K d each, per head)
///           + H (4 K M + 10 M^2) + 2 K C slotspace refine (slot_in, slot_out, q/k/v, linear
///                                        attention state and read, second slot mix)
/// head:       2 C V
/// ```
/// Embedding lookups, norms, softmaxes and other elementwise work are not counted.
pub fn train_flops_per_token(cfg: &ModelConfig) -> f64 {
    let c = cfg.embed_dim as f64;
    let hid = cfg.hidden_dim() as f64;
    let k = cfg.num_slots as f64;
    let h = cfg.num_heads as f64;
    let m = cfg.slotspace_dim as f64;
    let mut layer = 8.0 * c * c + 4.0 * c * hid + 10.0 * k * c;
    if cfg.use_slotspace_refine {
        layer += h * (4.0 * k * m + 10.0 * m * m) + 2.0 * k * c;
    }
    let fwd = cfg.num_layers as f64 * layer + 2.0 * c * cfg.vocab_size as f64;
    3.0 * fwd
}

/// Dense bf16 tensor-core peak (FLOP/s, no sparsity) of a GPU known by name.
pub fn peak_bf16_flops(device_name: &str) -> Option<f64> {
    let n = device_name.to_ascii_uppercase();
    if n.contains("H200") || n.contains("GH200") {
        Some(989e12)
    } else if n.contains("H100") {
        // the PCIe card runs at a lower clock with fewer SMs
        Some(if n.contains("PCIE") { 756e12 } else { 989e12 })
    } else if n.contains("A100") {
        Some(312e12)
    } else {
        None
    }
}
