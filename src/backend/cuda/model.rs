//! The GPU ASA layer and language model: `AsaLayer::forward/backward` and
//! `Lm::forward/loss/backward` + `AdamW::step` + `clip_grad_norm`, composed from the CUDA
//! launchers in the same order as the CPU reference composes its ops (see `model::layer` and
//! `model::lm`; the comments name the CPU steps).
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
//! Supported on the GPU: the baseline and online variants, every routing mode except routing
//! noise, slot masks, attention masks, dropout / slot dropout / slotspace dropout (counter-based
//! RNG: reproducible per seed, not the CPU's stream), the intervene variant (`super::intervene`).
//! Not supported (a clear `AsaError`): routing noise, info tensors (beyond the intervene
//! variant's, `GpuLayerRunner::intervention_info`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ops::{DevRouting, DevSlotMask, Learned, SortedIds};
use super::{AsDv, Backend, CudaBackend, Dv, Temp};
use crate::backend::cpu::slot_ops::{self as cpu_asa, ReadMask, SlotDims};
use crate::config::AdamWConfig;
pub use crate::config::Precision;
use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::vocab::options::{AsaOptions, Info, Intervention, RoutingMode, SlotMaskWhere};
use crate::vocab::params::{sigmoid, softplus, AsaIds, LmIds, ParamId, ParamStore};

// ------------------------------------------------------------------------------------------------
// buffers

/// An f32 activation buffer of a layer cache.
type DBuf = super::DevBuf<f32>;

/// The bf16 twin of an activation that bf16 GEMMs read: written by the activation's producer
/// beside the f32 tensor, kept with it (issue 11: no conversion call per GEMM operand). Null
/// unless the device's GEMMs convert operands and its twins are on ([`Device::bf16_twins`]).
#[derive(Default)]
struct Twin {
    s: Option<Temp<u16>>,
    n: usize,
}

