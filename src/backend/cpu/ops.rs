//! Generic CPU ops (llm.c style): one `_forward` and one `_backward` function per op, explicit
//! shapes, no autograd.
//!
//! Conventions:
//! - tensors are row-major `f32` slices, shapes given by explicit `usize` arguments and written in
//!   the comments (`// out: [B,T,C]`);
//! - backward functions ACCUMULATE (`+=`) into their gradient outputs;
//! - reductions (means, variances, logsumexp, parameter-gradient sums over rows) accumulate in
//!   `f64` and run in a fixed order, so results are deterministic whatever the thread count;
//! - shape mismatches are programming errors and `assert!`; user-data errors (an out-of-range
//!   target) are returned as `AsaError::Input`.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use rand::Rng;
use rayon::prelude::*;

use super::simd;
use crate::error::{AsaError, Result};

/// Elements per rayon task for elementwise ops.
const ELEM_CHUNK: usize = 1 << 14;
/// Columns per rayon task for parameter-gradient reductions over rows (bias, LayerNorm weight).
const COL_CHUNK: usize = 64;
/// `n*i*o` from which `matmul_*` lets `gemm` use rayon.
const GEMM_PAR_THRESHOLD: usize = 1 << 18;

// ------------------------------------------------------------------------------------------------
// buffers

/// A zeroed buffer of `n` floats. Large ones are zeroed by all rayon threads (a step's
/// activation-sized temporaries are reused heap memory, so `vec![0.0; n]` is a serial
/// memset: ~5% of a 2-thread training step at T 4096 before this).
pub fn zeros(n: usize) -> Vec<f32> {
    if n < 4 * ELEM_CHUNK {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0.0f32, n));
    v
}

/// A copy of `x`, made by all rayon threads when it is large (see [`zeros`]).
pub fn copied(x: &[f32]) -> Vec<f32> {
    if x.len() < 4 * ELEM_CHUNK {
        return x.to_vec();
    }
    let mut v = Vec::with_capacity(x.len());
    v.par_extend(x.par_iter().copied());
    v
}

// ------------------------------------------------------------------------------------------------
// encoder

/// Token (+ learned absolute position) embedding.
/// out: [B,T,C]; ids: [B,T] (each < V); wte: [V,C]; wpe: Option<[maxT,C]> with T <= maxT.
/// out[b,t,:] = wte[ids[b,t],:] (+ wpe[t,:]).
/// Callers validate token ids against the vocabulary; an id >= V here is a programming error
/// (assert).
pub fn encoder_forward(
    out: &mut [f32],
    ids: &[u32],
    wte: &[f32],
    wpe: Option<&[f32]>,
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!(out.len(), b * t * c, "encoder_forward: out shape");
    assert_eq!(ids.len(), b * t, "encoder_forward: ids shape");
    if c == 0 || b * t == 0 {
        return;
    }
    assert_eq!(wte.len() % c, 0, "encoder_forward: wte shape");
    let v = wte.len() / c;
    if let Some(wpe) = wpe {
        assert!(
            wpe.len() >= t * c,
            "encoder_forward: T={t} exceeds the position table"
        );
    }
    // one task per token row: out[bt,:]
    out.par_chunks_mut(c).enumerate().for_each(|(bt, o)| {
        let id = ids[bt] as usize;
        assert!(
            id < v,
            "encoder_forward: token id {id} out of range for vocab {v}"
        );
        let e = &wte[id * c..(id + 1) * c];
        match wpe {
            Some(wpe) => {
                let pos = bt % t;
                let p = &wpe[pos * c..(pos + 1) * c];
                for j in 0..c {
                    o[j] = e[j] + p[j];
                }
            }
            None => o.copy_from_slice(e),
        }
    });
}

/// dwte: [V,C] += scatter of dout by ids; dwpe: Option<[maxT,C]>, rows 0..T += sum over B of dout.
/// dout: [B,T,C]; ids: [B,T].
/// Deterministic: the tokens of each vocabulary row are summed in f64 in position order.
pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    ids: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    assert_eq!(dout.len(), b * t * c, "encoder_backward: dout shape");
    assert_eq!(ids.len(), b * t, "encoder_backward: ids shape");
    if c == 0 || b * t == 0 {
        return;
    }
    assert_eq!(dwte.len() % c, 0, "encoder_backward: dwte shape");
    let v = dwte.len() / c;
    let ntok = b * t;

    // counting sort of token positions by id: order[start[id]..start[id+1]] are the positions
    // (ascending) whose id is `id`.
    let mut start = vec![0usize; v + 1];
    for &id in ids {
        let id = id as usize;
        assert!(
            id < v,
            "encoder_backward: token id {id} out of range for vocab {v}"
        );
        start[id + 1] += 1;
    }
    for k in 0..v {
        start[k + 1] += start[k];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; ntok];
    for (pos, &id) in ids.iter().enumerate() {
        let id = id as usize;
        order[fill[id]] = pos;
        fill[id] += 1;
    }
    // dwte[row,:] += sum_{pos: ids[pos]==row} dout[pos,:]
    dwte.par_chunks_mut(c).enumerate().for_each(|(row, dw)| {
        let ps = &order[start[row]..start[row + 1]];
        if ps.is_empty() {
            return;
        }
        let mut acc = vec![0f64; c];
        for &pos in ps {
            let d = &dout[pos * c..(pos + 1) * c];
            for j in 0..c {
                acc[j] += d[j] as f64;
            }
        }
        for j in 0..c {
            dw[j] += acc[j] as f32;
        }
    });

    if let Some(dwpe) = dwpe {
        assert!(
            dwpe.len() >= t * c,
            "encoder_backward: T={t} exceeds the position table"
        );
        // dwpe[tt,:] += sum_b dout[b,tt,:]
        dwpe[..t * c]
            .par_chunks_mut(c)
            .enumerate()
            .for_each(|(tt, dp)| {
                let mut acc = vec![0f64; c];
                for bb in 0..b {
                    let d = &dout[(bb * t + tt) * c..(bb * t + tt + 1) * c];
                    for j in 0..c {
                        acc[j] += d[j] as f64;
                    }
                }
                for j in 0..c {
                    dp[j] += acc[j] as f32;
                }
            });
    }
}

