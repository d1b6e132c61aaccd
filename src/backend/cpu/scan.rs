//! The chunk form of the slot scan on the CPU: the write scan, the content read and the slot
//! mix without the `[B,H,T,K,d]` state history.
//!
//! The slot state of head (b,h) at position t is, per slot k (design: the project's
//! `chunked-scan.md`, sections 1, 2 and 4; `docs/METHOD.md` "The chunk form"):
//!
//! ```text
//!   num_t[k] = E_t[k] C_c[k] + P_t[k]          P_t[k] = sum_{s in chunk(t), s<=t} A_s[k] v_s
//!   den_t[k] = E_t[k] D_c[k] + Pd_t[k]         S_t[k] = num_t[k] / max(den_t[k], 1e-8)
//!   A_s[k] = exp(w_s[k] - M_s[k])   E_t[k] = exp(M_{c0-1}[k] - M_t[k])   (0 where the max is -inf)
//!   C_{c+1} = e_c C_c + P_{end(c)},  D_{c+1} = den_{end(c)}               (e_c = E at end(c))
//! ```
//!
//! `M` is the reference's chunk-structured running max. Every consumer of the state is one of
//! two products, so the state is never stored:
//! * `contract`: y_t[k] = x_t . S_t[k] (the content read with x = q; in the backward, x = dO
//!   gives the gradient of the mix weights);
//! * `mix`: o_t = sum_k a_t[k] S_t[k] (the read output with a = read weights, plus the gate
//!   times the slotspace weights when the refine is on).
//!
//! Both walk a chunk in tiles of `TILE` positions: the carry part (`C_c`, the tile-start prefix
//! `P`) is a `[L,K]` product per tile, the part inside the tile a masked `[L,L]` product, and the
//! prefix advances by `A^T V`. The backward takes the state's gradient in its factored form
//! `dS_t[k] = a_t[k] X_t + b_t[k] Y_t` (X = dO, Y = q), never materialised, and walks each chunk
//! in reverse with the suffix carry `R` (section 4 of the design), recomputing alpha, E and the
//! tile prefixes from the saved running max, denominators and chunk carries. The gradient through
//! the running max then follows the reference's tie rules (cummax: to the latest position
//! holding the max; `maximum`: half/half on exact ties).
//!
//! Parallelism: over (batch, head, chunk). The chunk carries `C_c` are computed once in the
//! forward (per chunk sums in parallel, then a short pass over chunks) and saved, so every sweep
//! then runs chunks independently; the backward gets the carries' gradients the same way (per
//! chunk sums, a short reverse pass, then the chunks in parallel). Results do not depend on the
//! thread count: every output element is computed by one task in a fixed order.
//!
//! Precision: the running max and the denominators in f64 (as the serial scan), the tile
//! products in f32 (`dot32`/`axpy`, fixed lane order). The serial ops in `slot_ops.rs`
//! (`slot_scan_forward`, `read_logits_forward`, `slot_mix_forward` and their backwards) are the
//! oracle of the tests below; the layer uses them where the state history itself is wanted
//! (info tensors, slot masks, routing modes other than softmax, the intervene variant).

use rayon::prelude::*;

use super::simd::{axpy, dot32};
use super::simd_task;
use crate::vocab::dims::{SlotDims, DEN_EPS};

/// Positions per tile inside a write chunk (tiles never straddle a chunk boundary).
pub const TILE: usize = 32;

/// Number of write chunks of a length-`t` sequence.
pub fn num_chunks(t: usize, chunk: usize) -> usize {
    t.div_ceil(chunk.max(1))
}

simd_kernel! {
/// Running max M (the reference's chunked cummax against the carried max), denominator
/// den_t = den_{c0-1} exp(M_{c0-1} - M_t) + sum_{s in chunk, s<=t} exp(w_s - M_s), and the two
/// per-position weights every tile sweep reads: alpha_t = exp(w_t - M_t) and
/// E_t = exp(M_{c0-1} - M_t) (0 where the max is -inf), computed here once (f64 exp, stored f32)
/// instead of in each of the five sweeps. An empty prefix (left padding) keeps den 0.
/// rmax, den, wl: [B,H,K,T]; alpha, egate: [B,H,T,K]
pub fn stats_forward(
    rmax: &mut [f32],
    den: &mut [f32],
    alpha: &mut [f32],
    egate: &mut [f32],
    wl: &[f32],
    chunk: usize,
    t: usize,
    k: usize,
) {
    let chunk = chunk.max(1);
    let kt = k * t;
    rmax.par_chunks_mut(kt)
        .zip(den.par_chunks_mut(kt))
        .zip(alpha.par_chunks_mut(kt))
        .zip(egate.par_chunks_mut(kt))
        .zip(wl.par_chunks(kt))
        .for_each(|((((rmb, dnb), alb), egb), wb)| simd_task(#[inline(always)] || {
            for s in 0..k {
                let rm = &mut rmb[s * t..(s + 1) * t];
                let dn = &mut dnb[s * t..(s + 1) * t];
                let w = &wb[s * t..(s + 1) * t];
                let mut mp = f32::NEG_INFINITY;
                let mut dprev = 0.0f64;
                let mut c0 = 0;
                while c0 < t {
                    let c1 = (c0 + chunk).min(t);
                    let mut cm = f32::NEG_INFINITY;
                    let mut add = 0.0f64;
                    let mut dsum = dprev;
                    for ti in c0..c1 {
                        let wt = w[ti];
                        cm = if wt >= cm { wt } else { cm };
                        let r = if mp >= cm { mp } else { cm };
                        rm[ti] = r;
                        let scale = if mp.is_finite() { ((mp - r) as f64).exp() } else { 0.0 };
                        let e = if r.is_finite() { ((wt - r) as f64).exp() } else { 0.0 };
                        alb[ti * k + s] = e as f32;
                        egb[ti * k + s] = scale as f32;
                        add += e;
                        dsum = dprev * scale + add;
                        dn[ti] = dsum as f32;
                    }
                    mp = rm[c1 - 1];
                    dprev = dsum;
                    c0 = c1;
                }
            }
        }));
}
}

