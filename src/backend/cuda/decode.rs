//! Recurrent decoding on a GPU backend, the twin of `model::decode` (the CPU decoder) function by
//! function: [`GpuDecoder::step`] runs `Decoder::step`'s sequence with the device ops (embedding,
//! LayerNorm, GEMMs, GELU, residual adds) and one `asa_decode_step` launch per layer
//! (cuda/decode.cu) for `attn_step`: a block per head updates that head's carried state, reads
//! the slots, runs the refine and writes the head's output.
//!
//! The state is the CPU decoder's (docs/METHOD.md 2.10), on the device: per layer the carried
//! and in-chunk sums [H,K,d] and [H,K] (f64), their maxima [H,K] (f32), and the refine's Sigma
//! [H,M,M] and z [H,M] (f64). A step allocates nothing on the device: the state and the
//! per-token buffers are made once. It uploads the token id (and the position's RoPE rows) and
//! downloads the logits [V], the one host sync of a token (sampling runs on the host). GEMMs run
//! in f32.

use super::layer::GpuParams;
use super::{kern, AsDv, Backend, CudaBackend, Dv, Temp};
use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::vocab::params::{alibi_strength, content_gamma, softplus, LmIds, ParamStore};
use crate::vocab::positions::{alibi_slopes, rope_inv_freqs, rope_row};

/// Threads per block of `asa_decode_step`.
const DECODE_BLOCK: u32 = 128;

/// One layer's carried state and fixed per-layer values on the device.
struct LayerState {
    num_c: Temp<f64>, // [H,K,d]
    den_c: Temp<f64>, // [H,K]
    m_c: Temp<f32>,   // [H,K]
    num_u: Temp<f64>, // [H,K,d]
    den_u: Temp<f64>, // [H,K]
    m_u: Temp<f32>,   // [H,K]
    sigma: Temp<f64>, // [H,M,M] (1 element without refine)
    zs: Temp<f64>,    // [H,M]
    /// ALiBi slope x strength per head [H] (None: no ALiBi)
    bias: Option<Temp<f32>>,
    gamma: f32,
    gate: f32,
}

/// Per-token device buffers (made once).
struct Scratch {
    id: Temp<u32>,     // [1]
    x: Temp<f32>,      // [C] residual stream
    ln: Temp<f32>,     // [C]
    mean: Temp<f32>,   // [1]
    rstd: Temp<f32>,   // [1]
    kp: Temp<f32>,     // [C] = [H,d]
    v: Temp<f32>,      // [C]
    q: Temp<f32>,      // [C]
    out_h: Temp<f32>,  // [C]
    attn: Temp<f32>,   // [C]
    hid: Temp<f32>,    // [hid]
    gel: Temp<f32>,    // [hid]
    logits: Temp<f32>, // [V]
    rope: Temp<f32>,   // [2d + 2M]: cos, sin of the write keys, then of the slotspace q/k
}

/// A recurrent decoder for one sequence on a GPU backend (the CUDA device, or the tests'
/// emulator): `step` feeds the next token and returns the logits predicting the one after.
pub struct GpuDecoder<B: Backend = CudaBackend> {
    be: B,
    cfg: ModelConfig,
    ids: LmIds,
    params: GpuParams,
    layers: Vec<LayerState>,
    ws: Scratch,
    pos: usize,
    inv: Vec<f32>,
    inv_ss: Vec<f32>,
    rope_host: Vec<f32>,
    logits: Vec<f32>,
    /// dynamic shared memory of an `asa_decode_step` block (cuda/decode.cu's layout)
    smem: u32,
}

impl GpuDecoder<CudaBackend> {
    /// The decoder of the model `cfg` with `params` on device 0.
    pub fn new(cfg: &ModelConfig, params: &ParamStore) -> Result<Self> {
        GpuDecoder::with_backend(CudaBackend::new(0)?, cfg, params)
    }
}

