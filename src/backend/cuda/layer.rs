//! The GPU ASA layer: `model::layer::AsaLayer`'s forward and backward composed from the CUDA
//! launchers in the order the CPU composes its ops (the comments name the CPU steps), with
//! the parameters' device layout (`GpuParams`), the call's options on the device (`DevOpts`),
//! the random draws of a training step (`StepDraws`) and `GpuLayerRunner` (one layer on its
//! own, the layer fixtures' setting). The language model around it is `super::lm`.
//!
//! Side by side with `model/layer.rs`: `GpuAsaLayer::new`, `dims`, its parameter helpers,
//! `forward`, `slotspace_forward`, `backward`, as `AsaLayer`'s (the intervene variant's
//! forward and backward are in `super::intervene`).
//!
//! Parameters, gradients and the AdamW moments are flat f32 device buffers with one range per
//! parameter (the `ParamStore` order). Scalar parameters (ALiBi strength, content gamma, refine
//! gate) are also mirrored on the host after each update, so the kernels get them by value.
//!
//! Precision: `F32` runs everything in f32 (f64 where the CPU twin accumulates in f64);
//! `Bf16` rounds the GEMM inputs to bf16 (f32 accumulation and outputs) and runs the slot
//! scan, the read, the linear attention and the slot keys' write gradient as tile products on
//! tensor cores (bf16 operands, f32 sums; `tensor_cores`); the other ops, the scan's
//! statistics, the master weights and the optimizer state stay f32 (or f64).
//!
//! Supported on the GPU: the baseline and online variants, every routing mode, routing noise in
//! eval-mode forwards (drawn on the host by the CPU twin's `RoutingNoise::draw` from the model's
//! generator, so a GPU forward adds the same noise as the CPU's with the same seed), slot masks,
//! attention masks, dropout / slot dropout / slotspace dropout (counter-based RNG: reproducible
//! per seed, not the CPU's stream), the intervene variant (`super::intervene`).
//! Info tensors (`return_info`): `GpuAsaLayer::info` downloads the call's buffers and assembles
//! them with the CPU layer's own `vocab::info::assemble` (such a forward runs unfused, as the CPU
//! runs its serial scan for them). Not supported (a clear `AsaError`): routing noise in training
//! forwards.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ops::{DevRouting, DevSlotMask, Learned};
use super::{AsDv, Backend, CudaBackend, Dv, Temp};
pub use crate::config::Precision;
use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::vocab::dims::SlotDims;
use crate::vocab::options::ReadMask;
use crate::vocab::options::{AsaOptions, Info, Intervention, RoutingMode, SlotMaskWhere};
use crate::vocab::params::{sigmoid, softplus, AsaIds, ParamId, ParamStore};

// ------------------------------------------------------------------------------------------------
// buffers

/// An f32 activation buffer of a layer cache.
pub(super) type DBuf = super::DevBuf<f32>;

/// The bf16 twin of an activation that bf16 GEMMs read: written by the activation's producer
/// beside the f32 tensor, kept with it (issue 11: no conversion call per GEMM operand). Null
/// unless the device's GEMMs convert operands and its twins are on ([`Device::bf16_twins`]).
#[derive(Default)]
pub(super) struct Twin {
    pub(super) s: Option<Temp<u16>>,
    pub(super) n: usize,
}

impl Twin {
    /// The twin of `x` (reallocated to its length), registered with the device until the next
    /// forward clears the registry: for activations that nothing writes again before then.
    pub(super) fn of<B: Backend>(&mut self, be: &B, x: Dv<f32>) -> Result<Dv<u16>> {
        let d = self.scoped(be, x.len)?;
        if !d.is_null() {
            be.add_bf16_twin(x, d);
        }
        Ok(d)
    }
    /// [`Twin::of`] for an activation whose producer writes no twin (a GEMM's output): `x`
    /// converted once, here, for the forward's and the backward's GEMMs that read it.
    pub(super) fn converted<B: Backend>(&mut self, be: &B, x: Dv<f32>) -> Result<()> {
        let d = self.of(be, x)?;
        if !d.is_null() {
            be.convert_f32_bf16(d, x)?;
        }
        Ok(())
    }
    /// A twin of `n` elements, not registered: for gradients, which a producer writes and
    /// [`Ops::with_bf16_twin`] hands to the GEMMs that read them.
    pub(super) fn scoped<B: Backend>(&mut self, be: &B, n: usize) -> Result<Dv<u16>> {
        if !be.bf16_twins() || n == 0 {
            return Ok(Dv::null());
        }
        if self.s.is_none() || self.n != n {
            self.s = Some(be.temp_uninit::<u16>(n)?);
            self.n = n;
        }
        Ok(self.s.as_ref().expect("allocated above").dv().sub(0, n))
    }
}

/// A LayerNorm's output buffers: out, its bf16 twin, mean, rstd.
pub(super) type NormBufs<'a> = (&'a mut DBuf, &'a mut Twin, &'a mut DBuf, &'a mut DBuf);

/// A LayerNorm's outputs: (out, mean, rstd) and out's bf16 twin.
type NormOut = ((Dv<f32>, Dv<f32>, Dv<f32>), Dv<u16>);

/// A LayerNorm's outputs sized for `n` rows of `c`.
pub(super) fn norm_out<B: Backend>(
    be: &B,
    (out, twin, mean, rstd): NormBufs,
    n: usize,
    c: usize,
) -> Result<NormOut> {
    let o = out.ensure(be, n * c)?;
    let o16 = twin.of(be, o)?;
    Ok(((o, mean.ensure(be, n)?, rstd.ensure(be, n)?), o16))
}

/// A temporary zeroed buffer (freed, stream-ordered, when dropped).
pub(super) fn tmp<B: Backend>(be: &B, n: usize) -> Result<(Temp<f32>, Dv<f32>)> {
    let s = be.temp::<f32>(n)?;
    let d = s.dv().sub(0, n);
    Ok((s, d))
}

/// [`tmp`] with unspecified contents, for a buffer its first kernel writes whole (no memset).
pub(super) fn tmp_uninit<B: Backend>(be: &B, n: usize) -> Result<(Temp<f32>, Dv<f32>)> {
    let s = be.temp_uninit::<f32>(n)?;
    let d = s.dv().sub(0, n);
    Ok((s, d))
}

/// Flat layout of a `ParamStore`: one range per parameter, each starting at a multiple of
/// [`Layout::ALIGN`] elements (the gaps hold zeros, whose gradients and AdamW moments stay zero),
/// so that every weight's bf16 copy is 16-byte aligned for cuBLAS.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) offs: Vec<usize>,
    pub(super) lens: Vec<usize>,
    pub(super) total: usize,
}

impl Layout {
    pub(super) fn of(p: &ParamStore) -> Self {
        let mut offs = Vec::with_capacity(p.len());
        let mut lens = Vec::with_capacity(p.len());
        let mut total = 0;
        for d in &p.data {
            offs.push(total);
            lens.push(d.len());
            total = (total + d.len()).div_ceil(Self::ALIGN) * Self::ALIGN;
        }
        Layout { offs, lens, total }
    }
    const ALIGN: usize = 8;
    /// The flat buffer of `p` [total], gaps zero.
    pub(super) fn flatten(&self, p: &ParamStore) -> Vec<f32> {
        let mut flat = vec![0.0; self.total];
        for (i, d) in p.data.iter().enumerate() {
            flat[self.offs[i]..self.offs[i] + d.len()].copy_from_slice(d);
        }
        flat
    }
    pub(super) fn range(&self, base: Dv<f32>, id: ParamId) -> Dv<f32> {
        base.sub(self.offs[id], self.lens[id])
    }
    /// One range over the parameters `ids` when they lie back to back in that order (no
    /// alignment gap between them), e.g. the three projections of a fused QKV GEMM.
    pub(super) fn span(&self, base: Dv<f32>, ids: &[ParamId]) -> Option<Dv<f32>> {
        let adjacent = ids
            .windows(2)
            .all(|w| self.offs[w[1]] == self.offs[w[0]] + self.lens[w[0]]);
        let len = ids.iter().map(|&i| self.lens[i]).sum();
        (adjacent && !ids.is_empty()).then(|| base.sub(self.offs[ids[0]], len))
    }
}

/// Parameters on the device: the flat buffer, its layout and host copies of the scalar params.
pub(super) struct GpuParams {
    pub(super) data: Temp<f32>,
    pub(super) layout: Layout,
    /// host values of the 1-element parameters (others: NaN), refreshed after updates
    pub(super) scalars: Vec<f32>,
    /// the 1-element parameters (gathered for the download that ends a step)
    pub(super) scalar_ids: Vec<ParamId>,
    /// bf16 GEMMs: the weights rounded to bf16 [total], registered with the device and
    /// written by AdamW with the weights (after the upload: converted), so that no GEMM
    /// converts a weight
    pub(super) bf16: Option<Temp<u16>>,
}