// ------------------------------------------------------------------------------------------------
// layernorm

/// LayerNorm epsilon (PyTorch default).
pub const LAYERNORM_EPS: f64 = 1e-5;

/// LayerNorm over the last dim, eps = 1e-5, biased variance; statistics in f64.
/// out, inp: [N,C]; weight, bias: [C]; mean, rstd: [N] (saved for the backward).
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) {
    assert_eq!(out.len(), n * c, "layernorm_forward: out shape");
    assert_eq!(inp.len(), n * c, "layernorm_forward: inp shape");
    assert_eq!(mean.len(), n, "layernorm_forward: mean shape");
    assert_eq!(rstd.len(), n, "layernorm_forward: rstd shape");
    assert_eq!(weight.len(), c, "layernorm_forward: weight shape");
    assert_eq!(bias.len(), c, "layernorm_forward: bias shape");
    if n == 0 || c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (m, r))| {
            let (mu, rs) = simd::layernorm_row_forward(o, x, weight, bias, LAYERNORM_EPS);
            *m = mu as f32;
            *r = rs as f32;
        });
}

/// dinp: [N,C] += ...; dweight, dbias: [C] += ...; dout, inp: [N,C]; weight: [C];
/// mean, rstd: [N] from `layernorm_forward`.
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert_eq!(dinp.len(), n * c, "layernorm_backward: dinp shape");
    assert_eq!(dout.len(), n * c, "layernorm_backward: dout shape");
    assert_eq!(inp.len(), n * c, "layernorm_backward: inp shape");
    assert_eq!(mean.len(), n, "layernorm_backward: mean shape");
    assert_eq!(rstd.len(), n, "layernorm_backward: rstd shape");
    assert_eq!(weight.len(), c, "layernorm_backward: weight shape");
    assert_eq!(dweight.len(), c, "layernorm_backward: dweight shape");
    assert_eq!(dbias.len(), c, "layernorm_backward: dbias shape");
    if n == 0 || c == 0 {
        return;
    }
    // dinp, one row per task:
    //   norm = (x - mean) * rstd; dnorm = w * dout
    //   dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|(((dx, dy), x), (&m, &r))| {
            simd::layernorm_row_backward(dx, dy, x, weight, m as f64, r as f64);
        });
    // dweight[j] += sum_r norm[r,j] * dout[r,j]; dbias[j] += sum_r dout[r,j]
    // one column block per task, rows in order (deterministic).
    dweight
        .par_chunks_mut(COL_CHUNK)
        .zip(dbias.par_chunks_mut(COL_CHUNK))
        .enumerate()
        .for_each(|(blk, (dw, db))| {
            let c0 = blk * COL_CHUNK;
            let w = dw.len();
            let mut aw = vec![0f64; w];
            let mut ab = vec![0f64; w];
            for row in 0..n {
                let (m, r) = (mean[row] as f64, rstd[row] as f64);
                let x = &inp[row * c + c0..row * c + c0 + w];
                let dy = &dout[row * c + c0..row * c + c0 + w];
                for j in 0..w {
                    let d = dy[j] as f64;
                    aw[j] += (x[j] as f64 - m) * r * d;
                    ab[j] += d;
                }
            }
            for j in 0..w {
                dw[j] += aw[j] as f32;
                db[j] += ab[j] as f32;
            }
        });
}

// ------------------------------------------------------------------------------------------------
// matmul

fn gemm_parallelism(n: usize, i: usize, o: usize) -> gemm::Parallelism {
    if n.saturating_mul(i).saturating_mul(o) >= GEMM_PAR_THRESHOLD {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// Row-major matrix view for `gemm`: element (r, col) at `ptr + r*rs + col*cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

/// dst[M,N] (row-major, contiguous) (+)= lhs[M,K] @ rhs[K,N]. `accumulate`: dst += ..., else
/// dst = ... .
///
/// # Safety
/// `lhs` and `rhs` must describe in-bounds matrices of the given shapes; `dst.len() == m*n`.
unsafe fn gemm_into(
    dst: &mut [f32],
    lhs: View,
    rhs: View,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    debug_assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // dst := alpha*dst + beta*lhs@rhs (dst read iff read_dst)
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    );
}

/// nn.Linear: out[N,O] = inp[N,I] @ weight[O,I]^T (+ bias[O]).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    i: usize,
    o: usize,
) {
    assert_eq!(out.len(), n * o, "matmul_forward: out shape");
    assert_eq!(inp.len(), n * i, "matmul_forward: inp shape");
    assert_eq!(weight.len(), o * i, "matmul_forward: weight shape");
    if n == 0 || o == 0 {
        return;
    }
    let accumulate = match bias {
        Some(bias) => {
            assert_eq!(bias.len(), o, "matmul_forward: bias shape");
            // out = bias, then out += inp @ weight^T (addmm order)
            out.par_chunks_mut(o)
                .for_each(|row| row.copy_from_slice(bias));
            true
        }
        None => false,
    };
    // lhs = inp [N,I]: (r,k) at r*I + k; rhs = weight^T [I,O]: (k,j) at j*I + k
    let lhs = View {
        ptr: inp.as_ptr(),
        rs: i as isize,
        cs: 1,
    };
    let rhs = View {
        ptr: weight.as_ptr(),
        rs: 1,
        cs: i as isize,
    };
    // SAFETY: shapes checked above.
    unsafe {
        gemm_into(
            out,
            lhs,
            rhs,
            n,
            o,
            i,
            accumulate,
            gemm_parallelism(n, i, o),
        )
    };
}