impl<B: Backend> GpuDecoder<B> {
    /// The decoder on `be`, its state empty (position 0).
    pub fn with_backend(be: B, cfg: &ModelConfig, params: &ParamStore) -> Result<Self> {
        cfg.validate()?;
        be.set_precision(super::Precision::F32);
        if cfg.variant == Variant::Intervene {
            return Err(AsaError::Config(
                "the intervene variant cannot decode recurrently: its orth_gate thresholds are quantiles over each whole write chunk, so a position depends on later ones".into(),
            ));
        }
        let (template, ids) = LmIds::build(cfg);
        if template.names != params.names || template.shapes != params.shapes {
            return Err(AsaError::Input(
                "GpuDecoder: the parameters do not match the model config (names or shapes differ)"
                    .into(),
            ));
        }
        let (c, h, nk, d) = (cfg.embed_dim, cfg.num_heads, cfg.num_slots, cfg.head_dim());
        let m = if cfg.use_slotspace_refine {
            cfg.slotspace_dim
        } else {
            0
        };
        // cuda/decode.cu's layout: 4 K doubles, then (d + K d + 4 K + 7 M) floats
        let smem = 4 * nk * 8 + (d + nk * d + 4 * nk + 7 * m) * 4;
        if smem > 48 * 1024 {
            return Err(AsaError::Device(format!(
                "decoding needs {smem} bytes of shared memory per head (num_slots {nk}, head_dim {d}, slotspace_dim {m}); at most 48 KiB"
            )));
        }
        let gp = GpuParams::upload(&be, params)?;
        let slopes = alibi_slopes(h);
        let scalar = |id: Option<usize>| id.map(|i| params.data[i][0]);
        let mut layers = Vec::new();
        for b in &ids.blocks {
            let a = &b.attn;
            let bias = if cfg.use_alibi_write {
                let s = alibi_strength(scalar(a.alibi_strength), cfg);
                let v: Vec<f32> = slopes.iter().map(|x| x * s).collect();
                Some(be.temp_from(&v)?)
            } else {
                None
            };
            let st = LayerState {
                num_c: be.temp(h * nk * d)?,
                den_c: be.temp(h * nk)?,
                m_c: be.temp(h * nk)?,
                num_u: be.temp(h * nk * d)?,
                den_u: be.temp(h * nk)?,
                m_u: be.temp(h * nk)?,
                sigma: be.temp((h * m * m).max(1))?,
                zs: be.temp((h * m).max(1))?,
                bias,
                gamma: if cfg.use_content_read {
                    content_gamma(scalar(a.content_read_gamma), cfg)
                } else {
                    0.0
                },
                gate: a
                    .slotspace
                    .as_ref()
                    .map_or(0.0, |ss| softplus(params.data[ss.gate][0] as f64) as f32),
            };
            be.fill(st.m_c.dv(), f32::NEG_INFINITY)?;
            be.fill(st.m_u.dv(), f32::NEG_INFINITY)?;
            layers.push(st);
        }
        let hid = cfg.hidden_dim();
        let ws = Scratch {
            id: be.temp(1)?,
            x: be.temp(c)?,
            ln: be.temp(c)?,
            mean: be.temp(1)?,
            rstd: be.temp(1)?,
            kp: be.temp(c)?,
            v: be.temp(c)?,
            q: be.temp(c)?,
            out_h: be.temp(c)?,
            attn: be.temp(c)?,
            hid: be.temp(hid)?,
            gel: be.temp(hid)?,
            logits: be.temp(cfg.vocab_size)?,
            rope: be.temp(2 * d + 2 * m.max(1))?,
        };
        let (inv, inv_ss) = rope_inv_freqs(cfg);
        Ok(GpuDecoder {
            inv,
            inv_ss,
            rope_host: vec![0.0; 2 * d + 2 * m.max(1)],
            smem: smem as u32,
            logits: vec![0.0; cfg.vocab_size],
            be,
            cfg: cfg.clone(),
            ids,
            params: gp,
            layers,
            ws,
            pos: 0,
        })
    }

    /// The position the next `step` fills.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Numbers in the recurrent state: `L H (K (2d + 4) + M (M + 1))`, as the CPU decoder's.
    pub fn state_len(&self) -> usize {
        let c = &self.cfg;
        let m = if c.use_slotspace_refine {
            c.slotspace_dim
        } else {
            0
        };
        c.num_layers * c.num_heads * (c.num_slots * (2 * c.head_dim() + 4) + m * (m + 1))
    }

    /// Back to the empty state at position 0.
    pub fn reset(&mut self) -> Result<()> {
        for st in &self.layers {
            for t in [
                &st.num_c, &st.den_c, &st.num_u, &st.den_u, &st.sigma, &st.zs,
            ] {
                self.be.memset_zero(t.dv())?;
            }
            self.be.fill(st.m_c.dv(), f32::NEG_INFINITY)?;
            self.be.fill(st.m_u.dv(), f32::NEG_INFINITY)?;
        }
        self.pos = 0;
        Ok(())
    }

