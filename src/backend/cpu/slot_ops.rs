//! CPU reference ops of the ASA layer, one function per op and direction.
//!
//! Layouts (row-major): activations per head are `[B,H,T,d]`; write logits and scan statistics
//! are `[B,H,K,T]` (the reference's `bhkt`); read logits and weights are `[B,H,T,K]`; the slot
//! state history is `[B,H,T,K,d]`. Backward functions accumulate (`+=`) into their outputs.
//!
//! Parallelism is over the `B*H` (batch, head) pairs, which own disjoint memory in every layout
//! above, so results do not depend on thread scheduling.

use rayon::prelude::*;

pub use crate::vocab::dims::{SlotDims, DEN_EPS};
pub use crate::vocab::options::ReadMask;
pub use crate::vocab::positions::{alibi_slopes, rope_table, RopeTable};

use super::scan;
use super::simd;
use super::simd_task;

/// `f32` view of `f64`'s `-inf` test used everywhere a running max may still be empty.
#[inline]
fn finite(x: f32) -> bool {
    x.is_finite()
}

// ------------------------------------------------------------------------------------------------
// Positions: ALiBi slopes and the reference's RoPE
// ------------------------------------------------------------------------------------------------

pub use crate::vocab::params::softplus;

/// The write logits' ALiBi bias per head, bias: [H] = slopes[h] x strength, the strength
/// `softplus(raw) + min_strength` of a learned strength parameter `raw` (else `init`) rounded
/// to f32 first, as the reference's f32 arithmetic does. (The CUDA twin reads `raw` on the
/// device, so no upload follows an optimizer step.)
pub fn alibi_bias(
    bias: &mut [f32],
    slopes: &[f32],
    raw: Option<f32>,
    init: f64,
    min_strength: f64,
) {
    let strength = match raw {
        Some(r) => (softplus(r as f64) + min_strength) as f32,
        None => init as f32,
    };
    for (b, s) in bias.iter_mut().zip(slopes) {
        *b = s * strength;
    }
}

/// out = x*cos + rotate_half(x)*sin, with rotate_half(x)[2i] = -x[2i+1], [2i+1] = x[2i].
/// out, inp: [N,T,D] (N = B*H); table: [T,D]
pub fn rope_forward(out: &mut [f32], inp: &[f32], tab: &RopeTable, n: usize) {
    let (t, d) = (tab.t, tab.dim);
    debug_assert_eq!(inp.len(), n * t * d);
    out.par_chunks_mut(t * d)
        .zip(inp.par_chunks(t * d))
        .for_each(|(o, x)| {
            for ti in 0..t {
                let (c, s) = (
                    &tab.cos[ti * d..(ti + 1) * d],
                    &tab.sin[ti * d..(ti + 1) * d],
                );
                rope_row_forward(&mut o[ti * d..(ti + 1) * d], &x[ti * d..(ti + 1) * d], c, s);
            }
        });
}

/// `rope_forward` of one row at one position: out, x, cos, sin: [D] (the row of the table)
#[inline]
pub fn rope_row_forward(out: &mut [f32], x: &[f32], c: &[f32], s: &[f32]) {
    for i in 0..x.len() / 2 {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        out[2 * i] = a * c[2 * i] - b * s[2 * i];
        out[2 * i + 1] = b * c[2 * i + 1] + a * s[2 * i + 1];
    }
}

/// dinp += J^T dout for the linear map of `rope_forward`. dinp, dout: [N,T,D]
pub fn rope_backward(dinp: &mut [f32], dout: &[f32], tab: &RopeTable, n: usize) {
    let (t, d) = (tab.t, tab.dim);
    debug_assert_eq!(dout.len(), n * t * d);
    dinp.par_chunks_mut(t * d)
        .zip(dout.par_chunks(t * d))
        .for_each(|(dx, g)| {
            for ti in 0..t {
                let (c, s) = (
                    &tab.cos[ti * d..(ti + 1) * d],
                    &tab.sin[ti * d..(ti + 1) * d],
                );
                let (go, dxo) = (&g[ti * d..(ti + 1) * d], &mut dx[ti * d..(ti + 1) * d]);
                for i in 0..d / 2 {
                    let (ga, gb) = (go[2 * i], go[2 * i + 1]);
                    dxo[2 * i] += ga * c[2 * i] + gb * s[2 * i + 1];
                    dxo[2 * i + 1] += gb * c[2 * i + 1] - ga * s[2 * i];
                }
            }
        });
}

// ------------------------------------------------------------------------------------------------
// Head layout and key normalisation
// ------------------------------------------------------------------------------------------------

/// out: [B,H,T,d] <- inp: [B,T,H*d]
pub fn split_heads(out: &mut [f32], inp: &[f32], _b: usize, t: usize, h: usize, d: usize) {
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
        let (bi, hi) = (bh / h, bh % h);
        for ti in 0..t {
            let src = &inp[(bi * t + ti) * h * d + hi * d..][..d];
            o[ti * d..(ti + 1) * d].copy_from_slice(src);
        }
    });
}

/// out: [B,T,H*d] += inp: [B,H,T,d]  (the backward of `split_heads`)
pub fn merge_heads_acc(out: &mut [f32], inp: &[f32], b: usize, t: usize, h: usize, d: usize) {
    merge_heads_with(out, inp, b, t, h, d, |x, s| *x += s);
}

/// out: [B,T,H*d] = inp: [B,H,T,d] (every element written: `out` needs no zeroing; the GPU
/// step zeroes and calls its accumulating `merge_heads`)
pub fn merge_heads(out: &mut [f32], inp: &[f32], b: usize, t: usize, h: usize, d: usize) {
    merge_heads_with(out, inp, b, t, h, d, |x, s| *x = s);
}

fn merge_heads_with(
    out: &mut [f32],
    inp: &[f32],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    put: impl Fn(&mut f32, f32) + Sync,
) {
    assert_eq!(out.len(), b * t * h * d, "merge_heads: out shape");
    assert_eq!(inp.len(), out.len(), "merge_heads: inp shape");
    out.par_chunks_mut(h * d).enumerate().for_each(|(bt, o)| {
        let (bi, ti) = (bt / t, bt % t);
        for hi in 0..h {
            let src = &inp[((bi * h + hi) * t + ti) * d..][..d];
            for (x, &s) in o[hi * d..(hi + 1) * d].iter_mut().zip(src) {
                put(x, s);
            }
        }
    });
}

/// F.normalize(x, dim=-1, eps=1e-8): out = x / max(|x|, eps). out, inp: [rows,d]; norm: [rows]
pub fn l2normalize_forward(out: &mut [f32], norm: &mut [f32], inp: &[f32], d: usize) {
    out.par_chunks_mut(d)
        .zip(norm.par_iter_mut())
        .zip(inp.par_chunks(d))
        .for_each(|((o, n), x)| {
            let nn = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            *n = nn as f32;
            let den = nn.max(1e-8);
            for (oo, &xx) in o.iter_mut().zip(x) {
                *oo = (xx as f64 / den) as f32;
            }
        });
}

/// dinp += (g - y (y.g)) / |x| when |x| > eps, else g / eps.
pub fn l2normalize_backward(dinp: &mut [f32], dout: &[f32], out: &[f32], norm: &[f32], d: usize) {
    dinp.par_chunks_mut(d)
        .zip(dout.par_chunks(d))
        .zip(out.par_chunks(d))
        .zip(norm.par_iter())
        .for_each(|(((dx, g), y), &n)| {
            let n = n as f64;
            if n > 1e-8 {
                let yg: f64 = y.iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum();
                for i in 0..d {
                    dx[i] += ((g[i] as f64 - y[i] as f64 * yg) / n) as f32;
                }
            } else {
                for i in 0..d {
                    dx[i] += (g[i] as f64 / 1e-8) as f32;
                }
            }
        });
}

// ------------------------------------------------------------------------------------------------
// Write logits
// ------------------------------------------------------------------------------------------------