/// dinp[N,I] += dout[N,O] @ weight[O,I]; dweight[O,I] += dout^T @ inp[N,I];
/// dbias[O] += sum over rows of dout (f64, column blocks, deterministic).
pub fn matmul_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    n: usize,
    i: usize,
    o: usize,
) {
    assert_eq!(dinp.len(), n * i, "matmul_backward: dinp shape");
    assert_eq!(dweight.len(), o * i, "matmul_backward: dweight shape");
    assert_eq!(dout.len(), n * o, "matmul_backward: dout shape");
    assert_eq!(inp.len(), n * i, "matmul_backward: inp shape");
    assert_eq!(weight.len(), o * i, "matmul_backward: weight shape");
    let par = gemm_parallelism(n, i, o);
    // dinp[N,I] += dout[N,O] @ weight[O,I]
    let lhs = View {
        ptr: dout.as_ptr(),
        rs: o as isize,
        cs: 1,
    };
    let rhs = View {
        ptr: weight.as_ptr(),
        rs: i as isize,
        cs: 1,
    };
    // SAFETY: shapes checked above.
    unsafe { gemm_into(dinp, lhs, rhs, n, i, o, true, par) };
    // dweight[O,I] += dout^T[O,N] @ inp[N,I]; dout^T (r,k) = dout[k*O + r]
    let lhs = View {
        ptr: dout.as_ptr(),
        rs: 1,
        cs: o as isize,
    };
    let rhs = View {
        ptr: inp.as_ptr(),
        rs: i as isize,
        cs: 1,
    };
    // SAFETY: shapes checked above.
    unsafe { gemm_into(dweight, lhs, rhs, o, i, n, true, par) };
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), o, "matmul_backward: dbias shape");
        if o == 0 {
            return;
        }
        dbias
            .par_chunks_mut(COL_CHUNK)
            .enumerate()
            .for_each(|(blk, db)| {
                let c0 = blk * COL_CHUNK;
                let w = db.len();
                let mut acc = vec![0f64; w];
                for row in 0..n {
                    let d = &dout[row * o + c0..row * o + c0 + w];
                    for j in 0..w {
                        acc[j] += d[j] as f64;
                    }
                }
                for j in 0..w {
                    db[j] += acc[j] as f32;
                }
            });
    }
}

// ------------------------------------------------------------------------------------------------
// GELU

/// Exact GELU: out = 0.5*x*(1+erf(x/sqrt(2))) (PyTorch nn.GELU default), in f32 with an erf
/// good to about 1 ulp (the CUDA kernel's formula; vectorised, see `simd`).
/// out, inp: [N] (any shape, elementwise).
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "gelu_forward: shape");
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(inp.par_chunks(ELEM_CHUNK))
        .for_each(|(o, x)| simd::gelu_forward_chunk(o, x));
}

/// dinp += dout * gelu'(inp), gelu'(x) = Phi(x) + x*phi(x), in f32. dinp, inp, dout: [N].
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert_eq!(dinp.len(), inp.len(), "gelu_backward: shape");
    assert_eq!(dout.len(), inp.len(), "gelu_backward: shape");
    dinp.par_chunks_mut(ELEM_CHUNK)
        .zip(inp.par_chunks(ELEM_CHUNK).zip(dout.par_chunks(ELEM_CHUNK)))
        .for_each(|(dx, (x, dy))| simd::gelu_backward_chunk(dx, x, dy));
}

// ------------------------------------------------------------------------------------------------
// dropout

/// Inverted dropout with probability p: mask[k] = 0 (dropped, probability p) or 1/(1-p);
/// out = inp * mask. p <= 0: copy, mask all 1 (the rng is not used); p >= 1: all dropped.
/// out, mask, inp: [N].
pub fn dropout_forward(out: &mut [f32], mask: &mut [f32], inp: &[f32], p: f32, rng: &mut impl Rng) {
    assert_eq!(out.len(), inp.len(), "dropout_forward: out shape");
    assert_eq!(mask.len(), inp.len(), "dropout_forward: mask shape");
    if p <= 0.0 {
        out.copy_from_slice(inp);
        mask.fill(1.0);
        return;
    }
    if p >= 1.0 {
        out.fill(0.0);
        mask.fill(0.0);
        return;
    }
    let scale = (1.0 / (1.0 - p as f64)) as f32;
    // the mask is drawn serially (one uniform per element, in order) so a seed fixes it.
    for m in mask.iter_mut() {
        *m = if rng.gen::<f32>() < p { 0.0 } else { scale };
    }
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(inp.par_chunks(ELEM_CHUNK).zip(mask.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (x, m))| {
            for ((o, &x), &m) in o.iter_mut().zip(x).zip(m) {
                *o = x * m;
            }
        });
}

/// dinp += dout * mask. dinp, dout, mask: [N].
pub fn dropout_backward(dinp: &mut [f32], dout: &[f32], mask: &[f32]) {
    assert_eq!(dinp.len(), dout.len(), "dropout_backward: shape");
    assert_eq!(mask.len(), dout.len(), "dropout_backward: shape");
    dinp.par_chunks_mut(ELEM_CHUNK)
        .zip(dout.par_chunks(ELEM_CHUNK).zip(mask.par_chunks(ELEM_CHUNK)))
        .for_each(|(dx, (dy, m))| {
            for ((dx, &dy), &m) in dx.iter_mut().zip(dy).zip(m) {
                *dx += dy * m;
            }
        });
}

/// Dropout whose output and mask are kept for the backward only when they differ from the
/// input: with `p == 0` (evaluation, or a config without dropout) both are left empty and
/// `dropped` / `dropout_grad` read the input / pass the gradient through, so a dropout-free
/// step neither copies nor stores them. out, mask, inp: [N]
pub fn dropout_saved(
    out: &mut Vec<f32>,
    mask: &mut Vec<f32>,
    inp: &[f32],
    p: f32,
    rng: &mut impl Rng,
) {
    if p <= 0.0 {
        *out = Vec::new();
        *mask = Vec::new();
        return;
    }
    out.clear();
    out.resize(inp.len(), 0.0);
    mask.clear();
    mask.resize(inp.len(), 0.0);
    dropout_forward(out, mask, inp, p, rng);
}

/// The output of `dropout_saved`: `out`, or `inp` where no dropout was applied.
pub fn dropped<'a>(out: &'a [f32], inp: &'a [f32]) -> &'a [f32] {
    if out.is_empty() {
        inp
    } else {
        out
    }
}

/// The gradient through `dropout_saved`: dout * mask, or dout itself where no mask was kept.
pub fn dropout_grad<'a>(dout: &'a [f32], mask: &[f32]) -> std::borrow::Cow<'a, [f32]> {
    if mask.is_empty() {
        return std::borrow::Cow::Borrowed(dout);
    }
    let mut dinp = vec![0.0; dout.len()];
    dropout_backward(&mut dinp, dout, mask);
    std::borrow::Cow::Owned(dinp)
}

