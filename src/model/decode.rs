//! Recurrent decoding on the CPU: one token at a time, each step advancing a carried state and
//! never looking at the prefix again. Step `t` costs the same at position 10,000 as at position
//! 1, and its logits are those of the full forward at position `t` (held to 1e-5 by
//! `tests/decode.rs`).
//!
//! What the state holds (docs/METHOD.md §2.10 derives it). Per layer and head, for each of the
//! `K` slots, under the reference's chunked write rule (chunk `W = write_chunk_size`, chunks
//! `[0,W), [W,2W), ...`):
//! ```text
//! carried   num_c [d], den_c, m_c   totals of the finished chunks, in units of exp(m_c),
//!                                   m_c = the running max R at the end of the last chunk
//! in-chunk  num_u [d], den_u, m_u   sum_{s in chunk, s<=t} exp(w_s - R_s) (v_s | 1), never
//!                                   rescaled; m_u = the chunk's own running max
//! ```
//! so `K (2d + 4)` numbers: at position t, `R_t = max(m_c, m_u)` and the slot state is
//! `(num_c e^{m_c - R_t} + num_u) / max(den_c e^{m_c - R_t} + den_u, 1e-8)`. When a chunk ends,
//! the in-chunk sums fold into the carried ones (`num_c <- num_c e^{m_c - R} + num_u`,
//! `m_c <- R`). Only with `W = 1` do the in-chunk terms vanish into the carry at every step,
//! leaving the `K (d + 2)` of an exact running softmax. The slotspace refine adds, per head,
//! its linear attention's `Sigma [M,M]` and `z [M]`. Nothing else is carried: the read, the
//! refine's output and the MLPs are per token. The sums are kept in f64, as the CPU forward
//! keeps its scan.
//!
//! The intervene variant cannot decode: its `orth_gate` thresholds are quantiles over each whole
//! write chunk, so a position's output depends on later positions of its chunk.

use crate::backend::cpu::{ops, simd, slot_ops as k};
use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::model::layer::AsaLayer;
use crate::model::lm::Lm;
use crate::model::params::ParamStore;
use crate::vocab::dims::DEN_EPS;
use crate::vocab::positions::{rope_inv_freqs, rope_row};

/// The carried state of one layer (all heads). Shapes in the comments.
#[derive(Debug, Clone)]
struct LayerState {
    num_c: Vec<f64>, // [H,K,d] carried numerators
    den_c: Vec<f64>, // [H,K]
    m_c: Vec<f32>,   // [H,K] running max at the end of the last finished chunk (-inf: none)
    num_u: Vec<f64>, // [H,K,d] the current chunk's unrescaled numerators
    den_u: Vec<f64>, // [H,K]
    m_u: Vec<f32>,   // [H,K] the current chunk's running max (-inf: empty)
    sigma: Vec<f64>, // [H,M,M] slotspace sum_s phi(k_s) v_s^T (empty without refine)
    z: Vec<f64>,     // [H,M] slotspace sum_s phi(k_s)
}

impl LayerState {
    fn new(h: usize, nk: usize, d: usize, m: usize) -> Self {
        LayerState {
            num_c: vec![0.0; h * nk * d],
            den_c: vec![0.0; h * nk],
            m_c: vec![f32::NEG_INFINITY; h * nk],
            num_u: vec![0.0; h * nk * d],
            den_u: vec![0.0; h * nk],
            m_u: vec![f32::NEG_INFINITY; h * nk],
            sigma: vec![0.0; h * m * m],
            z: vec![0.0; h * m],
        }
    }

    fn len(&self) -> usize {
        self.num_c.len()
            + self.den_c.len()
            + self.m_c.len()
            + self.num_u.len()
            + self.den_u.len()
            + self.m_u.len()
            + self.sigma.len()
            + self.z.len()
    }
}

