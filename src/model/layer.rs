//! The Addressed State Attention layer: forward and backward, composed from the CPU ops in
//! `backend::cpu::slot_ops` and `backend::cpu::ops`.
//!
//! Data flow of the forward (shapes per batch of B sequences of T tokens, C = H*d):
//! ```text
//! x [B,T,C] -> Wk_write, Wv_write, Wq_read -> split heads [B,H,T,d]
//! k -> (normalize_k) -> (RoPE) -> write logits [B,H,K,T] = slot_keys.k/sqrt(d)/wtemp + ALiBi
//! write scan (chunked running-max softmax per slot) -> slot state history [B,H,T,K,d]
//! read logits [B,H,T,K] = q.slot_keys/sqrt(d) + gamma * q.state/sqrt(d) -> routing -> rw
//! out1 = sum_k rw * state                                                      [B,H,T,d]
//! refine: rw -> slot_in -> slot_q/k/v -> RoPE -> phi -> causal linear attention -> slot_out
//!         -> tanh | softmax -> sw; delta = sum_k sw * state; out_h = out1 + gate * delta
//!         (intervene: out_h = out1 + f(out1, gate*delta))
//! out_h -> merge heads -> out_proj -> dropout -> out [B,T,C]
//! ```
//! The backward walks the same graph in reverse.
//!
//! Two forms of the write scan serve the same graph. The **chunk form** (`backend::cpu::scan`,
//! the default) never stores the state history: the content read is `contract(q)`, the read
//! output `mix(rw + gate*sw)` (refine folded into one mix), and the backward takes the state's
//! gradient in factored form, recomputing inside tiles from the saved chunk carries. The
//! **serial form** materialises `[B,H,T,K,d]` and is used where the history itself is needed:
//! info tensors (`return_info`), slot masks, routing modes other than softmax, the intervene
//! variant (and on request, `ScanForm::Serial`, as the tests' second opinion).

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::ops;
use crate::backend::cpu::scan::{self, ContentGrad, Scan, StateGrad};
use crate::backend::cpu::slot_ops::{self as k, ReadMask, RopeTable, Routing, SlotDims};
use crate::config::{ModelConfig, Variant};
use crate::error::Result;
use crate::vocab::params::{sigmoid, softplus, AsaIds, ParamStore};
// the layer's options (the model vocabulary), re-exported where they were defined before
pub use crate::vocab::options::{
    check_options, AsaOptions, Info, Intervention, IntvMode, RoutingMode, RoutingNoise, ScoreKind,
    SlotMask, SlotMaskWhere, TauKind,
};

/// Saved activations of one forward, reused by the backward (buffers are resized, not
/// reallocated, across calls of the same shape).
#[derive(Debug, Default, Clone)]
pub struct AsaCache {
    pub b: usize,
    pub t: usize,
    x: Vec<f32>,        // [B,T,C] layer input
    k_n: Vec<f32>,      // [B,H,T,d] after normalize
    k_norm: Vec<f32>,   // [B,H,T]
    k_r: Vec<f32>,      // [B,H,T,d] final write keys
    v_h: Vec<f32>,      // [B,H,T,d]
    q_h: Vec<f32>,      // [B,H,T,d]
    keys: Vec<f32>,     // [H,K,d] slot keys after slot dropout
    key_keep: Vec<f32>, // [H,K]
    raw: Vec<f32>,      // [B,H,K,T]
    wl: Vec<f32>,       // [B,H,K,T]
    state: Vec<f32>,    // [B,H,T,K,d] (serial form only)
    carry: Vec<f32>,    // [B,H,NC,K,d] numerator entering each write chunk (chunk form only)
    chunked: bool,      // which form ran
    den: Vec<f32>,      // [B,H,K,T]
    rmax: Vec<f32>,     // [B,H,K,T]
    alpha: Vec<f32>,    // [B,H,T,K] exp(w - M) (chunk form only)
    egate: Vec<f32>,    // [B,H,T,K] exp(M_{c0-1} - M) (chunk form only)
    lkey: Vec<f32>,     // [B,H,T,K]
    lcont: Vec<f32>,    // [B,H,T,K]
    logits: Vec<f32>,   // [B,H,T,K] before noise
    noisy: Vec<f32>,    // [B,H,T,K] after noise (routing input)
    rw: Vec<f32>,       // [B,H,T,K]
    out1: Vec<f32>,     // [B,H,T,d]
    ss: SlotspaceCache,
    merged: Vec<f32>, // [B,T,C] the heads' outputs, merged
    drop: Vec<f32>,   // [B,T,C] dropout mask (empty without dropout)
    gamma: f32,
    gate: f32,
    intv: Vec<ChunkIntv>,
}

#[derive(Debug, Default, Clone)]
struct SlotspaceCache {
    u: Vec<f32>,      // [B,H,T,M]
    qs: Vec<f32>,     // [B,H,T,M] slot_q(u) after RoPE (online: and mask)
    ks: Vec<f32>,     // [B,H,T,M]
    qf: Vec<f32>,     // [B,H,T,M] phi, masked
    kf: Vec<f32>,     // [B,H,T,M]
    vs: Vec<f32>,     // [B,H,T,M] masked
    u2: Vec<f32>,     // [B,H,T,M]
    den: Vec<f32>,    // [B,H,T]
    drop: Vec<f32>,   // [B,H,T,M] dropout mask (empty without dropout)
    u2d: Vec<f32>,    // [B,H,T,M] after dropout (empty without dropout: u2 itself)
    z: Vec<f32>,      // [B,H,T,K] slot_out(u2)
    sw_pre: Vec<f32>, // [B,H,T,K] tanh/softmax before the slot mask
    sw: Vec<f32>,     // [B,H,T,K]
    delta: Vec<f32>,  // [B,H,T,d] sum_k sw * state (without gate)
}

/// Per write-chunk thresholds of the orth_gate intervention (detached in the reference).
#[derive(Debug, Default, Clone, Copy)]
struct ChunkIntv {
    tau: f64,
    smax: Option<f64>,
}

/// Gradients of one layer's parameters (owned; the caller adds them into its `ParamStore`).
#[derive(Debug, Clone)]
pub struct AsaGrads {
    pub slot_keys: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wq: Vec<f32>,
    pub wo: Vec<f32>,
    pub alibi: f64,
    pub gamma: f64,
    pub slot_in: Vec<f32>,
    pub slot_q: Vec<f32>,
    pub slot_k: Vec<f32>,
    pub slot_v: Vec<f32>,
    pub slot_out: Vec<f32>,
    pub gate: f64,
}