/// Per-thread scratch of the tile sweeps (sized for `TILE` positions, K slots, head dim d).
struct Ws {
    k: usize,
    a: Vec<f32>,     // [L,K] alpha
    e: Vec<f32>,     // [L,K] E
    inv: Vec<f32>,   // [L,K] 1 / max(den, eps)
    live: Vec<bool>, // [L,K] den >= eps (the clamp passes no gradient)
    p: Vec<f32>,     // [K,d] in-chunk prefix at the tile start
    pt: Vec<f32>,    // [tiles of a chunk, K, d] tile-start prefixes (backward)
    xv: Vec<f32>,    // [L,L] x_l . v_j
    yv: Vec<f32>,    // [L,L] y_l . v_j
    rho: Vec<f32>,   // [L,K]
    kap: Vec<f32>,   // [L,K]
    g: Vec<f32>,     // [L,K] dL/dden
    acc: Vec<f32>,   // [K]
    r: Vec<f32>,     // [K,d] reverse carry of dnum
    rd: Vec<f32>,    // [K] reverse carry of dden
    ct: Vec<f32>,    // [d,K] the chunk carry, transposed
    pt_: Vec<f32>,   // [d,K] a tile-start prefix, transposed
    vt: Vec<f32>,    // [d,L] the tile's values, transposed
    t1: Vec<f32>,    // [L,max(K,L,d)] tile product scratch
    t2: Vec<f32>,    // [L,max(K,L,d)] tile product scratch
    t3: Vec<f32>,    // [L,K] (backward)
    t4: Vec<f32>,    // [L,L] (backward)
    xt: Vec<f32>,    // [d,L] X^T (backward)
    yt: Vec<f32>,    // [d,L] Y^T (backward)
    rhot: Vec<f32>,  // [K,L] (backward)
    kapt: Vec<f32>,  // [K,L] (backward)
    at: Vec<f32>,    // [K,L] (backward)
    rt: Vec<f32>,    // [d,K] (backward)
}

impl Ws {
    fn new(k: usize, d: usize) -> Self {
        Ws {
            k,
            a: vec![0.0; TILE * k],
            e: vec![0.0; TILE * k],
            inv: vec![0.0; TILE * k],
            live: vec![false; TILE * k],
            p: vec![0.0; k * d],
            pt: Vec::new(),
            xv: vec![0.0; TILE * TILE],
            yv: vec![0.0; TILE * TILE],
            rho: vec![0.0; TILE * k],
            kap: vec![0.0; TILE * k],
            g: vec![0.0; TILE * k],
            acc: vec![0.0; k],
            r: vec![0.0; k * d],
            rd: vec![0.0; k],
            ct: Vec::new(),
            pt_: Vec::new(),
            vt: Vec::new(),
            t1: vec![0.0; TILE * k.max(d).max(TILE)],
            t2: vec![0.0; TILE * k.max(d).max(TILE)],
            t3: vec![0.0; TILE * k],
            t4: vec![0.0; TILE * TILE],
            xt: Vec::new(),
            yt: Vec::new(),
            rhot: Vec::new(),
            kapt: Vec::new(),
            at: Vec::new(),
            rt: Vec::new(),
        }
    }
}

/// The saved forward quantities of one layer call that every sweep reads.
#[derive(Clone, Copy)]
pub struct Scan<'a> {
    pub dm: SlotDims,
    /// write chunk size W (>= 1)
    pub chunk: usize,
    /// [B,H,K,T] write logits
    pub wl: &'a [f32],
    /// [B,H,K,T] running max (`stats_forward`)
    pub rmax: &'a [f32],
    /// [B,H,K,T] denominators (`stats_forward`)
    pub den: &'a [f32],
    /// [B,H,T,K] alpha (`stats_forward`)
    pub alpha: &'a [f32],
    /// [B,H,T,K] E (`stats_forward`)
    pub egate: &'a [f32],
    /// [B,H,T,d] values
    pub v: &'a [f32],
    /// [B,H,NC,K,d] numerator carried into each chunk (`carries_forward`)
    pub carry: &'a [f32],
}

/// One chunk of one (b,h): the slices a tile sweep reads.
struct View<'a> {
    t: usize,
    k: usize,
    d: usize,
    c0: usize,
    c1: usize,
    w: &'a [f32],   // [K,T]
    rm: &'a [f32],  // [K,T]
    dn: &'a [f32],  // [K,T]
    al: &'a [f32],  // [T,K] alpha
    eg: &'a [f32],  // [T,K] E
    v: &'a [f32],   // [T,d]
    cin: &'a [f32], // [K,d]
}

impl<'a> Scan<'a> {
    fn nc(&self) -> usize {
        num_chunks(self.dm.t, self.chunk)
    }

    fn view(&self, bh: usize, c: usize) -> View<'a> {
        let SlotDims { t, k, d, .. } = self.dm;
        let c0 = c * self.chunk;
        let nc = self.nc();
        View {
            t,
            k,
            d,
            c0,
            c1: (c0 + self.chunk).min(t),
            w: &self.wl[bh * k * t..][..k * t],
            rm: &self.rmax[bh * k * t..][..k * t],
            dn: &self.den[bh * k * t..][..k * t],
            al: &self.alpha[bh * t * k..][..t * k],
            eg: &self.egate[bh * t * k..][..t * k],
            v: &self.v[bh * t * d..][..t * d],
            // empty while `carries_forward` builds the carries
            cin: match self.carry.is_empty() {
                true => &[],
                false => &self.carry[(bh * nc + c) * k * d..][..k * d],
            },
        }
    }
}

impl View<'_> {
    /// D_c: the denominator carried into the chunk.
    #[inline]
    fn dprev(&self, s: usize) -> f32 {
        if self.c0 > 0 {
            self.dn[s * self.t + self.c0 - 1]
        } else {
            0.0
        }
    }

    /// E at position `ti` of this chunk for slot `s`.
    #[inline]
    fn e_at(&self, s: usize, ti: usize) -> f32 {
        self.eg[ti * self.k + s]
    }

    fn tiles(&self) -> impl DoubleEndedIterator<Item = (usize, usize)> + '_ {
        (self.c0..self.c1)
            .step_by(TILE)
            .map(move |s0| (s0, (s0 + TILE).min(self.c1)))
    }

    /// alpha, E, 1/den and the clamp's liveness at positions [s0,s1), as [L,K] into `ws`.
    #[inline(always)]
    fn weights(&self, s0: usize, s1: usize, ws: &mut Ws) {
        let (t, k) = (self.t, self.k);
        let n = (s1 - s0) * k;
        ws.a[..n].copy_from_slice(&self.al[s0 * k..s1 * k]);
        ws.e[..n].copy_from_slice(&self.eg[s0 * k..s1 * k]);
        for s in 0..k {
            let row = s * t;
            for ti in s0..s1 {
                let i = (ti - s0) * k + s;
                let dd = self.dn[row + ti];
                ws.inv[i] = 1.0 / dd.max(DEN_EPS);
                ws.live[i] = dd >= DEN_EPS;
            }
        }
    }

    /// p[k] += sum_{l in tile} A_l[k] v_l, i.e. P += A^T V (the in-chunk prefix advances past
    /// the tile); `at` is scratch for A^T.
    #[inline(always)]
    fn advance(&self, p: &mut [f32], at: &mut Vec<f32>, s0: usize, s1: usize) {
        let (k, d, n) = (self.k, self.d, s1 - s0);
        transpose_into(at, &self.al[s0 * k..s1 * k], n, k, k);
        tile_mm(p, d, at, n, &self.v[s0 * d..], d, k, d, |_| (0, n), true);
    }
}

