//! The slotspace refine's element-wise stages around its linear attention, one launch each way
//! (kernels in cuda/refine.cu; CPU twins: the chains of `rope_forward`, `mask_rows_forward` and
//! `phi_forward` (and their backwards) in `backend::cpu::slot_ops`, as `AsaLayer::slotspace_forward`
//! runs them).
//!
//! Forward (`refine_qkv_forward`): the fused slot_q/k/v GEMM's output qkv [N,T,3M] (rows of
//! q | k | v, N = B*H sequences) becomes
//! - qs, ks [N,T,M]: q, k with RoPE (when the slotspace has it), the inputs of phi;
//! - qf = phi(qs), kf = phi(ks), and vs = v [N,T,M]: the linear attention's operands;
//!
//! with the padded positions (`valid`) zeroed where the reference zeroes them: the online variant
//! masks qs, ks before phi, the baseline masks qf, kf after it, and both mask vs.
//!
//! Backward (`refine_qkv_backward`): the linear attention's dqf, dkf, dvs become the fused GEMM's
//! output gradient d3 [N,T,3M] (stored, with its bf16 twin): phi', then RoPE transposed; padded
//! positions get 0 in both variants.
//!
//! Both replace five launches each (split_heads3 or merge_heads3, two RoPEs, two phis, and the
//! masks) by one, over the traversal of the RoPE kernels (`rope_walk`: a thread per pair of
//! every row of q, k and v).

use cudarc::driver::LaunchConfig;

use super::{i32_of, kern, Device, Dv};
use crate::error::Result;

/// The slotspace's RoPE tables, cos and sin [T,M] (`None`: no RoPE).
pub type RopeTables = Option<(Dv<f32>, Dv<f32>)>;

/// Shapes and the padding of one call: n = B*H sequences of t positions of width m (even),
/// h heads; valid: [B,T] or null (no padding); online: the online variant's mask order.
#[derive(Clone, Copy, Debug)]
pub struct QkvShape {
    pub n: usize,
    pub t: usize,
    pub m: usize,
    pub h: usize,
    pub valid: Dv<u8>,
    pub online: bool,
}

impl QkvShape {
    fn check(&self, rope: RopeTables) {
        assert!(
            self.m.is_multiple_of(2),
            "refine qkv: odd slotspace_dim {}",
            self.m
        );
        assert!(
            self.h > 0 && self.n.is_multiple_of(self.h),
            "refine qkv: {} sequences for {} heads",
            self.n,
            self.h
        );
        if !self.valid.is_null() {
            assert_eq!(
                self.valid.len,
                self.n / self.h * self.t,
                "refine qkv: valid shape"
            );
        }
        if let Some((cos, sin)) = rope {
            assert!(
                cos.len >= self.t * self.m && sin.len >= self.t * self.m,
                "refine qkv: RoPE table shape"
            );
        }
    }

    /// The kernels' trailing sizes (H, N, T, M).
    fn ints(&self) -> Result<(i32, i32, i32, i32)> {
        Ok((
            i32_of("H", self.h)?,
            i32_of("N", self.n)?,
            i32_of("T", self.t)?,
            i32_of("M", self.m)?,
        ))
    }
}

/// The launch shape of the pair traversal (`rope_walk` in cuda/common.cuh): 256 threads over
/// (position, pair), 256 / (D/2) positions a block, grid x over position groups and y over the
/// N sequences (both grid-stride past `most` blocks). Also the RoPE kernels' shape.
pub fn pair_cfg(most: u32, n: usize, t: usize, d: usize) -> LaunchConfig {
    let half = d / 2;
    let rows = if half >= 256 { 1 } else { 256 / half.max(1) };
    let most = most.max(1) as usize;
    let empty = n * t * half == 0;
    LaunchConfig {
        grid_dim: (
            if empty {
                0
            } else {
                t.div_ceil(rows).clamp(1, most) as u32
            },
            n.clamp(1, most.min(65535)) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The (cos, sin) kernel arguments (null without RoPE).
fn rope_args(rope: RopeTables) -> (Dv<f32>, Dv<f32>) {
    rope.unwrap_or((Dv::null(), Dv::null()))
}

/// qkv [N,T,3M] -> qs, ks, qf, kf, vs [N,T,M] (all stored).
pub fn qkv_forward<L: Device + ?Sized>(
    dev: &L,
    [qs, ks, qf, kf, vs]: [Dv<f32>; 5],
    qkv: Dv<f32>,
    rope: RopeTables,
    s: QkvShape,
) -> Result<()> {
    s.check(rope);
    let len = s.n * s.t * s.m;
    assert_eq!(qkv.len, 3 * len, "refine qkv forward: qkv shape");
    for (x, what) in [(qs, "qs"), (ks, "ks"), (qf, "qf"), (kf, "kf"), (vs, "vs")] {
        assert_eq!(x.len, len, "refine qkv forward: {what} shape");
    }
    let (cos, sin) = rope_args(rope);
    let (h, n, t, m) = s.ints()?;
    let cfg = pair_cfg(dev.max_grid(), s.n, s.t, s.m);
    let online = s.online as i32;
    kern::refine_qkv_forward(
        qs, ks, qf, kf, vs, qkv, cos, sin, s.valid, online, h, n, t, m,
    )
    .on(dev, cfg)
}

/// dqf, dkf, dvs [N,T,M] and the forward's qs, ks -> d3 [N,T,3M] (stored); d3_16: null, or the
/// bf16 twin of d3.
pub fn qkv_backward<L: Device + ?Sized>(
    dev: &L,
    (d3, d3_16): (Dv<f32>, Dv<u16>),
    [dqf, dkf, dvs]: [Dv<f32>; 3],
    [qs, ks]: [Dv<f32>; 2],
    rope: RopeTables,
    s: QkvShape,
) -> Result<()> {
    s.check(rope);
    let len = s.n * s.t * s.m;
    assert_eq!(d3.len, 3 * len, "refine qkv backward: d3 shape");
    assert!(
        d3_16.is_null() || d3_16.len == d3.len,
        "refine qkv backward: d3_16 shape"
    );
    for (x, what) in [
        (dqf, "dqf"),
        (dkf, "dkf"),
        (dvs, "dvs"),
        (qs, "qs"),
        (ks, "ks"),
    ] {
        assert_eq!(x.len, len, "refine qkv backward: {what} shape");
    }
    let (cos, sin) = rope_args(rope);
    let (h, n, t, m) = s.ints()?;
    let cfg = pair_cfg(dev.max_grid(), s.n, s.t, s.m);
    kern::refine_qkv_backward(
        d3, d3_16, dqf, dkf, dvs, qs, ks, cos, sin, s.valid, h, n, t, m,
    )
    .on(dev, cfg)
}