impl AsaGrads {
    /// Adds these gradients into `grads` at the layer's parameter ids.
    pub fn accumulate_into(&self, grads: &mut ParamStore, ids: &AsaIds) {
        grads.accumulate(ids.slot_keys, &self.slot_keys);
        grads.accumulate(ids.wk_write, &self.wk);
        grads.accumulate(ids.wv_write, &self.wv);
        grads.accumulate(ids.wq_read, &self.wq);
        grads.accumulate(ids.out_proj, &self.wo);
        if let Some(i) = ids.alibi_strength {
            grads.accumulate(i, &[self.alibi as f32]);
        }
        if let Some(i) = ids.content_read_gamma {
            grads.accumulate(i, &[self.gamma as f32]);
        }
        if let Some(s) = &ids.slotspace {
            grads.accumulate(s.slot_in, &self.slot_in);
            grads.accumulate(s.slot_q, &self.slot_q);
            grads.accumulate(s.slot_k, &self.slot_k);
            grads.accumulate(s.slot_v, &self.slot_v);
            grads.accumulate(s.slot_out, &self.slot_out);
            grads.accumulate(s.gate, &[self.gate as f32]);
        }
    }
}

/// Which form of the write scan a layer runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScanForm {
    /// the chunk form wherever the call allows it, else the serial form
    #[default]
    Chunked,
    /// always the serial form (keeps the `[B,H,T,K,d]` state history)
    Serial,
}

/// One ASA layer: its config, its parameter ids and its fixed buffers (ALiBi slopes, RoPE).
#[derive(Debug, Clone)]
pub struct AsaLayer {
    pub cfg: ModelConfig,
    pub ids: AsaIds,
    pub intervention: Intervention,
    pub scan_form: ScanForm,
    pub(crate) slopes: Vec<f32>,
    rope: Option<RopeTable>,
    rope_ss: Option<RopeTable>,
}