    /// The GPU's name, for reports.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Feeds `token` at the current position; returns the logits [V] predicting the next token.
    pub fn step(&mut self, token: u32) -> Result<&[f32]> {
        let cfg = &self.cfg;
        let (c, v, hid) = (cfg.embed_dim, cfg.vocab_size, cfg.hidden_dim());
        let (h, nk, d) = (cfg.num_heads, cfg.num_slots, cfg.head_dim());
        let m = if cfg.use_slotspace_refine {
            cfg.slotspace_dim
        } else {
            0
        };
        cfg.check_decode_step(token, self.pos)?;
        let pos = self.pos;
        let (be, p, ids, ws) = (&self.be, &self.params, &self.ids, &self.ws);
        // this position's RoPE rows, up with the token
        let (rc, rm) = self.rope_host.split_at_mut(2 * d);
        if !self.inv.is_empty() {
            let (cs, sn) = rc.split_at_mut(d);
            rope_row(cs, sn, pos, &self.inv);
        }
        if !self.inv_ss.is_empty() {
            let (cs, sn) = rm.split_at_mut(m);
            rope_row(cs, sn, pos, &self.inv_ss);
        }
        be.upload_into(ws.id.dv(), &[token])?;
        be.upload_into(ws.rope.dv(), &self.rope_host)?;
        let rope = ws.rope.dv();
        let (cos_d, sin_d) = if self.inv.is_empty() {
            (Dv::null(), Dv::null())
        } else {
            (rope.sub(0, d), rope.sub(d, d))
        };
        let (cos_m, sin_m) = if self.inv_ss.is_empty() {
            (Dv::null(), Dv::null())
        } else {
            (rope.sub(2 * d, m), rope.sub(2 * d + m, m))
        };
        // embedding [C]: the token's row plus, with learned positions, this position's
        let wpe = ids.pos_emb.map_or(Dv::null(), |i| p.p(i).sub(pos * c, c));
        be.encoder_forward(ws.x.dv(), ws.id.dv(), p.p(ids.token_emb), wpe, 1, 1, c)?;
        for (li, st) in self.layers.iter().enumerate() {
            let bid = &ids.blocks[li];
            let a = &bid.attn;
            let ln = |w: usize, b: usize| {
                be.layernorm_forward(
                    ws.ln.dv(),
                    ws.mean.dv(),
                    ws.rstd.dv(),
                    ws.x.dv(),
                    p.p(w),
                    p.p(b),
                    1,
                    c,
                    Dv::null(),
                )
            };
            ln(bid.ln_1_w, bid.ln_1_b)?;
            for (dst, w) in [
                (&ws.kp, a.wk_write),
                (&ws.v, a.wv_write),
                (&ws.q, a.wq_read),
            ] {
                be.matmul_forward(dst.dv(), ws.ln.dv(), p.p(w), Dv::null(), 1, c, c)?;
            }
            let ss = a.slotspace.as_ref();
            let wp = |f: &dyn Fn(&crate::vocab::params::SlotspaceIds) -> usize| {
                ss.map_or(Dv::null(), |s| p.p(f(s)))
            };
            kern::asa_decode_step(
                ws.out_h.dv(),
                st.num_c.dv(),
                st.den_c.dv(),
                st.m_c.dv(),
                st.num_u.dv(),
                st.den_u.dv(),
                st.m_u.dv(),
                st.sigma.dv(),
                st.zs.dv(),
                ws.kp.dv(),
                ws.v.dv(),
                ws.q.dv(),
                p.p(a.slot_keys),
                cos_d,
                sin_d,
                st.bias.as_ref().map_or(Dv::null(), |b| b.dv()),
                wp(&|s| s.slot_in),
                wp(&|s| s.slot_q),
                wp(&|s| s.slot_k),
                wp(&|s| s.slot_v),
                wp(&|s| s.slot_out),
                cos_m,
                sin_m,
                pos as i32,
                cfg.write_chunk_size.max(1) as i32,
                cfg.normalize_k as i32,
                cfg.use_content_read as i32,
                cfg.slotspace_signed_weights as i32,
                cfg.write_temperature.max(1e-6) as f32,
                cfg.read_temperature.max(1e-6) as f32,
                st.gamma,
                st.gate,
                nk as i32,
                d as i32,
                m as i32,
            )
            .grid(be, h as u32, DECODE_BLOCK, self.smem)?;
            be.matmul_forward(
                ws.attn.dv(),
                ws.out_h.dv(),
                p.p(a.out_proj),
                Dv::null(),
                1,
                c,
                c,
            )?;
            be.residual_forward(ws.x.dv(), ws.x.dv(), ws.attn.dv())?;
            ln(bid.ln_2_w, bid.ln_2_b)?;
            let b0 = bid.mlp_0_b.map_or(Dv::null(), |i| p.p(i));
            be.matmul_forward(ws.hid.dv(), ws.ln.dv(), p.p(bid.mlp_0_w), b0, 1, c, hid)?;
            be.gelu_forward(ws.gel.dv(), ws.hid.dv(), Dv::null())?;
            let b3 = bid.mlp_3_b.map_or(Dv::null(), |i| p.p(i));
            be.matmul_forward(ws.attn.dv(), ws.gel.dv(), p.p(bid.mlp_3_w), b3, 1, hid, c)?;
            be.residual_forward(ws.x.dv(), ws.x.dv(), ws.attn.dv())?;
        }
        be.layernorm_forward(
            ws.ln.dv(),
            ws.mean.dv(),
            ws.rstd.dv(),
            ws.x.dv(),
            p.p(ids.ln_f_w),
            p.p(ids.ln_f_b),
            1,
            c,
            Dv::null(),
        )?;
        be.matmul_forward(
            ws.logits.dv(),
            ws.ln.dv(),
            p.p(ids.head()),
            Dv::null(),
            1,
            c,
            v,
        )?;
        self.logits = be.download(ws.logits.dv())?;
        self.pos += 1;
        Ok(&self.logits)
    }
}
