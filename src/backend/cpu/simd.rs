//! Vectorisable row kernels of the cross-entropy: the row maximum, `exp(x - max)` with its sum,
//! and the row scaling.
//!
//! The loops are written so that LLVM vectorises them (fixed lane counts, no calls). On x86-64
//! with AVX2 + FMA they run in a build compiled for those features (chosen at run time); elsewhere
//! the portable build runs. Both builds compute the same bits: only IEEE `+ - * /`, `floor` and
//! bit casts are used (no fused multiply-add), and the sums run in a fixed lane order.

/// f32 lanes of the vector loops.
const LANES: usize = 8;

/// `exp(x)` in f32 (Cephes `expf`: range reduction by ln 2 in two parts, degree-5 polynomial;
/// within 2 ulp of the exact value on [-87.3, 88.7]). Below -87.3 the result is the smallest
/// normal value's neighbourhood instead of a subnormal or 0 (it never matters next to the row
/// maximum's `exp(0) = 1`); NaN propagates.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // comparisons are false for NaN, so NaN passes through to the result
    let x = if x < -87.336_54 { -87.336_54 } else { x };
    let x = if x > 88.376_26 { 88.376_26 } else { x };
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let poly = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = poly * r2 + r + 1.0;
    // 2^n for n in [-126, 127], built from the bits of n + 1.5*2^23 (whose low mantissa bits
    // hold n in two's complement): unlike `as i32`, this vectorises. For NaN, y is NaN anyway.
    let k = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(k.wrapping_add(127) << 23);
    y * scale
}

simd_kernel! {
    /// Largest element of `x` (NaN elements are skipped, as `f32::max` does); -inf when empty.
    pub fn row_max(x: &[f32]) -> f32 {
        row_max_body(x)
    }
}

simd_kernel! {
    /// p = exp(x - mx) elementwise; returns the sum of p in f64 (lanes summed in a fixed order).
    pub fn exp_sub_sum(p: &mut [f32], x: &[f32], mx: f32) -> f64 {
        assert_eq!(p.len(), x.len(), "exp_sub_sum: shape");
        exp_sub_sum_body(p, x, mx)
    }
}

simd_kernel! {
    /// p *= s elementwise.
    pub fn scale_in_place(p: &mut [f32], s: f32) {
        p.iter_mut().for_each(|q| *q *= s);
    }
}

/// `1 + erf(a)` in f32, from N. Juffa's `erff` (two minimax polynomials, the outer one through
/// `exp`; about 1 ulp with hardware FMA). For a < -0.93 it is `exp(p(|a|))` directly, so the
/// GELU of large negative inputs keeps its relative accuracy instead of cancelling to 0. Both
/// branches are computed and one selected, so it vectorises.
#[inline(always)]
pub fn one_plus_erf(a: f32) -> f32 {
    let t = a.abs();
    let s = a * a;
    // |a| > 0.927734375: erf(|a|) = 1 - exp(p(t))
    let mut r = (-1.728_534_7e-5f32).mul_add(t, 3.831_971_3e-4);
    let u = (-3.883_964_4e-3f32).mul_add(t, 2.425_462_2e-2);
    r = r.mul_add(s, u);
    r = r.mul_add(t, -1.067_778_8e-1);
    r = r.mul_add(t, -0.634_846_7);
    r = r.mul_add(t, -1.287_175_1e-1);
    r = r.mul_add(t, -t);
    let e = exp_f32(r);
    let outer = if a > 0.0 { 2.0 - e } else { e };
    // |a| <= 0.927734375: odd polynomial
    let mut q = -5.967_617e-4f32;
    q = q.mul_add(s, 4.991_194_2e-3);
    q = q.mul_add(s, -2.676_813_5e-2);
    q = q.mul_add(s, 1.128_199_3e-1);
    q = q.mul_add(s, -3.761_253_4e-1);
    q = q.mul_add(s, 1.283_791_7e-1);
    let inner = 1.0 + q.mul_add(a, a);
    if t > 0.927_734_4 {
        outer
    } else {
        inner
    }
}

/// f32 or f64 elements widened to f64 (for [`dot`]).
pub trait AsF64: Copy {
    fn as_f64(self) -> f64;
}
impl AsF64 for f32 {
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
}
impl AsF64 for f64 {
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
}