impl AsaLayer {
    pub fn new(cfg: &ModelConfig, ids: AsaIds) -> Self {
        let slopes = if cfg.use_alibi_write {
            k::alibi_slopes(cfg.num_heads)
        } else {
            vec![0.0; cfg.num_heads]
        };
        AsaLayer {
            cfg: cfg.clone(),
            ids,
            intervention: Intervention::default(),
            scan_form: ScanForm::default(),
            slopes,
            rope: None,
            rope_ss: None,
        }
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

    pub(crate) fn alibi_strength(&self, p: &ParamStore) -> f32 {
        crate::vocab::params::alibi_strength(
            self.ids.alibi_strength.map(|i| p.data[i][0]),
            &self.cfg,
        )
    }

    pub(crate) fn content_gamma(&self, p: &ParamStore) -> f32 {
        crate::vocab::params::content_gamma(
            self.ids.content_read_gamma.map(|i| p.data[i][0]),
            &self.cfg,
        )
    }

    fn ensure_tables(&mut self, t: usize) {
        let cfg = &self.cfg;
        if cfg.use_rope_keys && self.rope.as_ref().map(|r| r.t) != Some(t) {
            self.rope = Some(k::rope_table(t, cfg.head_dim(), cfg.rope_base));
        }
        if cfg.use_slotspace_refine
            && cfg.use_rope_slotspace
            && self.rope_ss.as_ref().map(|r| r.t) != Some(t)
        {
            self.rope_ss = Some(k::rope_table(t, cfg.slotspace_dim, cfg.rope_base_slotspace));
        }
    }

    fn check_options(&self, opts: &AsaOptions, b: usize, t: usize) -> Result<()> {
        check_options(&self.cfg, opts, b, t)
    }

    /// Whether this call can run the chunk form: it needs no state history (no info tensors),
    /// reads with plain softmax routing and has no slot mask or intervention.
    fn chunk_form_applies(&self, opts: &AsaOptions) -> bool {
        self.scan_form == ScanForm::Chunked
            && !opts.return_info
            && matches!(opts.routing, RoutingMode::Softmax)
            && opts.slot_mask.is_none()
            && self.cfg.variant != Variant::Intervene
    }

    /// The saved scan quantities of a chunk-form forward.
    fn scan_view<'a>(&self, cache: &'a AsaCache, dm: SlotDims) -> Scan<'a> {
        Scan {
            dm,
            chunk: self.cfg.write_chunk_size.max(1),
            wl: &cache.wl,
            rmax: &cache.rmax,
            den: &cache.den,
            alpha: &cache.alpha,
            egate: &cache.egate,
            v: &cache.v_h,
            carry: &cache.carry,
        }
    }

    /// Forward pass. x: [B,T,C] -> out: [B,T,C]. Saves what the backward needs in `cache`.
    pub fn forward(
        &mut self,
        p: &ParamStore,
        x: &[f32],
        b: usize,
        t: usize,
        opts: &AsaOptions,
        cache: &mut AsaCache,
        rng: &mut ChaCha8Rng,
        out: &mut [f32],
    ) -> Result<Option<Info>> {
        self.check_options(opts, b, t)?;
        self.ensure_tables(t);
        let cfg = self.cfg.clone();
        let dm = self.dims(b, t);
        let (c, h, nk, d) = (cfg.embed_dim, dm.h, dm.k, dm.d);
        let n = b * t;
        let valid = opts.attention_mask.as_deref();
        cache.b = b;
        cache.t = t;
        let rs = |v: &mut Vec<f32>, len: usize| {
            v.clear();
            v.resize(len, 0.0);
        };
        // for buffers whose producer overwrites every element (see `lm::resize`)
        let ow = |v: &mut Vec<f32>, len: usize| {
            if v.len() != len {
                v.clear();
                v.resize(len, 0.0);
            }
        };

        // projections: [B,T,C]
        cache.x.clear();
        cache.x.extend_from_slice(x);
        // (the projections before the head split are not kept: the backward needs x only)
        let mut k_h = ops::zeros(n * c);
        {
            let mut proj = ops::zeros(n * c);
            for (dst, w) in [
                (&mut k_h, self.ids.wk_write),
                (&mut cache.v_h, self.ids.wv_write),
                (&mut cache.q_h, self.ids.wq_read),
            ] {
                ops::matmul_forward(&mut proj, x, &p.data[w], None, n, c, c);
                ow(dst, n * c);
                k::split_heads(dst, &proj, b, t, h, d);
            }
        }
        // write keys: normalize, RoPE
        ow(&mut cache.k_n, n * c);
        rs(&mut cache.k_norm, b * h * t);
        if cfg.normalize_k {
            k::l2normalize_forward(&mut cache.k_n, &mut cache.k_norm, &k_h, d);
        } else {
            cache.k_n.copy_from_slice(&k_h);
        }
        drop(k_h);
        ow(&mut cache.k_r, n * c);
        match &self.rope {
            Some(tab) => k::rope_forward(&mut cache.k_r, &cache.k_n, tab, b * h),
            None => cache.k_r.copy_from_slice(&cache.k_n),
        }
        // slot dropout (training): whole slot keys of a head are zeroed, not rescaled
        let keys = &p.data[self.ids.slot_keys];
        rs(&mut cache.key_keep, h * nk);
        for kk in cache.key_keep.iter_mut() {
            *kk = if opts.training && cfg.slot_dropout > 0.0 && rng.gen::<f64>() < cfg.slot_dropout
            {
                0.0
            } else {
                1.0
            };
        }
        rs(&mut cache.keys, h * nk * d);
        for (i, v) in cache.keys.iter_mut().enumerate() {
            *v = keys[i] * cache.key_keep[i / d];
        }

        // write logits [B,H,K,T]
        let bias_h: Option<Vec<f32>> = cfg.use_alibi_write.then(|| {
            let mut bias = vec![0.0; h];
            k::alibi_bias(
                &mut bias,
                &self.slopes,
                self.ids.alibi_strength.map(|i| p.data[i][0]),
                cfg.alibi_strength_init,
                cfg.min_strength,
            );
            bias
        });
        let wtemp = cfg.write_temperature.max(1e-6) as f32;
        rs(&mut cache.raw, b * h * nk * t);
        rs(&mut cache.wl, b * h * nk * t);
        k::write_logits_forward(
            &mut cache.raw,
            &mut cache.wl,
            &cache.keys,
            &cache.k_r,
            wtemp,
            bias_h.as_deref(),
            valid,
            dm,
        );

        // write scan
        let chunked = self.chunk_form_applies(opts);
        cache.chunked = chunked;
        rs(&mut cache.den, b * h * nk * t);
        rs(&mut cache.rmax, b * h * nk * t);
        if chunked {
            let w = cfg.write_chunk_size.max(1);
            cache.state = Vec::new();
            ow(&mut cache.alpha, b * h * t * nk);
            ow(&mut cache.egate, b * h * t * nk);
            scan::stats_forward(
                &mut cache.rmax,
                &mut cache.den,
                &mut cache.alpha,
                &mut cache.egate,
                &cache.wl,
                w,
                t,
                nk,
            );
            rs(&mut cache.carry, b * h * scan::num_chunks(t, w) * nk * d);
            let mut carry = std::mem::take(&mut cache.carry);
            scan::carries_forward(&mut carry, self.scan_view(cache, dm));
            cache.carry = carry;
        } else {
            cache.carry = Vec::new();
            cache.alpha = Vec::new();
            cache.egate = Vec::new();
            rs(&mut cache.state, b * h * t * nk * d);
            k::slot_scan_forward(
                &mut cache.state,
                &mut cache.den,
                &mut cache.rmax,
                &cache.wl,
                &cache.v_h,
                cfg.write_chunk_size,
                dm,
            );
        }

        // read logits, noise, routing
        cache.gamma = self.content_gamma(p);
        let read_mask = opts.slot_mask.as_ref().and_then(|m| match m.where_ {
            SlotMaskWhere::Read => Some((&m.keep, ReadMask::Read)),
            SlotMaskWhere::ContentReadOnly => Some((&m.keep, ReadMask::ContentOnly)),
            SlotMaskWhere::SlotspaceOnly => None,
        });
        let bhtk = b * h * t * nk;
        rs(&mut cache.lkey, bhtk);
        rs(&mut cache.lcont, bhtk);
        rs(&mut cache.logits, bhtk);
        k::read_logits_forward(
            &mut cache.lkey,
            (cfg.use_content_read && !chunked).then_some(&mut cache.lcont[..]),
            &mut cache.logits,
            &cache.q_h,
            &cache.keys,
            &cache.state,
            cache.gamma,
            read_mask,
            dm,
        );
        if chunked && cfg.use_content_read {
            // content logits q.S_t/sqrt(d) without the state history
            let mut lcont = std::mem::take(&mut cache.lcont);
            scan::contract(&mut lcont, &cache.q_h, self.scan_view(cache, dm));
            let scale = 1.0 / (d as f32).sqrt();
            let g = cache.gamma;
            for (lg, lc) in cache.logits.iter_mut().zip(lcont.iter_mut()) {
                *lc *= scale;
                *lg += g * *lc;
            }
            cache.lcont = lcont;
        }
        cache.noisy.clear();
        cache.noisy.extend_from_slice(&cache.logits);
        if let Some(nz) = opts.noise {
            let add = nz.draw(rng, cache.noisy.len());
            cache.noisy.iter_mut().zip(add).for_each(|(x, a)| *x += a);
        }
        let rtemp = cfg.read_temperature.max(1e-6) as f32;
        let routing = self.routing(opts);
        let read_keep = opts
            .slot_mask
            .as_ref()
            .filter(|m| m.where_ == SlotMaskWhere::Read)
            .map(|m| &m.keep);
        rs(&mut cache.rw, bhtk);
        k::read_weights_forward(&mut cache.rw, &cache.noisy, &routing, rtemp, read_keep, dm);
        cache.gate = 0.0;
        cache.intv.clear();
        let mut intv_info: Option<Info> = None;
        let mut out_h: Vec<f32>; // [B,H,T,d] the heads' outputs
        if let Some(ss) = &self.ids.slotspace {
            cache.gate = softplus(p.data[ss.gate][0] as f64) as f32;
            self.slotspace_forward(p, opts, cache, rng, dm)?;
        }
        if chunked {
            // out_h = sum_k (rw + gate*sw) S_t in one pass over the chunks
            let mu = self.mix_weights(cache);
            out_h = ops::zeros(n * c);
            scan::mix(
                &mut out_h,
                mu.as_deref().unwrap_or(&cache.rw),
                self.scan_view(cache, dm),
            );
            cache.out1 = Vec::new();
        } else {
            rs(&mut cache.out1, n * c);
            k::slot_mix_forward(&mut cache.out1, &cache.rw, &cache.state, dm);
            out_h = cache.out1.clone();
            if self.ids.slotspace.is_some() {
                if cfg.variant == Variant::Intervene {
                    intv_info = Some(self.intervene_forward(cache, &mut out_h, dm));
                } else {
                    let g = cache.gate;
                    out_h
                        .iter_mut()
                        .zip(&cache.ss.delta)
                        .for_each(|(o, dl)| *o += g * dl);
                }
            }
        }

        // merge heads, out_proj, dropout
        ow(&mut cache.merged, n * c);
        k::merge_heads(&mut cache.merged, &out_h, b, t, h, d);
        drop(out_h);
        let pdrop = if opts.training {
            cfg.dropout as f32
        } else {
            0.0
        };
        let wo = &p.data[self.ids.out_proj];
        if pdrop > 0.0 {
            let mut proj = ops::zeros(n * c);
            ops::matmul_forward(&mut proj, &cache.merged, wo, None, n, c, c);
            rs(&mut cache.drop, n * c);
            ops::dropout_forward(out, &mut cache.drop, &proj, pdrop, rng);
        } else {
            cache.drop = Vec::new();
            ops::matmul_forward(out, &cache.merged, wo, None, n, c, c);
        }

        if !opts.return_info {
            return Ok(None);
        }
        Ok(Some(self.info(
            p,
            opts,
            cache,
            dm,
            self.alibi_strength(p),
            bias_h.as_deref(),
            intv_info,
        )))
    }

    /// The chunk form's mix weights with the refine on: rw + gate*sw (None: rw alone).
    fn mix_weights(&self, cache: &AsaCache) -> Option<Vec<f32>> {
        self.ids.slotspace.as_ref()?;
        let g = cache.gate;
        Some(
            cache
                .rw
                .iter()
                .zip(&cache.ss.sw)
                .map(|(&r, &s)| r + g * s)
                .collect(),
        )
    }

    fn routing<'a>(&self, opts: &'a AsaOptions) -> Routing<'a> {
        match &opts.routing {
            RoutingMode::Softmax => Routing::Softmax,
            RoutingMode::Top1 => Routing::Top1,
            RoutingMode::TopK(kk) => Routing::TopK(*kk),
            RoutingMode::External(w) => Routing::External(w),
            RoutingMode::Override(w) => Routing::Override(w),
        }
    }

    fn slotspace_forward(
        &self,
        p: &ParamStore,
        opts: &AsaOptions,
        cache: &mut AsaCache,
        rng: &mut ChaCha8Rng,
        dm: SlotDims,
    ) -> Result<()> {
        let ids = self.ids.slotspace.as_ref().expect("slotspace ids");
        let cfg = &self.cfg;
        let (b, h, t, nk) = (dm.b, dm.h, dm.t, dm.k);
        let m = cfg.slotspace_dim;
        let rows = b * h * t;
        let valid = opts.attention_mask.as_deref();
        let online = cfg.variant == Variant::Online;
        let s = &mut cache.ss;
        let rs = |v: &mut Vec<f32>, len: usize| {
            v.clear();
            v.resize(len, 0.0);
        };
        // every one of these is overwritten whole below (GEMM, RoPE, phi)
        for v in [
            &mut s.u, &mut s.qs, &mut s.ks, &mut s.qf, &mut s.kf, &mut s.vs,
        ] {
            if v.len() != rows * m {
                rs(v, rows * m);
            }
        }
        ops::matmul_forward(&mut s.u, &cache.rw, &p.data[ids.slot_in], None, rows, nk, m);
        ops::matmul_forward(&mut s.vs, &s.u, &p.data[ids.slot_v], None, rows, m, m);
        {
            // slot_q(u), slot_k(u) before RoPE are not kept (RoPE's backward needs no input)
            let mut pre = ops::zeros(rows * m);
            for (dst, w) in [(&mut s.qs, ids.slot_q), (&mut s.ks, ids.slot_k)] {
                match &self.rope_ss {
                    Some(tab) => {
                        ops::matmul_forward(&mut pre, &s.u, &p.data[w], None, rows, m, m);
                        k::rope_forward(dst, &pre, tab, b * h);
                    }
                    None => ops::matmul_forward(dst, &s.u, &p.data[w], None, rows, m, m),
                }
            }
        }
        // the online variant masks before phi, the baseline after it
        if let (Some(vm), true) = (valid, online) {
            k::mask_rows_forward(&mut s.qs, vm, h, t, m);
            k::mask_rows_forward(&mut s.ks, vm, h, t, m);
        }
        k::phi_forward(&mut s.qf, &s.qs);
        k::phi_forward(&mut s.kf, &s.ks);
        if let Some(vm) = valid {
            if !online {
                k::mask_rows_forward(&mut s.qf, vm, h, t, m);
                k::mask_rows_forward(&mut s.kf, vm, h, t, m);
            }
            k::mask_rows_forward(&mut s.vs, vm, h, t, m);
        }
        rs(&mut s.u2, rows * m);
        rs(&mut s.den, rows);
        k::linear_attn_forward(&mut s.u2, &mut s.den, &s.qf, &s.kf, &s.vs, t, m);
        let pdrop = if opts.training {
            cfg.slotspace_dropout as f32
        } else {
            0.0
        };
        ops::dropout_saved(&mut s.u2d, &mut s.drop, &s.u2, pdrop, rng);
        rs(&mut s.z, rows * nk);
        let u2d = ops::dropped(&s.u2d, &s.u2);
        ops::matmul_forward(&mut s.z, u2d, &p.data[ids.slot_out], None, rows, m, nk);
        rs(&mut s.sw, rows * nk);
        if cfg.slotspace_signed_weights {
            k::tanh_forward(&mut s.sw, &s.z);
        } else {
            k::softmax_slots_forward(&mut s.sw, &s.z, nk);
        }
        rs(&mut s.sw_pre, rows * nk);
        match opts
            .slot_mask
            .as_ref()
            .filter(|sm| sm.where_ == SlotMaskWhere::SlotspaceOnly)
        {
            Some(sm) => k::slot_mask_weights_forward(
                &mut s.sw,
                &mut s.sw_pre,
                &sm.keep,
                !cfg.slotspace_signed_weights,
                dm,
            ),
            None => s.sw_pre.copy_from_slice(&s.sw),
        }
        if cache.chunked {
            // the chunk form folds sw into the read's mix (`mix_weights`)
            s.delta = Vec::new();
        } else {
            rs(&mut s.delta, rows * dm.d);
            k::slot_mix_forward(&mut s.delta, &s.sw, &cache.state, dm);
        }
        Ok(())
    }

    /// Intervene variant: out_h = out1 + f(out1, gate*delta) per position, thresholds per chunk.
    fn intervene_forward(&self, cache: &mut AsaCache, out_h: &mut [f32], dm: SlotDims) -> Info {
        let it = &self.intervention;
        let (b, h, t, nk, d) = (dm.b, dm.h, dm.t, dm.k, dm.d);
        let chunk = self.cfg.write_chunk_size.max(1);
        let gate = cache.gate as f64;
        let mut acc: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut count = 0usize;
        let mut c0 = 0;
        while c0 < t {
            let c1 = (c0 + chunk).min(t);
            let mut pos = Vec::with_capacity(b * h * (c1 - c0));
            for bi in 0..b {
                for hi in 0..h {
                    for ti in c0..c1 {
                        let row = (bi * h + hi) * t + ti;
                        let o = &cache.out1[row * d..(row + 1) * d];
                        let dl: Vec<f64> = cache.ss.delta[row * d..(row + 1) * d]
                            .iter()
                            .map(|&x| gate * x as f64)
                            .collect();
                        let z = &cache.ss.z[row * nk..(row + 1) * nk];
                        pos.push((row, hi, PosGeom::new(o, &dl, z, it.score_kind)));
                    }
                }
            }
            // thresholds over the chunk (detached)
            let mut ci = ChunkIntv::default();
            if it.mode == IntvMode::OrthGate {
                let mut scores: Vec<f64> = pos.iter().map(|p| p.2.score_raw).collect();
                if let Some(cp) = it.score_clip_pctl.filter(|c| *c > 0.0 && *c < 100.0) {
                    let smax = quantile(&scores, cp / 100.0);
                    ci.smax = Some(smax);
                    scores.iter_mut().for_each(|s| *s = s.min(smax));
                }
                ci.tau = match it.tau_kind {
                    TauKind::Abs => it.tau,
                    TauKind::Pctl => quantile(&scores, it.tau_pctl / 100.0),
                };
            }
            cache.intv.push(ci);
            // apply and log
            let mut logs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            let mut add = |k: &'static str, v: f64, hi: Option<usize>| {
                let e = logs
                    .entry(k)
                    .or_insert_with(|| vec![0.0; if hi.is_some() { h } else { 1 }]);
                e[hi.unwrap_or(0)] += v;
            };
            let npos = pos.len() as f64;
            let per_head = (b * (c1 - c0)) as f64;
            for (row, hi, g) in &pos {
                let y = g.apply(it, &ci, self.head_mask(*hi));
                let oh = &mut out_h[row * d..(row + 1) * d];
                for j in 0..d {
                    oh[j] += y.delta_mod[j] as f32;
                }
                if it.log_refine_geom {
                    add("geom_alpha_mean", g.alpha / per_head, Some(*hi));
                    add("geom_alpha_abs", g.alpha.abs() / per_head, Some(*hi));
                    add(
                        "geom_sign_pos",
                        if g.alpha > 0.0 { 1.0 } else { 0.0 } / per_head,
                        Some(*hi),
                    );
                    add("geom_orth_frac", g.r_norm / g.dn / per_head, Some(*hi));
                    add("geom_d_ratio", g.dn / g.on / per_head, Some(*hi));
                    add("geom_dpar_ratio", g.p_norm / g.dn / per_head, Some(*hi));
                }
                if it.mode != IntvMode::Off {
                    add("alpha", g.alpha / npos, None);
                }
                if it.mode == IntvMode::OrthGate {
                    add("score", y.score / npos, None);
                    add("mask", y.mask / npos, None);
                    add("out1_norm", g.on / npos, None);
                    add("dpar_norm", g.p_norm / npos, None);
                    add("dorth_norm", g.r_norm / npos, None);
                }
            }
            if it.mode == IntvMode::OrthGate {
                logs.insert("tau", vec![ci.tau]);
            }
            if it.mode != IntvMode::Off {
                if let Some(hm) = &it.head_mask {
                    logs.insert("head_mask", hm.iter().map(|&x| x as f64).collect());
                }
            }
            if !logs.is_empty() {
                for (k, v) in logs {
                    let e = acc
                        .entry(k.to_string())
                        .or_insert_with(|| vec![0.0; v.len()]);
                    e.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                }
                count += 1;
            }
            c0 = c1;
        }
        let mut info = Info::new();
        if count > 0 {
            for (k, v) in acc {
                let shape = if v.len() == 1 && !k.starts_with("geom_") && k != "head_mask" {
                    vec![]
                } else {
                    vec![v.len()]
                };
                let data: Vec<f32> = v.iter().map(|x| (x / count as f64) as f32).collect();
                info.insert(k, (shape, data));
            }
            for (src, dst) in [
                ("score", "intv_score_mean"),
                ("mask", "intv_mask_mean"),
                ("tau", "intv_tau"),
                ("alpha", "intv_alpha_mean"),
                ("out1_norm", "intv_out1_norm_mean"),
                ("dpar_norm", "intv_dpar_norm_mean"),
                ("dorth_norm", "intv_dorth_norm_mean"),
            ] {
                if let Some(v) = info.get(src).cloned() {
                    info.insert(dst.to_string(), v);
                }
            }
        }
        info
    }

    fn head_mask(&self, hi: usize) -> Option<f64> {
        if self.intervention.mode == IntvMode::Off {
            return None;
        }
        self.intervention.head_mask.as_ref().map(|m| m[hi] as f64)
    }

    /// The info dict of this call (`crate::vocab::info::assemble`, shared with the GPU layer).
    #[allow(clippy::too_many_arguments)]
    fn info(
        &self,
        p: &ParamStore,
        opts: &AsaOptions,
        cache: &AsaCache,
        dm: SlotDims,
        strength: f32,
        bias_h: Option<&[f32]>,
        intv: Option<Info>,
    ) -> Info {
        let cfg = &self.cfg;
        let _ = opts;
        let online = cfg.variant == Variant::Online;
        let state_norm = if online {
            Vec::new()
        } else {
            let mut norms = vec![0.0; dm.b * dm.h * dm.k * dm.t];
            k::slot_state_norm(&mut norms, &cache.state, dm);
            norms
        };
        crate::vocab::info::assemble(crate::vocab::info::InfoParts {
            dm,
            variant: cfg.variant,
            use_content_read: cfg.use_content_read,
            write_chunk: cfg.write_chunk_size,
            raw: &cache.raw,
            wl: &cache.wl,
            logits: &cache.logits,
            lkey: &cache.lkey,
            lcont: &cache.lcont,
            rw: &cache.rw,
            state_norm,
            gamma: self.content_gamma(p),
            strength,
            learned_strength: self.ids.alibi_strength.is_some(),
            bias_h,
            refine: self
                .ids
                .slotspace
                .as_ref()
                .map(|_| crate::vocab::info::RefineParts {
                    gate: cache.gate,
                    delta: &cache.ss.delta,
                    sw: &cache.ss.sw,
                    z: &cache.ss.z,
                }),
            out1: &cache.out1,
            intv,
        })
    }

    /// Backward pass. dout: [B,T,C] -> dx: [B,T,C] (+=), and the parameter gradients.
    pub fn backward(
        &self,
        p: &ParamStore,
        cache: &AsaCache,
        opts: &AsaOptions,
        dout: &[f32],
        dx: &mut [f32],
    ) -> AsaGrads {
        let cfg = &self.cfg;
        let (b, t) = (cache.b, cache.t);
        let dm = self.dims(b, t);
        let (c, h, nk, d) = (cfg.embed_dim, dm.h, dm.k, dm.d);
        let n = b * t;
        let m = cfg.slotspace_dim;
        let valid = opts.attention_mask.as_deref();
        let mut g = AsaGrads {
            slot_keys: vec![0.0; h * nk * d],
            wk: vec![0.0; c * c],
            wv: vec![0.0; c * c],
            wq: vec![0.0; c * c],
            wo: vec![0.0; c * c],
            alibi: 0.0,
            gamma: 0.0,
            slot_in: vec![
                0.0;
                if self.ids.slotspace.is_some() {
                    m * nk
                } else {
                    0
                }
            ],
            slot_q: vec![
                0.0;
                if self.ids.slotspace.is_some() {
                    m * m
                } else {
                    0
                }
            ],
            slot_k: vec![
                0.0;
                if self.ids.slotspace.is_some() {
                    m * m
                } else {
                    0
                }
            ],
            slot_v: vec![
                0.0;
                if self.ids.slotspace.is_some() {
                    m * m
                } else {
                    0
                }
            ],
            slot_out: vec![
                0.0;
                if self.ids.slotspace.is_some() {
                    nk * m
                } else {
                    0
                }
            ],
            gate: 0.0,
        };

        // dropout, out_proj, heads
        let dproj = ops::dropout_grad(dout, &cache.drop);
        let mut dmerged = ops::zeros(n * c);
        ops::matmul_backward(
            &mut dmerged,
            &mut g.wo,
            None,
            &dproj,
            &cache.merged,
            &p.data[self.ids.out_proj],
            n,
            c,
            c,
        );
        let mut dout_h = ops::zeros(n * c);
        k::split_heads(&mut dout_h, &dmerged, b, t, h, d);

        let chunked = cache.chunked;
        let mut dstate = ops::zeros(cache.state.len());
        let mut drw = ops::zeros(cache.rw.len());
        // chunk form: dmu_t[k] = dO_t . S_t[k], the gradient of the mix weights rw + gate*sw
        let dmu = chunked.then(|| {
            let mut y = ops::zeros(cache.rw.len());
            scan::contract(&mut y, &dout_h, self.scan_view(cache, dm));
            y
        });
        let mut dout1 = if chunked { Vec::new() } else { dout_h.clone() };

        // refine
        if let Some(ids) = &self.ids.slotspace {
            let s = &cache.ss;
            let rows = b * h * t;
            let gate = cache.gate as f64;
            // d(delta) (without gate) and d(gate)
            let mut ddelta = ops::zeros(if chunked { 0 } else { rows * d });
            let mut dz = ops::zeros(rows * nk);
            let mut dgate = 0.0f64;
            let mut dsw = ops::zeros(rows * nk);
            if let Some(dmu) = &dmu {
                // delta = sum_k sw S: d(gate) = sum sw . dmu, d(sw) = gate * dmu
                dgate =
                    s.sw.iter()
                        .zip(dmu)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                for (o, &g) in dsw.iter_mut().zip(dmu) {
                    *o = (gate * g as f64) as f32;
                }
            } else if cfg.variant == Variant::Intervene {
                self.intervene_backward(
                    cache,
                    &dout_h,
                    &mut dout1,
                    &mut ddelta,
                    &mut dz,
                    &mut dgate,
                    dm,
                );
            } else {
                dgate = crate::backend::cpu::simd::dot(&dout_h[..rows * d], &s.delta[..rows * d]);
                for i in 0..rows * d {
                    ddelta[i] = (gate * dout_h[i] as f64) as f32;
                }
            }
            g.gate = dgate * sigmoid(p.data[ids.gate][0] as f64);
            if !chunked {
                k::slot_mix_backward(&mut dsw, &mut dstate, &ddelta, &s.sw, &cache.state, dm);
            }
            let mut dsw_pre = ops::zeros(rows * nk);
            match opts
                .slot_mask
                .as_ref()
                .filter(|sm| sm.where_ == SlotMaskWhere::SlotspaceOnly)
            {
                Some(sm) => k::slot_mask_weights_backward(
                    &mut dsw_pre,
                    &dsw,
                    &s.sw,
                    &s.sw_pre,
                    &sm.keep,
                    !cfg.slotspace_signed_weights,
                    dm,
                ),
                None => dsw_pre.copy_from_slice(&dsw),
            }
            if cfg.slotspace_signed_weights {
                k::tanh_backward(&mut dz, &s.sw_pre, &dsw_pre);
            } else {
                k::softmax_slots_backward(&mut dz, &s.sw_pre, &dsw_pre, nk);
            }
            let mut du2d = ops::zeros(rows * m);
            ops::matmul_backward(
                &mut du2d,
                &mut g.slot_out,
                None,
                &dz,
                ops::dropped(&s.u2d, &s.u2),
                &p.data[ids.slot_out],
                rows,
                m,
                nk,
            );
            let du2 = ops::dropout_grad(&du2d, &s.drop);
            let (mut dqf, mut dkf, mut dvs) = (
                ops::zeros(rows * m),
                ops::zeros(rows * m),
                ops::zeros(rows * m),
            );
            k::linear_attn_backward(
                &mut dqf, &mut dkf, &mut dvs, &du2, &s.u2, &s.den, &s.qf, &s.kf, &s.vs, t, m,
            );
            let online = cfg.variant == Variant::Online;
            if let Some(vm) = valid {
                if !online {
                    k::mask_rows_forward(&mut dqf, vm, h, t, m);
                    k::mask_rows_forward(&mut dkf, vm, h, t, m);
                }
                k::mask_rows_forward(&mut dvs, vm, h, t, m);
            }
            let (mut dqs, mut dks) = (ops::zeros(rows * m), ops::zeros(rows * m));
            k::phi_backward(&mut dqs, &s.qs, &dqf);
            k::phi_backward(&mut dks, &s.ks, &dkf);
            if let (Some(vm), true) = (valid, online) {
                k::mask_rows_forward(&mut dqs, vm, h, t, m);
                k::mask_rows_forward(&mut dks, vm, h, t, m);
            }
            let (dqs0, dks0) = match &self.rope_ss {
                Some(tab) => {
                    let (mut dqs0, mut dks0) = (ops::zeros(rows * m), ops::zeros(rows * m));
                    k::rope_backward(&mut dqs0, &dqs, tab, b * h);
                    k::rope_backward(&mut dks0, &dks, tab, b * h);
                    (dqs0, dks0)
                }
                None => (dqs, dks),
            };
            let mut du = ops::zeros(rows * m);
            ops::matmul_backward(
                &mut du,
                &mut g.slot_q,
                None,
                &dqs0,
                &s.u,
                &p.data[ids.slot_q],
                rows,
                m,
                m,
            );
            ops::matmul_backward(
                &mut du,
                &mut g.slot_k,
                None,
                &dks0,
                &s.u,
                &p.data[ids.slot_k],
                rows,
                m,
                m,
            );
            ops::matmul_backward(
                &mut du,
                &mut g.slot_v,
                None,
                &dvs,
                &s.u,
                &p.data[ids.slot_v],
                rows,
                m,
                m,
            );
            ops::matmul_backward(
                &mut drw,
                &mut g.slot_in,
                None,
                &du,
                &cache.rw,
                &p.data[ids.slot_in],
                rows,
                nk,
                m,
            );
        }

        // read
        match &dmu {
            Some(dmu) => drw.iter_mut().zip(dmu).for_each(|(a, &b)| *a += b),
            None => {
                k::slot_mix_backward(&mut drw, &mut dstate, &dout1, &cache.rw, &cache.state, dm)
            }
        }
        let rtemp = cfg.read_temperature.max(1e-6) as f32;
        let routing = self.routing(opts);
        let read_keep = opts
            .slot_mask
            .as_ref()
            .filter(|sm| sm.where_ == SlotMaskWhere::Read)
            .map(|sm| &sm.keep);
        let mut dlogits = ops::zeros(cache.rw.len());
        k::read_weights_backward(
            &mut dlogits,
            &drw,
            &cache.rw,
            &cache.noisy,
            &routing,
            rtemp,
            read_keep,
            dm,
        );
        let read_mask = opts.slot_mask.as_ref().and_then(|sm| match sm.where_ {
            SlotMaskWhere::Read => Some((&sm.keep, ReadMask::Read)),
            SlotMaskWhere::ContentReadOnly => Some((&sm.keep, ReadMask::ContentOnly)),
            SlotMaskWhere::SlotspaceOnly => None,
        });
        let mut dq_h = ops::zeros(n * c);
        let mut dkeys = vec![0.0; h * nk * d];
        let content = cfg.use_content_read && !chunked;
        let mut dgamma = k::read_logits_backward(
            &mut dq_h,
            &mut dkeys,
            content.then_some(&mut dstate[..]),
            &dlogits,
            content.then_some(&cache.lcont[..]),
            &cache.q_h,
            &cache.keys,
            &cache.state,
            cache.gamma,
            read_mask,
            dm,
        );
        // chunk form, content read: lc = (q.S)/sqrt(d), so d(q.S) = dlogits * gamma / sqrt(d)
        let mut content_b = Vec::new();
        let mut content_qs = Vec::new();
        if chunked && cfg.use_content_read {
            let scale = 1.0 / (d as f64).sqrt();
            dgamma = simd_dot(&dlogits, &cache.lcont);
            let gb = (cache.gamma as f64 * scale) as f32;
            content_b = dlogits.iter().map(|&x| x * gb).collect();
            let inv = (d as f32).sqrt();
            content_qs = cache.lcont.iter().map(|&x| x * inv).collect();
        }
        if let Some(i) = self.ids.content_read_gamma {
            let raw = p.data[i][0] as f64;
            let sp = softplus(raw);
            let mx = cfg.content_read_max_gamma;
            // clamp(max) passes the gradient where softplus(raw) <= max
            if !(mx > 0.0) || sp <= mx {
                g.gamma = dgamma * sigmoid(raw);
            }
        }

        // write scan and write logits
        let mut dwl = ops::zeros(cache.wl.len());
        let mut dv_h = ops::zeros(n * c);
        if let Some(dmu) = &dmu {
            let mu = self.mix_weights(cache);
            let sg = StateGrad {
                x: &dout_h,
                a: mu.as_deref().unwrap_or(&cache.rw),
                xs: dmu,
                content: cfg.use_content_read.then_some(ContentGrad {
                    q: &cache.q_h,
                    b: &content_b,
                    qs: &content_qs,
                }),
            };
            let dq = cfg.use_content_read.then_some(&mut dq_h[..]);
            scan::backward(&mut dwl, &mut dv_h, dq, sg, self.scan_view(cache, dm));
        } else {
            k::slot_scan_backward(
                &mut dwl,
                &mut dv_h,
                &dstate,
                &cache.state,
                &cache.den,
                &cache.rmax,
                &cache.wl,
                &cache.v_h,
                cfg.write_chunk_size,
                dm,
            );
        }
        let wtemp = cfg.write_temperature.max(1e-6) as f32;
        let mut dk_r = ops::zeros(n * c);
        let mut dbias = vec![0.0f64; h];
        k::write_logits_backward(
            &mut dkeys,
            &mut dk_r,
            Some(&mut dbias),
            &dwl,
            &cache.keys,
            &cache.k_r,
            wtemp,
            valid,
            dm,
        );
        if let Some(i) = self.ids.alibi_strength {
            let dstrength: f64 = dbias
                .iter()
                .zip(&self.slopes)
                .map(|(a, &s)| a * s as f64)
                .sum();
            g.alibi = dstrength * sigmoid(p.data[i][0] as f64);
        }
        for (i, v) in dkeys.iter().enumerate() {
            g.slot_keys[i] += v * cache.key_keep[i / d];
        }
        let dk_n = match &self.rope {
            Some(tab) => {
                let mut dk_n = ops::zeros(n * c);
                k::rope_backward(&mut dk_n, &dk_r, tab, b * h);
                dk_n
            }
            None => dk_r,
        };
        let dk_h = if cfg.normalize_k {
            let mut dk_h = ops::zeros(n * c);
            k::l2normalize_backward(&mut dk_h, &dk_n, &cache.k_n, &cache.k_norm, d);
            dk_h
        } else {
            dk_n
        };
        // heads back to [B,T,C], then the projections
        let mut dp = ops::zeros(n * c);
        for (dh, w, gw) in [
            (&dk_h, self.ids.wk_write, &mut g.wk),
            (&dv_h, self.ids.wv_write, &mut g.wv),
            (&dq_h, self.ids.wq_read, &mut g.wq),
        ] {
            k::merge_heads(&mut dp, dh, b, t, h, d);
            ops::matmul_backward(dx, gw, None, &dp, &cache.x, &p.data[w], n, c, c);
        }
        g
    }

    /// Backward of the intervention: given dL/d(out_h), adds dL/d(out1) (beyond the identity
    /// path), dL/d(delta) (without gate), dL/d(z) (slot_peaked scores) and dL/d(gate).
    #[allow(clippy::too_many_arguments)]
    fn intervene_backward(
        &self,
        cache: &AsaCache,
        dout_h: &[f32],
        dout1: &mut [f32],
        ddelta: &mut [f32],
        dz: &mut [f32],
        dgate: &mut f64,
        dm: SlotDims,
    ) {
        let it = &self.intervention;
        let (b, h, t, nk, d) = (dm.b, dm.h, dm.t, dm.k, dm.d);
        let chunk = self.cfg.write_chunk_size.max(1);
        let gate = cache.gate as f64;
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let row = (bi * h + hi) * t + ti;
                    let ci = cache.intv[ti / chunk];
                    let o = &cache.out1[row * d..(row + 1) * d];
                    let dc = &cache.ss.delta[row * d..(row + 1) * d];
                    let dl: Vec<f64> = dc.iter().map(|&x| gate * x as f64).collect();
                    let z = &cache.ss.z[row * nk..(row + 1) * nk];
                    let geo = PosGeom::new(o, &dl, z, it.score_kind);
                    let gy: Vec<f64> = dout_h[row * d..(row + 1) * d]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    let (go, gdl, gz) = geo.vjp(it, &ci, self.head_mask(hi), &gy, o, &dl, z);
                    for j in 0..d {
                        dout1[row * d + j] += go[j] as f32;
                        ddelta[row * d + j] += (gate * gdl[j]) as f32;
                        *dgate += gdl[j] * dc[j] as f64;
                    }
                    for s in 0..nk {
                        dz[row * nk + s] += gz[s] as f32;
                    }
                }
            }
        }
    }
}