impl Twin {
    /// The twin of `x` (reallocated to its length), registered with the device until the next
    /// forward clears the registry: for activations that nothing writes again before then.
    fn of<B: Backend>(&mut self, be: &B, x: Dv<f32>) -> Result<Dv<u16>> {
        let d = self.scoped(be, x.len)?;
        if !d.is_null() {
            be.add_bf16_twin(x, d);
        }
        Ok(d)
    }
    /// [`Twin::of`] for an activation whose producer writes no twin (a GEMM's output): `x`
    /// converted once, here, for the forward's and the backward's GEMMs that read it.
    fn converted<B: Backend>(&mut self, be: &B, x: Dv<f32>) -> Result<()> {
        let d = self.of(be, x)?;
        if !d.is_null() {
            be.convert_f32_bf16(d, x)?;
        }
        Ok(())
    }
    /// A twin of `n` elements, not registered: for gradients, which a producer writes and
    /// [`Ops::with_bf16_twin`] hands to the GEMMs that read them.
    fn scoped<B: Backend>(&mut self, be: &B, n: usize) -> Result<Dv<u16>> {
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
type NormBufs<'a> = (&'a mut DBuf, &'a mut Twin, &'a mut DBuf, &'a mut DBuf);
/// A LayerNorm's outputs: (out, mean, rstd) and out's bf16 twin.
type NormOut = ((Dv<f32>, Dv<f32>, Dv<f32>), Dv<u16>);

/// A LayerNorm's outputs sized for `n` rows of `c`.
fn norm_out<B: Backend>(
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
fn tmp<B: Backend>(be: &B, n: usize) -> Result<(Temp<f32>, Dv<f32>)> {
    let s = be.temp::<f32>(n)?;
    let d = s.dv().sub(0, n);
    Ok((s, d))
}

/// [`tmp`] with unspecified contents, for a buffer its first kernel writes whole (no memset).
fn tmp_uninit<B: Backend>(be: &B, n: usize) -> Result<(Temp<f32>, Dv<f32>)> {
    let s = be.temp_uninit::<f32>(n)?;
    let d = s.dv().sub(0, n);
    Ok((s, d))
}

/// Flat layout of a `ParamStore`: one range per parameter, each starting at a multiple of
/// [`Layout::ALIGN`] elements (the gaps hold zeros, whose gradients and AdamW moments stay zero),
/// so that every weight's bf16 copy is 16-byte aligned for cuBLAS.
#[derive(Debug, Clone)]
struct Layout {
    offs: Vec<usize>,
    lens: Vec<usize>,
    total: usize,
}

impl Layout {
    fn of(p: &ParamStore) -> Self {
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
    fn flatten(&self, p: &ParamStore) -> Vec<f32> {
        let mut flat = vec![0.0; self.total];
        for (i, d) in p.data.iter().enumerate() {
            flat[self.offs[i]..self.offs[i] + d.len()].copy_from_slice(d);
        }
        flat
    }
    fn range(&self, base: Dv<f32>, id: ParamId) -> Dv<f32> {
        base.sub(self.offs[id], self.lens[id])
    }
    /// One range over the parameters `ids` when they lie back to back in that order (no
    /// alignment gap between them), e.g. the three projections of a fused QKV GEMM.
    fn span(&self, base: Dv<f32>, ids: &[ParamId]) -> Option<Dv<f32>> {
        let adjacent = ids
            .windows(2)
            .all(|w| self.offs[w[1]] == self.offs[w[0]] + self.lens[w[0]]);
        let len = ids.iter().map(|&i| self.lens[i]).sum();
        (adjacent && !ids.is_empty()).then(|| base.sub(self.offs[ids[0]], len))
    }
}

/// Parameters on the device: the flat buffer, its layout and host copies of the scalar params.
struct GpuParams {
    data: Temp<f32>,
    layout: Layout,
    /// host values of the 1-element parameters (others: NaN), refreshed after updates
    scalars: Vec<f32>,
    /// the 1-element parameters (gathered for the download that ends a step)
    scalar_ids: Vec<ParamId>,
    /// bf16 GEMMs: the weights rounded to bf16 [total], registered with the device and
    /// written by AdamW with the weights (after the upload: converted), so that no GEMM
    /// converts a weight
    bf16: Option<Temp<u16>>,
}

impl GpuParams {
    fn upload<B: Backend>(be: &B, p: &ParamStore) -> Result<Self> {
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
    fn all(&self) -> Dv<f32> {
        self.data.dv().sub(0, self.layout.total)
    }
    /// The bf16 copy after the upload of the weights (one conversion of them all).
    fn refresh_bf16<B: Backend>(&self, be: &B) -> Result<()> {
        match &self.bf16 {
            Some(c) => be.convert_f32_bf16(c.dv(), self.all()),
            None => Ok(()),
        }
    }
    fn p(&self, id: ParamId) -> Dv<f32> {
        self.layout
            .range(self.data.dv().sub(0, self.layout.total), id)
    }
    fn scalar(&self, id: ParamId) -> f32 {
        self.scalars[id]
    }
    /// Gathers the scalar parameters into `dst` [their number] by device copies, for the one
    /// download that ends a training step (was one download per scalar: 81 in the practice run).
    fn gather_scalars<B: Backend>(&self, be: &B, dst: Dv<f32>) -> Result<()> {
        for (i, &id) in self.scalar_ids.iter().enumerate() {
            be.copy(dst.sub(i, 1), self.p(id))?;
        }
        Ok(())
    }
    /// The host copies of the scalar parameters, from what [`Self::gather_scalars`] gathered.
    fn set_scalars(&mut self, vals: &[f32]) {
        for (&id, &v) in self.scalar_ids.iter().zip(vals) {
            self.scalars[id] = v;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// per-call options on the device

/// The forward options of one call, on the device.
struct DevOpts {
    valid: Option<Temp<u8>>,
    routing: RoutingMode,
    ext: Option<Temp<f32>>,
    slot_mask: Option<(Temp<i32>, bool, SlotMaskWhere)>,
    training: bool,
}

impl DevOpts {
    fn new<B: Backend>(
        be: &B,
        cfg: &ModelConfig,
        opts: &AsaOptions,
        b: usize,
        t: usize,
    ) -> Result<Self> {
        if opts.noise.is_some() {
            return Err(AsaError::Input(
                "routing noise is not supported on the CUDA backend (use the CPU)".into(),
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
        })
    }

    fn valid(&self) -> Dv<u8> {
        self.valid.dv()
    }

    fn routing(&self) -> DevRouting {
        match &self.routing {
            RoutingMode::Softmax => DevRouting::Softmax,
            RoutingMode::Top1 => DevRouting::Top1,
            RoutingMode::TopK(k) => DevRouting::TopK(*k),
            RoutingMode::External(_) => DevRouting::External(self.ext.dv()),
            RoutingMode::Override(_) => DevRouting::Override(self.ext.dv()),
        }
    }

    /// The slot mask of the read logits (`read` and `content_read_only`).
    fn read_mask(&self) -> Option<DevSlotMask> {
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
struct DevRope {
    t: usize,
    cos: Temp<f32>,
    sin: Temp<f32>,
}

impl DevRope {
    fn ensure<B: Backend>(
        slot: &mut Option<DevRope>,
        be: &B,
        t: usize,
        dim: usize,
        base: f64,
    ) -> Result<()> {
        if slot.as_ref().map(|r| r.t) != Some(t) {
            let tab = cpu_asa::rope_table(t, dim, base);
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
    b: usize,
    t: usize,
    x: Option<Dv<f32>>, // [B,T,C] layer input (owned by the caller)
    kp: DBuf,
    vp: DBuf,
    qp: DBuf,
    k_h: DBuf,    // [B,H,T,d]
    k_n: DBuf,    // [B,H,T,d] (normalize_k)
    k_norm: DBuf, // [B,H,T]
    k_r: DBuf,    // [B,H,T,d] (RoPE)
    v_h: DBuf,
    q_h: DBuf,
    keys: DBuf, // [H,K,d]
    /// [H,K] the slot keep mask of the last forward (owned by the caller: the batch's draws)
    key_keep: Option<Dv<f32>>,
    raw: DBuf, // [B,H,K,T]
    wl: DBuf,
    state: DBuf, // [B,H,T,K,d]
    den: DBuf,   // [B,H,K,T]
    rmax: DBuf,
    lkey: DBuf, // [B,H,T,K]
    lcont: DBuf,
    logits: DBuf,
    rw: DBuf,
    out_h: DBuf, // [B,H,T,d] out1 (+ gate * delta unless the fused mix merged that)
    merged: DBuf,
    merged16: Twin,
    proj: DBuf,
    drop: DBuf,
    has_drop: bool,
    // slotspace
    rw16: Twin,
    u: DBuf,
    u16: Twin,
    vs: DBuf,
    qs: DBuf,
    ks: DBuf,
    qf: DBuf,
    kf: DBuf,
    u2: DBuf,
    ss_den: DBuf,
    /// the linear attention's forward carries, kept for its backward
    ss_carries: Option<Temp<f64>>,
    ss_drop: DBuf,
    u2d: DBuf,
    u2d16: Twin,
    has_ss_drop: bool,
    z: DBuf,
    sw_pre: DBuf,
    sw: DBuf,
    delta: DBuf,
    gamma: f32,
    gate: f32,
    /// nullable: this layer's [`STEP_SCALARS`] slots of the step's scalar block (uploaded with
    /// the batch), where the fused kernels read gamma, the gate and the gradient factors
    step_scalars: Option<Dv<f64>>,
    /// intervene variant: out1, thresholds, logs (`super::intervene`)
    intv: super::intervene::GpuIntvCache,
    /// the fused write scan + read (`super::fused`): plan, carries, workspace
    fused: super::fused::FusedState,
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
    rope: Option<DevRope>,
    rope_ss: Option<DevRope>,
}

impl GpuAsaLayer {
    fn new<B: Backend>(be: &B, cfg: &ModelConfig, ids: AsaIds) -> Result<Self> {
        let slopes = if cfg.use_alibi_write {
            cpu_asa::alibi_slopes(cfg.num_heads)
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

    fn dims(&self, b: usize, t: usize) -> SlotDims {
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
    fn step_scalars(&self, p: &GpuParams) -> [f64; STEP_SCALARS] {
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

    fn content_gamma(&self, p: &GpuParams) -> f32 {
        match self.ids.content_read_gamma {
            Some(i) => {
                let g = softplus(p.scalar(i) as f64);
                let mx = self.cfg.content_read_max_gamma;
                (if mx > 0.0 { g.min(mx) } else { g }) as f32
            }
            None => 0.0,
        }
    }

    /// Forward: x [B,T,C] -> out [B,T,C] (`AsaLayer::forward`).
    #[allow(clippy::too_many_arguments)]
    fn forward<B: Backend>(
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
        let fplan = if self.fused {
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
            let rtemp = cfg.read_temperature.max(1e-6) as f32;
            let rw = c_.rw.ensure(be, bhtk)?;
            be.read_weights_forward(
                rw,
                logits,
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

    fn slotspace_forward<B: Backend>(
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
    fn backward<B: Backend>(
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
            be.read_weights_backward(
                dlogits,
                drw,
                c_.rw.dv(),
                c_.logits.dv(),
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

#[derive(Default)]
struct GpuBlockCache {
    ln1: DBuf,
    ln1_16: Twin,
    ln1_mean: DBuf,
    ln1_rstd: DBuf,
    attn: GpuAsaCache,
    attn_out: DBuf,
    x1: DBuf,
    ln2: DBuf,
    ln2_16: Twin,
    ln2_mean: DBuf,
    ln2_rstd: DBuf,
    h: DBuf,
    g: DBuf,
    g16: Twin,
    gd: DBuf,
    gmask: DBuf,
    m: DBuf,
    md: DBuf,
    mmask: DBuf,
    dropped: bool,
}

impl GpuBlockCache {
    fn ln1_bufs(&mut self) -> NormBufs<'_> {
        (
            &mut self.ln1,
            &mut self.ln1_16,
            &mut self.ln1_mean,
            &mut self.ln1_rstd,
        )
    }
    fn ln2_bufs(&mut self) -> NormBufs<'_> {
        (
            &mut self.ln2,
            &mut self.ln2_16,
            &mut self.ln2_mean,
            &mut self.ln2_rstd,
        )
    }
}

/// Slots per layer in the step's scalar block ([`GpuAsaLayer::step_scalars`]).
const STEP_SCALARS: usize = 6;

/// One call's batch on the device, uploaded as one queued copy (no host sync): token ids
/// [B*T], targets [B*T] (when given), the positions sorted by id for the embedding gradient,
/// and the step's scalar block (f64, [`STEP_SCALARS`] a layer: what the kernels would otherwise
/// get by value from the host, so that their arguments stay the same from step to step).
struct DevBatch {
    _buf: Temp<u8>,
    ids: Dv<u32>,
    targets: Dv<i64>,
    sorted: SortedIds,
    scalars: Dv<f64>,
    /// the step's draws ([`StepDraws`]): the dropout seeds and the slot keep masks
    seeds: Dv<u64>,
    keep: Dv<f32>,
}

/// Dropout sites per block ([`StepDraws`]): attention output, slotspace, MLP hidden, MLP out.
const SEEDS_PER_LAYER: usize = 4;

/// A step's randomness, drawn on the host and uploaded with the batch, so that a replayed
/// graph reads each step's own: a dropout seed per site (the embeddings', then
/// [`SEEDS_PER_LAYER`] per block) and each block's slot keep mask [H,K] (1 kept, 0 dropped).
struct StepDraws {
    seeds: Vec<u64>,
    keep: Vec<f32>,
}

impl StepDraws {
    /// Drawn from `rng` in a fixed order (the seeds, then the keep masks layer by layer; a
    /// keep draw only where slot dropout is on) for a training forward; else nothing is
    /// drawn (seeds 0, every slot kept).
    fn draw(rng: &mut ChaCha8Rng, cfg: &ModelConfig, layers: usize, training: bool) -> Self {
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
struct LayerDraws {
    /// the attention output's and the slotspace's dropout seeds
    seeds: Dv<u64>,
    /// the slot keep mask [H,K]
    keep: Dv<f32>,
}

impl DevBatch {
    fn upload<B: Backend>(
        be: &B,
        ids: &[u32],
        targets: Option<&[i64]>,
        vocab: usize,
        scalars: &[f64],
        draws: &StepDraws,
    ) -> Result<Self> {
        let (mut uniq, mut start, order) = super::ops::sort_positions_by_id(ids, vocab)?;
        // padded to one run per position (empty runs, which `encoder_backward` skips): the same
        // layout and launch for every batch of this shape
        let n = ids.len();
        uniq.resize(n.max(uniq.len()), 0);
        start.resize(uniq.len() + 1, n as i32);
        let mut bytes: Vec<u8> = Vec::new();
        // each part at a 256-byte offset (device alignment for any element type)
        let mut part = |x: &[u8]| {
            let off = bytes.len().div_ceil(256) * 256;
            bytes.resize(off, 0);
            bytes.extend_from_slice(x);
            off
        };
        let o_ids = part(plain_bytes(ids));
        let o_tg = part(plain_bytes(targets.unwrap_or(&[])));
        let o_uniq = part(plain_bytes(&uniq));
        let o_start = part(plain_bytes(&start));
        let o_order = part(plain_bytes(&order));
        let o_sc = part(plain_bytes(scalars));
        let o_seeds = part(plain_bytes(&draws.seeds));
        let o_keep = part(plain_bytes(&draws.keep));
        let buf = be.temp_uninit::<u8>(bytes.len())?; // the upload writes every byte
        be.upload_async(buf.dv(), &bytes)?;
        let base = buf.dv().ptr;
        // SAFETY: each range lies inside `buf` (offsets and lengths of the parts above) at a
        // 256-byte aligned address, and holds plain data of its type (integers, floats).
        unsafe {
            Ok(DevBatch {
                ids: Dv::from_raw(base + o_ids as u64, ids.len()),
                targets: Dv::from_raw(base + o_tg as u64, targets.map_or(0, |t| t.len())),
                sorted: SortedIds {
                    uniq: Dv::from_raw(base + o_uniq as u64, uniq.len()),
                    start: Dv::from_raw(base + o_start as u64, start.len()),
                    order: Dv::from_raw(base + o_order as u64, order.len()),
                },
                scalars: Dv::from_raw(base + o_sc as u64, scalars.len()),
                seeds: Dv::from_raw(base + o_seeds as u64, draws.seeds.len()),
                keep: Dv::from_raw(base + o_keep as u64, draws.keep.len()),
                _buf: buf,
            })
        }
    }
}

/// An f64 range as its f32 words (for device copies, which move f32s).
fn f64_words(x: Dv<f64>) -> Dv<f32> {
    // SAFETY: the same bytes, twice as many 4-byte words.
    unsafe { Dv::from_raw(x.ptr, 2 * x.len) }
}

/// Plain numbers: no padding, every byte initialised.
trait Plain: Copy {}
impl Plain for u32 {}
impl Plain for i32 {}
impl Plain for i64 {}
impl Plain for u64 {}
impl Plain for f32 {}
impl Plain for f64 {}

/// The bytes of a slice of plain numbers (host and device are both little-endian).
fn plain_bytes<T: Plain>(x: &[T]) -> &[u8] {
    // SAFETY: `x` is `size_of_val(x)` initialised bytes of padding-free numbers.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

#[derive(Default)]
struct GpuLmCache {
    b: usize,
    t: usize,
    batch: Option<DevBatch>,
    emb: DBuf,
    emask: DBuf,
    emb_dropped: bool,
    /// residual stream entering block l (xs[L] = final residual)
    xs: Vec<DBuf>,
    blocks: Vec<GpuBlockCache>,
    lnf: DBuf,
    lnf16: Twin,
    lnf_mean: DBuf,
    lnf_rstd: DBuf,
}

impl GpuLmCache {
    fn lnf_bufs(&mut self) -> NormBufs<'_> {
        (
            &mut self.lnf,
            &mut self.lnf16,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
        )
    }
}

/// The ASM language model on one CUDA device: f32 master weights, gradients and AdamW state on
/// the device; forward, fused classifier + cross-entropy, backward, clipping and AdamW on the GPU.
pub struct GpuLm<B: Backend = CudaBackend> {
    be: B,
    pub cfg: ModelConfig,
    ids: LmIds,
    template: ParamStore,
    params: GpuParams,
    grads: Temp<f32>,
    /// sum of the micro-batch gradients under gradient accumulation (allocated on first use)
    grad_acc: Option<Temp<f32>>,
    adam: Option<(Temp<f32>, Temp<f32>, u64)>,
    /// the AdamW scalars of the step being run ([`super::ops::adamw_step_scalars`] for its
    /// learning rate and step count), set before its forward so that they go up in the step's
    /// scalar block with the batch
    adam_pending: Option<[f32; 3]>,
    /// what a training step reads back ([`GpuLm::update_body`]), kept from step to step
    readback: Option<Temp<f32>>,
    /// CUDA graph capture of the training step ([`super::graph`])
    graph: super::graph::GraphState,
    layers: Vec<GpuAsaLayer>,
    cache: GpuLmCache,
    rng: ChaCha8Rng,
    pub precision: Precision,
    /// rows of logits materialised at once by the fused classifier are capped so that a block
    /// holds at most this many floats
    pub logits_budget: usize,
}

/// One optimizer update's numbers ([`GpuLm::begin_update`] to [`GpuLm::finish_update`]): the
/// step it makes (1-based), its learning rate, and the loss sums it reads back.
#[derive(Clone, Copy, Debug)]
struct Update {
    step: u64,
    lr: f64,
    losses: usize,
}

impl Update {
    /// f32 words read back: the norm and the loss sums as f64s, then `scalars` parameters.
    fn words(&self, scalars: usize) -> usize {
        2 * (1 + self.losses) + scalars
    }
}

impl GpuLm<CudaBackend> {
    /// Uploads `params` (laid out as `LmIds::build(cfg)` lays them out) to device 0.
    pub fn new(cfg: &ModelConfig, params: &ParamStore, precision: Precision) -> Result<Self> {
        GpuLm::with_backend(CudaBackend::new(0)?, cfg, params, precision)
    }
}

impl<B: Backend> GpuLm<B> {
    /// The model on `be` (a CUDA device, or the tests' emulator).
    pub fn with_backend(
        be: B,
        cfg: &ModelConfig,
        params: &ParamStore,
        precision: Precision,
    ) -> Result<Self> {
        cfg.validate()?;
        be.set_precision(precision);
        let (template, ids) = LmIds::build(cfg);
        if template.names != params.names || template.shapes != params.shapes {
            return Err(AsaError::Input(
                "GpuLm::new: the parameters do not match the model config (names or shapes differ)"
                    .into(),
            ));
        }
        let gp = GpuParams::upload(&be, params)?;
        let grads = be.temp::<f32>(gp.layout.total)?;
        let layers = ids
            .blocks
            .iter()
            .map(|bl| GpuAsaLayer::new(&be, cfg, bl.attn.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuLm {
            be,
            cfg: cfg.clone(),
            ids,
            template: params.clone(),
            params: gp,
            grads,
            grad_acc: None,
            adam: None,
            adam_pending: None,
            readback: None,
            graph: super::graph::GraphState::default(),
            layers,
            cache: GpuLmCache::default(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_d20b),
            precision,
            logits_budget: 1 << 25,
        })
    }

    /// The backend (device name, stream).
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Sets the intervention of every layer (intervene variant; `Lm::set_intervention`).
    pub fn set_intervention(&mut self, it: &Intervention) {
        for l in &mut self.layers {
            l.intervention = it.clone();
        }
    }

    /// Fused write scan + read on (the default, unless `ASA_CUDA_FUSED=0`) or off (op by op).
    pub fn set_fused(&mut self, on: bool) {
        for l in &mut self.layers {
            l.fused = on;
        }
    }

    /// Reseeds the dropout / slot-dropout generator.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    fn check_ids(&self, ids: &[u32], b: usize, t: usize) -> Result<()> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(AsaError::Input(format!(
                "expected {b}x{t} token ids, got {}",
                ids.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(AsaError::Input(format!(
                "token id {bad} is out of range for vocab_size {}",
                self.cfg.vocab_size
            )));
        }
        if self.cfg.use_abs_pos && t > self.cfg.max_seq_len {
            return Err(AsaError::Input(format!(
                "sequence length {t} exceeds max_seq_len {} (learned absolute positions)",
                self.cfg.max_seq_len
            )));
        }
        Ok(())
    }

    /// Sends a forward's batch up in one queued copy: the ids, the `targets` when given, the
    /// step's scalar block (the learned scalars, and AdamW's for a training step) and its
    /// random draws (a `training` forward's; [`StepDraws`]).
    fn upload_batch(
        &mut self,
        ids: &[u32],
        targets: Option<&[i64]>,
        b: usize,
        t: usize,
        training: bool,
    ) -> Result<()> {
        self.check_ids(ids, b, t)?;
        let draws = StepDraws::draw(&mut self.rng, &self.cfg, self.layers.len(), training);
        let p = &self.params;
        let mut scalars: Vec<f64> = self.layers.iter().flat_map(|l| l.step_scalars(p)).collect();
        // then AdamW's of the step (a training step's forward)
        scalars.extend(self.adam_pending.iter().flatten().map(|&x| x as f64));
        self.cache.batch = None; // the last call's buffer back to the cache first: it serves this one
        let up = DevBatch::upload(
            &self.be,
            ids,
            targets,
            self.cfg.vocab_size,
            &scalars,
            &draws,
        )?;
        self.cache.batch = Some(up);
        self.cache.b = b;
        self.cache.t = t;
        Ok(())
    }

    /// Forward of the uploaded batch ([`GpuLm::upload_batch`]) to the final LayerNorm output
    /// (`Lm::forward` up to `ln_f`).
    fn forward_body(&mut self, b: usize, t: usize, o: &DevOpts) -> Result<()> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (c, hid) = (cfg.embed_dim, cfg.hidden_dim());
        let n = b * t;
        let p = &self.params;
        let cache = &mut self.cache;
        assert_eq!(
            (cache.b, cache.t),
            (b, t),
            "forward_body: the batch uploaded"
        );
        // the last forward's activations are written again from here on
        be.clear_bf16_twins();
        let batch = cache.batch.as_ref().expect("a batch uploaded");
        let ids_d = batch.ids;
        let step_scalars = batch.scalars;
        let (seeds, keep) = (batch.seeds, batch.keep);
        let hk = cfg.num_heads * cfg.num_slots;
        // a site's seed: 0 the embeddings', then SEEDS_PER_LAYER per block
        let seed = |l: usize, site: usize| (0, seeds.sub(1 + SEEDS_PER_LAYER * l + site, 1));
        let pdrop = if o.training { cfg.dropout as f32 } else { 0.0 };
        let nl = cfg.num_layers;
        cache.xs.resize_with(nl + 1, DBuf::default);
        cache.blocks.resize_with(nl, GpuBlockCache::default);

        // embeddings [B,T,C]
        let wpe = self.ids.pos_emb.map(|i| p.p(i)).unwrap_or_else(Dv::null);
        let x0 = cache.xs[0].ensure(be, n * c)?;
        cache.emb_dropped = pdrop > 0.0;
        if cache.emb_dropped {
            let emb = cache.emb.ensure(be, n * c)?;
            be.encoder_forward(emb, ids_d, p.p(self.ids.token_emb), wpe, b, t, c)?;
            let em = cache.emask.ensure(be, n * c)?;
            be.dropout_forward(x0, em, emb, pdrop, (0, seeds.sub(0, 1)))?;
        } else {
            be.encoder_forward(x0, ids_d, p.p(self.ids.token_emb), wpe, b, t, c)?;
        }

        // the first norm (block 0's LN1, or LNf without blocks); every later one is fused with
        // the residual step before it (`residual_layernorm_forward`)
        let (ln_w, ln_b) = match self.ids.blocks.first() {
            Some(bid) => (p.p(bid.ln_1_w), p.p(bid.ln_1_b)),
            None => (p.p(self.ids.ln_f_w), p.p(self.ids.ln_f_b)),
        };
        let ((ln, lm, lr), l16) = match cache.blocks.first_mut() {
            Some(bc) => norm_out(be, bc.ln1_bufs(), n, c)?,
            None => norm_out(be, cache.lnf_bufs(), n, c)?,
        };
        be.layernorm_forward(ln, lm, lr, x0, ln_w, ln_b, n, c, l16)?;
        for l in 0..nl {
            let bid = &self.ids.blocks[l];
            let x = cache.xs[l].dv();
            let xn = cache.xs[l + 1].ensure(be, n * c)?;
            let (done, next) = cache.blocks.split_at_mut(l + 1);
            let bc = &mut done[l];
            let ln1 = bc.ln1.dv(); // made by the norm before this block
            let attn_out = bc.attn_out.ensure(be, n * c)?;
            bc.attn.step_scalars = Some(step_scalars.sub(l * STEP_SCALARS, STEP_SCALARS));
            let draws = LayerDraws {
                seeds: seeds.sub(1 + SEEDS_PER_LAYER * l, 2),
                keep: keep.sub(l * hk, hk),
            };
            self.layers[l].forward(be, p, ln1, b, t, o, &mut bc.attn, draws, attn_out)?;
            // x1 = x + attn, ln2 = LN2(x1)
            let x1 = bc.x1.ensure(be, n * c)?;
            let ((ln2, m2, r2), ln2_16) = norm_out(be, bc.ln2_bufs(), n, c)?;
            let (w2, b2) = (p.p(bid.ln_2_w), p.p(bid.ln_2_b));
            let io = ((x1, ln2, m2, r2), (x, attn_out, Dv::null()));
            be.residual_layernorm_forward(io.0, io.1, w2, b2, n, c, ln2_16)?;
            // h = ln2 W0^T (+ b0, added by the GELU's pass), g = gelu(h)
            let hh = bc.h.ensure(be, n * hid)?;
            be.matmul_forward(hh, ln2, p.p(bid.mlp_0_w), Dv::null(), n, c, hid)?;
            let g = bc.g.ensure(be, n * hid)?;
            bc.dropped = pdrop > 0.0;
            // the GEMM reads g itself only without dropout
            let g16 = if bc.dropped {
                Dv::null()
            } else {
                bc.g16.of(be, g)?
            };
            match bid.mlp_0_b {
                Some(b0) => be.bias_gelu_forward(g, hh, p.p(b0), n, hid, g16)?,
                None => be.gelu_forward(g, hh, g16)?,
            }
            let gd = if bc.dropped {
                let gd = bc.gd.ensure(be, n * hid)?;
                let gm = bc.gmask.ensure(be, n * hid)?;
                be.dropout_forward(gd, gm, g, pdrop, seed(l, 2))?;
                gd
            } else {
                g
            };
            // without dropout the second MLP GEMM's bias joins the residual step below
            let bias3 = bid.mlp_3_b.map(|i| p.p(i)).unwrap_or_else(Dv::null);
            let (gemm_bias, res_bias) = if bc.dropped {
                (bias3, Dv::null())
            } else {
                (Dv::null(), bias3)
            };
            let mm = bc.m.ensure(be, n * c)?;
            be.matmul_forward(mm, gd, p.p(bid.mlp_3_w), gemm_bias, n, hid, c)?;
            let md = if bc.dropped {
                let md = bc.md.ensure(be, n * c)?;
                let mk = bc.mmask.ensure(be, n * c)?;
                be.dropout_forward(md, mk, mm, pdrop, seed(l, 3))?;
                md
            } else {
                mm
            };
            // xn = x1 + mlp, then the next norm: the next block's LN1, or LNf
            let (((ln, lm, lr), l16), lw, lb) = match next.first_mut() {
                Some(nb) => {
                    let nbid = &self.ids.blocks[l + 1];
                    let o = norm_out(be, nb.ln1_bufs(), n, c)?;
                    (o, p.p(nbid.ln_1_w), p.p(nbid.ln_1_b))
                }
                None => {
                    let o = norm_out(be, cache.lnf_bufs(), n, c)?;
                    (o, p.p(self.ids.ln_f_w), p.p(self.ids.ln_f_b))
                }
            };
            let io = ((xn, ln, lm, lr), (x1, md, res_bias));
            be.residual_layernorm_forward(io.0, io.1, lw, lb, n, c, l16)?;
        }
        Ok(())
    }

    /// Logits [B,T,V] of an eval-mode forward (`Lm::forward` with default options and an
    /// optional attention mask [B,T]).
    pub fn forward_logits(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        mask: Option<&[bool]>,
    ) -> Result<Vec<f32>> {
        let opts = AsaOptions {
            attention_mask: mask.map(|m| m.to_vec()),
            ..Default::default()
        };
        self.forward_logits_opts(ids, b, t, &opts)
    }

    /// Logits [B,T,V] with explicit forward options (routing modes, slot masks, ...).
    pub fn forward_logits_opts(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<Vec<f32>> {
        let o = DevOpts::new(&self.be, &self.cfg, opts, b, t)?;
        self.upload_batch(ids, None, b, t, opts.training)?;
        self.forward_body(b, t, &o)?;
        let (c, v, n) = (self.cfg.embed_dim, self.cfg.vocab_size, b * t);
        let (_s, logits) = tmp_uninit(&self.be, n * v)?; // the GEMM stores it whole
        self.be.matmul_forward(
            logits,
            self.cache.lnf.dv(),
            self.params.p(self.ids.head()),
            Dv::null(),
            n,
            c,
            v,
        )?;
        self.be.download(logits)
    }

    /// Counted rows (valid and target >= 0); a counted target >= V is an input error.
    fn count_targets(&self, targets: &[i64], valid: Option<&[bool]>, n: usize) -> Result<usize> {
        let v = self.cfg.vocab_size;
        if targets.len() != n {
            return Err(AsaError::Input(format!(
                "expected {n} targets, got {}",
                targets.len()
            )));
        }
        if let Some(m) = valid {
            if m.len() != n {
                return Err(AsaError::Input(format!(
                    "attention_mask has {} entries, expected B*T = {n}",
                    m.len()
                )));
            }
        }
        let mut count = 0;
        for (r, &tg) in targets.iter().enumerate() {
            if valid.is_none_or(|m| m[r]) && tg >= 0 {
                if tg as u64 >= v as u64 {
                    return Err(AsaError::Input(format!(
                        "target id {tg} out of range for vocab {v}"
                    )));
                }
                count += 1;
            }
        }
        if count == 0 {
            return Err(AsaError::Input(
                "no valid target positions in the batch".into(),
            ));
        }
        Ok(count)
    }

    /// Fused classifier + cross-entropy forward (and, given `dlnf`, backward), in row blocks:
    /// per block the logits [R,V] are formed (cuBLAS), turned into probabilities and row
    /// losses, then in place into dlogits, which flow to d(lnf) and d(head weight) right away.
    /// At most `logits_budget` floats of logits exist at once. Returns the summed loss on the
    /// device.
    fn head_loss(
        &self,
        targets_d: Dv<i64>,
        valid: Dv<u8>,
        count: usize,
        dlnf: Option<Dv<f32>>,
    ) -> Result<Temp<f64>> {
        let be = &self.be;
        let (b, t) = (self.cache.b, self.cache.t);
        let (c, v, n) = (self.cfg.embed_dim, self.cfg.vocab_size, b * t);
        let rows = (self.logits_budget / v.max(1)).clamp(1, n);
        let (_s, blk) = tmp_uninit(be, rows * v)?; // each block's GEMM stores it whole
        let mut blk16 = Twin::default(); // the logits gradient's bf16 twin
        let blk16 = blk16.scoped(be, if dlnf.is_some() { rows * v } else { 0 })?;
        let row_loss = be.temp::<f64>(n)?;
        let lnf = self.cache.lnf.dv();
        let head = self.ids.head();
        let w = self.params.p(head);
        let gw = self
            .params
            .layout
            .range(self.grads.dv().sub(0, self.params.layout.total), head);
        let scale = 1.0 / count as f32;
        let mut r0 = 0;
        while r0 < n {
            let r = rows.min(n - r0);
            let lg = blk.sub(0, r * v);
            let x = lnf.sub(r0 * c, r * c);
            let tg = targets_d.sub(r0, r);
            let vl = if valid.is_null() {
                valid
            } else {
                valid.sub(r0, r)
            };
            be.matmul_forward(lg, x, w, Dv::null(), r, c, v)?;
            let rl = row_loss.dv().sub(r0, r);
            if let Some(dlnf) = dlnf {
                let lg16 = if blk16.is_null() {
                    blk16
                } else {
                    blk16.sub(0, r * v)
                };
                // the row losses, and dlogits in place of the logits, in one pass
                be.crossentropy_forward_backward(lg, rl, tg, vl, scale, r, v, lg16)?;
                let dx = dlnf.sub(r0 * c, r * c);
                be.with_bf16_twin(lg, lg16, || {
                    be.matmul_backward(dx, gw, Dv::null(), lg, x, w, r, c, v)
                })?;
            } else {
                be.crossentropy_forward(lg, rl, lg, tg, vl, r, v)?;
            }
            r0 += r;
        }
        let sum = be.temp::<f64>(1)?;
        be.sum_f64(sum.dv(), row_loss.dv(), false)?;
        Ok(sum)
    }

    /// Backward from d(lnf) through the blocks to the embeddings (`Lm::backward_from_logits`
    /// after the head). Gradients are added into the flat gradient buffer.
    fn backward_body(&mut self, dlnf: Dv<f32>, o: &DevOpts) -> Result<()> {
        let be = &self.be;
        let cfg = &self.cfg;
        let (b, t) = (self.cache.b, self.cache.t);
        let (c, hid) = (cfg.embed_dim, cfg.hidden_dim());
        let n = b * t;
        let p = &self.params;
        let g = self.grads.dv().sub(0, p.layout.total);
        let gr = |id: ParamId| p.layout.range(g, id);
        let nl = cfg.num_layers;
        let (_sx, dx) = tmp(be, n * c)?;
        // bf16 twins of the gradients that GEMMs read: dx (the residual stream's), dh (the MLP's)
        let (mut dx16, mut dh16) = (Twin::default(), Twin::default());
        let dx16 = dx16.scoped(be, n * c)?;
        let dh16 = dh16.scoped(be, n * hid)?;
        be.layernorm_backward(
            dx,
            gr(self.ids.ln_f_w),
            gr(self.ids.ln_f_b),
            dlnf,
            self.cache.xs[nl].dv(),
            p.p(self.ids.ln_f_w),
            self.cache.lnf_mean.dv(),
            self.cache.lnf_rstd.dv(),
            n,
            c,
            dx16,
        )?;
        let (_s1, dm_buf) = tmp(be, n * c)?;
        // stored whole by their producers: matmul_backward_store, gelu_backward, the layer's
        // backward (no memsets)
        let (_s2, dgd) = tmp_uninit(be, n * hid)?;
        let (_s3, dg_buf) = tmp(be, n * hid)?;
        let (_s4, dh) = tmp_uninit(be, n * hid)?;
        let (_s5, dln2) = tmp_uninit(be, n * c)?;
        let (_s6, dln1) = tmp_uninit(be, n * c)?;
        for l in (0..nl).rev() {
            let bid = &self.ids.blocks[l];
            let bc = &mut self.cache.blocks[l];
            // x2 = x1 + drop(mlp3(drop(gelu(mlp0(ln2(x1))))))
            let (dm, dm16) = if bc.dropped {
                be.memset_zero(dm_buf)?;
                be.dropout_backward(dm_buf, dx, bc.mmask.dv())?;
                (dm_buf, Dv::null())
            } else {
                (dx, dx16)
            };
            let gd = if bc.dropped { bc.gd.dv() } else { bc.g.dv() };
            // (mlp_3's bias gradient joins gelu_backward's launch below)
            be.with_bf16_twin(dm, dm16, || {
                be.matmul_backward_store(
                    dgd,
                    gr(bid.mlp_3_w),
                    Dv::null(),
                    dm,
                    gd,
                    p.p(bid.mlp_3_w),
                    n,
                    hid,
                    c,
                )
            })?;
            let dg = if bc.dropped {
                be.memset_zero(dg_buf)?;
                be.dropout_backward(dg_buf, dgd, bc.gmask.dv())?;
                dg_buf
            } else {
                dgd
            };
            // with the first MLP GEMM's bias gradient (the column sums of dh) and, in the same
            // launch, the second's (of dm)
            let dbias0 = bid.mlp_0_b.map(gr).unwrap_or_else(Dv::null);
            let bias3 = match bid.mlp_3_b {
                Some(id) => (gr(id), dm),
                None => (Dv::null(), Dv::null()),
            };
            be.gelu_backward(dh, bc.h.dv(), dg, dh16, dbias0, bias3)?;
            be.with_bf16_twin(dh, dh16, || {
                be.matmul_backward_store(
                    dln2,
                    gr(bid.mlp_0_w),
                    Dv::null(),
                    dh,
                    bc.ln2.dv(),
                    p.p(bid.mlp_0_w),
                    n,
                    c,
                    hid,
                )
            })?;
            // dx1 = dx + LN2 backward (in place on dx)
            be.layernorm_backward(
                dx,
                gr(bid.ln_2_w),
                gr(bid.ln_2_b),
                dln2,
                bc.x1.dv(),
                p.p(bid.ln_2_w),
                bc.ln2_mean.dv(),
                bc.ln2_rstd.dv(),
                n,
                c,
                dx16,
            )?;
            // x1 = x + attn(ln1(x))
            self.layers[l].backward(be, p, g, &mut bc.attn, o, (dx, dx16), dln1)?;
            be.layernorm_backward(
                dx,
                gr(bid.ln_1_w),
                gr(bid.ln_1_b),
                dln1,
                self.cache.xs[l].dv(),
                p.p(bid.ln_1_w),
                bc.ln1_mean.dv(),
                bc.ln1_rstd.dv(),
                n,
                c,
                dx16,
            )?;
        }
        let demb = if self.cache.emb_dropped {
            be.memset_zero(dm_buf)?;
            be.dropout_backward(dm_buf, dx, self.cache.emask.dv())?;
            dm_buf
        } else {
            dx
        };
        let gwpe = self.ids.pos_emb.map(gr).unwrap_or_else(Dv::null);
        let sorted = self.cache.batch.as_ref().expect("a forward before").sorted;
        be.encoder_backward_sorted(gr(self.ids.token_emb), gwpe, demb, sorted, b, t, c)?;
        Ok(())
    }

    /// Forward, loss and backward of the uploaded batch into the (zeroed) gradient buffer;
    /// returns the summed loss, still on the device.
    fn loss_backward_body(&mut self, count: usize, o: &DevOpts) -> Result<Temp<f64>> {
        let (b, t) = (self.cache.b, self.cache.t);
        let n = b * t;
        self.forward_body(b, t, o)?;
        self.be.memset_zero(self.grads.dv())?;
        let (_s, dlnf) = tmp(&self.be, n * self.cfg.embed_dim)?;
        let targets_d = self.cache.batch.as_ref().expect("uploaded before").targets;
        let sum = self.head_loss(targets_d, o.valid(), count, Some(dlnf))?;
        self.backward_body(dlnf, o)?;
        Ok(sum)
    }

    /// Uploads a batch, then forward, loss and backward (`loss_backward_body`); returns the
    /// summed loss on the device and the target count.
    fn loss_backward(
        &mut self,
        ids: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<(Temp<f64>, usize)> {
        let n = b * t;
        let count = self.count_targets(targets, opts.attention_mask.as_deref(), n)?;
        let o = DevOpts::new(&self.be, &self.cfg, opts, b, t)?;
        self.upload_batch(ids, Some(targets), b, t, opts.training)?;
        let sum = self.loss_backward_body(count, &o)?;
        Ok((sum, count))
    }

    /// Mean loss and the gradients of every parameter (eval mode: no dropout), for parity tests.
    pub fn loss_and_grads(
        &mut self,
        ids: &[u32],
        targets: &[i64],
        mask: Option<&[bool]>,
        b: usize,
        t: usize,
    ) -> Result<(f64, ParamStore)> {
        let opts = AsaOptions {
            attention_mask: mask.map(|m| m.to_vec()),
            ..Default::default()
        };
        self.loss_and_grads_opts(ids, targets, b, t, &opts)
    }

    /// `loss_and_grads` with explicit forward options.
    pub fn loss_and_grads_opts(
        &mut self,
        ids: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        opts: &AsaOptions,
    ) -> Result<(f64, ParamStore)> {
        let (sum, count) = self.loss_backward(ids, targets, b, t, opts)?;
        let loss = self.be.download(sum.dv())?[0] / count as f64;
        let flat = self
            .be
            .download(self.grads.dv().sub(0, self.params.layout.total))?;
        Ok((loss, self.unflatten(&flat)))
    }

    /// One training step: forward (dropouts on), loss, backward, global norm (and clipping to
    /// `clip`), AdamW with learning rate `lr`. Returns (loss, gradient norm before clipping).
    #[allow(clippy::too_many_arguments)]
    pub fn train_step(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        lr: f64,
        adam: &AdamWConfig,
        clip: Option<f64>,
    ) -> Result<(f64, f64)> {
        self.train_step_mode(inputs, targets, b, t, lr, adam, clip, true)
    }

    /// `train_step` with the dropouts on (`training`) or off (eval-mode forward, as the CPU
    /// fixture runner trains). The step's device work, from the forward to the read-back
    /// gather, is one body run the graph way ([`super::graph::run_step`]): after the first
    /// step it is captured once and replayed while each step makes the same requests; the
    /// batch upload before it and the read-back after it are the step's only host transfers.
    #[allow(clippy::too_many_arguments)]
    pub fn train_step_mode(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        lr: f64,
        adam: &AdamWConfig,
        clip: Option<f64>,
        training: bool,
    ) -> Result<(f64, f64)> {
        let opts = AsaOptions {
            training,
            ..Default::default()
        };
        let count = self.count_targets(targets, None, b * t)?;
        let o = DevOpts::new(&self.be, &self.cfg, &opts, b, t)?;
        let up = self.begin_update(adam, lr, 1)?;
        self.upload_batch(inputs, Some(targets), b, t, training)?;
        let body = |s: &mut Self| {
            let sum = s.loss_backward_body(count, &o)?;
            s.update_body(&[sum], adam, clip, up)
        };
        super::graph::run_step(self, |s| &s.be, |s| &mut s.graph, body)?;
        self.finish_update(&[count], up)
    }

    /// One training step over `b` rows run as `b / micro` micro-batches of `micro` rows
    /// (gradient accumulation, as the CPU trainer): each micro-batch's mean loss weighs
    /// `micro / b`; the micro-batch gradients are summed in order on the device, scaled by
    /// `micro / b`, then clipped and applied once. `micro == b` is `train_step_mode`. (Run
    /// eagerly: each micro-batch's upload lies between device work.)
    #[allow(clippy::too_many_arguments)]
    pub fn train_step_accum(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        micro: usize,
        lr: f64,
        adam: &AdamWConfig,
        clip: Option<f64>,
        training: bool,
    ) -> Result<(f64, f64)> {
        if micro == 0 || !b.is_multiple_of(micro) {
            return Err(AsaError::Config(format!(
                "batch of {b} rows does not split into micro-batches of {micro}"
            )));
        }
        if inputs.len() != b * t || targets.len() != b * t {
            return Err(AsaError::Input(format!(
                "expected {b}x{t} inputs and targets, got {} and {}",
                inputs.len(),
                targets.len()
            )));
        }
        let accum = b / micro;
        if accum == 1 {
            return self.train_step_mode(inputs, targets, b, t, lr, adam, clip, training);
        }
        let opts = AsaOptions {
            training,
            ..Default::default()
        };
        let total = self.params.layout.total;
        if self.grad_acc.is_none() {
            self.grad_acc = Some(self.be.temp::<f32>(total)?);
        }
        let acc = self
            .grad_acc
            .as_ref()
            .expect("allocated above")
            .dv()
            .sub(0, total);
        self.be.memset_zero(acc)?;
        let up = self.begin_update(adam, lr, accum)?;
        // the per-micro-batch loss sums stay on the device until the end (no sync per micro-batch)
        let mut sums = Vec::with_capacity(accum);
        let mut counts = Vec::with_capacity(accum);
        for k in 0..accum {
            let rows = k * micro * t..(k + 1) * micro * t;
            let (sum, count) =
                self.loss_backward(&inputs[rows.clone()], &targets[rows], micro, t, &opts)?;
            self.be.axpy(acc, self.grads.dv().sub(0, total), 1.0)?;
            sums.push(sum);
            counts.push(count);
        }
        // grads = acc * (1/accum), the f32 product the CPU trainer forms
        let inv = 1.0 / accum as f32;
        self.be
            .scale_f64(self.grads.dv().sub(0, total), acc, inv as f64)?;
        self.update_body(&sums, adam, clip, up)?;
        self.finish_update(&counts, up)
    }

    /// Before a step's upload: AdamW's scalars for step `n + 1` at `lr` go up with the batch
    /// (`adam_pending`), and the read-back buffer is sized for `losses` loss sums.
    fn begin_update(&mut self, adam: &AdamWConfig, lr: f64, losses: usize) -> Result<Update> {
        let step = self.adam.as_ref().map_or(0, |a| a.2) + 1;
        self.adam_pending = Some(super::ops::adamw_step_scalars(adam, lr, step));
        let up = Update { step, lr, losses };
        let words = up.words(self.params.scalar_ids.len());
        if self.readback.as_ref().is_none_or(|r| r.len() != words) {
            self.readback = Some(self.be.temp::<f32>(words)?);
        }
        if self.adam.is_none() {
            let total = self.params.layout.total;
            self.adam = Some((self.be.temp::<f32>(total)?, self.be.temp::<f32>(total)?, 0));
        }
        Ok(up)
    }

    /// Global gradient norm, clipping and AdamW on the gradient buffer, and the read-back
    /// gathered: [norm, the loss sums of `sums`] as f64 (two f32 words each), then the scalar
    /// parameters. A non-finite loss or gradient norm skips the update (as the CPU trainer):
    /// AdamW checks them on the device and does nothing. Device work only (a step body).
    fn update_body(
        &self,
        sums: &[Temp<f64>],
        adam: &AdamWConfig,
        clip: Option<f64>,
        up: Update,
    ) -> Result<()> {
        let be = &self.be;
        let total = self.params.layout.total;
        let g = self.grads.dv().sub(0, total);
        let nf = 1 + sums.len();
        let nsc = self.params.scalar_ids.len();
        let back = self.readback.as_ref().expect("sized by begin_update").dv();
        assert_eq!(back.len, up.words(nsc), "update_body: the read-back's size");
        // SAFETY: the first 2 nf words of `back` (256-byte aligned) as nf f64s.
        let head: Dv<f64> = unsafe { Dv::from_raw(back.ptr, nf) };
        let norm = head.sub(0, 1);
        be.global_norm(norm, g)?;
        for (i, sum) in sums.iter().enumerate() {
            be.copy(f64_words(head.sub(1 + i, 1)), f64_words(sum.dv().sub(0, 1)))?;
        }
        if let Some(cn) = clip {
            be.clip_scale(g, norm, cn)?;
        }
        let (m, v, _) = self.adam.as_ref().expect("allocated by begin_update");
        // read at the step's scalar block, where `begin_update` sent them up with the batch
        let at = match (self.adam_pending, &self.cache.batch) {
            (Some(_), Some(batch)) => {
                let nl = self.layers.len() * STEP_SCALARS;
                batch.scalars.sub(nl, 3)
            }
            _ => Dv::null(),
        };
        be.adamw_update(
            self.params.data.dv().sub(0, total),
            m.dv().sub(0, total),
            v.dv().sub(0, total),
            g,
            adam,
            up.lr,
            up.step,
            head,
            self.params.bf16.as_ref().map_or(Dv::null(), |c| c.dv()),
            at,
        )?;
        self.params.gather_scalars(be, back.sub(2 * nf, nsc))
    }

    /// The step's one host sync: the read-back of `update_body`. The loss is the mean over
    /// micro-batches of each one's mean (`counts`: their target counts). A non-finite loss or
    /// norm leaves the step count (AdamW skipped itself). Returns (loss, gradient norm before
    /// clipping).
    fn finish_update(&mut self, counts: &[usize], up: Update) -> Result<(f64, f64)> {
        self.adam_pending = None;
        let back = self.readback.as_ref().expect("sized by begin_update").dv();
        let host = self.be.download(back)?;
        let f64_at = |i: usize| {
            f64::from_bits(host[2 * i].to_bits() as u64 | (host[2 * i + 1].to_bits() as u64) << 32)
        };
        let gn = f64_at(0);
        let mut loss = 0.0;
        for (i, count) in counts.iter().enumerate() {
            loss += f64_at(1 + i) / *count as f64 / counts.len() as f64;
        }
        if !(loss.is_finite() && gn.is_finite()) {
            return Ok((loss, gn));
        }
        self.adam.as_mut().expect("allocated by begin_update").2 = up.step;
        self.params.set_scalars(&host[2 * (1 + up.losses)..]);
        Ok((loss, gn))
    }

    /// How this model's training steps have used CUDA graphs.
    pub fn graph_stats(&self) -> super::graph::GraphStats {
        self.graph.stats
    }

    /// CUDA graph capture of the training step on or off (default: on, unless
    /// `ASA_CUDA_GRAPH=0`).
    pub fn set_graphs(&mut self, on: bool) {
        self.graph.set_enabled(on);
    }

    /// Mean loss of an eval-mode forward (no dropout, no backward): validation.
    pub fn eval_loss(
        &mut self,
        inputs: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
    ) -> Result<f64> {
        let n = b * t;
        let count = self.count_targets(targets, None, n)?;
        let o = DevOpts::new(&self.be, &self.cfg, &AsaOptions::default(), b, t)?;
        self.upload_batch(inputs, Some(targets), b, t, false)?;
        self.forward_body(b, t, &o)?;
        let targets_d = self.cache.batch.as_ref().expect("uploaded above").targets;
        let sum = self.head_loss(targets_d, o.valid(), count, None)?;
        Ok(self.be.download(sum.dv())?[0] / count as f64)
    }

    /// Restores the AdamW moments and step count (resuming a run); `m`, `v` have the
    /// parameters' layout.
    pub fn set_adam_state(&mut self, m: &ParamStore, v: &ParamStore, step: u64) -> Result<()> {
        for st in [m, v] {
            if st.names != self.template.names || st.shapes != self.template.shapes {
                return Err(AsaError::Input(
                    "optimizer state does not match the model's parameters".into(),
                ));
            }
        }
        let total = self.params.layout.total;
        let md = self.be.temp::<f32>(total)?;
        let vd = self.be.temp::<f32>(total)?;
        self.be
            .upload_into(md.dv().sub(0, total), &self.params.layout.flatten(m))?;
        self.be
            .upload_into(vd.dv().sub(0, total), &self.params.layout.flatten(v))?;
        self.adam = Some((md, vd, step));
        Ok(())
    }

    /// The AdamW moments and step count (None before the first step).
    pub fn adam_state(&self) -> Result<Option<(ParamStore, ParamStore, u64)>> {
        let Some((m, v, step)) = &self.adam else {
            return Ok(None);
        };
        let total = self.params.layout.total;
        let mh = self.be.download(m.dv().sub(0, total))?;
        let vh = self.be.download(v.dv().sub(0, total))?;
        Ok(Some((self.unflatten(&mh), self.unflatten(&vh), *step)))
    }

    /// The dropout / slot-dropout generator (its stream position is saved with checkpoints).
    pub fn rng_mut(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// The optimizer's step count.
    pub fn step(&self) -> u64 {
        self.adam.as_ref().map(|a| a.2).unwrap_or(0)
    }

    fn unflatten(&self, flat: &[f32]) -> ParamStore {
        let mut out = self.template.clone();
        for (i, d) in out.data.iter_mut().enumerate() {
            let (o, l) = (self.params.layout.offs[i], self.params.layout.lens[i]);
            d.copy_from_slice(&flat[o..o + l]);
        }
        out
    }

    /// The current parameters (f32 master weights).
    pub fn download_params(&self) -> Result<ParamStore> {
        let flat = self
            .be
            .download(self.params.data.dv().sub(0, self.params.layout.total))?;
        Ok(self.unflatten(&flat))
    }
}

// ------------------------------------------------------------------------------------------------
// one layer alone (layer fixtures, op tests, benches)

/// One ASA layer with its own parameters on the device (the layer fixtures' setting: keys
/// without a prefix). `forward` then `backward` mirror `AsaLayer::forward/backward`.
pub struct GpuLayerRunner<B: Backend = CudaBackend> {
    be: B,
    layer: GpuAsaLayer,
    template: ParamStore,
    params: GpuParams,
    grads: Temp<f32>,
    cache: GpuAsaCache,
    opts: Option<DevOpts>,
    x: Option<Temp<f32>>,
    /// the last forward's draws (the seeds and the slot keep mask that its backward reads)
    draws: Option<(Temp<u64>, Temp<f32>)>,
    rng: ChaCha8Rng,
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
        let o = DevOpts::new(&self.be, &self.layer.cfg, opts, b, t)?;
        self.be.clear_bf16_twins(); // the last forward's activations are written again
        let xd = self.be.temp_from(x)?;
        let (_s, out) = tmp(&self.be, b * t * c)?;
        // this layer's share of a one-block model's draws
        let all = StepDraws::draw(&mut self.rng, &self.layer.cfg, 1, opts.training);
        let seeds = self.be.temp_from(&all.seeds[1..3])?;
        let keep = self.be.temp_from(&all.keep)?;
        let draws = LayerDraws {
            seeds: seeds.dv(),
            keep: keep.dv(),
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