/// Per-token work buffers, sized once (the step allocates nothing).
#[derive(Debug, Clone)]
struct Scratch {
    x: Vec<f32>,      // [C] residual stream
    ln: Vec<f32>,     // [C]
    mean: Vec<f32>,   // [1]
    rstd: Vec<f32>,   // [1]
    kp: Vec<f32>,     // [C] = [H,d] write keys (projected)
    kn: Vec<f32>,     // [H,d] normalised
    kr: Vec<f32>,     // [H,d] after RoPE
    knorm: Vec<f32>,  // [H]
    v: Vec<f32>,      // [H,d]
    q: Vec<f32>,      // [H,d]
    state: Vec<f32>,  // [H,K,d] the slot states at this position
    logit: Vec<f32>,  // [K]
    rw: Vec<f32>,     // [H,K] read weights
    u: Vec<f32>,      // [H,M] slotspace embedding of rw
    qs: Vec<f32>,     // [H,M]
    ks: Vec<f32>,     // [H,M]
    vs: Vec<f32>,     // [H,M]
    tmp: Vec<f32>,    // [M]
    u2: Vec<f32>,     // [H,M] linear attention output
    zc: Vec<f32>,     // [H,K] slot_out(u2)
    sw: Vec<f32>,     // [H,K] slotspace weights
    out_h: Vec<f32>,  // [H,d]
    acc: Vec<f64>,    // [d]
    attn: Vec<f32>,   // [C]
    hid: Vec<f32>,    // [hid]
    gel: Vec<f32>,    // [hid]
    mlp: Vec<f32>,    // [C]
    cos: Vec<f32>,    // [d] RoPE row of the write keys at this position
    sin: Vec<f32>,    // [d]
    cos_ss: Vec<f32>, // [M] RoPE row of the slotspace q/k
    sin_ss: Vec<f32>, // [M]
}

/// A recurrent decoder for one sequence of an `Lm`: `step` feeds the next token and returns the
/// logits that predict the one after it.
#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: ModelConfig,
    pos: usize,
    layers: Vec<LayerState>,
    inv: Vec<f32>, // RoPE inverse frequencies of the write keys [d/2] (empty: no RoPE)
    inv_ss: Vec<f32>, // of the slotspace q/k [M/2] (empty: no RoPE)
    ws: Scratch,
}

impl Decoder {
    /// An empty state (position 0) for `lm`'s configuration.
    pub fn new(lm: &Lm) -> Result<Decoder> {
        let cfg = lm.cfg.clone();
        if cfg.variant == Variant::Intervene {
            return Err(AsaError::Config(
                "the intervene variant cannot decode recurrently: its orth_gate thresholds are quantiles over each whole write chunk, so a position depends on later ones".into(),
            ));
        }
        let (c, h, nk, d) = (cfg.embed_dim, cfg.num_heads, cfg.num_slots, cfg.head_dim());
        let m = if cfg.use_slotspace_refine {
            cfg.slotspace_dim
        } else {
            0
        };
        let z = |n: usize| vec![0.0f32; n];
        let ws = Scratch {
            x: z(c),
            ln: z(c),
            mean: z(1),
            rstd: z(1),
            kp: z(c),
            kn: z(c),
            kr: z(c),
            knorm: z(h),
            v: z(c),
            q: z(c),
            state: z(h * nk * d),
            logit: z(nk),
            rw: z(h * nk),
            u: z(h * m),
            qs: z(h * m),
            ks: z(h * m),
            vs: z(h * m),
            tmp: z(m),
            u2: z(h * m),
            zc: z(h * nk),
            sw: z(h * nk),
            out_h: z(c),
            acc: vec![0.0; d],
            attn: z(c),
            hid: z(cfg.hidden_dim()),
            gel: z(cfg.hidden_dim()),
            mlp: z(c),
            cos: z(d),
            sin: z(d),
            cos_ss: z(m),
            sin_ss: z(m),
        };
        let (inv, inv_ss) = rope_inv_freqs(&cfg);
        Ok(Decoder {
            pos: 0,
            layers: (0..cfg.num_layers)
                .map(|_| LayerState::new(h, nk, d, m))
                .collect(),
            inv,
            inv_ss,
            ws,
            cfg,
        })
    }

    /// The position the next `step` fills (tokens fed so far).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Numbers in the recurrent state (all layers): `L H (K (2d + 4) + M (M + 1))`, the same at
    /// every position.
    pub fn state_len(&self) -> usize {
        self.layers.iter().map(LayerState::len).sum()
    }

    /// Back to the empty state at position 0.
    pub fn reset(&mut self) {
        let cfg = &self.cfg;
        let m = self.ws.u.len() / cfg.num_heads.max(1);
        for l in &mut self.layers {
            *l = LayerState::new(cfg.num_heads, cfg.num_slots, cfg.head_dim(), m);
        }
        self.pos = 0;
    }