/// torch.quantile with linear interpolation.
fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

const IEPS: f64 = 1e-8;

/// Geometry of the refine delta against the base read at one position.
#[derive(Debug, Default, Clone)]
struct PosGeom {
    alpha: f64,
    n2: f64,
    on: f64,     // max(|out1|, eps)
    dn: f64,     // max(|delta|, eps)
    p_norm: f64, // |delta_par|
    r_norm: f64, // |delta_orth|
    score_raw: f64,
    p: Vec<f64>,
    r: Vec<f64>,
}

struct IntvOut {
    delta_mod: Vec<f64>,
    score: f64,
    mask: f64,
}

impl PosGeom {
    fn new(o: &[f32], dl: &[f64], z: &[f32], sk: ScoreKind) -> Self {
        let oo: f64 = o.iter().map(|&x| x as f64 * x as f64).sum();
        let n2 = oo.max(IEPS);
        let dot: f64 = o.iter().zip(dl).map(|(&a, &b)| a as f64 * b).sum();
        let alpha = dot / n2;
        let p: Vec<f64> = o.iter().map(|&x| alpha * x as f64).collect();
        let r: Vec<f64> = dl.iter().zip(&p).map(|(a, b)| a - b).collect();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let on = oo.sqrt().max(IEPS);
        let dn = norm(dl).max(IEPS);
        let (p_norm, r_norm) = (norm(&p), norm(&r));
        let score_raw = match sk {
            ScoreKind::OrthRatio => r_norm / on,
            ScoreKind::OrthFrac => r_norm / dn,
            ScoreKind::AlphaAbs => alpha.abs(),
            ScoreKind::SlotPeaked => {
                let pz = softmax64(z);
                let hh: f64 = -pz
                    .iter()
                    .map(|&q| {
                        let q = q.max(1e-8);
                        q * q.ln()
                    })
                    .sum::<f64>();
                1.0 - hh / (z.len() as f64).ln().max(1e-8)
            }
        };
        PosGeom {
            alpha,
            n2,
            on,
            dn,
            p_norm,
            r_norm,
            score_raw,
            p,
            r,
        }
    }