simd_kernel! {
/// raw = slot_keys . k / sqrt(d); wl = raw / wtemp + bias_h * t, then -inf where the token is
/// masked out. raw, wl: [B,H,K,T]; slot_keys: [H,K,d]; k: [B,H,T,d]; bias_h: [H] (ALiBi slope *
/// strength); valid: [B,T]
#[allow(clippy::too_many_arguments)]
pub fn write_logits_forward(
    raw: &mut [f32],
    wl: &mut [f32],
    slot_keys: &[f32],
    k: &[f32],
    wtemp: f32,
    bias_h: Option<&[f32]>,
    valid: Option<&[bool]>,
    dm: SlotDims,
) {
    let SlotDims { h, t, k: nk, d, .. } = dm;
    let scale = 1.0 / (d as f64).sqrt();
    raw.par_chunks_mut(nk * t)
        .zip(wl.par_chunks_mut(nk * t))
        .enumerate()
        .for_each(|(bh, (r, w))| simd_task(#[inline(always)] || {
            let (bi, hi) = (bh / h, bh % h);
            let kk = &k[bh * t * d..(bh + 1) * t * d];
            // r = (k keys^T)^T as a tile product (f32; rows of k against the [d,K] keys, which
            // stay in L1), then scaled
            let mut keys_t = Vec::new();
            scan::transpose_into(&mut keys_t, &slot_keys[hi * nk * d..(hi + 1) * nk * d], nk, d, d);
            let mut rt = vec![0.0f32; t * nk];
            scan::tile_mm(&mut rt, nk, kk, d, &keys_t, nk, t, nk, |_| (0, d), false);
            let mut tmp = Vec::new();
            scan::transpose_into(&mut tmp, &rt, t, nk, nk);
            r.copy_from_slice(&tmp);
            for s in 0..nk {
                for ti in 0..t {
                    let rv = (r[s * t + ti] as f64 * scale) as f32;
                    r[s * t + ti] = rv;
                    let mut v = rv / wtemp;
                    if let Some(bias) = bias_h {
                        v += bias[hi] * ti as f32;
                    }
                    if let Some(m) = valid {
                        if !m[bi * t + ti] {
                            v = f32::NEG_INFINITY;
                        }
                    }
                    w[s * t + ti] = v;
                }
            }
        }));
}
}

simd_kernel! {
/// Backward of `write_logits_forward`. dslot_keys: [H,K,d]; dk: [B,H,T,d]; dbias_h: [H] receives
/// sum_t dwl * t (the caller chains it to the ALiBi strength). dwl: [B,H,K,T]
#[allow(clippy::too_many_arguments)]
pub fn write_logits_backward(
    dslot_keys: &mut [f32],
    dk: &mut [f32],
    dbias_h: Option<&mut [f64]>,
    dwl: &[f32],
    slot_keys: &[f32],
    k: &[f32],
    wtemp: f32,
    valid: Option<&[bool]>,
    dm: SlotDims,
) {
    let SlotDims { b, h, t, k: nk, d } = dm;
    let scale = 1.0 / (d as f64).sqrt();
    // per (b,h): dk rows, plus partial dslot_keys[h] and dbias[h]; summed over b afterwards in order.
    let partial: Vec<(Vec<f32>, f64)> = dk
        .par_chunks_mut(t * d)
        .enumerate()
        .map(|(bh, dkk)| simd_task(#[inline(always)] || {
            let (bi, hi) = (bh / h, bh % h);
            let kk = &k[bh * t * d..(bh + 1) * t * d];
            let g = &dwl[bh * nk * t..(bh + 1) * nk * t];
            // graw[s, t] = dwl / wtemp * scale (0 at masked positions: masked_fill passes no
            // gradient), then dk += graw^T keys and dkeys = graw k as tile products
            let mut graw = vec![0.0f32; nk * t];
            let mut dbias = 0.0f64;
            let f = scale / wtemp as f64;
            for s in 0..nk {
                for ti in 0..t {
                    if valid.is_some_and(|m| !m[bi * t + ti]) {
                        continue;
                    }
                    let gw = g[s * t + ti] as f64;
                    dbias += gw * ti as f64;
                    graw[s * t + ti] = (gw * f) as f32;
                }
            }
            let keys = &slot_keys[hi * nk * d..(hi + 1) * nk * d];
            let mut gt = Vec::new();
            scan::transpose_into(&mut gt, &graw, nk, t, t);
            scan::tile_mm(dkk, d, &gt, nk, keys, d, t, d, |_| (0, nk), true);
            let mut dk32 = vec![0.0f32; nk * d];
            scan::tile_mm(&mut dk32, d, &graw, t, kk, d, nk, d, |_| (0, t), false);
            (dk32, dbias)
        }))
        .collect();
    let mut dbias_acc = vec![0.0f64; h];
    for bi in 0..b {
        for hi in 0..h {
            let (dkeys, dbias) = &partial[bi * h + hi];
            for (o, v) in dslot_keys[hi * nk * d..(hi + 1) * nk * d]
                .iter_mut()
                .zip(dkeys)
            {
                *o += *v;
            }
            dbias_acc[hi] += dbias;
        }
    }
    if let Some(db) = dbias_h {
        for (o, v) in db.iter_mut().zip(dbias_acc) {
            *o += v;
        }
    }
}
}

// ------------------------------------------------------------------------------------------------
// The write scan: per slot, a causal softmax over time with the reference's chunked running max
// ------------------------------------------------------------------------------------------------

simd_kernel! {
/// For every (b,h,k): R_t = max(m_prev, cummax_{c0..t} w) inside chunk [c0,c1), m_prev being the
/// max carried from the previous chunk; e_t = exp(w_t - R_t) (0 while R is -inf);
/// den_t = den_prev * exp(m_prev - R_t) + sum_{s=c0..t} e_s, and the same for num with e_s v_s;
/// state_t = num_t / max(den_t, 1e-8). Terms inside a chunk are never rescaled when the max rises
/// later in that chunk: that is the reference's definition (exact softmax only for chunk 1).
/// An empty prefix (left padding) keeps num = den = 0, so the state is 0, never NaN.
///
/// state: [B,H,T,K,d]; den, rmax: [B,H,K,T] (saved for backward); wl: [B,H,K,T]; v: [B,H,T,d]
pub fn slot_scan_forward(
    state: &mut [f32],
    den: &mut [f32],
    rmax: &mut [f32],
    wl: &[f32],
    v: &[f32],
    chunk: usize,
    dm: SlotDims,
) {
    let SlotDims { t, k: nk, d, .. } = dm;
    let chunk = chunk.max(1);
    state
        .par_chunks_mut(t * nk * d)
        .zip(den.par_chunks_mut(nk * t))
        .zip(rmax.par_chunks_mut(nk * t))
        .enumerate()
        .for_each(|(bh, ((st, dn), rm))| simd_task(#[inline(always)] || {
            let w = &wl[bh * nk * t..(bh + 1) * nk * t];
            let vv = &v[bh * t * d..(bh + 1) * t * d];
            // every slot's recurrence, advanced together position by position so that the
            // state rows [t, 0..K, :] are written in memory order; per slot the arithmetic is
            // the serial scan's
            let mut num = vec![0.0f64; nk * d];
            let mut dsum = vec![0.0f64; nk];
            let mut m_prev = vec![f32::NEG_INFINITY; nk];
            let mut num_prev = vec![0.0f64; nk * d];
            let mut den_prev = vec![0.0f64; nk];
            let mut add_num = vec![0.0f64; nk * d];
            let mut add_den = vec![0.0f64; nk];
            let mut cm = vec![f32::NEG_INFINITY; nk];
            let mut c0 = 0;
            while c0 < t {
                let c1 = (c0 + chunk).min(t);
                // carried state, rescaled per position by exp(m_prev - R_t)
                num_prev.copy_from_slice(&num);
                den_prev.copy_from_slice(&dsum);
                add_num.iter_mut().for_each(|x| *x = 0.0);
                add_den.iter_mut().for_each(|x| *x = 0.0);
                cm.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                for ti in c0..c1 {
                    let vt = &vv[ti * d..(ti + 1) * d];
                    for s in 0..nk {
                        let wst = w[s * t + ti];
                        cm[s] = if wst >= cm[s] { wst } else { cm[s] };
                        let mp = m_prev[s];
                        let r = if mp >= cm[s] { mp } else { cm[s] };
                        rm[s * t + ti] = r;
                        let scale = if finite(mp) {
                            ((mp - r) as f64).exp()
                        } else {
                            0.0
                        };
                        let e = if finite(r) {
                            ((wst - r) as f64).exp()
                        } else {
                            0.0
                        };
                        add_den[s] += e;
                        let an = &mut add_num[s * d..(s + 1) * d];
                        for (x, &vj) in an.iter_mut().zip(vt) {
                            *x += e * vj as f64;
                        }
                        dsum[s] = den_prev[s] * scale + add_den[s];
                        dn[s * t + ti] = dsum[s] as f32;
                        // one division per position, then products (within an f64 ulp of num/dd)
                        let inv = 1.0 / dsum[s].max(DEN_EPS as f64);
                        let o = &mut st[(ti * nk + s) * d..][..d];
                        let (nm, np) = (&mut num[s * d..(s + 1) * d], &num_prev[s * d..(s + 1) * d]);
                        for (((o, nm), &np), &an) in o.iter_mut().zip(nm).zip(np).zip(&*an) {
                            *nm = np * scale + an;
                            *o = (*nm * inv) as f32;
                        }
                    }
                }
                for s in 0..nk {
                    m_prev[s] = rm[s * t + c1 - 1];
                }
                c0 = c1;
            }
        }));
}
}