impl GpuParams {
    pub(super) fn upload<B: Backend>(be: &B, p: &ParamStore) -> Result<Self> {
        let layout = Layout::of(p);
        let flat = layout.flatten(p);
        let data = be.temp::<f32>(layout.total)?;
        be.upload_into(data.dv(), &flat)?;
        let scalars = p
            .data
            .iter()
            .map(|d| if d.len() == 1 { d[0] } else { f32::NAN })
            .collect();
        let scalar_ids: Vec<ParamId> = (0..layout.lens.len())
            .filter(|&id| layout.lens[id] == 1)
            .collect();
        let mut gp = GpuParams {
            scalar_ids,
            data,
            layout,
            scalars,
            bf16: None,
        };
        if super::ops::bf16_converted(be) {
            let copy = be.temp::<u16>(gp.layout.total)?;
            be.set_bf16_copy(gp.all(), copy.dv());
            gp.bf16 = Some(copy);
            gp.refresh_bf16(be)?;
        }
        Ok(gp)
    }
    /// Every weight [total].
    pub(super) fn all(&self) -> Dv<f32> {
        self.data.dv().sub(0, self.layout.total)
    }
    /// The bf16 copy after the upload of the weights (one conversion of them all).
    fn refresh_bf16<B: Backend>(&self, be: &B) -> Result<()> {
        match &self.bf16 {
            Some(c) => be.convert_f32_bf16(c.dv(), self.all()),
            None => Ok(()),
        }
    }
    pub(super) fn p(&self, id: ParamId) -> Dv<f32> {
        self.layout
            .range(self.data.dv().sub(0, self.layout.total), id)
    }
    pub(super) fn scalar(&self, id: ParamId) -> f32 {
        self.scalars[id]
    }
    /// Gathers the scalar parameters into `dst` [their number] by device copies, for the one
    /// download that ends a training step (was one download per scalar: 81 in the practice run).
    pub(super) fn gather_scalars<B: Backend>(&self, be: &B, dst: Dv<f32>) -> Result<()> {
        for (i, &id) in self.scalar_ids.iter().enumerate() {
            be.copy(dst.sub(i, 1), self.p(id))?;
        }
        Ok(())
    }
    /// The host copies of the scalar parameters, from what [`Self::gather_scalars`] gathered.
    pub(super) fn set_scalars(&mut self, vals: &[f32]) {
        for (&id, &v) in self.scalar_ids.iter().zip(vals) {
            self.scalars[id] = v;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// per-call options on the device

/// The forward options of one call, on the device.
pub(super) struct DevOpts {
    pub(super) valid: Option<Temp<u8>>,
    pub(super) routing: RoutingMode,
    pub(super) ext: Option<Temp<f32>>,
    pub(super) slot_mask: Option<(Temp<i32>, bool, SlotMaskWhere)>,
    pub(super) training: bool,
    /// routing noise of the call, and its values per layer [B,H,T,K] once drawn
    /// ([`DevOpts::draw_noise`])
    pub(super) noise: Option<crate::vocab::options::RoutingNoise>,
    pub(super) noise_values: Vec<Temp<f32>>,
    /// the info tensors are wanted: the layers run unfused (the state history is kept)
    pub(super) return_info: bool,
}

impl DevOpts {
    pub(super) fn new<B: Backend>(
        be: &B,
        cfg: &ModelConfig,
        opts: &AsaOptions,
        b: usize,
        t: usize,
    ) -> Result<Self> {
        if opts.noise.is_some() && opts.training {
            return Err(AsaError::Input(
                "routing noise on the GPU is for eval-mode forwards (analysis); train with it on the CPU".into(),
            ));
        }
        crate::vocab::options::check_options(cfg, opts, b, t)?;
        let valid = match &opts.attention_mask {
            Some(m) => Some(be.temp_from(&m.iter().map(|&x| x as u8).collect::<Vec<u8>>())?),
            None => None,
        };
        let ext = match &opts.routing {
            RoutingMode::External(w) | RoutingMode::Override(w) => Some(be.temp_from(w)?),
            _ => None,
        };
        let slot_mask = match &opts.slot_mask {
            Some(sm) => {
                let keep: Vec<i32> = sm.keep.keep.iter().map(|&k| k as i32).collect();
                Some((be.temp_from(&keep)?, sm.keep.last_pos_only, sm.where_))
            }
            None => None,
        };
        Ok(DevOpts {
            valid,
            routing: opts.routing.clone(),
            ext,
            slot_mask,
            training: opts.training,
            noise: opts.noise,
            noise_values: Vec::new(),
            return_info: opts.return_info,
        })
    }

    /// Draws the routing noise of `layers` layers ([B,H,T,K] = `n` values each, layer by layer
    /// from `rng`, as the CPU model draws it in an eval-mode forward) and uploads it; nothing
    /// without noise.
    pub(super) fn draw_noise<B: Backend>(
        &mut self,
        be: &B,
        rng: &mut ChaCha8Rng,
        layers: usize,
        n: usize,
    ) -> Result<()> {
        self.noise_values.clear();
        if let Some(nz) = self.noise {
            for _ in 0..layers {
                self.noise_values.push(be.temp_from(&nz.draw(rng, n))?);
            }
        }
        Ok(())
    }

    /// Layer `l`'s routing noise [B,H,T,K] (null without noise).
    pub(super) fn noise_of(&self, l: usize) -> Dv<f32> {
        match self.noise_values.get(l) {
            Some(v) => v.dv(),
            None => {
                assert!(self.noise.is_none(), "routing noise not drawn");
                Dv::null()
            }
        }
    }

    pub(super) fn valid(&self) -> Dv<u8> {
        self.valid.dv()
    }

    pub(super) fn routing(&self) -> DevRouting {
        match &self.routing {
            RoutingMode::Softmax => DevRouting::Softmax,
            RoutingMode::Top1 => DevRouting::Top1,
            RoutingMode::TopK(k) => DevRouting::TopK(*k),
            RoutingMode::External(_) => DevRouting::External(self.ext.dv()),
            RoutingMode::Override(_) => DevRouting::Override(self.ext.dv()),
        }
    }

    /// The slot mask of the read logits (`read` and `content_read_only`).
    pub(super) fn read_mask(&self) -> Option<DevSlotMask> {
        self.slot_mask.as_ref().and_then(|(keep, lpo, w)| match w {
            SlotMaskWhere::Read => Some(DevSlotMask {
                keep: keep.dv(),
                last_pos_only: *lpo,
                mode: ReadMask::Read,
            }),
            SlotMaskWhere::ContentReadOnly => Some(DevSlotMask {
                keep: keep.dv(),
                last_pos_only: *lpo,
                mode: ReadMask::ContentOnly,
            }),
            SlotMaskWhere::SlotspaceOnly => None,
        })
    }

    fn keep_where(&self, want: SlotMaskWhere) -> Option<(Dv<i32>, bool)> {
        self.slot_mask
            .as_ref()
            .filter(|(_, _, w)| *w == want)
            .map(|(k, l, _)| (k.dv(), *l))
    }
}

// ------------------------------------------------------------------------------------------------
// the ASA layer

/// RoPE tables on the device for one sequence length.
pub(super) struct DevRope {
    pub(super) t: usize,
    pub(super) cos: Temp<f32>,
    pub(super) sin: Temp<f32>,
}

impl DevRope {
    pub(super) fn ensure<B: Backend>(
        slot: &mut Option<DevRope>,
        be: &B,
        t: usize,
        dim: usize,
        base: f64,
    ) -> Result<()> {
        if slot.as_ref().map(|r| r.t) != Some(t) {
            let tab = crate::vocab::positions::rope_table(t, dim, base);
            *slot = Some(DevRope {
                t,
                cos: be.temp_from(&tab.cos)?,
                sin: be.temp_from(&tab.sin)?,
            });
        }
        Ok(())
    }
}

/// Saved activations of one GPU layer forward (buffers kept across calls of the same shape).
#[derive(Default)]
pub struct GpuAsaCache {
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) x: Option<Dv<f32>>, // [B,T,C] layer input (owned by the caller)
    pub(super) kp: DBuf,
    pub(super) vp: DBuf,
    pub(super) qp: DBuf,
    pub(super) k_h: DBuf,    // [B,H,T,d]
    pub(super) k_n: DBuf,    // [B,H,T,d] (normalize_k)
    pub(super) k_norm: DBuf, // [B,H,T]
    pub(super) k_r: DBuf,    // [B,H,T,d] (RoPE)
    pub(super) v_h: DBuf,
    pub(super) q_h: DBuf,
    pub(super) keys: DBuf, // [H,K,d]
    /// [H,K] the slot keep mask of the last forward (owned by the caller: the batch's draws)
    pub(super) key_keep: Option<Dv<f32>>,
    pub(super) raw: DBuf, // [B,H,K,T]
    pub(super) wl: DBuf,
    pub(super) state: DBuf, // [B,H,T,K,d]
    pub(super) den: DBuf,   // [B,H,K,T]
    pub(super) rmax: DBuf,
    pub(super) lkey: DBuf, // [B,H,T,K]
    pub(super) lcont: DBuf,
    pub(super) logits: DBuf,
    /// [B,H,T,K] logits + routing noise (the routing's input when the call has noise)
    pub(super) noisy: DBuf,
    noisy_on: bool,
    pub(super) rw: DBuf,
    pub(super) out_h: DBuf, // [B,H,T,d] out1 (+ gate * delta unless the fused mix merged that)
    pub(super) merged: DBuf,
    pub(super) merged16: Twin,
    pub(super) proj: DBuf,
    pub(super) drop: DBuf,
    has_drop: bool,
    // slotspace
    pub(super) rw16: Twin,
    pub(super) u: DBuf,
    pub(super) u16: Twin,
    pub(super) vs: DBuf,
    pub(super) qs: DBuf,
    pub(super) ks: DBuf,
    pub(super) qf: DBuf,
    pub(super) kf: DBuf,
    pub(super) u2: DBuf,
    ss_den: DBuf,
    /// the linear attention's forward carries, kept for its backward
    ss_carries: Option<Temp<f64>>,
    ss_drop: DBuf,
    pub(super) u2d: DBuf,
    u2d16: Twin,
    has_ss_drop: bool,
    pub(super) z: DBuf,
    pub(super) sw_pre: DBuf,
    pub(super) sw: DBuf,
    pub(super) delta: DBuf,
    pub(super) gamma: f32,
    pub(super) gate: f32,
    /// nullable: this layer's [`STEP_SCALARS`] slots of the step's scalar block (uploaded with
    /// the batch), where the fused kernels read gamma, the gate and the gradient factors
    pub(super) step_scalars: Option<Dv<f64>>,
    /// intervene variant: out1, thresholds, logs (`super::intervene`)
    pub(super) intv: super::intervene::GpuIntvCache,
    /// the fused write scan + read (`super::fused`): plan, carries, workspace
    pub(super) fused: super::fused::FusedState,
}

/// One ASA layer on the GPU: config, parameter ids, ALiBi slopes, RoPE tables.
pub struct GpuAsaLayer {
    pub cfg: ModelConfig,
    pub ids: AsaIds,
    /// intervene variant: the intervention settings (`AsaLayer::intervention`)
    pub intervention: Intervention,
    /// use the fused write scan + read where supported (`super::fused`; default: on unless
    /// `ASA_CUDA_FUSED=0`)
    pub fused: bool,
    slopes_d: Temp<f32>,
    pub(super) rope: Option<DevRope>,
    pub(super) rope_ss: Option<DevRope>,
}

impl GpuAsaLayer {
    pub(super) fn new<B: Backend>(be: &B, cfg: &ModelConfig, ids: AsaIds) -> Result<Self> {
        let slopes = if cfg.use_alibi_write {
            crate::vocab::positions::alibi_slopes(cfg.num_heads)
        } else {
            vec![0.0; cfg.num_heads]
        };
        let slopes_d = be.temp_from(&slopes)?;
        Ok(GpuAsaLayer {
            cfg: cfg.clone(),
            ids,
            intervention: Intervention::default(),
            fused: super::fused::fused_default(),
            slopes_d,
            rope: None,
            rope_ss: None,
        })
    }

    pub(super) fn dims(&self, b: usize, t: usize) -> SlotDims {
        SlotDims {
            b,
            h: self.cfg.num_heads,
            t,
            k: self.cfg.num_slots,
            d: self.cfg.head_dim(),
        }
    }

    /// Wk_write, Wv_write, Wq_read as one [3C, C] range of `base` (the weights, or the
    /// gradients: same layout) when they lie back to back: then one GEMM makes the three
    /// projections (None: three GEMMs).
    fn qkv_span(&self, base: Dv<f32>, p: &GpuParams) -> Option<Dv<f32>> {
        let ids = &self.ids;
        p.layout
            .span(base, &[ids.wk_write, ids.wv_write, ids.wq_read])
    }

    /// Whether the refine's tanh (forward and backward) rides in the fused mix and dot: signed
    /// weights, the fused path, no slotspace mask between the tanh and the mix, and not the
    /// intervene variant (its backward adds into dz first).
    fn tanh_in_fused(&self, c_: &GpuAsaCache, ss_mask: bool) -> bool {
        self.cfg.slotspace_signed_weights
            && c_.fused.active()
            && !ss_mask
            && self.cfg.variant != Variant::Intervene
    }

    /// The refine's slot_q, slot_k, slot_v as one [3M, M] range of `base` (weights or
    /// gradients) when they lie back to back: then one GEMM makes the three (None: three).
    fn slot_qkv_span(&self, base: Dv<f32>, p: &GpuParams) -> Option<Dv<f32>> {
        let ss = self.ids.slotspace.as_ref()?;
        p.layout.span(base, &[ss.slot_q, ss.slot_k, ss.slot_v])
    }

    /// The keys' RoPE tables when split_heads3 applies it (and merge_heads3 its backward): the
    /// fused QKV GEMM, RoPE on the keys and no key normalization between the two.
    fn keys_rope_in_heads3(&self, p: &GpuParams) -> Option<(Dv<f32>, Dv<f32>)> {
        let r = self.rope.as_ref().filter(|_| self.cfg.use_rope_keys)?;
        let fused_qkv = self.qkv_span(p.all(), p).is_some();
        (fused_qkv && !self.cfg.normalize_k).then(|| (r.cos.dv(), r.sin.dv()))
    }

    /// The slotspace RoPE's cos and sin tables when the refine uses RoPE.
    fn refine_rope(&self) -> super::refine::RopeTables {
        match &self.rope_ss {
            Some(r) if self.cfg.use_rope_slotspace => Some((r.cos.dv(), r.sin.dv())),
            _ => None,
        }
    }

    /// This layer's [`STEP_SCALARS`] slots of the step's scalar block, from the parameters'
    /// host mirror (current after each step's read-back): the content read's gamma and
    /// d gamma / d raw (0 where the clamp holds), the refine gate and d gate / d raw, and
    /// (value unused) d strength / d raw of a learned ALiBi strength.
    pub(super) fn step_scalars(&self, p: &GpuParams) -> [f64; STEP_SCALARS] {
        let mut s = [0.0; STEP_SCALARS];
        if let Some(i) = self.ids.content_read_gamma {
            let raw = p.scalar(i) as f64;
            let mx = self.cfg.content_read_max_gamma;
            s[0] = self.content_gamma(p) as f64;
            s[1] = if !(mx > 0.0) || softplus(raw) <= mx {
                sigmoid(raw)
            } else {
                0.0
            };
        }
        if let Some(ss) = &self.ids.slotspace {
            let raw = p.scalar(ss.gate) as f64;
            s[2] = softplus(raw) as f32 as f64;
            s[3] = sigmoid(raw);
        }
        if let Some(i) = self.ids.alibi_strength {
            s[5] = sigmoid(p.scalar(i) as f64);
        }
        s
    }

    /// A slot pair [value, factor] of this layer's step scalars (null without the block).
    fn step_at(c_: &GpuAsaCache, slot: usize) -> Dv<f64> {
        c_.step_scalars.map_or(Dv::null(), |s| s.sub(slot, 2))
    }

    /// The content read's gamma for the fused kernels: `value` (the host's), or read at the
    /// step's scalar block (see [`Learned`]).
    fn gamma_learned(c_: &GpuAsaCache, value: f32) -> Learned {
        Learned {
            value,
            at: Self::step_at(c_, 0),
        }
    }

    pub(super) fn content_gamma(&self, p: &GpuParams) -> f32 {
        crate::vocab::params::content_gamma(
            self.ids.content_read_gamma.map(|i| p.scalar(i)),
            &self.cfg,
        )
    }

    /// Forward: x [B,T,C] -> out [B,T,C] (`AsaLayer::forward`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward<B: Backend>(
        &mut self,
        be: &B,
        p: &GpuParams,
        x: Dv<f32>,
        b: usize,
        t: usize,
        o: &DevOpts,
        c_: &mut GpuAsaCache,
        draws: LayerDraws,
        out: Dv<f32>,
    ) -> Result<()> {
        let cfg = self.cfg.clone();
        let dm = self.dims(b, t);
        let (c, h, nk, d) = (cfg.embed_dim, dm.h, dm.k, dm.d);
        let n = b * t;
        let valid = o.valid();
        c_.b = b;
        c_.t = t;
        c_.x = Some(x);
        if cfg.use_rope_keys {
            DevRope::ensure(&mut self.rope, be, t, d, cfg.rope_base)?;
        }
        if cfg.use_slotspace_refine && cfg.use_rope_slotspace {
            DevRope::ensure(
                &mut self.rope_ss,
                be,
                t,
                cfg.slotspace_dim,
                cfg.rope_base_slotspace,
            )?;
        }

        // projections [B,T,C] and heads [B,H,T,d]
        let k_h = c_.k_h.ensure(be, n * c)?;
        let v_h = c_.v_h.ensure(be, n * c)?;
        let q_h = c_.q_h.ensure(be, n * c)?;
        let rope_in_split = self.keys_rope_in_heads3(p);
        if let Some(w3) = self.qkv_span(p.all(), p) {
            // one GEMM for the three projections (their weights lie back to back): [B,T,3C],
            // then the heads (the keys leave with RoPE when nothing comes between)
            let (_s, kvq) = tmp_uninit(be, 3 * n * c)?;
            be.matmul_forward(kvq, x, w3, Dv::null(), n, c, 3 * c)?;
            let k_out = match rope_in_split {
                Some(_) => c_.k_r.ensure(be, n * c)?,
                None => k_h,
            };
            be.split_heads3([k_out, v_h, q_h], kvq, b, t, h, d, rope_in_split)?;
        } else {
            let kp = c_.kp.ensure(be, n * c)?;
            let vp = c_.vp.ensure(be, n * c)?;
            let qp = c_.qp.ensure(be, n * c)?;
            // x is the input of all three (rounded to bf16 once)
            be.with_bf16(x, || {
                be.matmul_forward(kp, x, p.p(self.ids.wk_write), Dv::null(), n, c, c)?;
                be.matmul_forward(vp, x, p.p(self.ids.wv_write), Dv::null(), n, c, c)?;
                be.matmul_forward(qp, x, p.p(self.ids.wq_read), Dv::null(), n, c, c)
            })?;
            be.split_heads(k_h, kp, b, t, h, d)?;
            be.split_heads(v_h, vp, b, t, h, d)?;
            be.split_heads(q_h, qp, b, t, h, d)?;
        }
        // write keys: normalize, RoPE
        let k_n = if cfg.normalize_k {
            let k_n = c_.k_n.ensure(be, n * c)?;
            let k_norm = c_.k_norm.ensure(be, b * h * t)?;
            be.l2normalize_forward(k_n, k_norm, k_h, d)?;
            k_n
        } else {
            k_h
        };
        let k_r = match &self.rope {
            Some(_) if rope_in_split.is_some() => c_.k_r.dv(),
            Some(r) if cfg.use_rope_keys => {
                let k_r = c_.k_r.ensure(be, n * c)?;
                be.rope_forward(k_r, k_n, r.cos.dv(), r.sin.dv(), b * h, t, d)?;
                k_r
            }
            _ => k_n,
        };
        // slot dropout (training): whole slot keys of a head are zeroed, not rescaled (the
        // keep mask drawn on the host with the step's draws)
        assert_eq!(draws.keep.len, h * nk, "the slot keep mask is [H,K]");
        let key_keep = draws.keep;
        c_.key_keep = Some(key_keep);
        let keys = c_.keys.ensure(be, h * nk * d)?;

        // write logits [B,H,K,T], with the prologue along: keys = slot_keys * keep (stored for
        // the read), the ALiBi bias from its strength (the learned one on the device)
        let alibi = cfg.use_alibi_write.then(|| {
            let raw = self.ids.alibi_strength.map_or(Dv::null(), |i| p.p(i));
            let (init, min) = (cfg.alibi_strength_init, cfg.min_strength);
            (self.slopes_d.dv(), raw, init, min)
        });
        let prologue = super::ops::WritePrologue {
            keys: Some((p.p(self.ids.slot_keys), key_keep)),
            alibi,
        };
        let wtemp = cfg.write_temperature.max(1e-6) as f32;
        let raw = c_.raw.ensure(be, b * h * nk * t)?;
        let wl = c_.wl.ensure(be, b * h * nk * t)?;
        let no_bias = Dv::null();
        be.write_logits_forward(raw, wl, keys, k_r, wtemp, no_bias, valid, dm, prologue)?;

        // write scan + read: fused (no [B,H,T,K,d] state history) where supported
        c_.noisy_on = !draws.noise.is_null();
        let fplan = if self.fused && !c_.noisy_on && !o.return_info {
            let softmax = matches!(o.routing, RoutingMode::Softmax);
            super::fused::layer_plan(be, &cfg, softmax, dm)
        } else {
            None
        };
        c_.fused.deactivate();
        if let Some(plan) = fplan {
            c_.gamma = self.content_gamma(p);
            let rw = c_.rw.ensure(be, b * h * t * nk)?;
            // the refine's slot_in GEMM reads rw in bf16: its twin, written with it
            let rw16 = match self.ids.slotspace {
                Some(_) => c_.rw16.of(be, rw)?,
                None => Dv::null(),
            };
            let io = super::fused::FwdIo {
                out1: c_.out_h.ensure(be, n * c)?,
                rw,
                rw16,
                lkey: Dv::null(),
                lcont: Dv::null(),
                logits: Dv::null(),
                wl,
                v: v_h,
                q: q_h,
                keys,
                gamma: Self::gamma_learned(c_, c_.gamma),
                rtemp: cfg.read_temperature.max(1e-6) as f32,
                mask: o.read_mask(),
                content: cfg.use_content_read,
            };
            c_.fused.forward(be, plan, &io)?;
        } else {
            // write scan
            let state = c_.state.ensure(be, b * h * t * nk * d)?;
            let den = c_.den.ensure(be, b * h * nk * t)?;
            let rmax = c_.rmax.ensure(be, b * h * nk * t)?;
            be.slot_scan_forward(state, den, rmax, wl, v_h, cfg.write_chunk_size, dm)?;

            // read logits, routing
            c_.gamma = self.content_gamma(p);
            let bhtk = b * h * t * nk;
            let lkey = c_.lkey.ensure(be, bhtk)?;
            let lcont = if cfg.use_content_read {
                c_.lcont.ensure(be, bhtk)?
            } else {
                Dv::null()
            };
            let logits = c_.logits.ensure(be, bhtk)?;
            be.read_logits_forward(
                lkey,
                lcont,
                logits,
                q_h,
                keys,
                state,
                c_.gamma,
                o.read_mask(),
                dm,
            )?;
            // routing noise: the routing reads logits + noise (the info keeps the logits)
            let routed = if c_.noisy_on {
                let noisy = c_.noisy.ensure(be, bhtk)?;
                be.copy(noisy, logits)?;
                be.axpy(noisy, draws.noise, 1.0)?;
                noisy
            } else {
                logits
            };
            let rtemp = cfg.read_temperature.max(1e-6) as f32;
            let rw = c_.rw.ensure(be, bhtk)?;
            be.read_weights_forward(
                rw,
                routed,
                o.routing(),
                rtemp,
                o.keep_where(SlotMaskWhere::Read),
                dm,
            )?;
            let out_h = c_.out_h.ensure(be, n * c)?;
            be.slot_mix_forward(out_h, rw, state, dm)?; // out1
        }
        let out_h = c_.out_h.dv();

        // the heads merged for out_proj [B,T,C] (stored whole by merge_heads, or by the
        // refine's fused mix)
        let merged = c_.merged.ensure(be, n * c)?;
        let merged16 = c_.merged16.of(be, merged)?;
        let mut merged_by_mix = false;

        // slotspace refine: out_h = out1 + gate * delta
        c_.gate = 0.0;
        if let Some(ss) = &self.ids.slotspace {
            c_.gate = softplus(p.scalar(ss.gate) as f64) as f32;
            // the fused mix writes out1 + gate * delta merged (but for the intervene variant)
            let merge = (c_.fused.active() && cfg.variant != Variant::Intervene).then_some(
                super::fused::MixMerge {
                    base: out_h,
                    gate: Learned {
                        value: c_.gate,
                        at: Self::step_at(c_, 2),
                    },
                    merged,
                    merged16,
                },
            );
            merged_by_mix = merge.is_some();
            self.slotspace_forward(be, p, o, c_, draws.seeds.sub(1, 1), dm, merge)?;
            if cfg.variant == Variant::Intervene {
                // out_h = out1 + f(out1, gate * delta) per position (`intervene_forward`)
                let (delta, z) = (c_.delta.dv(), c_.z.dv());
                let wc = cfg.write_chunk_size;
                c_.intv
                    .forward(be, &self.intervention, out_h, delta, z, c_.gate, wc, dm)?;
            } else if !merged_by_mix {
                be.axpy(out_h, c_.delta.dv(), c_.gate)?;
            }
        }

        // merge heads, out_proj, dropout
        if !merged_by_mix {
            be.merge_heads(merged, out_h, b, t, h, d, merged16)?;
        }
        let pdrop = if o.training { cfg.dropout as f32 } else { 0.0 };
        c_.has_drop = pdrop > 0.0;
        if c_.has_drop {
            let proj = c_.proj.ensure(be, n * c)?;
            be.matmul_forward(proj, merged, p.p(self.ids.out_proj), Dv::null(), n, c, c)?;
            let drop = c_.drop.ensure(be, n * c)?;
            be.dropout_forward(out, drop, proj, pdrop, (0, draws.seeds.sub(0, 1)))?;
        } else {
            be.matmul_forward(out, merged, p.p(self.ids.out_proj), Dv::null(), n, c, c)?;
        }
        Ok(())
    }

    /// The info dict of the last forward (`AsaLayer::info`'s twin): the call's buffers
    /// downloaded and assembled by `vocab::info::assemble`, the CPU layer's own code. Needs a
    /// forward with `return_info` (unfused: the state history kept).
    pub(super) fn info<B: Backend>(&self, be: &B, p: &GpuParams, c_: &GpuAsaCache) -> Result<Info> {
        let cfg = &self.cfg;
        let dm = self.dims(c_.b, c_.t);
        let online = cfg.variant == Variant::Online;
        let dl = |buf: &DBuf| -> Result<Vec<f32>> {
            if buf.n == 0 {
                Ok(Vec::new())
            } else {
                be.download(buf.dv())
            }
        };
        let state_norm = if online {
            Vec::new()
        } else {
            if c_.state.n != dm.b * dm.h * dm.t * dm.k * dm.d {
                return Err(AsaError::Other(
                    "the layer's info needs a forward with return_info (the state history)".into(),
                ));
            }
            let state = be.download(c_.state.dv())?;
            let mut norms = vec![0.0; dm.b * dm.h * dm.k * dm.t];
            // the CPU twin's norm, on the downloaded history
            crate::backend::cpu::slot_ops::slot_state_norm(&mut norms, &state, dm);
            norms
        };
        let raw_strength = self.ids.alibi_strength.map(|i| p.scalar(i));
        let strength = crate::vocab::params::alibi_strength(raw_strength, cfg);
        let bias_h: Option<Vec<f32>> = cfg.use_alibi_write.then(|| {
            let mut bias = vec![0.0; dm.h];
            crate::backend::cpu::slot_ops::alibi_bias(
                &mut bias,
                &crate::vocab::positions::alibi_slopes(dm.h),
                raw_strength,
                cfg.alibi_strength_init,
                cfg.min_strength,
            );
            bias
        });
        let (mut intv, mut out1) = (None, Vec::new());
        if cfg.variant == Variant::Intervene {
            let mut iv = c_.intv.info(be)?;
            if let Some((_, o1)) = iv.remove("out1") {
                out1 = o1;
            }
            intv = Some(iv);
        }
        let (raw, wl, logits) = (dl(&c_.raw)?, dl(&c_.wl)?, dl(&c_.logits)?);
        let (lkey, rw) = (dl(&c_.lkey)?, dl(&c_.rw)?);
        let lcont = if cfg.use_content_read {
            dl(&c_.lcont)?
        } else {
            Vec::new()
        };
        let refine = match self.ids.slotspace {
            Some(_) => Some((dl(&c_.delta)?, dl(&c_.sw)?, dl(&c_.z)?)),
            None => None,
        };
        Ok(crate::vocab::info::assemble(
            crate::vocab::info::InfoParts {
                dm,
                variant: cfg.variant,
                use_content_read: cfg.use_content_read,
                write_chunk: cfg.write_chunk_size,
                raw: &raw,
                wl: &wl,
                logits: &logits,
                lkey: &lkey,
                lcont: &lcont,
                rw: &rw,
                state_norm,
                gamma: c_.gamma,
                strength,
                learned_strength: self.ids.alibi_strength.is_some(),
                bias_h: bias_h.as_deref(),
                refine: refine
                    .as_ref()
                    .map(|(delta, sw, z)| crate::vocab::info::RefineParts {
                        gate: c_.gate,
                        delta,
                        sw,
                        z,
                    }),
                out1: &out1,
                intv,
            },
        ))
    }

    pub(super) fn slotspace_forward<B: Backend>(
        &self,
        be: &B,
        p: &GpuParams,
        o: &DevOpts,
        c_: &mut GpuAsaCache,
        seed: Dv<u64>,
        dm: SlotDims,
        merge: Option<super::fused::MixMerge>,
    ) -> Result<()> {
        let ids = self.ids.slotspace.as_ref().expect("slotspace ids");
        let cfg = &self.cfg;
        let (b, h, t, nk) = (dm.b, dm.h, dm.t, dm.k);
        let m = cfg.slotspace_dim;
        let rows = b * h * t;
        let valid = o.valid();
        let online = cfg.variant == Variant::Online;
        // the GEMM inputs below whose producers write no twin are converted once here, for
        // the forward and the backward (bf16 GEMMs)
        if !c_.fused.active() {
            c_.rw16.converted(be, c_.rw.dv())?; // (the fused read writes rw's twin)
        }
        // u is read by GEMMs only: with twins on, cuBLAS writes it in bf16 alone
        let u = c_.u.ensure(be, rows * m)?;
        let u16 = c_.u16.of(be, u)?;
        be.matmul_forward_to_bf16((u, u16), c_.rw.dv(), p.p(ids.slot_in), rows, nk, m)?;
        // q | k | v side by side [rows, 3M]: one GEMM where their weights lie back to back,
        // else three merged
        let (_s, qkv) = tmp_uninit(be, 3 * rows * m)?;
        if let Some(w3) = self.slot_qkv_span(p.all(), p) {
            be.matmul_forward(qkv, u, w3, Dv::null(), rows, m, 3 * m)?;
        } else {
            let (_q, q) = tmp_uninit(be, rows * m)?;
            let (_k, k) = tmp_uninit(be, rows * m)?;
            let (_v, v) = tmp_uninit(be, rows * m)?;
            be.matmul_forward(q, u, p.p(ids.slot_q), Dv::null(), rows, m, m)?;
            be.matmul_forward(k, u, p.p(ids.slot_k), Dv::null(), rows, m, m)?;
            be.matmul_forward(v, u, p.p(ids.slot_v), Dv::null(), rows, m, m)?;
            be.merge_heads3(qkv, [q, k, v], 1, rows, 1, m, Dv::null(), None)?;
        }
        // RoPE, the padding masks (the online variant masks before phi, the baseline after
        // it) and phi in one pass
        let (qs, ks) = (c_.qs.ensure(be, rows * m)?, c_.ks.ensure(be, rows * m)?);
        let qf = c_.qf.ensure(be, rows * m)?;
        let kf = c_.kf.ensure(be, rows * m)?;
        let vs = c_.vs.ensure(be, rows * m)?;
        let shape = super::refine::QkvShape {
            n: b * h,
            t,
            m,
            h,
            valid,
            online,
        };
        let rope = self.refine_rope();
        super::refine::qkv_forward(be, [qs, ks, qf, kf, vs], qkv, rope, shape)?;
        let u2 = c_.u2.ensure(be, rows * m)?;
        let ss_den = c_.ss_den.ensure(be, rows)?;
        let nc = be.linear_attn_carries(b * h, t, m, None)?;
        if c_.ss_carries.as_ref().is_none_or(|s| s.len() != nc) {
            c_.ss_carries = Some(be.temp_uninit::<f64>(nc)?);
        }
        let keep = c_.ss_carries.as_ref().map_or(Dv::null(), |s| s.dv());
        let pdrop = if o.training {
            cfg.slotspace_dropout as f32
        } else {
            0.0
        };
        c_.has_ss_drop = pdrop > 0.0;
        // slot_out's GEMM reads u2 (after dropout) in bf16: without dropout the linear
        // attention writes its twin
        let u2_16 = if c_.has_ss_drop {
            Dv::null()
        } else {
            c_.u2d16.of(be, u2)?
        };
        be.linear_attn_forward(u2, ss_den, qf, kf, vs, t, m, None, keep, u2_16)?;
        let u2d = if c_.has_ss_drop {
            let u2d = c_.u2d.ensure(be, rows * m)?;
            let mask = c_.ss_drop.ensure(be, rows * m)?;
            be.dropout_forward(u2d, mask, u2, pdrop, (0, seed))?;
            c_.u2d16.converted(be, u2d)?;
            u2d
        } else {
            u2
        };
        let z = c_.z.ensure(be, rows * nk)?;
        be.matmul_forward(z, u2d, p.p(ids.slot_out), Dv::null(), rows, m, nk)?;
        let sw = c_.sw.ensure(be, rows * nk)?;
        let ss_mask = o.keep_where(SlotMaskWhere::SlotspaceOnly);
        // the fused mix takes the tanh itself where nothing comes between
        let tanh_in_mix = self.tanh_in_fused(c_, ss_mask.is_some());
        if tanh_in_mix {
            // (below)
        } else if cfg.slotspace_signed_weights {
            be.tanh_forward(sw, z)?;
        } else {
            be.softmax_slots_forward(sw, z, nk)?;
        }
        if let Some((keep, lpo)) = ss_mask {
            let pre = c_.sw_pre.ensure(be, rows * nk)?;
            be.slot_mask_weights_forward(sw, pre, keep, lpo, !cfg.slotspace_signed_weights, dm)?;
        }
        let delta = c_.delta.ensure(be, rows * dm.d)?;
        if c_.fused.active() {
            let z = if tanh_in_mix { z } else { Dv::null() };
            c_.fused
                .mix(be, delta, sw, c_.wl.dv(), c_.v_h.dv(), merge, z)?;
        } else {
            assert!(merge.is_none(), "only the fused mix merges");
            be.slot_mix_forward(delta, sw, c_.state.dv(), dm)?;
        }
        Ok(())
    }

    /// Backward: dout [B,T,C] (with its bf16 twin, or null) -> dx [B,T,C] (stored); parameter
    /// gradients are added into `g` (the flat gradient buffer, `layout` ranges).
    /// `AsaLayer::backward`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward<B: Backend>(
        &self,
        be: &B,
        p: &GpuParams,
        g: Dv<f32>,
        c_: &mut GpuAsaCache,
        o: &DevOpts,
        (dout, dout16): (Dv<f32>, Dv<u16>),
        dx: Dv<f32>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (b, t) = (c_.b, c_.t);
        let dm = self.dims(b, t);
        let (c, h, nk, d) = (cfg.embed_dim, dm.h, dm.k, dm.d);
        let n = b * t;
        let m = cfg.slotspace_dim;
        let valid = o.valid();
        let gr = |id: ParamId| p.layout.range(g, id);
        let x = c_.x.expect("forward before backward");

        // dropout, out_proj, heads
        let (_dp_own, dproj, dproj16) = if c_.has_drop {
            let (s, dp) = tmp(be, n * c)?;
            be.dropout_backward(dp, dout, c_.drop.dv())?;
            (Some(s), dp, Dv::null())
        } else {
            (None, dout, dout16)
        };
        let (_s1, dmerged) = tmp_uninit(be, n * c)?; // stored whole
        be.with_bf16_twin(dproj, dproj16, || {
            be.matmul_backward_store(
                dmerged,
                gr(self.ids.out_proj),
                Dv::null(),
                dproj,
                c_.merged.dv(),
                p.p(self.ids.out_proj),
                n,
                c,
                c,
            )
        })?;
        // split_heads stores every element (or, on the refine path but for the intervene
        // variant, the gate's backward splits the heads itself)
        let (_s2, dout_h) = tmp_uninit(be, n * c)?;
        let split_in_gate = self.ids.slotspace.is_some() && cfg.variant != Variant::Intervene;
        if !split_in_gate {
            be.split_heads(dout_h, dmerged, b, t, h, d)?;
        }

        // the fused path never forms the state history nor its gradient
        let fused = c_.fused.active();
        let (_s3, dstate) = tmp(be, if fused { 0 } else { c_.state.n })?;
        let (_s4, drw) = tmp(be, c_.rw.n)?;
        // d(out1) is d(out_h) (the intervene backward adds its share in place)
        let dout1 = dout_h;

        // refine; ddelta and dsw live until the fused backward below reads them
        let mut refine_keep = Vec::new();
        if let Some(ids) = &self.ids.slotspace {
            let rows = b * h * t;
            let gate = c_.gate as f64;
            // gate_backward stores ddelta whole; the intervene backward adds into it
            let (s5, ddelta) = if cfg.variant == Variant::Intervene {
                tmp(be, rows * d)?
            } else {
                tmp_uninit(be, rows * d)?
            };
            refine_keep.push(s5);
            let (_s8, dz) = tmp(be, rows * nk)?;
            let dgate_raw = sigmoid(p.scalar(ids.gate) as f64); // d softplus
            if cfg.variant == Variant::Intervene {
                // `intervene_backward`: d out1 (in place), d delta, d z, d gate
                let (delta, z) = (c_.delta.dv(), c_.z.dv());
                let dgate = be.temp::<f64>(1)?;
                c_.intv
                    .backward(be, dout_h, dout1, ddelta, dz, dgate.dv(), delta, z)?;
                be.scalar_grad_add(gr(ids.gate), dgate.dv(), dgate_raw)?;
            } else {
                let delta = c_.delta.dv();
                let dims = (b, t, h, d);
                let (dg, at) = (gr(ids.gate), Self::step_at(c_, 2));
                let gate = (gate, dgate_raw, at);
                be.gate_backward_split(ddelta, dg, dout_h, dmerged, delta, gate, dims)?;
            }
            let (s6, dsw) = tmp(be, rows * nk)?;
            refine_keep.push(s6);
            let ss_mask = o.keep_where(SlotMaskWhere::SlotspaceOnly);
            // dz's bf16 twin (slot_out's output gradient), written by tanh_backward (or by
            // the fused dot that takes its place)
            let mut dz16 = Twin::default();
            let dz16 = if cfg.slotspace_signed_weights {
                dz16.scoped(be, rows * nk)?
            } else {
                Dv::null()
            };
            let tanh_in_dot = self.tanh_in_fused(c_, ss_mask.is_some());
            if fused {
                // dsw = ddelta . state; sw * ddelta joins the state gradient in the fused backward
                let tanh = tanh_in_dot.then_some(super::fused::TanhBack {
                    dz,
                    dz16,
                    sw: c_.sw.dv(),
                });
                c_.fused
                    .refine_backward(be, dsw, ddelta, c_.wl.dv(), c_.v_h.dv(), tanh)?;
            } else {
                be.slot_mix_backward(dsw, dstate, ddelta, c_.sw.dv(), c_.state.dv(), dm)?;
            }
            let (_s7, dsw_pre, sw_pre) = match ss_mask {
                Some((keep, lpo)) => {
                    let (s, dpre) = tmp(be, rows * nk)?;
                    be.slot_mask_weights_backward(
                        dpre,
                        dsw,
                        c_.sw.dv(),
                        c_.sw_pre.dv(),
                        keep,
                        lpo,
                        !cfg.slotspace_signed_weights,
                        dm,
                    )?;
                    (Some(s), dpre, c_.sw_pre.dv())
                }
                None => (None, dsw, c_.sw.dv()),
            };
            if tanh_in_dot {
                // (done by the fused dot above)
            } else if cfg.slotspace_signed_weights {
                be.tanh_backward(dz, sw_pre, dsw_pre, dz16)?;
            } else {
                be.softmax_slots_backward(dz, sw_pre, dsw_pre, nk)?;
            }
            let u2d = if c_.has_ss_drop {
                c_.u2d.dv()
            } else {
                c_.u2.dv()
            };
            let (_s9, du2d) = tmp_uninit(be, rows * m)?; // stored whole
            be.with_bf16_twin(dz, dz16, || {
                let (gw, w) = (gr(ids.slot_out), p.p(ids.slot_out));
                be.matmul_backward_store(du2d, gw, Dv::null(), dz, u2d, w, rows, m, nk)
            })?;
            let (_s10, du2) = if c_.has_ss_drop {
                let (s, du2) = tmp(be, rows * m)?;
                be.dropout_backward(du2, du2d, c_.ss_drop.dv())?;
                (Some(s), du2)
            } else {
                (None, du2d)
            };
            let (_a, dqf) = tmp(be, rows * m)?;
            let (_b, dkf) = tmp(be, rows * m)?;
            let (_c, dvs) = tmp(be, rows * m)?;
            be.linear_attn_backward(
                dqf,
                dkf,
                dvs,
                du2,
                c_.u2.dv(),
                c_.ss_den.dv(),
                c_.qf.dv(),
                c_.kf.dv(),
                c_.vs.dv(),
                t,
                m,
                None,
                c_.ss_carries.as_ref().map_or(Dv::null(), |s| s.dv()),
            )?;
            // [dq dk dv] side by side (with its bf16 twin): phi', the padding masks and RoPE
            // transposed in one pass
            let (_s, d3) = tmp_uninit(be, 3 * rows * m)?;
            let mut d3_16 = Twin::default();
            let d3_16 = d3_16.scoped(be, 3 * rows * m)?;
            let shape = super::refine::QkvShape {
                n: b * h,
                t,
                m,
                h,
                valid,
                online: cfg.variant == Variant::Online,
            };
            let (qs, ks) = (c_.qs.dv(), c_.ks.dv());
            let rope = self.refine_rope();
            super::refine::qkv_backward(be, (d3, d3_16), [dqf, dkf, dvs], [qs, ks], rope, shape)?;
            // du: stored by the first GEMM below; read by slot_in's backward GEMMs only, so with
            // twins on it is written in bf16 alone
            let (_h, du) = tmp_uninit(be, rows * m)?;
            let mut du16_buf = Twin::default();
            let mut du16 = du16_buf.scoped(be, rows * m)?;
            let u = c_.u.dv();
            if let Some(w3) = self.slot_qkv_span(p.all(), p) {
                // the fused GEMM's backward
                let g3 = self
                    .slot_qkv_span(g, p)
                    .expect("gradients share the weights' layout");
                be.with_bf16_twin(d3, d3_16, || {
                    be.matmul_backward_store_to_bf16((du, du16), g3, d3, u, w3, rows, m, 3 * m)
                })?;
            } else {
                // three GEMMs over d3's thirds, adding into an f32 du
                du16 = Dv::null();
                let (_q, dq) = tmp_uninit(be, rows * m)?;
                let (_k, dk) = tmp_uninit(be, rows * m)?;
                let (_v, dv) = tmp_uninit(be, rows * m)?;
                be.split_heads3([dq, dk, dv], d3, 1, rows, 1, m, None)?;
                for (j, (dy, w)) in [(dq, ids.slot_q), (dk, ids.slot_k), (dv, ids.slot_v)]
                    .into_iter()
                    .enumerate()
                {
                    let beta = if j == 0 { 0.0 } else { 1.0 };
                    let (gw, wt) = (gr(w), p.p(w));
                    be.matmul_backward_beta(du, beta, gw, Dv::null(), dy, u, wt, rows, m, m)?;
                }
            }
            be.with_bf16_twin(du, du16, || {
                be.matmul_backward(
                    drw,
                    gr(ids.slot_in),
                    Dv::null(),
                    du,
                    c_.rw.dv(),
                    p.p(ids.slot_in),
                    rows,
                    nk,
                    m,
                )
            })?;
        }

        // read
        let rtemp = cfg.read_temperature.max(1e-6) as f32;
        let (_s12, dq_h) = tmp(be, n * c)?;
        let (_s13, dkeys) = tmp(be, h * nk * d)?;
        let dgamma = be.temp::<f64>(1)?;
        let content = cfg.use_content_read;
        let (_s14, dwl) = tmp(be, c_.wl.n)?;
        let (_s15, dv_h) = tmp(be, n * c)?;
        // gamma's raw parameter: its gradient and d gamma / d raw, where the gradient passes
        // (clamp(max) passes it where softplus(raw) <= max)
        let gamma_grad = self.ids.content_read_gamma.and_then(|i| {
            let raw = p.scalar(i) as f64;
            let mx = cfg.content_read_max_gamma;
            (!(mx > 0.0) || softplus(raw) <= mx).then(|| (gr(i), sigmoid(raw)))
        });
        if fused {
            // read + write-scan backward from the forward's carries; the kernel takes gamma's
            // factor (0 where clamped) from the step's scalar block, so the gradient range is
            // passed whether or not the clamp holds now
            let refine = self.ids.slotspace.is_some();
            let io = super::fused::BwdIo {
                dwl,
                dv: dv_h,
                dq: dq_h,
                dkeys,
                dgamma: dgamma.dv(),
                dgamma_grad: self.ids.content_read_gamma.map_or(Dv::null(), gr),
                gamma_factor: gamma_grad.map_or(0.0, |g| g.1),
                dout1,
                drw,
                rw: c_.rw.dv(),
                sw: if refine { c_.sw.dv() } else { Dv::null() },
                ddelta: Dv::null(),
                dsw: Dv::null(),
                q: c_.q_h.dv(),
                keys: c_.keys.dv(),
                v: c_.v_h.dv(),
                wl: c_.wl.dv(),
                gamma: Self::gamma_learned(c_, c_.gamma),
                rtemp,
                mask: o.read_mask(),
                content,
            };
            c_.fused.backward(be, &io)?;
        } else {
            be.slot_mix_backward(drw, dstate, dout1, c_.rw.dv(), c_.state.dv(), dm)?;
            let (_s11, dlogits) = tmp(be, c_.rw.n)?;
            let routed = if c_.noisy_on {
                c_.noisy.dv()
            } else {
                c_.logits.dv()
            };
            be.read_weights_backward(
                dlogits,
                drw,
                c_.rw.dv(),
                routed,
                o.routing(),
                rtemp,
                o.keep_where(SlotMaskWhere::Read),
                dm,
            )?;
            be.read_logits_backward(
                dq_h,
                dkeys,
                if content { dstate } else { Dv::null() },
                dgamma.dv(),
                dlogits,
                if content { c_.lcont.dv() } else { Dv::null() },
                c_.q_h.dv(),
                c_.keys.dv(),
                c_.state.dv(),
                c_.gamma,
                o.read_mask(),
                dm,
            )?;
        }
        // (the fused backward added it already)
        if let (Some((dst, factor)), false) = (gamma_grad, fused) {
            be.scalar_grad_add(dst, dgamma.dv(), factor)?;
        }

        // write scan (op by op; the fused backward did it above) and write logits
        if !fused {
            be.slot_scan_backward(
                dwl,
                dv_h,
                dstate,
                c_.state.dv(),
                c_.den.dv(),
                c_.rmax.dv(),
                c_.wl.dv(),
                c_.v_h.dv(),
                cfg.write_chunk_size,
                dm,
            )?;
        }
        let wtemp = cfg.write_temperature.max(1e-6) as f32;
        let (_s16, dk_r) = tmp(be, n * c)?;
        let pbias = if self.ids.alibi_strength.is_some() {
            Some(be.temp::<f64>(b * h * nk)?)
        } else {
            None
        };
        let k_n = if cfg.normalize_k {
            c_.k_n.dv()
        } else {
            c_.k_h.dv()
        };
        let rope = self.rope.as_ref().filter(|_| cfg.use_rope_keys);
        let k_r = if rope.is_some() { c_.k_r.dv() } else { k_n };
        be.write_logits_backward(
            dkeys,
            dk_r,
            pbias
                .dv()
                .sub(0, if pbias.is_some() { b * h * nk } else { 0 }),
            dwl,
            c_.keys.dv(),
            k_r,
            wtemp,
            valid,
            dm,
            super::ops::KeysFinish {
                param: Some((gr(self.ids.slot_keys), c_.key_keep.dv())),
                alibi: self.ids.alibi_strength.map(|i| super::ops::AlibiFinish {
                    grad: gr(i),
                    slopes: self.slopes_d.dv(),
                    factor: sigmoid(p.scalar(i) as f64),
                    at: Self::step_at(c_, 4),
                }),
            },
        )?;
        // RoPE's backward inside merge_heads3 where the forward's was inside split_heads3
        let rope_in_merge = self.keys_rope_in_heads3(p);
        let (_s17, dk_n) = match rope {
            Some(_) if rope_in_merge.is_some() => (None, dk_r),
            Some(r) => {
                let (s, dk_n) = tmp(be, n * c)?;
                be.rope_backward(dk_n, dk_r, r.cos.dv(), r.sin.dv(), b * h, t, d)?;
                (Some(s), dk_n)
            }
            None => (None, dk_r),
        };
        let (_s18, dk_h) = if cfg.normalize_k {
            let (s, dk_h) = tmp(be, n * c)?;
            be.l2normalize_backward(dk_h, dk_n, c_.k_n.dv(), c_.k_norm.dv(), d)?;
            (Some(s), dk_h)
        } else {
            (None, dk_n)
        };
        // heads back to [B,T,C], then the projections
        if let Some(w3) = self.qkv_span(p.all(), p) {
            // the fused QKV GEMM's backward: dx += [dk dv dq] W3, dW3 += [dk dv dq]^T x
            let (_s19, dp3) = tmp_uninit(be, 3 * n * c)?;
            let mut dp3_16 = Twin::default();
            let dp3_16 = dp3_16.scoped(be, 3 * n * c)?;
            let ins = [dk_h, dv_h, dq_h];
            be.merge_heads3(dp3, ins, b, t, h, d, dp3_16, rope_in_merge)?;
            let g3 = self
                .qkv_span(g, p)
                .expect("gradients share the weights' layout");
            return be.with_bf16_twin(dp3, dp3_16, || {
                be.matmul_backward_store(dx, g3, Dv::null(), dp3, x, w3, n, c, 3 * c)
            });
        }
        let (_s19, dp) = tmp_uninit(be, n * c)?; // merge_heads stores every element
        let mut dp16 = Twin::default();
        let dp16 = dp16.scoped(be, n * c)?;
        // x is the input of all three weight gradients (rounded to bf16 once)
        be.with_bf16(x, || {
            for (j, (dh, w)) in [
                (dk_h, self.ids.wk_write),
                (dv_h, self.ids.wv_write),
                (dq_h, self.ids.wq_read),
            ]
            .into_iter()
            .enumerate()
            {
                be.merge_heads(dp, dh, b, t, h, d, dp16)?;
                // dx: the first projection's share stored, the others' added
                let beta = if j == 0 { 0.0 } else { 1.0 };
                be.with_bf16_twin(dp, dp16, || {
                    let (gw, wt) = (gr(w), p.p(w));
                    be.matmul_backward_beta(dx, beta, gw, Dv::null(), dp, x, wt, n, c, c)
                })?;
            }
            Ok(())
        })
    }
}