    fn gate_mask(&self, it: &Intervention, ci: &ChunkIntv) -> (f64, f64) {
        let score = match ci.smax {
            Some(sm) => self.score_raw.min(sm),
            None => self.score_raw,
        };
        let mask = if it.soft_mask {
            sigmoid((score - ci.tau) / it.soft_temp.max(1e-6))
        } else if score > ci.tau {
            1.0
        } else {
            0.0
        };
        (score, mask)
    }

    fn apply(&self, it: &Intervention, ci: &ChunkIntv, hm: Option<f64>) -> IntvOut {
        let dlt: Vec<f64> = self.p.iter().zip(&self.r).map(|(a, b)| a + b).collect();
        let (mut score, mut mask) = (0.0, 0.0);
        let y: Vec<f64> = match it.mode {
            IntvMode::Off => dlt.clone(),
            IntvMode::DeltaPar => self.p.clone(),
            IntvMode::DeltaOrth => self.r.clone(),
            IntvMode::DeltaParPlusOrth => dlt.clone(),
            IntvMode::OrthGate => {
                (score, mask) = self.gate_mask(it, ci);
                self.p
                    .iter()
                    .zip(&self.r)
                    .map(|(p, r)| it.par_beta * p + it.beta * mask * r)
                    .collect()
            }
        };
        let delta_mod = match hm {
            Some(m) => y
                .iter()
                .zip(&dlt)
                .map(|(a, b)| m * a + (1.0 - m) * b)
                .collect(),
            None => y,
        };
        IntvOut {
            delta_mod,
            score,
            mask,
        }
    }