/// Splits `buf` ([BH, T, width] row-major) into one slice per (bh, chunk), in that order.
fn per_chunk(buf: &mut [f32], t: usize, chunk: usize, width: usize) -> Vec<&mut [f32]> {
    buf.chunks_mut(t * width)
        .flat_map(|b| b.chunks_mut(chunk * width))
        .collect()
}

/// Columns of the tile products held in registers at once.
const NB: usize = 16;

/// Rows of the tile products computed together (their `NB`-column blocks share each row of `b`).
const MB: usize = 4;

/// The tile product c[i, :] (+)= sum_{p in rows(i)} a[i*lda + p] b[p*ldb .. + n], for i < m:
/// the broadcast form (a scalar of `a` times a row of `b`), with `MB` output rows by `NB` columns
/// kept in registers (eight independent vector accumulators, enough to hide the add latency;
/// no horizontal sums). `rows(i)` is the range of p that row i reads (a masked product reads
/// only its causal part). f32; each output sums its terms in ascending p whatever the blocking,
/// so the result does not depend on MB or NB.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn tile_mm(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    m: usize,
    n: usize,
    rows: impl Fn(usize) -> (usize, usize),
    acc: bool,
) {
    let mut i0 = 0;
    while i0 + MB <= m {
        let rr: [(usize, usize); MB] = std::array::from_fn(|q| rows(i0 + q));
        // the p range every row of the block reads; each row's own head and tail around it
        let lo = rr.iter().map(|r| r.0).max().unwrap_or(0);
        let hi = rr.iter().map(|r| r.1).min().unwrap_or(0);
        if lo >= hi || !n.is_multiple_of(NB) {
            for i in i0..i0 + MB {
                tile_mm_row(c, ldc, a, lda, b, ldb, i, n, rr[i - i0], acc);
            }
            i0 += MB;
            continue;
        }
        let (a0, a1, a2, a3) = (
            &a[i0 * lda..],
            &a[(i0 + 1) * lda..],
            &a[(i0 + 2) * lda..],
            &a[(i0 + 3) * lda..],
        );
        for j0 in (0..n).step_by(NB) {
            let brow = |p: usize| -> &[f32; NB] { b[p * ldb + j0..][..NB].try_into().expect("NB") };
            let load = |q: usize| -> [f32; NB] {
                if acc {
                    c[(i0 + q) * ldc + j0..][..NB].try_into().expect("NB")
                } else {
                    [0f32; NB]
                }
            };
            let (mut r0, mut r1, mut r2, mut r3) = (load(0), load(1), load(2), load(3));
            let span = |r: &mut [f32; NB], ar: &[f32], ps: std::ops::Range<usize>| {
                span_nb(r, ar, b, ldb, j0, ps)
            };
            // each row's head, then the shared range, then each row's tail: p ascending per row
            span(&mut r0, a0, rr[0].0..lo);
            span(&mut r1, a1, rr[1].0..lo);
            span(&mut r2, a2, rr[2].0..lo);
            span(&mut r3, a3, rr[3].0..lo);
            for p in lo..hi {
                let br = brow(p);
                axpy_nb(&mut r0, a0[p], br);
                axpy_nb(&mut r1, a1[p], br);
                axpy_nb(&mut r2, a2[p], br);
                axpy_nb(&mut r3, a3[p], br);
            }
            span(&mut r0, a0, hi..rr[0].1);
            span(&mut r1, a1, hi..rr[1].1);
            span(&mut r2, a2, hi..rr[2].1);
            span(&mut r3, a3, hi..rr[3].1);
            for (q, rq) in [r0, r1, r2, r3].iter().enumerate() {
                c[(i0 + q) * ldc + j0..][..NB].copy_from_slice(rq);
            }
        }
        i0 += MB;
    }
    for i in i0..m {
        tile_mm_row(c, ldc, a, lda, b, ldb, i, n, rows(i), acc);
    }
}

/// r += ap * br (one row of `b` scaled into the register block)
#[inline(always)]
fn axpy_nb(r: &mut [f32; NB], ap: f32, br: &[f32; NB]) {
    for x in 0..NB {
        r[x] += ap * br[x];
    }
}

/// r += sum_{p in ps} ar[p] b[p*ldb + j0 ..][..NB]
#[inline(always)]
fn span_nb(
    r: &mut [f32; NB],
    ar: &[f32],
    b: &[f32],
    ldb: usize,
    j0: usize,
    ps: std::ops::Range<usize>,
) {
    for p in ps {
        axpy_nb(r, ar[p], b[p * ldb + j0..][..NB].try_into().expect("NB"));
    }
}

/// One row of `tile_mm`: c[i, :] (+)= sum_{p in p0..p1} a[i*lda + p] b[p*ldb .. + n].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_mm_row(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    i: usize,
    n: usize,
    (p0, p1): (usize, usize),
    acc: bool,
) {
    let ar = &a[i * lda..];
    let cr = &mut c[i * ldc..][..n];
    let mut j0 = 0;
    while j0 < n {
        let w = (n - j0).min(NB);
        let mut r = [0f32; NB];
        if w == NB {
            if acc {
                r.copy_from_slice(&cr[j0..j0 + NB]);
            }
            for p in p0..p1 {
                axpy_nb(
                    &mut r,
                    ar[p],
                    b[p * ldb + j0..][..NB].try_into().expect("NB"),
                );
            }
            cr[j0..j0 + NB].copy_from_slice(&r);
        } else {
            if acc {
                r[..w].copy_from_slice(&cr[j0..j0 + w]);
            }
            for p in p0..p1 {
                let ap = ar[p];
                let br = &b[p * ldb + j0..][..w];
                for q in 0..w {
                    r[q] += ap * br[q];
                }
            }
            cr[j0..j0 + w].copy_from_slice(&r[..w]);
        }
        j0 += w;
    }
}

/// out[j*rows_n + i] = x[i*ld + j]: the [cols, rows] transpose of the first `cols` columns of a
/// [rows, ld] block (for the products against a matrix's transpose).
#[inline(always)]
pub(crate) fn transpose_into(out: &mut Vec<f32>, x: &[f32], rows_n: usize, cols: usize, ld: usize) {
    out.clear();
    out.resize(rows_n * cols, 0.0);
    for i in 0..rows_n {
        let xr = &x[i * ld..][..cols];
        for (j, &v) in xr.iter().enumerate() {
            out[j * rows_n + i] = v;
        }
    }
}