// ------------------------------------------------------------------------------------------------
// the language model

/// Slots per layer in the step's scalar block ([`GpuAsaLayer::step_scalars`]).
pub(super) const STEP_SCALARS: usize = 6;

/// Dropout sites per block ([`StepDraws`]): attention output, slotspace, MLP hidden, MLP out.
pub(super) const SEEDS_PER_LAYER: usize = 4;

/// A step's randomness, drawn on the host and uploaded with the batch, so that a replayed
/// graph reads each step's own: a dropout seed per site (the embeddings', then
/// [`SEEDS_PER_LAYER`] per block) and each block's slot keep mask [H,K] (1 kept, 0 dropped).
pub(super) struct StepDraws {
    pub(super) seeds: Vec<u64>,
    pub(super) keep: Vec<f32>,
}

impl StepDraws {
    /// Drawn from `rng` in a fixed order (the seeds, then the keep masks layer by layer; a
    /// keep draw only where slot dropout is on) for a training forward; else nothing is
    /// drawn (seeds 0, every slot kept).
    pub(super) fn draw(
        rng: &mut ChaCha8Rng,
        cfg: &ModelConfig,
        layers: usize,
        training: bool,
    ) -> Self {
        let hk = cfg.num_heads * cfg.num_slots;
        let ns = 1 + SEEDS_PER_LAYER * layers;
        if !training {
            return StepDraws {
                seeds: vec![0; ns],
                keep: vec![1.0; layers * hk],
            };
        }
        let seeds = (0..ns).map(|_| rng.gen()).collect();
        let p = cfg.slot_dropout;
        let keep = (0..layers * hk)
            .map(|_| {
                if p > 0.0 && rng.gen::<f64>() < p {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        StepDraws { seeds, keep }
    }
}

/// One block's share of the step's draws on the device.
#[derive(Clone, Copy)]
pub(super) struct LayerDraws {
    /// the attention output's and the slotspace's dropout seeds
    pub(super) seeds: Dv<u64>,
    /// the slot keep mask [H,K]
    pub(super) keep: Dv<f32>,
    /// the routing noise [B,H,T,K] added to the read logits (null: none)
    pub(super) noise: Dv<f32>,
}

/// One ASA layer with its own parameters on the device (the layer fixtures' setting: keys
/// without a prefix). `forward` then `backward` mirror `AsaLayer::forward/backward`.
pub struct GpuLayerRunner<B: Backend = CudaBackend> {
    pub(super) be: B,
    pub(super) layer: GpuAsaLayer,
    pub(super) template: ParamStore,
    pub(super) params: GpuParams,
    pub(super) grads: Temp<f32>,
    pub(super) cache: GpuAsaCache,
    pub(super) opts: Option<DevOpts>,
    pub(super) x: Option<Temp<f32>>,
    /// the last forward's draws (the seeds and the slot keep mask that its backward reads)
    pub(super) draws: Option<(Temp<u64>, Temp<f32>)>,
    pub(super) rng: ChaCha8Rng,
}

impl GpuLayerRunner<CudaBackend> {
    pub fn new(
        cfg: &ModelConfig,
        ids: AsaIds,
        params: &ParamStore,
        precision: Precision,
    ) -> Result<Self> {
        GpuLayerRunner::with_backend(CudaBackend::new(0)?, cfg, ids, params, precision)
    }
}

impl<B: Backend> GpuLayerRunner<B> {
    /// The layer on `be` (a CUDA device, or the tests' emulator).
    pub fn with_backend(
        be: B,
        cfg: &ModelConfig,
        ids: AsaIds,
        params: &ParamStore,
        precision: Precision,
    ) -> Result<Self> {
        be.set_precision(precision);
        let gp = GpuParams::upload(&be, params)?;
        let grads = be.temp::<f32>(gp.layout.total)?;
        let layer = GpuAsaLayer::new(&be, cfg, ids)?;
        Ok(GpuLayerRunner {
            be,
            layer,
            template: params.clone(),
            params: gp,
            grads,
            cache: GpuAsaCache::default(),
            opts: None,
            x: None,
            draws: None,
            rng: ChaCha8Rng::seed_from_u64(0),
        })
    }

    /// x: [B,T,C] -> out [B,T,C].
    pub fn forward(
        &mut self,
        x: &[f32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<Vec<f32>> {
        let c = self.layer.cfg.embed_dim;
        if x.len() != b * t * c {
            return Err(AsaError::Input(format!(
                "x must be [B,T,C] = [{b},{t},{c}], got {} values",
                x.len()
            )));
        }
        let mut o = DevOpts::new(&self.be, &self.layer.cfg, opts, b, t)?;
        self.be.clear_bf16_twins(); // the last forward's activations are written again
        let xd = self.be.temp_from(x)?;
        let (_s, out) = tmp(&self.be, b * t * c)?;
        // this layer's share of a one-block model's draws
        let all = StepDraws::draw(&mut self.rng, &self.layer.cfg, 1, opts.training);
        let seeds = self.be.temp_from(&all.seeds[1..3])?;
        let keep = self.be.temp_from(&all.keep)?;
        let dm = self.layer.dims(b, t);
        o.draw_noise(&self.be, &mut self.rng, 1, b * dm.h * t * dm.k)?;
        let draws = LayerDraws {
            seeds: seeds.dv(),
            keep: keep.dv(),
            noise: o.noise_of(0),
        };
        self.draws = Some((seeds, keep));
        self.layer.forward(
            &self.be,
            &self.params,
            xd.dv(),
            b,
            t,
            &o,
            &mut self.cache,
            draws,
            out,
        )?;
        self.x = Some(xd);
        self.opts = Some(o);
        self.be.download(out)
    }

    /// Backward of the last forward for dout [B,T,C]: (dx, parameter gradients).
    pub fn backward(&mut self, dout: &[f32]) -> Result<(Vec<f32>, ParamStore)> {
        let o = self
            .opts
            .as_ref()
            .ok_or_else(|| AsaError::Other("backward before forward".into()))?;
        let n = self.cache.b * self.cache.t * self.layer.cfg.embed_dim;
        if dout.len() != n {
            return Err(AsaError::Input(format!(
                "dout has {} values, expected {n}",
                dout.len()
            )));
        }
        let dd = self.be.temp_from(dout)?;
        let (_s, dx) = tmp_uninit(&self.be, n)?; // the layer's backward stores dx
        let g = self.grads.dv().sub(0, self.params.layout.total);
        self.be.memset_zero(g)?;
        self.layer.backward(
            &self.be,
            &self.params,
            g,
            &mut self.cache,
            o,
            (dd.dv().sub(0, n), Dv::null()),
            dx,
        )?;
        let dxh = self.be.download(dx)?;
        let flat = self.be.download(g)?;
        let mut out = self.template.clone();
        for (i, d) in out.data.iter_mut().enumerate() {
            let (o, l) = (self.params.layout.offs[i], self.params.layout.lens[i]);
            d.copy_from_slice(&flat[o..o + l]);
        }
        Ok((dxh, out))
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Sets the intervention settings (intervene variant; `AsaLayer::intervention`).
    pub fn set_intervention(&mut self, it: &Intervention) {
        self.layer.intervention = it.clone();
    }

    /// Fused write scan + read on (the default, unless `ASA_CUDA_FUSED=0`) or off (op by op).
    pub fn set_fused(&mut self, on: bool) {
        self.layer.fused = on;
    }

    /// Whether the last forward ran the fused write scan + read.
    pub fn fused_active(&self) -> bool {
        self.cache.fused.active()
    }

    /// The intervene variant's info tensors of the last forward (see
    /// `intervene::GpuIntvCache::info`); empty for the other variants.
    pub fn intervention_info(&self) -> Result<Info> {
        self.cache.intv.info(&self.be)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training forward's draws: a seed per dropout site and a keep mask per block, the
    /// same for the same generator state and new at the next step; an eval forward draws
    /// nothing (the generator untouched, seeds 0, every slot kept).
    #[test]
    fn step_draws_are_fixed_per_generator_and_absent_in_eval() {
        let cfg = ModelConfig {
            num_heads: 2,
            num_slots: 4,
            slot_dropout: 0.5,
            ..Default::default()
        };
        let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(3), ChaCha8Rng::seed_from_u64(3));
        let a = StepDraws::draw(&mut r1, &cfg, 3, true);
        let b = StepDraws::draw(&mut r2, &cfg, 3, true);
        assert_eq!((&a.seeds, &a.keep), (&b.seeds, &b.keep));
        assert_eq!(a.seeds.len(), 1 + SEEDS_PER_LAYER * 3);
        assert_eq!(a.keep.len(), 3 * 2 * 4);
        let distinct: std::collections::HashSet<u64> = a.seeds.iter().copied().collect();
        assert_eq!(distinct.len(), a.seeds.len(), "a seed per site");
        assert!(a.keep.iter().all(|&k| k == 0.0 || k == 1.0));
        assert!(a.keep.contains(&0.0) && a.keep.contains(&1.0), "p = 0.5");
        let next = StepDraws::draw(&mut r1, &cfg, 3, true);
        assert_ne!(next.seeds, a.seeds, "the next step's");
        let mut probe = r1.clone();
        let e = StepDraws::draw(&mut r1, &cfg, 3, false);
        assert_eq!(r1.gen::<u64>(), probe.gen::<u64>(), "eval draws nothing");
        assert!(e.seeds.iter().all(|&s| s == 0) && e.seeds.len() == a.seeds.len());
        assert!(e.keep.iter().all(|&k| k == 1.0) && e.keep.len() == a.keep.len());
        let off = ModelConfig {
            slot_dropout: 0.0,
            ..cfg
        };
        let k = StepDraws::draw(&mut r1, &off, 3, true);
        assert!(k.keep.iter().all(|&k| k == 1.0), "no slot dropout");
    }
}
