//! One engine for a training step, on the CPU model (`model::lm`) or a GPU backend
//! (`backend::cuda::GpuLm`): `train`, `train-mini`, `bench`, `parity` and `smoke` run their
//! steps, validation losses and state through it.
//!
//! The engine owns the parameters and the AdamW state. On the CPU they are the model's; on a
//! GPU they live on the device, and [`Engine::params`] and [`Engine::state`] read them back
//! when the device has stepped since the last read, so a caller never sees stale weights.

use crate::backend::cuda::graph::GraphStats;
use crate::backend::cuda::{Backend, CudaBackend, GpuLm, Precision};
use crate::config::{ModelConfig, Place};
use crate::error::{AsaError, Result};
use crate::model::layer::AsaOptions;
use crate::model::lm::{Lm, LmCache};
use crate::model::params::ParamStore;
use crate::optim::{clip_grad_norm, global_norm, AdamW};

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

impl<'a> StepBatch<'a> {
    /// `rows` sequences of `seq_len` in one micro-batch.
    pub fn whole(inputs: &'a [u32], targets: &'a [i64], rows: usize, seq_len: usize) -> Self {
        StepBatch {
            inputs,
            targets,
            rows,
            seq_len,
            micro_rows: rows,
        }
    }
}

/// Where the step runs.
enum Model<B: Backend> {
    /// the CPU reference path, with its activations and gradients
    Cpu {
        lm: Box<Lm>,
        cache: Box<LmCache>,
        grads: ParamStore,
    },
    /// a GPU backend (the weights and AdamW state on the device); whether the host's copies of
    /// the parameters and of the AdamW state are current
    Gpu {
        lm: Box<GpuLm<B>>,
        params_current: bool,
        adam_current: bool,
    },
}

/// The training engine: the model at its place, its parameters and AdamW state (none in an
/// evaluation engine, [`Engine::for_eval`]).
pub struct Engine<B: Backend = CudaBackend> {
    model: Model<B>,
    params: ParamStore,
    adam: Option<AdamW>,
    /// dropouts on in [`Engine::step`] (off: eval-mode forwards, as the fixtures train)
    dropout: bool,
    /// options of the eval-mode forwards ([`Engine::eval_loss`], [`Engine::logits`]): the
    /// forward controls of `asa eval` (default: the model's own routing)
    controls: AsaOptions,
}

impl Engine {
    /// The model of `cfg` with `params` and the AdamW state `adam` (its settings are the
    /// steps', its moments and step count the state to resume from) at `place` (`precision`:
    /// the GPU's GEMM precision).
    pub fn new(
        cfg: &ModelConfig,
        params: ParamStore,
        adam: AdamW,
        place: Place,
        precision: Precision,
    ) -> Result<Self> {
        if place.is_cuda() {
            let lm = GpuLm::new(cfg, &params, precision)?;
            Engine::on_gpu(lm, params, adam)
        } else {
            let (lm, _) = Lm::new(cfg)?;
            Ok(Engine::on_cpu(lm, params, adam))
        }
    }

    /// The CPU model `lm` (with its intervention, if any) with `params` and the AdamW state
    /// `adam`.
    pub fn on_cpu(lm: Lm, params: ParamStore, adam: AdamW) -> Self {
        Engine {
            model: Model::Cpu {
                lm: Box::new(lm),
                cache: Box::default(),
                grads: params.zeros_like(),
            },
            params,
            adam: Some(adam),
            dropout: true,
            controls: AsaOptions::default(),
        }
    }

    /// An engine that only evaluates (no gradients, no optimizer state; [`Engine::step`]
    /// refuses): the CPU model `lm` with `params`, or the same model on the GPU at `place`.
    pub fn for_eval(
        lm: Lm,
        params: ParamStore,
        place: Place,
        precision: Precision,
    ) -> Result<Self> {
        let model = if place.is_cuda() {
            let mut lm = lm;
            let mut gl = GpuLm::new(&lm.cfg, &params, precision)?;
            // the CPU model's generator (its seed: routing noise draws the same values)
            gl.set_rng(lm.rng_mut().clone());
            Model::Gpu {
                lm: Box::new(gl),
                params_current: true,
                adam_current: true,
            }
        } else {
            Model::Cpu {
                lm: Box::new(lm),
                cache: Box::default(),
                grads: ParamStore::default(),
            }
        };
        Ok(Engine {
            model,
            params,
            adam: None,
            dropout: false,
            controls: AsaOptions::default(),
        })
    }