simd_kernel! {
/// The numerator carried into each chunk: carry[c] = C_c, C_0 = 0, C_{c+1} = e_c C_c + P_end(c).
/// First every chunk's own sum P_end in parallel, then a pass over the chunks per (b,h).
/// carry: [B,H,NC,K,d] (`scan.carry` is not read)
pub fn carries_forward(carry: &mut [f32], scan: Scan) {
    let SlotDims { k, d, .. } = scan.dm;
    let nc = scan.nc();
    // carry[c] <- P_end(c-1), the sum of chunk c-1 alone
    carry
        .par_chunks_mut(k * d)
        .enumerate()
        .for_each_init(|| Ws::new(k, d), |ws, (i, out)| simd_task(#[inline(always)] || {
            let (bh, c) = (i / nc, i % nc);
            out.iter_mut().for_each(|x| *x = 0.0);
            if c == 0 {
                return;
            }
            let vw = scan.view(bh, c - 1);
            for (s0, s1) in vw.tiles() {
                vw.advance(out, &mut ws.at, s0, s1);
            }
        }));
    // carry[c] += e_{c-1} carry[c-1], in chunk order
    carry
        .par_chunks_mut(nc * k * d)
        .enumerate()
        .for_each(|(bh, cb)| simd_task(#[inline(always)] || {
            for c in 1..nc {
                let vw = scan.view(bh, c - 1);
                let (prev, cur) = cb.split_at_mut(c * k * d);
                let prev = &prev[(c - 1) * k * d..];
                for s in 0..k {
                    let e = vw.e_at(s, vw.c1 - 1);
                    if e != 0.0 {
                        axpy(&mut cur[s * d..(s + 1) * d], e, &prev[s * d..(s + 1) * d]);
                    }
                }
            }
        }));
}
}

simd_kernel! {
/// y_t[k] = x_t . S_t[k]. y: [B,H,T,K]; x: [B,H,T,d]
pub fn contract(y: &mut [f32], x: &[f32], scan: Scan) {
    let SlotDims { t, k, d, .. } = scan.dm;
    let nc = scan.nc();
    per_chunk(y, t, scan.chunk, k)
        .into_par_iter()
        .enumerate()
        .for_each_init(|| Ws::new(k, d), |ws, (i, yc)| simd_task(#[inline(always)] || {
            let (bh, c) = (i / nc, i % nc);
            let vw = scan.view(bh, c);
            contract_chunk(&vw, &x[bh * t * d..][..t * d], yc, ws);
        }));
}
}

/// contract on one chunk, per tile: y = inv * (mask(X V^T) A + X P^T + E * (X C^T)).
#[inline(always)]
fn contract_chunk(vw: &View, x: &[f32], y: &mut [f32], ws: &mut Ws) {
    let (k, d) = (vw.k, vw.d);
    ws.p.iter_mut().for_each(|p| *p = 0.0);
    let has_c = !vw.cin.is_empty() && vw.c0 > 0;
    if has_c {
        transpose_into(&mut ws.ct, vw.cin, k, d, d);
    }
    for (s0, s1) in vw.tiles() {
        vw.weights(s0, s1, ws);
        let n = s1 - s0;
        let xt = &x[s0 * d..s1 * d];
        // t1[l, j] = x_l . v_j (j <= l)
        transpose_into(&mut ws.vt, &vw.v[s0 * d..s1 * d], n, d, d);
        tile_mm(&mut ws.t1, n, xt, d, &ws.vt, n, n, n, |_| (0, d), false);
        // t2[l, :] = sum_{j<=l} t1[l, j] A_j + x_l P^T
        tile_mm(
            &mut ws.t2,
            k,
            &ws.t1,
            n,
            &ws.a,
            k,
            n,
            k,
            |l| (0, l + 1),
            false,
        );
        transpose_into(&mut ws.pt_, &ws.p, k, d, d);
        tile_mm(&mut ws.t2, k, xt, d, &ws.pt_, k, n, k, |_| (0, d), true);
        if has_c {
            // t1[l, :] = x_l C^T
            tile_mm(&mut ws.t1, k, xt, d, &ws.ct, k, n, k, |_| (0, d), false);
        }
        for l in 0..n {
            let yl = &mut y[(s0 - vw.c0 + l) * k..][..k];
            for s in 0..k {
                let i = l * k + s;
                let mut v = ws.t2[i];
                let e = ws.e[i];
                if has_c && e != 0.0 {
                    v += e * ws.t1[i];
                }
                yl[s] = v * ws.inv[i];
            }
        }
        let Ws { p, at, .. } = ws;
        vw.advance(p, at, s0, s1);
    }
}

simd_kernel! {
/// o_t = sum_k a_t[k] S_t[k]. o: [B,H,T,d] (overwritten); a: [B,H,T,K]
pub fn mix(o: &mut [f32], a: &[f32], scan: Scan) {
    let SlotDims { t, k, d, .. } = scan.dm;
    let nc = scan.nc();
    per_chunk(o, t, scan.chunk, d)
        .into_par_iter()
        .enumerate()
        .for_each_init(|| Ws::new(k, d), |ws, (i, oc)| simd_task(#[inline(always)] || {
            let (bh, c) = (i / nc, i % nc);
            let vw = scan.view(bh, c);
            mix_chunk(&vw, &a[bh * t * k..][..t * k], oc, ws);
        }));
}
}

/// mix on one chunk, per tile: o = rho P + (rho * E) C + mask(rho A^T) V with rho = a / den.
#[inline(always)]
fn mix_chunk(vw: &View, a: &[f32], o: &mut [f32], ws: &mut Ws) {
    let (k, d) = (vw.k, vw.d);
    ws.p.iter_mut().for_each(|p| *p = 0.0);
    let has_c = !vw.cin.is_empty() && vw.c0 > 0;
    for (s0, s1) in vw.tiles() {
        vw.weights(s0, s1, ws);
        let n = s1 - s0;
        for i in 0..n * k {
            ws.rho[i] = a[s0 * k + i] * ws.inv[i];
        }
        let ot = &mut o[(s0 - vw.c0) * d..][..n * d];
        tile_mm(ot, d, &ws.rho, k, &ws.p, d, n, d, |_| (0, k), false);
        if has_c {
            for i in 0..n * k {
                ws.kap[i] = ws.rho[i] * ws.e[i];
            }
            tile_mm(ot, d, &ws.kap, k, vw.cin, d, n, d, |_| (0, k), true);
        }
        // t1[l, j] = rho_l . A_j (j <= l)
        transpose_into(&mut ws.vt, &ws.a, n, k, k);
        tile_mm(
            &mut ws.t1,
            n,
            &ws.rho,
            k,
            &ws.vt,
            n,
            n,
            n,
            |_| (0, k),
            false,
        );
        tile_mm(
            ot,
            d,
            &ws.t1,
            n,
            &vw.v[s0 * d..],
            d,
            n,
            d,
            |l| (0, l + 1),
            true,
        );
        let Ws { p, at, .. } = ws;
        vw.advance(p, at, s0, s1);
    }
}

/// The content read's share of the state gradient: dS_t[k] += b_t[k] q_t.
#[derive(Clone, Copy)]
pub struct ContentGrad<'a> {
    /// [B,H,T,d] read queries
    pub q: &'a [f32],
    /// [B,H,T,K] d(loss)/d(q_t . S_t[k])
    pub b: &'a [f32],
    /// [B,H,T,K] q_t . S_t[k] (the forward's `contract` of q)
    pub qs: &'a [f32],
}