// ------------------------------------------------------------------------------------------------
// cross-entropy

#[inline]
fn ce_counted(r: usize, targets: &[i64], valid: Option<&[bool]>) -> bool {
    valid.is_none_or(|m| m[r]) && targets[r] >= 0
}

/// Mean softmax cross-entropy over counted rows (row r counts iff valid[r] && targets[r] >= 0).
/// probs: [N,V] (written: softmax of logits, every row); logits: [N,V]; targets: [N];
/// valid: Option<[N]>. One f32 exp per logit, summed in f64; the mean is summed in row order.
/// Returns (mean loss, number of counted rows); (0.0, 0) when no row counts.
/// A counted row with target >= V is `AsaError::Input`.
pub fn crossentropy_forward(
    probs: &mut [f32],
    logits: &[f32],
    targets: &[i64],
    valid: Option<&[bool]>,
    n: usize,
    v: usize,
) -> Result<(f64, usize)> {
    crossentropy_rows(probs, None, logits, targets, valid, n, v)
}

/// `crossentropy_forward` with the rows left unnormalised: exps[r,:] = exp(logits[r,:] - max_r),
/// row_inv[r] = 1 / sum_r (0 for a row of -inf), so that probs = exps * row_inv (the same f32
/// products `crossentropy_forward` forms). The normalisation then rides along with
/// `crossentropy_backward_inplace(.., Some(row_inv), ..)`, a pass over [N,V] fewer.
pub fn crossentropy_forward_rows(
    exps: &mut [f32],
    row_inv: &mut [f32],
    logits: &[f32],
    targets: &[i64],
    valid: Option<&[bool]>,
    n: usize,
    v: usize,
) -> Result<(f64, usize)> {
    assert_eq!(row_inv.len(), n, "crossentropy_forward_rows: row_inv shape");
    crossentropy_rows(exps, Some(row_inv), logits, targets, valid, n, v)
}

fn crossentropy_rows(
    probs: &mut [f32],
    row_inv: Option<&mut [f32]>,
    logits: &[f32],
    targets: &[i64],
    valid: Option<&[bool]>,
    n: usize,
    v: usize,
) -> Result<(f64, usize)> {
    assert_eq!(probs.len(), n * v, "crossentropy_forward: probs shape");
    assert_eq!(logits.len(), n * v, "crossentropy_forward: logits shape");
    assert_eq!(targets.len(), n, "crossentropy_forward: targets shape");
    if let Some(m) = valid {
        assert_eq!(m.len(), n, "crossentropy_forward: valid shape");
    }
    let mut count = 0usize;
    for r in 0..n {
        if ce_counted(r, targets, valid) {
            if targets[r] as u64 >= v as u64 {
                return Err(AsaError::Input(format!(
                    "target id {} out of range for vocab {v}",
                    targets[r]
                )));
            }
            count += 1;
        }
    }
    if v == 0 || n == 0 {
        // no row can count (a counted row would have failed the range check)
        return Ok((0.0, 0));
    }
    // row_loss[r] = logsumexp(logits[r,:]) - logits[r, target] on counted rows
    let mut row_loss = vec![0f64; n];
    let mut inv_buf = vec![0f32; n];
    let normalize = row_inv.is_none();
    probs
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(row_loss.par_iter_mut().zip(inv_buf.par_iter_mut()))
        .enumerate()
        .for_each(|(r, ((p, x), (l, ri)))| {
            let mxf = simd::row_max(x);
            let mx = mxf as f64;
            if mx == f64::NEG_INFINITY {
                // all -inf: no probability mass anywhere; avoid NaN
                p.fill(0.0);
                *l = f64::INFINITY;
            } else {
                // one f32 exp per element (the row max keeps it in range), summed in f64
                let s = simd::exp_sub_sum(p, x, mxf);
                let lse = mx + s.ln();
                let inv = (1.0 / s) as f32;
                *ri = inv;
                if normalize {
                    simd::scale_in_place(p, inv);
                }
                if ce_counted(r, targets, valid) {
                    *l = lse - x[targets[r] as usize] as f64;
                }
            }
        });
    if let Some(ri) = row_inv {
        ri.copy_from_slice(&inv_buf);
    }
    if count == 0 {
        return Ok((0.0, 0));
    }
    let mut sum = 0f64;
    for r in 0..n {
        if ce_counted(r, targets, valid) {
            sum += row_loss[r];
        }
    }
    Ok((sum / count as f64, count))
}

/// In place: probs[N,V] becomes dlogits = scale * (probs - onehot(target)) on counted rows and 0
/// on the others (the `inplace` mode of the CUDA kernel). Saves a [N,V] buffer and a pass over it
/// when the probabilities are not needed afterwards. With `row_inv` [N] the rows hold the
/// unnormalised exps of `crossentropy_forward_rows` and probs = exps * row_inv. Rows whose target
/// is >= V are zeroed.
pub fn crossentropy_backward_inplace(
    probs: &mut [f32],
    row_inv: Option<&[f32]>,
    targets: &[i64],
    valid: Option<&[bool]>,
    scale: f32,
    n: usize,
    v: usize,
) {
    assert_eq!(
        probs.len(),
        n * v,
        "crossentropy_backward_inplace: probs shape"
    );
    assert_eq!(
        targets.len(),
        n,
        "crossentropy_backward_inplace: targets shape"
    );
    if let Some(m) = valid {
        assert_eq!(m.len(), n, "crossentropy_backward_inplace: valid shape");
    }
    if v == 0 {
        return;
    }
    probs.par_chunks_mut(v).enumerate().for_each(|(r, p)| {
        let tgt = targets[r];
        if !ce_counted(r, targets, valid) || tgt as u64 >= v as u64 {
            p.fill(0.0);
            return;
        }
        let tgt = tgt as usize;
        // the values `0.0 + scale * (p - onehot)` of the accumulating form, p = exps * inv when
        // the rows come unnormalised; the target entry is redone with its 1 subtracted
        let et = p[tgt];
        match row_inv {
            Some(ri) => {
                let inv = ri[r];
                p.iter_mut().for_each(|q| *q = scale * (*q * inv));
                p[tgt] = scale * (et * inv - 1.0);
            }
            None => {
                p.iter_mut().for_each(|q| *q *= scale);
                p[tgt] = scale * (et - 1.0);
            }
        }
    });
}