    /// Vector-Jacobian product of `apply`: returns (d out1, d delta, d z).
    #[allow(clippy::too_many_arguments)]
    fn vjp(
        &self,
        it: &Intervention,
        ci: &ChunkIntv,
        hm: Option<f64>,
        gyf: &[f64],
        o: &[f32],
        dl: &[f64],
        z: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = o.len();
        let o64: Vec<f64> = o.iter().map(|&x| x as f64).collect();
        let mut go = vec![0.0; d];
        let mut gdl = vec![0.0; d];
        let mut gz = vec![0.0; z.len()];
        let hmv = hm.unwrap_or(1.0);
        if hm.is_some() {
            for j in 0..d {
                gdl[j] += (1.0 - hmv) * gyf[j];
            }
        }
        let gy: Vec<f64> = gyf.iter().map(|g| hmv * g).collect();
        let (mut gp, mut gr) = (vec![0.0; d], vec![0.0; d]);
        let mut galpha = 0.0;
        match it.mode {
            IntvMode::Off => {
                for j in 0..d {
                    gdl[j] += gy[j];
                }
                return (go, gdl, gz);
            }
            IntvMode::DeltaPar => gp.copy_from_slice(&gy),
            IntvMode::DeltaOrth => gr.copy_from_slice(&gy),
            IntvMode::DeltaParPlusOrth => {
                // p + r == delta exactly
                for j in 0..d {
                    gdl[j] += gy[j];
                }
                return (go, gdl, gz);
            }
            IntvMode::OrthGate => {
                let (score, mask) = self.gate_mask(it, ci);
                for j in 0..d {
                    gp[j] = it.par_beta * gy[j];
                    gr[j] = it.beta * mask * gy[j];
                }
                let gmask = it.beta * gy.iter().zip(&self.r).map(|(a, b)| a * b).sum::<f64>();
                let clipped = ci.smax.map(|sm| self.score_raw > sm).unwrap_or(false);
                let gs = if it.soft_mask && !clipped {
                    gmask * mask * (1.0 - mask) / it.soft_temp.max(1e-6)
                } else {
                    0.0
                };
                let _ = score;
                if gs != 0.0 {
                    let onraw = o64.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let dnraw = dl.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let add_rnorm = |g: f64, gr: &mut [f64]| {
                        if self.r_norm > 0.0 {
                            for j in 0..d {
                                gr[j] += g * self.r[j] / self.r_norm;
                            }
                        }
                    };
                    match it.score_kind {
                        ScoreKind::OrthRatio => {
                            add_rnorm(gs / self.on, &mut gr);
                            if onraw > IEPS {
                                let gon = -gs * self.r_norm / (self.on * self.on);
                                for j in 0..d {
                                    go[j] += gon * o64[j] / onraw;
                                }
                            }
                        }
                        ScoreKind::OrthFrac => {
                            add_rnorm(gs / self.dn, &mut gr);
                            if dnraw > IEPS {
                                let gdn = -gs * self.r_norm / (self.dn * self.dn);
                                for j in 0..d {
                                    gdl[j] += gdn * dl[j] / dnraw;
                                }
                            }
                        }
                        ScoreKind::AlphaAbs => {
                            galpha += gs * self.alpha.signum() * (self.alpha != 0.0) as i32 as f64
                        }
                        ScoreKind::SlotPeaked => {
                            let pz = softmax64(z);
                            let logk = (z.len() as f64).ln().max(1e-8);
                            let gpz: Vec<f64> = pz
                                .iter()
                                .map(|&q| {
                                    if q >= 1e-8 {
                                        gs / logk * (q.ln() + 1.0)
                                    } else {
                                        0.0
                                    }
                                })
                                .collect();
                            let dot: f64 = pz.iter().zip(&gpz).map(|(a, b)| a * b).sum();
                            for s in 0..z.len() {
                                gz[s] += pz[s] * (gpz[s] - dot);
                            }
                        }
                    }
                }
            }
        }
        // r = delta - p
        for j in 0..d {
            gdl[j] += gr[j];
            gp[j] -= gr[j];
        }
        // p = alpha * o
        galpha += gp.iter().zip(&o64).map(|(a, b)| a * b).sum::<f64>();
        for j in 0..d {
            go[j] += self.alpha * gp[j];
        }
        // alpha = (delta . o) / max(|o|^2, eps)
        for j in 0..d {
            gdl[j] += galpha * o64[j] / self.n2;
            go[j] += galpha * dl[j] / self.n2;
        }
        let oo: f64 = o64.iter().map(|x| x * x).sum();
        if oo > IEPS {
            for j in 0..d {
                go[j] -= 2.0 * galpha * self.alpha * o64[j] / self.n2;
            }
        }
        (go, gdl, gz)
    }
}

fn simd_dot(a: &[f32], b: &[f32]) -> f64 {
    crate::backend::cpu::simd::dot(a, b)
}

fn softmax64(z: &[f32]) -> Vec<f64> {
    let mx = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let e: Vec<f64> = z.iter().map(|&x| (x as f64 - mx).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}