/// The state gradient dS_t[k] = a_t[k] X_t (+ b_t[k] q_t), in factored form.
#[derive(Clone, Copy)]
pub struct StateGrad<'a> {
    /// [B,H,T,d] X: the gradient of the mix output
    pub x: &'a [f32],
    /// [B,H,T,K] a: the mix weights
    pub a: &'a [f32],
    /// [B,H,T,K] X_t . S_t[k] (`contract` of X)
    pub xs: &'a [f32],
    pub content: Option<ContentGrad<'a>>,
}

/// Per-position coefficients: rho = a/den, kap = b/den, g = dL/dden (0 where the clamp holds).
#[inline(always)]
fn coefficients(ws: &mut Ws, sg: &StateGrad, bh_t: usize, s0: usize, n: usize) {
    let k = ws.k;
    for l in 0..n {
        let row = (bh_t + s0 + l) * k;
        for s in 0..k {
            let i = l * k + s;
            let inv = ws.inv[i];
            let a = sg.a[row + s];
            ws.rho[i] = a * inv;
            let mut dot = a * sg.xs[row + s];
            ws.kap[i] = 0.0;
            if let Some(cg) = &sg.content {
                let b = cg.b[row + s];
                ws.kap[i] = b * inv;
                dot += b * cg.qs[row + s];
            }
            ws.g[i] = if ws.live[i] { -dot * inv } else { 0.0 };
        }
    }
}

simd_kernel! {
/// Backward of the state through the scan: given dS in factored form, adds dwl (alpha, E and the
/// running max with the reference's tie rules), dv and, with the content read, its share of dq
/// (sum_k b_t[k] S_t[k]). dwl: [B,H,K,T]; dv, dq: [B,H,T,d]
pub fn backward(
    dwl: &mut [f32],
    dv: &mut [f32],
    dq: Option<&mut [f32]>,
    sg: StateGrad,
    scan: Scan,
) {
    let SlotDims { t, k, d, .. } = scan.dm;
    let bhn = scan.dm.bh();
    let nc = scan.nc();
    let w = scan.chunk;

    // 1. per chunk: G_loc[c] = sum_{t in c} E_t dnum_t, GD_loc[c] = sum E_t dden_t
    let mut gc = vec![0.0f32; bhn * nc * k * d];
    let mut gd = vec![0.0f32; bhn * nc * k];
    gc.par_chunks_mut(k * d)
        .zip(gd.par_chunks_mut(k))
        .enumerate()
        .for_each_init(|| Ws::new(k, d), |ws, (i, (gcc, gdc))| simd_task(#[inline(always)] || {
            let (bh, c) = (i / nc, i % nc);
            let vw = scan.view(bh, c);
            for (s0, s1) in vw.tiles() {
                let n = s1 - s0;
                vw.weights(s0, s1, ws);
                coefficients(ws, &sg, bh * t, s0, n);
                // G += (E rho)^T X + (E kap)^T Y, GD += sum_l E g
                let xt = &sg.x[(bh * t + s0) * d..(bh * t + s1) * d];
                for i in 0..n * k {
                    ws.t3[i] = ws.e[i] * ws.rho[i];
                    gdc[i % k] += ws.e[i] * ws.g[i];
                }
                transpose_into(&mut ws.rhot, &ws.t3[..n * k], n, k, k);
                tile_mm(gcc, d, &ws.rhot, n, xt, d, k, d, |_| (0, n), true);
                if let Some(cg) = sg.content {
                    let yt = &cg.q[(bh * t + s0) * d..(bh * t + s1) * d];
                    for i in 0..n * k {
                        ws.t3[i] = ws.e[i] * ws.kap[i];
                    }
                    transpose_into(&mut ws.kapt, &ws.t3[..n * k], n, k, k);
                    tile_mm(gcc, d, &ws.kapt, n, yt, d, k, d, |_| (0, n), true);
                }
            }
        }));
    // 2. per (b,h), chunks last to first: the gradient of the carry leaving chunk c,
    //    G_{c+1} = G_loc[c+1] + e_{c+1} G_{c+2}; slot c of gc/gd then holds G_{c+1}
    gc.par_chunks_mut(nc * k * d)
        .zip(gd.par_chunks_mut(nc * k))
        .enumerate()
        .for_each(|(bh, (gcb, gdb))| simd_task(#[inline(always)] || {
            let mut next = vec![0.0f32; k * d];
            let mut nextd = vec![0.0f32; k];
            let mut tmp = vec![0.0f32; k * d];
            for c in (0..nc).rev() {
                let vw = scan.view(bh, c);
                let cur = &mut gcb[c * k * d..(c + 1) * k * d];
                let curd = &mut gdb[c * k..(c + 1) * k];
                // tmp = G_c = G_loc[c] + e_c next
                tmp.copy_from_slice(cur);
                for s in 0..k {
                    let e = vw.e_at(s, vw.c1 - 1);
                    if e != 0.0 {
                        axpy(&mut tmp[s * d..(s + 1) * d], e, &next[s * d..(s + 1) * d]);
                    }
                    let gd_c = curd[s] + e * nextd[s];
                    curd[s] = nextd[s];
                    nextd[s] = gd_c;
                }
                cur.copy_from_slice(&next);
                next.copy_from_slice(&tmp);
            }
        }));

    // 3. every chunk in reverse with its carry-out gradient: dv, dq, and per position the direct
    //    gradient of w (A dA) and of the running max (-A dA - E dE); per chunk sum E dE (the
    //    gradient of the carried max M_{c0-1})
    let mut dwd = vec![0.0f32; bhn * t * k];
    let mut dmt = vec![0.0f32; bhn * t * k];
    let mut dmc = vec![0.0f32; bhn * nc * k];
    {
        let dv_c = per_chunk(dv, t, w, d);
        let dq_c: Vec<Option<&mut [f32]>> = match dq {
            Some(q) => per_chunk(q, t, w, d).into_iter().map(Some).collect(),
            None => (0..bhn * nc).map(|_| None).collect(),
        };
        let dwd_c = per_chunk(&mut dwd, t, w, k);
        let dmt_c = per_chunk(&mut dmt, t, w, k);
        let dmc_c: Vec<&mut [f32]> = dmc.chunks_mut(k).collect();
        dv_c.into_par_iter()
            .zip(dq_c)
            .zip(dwd_c)
            .zip(dmt_c)
            .zip(dmc_c)
            .enumerate()
            .for_each_init(|| Ws::new(k, d), |ws, (i, ((((dvc, dqc), dwdc), dmtc), dmcc))| simd_task(#[inline(always)] || {
                let (bh, c) = (i / nc, i % nc);
                let vw = scan.view(bh, c);
                let gout = &gc[i * k * d..(i + 1) * k * d];
                let gdout = &gd[i * k..(i + 1) * k];
                backward_chunk(&vw, &sg, bh, gout, gdout, dvc, dqc, dwdc, dmtc, dmcc, ws);
            }));
    }

    // 4. the running max's gradient routed to w, per (b,h) and slot
    dwl.par_chunks_mut(k * t).enumerate().for_each(|(bh, gw)| simd_task(#[inline(always)] || {
        let vw0 = scan.view(bh, 0);
        let mut cm = vec![0.0f32; w.min(t)];
        let mut cidx = vec![0usize; w.min(t)];
        for s in 0..k {
            let ws_ = &vw0.w[s * t..(s + 1) * t];
            let rms = &vw0.rm[s * t..(s + 1) * t];
            let gws = &mut gw[s * t..(s + 1) * t];
            let mut carry_in = 0.0f64;
            for c in (0..nc).rev() {
                let c0 = c * w;
                let c1 = (c0 + w).min(t);
                let mp = if c0 > 0 { rms[c0 - 1] } else { f32::NEG_INFINITY };
                let mut cmax = f32::NEG_INFINITY;
                let mut ci = c0;
                for ti in c0..c1 {
                    if ws_[ti] >= cmax {
                        cmax = ws_[ti];
                        ci = ti;
                    }
                    cm[ti - c0] = cmax;
                    cidx[ti - c0] = ci;
                }
                let mut dm_prev = dmc[(bh * nc + c) * k + s] as f64;
                for ti in (c0..c1).rev() {
                    let mut dr = dmt[(bh * t + ti) * k + s] as f64;
                    if ti == c1 - 1 {
                        dr += carry_in;
                    }
                    let cmt = cm[ti - c0];
                    let to_cm = if mp > cmt {
                        dm_prev += dr;
                        0.0
                    } else if cmt > mp {
                        dr
                    } else {
                        dm_prev += 0.5 * dr;
                        0.5 * dr
                    };
                    let idx = cidx[ti - c0];
                    if to_cm != 0.0 && ws_[idx].is_finite() {
                        gws[idx] += to_cm as f32;
                    }
                }
                carry_in = dm_prev;
            }
            for ti in 0..t {
                if ws_[ti].is_finite() {
                    gws[ti] += dwd[(bh * t + ti) * k + s];
                }
            }
        }
    }));
}
}