/// dlogits[N,V] += scale * (probs - onehot(target)) on counted rows (scale = dloss / count).
/// probs: [N,V] from `crossentropy_forward`; targets: [N]; valid: Option<[N]>.
/// Rows whose target is >= V (rejected by the forward) are skipped.
pub fn crossentropy_backward(
    dlogits: &mut [f32],
    probs: &[f32],
    targets: &[i64],
    valid: Option<&[bool]>,
    scale: f32,
    n: usize,
    v: usize,
) {
    assert_eq!(dlogits.len(), n * v, "crossentropy_backward: dlogits shape");
    assert_eq!(probs.len(), n * v, "crossentropy_backward: probs shape");
    assert_eq!(targets.len(), n, "crossentropy_backward: targets shape");
    if let Some(m) = valid {
        assert_eq!(m.len(), n, "crossentropy_backward: valid shape");
    }
    if v == 0 {
        return;
    }
    dlogits
        .par_chunks_mut(v)
        .zip(probs.par_chunks(v))
        .enumerate()
        .for_each(|(r, (dl, p))| {
            if !ce_counted(r, targets, valid) {
                return;
            }
            let tgt = targets[r] as usize;
            debug_assert!(
                tgt < v,
                "crossentropy_backward: target {tgt} out of range for vocab {v}"
            );
            if tgt >= v {
                return;
            }
            for (j, (d, &pj)) in dl.iter_mut().zip(p).enumerate() {
                let ind = if j == tgt { 1.0f32 } else { 0.0 };
                *d += scale * (pj - ind);
            }
        });
}

// ------------------------------------------------------------------------------------------------
// residual