/// sum_j a[j] * b[j] in f64 over the shorter length, in 8 interleaved partial sums (element j
/// to lane j % 8) added pairwise at the end. A fixed order, so deterministic, and one that
/// vectorises: a plain running sum is a serial chain of dependent f64 adds.
#[inline(always)]
pub fn dot<A: AsF64, B: AsF64>(a: &[A], b: &[B]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l].as_f64() * y[l].as_f64();
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x.as_f64() * y.as_f64();
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// sum_j a[j] * b[j] in f32, with the lane layout of `dot` (8 interleaved partial sums added
/// pairwise): the tile products of the chunked slot scan, where f32 holds the fixtures' tolerance.
#[inline(always)]
pub fn dot32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// y += a * x elementwise (vectorises).
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

simd_kernel! {
    /// Exact GELU in f32 (as the CUDA kernel): out = 0.5*x*(1 + erf(x/sqrt(2))).
    pub fn gelu_forward_chunk(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = 0.5 * x * one_plus_erf(x * INV_SQRT_2);
        }
    }
}

simd_kernel! {
    /// dinp += dout * (Phi(x) + x*phi(x)) in f32 (as the CUDA kernel).
    pub fn gelu_backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        for ((dx, &x), &dy) in dinp.iter_mut().zip(inp).zip(dout) {
            let cdf = 0.5 * one_plus_erf(x * INV_SQRT_2);
            let pdf = INV_SQRT_2PI * exp_f32(-0.5 * x * x);
            *dx += dy * (cdf + x * pdf);
        }
    }
}

#[inline(always)]
fn row_max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn exp_sub_sum_body(p: &mut [f32], x: &[f32], mx: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let n = x.len() / LANES * LANES;
    for (pc, xc) in p[..n]
        .chunks_exact_mut(LANES)
        .zip(x[..n].chunks_exact(LANES))
    {
        for l in 0..LANES {
            let e = exp_f32(xc[l] - mx);
            pc[l] = e;
            acc[l] += e as f64;
        }
    }
    for (l, (q, &v)) in p[n..].iter_mut().zip(&x[n..]).enumerate() {
        let e = exp_f32(v - mx);
        *q = e;
        acc[l] += e as f64;
    }
    // fixed pairwise order over the lanes
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) >= 0.0 && exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn one_plus_erf_and_gelu_are_accurate() {
        // against f64: relative error 1e-6 for a >= -1.4; the exp branch's polynomial is an erf
        // fit, so towards a = -3.8 (1 + erf = 1e-7) it is 6.5e-5 relative, about what PyTorch's
        // f32 `1 + erff(a)` loses to cancellation there; absolute error 1e-9 beyond
        let (mut worst_rel, mut worst_near, mut worst_abs) = (0f64, 0f64, 0f64);
        let mut x = -9.0f32;
        while x < 6.0 {
            let want = libm::erfc(-(x as f64));
            let err = (one_plus_erf(x) as f64 - want).abs();
            if x >= -1.4 {
                worst_near = worst_near.max(err / want);
            } else if x >= -3.8 {
                worst_rel = worst_rel.max(err / want);
            } else {
                worst_abs = worst_abs.max(err);
            }
            x += 0.000_37;
        }
        assert!(
            worst_near < 1e-6,
            "worst relative error {worst_near} on [-1.4, 6)"
        );
        assert!(
            worst_rel < 1e-4,
            "worst relative error {worst_rel} on [-3.8, -1.4)"
        );
        assert!(worst_abs < 1e-9, "worst absolute error {worst_abs}");
        assert_eq!(one_plus_erf(0.0), 1.0);
        assert_eq!(one_plus_erf(f32::INFINITY), 2.0);
        assert!((0.0..1e-37).contains(&one_plus_erf(f32::NEG_INFINITY)));
        assert!(one_plus_erf(f32::NAN).is_nan());
        let xs: Vec<f32> = (0..1999).map(|i| (i as f32 - 1000.0) * 0.009).collect();
        let (mut out, mut dx) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        gelu_forward_chunk(&mut out, &xs);
        gelu_backward_chunk(&mut dx, &xs, &vec![1.0; xs.len()]);
        for ((o, d), &x) in out.iter().zip(&dx).zip(&xs) {
            let x64 = x as f64;
            let cdf = 0.5 * libm::erfc(-x64 / 2f64.sqrt());
            let gelu = x64 * cdf;
            let dgelu = cdf + x64 * (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (eo, ed) = ((*o as f64 - gelu).abs(), (*d as f64 - dgelu).abs());
            assert!(eo <= 1e-4 * gelu.abs() + 1e-8, "gelu({x}) = {o} vs {gelu}");
            assert!(ed <= 1e-6, "gelu'({x}) = {d} vs {dgelu}");
        }
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        for n in [0usize, 1, 7, 8, 9, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y).sum();
            assert!(
                (dot(&a, &b) - plain).abs() <= 1e-12 * (1.0 + plain.abs()),
                "n={n}"
            );
            assert_eq!(dot(&a, &b[..n.saturating_sub(1)]).to_bits(), {
                let m = n.saturating_sub(1);
                dot(&a[..m], &b[..m]).to_bits()
            });
        }
    }

    #[test]
    fn vector_and_portable_builds_agree() {
        let x: Vec<f32> = (0..1037)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.05)
            .collect();
        let mx = row_max_body(&x);
        assert_eq!(mx, x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
        assert_eq!(row_max(&x), mx);
        let (mut p1, mut p2) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        let s1 = exp_sub_sum(&mut p1, &x, mx);
        let s2 = exp_sub_sum_body(&mut p2, &x, mx);
        assert_eq!(s1.to_bits(), s2.to_bits());
        assert_eq!(p1, p2);
        let exact: f64 = x.iter().map(|&v| ((v - mx) as f64).exp()).sum();
        assert!((s1 - exact).abs() / exact < 1e-6, "{s1} vs {exact}");
        // NaN in a row: skipped by the max, propagated by the sum
        let mut y = x.clone();
        y[5] = f32::NAN;
        assert_eq!(row_max(&y), mx);
        assert!(exp_sub_sum(&mut p1, &y, mx).is_nan());
    }
}