    /// Runs the eval-mode forwards with `opts` (routing mode, noise, slot mask; checked against
    /// the model; routing noise is drawn from the model's generator on either device).
    pub fn set_controls(&mut self, opts: AsaOptions) -> Result<()> {
        let cfg = match &self.model {
            Model::Cpu { lm, .. } => lm.cfg.clone(),
            Model::Gpu { lm, .. } => lm.cfg.clone(),
        };
        crate::vocab::options::check_options(&cfg, &opts, 1, 1)?;
        self.controls = opts;
        Ok(())
    }

    /// Peak dense bf16 FLOP/s of the GPU, for MFU (None on the CPU or an unknown GPU).
    pub fn peak_flops(&self) -> Option<f64> {
        peak_bf16_flops(&self.device_name()?)
    }

    /// "cpu", or "cuda (bf16 GEMMs)".
    pub fn name(&self) -> String {
        match &self.model {
            Model::Cpu { .. } => "cpu".into(),
            Model::Gpu { lm, .. } => format!("cuda ({:?} GEMMs)", lm.precision).to_lowercase(),
        }
    }

    /// The GPU's name (None on the CPU).
    pub fn device_name(&self) -> Option<String> {
        match &self.model {
            Model::Cpu { .. } => None,
            Model::Gpu { lm, .. } => Some(lm.backend().device_name.clone()),
        }
    }
}

impl<B: Backend> Engine<B> {
    /// The GPU model `lm` (made with `params`) with the AdamW state `adam`, on any backend (the
    /// tests' emulator too).
    pub fn on_gpu(mut lm: GpuLm<B>, params: ParamStore, adam: AdamW) -> Result<Self> {
        if adam.step > 0 {
            lm.set_adam_state(&adam.m, &adam.v, adam.step)?;
        }
        if adam.frozen.iter().any(|&f| f) {
            lm.set_frozen(&adam.frozen)?;
        }
        Ok(Engine {
            model: Model::Gpu {
                lm: Box::new(lm),
                params_current: true,
                adam_current: true,
            },
            params,
            adam: Some(adam),
            dropout: true,
            controls: AsaOptions::default(),
        })
    }

    /// Dropouts on (the default) or off (eval-mode forwards) in the steps that follow.
    pub fn set_dropout(&mut self, on: bool) {
        self.dropout = on;
    }

    /// How the GPU's steps used CUDA graphs (None on the CPU).
    pub fn graph_stats(&self) -> Option<GraphStats> {
        match &self.model {
            Model::Cpu { .. } => None,
            Model::Gpu { lm, .. } => Some(lm.graph_stats()),
        }
    }

    /// Seeds the dropout generator and moves it to a saved stream position.
    pub fn set_model_rng(&mut self, seed: u64, pos: u128) {
        match &mut self.model {
            Model::Cpu { lm, .. } => {
                lm.reseed(seed);
                lm.rng_mut().set_word_pos(pos);
            }
            Model::Gpu { lm, .. } => {
                lm.reseed(seed);
                lm.rng_mut().set_word_pos(pos);
            }
        }
    }

    /// The dropout generator's stream position (saved with a checkpoint).
    pub fn model_rng_pos(&mut self) -> u128 {
        match &mut self.model {
            Model::Cpu { lm, .. } => lm.rng_mut().get_word_pos(),
            Model::Gpu { lm, .. } => lm.rng_mut().get_word_pos(),
        }
    }