/// out = a + b. out, a, b: [N].
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    assert_eq!(out.len(), a.len(), "residual_forward: shape");
    assert_eq!(out.len(), b.len(), "residual_forward: shape");
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(a.par_chunks(ELEM_CHUNK).zip(b.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

// ------------------------------------------------------------------------------------------------
// softmax over rows

/// Numerically stable softmax over rows of length k (exp and sum in f64).
/// out, inp: [R,k]. A row of all -inf (or an empty-max row) gives all zeros, never NaN.
pub fn softmax_rows_forward(out: &mut [f32], inp: &[f32], k: usize) {
    assert_eq!(out.len(), inp.len(), "softmax_rows_forward: shape");
    if k == 0 {
        return;
    }
    assert_eq!(
        inp.len() % k,
        0,
        "softmax_rows_forward: length not a multiple of k"
    );
    out.par_chunks_mut(k)
        .zip(inp.par_chunks(k))
        .for_each(|(y, x)| {
            let mx = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            if mx == f64::NEG_INFINITY {
                y.fill(0.0);
                return;
            }
            let s: f64 = x.iter().map(|&z| (z as f64 - mx).exp()).sum();
            let inv = 1.0 / s;
            for (y, &z) in y.iter_mut().zip(x) {
                *y = ((z as f64 - mx).exp() * inv) as f32;
            }
        });
}

/// dinp += y * (dy - sum(dy*y)) rowwise (sum in f64). dinp, y, dy: [R,k].
pub fn softmax_rows_backward(dinp: &mut [f32], y: &[f32], dy: &[f32], k: usize) {
    assert_eq!(dinp.len(), y.len(), "softmax_rows_backward: shape");
    assert_eq!(dy.len(), y.len(), "softmax_rows_backward: shape");
    if k == 0 {
        return;
    }
    assert_eq!(
        y.len() % k,
        0,
        "softmax_rows_backward: length not a multiple of k"
    );
    dinp.par_chunks_mut(k)
        .zip(y.par_chunks(k).zip(dy.par_chunks(k)))
        .for_each(|(dx, (y, dy))| {
            let dot: f64 = y.iter().zip(dy).map(|(&a, &b)| a as f64 * b as f64).sum();
            for ((dx, &yj), &dyj) in dx.iter_mut().zip(y).zip(dy) {
                *dx += (yj as f64 * (dyj as f64 - dot)) as f32;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// n uniform values in [-scale, scale]
    fn randv(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| r.gen_range(-scale..=scale)).collect()
    }

    fn dot64(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// Central differences of `f` at `x` against `analytic`; asserts that the largest error,
    /// relative to the largest analytic magnitude, is below `tol`. Returns that error.
    fn fd_check(
        name: &str,
        x: &[f32],
        analytic: &[f32],
        eps: f32,
        tol: f64,
        f: impl Fn(&[f32]) -> f64,
    ) -> f64 {
        assert_eq!(x.len(), analytic.len());
        let scale = analytic.iter().fold(1e-3f64, |m, &a| m.max(a.abs() as f64));
        let mut xp = x.to_vec();
        let mut worst = 0f64;
        for k in 0..x.len() {
            let (hi, lo) = (x[k] + eps, x[k] - eps);
            xp[k] = hi;
            let lp = f(&xp);
            xp[k] = lo;
            let lm = f(&xp);
            xp[k] = x[k];
            let num = (lp - lm) / (hi as f64 - lo as f64);
            let err = (num - analytic[k] as f64).abs() / scale;
            worst = worst.max(err);
        }
        assert!(
            worst < tol,
            "{name}: max relative gradient error {worst:e} >= {tol:e}"
        );
        worst
    }

    fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn encoder_forward_values_and_grad() {
        let (b, t, c, v, max_t) = (2, 3, 4, 5, 4);
        let mut r = rng(1);
        let ids: Vec<u32> = vec![0, 3, 3, 4, 0, 1];
        let wte = randv(&mut r, v * c, 1.0);
        let wpe = randv(&mut r, max_t * c, 1.0);
        let rr = randv(&mut r, b * t * c, 1.0);
        let mut out = vec![0f32; b * t * c];
        encoder_forward(&mut out, &ids, &wte, Some(&wpe), b, t, c);
        for bt in 0..b * t {
            for j in 0..c {
                let want = wte[ids[bt] as usize * c + j] + wpe[(bt % t) * c + j];
                assert_eq!(out[bt * c + j], want);
            }
        }
        let mut out2 = vec![0f32; b * t * c];
        encoder_forward(&mut out2, &ids, &wte, None, b, t, c);
        assert_eq!(out2[3 * c..4 * c], wte[4 * c..5 * c]);

        let mut dwte = vec![0f32; v * c];
        let mut dwpe = vec![0f32; max_t * c];
        encoder_backward(&mut dwte, Some(&mut dwpe), &rr, &ids, b, t, c);
        // unused id 2 and unused position 3 get no gradient
        assert!(dwte[2 * c..3 * c].iter().all(|&x| x == 0.0));
        assert!(dwpe[3 * c..].iter().all(|&x| x == 0.0));
        let loss = |wte: &[f32], wpe: &[f32]| {
            let mut o = vec![0f32; b * t * c];
            encoder_forward(&mut o, &ids, wte, Some(wpe), b, t, c);
            dot64(&o, &rr)
        };
        fd_check("encoder dwte", &wte, &dwte, 1e-2, 1e-4, |x| loss(x, &wpe));
        fd_check("encoder dwpe", &wpe, &dwpe, 1e-2, 1e-4, |x| loss(&wte, x));
        // accumulation
        let before = dwte.clone();
        encoder_backward(&mut dwte, None, &rr, &ids, b, t, c);
        for (a, b) in dwte.iter().zip(&before) {
            assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0));
        }
    }

    fn layernorm_ref(
        inp: &[f32],
        w: &[f32],
        bias: &[f32],
        n: usize,
        c: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut out = vec![0f64; n * c];
        let (mut means, mut rstds) = (vec![0f64; n], vec![0f64; n]);
        for r in 0..n {
            let x: Vec<f64> = inp[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
            let m = x.iter().sum::<f64>() / c as f64;
            let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
            let rs = 1.0 / (var + 1e-5).sqrt();
            for j in 0..c {
                out[r * c + j] = (x[j] - m) * rs * w[j] as f64 + bias[j] as f64;
            }
            means[r] = m;
            rstds[r] = rs;
        }
        (out, means, rstds)
    }

    #[test]
    fn layernorm_matches_f64() {
        let (n, c) = (5, 7);
        let mut r = rng(2);
        let inp: Vec<f32> = randv(&mut r, n * c, 2.0).iter().map(|x| x + 0.5).collect();
        let w = randv(&mut r, c, 1.5);
        let bias = randv(&mut r, c, 1.0);
        let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, n, c);
        let (ro, rm, rr) = layernorm_ref(&inp, &w, &bias, n, c);
        assert!(
            max_abs_diff(&out, &ro) < 1e-6,
            "out {}",
            max_abs_diff(&out, &ro)
        );
        assert!(max_abs_diff(&mean, &rm) < 1e-6);
        for (a, b) in rstd.iter().zip(&rr) {
            assert!((*a as f64 - b).abs() < 1e-6 * b);
        }
    }

    #[test]
    fn layernorm_grad() {
        let (n, c) = (3, 6);
        let mut r = rng(3);
        let inp = randv(&mut r, n * c, 1.0);
        let w = randv(&mut r, c, 1.5);
        let bias = randv(&mut r, c, 1.0);
        let rr = randv(&mut r, n * c, 1.0);
        let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, n, c);
        let (mut dx, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
        layernorm_backward(&mut dx, &mut dw, &mut db, &rr, &inp, &w, &mean, &rstd, n, c);
        let loss = |inp: &[f32], w: &[f32], bias: &[f32]| {
            let (mut o, mut m, mut s) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
            layernorm_forward(&mut o, &mut m, &mut s, inp, w, bias, n, c);
            dot64(&o, &rr)
        };
        fd_check("layernorm dinp", &inp, &dx, 1e-3, 1e-2, |x| {
            loss(x, &w, &bias)
        });
        fd_check("layernorm dweight", &w, &dw, 1e-3, 1e-2, |x| {
            loss(&inp, x, &bias)
        });
        fd_check("layernorm dbias", &bias, &db, 1e-3, 1e-2, |x| {
            loss(&inp, &w, x)
        });
        // accumulation
        let (dx0, dw0) = (dx.clone(), dw.clone());
        layernorm_backward(&mut dx, &mut dw, &mut db, &rr, &inp, &w, &mean, &rstd, n, c);
        for (a, b) in dx.iter().zip(&dx0).chain(dw.iter().zip(&dw0)) {
            assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0));
        }
    }

    fn matmul_ref(
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        i: usize,
        o: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * o];
        for r in 0..n {
            for j in 0..o {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for k in 0..i {
                    s += inp[r * i + k] as f64 * w[j * i + k] as f64;
                }
                out[r * o + j] = s;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive() {
        let mut r = rng(4);
        // (n, i, o, bias); the last one is above GEMM_PAR_THRESHOLD (rayon path)
        for &(n, i, o, with_bias) in &[
            (3, 4, 5, true),
            (3, 4, 5, false),
            (7, 2, 9, true),
            (4, 4, 4, false),
            (128, 96, 80, true),
        ] {
            let inp = randv(&mut r, n * i, 1.0);
            let w = randv(&mut r, o * i, 1.0);
            let bias = randv(&mut r, o, 1.0);
            let bias = with_bias.then_some(bias.as_slice());
            let mut out = vec![f32::NAN; n * o]; // overwritten, never read
            matmul_forward(&mut out, &inp, &w, bias, n, i, o);
            let want = matmul_ref(&inp, &w, bias, n, i, o);
            let err = max_abs_diff(&out, &want);
            assert!(
                err < 1e-5 * (i as f64).sqrt(),
                "matmul {n}x{i}x{o} bias={with_bias}: err {err:e}"
            );
            if n * i * o >= GEMM_PAR_THRESHOLD {
                let mut again = vec![0f32; n * o];
                matmul_forward(&mut again, &inp, &w, bias, n, i, o);
                assert_eq!(out, again, "matmul is not deterministic");
            }
        }
    }

    #[test]
    fn matmul_grad() {
        let (n, i, o) = (4, 3, 5);
        let mut r = rng(5);
        let inp = randv(&mut r, n * i, 1.0);
        let w = randv(&mut r, o * i, 1.0);
        let bias = randv(&mut r, o, 1.0);
        let rr = randv(&mut r, n * o, 1.0);
        let (mut dx, mut dw, mut db) = (vec![0f32; n * i], vec![0f32; o * i], vec![0f32; o]);
        matmul_backward(&mut dx, &mut dw, Some(&mut db), &rr, &inp, &w, n, i, o);
        let loss = |inp: &[f32], w: &[f32], b: &[f32]| {
            let mut out = vec![0f32; n * o];
            matmul_forward(&mut out, inp, w, Some(b), n, i, o);
            dot64(&out, &rr)
        };
        fd_check("matmul dinp", &inp, &dx, 1e-2, 1e-3, |x| loss(x, &w, &bias));
        fd_check("matmul dweight", &w, &dw, 1e-2, 1e-3, |x| {
            loss(&inp, x, &bias)
        });
        fd_check("matmul dbias", &bias, &db, 1e-2, 1e-3, |x| {
            loss(&inp, &w, x)
        });
    }

    #[test]
    fn matmul_backward_large_accumulates() {
        // rayon path, against naive f64 sums, accumulating onto non-zero gradients
        let (n, i, o) = (96, 72, 70);
        let mut r = rng(6);
        let inp = randv(&mut r, n * i, 1.0);
        let w = randv(&mut r, o * i, 1.0);
        let dy = randv(&mut r, n * o, 1.0);
        let (mut dx, mut dw, mut db) = (vec![1f32; n * i], vec![1f32; o * i], vec![1f32; o]);
        matmul_backward(&mut dx, &mut dw, Some(&mut db), &dy, &inp, &w, n, i, o);
        let mut ref_dx = vec![1f64; n * i];
        let mut ref_dw = vec![1f64; o * i];
        let mut ref_db = vec![1f64; o];
        for row in 0..n {
            for j in 0..o {
                let d = dy[row * o + j] as f64;
                ref_db[j] += d;
                for k in 0..i {
                    ref_dx[row * i + k] += d * w[j * i + k] as f64;
                    ref_dw[j * i + k] += d * inp[row * i + k] as f64;
                }
            }
        }
        assert!(max_abs_diff(&dx, &ref_dx) < 1e-4);
        assert!(max_abs_diff(&dw, &ref_dw) < 1e-4);
        assert!(max_abs_diff(&db, &ref_db) < 1e-5);
    }

    #[test]
    fn gelu_known_values() {
        let inp = [1.0f32, -0.5, 0.0];
        let mut out = [9f32; 3];
        gelu_forward(&mut out, &inp);
        let want = [0.8413447460685429f64, -0.15426876936299344, 0.0];
        assert!(max_abs_diff(&out, &want) < 1e-7, "{out:?}");
        assert_eq!(out[2], 0.0);
    }

    #[test]
    fn gelu_grad() {
        let mut r = rng(7);
        let inp = randv(&mut r, 20, 3.0);
        let rr = randv(&mut r, 20, 1.0);
        let mut dx = vec![0f32; 20];
        gelu_backward(&mut dx, &inp, &rr);
        fd_check("gelu", &inp, &dx, 1e-3, 1e-2, |x| {
            let mut o = vec![0f32; x.len()];
            gelu_forward(&mut o, x);
            dot64(&o, &rr)
        });
    }

    #[test]
    fn dropout_behaviour() {
        let mut r = rng(8);
        let n = 10_000;
        let inp = randv(&mut r, n, 1.0);
        let (mut out, mut mask) = (vec![0f32; n], vec![0f32; n]);
        dropout_forward(&mut out, &mut mask, &inp, 0.0, &mut rng(9));
        assert_eq!(out, inp);
        assert!(mask.iter().all(|&m| m == 1.0));

        dropout_forward(&mut out, &mut mask, &inp, 0.5, &mut rng(9));
        let kept = mask.iter().filter(|&&m| m != 0.0).count();
        assert!((4_500..=5_500).contains(&kept), "kept {kept}");
        for k in 0..n {
            assert!(mask[k] == 0.0 || mask[k] == 2.0);
            assert_eq!(out[k], inp[k] * mask[k]);
        }
        let (mut out2, mut mask2) = (vec![0f32; n], vec![0f32; n]);
        dropout_forward(&mut out2, &mut mask2, &inp, 0.5, &mut rng(9));
        assert_eq!(mask, mask2, "same seed, same mask");
        dropout_forward(&mut out2, &mut mask2, &inp, 0.5, &mut rng(10));
        assert_ne!(mask, mask2);

        let dy = randv(&mut r, n, 1.0);
        let mut dx = vec![1f32; n];
        dropout_backward(&mut dx, &dy, &mask);
        for k in 0..n {
            assert_eq!(dx[k], 1.0 + dy[k] * mask[k]);
        }
    }

    #[test]
    fn crossentropy_hand_example() {
        let logits = [1f32, 2.0, 3.0, 1.0, 1.0, 1.0];
        let targets = [2i64, 0];
        let mut probs = [0f32; 6];
        let (loss, count) =
            crossentropy_forward(&mut probs, &logits, &targets, None, 2, 3).unwrap();
        assert_eq!(count, 2);
        // row 0: lse - 3 = ln(1 + e^-1 + e^-2); row 1: ln 3
        // exps are f32 (summed in f64): the loss is good to f32 precision
        assert!((loss - 0.753109126556245).abs() < 1e-7, "{loss}");
        let want = [
            0.09003057317038048,
            0.2447284710547977,
            0.665240955774822,
            1.0 / 3.0,
            1.0 / 3.0,
            1.0 / 3.0,
        ];
        assert!(max_abs_diff(&probs, &want) < 1e-7);
        let mut dl = [0f32; 6];
        crossentropy_backward(&mut dl, &probs, &targets, None, 0.5, 2, 3);
        let want_d: Vec<f64> = want
            .iter()
            .enumerate()
            .map(|(k, p)| 0.5 * (p - if k == 2 || k == 3 { 1.0 } else { 0.0 }))
            .collect();
        assert!(max_abs_diff(&dl, &want_d) < 1e-7);
    }

    #[test]
    fn crossentropy_invalid_rows() {
        // row 0 counted, row 1 masked by `valid` (its target 7 is out of range but ignored),
        // row 2 target -100 (ignored), row 3 counted
        let logits = [1f32, 2.0, 3.0, 0.5, 0.1, 0.2, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0];
        let targets = [2i64, 7, -100, 0];
        let valid = [true, false, true, true];
        let mut probs = [0f32; 12];
        let (loss, count) =
            crossentropy_forward(&mut probs, &logits, &targets, Some(&valid), 4, 3).unwrap();
        assert_eq!(count, 2);
        // exps are f32 (summed in f64): the loss is good to f32 precision
        assert!((loss - 0.753109126556245).abs() < 1e-7, "{loss}");
        let mut dl = [0f32; 12];
        crossentropy_backward(&mut dl, &probs, &targets, Some(&valid), 1.0, 4, 3);
        assert!(dl[3..9].iter().all(|&d| d == 0.0));
        assert!(dl[0..3].iter().any(|&d| d != 0.0) && dl[9..].iter().any(|&d| d != 0.0));
        // the in-place form gives the same values (uncounted rows zeroed)
        let mut inplace = probs;
        crossentropy_backward_inplace(&mut inplace, None, &targets, Some(&valid), 0.5, 4, 3);
        let mut dl_half = [0f32; 12];
        crossentropy_backward(&mut dl_half, &probs, &targets, Some(&valid), 0.5, 4, 3);
        assert_eq!(inplace, dl_half);
        // unnormalised rows + row_inv: the same loss and the same dlogits, bit for bit
        let (mut exps, mut inv) = ([0f32; 12], [0f32; 4]);
        let (loss2, count2) =
            crossentropy_forward_rows(&mut exps, &mut inv, &logits, &targets, Some(&valid), 4, 3)
                .unwrap();
        assert_eq!((loss2.to_bits(), count2), (loss.to_bits(), count));
        crossentropy_backward_inplace(&mut exps, Some(&inv), &targets, Some(&valid), 0.5, 4, 3);
        assert_eq!(exps, dl_half);
        // nothing counted
        let (loss, count) =
            crossentropy_forward(&mut probs, &logits, &[-1, -1, -1, -1], None, 4, 3).unwrap();
        assert_eq!((loss, count), (0.0, 0));
    }

    #[test]
    fn crossentropy_out_of_range_target() {
        let logits = [0f32; 6];
        let mut probs = [0f32; 6];
        let err = crossentropy_forward(&mut probs, &logits, &[0, 3], None, 2, 3).unwrap_err();
        assert!(matches!(err, AsaError::Input(_)));
        assert!(
            err.to_string()
                .contains("target id 3 out of range for vocab 3"),
            "{err}"
        );
    }

    #[test]
    fn crossentropy_grad() {
        let (n, v) = (4, 5);
        let mut r = rng(11);
        let logits = randv(&mut r, n * v, 2.0);
        let targets = [1i64, 4, -100, 0];
        let mut probs = vec![0f32; n * v];
        let (_, count) = crossentropy_forward(&mut probs, &logits, &targets, None, n, v).unwrap();
        assert_eq!(count, 3);
        let mut dl = vec![0f32; n * v];
        crossentropy_backward(&mut dl, &probs, &targets, None, 1.0 / count as f32, n, v);
        fd_check("crossentropy", &logits, &dl, 1e-3, 1e-3, |x| {
            let mut p = vec![0f32; n * v];
            crossentropy_forward(&mut p, x, &targets, None, n, v)
                .unwrap()
                .0
        });
    }

    #[test]
    fn residual_adds() {
        let mut out = [0f32; 3];
        residual_forward(&mut out, &[1.0, 2.0, 3.0], &[0.5, -2.0, 1.0]);
        assert_eq!(out, [1.5, 0.0, 4.0]);
    }

    #[test]
    fn softmax_rows_values_and_neg_inf() {
        let ninf = f32::NEG_INFINITY;
        let inp = [1f32, 2.0, 3.0, ninf, ninf, ninf, 0.0, ninf, 0.0];
        let mut out = [9f32; 9];
        softmax_rows_forward(&mut out, &inp, 3);
        let want = [
            0.09003057317038048,
            0.2447284710547977,
            0.665240955774822,
            0.0,
            0.0,
            0.0,
            0.5,
            0.0,
            0.5,
        ];
        assert!(max_abs_diff(&out, &want) < 1e-7, "{out:?}");
        assert!(out.iter().all(|x| x.is_finite()));
        // backward through the all -inf row stays zero (y = 0 there)
        let mut dx = [0f32; 9];
        softmax_rows_backward(&mut dx, &out, &[1.0; 9], 3);
        assert!(dx[3..6].iter().all(|&d| d == 0.0));
    }

    #[test]
    fn softmax_rows_grad() {
        let (rows, k) = (3, 5);
        let mut r = rng(12);
        let inp = randv(&mut r, rows * k, 2.0);
        let rr = randv(&mut r, rows * k, 1.0);
        let mut y = vec![0f32; rows * k];
        softmax_rows_forward(&mut y, &inp, k);
        let mut dx = vec![0f32; rows * k];
        softmax_rows_backward(&mut dx, &y, &rr, k);
        fd_check("softmax_rows", &inp, &dx, 1e-3, 1e-2, |x| {
            let mut o = vec![0f32; x.len()];
            softmax_rows_forward(&mut o, x, k);
            dot64(&o, &rr)
        });
    }

    #[test]
    fn fd_check_can_fail() {
        // a deliberately wrong gradient must be caught
        let x = [0.3f32, -0.7];
        let wrong = [2.0f32 * 0.3 * 1.1, 2.0 * -0.7];
        let res =
            std::panic::catch_unwind(|| fd_check("x^2", &x, &wrong, 1e-3, 1e-2, |x| dot64(x, x)));
        assert!(res.is_err());
    }
}