simd_kernel! {
/// Backward of `slot_scan_forward`, including the reference's gradient through the running max
/// (cummax routes to the last position holding the max; `maximum` splits exact ties in half).
/// dwl: [B,H,K,T]; dv: [B,H,T,d]; dstate: [B,H,T,K,d]
#[allow(clippy::too_many_arguments)]
pub fn slot_scan_backward(
    dwl: &mut [f32],
    dv: &mut [f32],
    dstate: &[f32],
    state: &[f32],
    den: &[f32],
    rmax: &[f32],
    wl: &[f32],
    v: &[f32],
    chunk: usize,
    dm: SlotDims,
) {
    let SlotDims { t, k: nk, d, .. } = dm;
    let chunk = chunk.max(1);
    dwl.par_chunks_mut(nk * t)
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(bh, (gw, gv))| simd_task(#[inline(always)] || {
            let w = &wl[bh * nk * t..(bh + 1) * nk * t];
            let vv = &v[bh * t * d..(bh + 1) * t * d];
            let st = &state[bh * t * nk * d..(bh + 1) * t * nk * d];
            let gs = &dstate[bh * t * nk * d..(bh + 1) * t * nk * d];
            let dn = &den[bh * nk * t..(bh + 1) * nk * t];
            let rm = &rmax[bh * nk * t..(bh + 1) * nk * t];
            let starts: Vec<usize> = (0..t).step_by(chunk).collect();
            // every slot's reverse recurrence, advanced together position by position so that
            // the state and gradient rows [t, 0..K, :] are read in memory order; per slot the
            // arithmetic is the serial scan's, and dv[t] gets the slots' terms in slot order
            // as before
            let cl = chunk.min(t); // positions of the longest chunk
            let mut cm = vec![0.0f32; nk * cl];
            let mut cidx = vec![0usize; nk * cl];
            let mut a = vec![0.0f64; nk * d];
            let mut gn = vec![0.0f64; d];
            let mut num_prev = vec![0.0f64; nk * d];
            // gradients w.r.t. the values carried out of the chunk being processed
            let mut dnum_c = vec![0.0f64; nk * d];
            let mut dden_c = vec![0.0f64; nk];
            let mut dm_c = vec![0.0f64; nk];
            let mut dnum_prev = vec![0.0f64; nk * d];
            let mut dden_prev = vec![0.0f64; nk];
            let mut dm_prev = vec![0.0f64; nk];
            let mut bsum = vec![0.0f64; nk];
            let mut m_prev = vec![f32::NEG_INFINITY; nk];
            let mut den_prev = vec![0.0f64; nk];
            for &c0 in starts.iter().rev() {
                let c1 = (c0 + chunk).min(t);
                for s in 0..nk {
                    let ws = &w[s * t..(s + 1) * t];
                    let (dns, rms) = (&dn[s * t..(s + 1) * t], &rm[s * t..(s + 1) * t]);
                    // carried-in values: end of the previous chunk
                    (m_prev[s], den_prev[s]) = if c0 > 0 {
                        (rms[c0 - 1], dns[c0 - 1] as f64)
                    } else {
                        (f32::NEG_INFINITY, 0.0)
                    };
                    let np = &mut num_prev[s * d..(s + 1) * d];
                    if c0 > 0 {
                        let dd = (dns[c0 - 1]).max(DEN_EPS) as f64;
                        let sp = &st[((c0 - 1) * nk + s) * d..][..d];
                        for (x, &y) in np.iter_mut().zip(sp) {
                            *x = y as f64 * dd;
                        }
                    } else {
                        np.iter_mut().for_each(|x| *x = 0.0);
                    }
                    // chunk-local cummax and the index it routes to (last position holding the max)
                    let mut c = f32::NEG_INFINITY;
                    let mut ci = c0;
                    for ti in c0..c1 {
                        if ws[ti] >= c {
                            c = ws[ti];
                            ci = ti;
                        }
                        cm[s * cl + ti - c0] = c;
                        cidx[s * cl + ti - c0] = ci;
                    }
                }
                a.iter_mut().for_each(|x| *x = 0.0);
                bsum.iter_mut().for_each(|x| *x = 0.0);
                dnum_prev.iter_mut().for_each(|x| *x = 0.0);
                dden_prev.iter_mut().for_each(|x| *x = 0.0);
                dm_prev.iter_mut().for_each(|x| *x = 0.0);
                for ti in (c0..c1).rev() {
                    for s in 0..nk {
                        let ws = &w[s * t..(s + 1) * t];
                        let gws = &mut gw[s * t..(s + 1) * t];
                        let den_t = dn[s * t + ti];
                        let dd = den_t.max(DEN_EPS) as f64;
                        let g = &gs[(ti * nk + s) * d..][..d];
                        let sv = &st[(ti * nk + s) * d..][..d];
                        let inv = 1.0 / dd;
                        for (x, &y) in gn.iter_mut().zip(g) {
                            *x = y as f64 * inv;
                        }
                        let gsum = simd::dot(g, sv);
                        let mut gd = if den_t >= DEN_EPS { -gsum / dd } else { 0.0 };
                        let mut dr = 0.0f64;
                        if ti == c1 - 1 {
                            for (x, &y) in gn.iter_mut().zip(&dnum_c[s * d..(s + 1) * d]) {
                                *x += y;
                            }
                            gd += dden_c[s];
                            dr += dm_c[s];
                        }
                        let as_ = &mut a[s * d..(s + 1) * d];
                        for (x, &y) in as_.iter_mut().zip(&gn) {
                            *x += y;
                        }
                        bsum[s] += gd;
                        let r = rm[s * t + ti];
                        // e_t = exp(w_t - R_t)
                        if finite(r) {
                            let e = ((ws[ti] - r) as f64).exp();
                            let vt = &vv[ti * d..(ti + 1) * d];
                            let gvt = &mut gv[ti * d..(ti + 1) * d];
                            for (x, &y) in gvt.iter_mut().zip(&*as_) {
                                *x += (e * y) as f32;
                            }
                            let de = bsum[s] + simd::dot(vt, as_);
                            if ws[ti].is_finite() {
                                gws[ti] += (e * de) as f32;
                            }
                            dr -= e * de;
                        }
                        // scale_t = exp(m_prev - R_t)
                        let mp = m_prev[s];
                        if finite(mp) {
                            let scale = ((mp - r) as f64).exp();
                            let dp = &mut dnum_prev[s * d..(s + 1) * d];
                            for (x, &y) in dp.iter_mut().zip(&gn) {
                                *x += scale * y;
                            }
                            let dscale = den_prev[s] * gd + simd::dot(&num_prev[s * d..(s + 1) * d], &gn);
                            dden_prev[s] += scale * gd;
                            dm_prev[s] += scale * dscale;
                            dr -= scale * dscale;
                        }
                        // R_t = maximum(m_prev, cm_t)
                        let cmt = cm[s * cl + ti - c0];
                        let to_cm = if mp > cmt {
                            dm_prev[s] += dr;
                            0.0
                        } else if cmt > mp {
                            dr
                        } else {
                            dm_prev[s] += 0.5 * dr;
                            0.5 * dr
                        };
                        let idx = cidx[s * cl + ti - c0];
                        if to_cm != 0.0 && ws[idx].is_finite() {
                            gws[idx] += to_cm as f32;
                        }
                    }
                }
                dnum_c.copy_from_slice(&dnum_prev);
                dden_c.copy_from_slice(&dden_prev);
                dm_c.copy_from_slice(&dm_prev);
            }
        }));
}
}