    /// Feeds `token` at the current position and writes the logits predicting the next token
    /// into `logits` [V]. `lm` and `p` must be the model the decoder was made for.
    pub fn step(&mut self, lm: &Lm, p: &ParamStore, token: u32, logits: &mut [f32]) -> Result<()> {
        let cfg = &self.cfg;
        let (c, v) = (cfg.embed_dim, cfg.vocab_size);
        if lm.cfg.embed_dim != c || lm.layers.len() != self.layers.len() {
            return Err(AsaError::Input(
                "decoder used with another model than it was made for".into(),
            ));
        }
        cfg.check_decode_step(token, self.pos)?;
        if logits.len() != v {
            return Err(AsaError::Input(format!(
                "logits buffer holds {}, expected vocab_size {v}",
                logits.len()
            )));
        }
        let pos = self.pos;
        let ws = &mut self.ws;
        // embedding [C]
        let te = &p.data[lm.ids.token_emb][token as usize * c..][..c];
        ws.x.copy_from_slice(te);
        if let Some(pe) = lm.ids.pos_emb {
            let row = &p.data[pe][pos * c..][..c];
            ws.x.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        if !self.inv.is_empty() {
            rope_row(&mut ws.cos, &mut ws.sin, pos, &self.inv);
        }
        if !self.inv_ss.is_empty() {
            rope_row(&mut ws.cos_ss, &mut ws.sin_ss, pos, &self.inv_ss);
        }
        for (li, st) in self.layers.iter_mut().enumerate() {
            let bid = &lm.ids.blocks[li];
            ops::layernorm_forward(
                &mut ws.ln,
                &mut ws.mean,
                &mut ws.rstd,
                &ws.x,
                &p.data[bid.ln_1_w],
                &p.data[bid.ln_1_b],
                1,
                c,
            );
            attn_step(
                &lm.layers[li],
                p,
                st,
                ws,
                pos,
                !self.inv.is_empty(),
                !self.inv_ss.is_empty(),
            );
            ws.x.iter_mut().zip(&ws.attn).for_each(|(a, b)| *a += b);
            ops::layernorm_forward(
                &mut ws.ln,
                &mut ws.mean,
                &mut ws.rstd,
                &ws.x,
                &p.data[bid.ln_2_w],
                &p.data[bid.ln_2_b],
                1,
                c,
            );
            let hid = ws.hid.len();
            ops::matmul_forward(
                &mut ws.hid,
                &ws.ln,
                &p.data[bid.mlp_0_w],
                bid.mlp_0_b.map(|i| p.data[i].as_slice()),
                1,
                c,
                hid,
            );
            ops::gelu_forward(&mut ws.gel, &ws.hid);
            ops::matmul_forward(
                &mut ws.mlp,
                &ws.gel,
                &p.data[bid.mlp_3_w],
                bid.mlp_3_b.map(|i| p.data[i].as_slice()),
                1,
                hid,
                c,
            );
            ws.x.iter_mut().zip(&ws.mlp).for_each(|(a, b)| *a += b);
        }
        ops::layernorm_forward(
            &mut ws.ln,
            &mut ws.mean,
            &mut ws.rstd,
            &ws.x,
            &p.data[lm.ids.ln_f_w],
            &p.data[lm.ids.ln_f_b],
            1,
            c,
        );
        ops::matmul_forward(logits, &ws.ln, &p.data[lm.ids.head()], None, 1, c, v);
        self.pos += 1;
        Ok(())
    }
}

/// The logits [B,T,V] of `ids` [B,T] by recurrent decoding, each row from an empty state: what
/// the full forward gives, computed token by token (the parity runner and the tests hold the two
/// together).
pub fn decode_logits(lm: &Lm, p: &ParamStore, ids: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
    lm.cfg.check_ids(ids, b, t)?;
    let v = lm.cfg.vocab_size;
    let mut out = vec![0.0f32; b * t * v];
    let mut dec = Decoder::new(lm)?;
    for bi in 0..b {
        dec.reset();
        for ti in 0..t {
            let i = bi * t + ti;
            dec.step(lm, p, ids[i], &mut out[i * v..(i + 1) * v])?;
        }
    }
    Ok(out)
}

/// One ASA layer at one position: ws.ln [C] -> ws.attn [C], advancing `st`. The arithmetic is the
/// forward's (`AsaLayer::forward`, eval mode, softmax routing) for a single position.
fn attn_step(
    layer: &AsaLayer,
    p: &ParamStore,
    st: &mut LayerState,
    ws: &mut Scratch,
    pos: usize,
    rope: bool,
    rope_ss: bool,
) {
    let cfg = &layer.cfg;
    let ids = &layer.ids;
    let (c, h, nk, d) = (cfg.embed_dim, cfg.num_heads, cfg.num_slots, cfg.head_dim());
    let scale = 1.0 / (d as f64).sqrt();
    // projections; with one position [C] is already the head-split [H,d]
    ops::matmul_forward(&mut ws.kp, &ws.ln, &p.data[ids.wk_write], None, 1, c, c);
    ops::matmul_forward(&mut ws.v, &ws.ln, &p.data[ids.wv_write], None, 1, c, c);
    ops::matmul_forward(&mut ws.q, &ws.ln, &p.data[ids.wq_read], None, 1, c, c);
    if cfg.normalize_k {
        k::l2normalize_forward(&mut ws.kn, &mut ws.knorm, &ws.kp, d);
    } else {
        ws.kn.copy_from_slice(&ws.kp);
    }
    if rope {
        for hi in 0..h {
            let r = hi * d..(hi + 1) * d;
            k::rope_row_forward(&mut ws.kr[r.clone()], &ws.kn[r], &ws.cos, &ws.sin);
        }
    } else {
        ws.kr.copy_from_slice(&ws.kn);
    }
    let keys = &p.data[ids.slot_keys]; // [H,K,d]
    let wtemp = cfg.write_temperature.max(1e-6) as f32;
    let strength = layer.alibi_strength(p);
    let chunk = cfg.write_chunk_size.max(1);
    let gamma = if cfg.use_content_read {
        layer.content_gamma(p)
    } else {
        0.0
    };
    let rtemp = cfg.read_temperature.max(1e-6) as f32;

    for hi in 0..h {
        let kr = &ws.kr[hi * d..(hi + 1) * d];
        let vv = &ws.v[hi * d..(hi + 1) * d];
        let qh = &ws.q[hi * d..(hi + 1) * d];
        let bias = cfg.use_alibi_write.then(|| layer.slopes[hi] * strength);
        for s in 0..nk {
            let j = hi * nk + s;
            let key = &keys[j * d..(j + 1) * d];
            // write logit w [B,H,K,T] at this position
            let raw = (simd::dot(key, kr) as f32 as f64 * scale) as f32;
            let mut w = raw / wtemp;
            if let Some(b) = bias {
                w += b * pos as f32;
            }
            // a new chunk: fold the finished chunk's sums into the carried totals
            if pos.is_multiple_of(chunk) && pos > 0 {
                let r_end = if st.m_c[j] >= st.m_u[j] {
                    st.m_c[j]
                } else {
                    st.m_u[j]
                };
                let sc = rescale(st.m_c[j], r_end);
                for (nc, nu) in st.num_c[j * d..(j + 1) * d]
                    .iter_mut()
                    .zip(&mut st.num_u[j * d..(j + 1) * d])
                {
                    *nc = *nc * sc + *nu;
                    *nu = 0.0;
                }
                st.den_c[j] = st.den_c[j] * sc + st.den_u[j];
                st.den_u[j] = 0.0;
                st.m_c[j] = r_end;
                st.m_u[j] = f32::NEG_INFINITY;
            }
            // the chunk's running max and this token's unrescaled term
            st.m_u[j] = if w >= st.m_u[j] { w } else { st.m_u[j] };
            let r = if st.m_c[j] >= st.m_u[j] {
                st.m_c[j]
            } else {
                st.m_u[j]
            };
            let sc = rescale(st.m_c[j], r);
            let e = if r.is_finite() {
                ((w - r) as f64).exp()
            } else {
                0.0
            };
            st.den_u[j] += e;
            let den = st.den_c[j] * sc + st.den_u[j];
            let inv = 1.0 / den.max(DEN_EPS as f64);
            let out = &mut ws.state[j * d..(j + 1) * d];
            for (((o, nu), &nc), &x) in out
                .iter_mut()
                .zip(&mut st.num_u[j * d..(j + 1) * d])
                .zip(&st.num_c[j * d..(j + 1) * d])
                .zip(vv)
            {
                *nu += e * x as f64;
                *o = ((nc * sc + *nu) * inv) as f32;
            }
            // read logit: q.key/sqrt(d) (+ gamma q.state/sqrt(d))
            let lk = (simd::dot(qh, key) as f32 as f64 * scale) as f32;
            ws.logit[s] = if cfg.use_content_read {
                let lc = (simd::dot(&ws.state[j * d..(j + 1) * d], qh) * scale) as f32;
                lk + gamma * lc
            } else {
                lk
            };
        }
        k::softmax_row(&mut ws.rw[hi * nk..(hi + 1) * nk], &ws.logit, rtemp, None);
    }

    // slotspace refine: the read weights' causal linear attention, one position
    let mut gate = 0.0f32;
    if let Some(ss) = &ids.slotspace {
        let m = cfg.slotspace_dim;
        gate = k::softplus(p.data[ss.gate][0] as f64) as f32;
        ops::matmul_forward(&mut ws.u, &ws.rw, &p.data[ss.slot_in], None, h, nk, m);
        ops::matmul_forward(&mut ws.vs, &ws.u, &p.data[ss.slot_v], None, h, m, m);
        for (dst, wid) in [(&mut ws.qs, ss.slot_q), (&mut ws.ks, ss.slot_k)] {
            ops::matmul_forward(dst, &ws.u, &p.data[wid], None, h, m, m);
            if rope_ss {
                for hi in 0..h {
                    let r = hi * m..(hi + 1) * m;
                    ws.tmp.copy_from_slice(&dst[r.clone()]);
                    k::rope_row_forward(&mut dst[r], &ws.tmp, &ws.cos_ss, &ws.sin_ss);
                }
            }
        }
        phi_in_place(&mut ws.qs);
        phi_in_place(&mut ws.ks);
        for hi in 0..h {
            let (qf, kf, vs) = (
                &ws.qs[hi * m..(hi + 1) * m],
                &ws.ks[hi * m..(hi + 1) * m],
                &ws.vs[hi * m..(hi + 1) * m],
            );
            let sig = &mut st.sigma[hi * m * m..(hi + 1) * m * m];
            let z = &mut st.z[hi * m..(hi + 1) * m];
            let mut dsum = 0.0f64;
            for a in 0..m {
                let ka = kf[a] as f64;
                for (sv, &vb) in sig[a * m..(a + 1) * m].iter_mut().zip(vs) {
                    *sv += ka * vb as f64;
                }
                z[a] += ka;
                dsum += qf[a] as f64 * z[a].max(DEN_EPS as f64);
            }
            let inv = 1.0 / dsum.max(DEN_EPS as f64);
            let u2 = &mut ws.u2[hi * m..(hi + 1) * m];
            for (bcol, o) in u2.iter_mut().enumerate() {
                let mut acc = 0.0f64;
                for a in 0..m {
                    acc += qf[a] as f64 * sig[a * m + bcol];
                }
                *o = (acc * inv) as f32;
            }
        }
        ops::matmul_forward(&mut ws.zc, &ws.u2, &p.data[ss.slot_out], None, h, m, nk);
        if cfg.slotspace_signed_weights {
            k::tanh_forward(&mut ws.sw, &ws.zc);
        } else {
            k::softmax_slots_forward(&mut ws.sw, &ws.zc, nk);
        }
    }

    // out_h = sum_k (rw + gate sw) S_k, then out_proj
    for hi in 0..h {
        let acc = &mut ws.acc;
        acc.iter_mut().for_each(|a| *a = 0.0);
        for s in 0..nk {
            let j = hi * nk + s;
            let wgt = if ids.slotspace.is_some() {
                ws.rw[j] + gate * ws.sw[j]
            } else {
                ws.rw[j]
            } as f64;
            for (a, &x) in acc.iter_mut().zip(&ws.state[j * d..(j + 1) * d]) {
                *a += wgt * x as f64;
            }
        }
        for (o, a) in ws.out_h[hi * d..(hi + 1) * d].iter_mut().zip(acc.iter()) {
            *o = *a as f32;
        }
    }
    ops::matmul_forward(
        &mut ws.attn,
        &ws.out_h,
        &p.data[ids.out_proj],
        None,
        1,
        c,
        c,
    );
}

/// exp(m_c - r), 0 when nothing is carried (m_c = -inf)
#[inline]
fn rescale(m_c: f32, r: f32) -> f64 {
    if m_c.is_finite() {
        ((m_c - r) as f64).exp()
    } else {
        0.0
    }
}

/// phi(x) = elu(x) + 1, in place
fn phi_in_place(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = if *v > 0.0 { *v + 1.0 } else { v.exp() };
    }
}