    /// One AdamW step at learning rate `lr` (the AdamW state's other settings), the gradient
    /// clipped to a global norm of `clip` (None: not clipped): each micro-batch's mean loss
    /// weighs `micro_rows / rows`. A non-finite loss or norm skips the update. Returns (loss,
    /// gradient norm before clipping).
    pub fn step(&mut self, batch: StepBatch, lr: f64, clip: Option<f64>) -> Result<(f64, f64)> {
        let StepBatch {
            inputs,
            targets,
            rows,
            seq_len: t,
            micro_rows: mb,
        } = batch;
        let training = self.dropout;
        let Some(adam) = self.adam.as_mut() else {
            return Err(AsaError::Other(
                "an evaluation engine has no optimizer state and cannot step".into(),
            ));
        };
        match &mut self.model {
            Model::Cpu { lm, cache, grads } => {
                let accum = rows / mb.max(1);
                let opts = AsaOptions {
                    training,
                    ..Default::default()
                };
                grads.zero();
                let mut loss = 0.0;
                // gradient accumulation: each micro-batch's mean loss weighs 1/accum
                for k in 0..accum {
                    let span = k * mb * t..(k + 1) * mb * t;
                    lm.forward(&self.params, &inputs[span.clone()], mb, t, &opts, cache)?;
                    loss += lm.loss(cache, &targets[span], None)? / accum as f64;
                    lm.backward(&self.params, cache, &opts, grads);
                }
                if accum > 1 {
                    let scale = 1.0 / accum as f32;
                    grads.data.iter_mut().flatten().for_each(|g| *g *= scale);
                }
                adam.drop_frozen_grads(grads);
                let norm = match clip {
                    Some(c) => clip_grad_norm(grads, c),
                    None => global_norm(grads),
                };
                if loss.is_finite() && norm.is_finite() {
                    adam.step(&mut self.params, grads, lr);
                }
                Ok((loss, norm))
            }
            Model::Gpu {
                lm,
                params_current,
                adam_current,
            } => {
                let cfg = adam.cfg;
                let r = lm.train_step(inputs, targets, rows, t, mb, lr, &cfg, clip, training);
                // whatever the outcome, the device's state may have moved on
                *params_current = false;
                *adam_current = false;
                r
            }
        }
    }

    /// Mean loss of an eval-mode forward of `rows` sequences of `seq_len` (validation).
    pub fn eval_loss(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        rows: usize,
        seq_len: usize,
    ) -> Result<f64> {
        match &mut self.model {
            Model::Cpu { lm, cache, .. } => {
                lm.forward(&self.params, inputs, rows, seq_len, &self.controls, cache)?;
                lm.loss(cache, targets, None)
            }
            Model::Gpu { lm, .. } => {
                lm.eval_loss_opts(inputs, targets, rows, seq_len, &self.controls)
            }
        }
    }

    /// Logits [rows, seq_len, V] of an eval-mode forward.
    pub fn logits(&mut self, inputs: &[u32], rows: usize, seq_len: usize) -> Result<Vec<f32>> {
        let opts = self.controls.clone();
        match &mut self.model {
            Model::Cpu { lm, cache, .. } => {
                lm.forward(&self.params, inputs, rows, seq_len, &opts, cache)?;
                Ok(cache.logits.clone())
            }
            Model::Gpu { lm, .. } => lm.forward_logits_opts(inputs, rows, seq_len, &opts),
        }
    }

    /// The parameters as they are now (read back from the GPU when it has stepped since).
    pub fn params(&mut self) -> Result<&ParamStore> {
        if let Model::Gpu {
            lm, params_current, ..
        } = &mut self.model
        {
            if !*params_current {
                self.params = lm.download_params()?;
                *params_current = true;
            }
        }
        Ok(&self.params)
    }

    /// The parameters and the AdamW state as they are now (a checkpoint's).
    pub fn state(&mut self) -> Result<(&ParamStore, &AdamW)> {
        self.params()?;
        let Some(adam) = self.adam.as_mut() else {
            return Err(AsaError::Other(
                "an evaluation engine has no optimizer state".into(),
            ));
        };
        if let Model::Gpu {
            lm, adam_current, ..
        } = &mut self.model
        {
            if !*adam_current {
                if let Some((m, v, step)) = lm.adam_state()? {
                    adam.m = m;
                    adam.v = v;
                    adam.step = step;
                }
                *adam_current = true;
            }
        }
        Ok((&self.params, adam))
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