// ------------------------------------------------------------------------------------------------
// Read: logits, routing weights, slot mix
// ------------------------------------------------------------------------------------------------

pub use crate::vocab::options::SlotKeep;

simd_kernel! {
/// lkey = q.slot_keys/sqrt(d); lcont = q.state_t/sqrt(d); logits = lkey + gamma*lcont, with
/// the slot mask applied as the reference does. lkey, lcont, logits: [B,H,T,K]; q: [B,H,T,d];
/// slot_keys: [H,K,d]; state: [B,H,T,K,d]
#[allow(clippy::too_many_arguments)]
pub fn read_logits_forward(
    lkey: &mut [f32],
    lcont: Option<&mut [f32]>,
    logits: &mut [f32],
    q: &[f32],
    slot_keys: &[f32],
    state: &[f32],
    gamma: f32,
    mask: Option<(&SlotKeep, ReadMask)>,
    dm: SlotDims,
) {
    let SlotDims { h, t, k: nk, d, .. } = dm;
    let scale = 1.0 / (d as f64).sqrt();
    let ninf = f32::NEG_INFINITY;
    let has_content = lcont.is_some();
    let mut dummy = Vec::new();
    let lc_buf: &mut [f32] = match lcont {
        Some(x) => x,
        None => {
            dummy.resize(lkey.len(), 0.0);
            &mut dummy
        }
    };
    lkey.par_chunks_mut(t * nk)
        .zip(lc_buf.par_chunks_mut(t * nk))
        .zip(logits.par_chunks_mut(t * nk))
        .enumerate()
        .for_each(|(bh, ((lk, lc), lg))| simd_task(#[inline(always)] || {
            let hi = bh % h;
            // the key part of every position as one tile product: lk = q keys^T * scale (the
            // [d,K] keys stay in L1); the content part and the mask follow per element
            let mut keys_t = Vec::new();
            let keys = &slot_keys[hi * nk * d..(hi + 1) * nk * d];
            scan::transpose_into(&mut keys_t, keys, nk, d, d);
            let qb = &q[bh * t * d..(bh + 1) * t * d];
            scan::tile_mm(lk, nk, qb, d, &keys_t, nk, t, nk, |_| (0, d), false);
            for ti in 0..t {
                let qt = &q[(bh * t + ti) * d..][..d];
                let keep = mask.and_then(|(m, _)| m.at(ti, t));
                for s in 0..nk {
                    let mut vk = (lk[ti * nk + s] as f64 * scale) as f32;
                    let mut vc = 0.0f32;
                    if has_content {
                        let sv = &state[((bh * t + ti) * nk + s) * d..][..d];
                        vc = (simd::dot(sv, qt) * scale) as f32;
                    }
                    if let (Some(kp), Some((_, where_))) = (keep, mask) {
                        if !kp[s] {
                            match where_ {
                                ReadMask::Read => {
                                    vk = ninf;
                                    vc = ninf;
                                }
                                ReadMask::ContentOnly => vc = 0.0,
                            }
                        }
                    }
                    let i = ti * nk + s;
                    lk[i] = vk;
                    lc[i] = vc;
                    lg[i] = if has_content { vk + gamma * vc } else { vk };
                }
            }
        }));
}
}

simd_kernel! {
/// Backward of `read_logits_forward`. Returns d(gamma) (sum of dlogits * lcont over unmasked
/// entries). dq: [B,H,T,d]; dslot_keys: [H,K,d]; dstate: [B,H,T,K,d]; dlogits: [B,H,T,K]
#[allow(clippy::too_many_arguments)]
pub fn read_logits_backward(
    dq: &mut [f32],
    dslot_keys: &mut [f32],
    dstate: Option<&mut [f32]>,
    dlogits: &[f32],
    lcont: Option<&[f32]>,
    q: &[f32],
    slot_keys: &[f32],
    state: &[f32],
    gamma: f32,
    mask: Option<(&SlotKeep, ReadMask)>,
    dm: SlotDims,
) -> f64 {
    let SlotDims { b, h, t, k: nk, d } = dm;
    let scale = 1.0 / (d as f64).sqrt();
    let mut dummy = Vec::new();
    let has_content = dstate.is_some() && lcont.is_some();
    let ds_buf: &mut [f32] = match dstate {
        Some(x) => x,
        None => {
            dummy.resize(b * h, 0.0);
            &mut dummy
        }
    };
    let ds_chunk = ds_buf.len() / (b * h);
    let partial: Vec<(Vec<f32>, f64)> = dq
        .par_chunks_mut(t * d)
        .zip(ds_buf.par_chunks_mut(ds_chunk))
        .enumerate()
        .map(|(bh, (gq, gst))| simd_task(#[inline(always)] || {
            let hi = bh % h;
            // gk[t, s] = dlogits * scale where the key logit is live (0 where masked): the key
            // part's gradients are then two tile products; the content part goes per element
            let mut gk = vec![0.0f32; t * nk];
            let mut dgamma = 0.0f64;
            for ti in 0..t {
                let qt = &q[(bh * t + ti) * d..][..d];
                let keep = mask.and_then(|(m, _)| m.at(ti, t));
                for s in 0..nk {
                    let i = (bh * t + ti) * nk + s;
                    let g = dlogits[i] as f64;
                    if g == 0.0 {
                        continue;
                    }
                    let masked = keep.map(|kp| !kp[s]).unwrap_or(false);
                    let (key_live, cont_live) = match (masked, mask.map(|m| m.1)) {
                        (true, Some(ReadMask::Read)) => (false, false),
                        (true, Some(ReadMask::ContentOnly)) => (true, false),
                        _ => (true, true),
                    };
                    if key_live {
                        gk[ti * nk + s] = (g * scale) as f32;
                    }
                    if has_content && cont_live {
                        let lc = lcont.unwrap()[i] as f64;
                        dgamma += g * lc;
                        let gc = g * gamma as f64 * scale;
                        let sv = &state[((bh * t + ti) * nk + s) * d..][..d];
                        let gqt = &mut gq[ti * d..(ti + 1) * d];
                        let gs = &mut gst[(ti * nk + s) * d..][..d];
                        for j in 0..d {
                            gqt[j] += (gc * sv[j] as f64) as f32;
                            gs[j] += (gc * qt[j] as f64) as f32;
                        }
                    }
                }
            }
            // dq += gk keys, dkeys = gk^T q
            let keys = &slot_keys[hi * nk * d..(hi + 1) * nk * d];
            scan::tile_mm(gq, d, &gk, nk, keys, d, t, d, |_| (0, nk), true);
            let mut gt = Vec::new();
            scan::transpose_into(&mut gt, &gk, t, nk, nk);
            let mut dkeys = vec![0.0f32; nk * d];
            let qb = &q[bh * t * d..(bh + 1) * t * d];
            scan::tile_mm(&mut dkeys, d, &gt, t, qb, d, nk, d, |_| (0, t), false);
            (dkeys, dgamma)
        }))
        .collect();
    let mut dgamma = 0.0;
    for bi in 0..b {
        for hi in 0..h {
            let (dk, dg) = &partial[bi * h + hi];
            for (o, v) in dslot_keys[hi * nk * d..(hi + 1) * nk * d]
                .iter_mut()
                .zip(dk)
            {
                *o += *v;
            }
            dgamma += dg;
        }
    }
    dgamma
}
}