/// Sum in f64 of `f(x_j)` over a row, in LANES running sums added in a fixed order at the end.
#[inline(always)]
fn lane_sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let mut s = 0f64;
    for a in acc {
        s += a;
    }
    for &v in rest {
        s += f(v);
    }
    s
}

simd_kernel! {
    /// One LayerNorm row in f64: mu = mean(x), rs = 1/sqrt(var(x) + eps),
    /// o = (x - mu) * rs * w + b; returns (mu, rs). o, x, w, b: [C]
    pub fn layernorm_row_forward(o: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f64) -> (f64, f64) {
        let c = x.len();
        assert!(o.len() == c && w.len() == c && b.len() == c, "layernorm_row_forward: shape");
        let mu = lane_sum_f64(x, |v| v as f64) / c as f64;
        let var = lane_sum_f64(x, |v| {
            let d = v as f64 - mu;
            d * d
        }) / c as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            o[j] = ((x[j] as f64 - mu) * rs * w[j] as f64 + b[j] as f64) as f32;
        }
        (mu, rs)
    }
}

simd_kernel! {
    /// dx += rs * (dn - mean(dn) - norm * mean(dn * norm)) for one LayerNorm row, in f64, with
    /// norm = (x - mu) * rs and dn = w * dy. dx, dy, x, w: [C]
    pub fn layernorm_row_backward(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], mu: f64, rs: f64) {
        let c = x.len();
        assert!(dx.len() == c && dy.len() == c && w.len() == c, "layernorm_row_backward: shape");
        let mut a1 = [0f64; LANES];
        let mut a2 = [0f64; LANES];
        let n8 = c / LANES * LANES;
        for j0 in (0..n8).step_by(LANES) {
            for l in 0..LANES {
                let j = j0 + l;
                let norm = (x[j] as f64 - mu) * rs;
                let dn = w[j] as f64 * dy[j] as f64;
                a1[l] += dn;
                a2[l] += dn * norm;
            }
        }
        let (mut s1, mut s2) = (0f64, 0f64);
        for l in 0..LANES {
            s1 += a1[l];
            s2 += a2[l];
        }
        for j in n8..c {
            let norm = (x[j] as f64 - mu) * rs;
            let dn = w[j] as f64 * dy[j] as f64;
            s1 += dn;
            s2 += dn * norm;
        }
        let (m1, m2) = (s1 / c as f64, s2 / c as f64);
        for j in 0..c {
            let norm = (x[j] as f64 - mu) * rs;
            let dn = w[j] as f64 * dy[j] as f64;
            dx[j] += (rs * (dn - m1 - norm * m2)) as f32;
        }
    }
}
