//! The info tensors of one layer call (`return_info`), assembled from the call's intermediate
//! tensors by one function that the CPU layer (`model::layer`) and the CUDA layer
//! (`backend::cuda::layer`, from its downloaded buffers) both use: same keys, shapes and
//! summaries on either device. Keys and meanings: `docs/METHOD.md` section 7 and
//! `crate::infos::KEYS`.

use crate::config::Variant;
use crate::vocab::dims::SlotDims;
use crate::vocab::options::Info;

/// The slotspace refine's tensors of a call.
pub struct RefineParts<'a> {
    /// softplus of the gate parameter
    pub gate: f32,
    /// [B,H,T,d] the refine's ungated output sum_k w_k S_k
    pub delta: &'a [f32],
    /// [B,H,T,K] its slot weights (tanh or softmax of `z`)
    pub sw: &'a [f32],
    /// [B,H,T,K] its slot logits before tanh / softmax
    pub z: &'a [f32],
}

/// What a layer call computed, for its info dict. Empty slices where a tensor does not exist
/// (e.g. `lcont` without content read).
pub struct InfoParts<'a> {
    pub dm: SlotDims,
    pub variant: Variant,
    pub use_content_read: bool,
    /// the write chunk size (the online variant's statistics are per chunk)
    pub write_chunk: usize,
    /// [B,H,K,T] write logits before temperature and ALiBi, and as the scan uses them
    pub raw: &'a [f32],
    pub wl: &'a [f32],
    /// [B,H,T,K] read logits (key + gamma content; before routing noise), their parts, weights
    pub logits: &'a [f32],
    pub lkey: &'a [f32],
    pub lcont: &'a [f32],
    pub rw: &'a [f32],
    /// [B,H,K,T] |S_t| per slot (empty for the online variant)
    pub state_norm: Vec<f32>,
    pub gamma: f32,
    pub strength: f32,
    /// whether the ALiBi strength is a learned parameter
    pub learned_strength: bool,
    /// [H] the ALiBi bias per position step, when ALiBi is on
    pub bias_h: Option<&'a [f32]>,
    pub refine: Option<RefineParts<'a>>,
    /// intervene variant: [B,H,T,d] the base read before the refine
    pub out1: &'a [f32],
    /// intervene variant: the intervention's logs
    pub intv: Option<Info>,
}

/// Mean L2 norm of the rows of `delta` [rows, d], each scaled by `scale`.
pub fn delta_norm_mean(delta: &[f32], d: usize, scale: f32) -> f32 {
    let rows = delta.len() / d.max(1);
    let sum: f64 = delta
        .chunks(d)
        .map(|r| {
            r.iter()
                .map(|&x| (x * scale) as f64 * (x * scale) as f64)
                .sum::<f64>()
                .sqrt()
        })
        .sum();
    (sum / rows.max(1) as f64) as f32
}

/// The info dict of a call (the reference's keys for its variant).
pub fn assemble(p: InfoParts) -> Info {
    let dm = p.dm;
    let (b, h, t, nk, d) = (dm.b, dm.h, dm.t, dm.k, dm.d);
    let mut info = Info::new();
    let mut put = |k: &str, shape: Vec<usize>, data: Vec<f32>| {
        info.insert(k.to_string(), (shape, data));
    };
    if p.variant == Variant::Online {
        // the online layer's light statistics: per write chunk, the mean read entropy and the
        // share of the most often top-1 slot, averaged over chunks
        put("alibi_strength_mean", vec![], vec![p.strength]);
        put("content_read_gamma_mean", vec![], vec![p.gamma]);
        let mut ent = 0.0f64;
        let mut top1 = 0.0f64;
        let chunk = p.write_chunk.max(1);
        let mut nchunks = 0usize;
        let mut c0 = 0;
        while c0 < t {
            let c1 = (c0 + chunk).min(t);
            let mut e = 0.0f64;
            let mut hist = vec![0usize; nk];
            for bh in 0..b * h {
                for ti in c0..c1 {
                    let w = &p.rw[(bh * t + ti) * nk..][..nk];
                    e -= w
                        .iter()
                        .map(|&x| {
                            let q = (x as f64).max(1e-8);
                            q * q.ln()
                        })
                        .sum::<f64>();
                    let mut best = 0;
                    for s in 1..nk {
                        if w[s] > w[best] {
                            best = s;
                        }
                    }
                    hist[best] += 1;
                }
            }
            let cnt = (b * h * (c1 - c0)) as f64;
            ent += e / cnt;
            top1 += *hist.iter().max().unwrap_or(&0) as f64 / cnt.max(1.0);
            nchunks += 1;
            c0 = c1;
        }
        put("entropy_mean", vec![], vec![(ent / nchunks as f64) as f32]);
        put(
            "top1freq_mean",
            vec![],
            vec![(top1 / nchunks as f64) as f32],
        );
        if let Some(r) = &p.refine {
            put("slotspace_gate_mean", vec![], vec![r.gate]);
            put(
                "slotspace_delta_norm",
                vec![],
                vec![delta_norm_mean(r.delta, d, 1.0)],
            );
        }
        return info;
    }
    put("write_logits_raw", vec![b, h, nk, t], p.raw.to_vec());
    put("write_logits", vec![b, h, nk, t], p.wl.to_vec());
    put("read_weights", vec![b, h, t, nk], p.rw.to_vec());
    put("slot_state_norm", vec![b, h, nk, t], p.state_norm);
    put("content_read_gamma", vec![], vec![p.gamma]);
    if let Some(bias) = p.bias_h {
        let mut ab = vec![0.0; h * t];
        for hi in 0..h {
            for ti in 0..t {
                ab[hi * t + ti] = bias[hi] * ti as f32;
            }
        }
        put("alibi_bias_applied", vec![1, h, 1, t], ab);
    }
    if p.learned_strength {
        put("alibi_strength", vec![], vec![p.strength]);
    }
    let intervene = p.variant == Variant::Intervene;
    if let Some(r) = &p.refine {
        put("slotspace_gate", vec![], vec![r.gate]);
        // baseline logs |delta| without the gate, intervene with it
        let g = if intervene { r.gate } else { 1.0 };
        put(
            "slotspace_delta_norm",
            vec![],
            vec![delta_norm_mean(r.delta, d, g)],
        );
    }
    put("read_logits", vec![b, h, t, nk], p.logits.to_vec());
    put("read_logits_key", vec![b, h, t, nk], p.lkey.to_vec());
    if p.use_content_read {
        put("read_logits_content", vec![b, h, t, nk], p.lcont.to_vec());
    }
    if intervene {
        put("out1", vec![b, h, t, d], p.out1.to_vec());
        if let Some(r) = &p.refine {
            let g = r.gate;
            put(
                "delta",
                vec![b, h, t, d],
                r.delta.iter().map(|x| x * g).collect(),
            );
            put("slot_w", vec![b, h, t, nk], r.z.to_vec());
        }
    } else if let Some(r) = p.refine.as_ref().filter(|r| !r.delta.is_empty()) {
        // the refine's contribution to the heads' output, and its slot weights
        let g = r.gate;
        put(
            "slotspace_delta",
            vec![b, h, t, d],
            r.delta.iter().map(|x| x * g).collect(),
        );
        put("slotspace_weights", vec![b, h, t, nk], r.sw.to_vec());
    }
    if let Some(iv) = p.intv {
        info.extend(iv);
    }
    info
}