/// Routing of the read: how read weights come from read logits.
#[derive(Debug, Clone)]
pub enum Routing<'a> {
    /// softmax(logits / rtemp)
    Softmax,
    /// one-hot of the argmax (first index on ties); no gradient to the logits
    Top1,
    /// softmax over the top-k logits (others -inf) / rtemp
    TopK(usize),
    /// given weights [B,H,T,K], renormalised over K (`routing_mode = external`)
    External(&'a [f32]),
    /// the reference's `routing_override` tensor: NaN/inf -> 0, clamp >= 0, renormalise
    Override(&'a [f32]),
}

/// rw = routing(logits), then the hard read mask with renormalisation when `keep` is given.
/// rw, logits: [B,H,T,K]
pub fn read_weights_forward(
    rw: &mut [f32],
    logits: &[f32],
    routing: &Routing,
    rtemp: f32,
    keep: Option<&SlotKeep>,
    dm: SlotDims,
) {
    let SlotDims { t, k: nk, .. } = dm;
    rw.par_chunks_mut(nk).enumerate().for_each(|(row, w)| {
        let ti = row % t;
        let lg = &logits[row * nk..(row + 1) * nk];
        match routing {
            Routing::Softmax => softmax_row(w, lg, rtemp, None),
            Routing::Top1 => {
                let mut best = 0;
                for s in 1..nk {
                    if lg[s] > lg[best] {
                        best = s;
                    }
                }
                w.iter_mut().for_each(|x| *x = 0.0);
                w[best] = 1.0;
            }
            Routing::TopK(kk) => {
                let sel = topk_select(lg, (*kk).clamp(1, nk));
                softmax_row(w, lg, rtemp, Some(&sel));
            }
            Routing::External(ov) | Routing::Override(ov) => {
                let src = &ov[row * nk..(row + 1) * nk];
                let clean = matches!(routing, Routing::Override(_));
                let mut sum = 0.0f64;
                for s in 0..nk {
                    let mut x = src[s];
                    if clean {
                        x = if x.is_finite() { x.max(0.0) } else { 0.0 };
                    }
                    w[s] = x;
                    sum += x as f64;
                }
                let den = sum.max(DEN_EPS as f64);
                w.iter_mut().for_each(|x| *x = (*x as f64 / den) as f32);
            }
        }
        if let Some(kp) = keep.and_then(|k| k.at(ti, t)) {
            let mut sum = 0.0f64;
            for s in 0..nk {
                if !kp[s] {
                    w[s] = 0.0;
                }
                sum += w[s] as f64;
            }
            let den = sum.max(DEN_EPS as f64);
            w.iter_mut().for_each(|x| *x = (*x as f64 / den) as f32);
        }
    });
}

/// Backward of `read_weights_forward` to the logits (only softmax and top-k carry a gradient).
/// `pre` holds the routing output before the read mask (needed to undo the renormalisation).
#[allow(clippy::too_many_arguments)]
pub fn read_weights_backward(
    dlogits: &mut [f32],
    drw: &[f32],
    rw: &[f32],
    logits: &[f32],
    routing: &Routing,
    rtemp: f32,
    keep: Option<&SlotKeep>,
    dm: SlotDims,
) {
    let SlotDims { t, k: nk, .. } = dm;
    if !matches!(routing, Routing::Softmax | Routing::TopK(_)) {
        return;
    }
    dlogits
        .par_chunks_mut(nk)
        .enumerate()
        .for_each(|(row, gl)| {
            let ti = row % t;
            let y = &rw[row * nk..(row + 1) * nk];
            let mut gy: Vec<f64> = drw[row * nk..(row + 1) * nk]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let mut p: Vec<f64> = y.iter().map(|&x| x as f64).collect();
            if let Some(kp) = keep.and_then(|k| k.at(ti, t)) {
                // y = p*keep / S with S = sum(p*keep); the softmax already zeroed masked slots
                // (their logits are -inf), so p equals y up to the factor S, which is 1 here.
                let lg = &logits[row * nk..(row + 1) * nk];
                let mut pre = vec![0.0f64; nk];
                match routing {
                    Routing::TopK(kk) => {
                        let sel = topk_select(lg, (*kk).clamp(1, nk));
                        let mut tmp = vec![0.0f32; nk];
                        softmax_row(&mut tmp, lg, rtemp, Some(&sel));
                        pre.iter_mut().zip(&tmp).for_each(|(a, &b)| *a = b as f64);
                    }
                    _ => {
                        let mut tmp = vec![0.0f32; nk];
                        softmax_row(&mut tmp, lg, rtemp, None);
                        pre.iter_mut().zip(&tmp).for_each(|(a, &b)| *a = b as f64);
                    }
                }
                let sum: f64 = (0..nk).filter(|&s| kp[s]).map(|s| pre[s]).sum();
                let den = sum.max(DEN_EPS as f64);
                let dot: f64 = (0..nk).map(|s| gy[s] * y[s] as f64).sum();
                for s in 0..nk {
                    gy[s] = if kp[s] && sum >= DEN_EPS as f64 {
                        (gy[s] - dot) / den
                    } else if kp[s] {
                        gy[s] / den
                    } else {
                        0.0
                    };
                }
                p = pre;
            }
            let dot: f64 = p.iter().zip(&gy).map(|(a, b)| a * b).sum();
            for s in 0..nk {
                if p[s] > 0.0 {
                    gl[s] += (p[s] * (gy[s] - dot) / rtemp as f64) as f32;
                }
            }
        });
}

fn topk_select(lg: &[f32], kk: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..lg.len()).collect();
    // descending by value, earlier index first on ties (stable)
    idx.sort_by(|&a, &b| {
        lg[b]
            .partial_cmp(&lg[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut sel = vec![false; lg.len()];
    for &i in idx.iter().take(kk) {
        sel[i] = true;
    }
    sel
}

/// softmax(x / temp) over one row, restricted to `sel` when given; all -inf gives zeros.
pub fn softmax_row(out: &mut [f32], x: &[f32], temp: f32, sel: Option<&[bool]>) {
    let live = |s: usize| sel.map(|m| m[s]).unwrap_or(true);
    let mut mx = f64::NEG_INFINITY;
    for s in 0..x.len() {
        if live(s) {
            mx = mx.max(x[s] as f64 / temp as f64);
        }
    }
    if !mx.is_finite() {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    let mut sum = 0.0f64;
    let mut e = vec![0.0f64; x.len()];
    for s in 0..x.len() {
        if live(s) {
            e[s] = (x[s] as f64 / temp as f64 - mx).exp();
            sum += e[s];
        }
    }
    for s in 0..x.len() {
        out[s] = (e[s] / sum) as f32;
    }
}

simd_kernel! {
/// out_t = sum_k w_tk state_tk. out: [B,H,T,d]; w: [B,H,T,K]; state: [B,H,T,K,d]
pub fn slot_mix_forward(out: &mut [f32], w: &[f32], state: &[f32], dm: SlotDims) {
    let SlotDims { k: nk, d, .. } = dm;
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(|| vec![0.0f64; d], |acc, (row, o)| simd_task(#[inline(always)] || {
        let wr = &w[row * nk..(row + 1) * nk];
        let sr = &state[row * nk * d..(row + 1) * nk * d];
        // per j the sum runs over s in order; the s-outer loop vectorises over j
        acc.iter_mut().for_each(|a| *a = 0.0);
        for s in 0..nk {
            let ws = wr[s] as f64;
            for (a, &x) in acc.iter_mut().zip(&sr[s * d..(s + 1) * d]) {
                *a += ws * x as f64;
            }
        }
        for (o, a) in o.iter_mut().zip(acc.iter()) {
            *o = *a as f32;
        }
        }));
}
}

simd_kernel! {
/// dw += dout . state; dstate += w * dout
pub fn slot_mix_backward(
    dw: &mut [f32],
    dstate: &mut [f32],
    dout: &[f32],
    w: &[f32],
    state: &[f32],
    dm: SlotDims,
) {
    let SlotDims { k: nk, d, .. } = dm;
    dw.par_chunks_mut(nk)
        .zip(dstate.par_chunks_mut(nk * d))
        .enumerate()
        .for_each(|(row, (gw, gs))| simd_task(#[inline(always)] || {
            let g = &dout[row * d..(row + 1) * d];
            let wr = &w[row * nk..(row + 1) * nk];
            let sr = &state[row * nk * d..(row + 1) * nk * d];
            for s in 0..nk {
                let ss = &sr[s * d..(s + 1) * d];
                for j in 0..d {
                    gs[s * d + j] += wr[s] * g[j];
                }
                gw[s] += simd::dot(g, ss) as f32;
            }
        }));
}
}

/// |state_tk| per slot, laid out [B,H,K,T] as the reference's `slot_state_norm` info.
pub fn slot_state_norm(out: &mut [f32], state: &[f32], dm: SlotDims) {
    let SlotDims { t, k: nk, d, .. } = dm;
    out.par_chunks_mut(nk * t).enumerate().for_each(|(bh, o)| {
        for ti in 0..t {
            for s in 0..nk {
                let sv = &state[((bh * t + ti) * nk + s) * d..][..d];
                o[s * t + ti] = sv.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------
// Slotspace refine: phi feature map and causal linear attention
// ------------------------------------------------------------------------------------------------

/// phi(x) = elu(x) + 1
pub fn phi_forward(out: &mut [f32], inp: &[f32]) {
    out.par_iter_mut().zip(inp.par_iter()).for_each(|(o, &x)| {
        *o = if x > 0.0 { x + 1.0 } else { x.exp() };
    });
}

/// dinp += dout * phi'(x), phi'(x) = 1 for x > 0 else exp(x)
pub fn phi_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_iter_mut()
        .zip(inp.par_iter().zip(dout.par_iter()))
        .for_each(|(g, (&x, &go))| {
            *g += if x > 0.0 { go } else { go * x.exp() };
        });
}

/// Positions per tile of the linear attention's tile form.
const LIN_TILE: usize = 64;

/// Scratch of one row of the tile-form linear attention (sizes for tiles of `LIN_TILE`).
struct LinWs {
    s: Vec<f64>,    // [M,M] S (forward) or dS (reverse) carried over the tiles, f64
    sf: Vec<f32>,   // [M,M] the carry as an f32 tile operand (or its transpose)
    prod: Vec<f32>, // [M,M] a tile's K^T V or Q^T Gn before it joins the carry
    tr: Vec<f32>,   // [M,L] a transposed tile operand
    tr2: Vec<f32>,  // [M,L] a second one
    aa: Vec<f32>,   // [L,L] in-tile products
    num: Vec<f32>,  // [L,M] numerators / per-step gradients of the numerators
}

impl LinWs {
    fn new(m: usize) -> Self {
        let l = LIN_TILE;
        LinWs {
            s: vec![0.0; m * m],
            sf: vec![0.0; m * m],
            prod: vec![0.0; m * m],
            tr: Vec::with_capacity(m * l),
            tr2: Vec::with_capacity(m * l),
            aa: vec![0.0; l * l],
            num: vec![0.0; l * m],
        }
    }
}

/// carry (f64) += tile product (f32)
#[inline(always)]
fn fold_into(carry: &mut [f64], prod: &[f32]) {
    for (a, &b) in carry.iter_mut().zip(prod) {
        *a += b as f64;
    }
}

simd_kernel! {
/// Causal linear attention: S_t = sum_{s<=t} kf_s v_s^T, Z_t = max(sum_{s<=t} kf_s, 1e-8),
/// out_t = (qf_t S_t) / max(qf_t . Z_t, 1e-8). out: [N,T,M]; den: [N,T] (saved); qf, kf, v: [N,T,M]
///
/// Tile form (tiles of `LIN_TILE` positions, one row per task): per tile the numerators are
/// `Q S0 + mask(Q K^T) V` as f32 tile products, with the carry S kept in f64 between tiles
/// (`S += K^T V`). The denominator and Z, O(M) per position, stay an f64 walk (the clamps are
/// elementwise).
pub fn linear_attn_forward(
    out: &mut [f32],
    den: &mut [f32],
    qf: &[f32],
    kf: &[f32],
    v: &[f32],
    t: usize,
    m: usize,
) {
    out.par_chunks_mut(t * m)
        .zip(den.par_chunks_mut(t))
        .enumerate()
        .for_each(|(n, (o, dn))| simd_task(#[inline(always)] || {
            let base = n * t * m;
            let (q, k, vv) = (
                &qf[base..base + t * m],
                &kf[base..base + t * m],
                &v[base..base + t * m],
            );
            let mut ws = LinWs::new(m);
            let mut z = vec![0.0f64; m];
            let mut s0 = 0;
            while s0 < t {
                let s1 = (s0 + LIN_TILE).min(t);
                let l = s1 - s0;
                let (qt, kt, vt) = (&q[s0 * m..s1 * m], &k[s0 * m..s1 * m], &vv[s0 * m..s1 * m]);
                // num = Q S0 + mask(Q K^T) V
                for (f, &x) in ws.sf.iter_mut().zip(&ws.s) {
                    *f = x as f32;
                }
                let num = &mut ws.num[..l * m];
                scan::tile_mm(num, m, qt, m, &ws.sf, m, l, m, |_| (0, m), false);
                scan::transpose_into(&mut ws.tr, kt, l, m, m);
                scan::tile_mm(&mut ws.aa, l, qt, m, &ws.tr, l, l, l, |_| (0, m), false);
                scan::tile_mm(num, m, &ws.aa, l, vt, m, l, m, |i| (0, i + 1), true);
                // S += K^T V
                scan::tile_mm(&mut ws.prod, m, &ws.tr, l, vt, m, m, m, |_| (0, l), false);
                fold_into(&mut ws.s, &ws.prod);
                // Z, the denominators and the outputs, position by position
                for i in 0..l {
                    let (ki, qi) = (&kt[i * m..][..m], &qt[i * m..][..m]);
                    let mut dsum = 0.0f64;
                    for a in 0..m {
                        z[a] += ki[a] as f64;
                        dsum += qi[a] as f64 * z[a].max(DEN_EPS as f64);
                    }
                    dn[s0 + i] = dsum as f32;
                    let inv = 1.0 / dsum.max(DEN_EPS as f64);
                    let (oi, ni) = (&mut o[(s0 + i) * m..][..m], &num[i * m..][..m]);
                    for c in 0..m {
                        oi[c] = (ni[c] as f64 * inv) as f32;
                    }
                }
                s0 = s1;
            }
        }));
}
}

simd_kernel! {
/// Backward of `linear_attn_forward` in the same tile form (dqf, dkf, dv +=). With
/// gn_t = dout_t / den_t and gd_t = -(dout_t . out_t) / den_t (0 where den was clamped):
///   dqf_t = S_t gn_t + gd_t max(Z_t, eps)      forward over the tiles: Gn S0^T + mask(Gn V^T) K
///   dkf_s = sum_{t>=s} (v_s . gn_t) q_t + dZ_s  reverse: mask(V Gn^T) Q + V dS^T
///   dv_s  = sum_{t>=s} (k_s . q_t) gn_t         reverse: mask(K Q^T) Gn + K dS
/// with the carry dS = sum of Q^T Gn over the later tiles (f64) and dZ_s = sum_{t>=s} gd_t q_t
/// where Z_t was not clamped (an f64 walk).
#[allow(clippy::too_many_arguments)]
pub fn linear_attn_backward(
    dqf: &mut [f32],
    dkf: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    den: &[f32],
    qf: &[f32],
    kf: &[f32],
    v: &[f32],
    t: usize,
    m: usize,
) {
    dqf.par_chunks_mut(t * m)
        .zip(dkf.par_chunks_mut(t * m))
        .zip(dv.par_chunks_mut(t * m))
        .enumerate()
        .for_each(|(n, ((gq, gk), gv))| simd_task(#[inline(always)] || {
            let base = n * t * m;
            let (q, k, vv) = (
                &qf[base..base + t * m],
                &kf[base..base + t * m],
                &v[base..base + t * m],
            );
            // per-step gradients of the numerator (vector, f32 tile operand) and denominator
            let mut gn = vec![0.0f32; t * m];
            let mut gden = vec![0.0f64; t];
            for ti in 0..t {
                let dd = (den[n * t + ti] as f64).max(DEN_EPS as f64);
                let g = &dout[base + ti * m..][..m];
                let o = &out[base + ti * m..][..m];
                let inv = 1.0 / dd;
                for c in 0..m {
                    gn[ti * m + c] = (g[c] as f64 * inv) as f32;
                }
                let go = simd::dot(g, o);
                gden[ti] = if den[n * t + ti] >= DEN_EPS {
                    -go / dd
                } else {
                    0.0
                };
            }
            let mut ws = LinWs::new(m);
            let mut z = vec![0.0f64; m];
            let mut zlive = vec![true; t * m];
            let tiles: Vec<(usize, usize)> = (0..t)
                .step_by(LIN_TILE)
                .map(|s0| (s0, (s0 + LIN_TILE).min(t)))
                .collect();
            // forward over the tiles: dqf
            for &(s0, s1) in &tiles {
                let l = s1 - s0;
                let (kt, vt, gt) = (&k[s0 * m..s1 * m], &vv[s0 * m..s1 * m], &gn[s0 * m..s1 * m]);
                let dq = &mut gq[s0 * m..s1 * m];
                // the elementwise part first: gd_t max(Z_t, eps), and where Z is live
                for i in 0..l {
                    let ki = &kt[i * m..][..m];
                    let gd = gden[s0 + i];
                    for a in 0..m {
                        z[a] += ki[a] as f64;
                        dq[i * m + a] += (gd * z[a].max(DEN_EPS as f64)) as f32;
                        zlive[(s0 + i) * m + a] = z[a] >= DEN_EPS as f64;
                    }
                }
                // Gn S0^T: sf holds S^T (sf[c][a] = S[a][c])
                for a in 0..m {
                    for c in 0..m {
                        ws.sf[c * m + a] = ws.s[a * m + c] as f32;
                    }
                }
                scan::tile_mm(dq, m, gt, m, &ws.sf, m, l, m, |_| (0, m), true);
                // mask(Gn V^T) K
                scan::transpose_into(&mut ws.tr, vt, l, m, m);
                scan::tile_mm(&mut ws.aa, l, gt, m, &ws.tr, l, l, l, |_| (0, m), false);
                scan::tile_mm(dq, m, &ws.aa, l, kt, m, l, m, |i| (0, i + 1), true);
                // S += K^T V
                scan::transpose_into(&mut ws.tr2, kt, l, m, m);
                scan::tile_mm(&mut ws.prod, m, &ws.tr2, l, vt, m, m, m, |_| (0, l), false);
                fold_into(&mut ws.s, &ws.prod);
            }
            // reverse over the tiles: dkf, dv; ws.s is now the carry dS
            ws.s.iter_mut().for_each(|x| *x = 0.0);
            let mut dz = vec![0.0f64; m];
            for &(s0, s1) in tiles.iter().rev() {
                let l = s1 - s0;
                let (qt, kt, vt, gt) = (
                    &q[s0 * m..s1 * m],
                    &k[s0 * m..s1 * m],
                    &vv[s0 * m..s1 * m],
                    &gn[s0 * m..s1 * m],
                );
                let (dk, dvv) = (&mut gk[s0 * m..s1 * m], &mut gv[s0 * m..s1 * m]);
                // dZ: a reverse walk
                for i in (0..l).rev() {
                    let qi = &qt[i * m..][..m];
                    let gd = gden[s0 + i];
                    let live = &zlive[(s0 + i) * m..][..m];
                    for a in 0..m {
                        if live[a] {
                            dz[a] += gd * qi[a] as f64;
                        }
                        dk[i * m + a] += dz[a] as f32;
                    }
                }
                // dS0 as f32: sf = dS^T (for V dS^T), prod = dS (for K dS)
                for a in 0..m {
                    for c in 0..m {
                        let x = ws.s[a * m + c] as f32;
                        ws.sf[c * m + a] = x;
                        ws.prod[a * m + c] = x;
                    }
                }
                scan::tile_mm(dk, m, vt, m, &ws.sf, m, l, m, |_| (0, m), true);
                scan::tile_mm(dvv, m, kt, m, &ws.prod, m, l, m, |_| (0, m), true);
                // mask(V Gn^T) Q: aa[s][t] = v_s . gn_t, t >= s
                scan::transpose_into(&mut ws.tr, gt, l, m, m);
                scan::tile_mm(&mut ws.aa, l, vt, m, &ws.tr, l, l, l, |_| (0, m), false);
                scan::tile_mm(dk, m, &ws.aa, l, qt, m, l, m, |s| (s, l), true);
                // mask(K Q^T) Gn: aa[s][t] = k_s . q_t, t >= s
                scan::transpose_into(&mut ws.tr2, qt, l, m, m);
                scan::tile_mm(&mut ws.aa, l, kt, m, &ws.tr2, l, l, l, |_| (0, m), false);
                scan::tile_mm(dvv, m, &ws.aa, l, gt, m, l, m, |s| (s, l), true);
                // dS += Q^T Gn
                scan::tile_mm(&mut ws.prod, m, &ws.tr2, l, gt, m, m, m, |_| (0, l), false);
                fold_into(&mut ws.s, &ws.prod);
            }
        }));
}
}

/// Multiplies rows [N,T,M] by a per-(b,t) validity mask (N = B*H rows of T steps).
pub fn mask_rows_forward(x: &mut [f32], valid: &[bool], h: usize, t: usize, m: usize) {
    x.par_chunks_mut(t * m).enumerate().for_each(|(n, xr)| {
        let bi = n / h;
        for ti in 0..t {
            if !valid[bi * t + ti] {
                xr[ti * m..(ti + 1) * m].iter_mut().for_each(|v| *v = 0.0);
            }
        }
    });
}

/// tanh: out = tanh(x)
pub fn tanh_forward(out: &mut [f32], inp: &[f32]) {
    out.par_iter_mut()
        .zip(inp.par_iter())
        .for_each(|(o, &x)| *o = (x as f64).tanh() as f32);
}

/// dinp += dout * (1 - y^2)
pub fn tanh_backward(dinp: &mut [f32], out: &[f32], dout: &[f32]) {
    dinp.par_iter_mut()
        .zip(out.par_iter().zip(dout.par_iter()))
        .for_each(|(g, (&y, &go))| {
            *g += go * (1.0 - y * y);
        });
}

/// softmax over rows of K (the unsigned slotspace weights); then optionally a slot mask with
/// renormalisation (`slotspace_only`). out, inp: [N,K]
pub fn softmax_slots_forward(out: &mut [f32], inp: &[f32], k: usize) {
    out.par_chunks_mut(k)
        .zip(inp.par_chunks(k))
        .for_each(|(o, x)| softmax_row(o, x, 1.0, None));
}

pub fn softmax_slots_backward(dinp: &mut [f32], out: &[f32], dout: &[f32], k: usize) {
    dinp.par_chunks_mut(k)
        .zip(out.par_chunks(k))
        .zip(dout.par_chunks(k))
        .for_each(|((g, y), gy)| {
            let dot: f64 = y.iter().zip(gy).map(|(&a, &b)| a as f64 * b as f64).sum();
            for s in 0..k {
                g[s] += (y[s] as f64 * (gy[s] as f64 - dot)) as f32;
            }
        });
}

/// Slot mask on the slotspace weights: w *= keep, and when `renorm` (softmax weights) divide by
/// max(sum, 1e-8). w: [B,H,T,K] in place; `pre` receives the weights before masking.
pub fn slot_mask_weights_forward(
    w: &mut [f32],
    pre: &mut [f32],
    keep: &SlotKeep,
    renorm: bool,
    dm: SlotDims,
) {
    let SlotDims { t, k: nk, .. } = dm;
    pre.copy_from_slice(w);
    w.par_chunks_mut(nk).enumerate().for_each(|(row, wr)| {
        if let Some(kp) = keep.at(row % t, t) {
            for s in 0..nk {
                if !kp[s] {
                    wr[s] = 0.0;
                }
            }
            if renorm {
                let sum: f64 = wr.iter().map(|&x| x as f64).sum();
                let den = sum.max(DEN_EPS as f64);
                wr.iter_mut().for_each(|x| *x = (*x as f64 / den) as f32);
            }
        }
    });
}

/// Backward of `slot_mask_weights_forward`: dpre (+=) from dw. `out` is the masked weights.
pub fn slot_mask_weights_backward(
    dpre: &mut [f32],
    dw: &[f32],
    out: &[f32],
    pre: &[f32],
    keep: &SlotKeep,
    renorm: bool,
    dm: SlotDims,
) {
    let SlotDims { t, k: nk, .. } = dm;
    dpre.par_chunks_mut(nk).enumerate().for_each(|(row, gp)| {
        let g = &dw[row * nk..(row + 1) * nk];
        match keep.at(row % t, t) {
            None => gp.iter_mut().zip(g).for_each(|(a, &b)| *a += b),
            Some(kp) => {
                if renorm {
                    let sum: f64 = (0..nk)
                        .filter(|&s| kp[s])
                        .map(|s| pre[row * nk + s] as f64)
                        .sum();
                    let den = sum.max(DEN_EPS as f64);
                    let y = &out[row * nk..(row + 1) * nk];
                    let dot: f64 = (0..nk).map(|s| g[s] as f64 * y[s] as f64).sum();
                    for s in 0..nk {
                        if kp[s] {
                            let v = if sum >= DEN_EPS as f64 {
                                (g[s] as f64 - dot) / den
                            } else {
                                g[s] as f64 / den
                            };
                            gp[s] += v as f32;
                        }
                    }
                } else {
                    for s in 0..nk {
                        if kp[s] {
                            gp[s] += g[s];
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tile form of the linear attention against the definition walked position by
    /// position in f64 (O(T^2 M) for the gradients): several full tiles and a short last one,
    /// M below, at and above the register block, a row whose keys start so small that Z is
    /// clamped (no gradient to Z there) with a zero query first (a padded position), and the
    /// gradients added to what the buffers held.
    #[test]
    fn linear_attention_tile_form_matches_the_serial_definition() {
        let eps = DEN_EPS as f64;
        for &(n, t, m) in &[
            (2usize, 150usize, 12usize),
            (1, 64, 40),
            (2, 70, 16),
            (1, 5, 3),
        ] {
            let mut seed = 0x9e37_79b9u64 ^ (t * 31 + m) as u64;
            let mut rnd = |lo: f32, hi: f32| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                lo + (hi - lo) * ((seed >> 40) as f32 / (1u64 << 24) as f32)
            };
            let len = n * t * m;
            let mut q: Vec<f32> = (0..len).map(|_| rnd(0.05, 1.5)).collect();
            let mut k: Vec<f32> = (0..len).map(|_| rnd(0.05, 1.5)).collect();
            let v: Vec<f32> = (0..len).map(|_| rnd(-1.0, 1.0)).collect();
            let g: Vec<f32> = (0..len).map(|_| rnd(-1.0, 1.0)).collect();
            let g0: Vec<f32> = (0..3 * len).map(|_| rnd(-0.1, 0.1)).collect();
            let last = (n - 1) * t * m;
            for i in 0..(2 * m).min(t * m) {
                k[last + i] = 1e-11;
            }
            q[last..last + m].iter_mut().for_each(|x| *x = 0.0);

            let (mut out, mut den) = (vec![0f32; len], vec![0f32; n * t]);
            linear_attn_forward(&mut out, &mut den, &q, &k, &v, t, m);
            let (mut dq, mut dk, mut dv) = (
                g0[..len].to_vec(),
                g0[len..2 * len].to_vec(),
                g0[2 * len..].to_vec(),
            );
            linear_attn_backward(&mut dq, &mut dk, &mut dv, &g, &out, &den, &q, &k, &v, t, m);

            // the definition, in f64
            let f = |x: &[f32], r: usize, i: usize| x[(r * t + i) * m..][..m].to_vec();
            let dotf = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
            };
            let mut want = (vec![0f64; len], vec![0f64; n * t]);
            let mut wg = (vec![0f64; len], vec![0f64; len], vec![0f64; len]);
            for r in 0..n {
                let mut s = vec![0f64; m * m];
                let mut z = vec![0f64; m];
                let (mut gn, mut gd, mut zs) = (vec![], vec![], vec![]);
                for i in 0..t {
                    let (qi, ki, vi) = (f(&q, r, i), f(&k, r, i), f(&v, r, i));
                    for a in 0..m {
                        z[a] += ki[a] as f64;
                        for c in 0..m {
                            s[a * m + c] += ki[a] as f64 * vi[c] as f64;
                        }
                    }
                    let dsum: f64 = (0..m).map(|a| qi[a] as f64 * z[a].max(eps)).sum();
                    let dd = dsum.max(eps);
                    want.1[r * t + i] = dsum;
                    let gi = f(&g, r, i);
                    let mut o = vec![0f64; m];
                    for c in 0..m {
                        o[c] = (0..m).map(|a| qi[a] as f64 * s[a * m + c]).sum::<f64>() / dd;
                        want.0[(r * t + i) * m + c] = o[c];
                    }
                    let gni: Vec<f64> = gi.iter().map(|&x| x as f64 / dd).collect();
                    let go: f64 = gi.iter().zip(&o).map(|(&x, &y)| x as f64 * y).sum();
                    let gdi = if dsum >= eps { -go / dd } else { 0.0 };
                    for a in 0..m {
                        let sg: f64 = (0..m).map(|c| s[a * m + c] * gni[c]).sum();
                        wg.0[(r * t + i) * m + a] = sg + gdi * z[a].max(eps);
                    }
                    gn.push(gni);
                    gd.push(gdi);
                    zs.push(z.clone());
                }
                for j in 0..t {
                    let (kj, vj) = (f(&k, r, j), f(&v, r, j));
                    for i in j..t {
                        let qi = f(&q, r, i);
                        let vg: f64 = (0..m).map(|c| vj[c] as f64 * gn[i][c]).sum();
                        let kq = dotf(&kj, &qi);
                        for a in 0..m {
                            let live = if zs[i][a] >= eps { gd[i] } else { 0.0 };
                            wg.1[(r * t + j) * m + a] += (vg + live) * qi[a] as f64;
                            wg.2[(r * t + j) * m + a] += kq * gn[i][a];
                        }
                    }
                }
            }
            let close = |what: &str, got: &[f32], base: &[f32], want: &[f64]| {
                let scale = want.iter().fold(1e-30f64, |a, &x| a.max(x.abs()));
                for (i, (&x, &w)) in got.iter().zip(want).enumerate() {
                    let b = base.get(i).map_or(0.0, |&b| b as f64);
                    let err = (x as f64 - b - w).abs() / scale;
                    assert!(
                        err < 2e-6,
                        "{what} (N {n}, T {t}, M {m}) at {i}: {x} vs {} ({err:e})",
                        b + w
                    );
                }
            };
            close("out", &out, &[], &want.0);
            close("den", &den, &[], &want.1);
            close("dqf", &dq, &g0[..len], &wg.0);
            close("dkf", &dk, &g0[len..2 * len], &wg.1);
            close("dv", &dv, &g0[2 * len..], &wg.2);
        }
    }

    #[test]
    fn alibi_slopes_reference_values() {
        let s = alibi_slopes(4);
        let want = [0.25f32, 0.0625, 0.015625, 0.00390625];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-9);
        }
        // non power of two: 2 heads of pow2(2) + every other of pow2(4)
        let s6 = alibi_slopes(6);
        assert_eq!(s6.len(), 6);
        assert_eq!(s6, vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]);
        let s3 = alibi_slopes(3);
        let p2 = alibi_slopes(2);
        let p4 = alibi_slopes(4);
        assert_eq!(&s3[..2], &p2[..]);
        assert_eq!(s3[2], p4[0]);
    }

    #[test]
    fn chunk1_scan_is_exact_prefix_softmax() {
        let dm = SlotDims {
            b: 1,
            h: 1,
            t: 9,
            k: 2,
            d: 3,
        };
        let wl: Vec<f32> = (0..18).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.7).collect();
        let v: Vec<f32> = (0..27).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.3).collect();
        let mut st = vec![0.0; 9 * 2 * 3];
        let (mut den, mut rm) = (vec![0.0; 18], vec![0.0; 18]);
        slot_scan_forward(&mut st, &mut den, &mut rm, &wl, &v, 1, dm);
        for s in 0..2 {
            for t in 0..9 {
                let w = &wl[s * 9..s * 9 + t + 1];
                let mx = w.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = w.iter().map(|&x| (x as f64 - mx).exp()).sum();
                for j in 0..3 {
                    let want: f64 = (0..=t)
                        .map(|u| (w[u] as f64 - mx).exp() * v[u * 3 + j] as f64)
                        .sum::<f64>()
                        / z;
                    let got = st[(t * 2 + s) * 3 + j] as f64;
                    assert!((want - got).abs() < 1e-5, "s{s} t{t} j{j}: {want} vs {got}");
                }
            }
        }
    }

    #[test]
    fn left_padding_gives_empty_state_not_nan() {
        let dm = SlotDims {
            b: 1,
            h: 1,
            t: 6,
            k: 1,
            d: 2,
        };
        let mut wl = vec![0.3f32, -0.2, 0.5, 1.0, -1.0, 0.2];
        wl[0] = f32::NEG_INFINITY;
        wl[1] = f32::NEG_INFINITY;
        let v = vec![1.0f32; 12];
        let mut st = vec![0.0; 12];
        let (mut den, mut rm) = (vec![0.0; 6], vec![0.0; 6]);
        for chunk in [1, 2, 4] {
            slot_scan_forward(&mut st, &mut den, &mut rm, &wl, &v, chunk, dm);
            assert!(st.iter().all(|x| x.is_finite()));
            assert_eq!(&st[..4], &[0.0; 4]);
            assert!((st[4] - 1.0).abs() < 1e-6);
        }
    }
}