/// Step 3 of `backward` for one chunk (rows of the outputs are the chunk's positions).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_chunk(
    vw: &View,
    sg: &StateGrad,
    bh: usize,
    gout: &[f32],
    gdout: &[f32],
    dv: &mut [f32],
    mut dq: Option<&mut [f32]>,
    dwd: &mut [f32],
    dmt: &mut [f32],
    dmc: &mut [f32],
    ws: &mut Ws,
) {
    let (t, k, d) = (vw.t, vw.k, vw.d);
    let base = bh * t;
    let x = &sg.x[base * d..][..t * d];
    let q = sg.content.map(|cg| &cg.q[base * d..][..t * d]);
    // tile-start prefixes, walking the chunk forward
    let tiles: Vec<(usize, usize)> = vw.tiles().collect();
    ws.pt.clear();
    ws.pt.resize(tiles.len() * k * d, 0.0);
    ws.p.iter_mut().for_each(|p| *p = 0.0);
    for (ti, &(s0, s1)) in tiles.iter().enumerate() {
        ws.pt[ti * k * d..(ti + 1) * k * d].copy_from_slice(&ws.p);
        let Ws { p, at, .. } = ws;
        vw.advance(p, at, s0, s1);
    }
    ws.r.copy_from_slice(gout);
    ws.rd.copy_from_slice(gdout);
    dmc.iter_mut().for_each(|x| *x = 0.0);
    let has_c = vw.c0 > 0;
    if has_c {
        transpose_into(&mut ws.ct, vw.cin, k, d, d);
    }
    for (tix, &(s0, s1)) in tiles.iter().enumerate().rev() {
        let n = s1 - s0;
        vw.weights(s0, s1, ws);
        coefficients(ws, sg, base, s0, n);
        let p = &ws.pt[tix * k * d..(tix + 1) * k * d];
        let xt = &x[s0 * d..s1 * d];
        let yt = q.map(|q| &q[s0 * d..s1 * d]);
        let vt = &vw.v[s0 * d..s1 * d];
        let lr = (s0 - vw.c0) * d..(s1 - vw.c0) * d;
        // transposes of the tile's operands: X^T, Y^T [d,L]; rho^T, kap^T, A^T [K,L]; R^T [d,K]
        transpose_into(&mut ws.xt, xt, n, d, d);
        transpose_into(&mut ws.rhot, &ws.rho, n, k, k);
        transpose_into(&mut ws.at, &ws.a, n, k, k);
        transpose_into(&mut ws.rt, &ws.r, k, d, d);
        if let Some(yt) = yt {
            transpose_into(&mut ws.yt, yt, n, d, d);
            transpose_into(&mut ws.kapt, &ws.kap, n, k, k);
        }
        // xv[j, l] = v_j . x_l, yv[j, l] = v_j . y_l (used for l >= j)
        tile_mm(&mut ws.xv, TILE, vt, d, &ws.xt, n, n, n, |_| (0, d), false);
        if yt.is_some() {
            tile_mm(&mut ws.yv, TILE, vt, d, &ws.yt, n, n, n, |_| (0, d), false);
        }
        // dE at every position, then the running max's share: with XC = X C^T, YC = Y C^T,
        // dE = rho XC + kap YC + g D_c (+ C . G_out + D_c Gd_out at the chunk's last position)
        if has_c {
            tile_mm(&mut ws.t1, k, xt, d, &ws.ct, k, n, k, |_| (0, d), false);
            if let Some(yt) = yt {
                tile_mm(&mut ws.t2, k, yt, d, &ws.ct, k, n, k, |_| (0, d), false);
            }
        }
        for l in 0..n {
            let last = s1 == vw.c1 && l + 1 == n;
            for s in 0..k {
                let i = l * k + s;
                let e = ws.e[i];
                if e == 0.0 {
                    dmt[(s0 - vw.c0 + l) * k + s] = 0.0;
                    continue;
                }
                let cs = &vw.cin[s * d..(s + 1) * d];
                let mut de = ws.rho[i] * ws.t1[i] + ws.g[i] * vw.dprev(s);
                if yt.is_some() {
                    de += ws.kap[i] * ws.t2[i];
                }
                if last {
                    de += dot32(cs, &gout[s * d..(s + 1) * d]) + vw.dprev(s) * gdout[s];
                }
                dmt[(s0 - vw.c0 + l) * k + s] = -e * de;
                dmc[s] += e * de;
            }
        }
        // dA_j = v_j . R + Rd + sum_{l>=j} (xv[j,l] rho_l + yv[j,l] kap_l + g_l), as
        // t3 = V R^T + xv rho + yv kap (causal rows) plus the suffix sums of g
        tile_mm(&mut ws.t3, k, vt, d, &ws.rt, k, n, k, |_| (0, d), false);
        tile_mm(
            &mut ws.t3,
            k,
            &ws.xv,
            TILE,
            &ws.rho,
            k,
            n,
            k,
            |j| (j, n),
            true,
        );
        if yt.is_some() {
            tile_mm(
                &mut ws.t3,
                k,
                &ws.yv,
                TILE,
                &ws.kap,
                k,
                n,
                k,
                |j| (j, n),
                true,
            );
        }
        ws.acc.copy_from_slice(&ws.rd);
        for j in (0..n).rev() {
            let row = (s0 - vw.c0 + j) * k;
            for s in 0..k {
                let i = j * k + s;
                ws.acc[s] += ws.g[i];
                let da = ws.a[i] * (ws.t3[i] + ws.acc[s]);
                dwd[row + s] = da;
                dmt[row + s] -= da;
            }
        }
        // dv_j += A_j R + sum_{l>=j} (A_j . rho_l) X_l + (A_j . kap_l) Y_l
        let dvt = &mut dv[lr.clone()];
        tile_mm(dvt, d, &ws.a, k, &ws.r, d, n, d, |_| (0, k), true);
        tile_mm(
            &mut ws.t4,
            TILE,
            &ws.a,
            k,
            &ws.rhot,
            n,
            n,
            n,
            |_| (0, k),
            false,
        );
        tile_mm(dvt, d, &ws.t4, TILE, xt, d, n, d, |j| (j, n), true);
        if let Some(yt) = yt {
            tile_mm(
                &mut ws.t4,
                TILE,
                &ws.a,
                k,
                &ws.kapt,
                n,
                n,
                n,
                |_| (0, k),
                false,
            );
            tile_mm(dvt, d, &ws.t4, TILE, yt, d, n, d, |j| (j, n), true);
        }
        // the content read's dq_l = sum_k kap_l[k] (E_l[k] C[k] + P[k]) + sum_{j<=l} (kap_l . A_j) v_j
        if let (Some(dqc), true) = (dq.as_deref_mut(), yt.is_some()) {
            let dqt = &mut dqc[lr.clone()];
            tile_mm(dqt, d, &ws.kap, k, p, d, n, d, |_| (0, k), true);
            if has_c {
                for i in 0..n * k {
                    ws.t1[i] = ws.kap[i] * ws.e[i];
                }
                tile_mm(dqt, d, &ws.t1, k, vw.cin, d, n, d, |_| (0, k), true);
            }
            tile_mm(
                &mut ws.t4,
                TILE,
                &ws.kap,
                k,
                &ws.at,
                n,
                n,
                n,
                |_| (0, k),
                false,
            );
            tile_mm(dqt, d, &ws.t4, TILE, vt, d, n, d, |l| (0, l + 1), true);
        }
        // the suffix carry moves before this tile: R += rho^T X + kap^T Y, Rd += sum_l g_l
        tile_mm(&mut ws.r, d, &ws.rhot, n, xt, d, k, d, |_| (0, n), true);
        if let Some(yt) = yt {
            tile_mm(&mut ws.r, d, &ws.kapt, n, yt, d, k, d, |_| (0, n), true);
        }
        ws.rd.copy_from_slice(&ws.acc);
    }
}

