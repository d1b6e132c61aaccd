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

/// Largest element of `x` (NaN elements are skipped, as `f32::max` does); -inf when empty.
pub fn row_max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { row_max_avx2(x) };
    }
    row_max_body(x)
}

/// p = exp(x - mx) elementwise; returns the sum of p in f64 (lanes summed in a fixed order).
pub fn exp_sub_sum(p: &mut [f32], x: &[f32], mx: f32) -> f64 {
    assert_eq!(p.len(), x.len(), "exp_sub_sum: shape");
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: as above.
        return unsafe { exp_sub_sum_avx2(p, x, mx) };
    }
    exp_sub_sum_body(p, x, mx)
}

/// p *= s elementwise.
pub fn scale_in_place(p: &mut [f32], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: as above.
        return unsafe { scale_avx2(p, s) };
    }
    p.iter_mut().for_each(|q| *q *= s);
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_max_avx2(x: &[f32]) -> f32 {
    row_max_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(p: &mut [f32], x: &[f32], mx: f32) -> f64 {
    exp_sub_sum_body(p, x, mx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_avx2(p: &mut [f32], s: f32) {
    p.iter_mut().for_each(|q| *q *= s);
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