#[cfg(test)]
mod tests {
    //! The chunk form against the serial scan of `slot_ops.rs` (which the fixtures hold to the
    //! reference): forward products and every gradient, over chunk sizes that put 1, several
    //! or partial tiles in a chunk, one chunk longer than T, exact ties and left padding.
    use super::*;
    use crate::backend::cpu::slot_ops as serial;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    struct Case {
        dm: SlotDims,
        chunk: usize,
        /// round the logits to multiples of 0.5 (exact ties in the running max)
        ties: bool,
        /// masked (-inf) positions at the start of batch row 1 (left padding)
        pad: usize,
    }

    fn randn(r: &mut ChaCha8Rng, n: usize, sc: f32) -> Vec<f32> {
        (0..n).map(|_| (r.gen::<f32>() * 2.0 - 1.0) * sc).collect()
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let mx = b.iter().fold(1e-3f64, |m, &x| m.max((x as f64).abs()));
        let err = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
        err / mx
    }

    fn run(case: &Case, seed: u64) -> Vec<(&'static str, f64)> {
        let dm = case.dm;
        let SlotDims { b, h, t, k, d } = dm;
        let bh = b * h;
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut wl = randn(&mut r, bh * k * t, 2.0);
        for (i, w) in wl.iter_mut().enumerate() {
            let ti = i % t;
            *w += 0.05 * ti as f32; // a rising trend, as ALiBi gives
            if case.ties {
                *w = (*w * 2.0).round() / 2.0;
            }
            let bi = i / (h * k * t);
            if bi == 1 && ti < case.pad {
                *w = f32::NEG_INFINITY;
            }
        }
        let v = randn(&mut r, bh * t * d, 1.0);
        let q = randn(&mut r, bh * t * d, 1.0);
        let x = randn(&mut r, bh * t * d, 1.0);
        let mut a = randn(&mut r, bh * t * k, 1.0);
        a.iter_mut().for_each(|z| *z = z.abs());
        let bc = randn(&mut r, bh * t * k, 1.0);

        // serial oracle
        let mut state = vec![0.0; bh * t * k * d];
        let (mut den_s, mut rm_s) = (vec![0.0; bh * k * t], vec![0.0; bh * k * t]);
        serial::slot_scan_forward(&mut state, &mut den_s, &mut rm_s, &wl, &v, case.chunk, dm);
        let proj = |x: &[f32]| -> Vec<f32> {
            let mut y = vec![0.0; bh * t * k];
            for row in 0..bh * t {
                for s in 0..k {
                    let st = &state[(row * k + s) * d..][..d];
                    y[row * k + s] = st
                        .iter()
                        .zip(&x[row * d..(row + 1) * d])
                        .map(|(&p, &q)| p as f64 * q as f64)
                        .sum::<f64>() as f32;
                }
            }
            y
        };
        let qs_ref = proj(&q);
        let xs_ref = proj(&x);
        let mut o_ref = vec![0.0; bh * t * d];
        serial::slot_mix_forward(&mut o_ref, &a, &state, dm);
        let mut dq_ref = vec![0.0; bh * t * d];
        serial::slot_mix_forward(&mut dq_ref, &bc, &state, dm);
        let mut dstate = vec![0.0; state.len()];
        for row in 0..bh * t {
            for s in 0..k {
                for j in 0..d {
                    dstate[(row * k + s) * d + j] =
                        a[row * k + s] * x[row * d + j] + bc[row * k + s] * q[row * d + j];
                }
            }
        }
        let (mut dwl_ref, mut dv_ref) = (vec![0.0; wl.len()], vec![0.0; v.len()]);
        serial::slot_scan_backward(
            &mut dwl_ref,
            &mut dv_ref,
            &dstate,
            &state,
            &den_s,
            &rm_s,
            &wl,
            &v,
            case.chunk,
            dm,
        );

        // chunk form
        let (mut den, mut rm) = (vec![0.0; bh * k * t], vec![0.0; bh * k * t]);
        let (mut al, mut eg) = (vec![0.0; bh * k * t], vec![0.0; bh * k * t]);
        stats_forward(&mut rm, &mut den, &mut al, &mut eg, &wl, case.chunk, t, k);
        let nc = num_chunks(t, case.chunk);
        let mut carry = vec![0.0; bh * nc * k * d];
        let scan0 = Scan {
            dm,
            chunk: case.chunk,
            wl: &wl,
            rmax: &rm,
            den: &den,
            alpha: &al,
            egate: &eg,
            v: &v,
            carry: &[],
        };
        carries_forward(&mut carry, scan0);
        let scan = Scan {
            carry: &carry,
            ..scan0
        };
        let (mut qs, mut xs) = (vec![0.0; bh * t * k], vec![0.0; bh * t * k]);
        contract(&mut qs, &q, scan);
        contract(&mut xs, &x, scan);
        let mut o = vec![0.0; bh * t * d];
        mix(&mut o, &a, scan);
        let (mut dwl, mut dv, mut dq) =
            (vec![0.0; wl.len()], vec![0.0; v.len()], vec![0.0; q.len()]);
        let sg = StateGrad {
            x: &x,
            a: &a,
            xs: &xs,
            content: Some(ContentGrad {
                q: &q,
                b: &bc,
                qs: &qs,
            }),
        };
        backward(&mut dwl, &mut dv, Some(&mut dq), sg, scan);
        assert_eq!(den, den_s, "den: the serial scan's arithmetic");
        assert_eq!(
            rm.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            rm_s.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        vec![
            ("q.S", rel(&qs, &qs_ref)),
            ("dO.S", rel(&xs, &xs_ref)),
            ("mix", rel(&o, &o_ref)),
            ("dq", rel(&dq, &dq_ref)),
            ("dv", rel(&dv, &dv_ref)),
            ("dwl", rel(&dwl, &dwl_ref)),
        ]
    }

    fn cases() -> Vec<(Case, &'static str)> {
        let dm = |t, k, d| SlotDims {
            b: 2,
            h: 2,
            t,
            k,
            d,
        };
        vec![
            (
                Case {
                    dm: dm(37, 4, 8),
                    chunk: 3,
                    ties: false,
                    pad: 0,
                },
                "W=3",
            ),
            (
                Case {
                    dm: dm(37, 4, 8),
                    chunk: 1,
                    ties: false,
                    pad: 0,
                },
                "W=1",
            ),
            (
                Case {
                    dm: dm(53, 16, 32),
                    chunk: 16,
                    ties: false,
                    pad: 0,
                },
                "W=16",
            ),
            (
                Case {
                    dm: dm(100, 4, 8),
                    chunk: TILE,
                    ties: false,
                    pad: 0,
                },
                "W=TILE",
            ),
            (
                Case {
                    dm: dm(150, 8, 16),
                    chunk: 45,
                    ties: false,
                    pad: 0,
                },
                "W=45 (partial tile)",
            ),
            (
                Case {
                    dm: dm(150, 8, 16),
                    chunk: 2 * TILE,
                    ties: false,
                    pad: 0,
                },
                "W=2 tiles",
            ),
            (
                Case {
                    dm: dm(53, 4, 8),
                    chunk: 100,
                    ties: false,
                    pad: 0,
                },
                "W>T",
            ),
            (
                Case {
                    dm: dm(53, 4, 8),
                    chunk: 4,
                    ties: true,
                    pad: 0,
                },
                "ties W=4",
            ),
            (
                Case {
                    dm: dm(90, 4, 8),
                    chunk: 40,
                    ties: true,
                    pad: 0,
                },
                "ties W=40",
            ),
            (
                Case {
                    dm: dm(53, 4, 8),
                    chunk: 5,
                    ties: false,
                    pad: 12,
                },
                "left pad W=5",
            ),
            (
                Case {
                    dm: dm(80, 4, 8),
                    chunk: 40,
                    ties: false,
                    pad: 45,
                },
                "left pad past a chunk",
            ),
        ]
    }

    #[test]
    fn chunk_form_matches_the_serial_scan() {
        for (i, (case, name)) in cases().iter().enumerate() {
            for (what, err) in run(case, 7 + i as u64) {
                eprintln!("{name:>22} {what:>5} {err:.1e}");
                assert!(
                    err < 2e-6,
                    "{name}: {what} off by {err:.2e} (relative to its max)"
                );
            }
        }
    }

    /// The comparison can fail: the serial scan with another chunk size is a different model.
    #[test]
    fn the_comparison_sees_a_wrong_chunk_size() {
        let case = Case {
            dm: SlotDims {
                b: 2,
                h: 2,
                t: 37,
                k: 4,
                d: 8,
            },
            chunk: 3,
            ties: false,
            pad: 0,
        };
        let dm = case.dm;
        let SlotDims { b, h, t, k, d } = dm;
        let bh = b * h;
        let mut r = ChaCha8Rng::seed_from_u64(3);
        let wl = randn(&mut r, bh * k * t, 2.0);
        let v = randn(&mut r, bh * t * d, 1.0);
        let a = vec![0.25f32; bh * t * k];
        let mut state = vec![0.0; bh * t * k * d];
        let (mut den_s, mut rm_s) = (vec![0.0; bh * k * t], vec![0.0; bh * k * t]);
        serial::slot_scan_forward(&mut state, &mut den_s, &mut rm_s, &wl, &v, 4, dm);
        let mut o_ref = vec![0.0; bh * t * d];
        serial::slot_mix_forward(&mut o_ref, &a, &state, dm);
        let (mut den, mut rm) = (vec![0.0; bh * k * t], vec![0.0; bh * k * t]);
        let (mut al, mut eg) = (vec![0.0; bh * k * t], vec![0.0; bh * k * t]);
        stats_forward(&mut rm, &mut den, &mut al, &mut eg, &wl, 3, t, k);
        let mut carry = vec![0.0; bh * num_chunks(t, 3) * k * d];
        let scan0 = Scan {
            dm,
            chunk: 3,
            wl: &wl,
            rmax: &rm,
            den: &den,
            alpha: &al,
            egate: &eg,
            v: &v,
            carry: &[],
        };
        carries_forward(&mut carry, scan0);
        let mut o = vec![0.0; bh * t * d];
        mix(
            &mut o,
            &a,
            Scan {
                carry: &carry,
                ..scan0
            },
        );
        assert!(rel(&o, &o_ref) > 1e-3);
    }
}
