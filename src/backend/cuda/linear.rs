//! Launch sequences of the slotspace refine's causal linear attention (kernels `linear_attn_*`
//! in cuda/linear.cu; CPU twins `linear_attn_forward` / `linear_attn_backward` in
//! `backend::cpu::slot_ops`).
//!
//! Two algorithms ([`LinearAlgo`]), both cutting time into chunks that start from carries (the
//! state before the chunk in the forward, the gradient sums after it in the backward), built by
//! a parallel pass of per-chunk sums and a short pass over the chunks:
//! - **tiled** (the default): one block per (row, chunk) stages the chunk in shared memory and
//!   writes every term as a small matrix product (`linear_attn_*_tiled*`): in f64 on CUDA
//!   cores for `Precision::F32` (exact), or with bf16 operands and f32 accumulation on tensor
//!   cores (`*_bf16`, [`LinearPlan::tensor_cores`]) for `Precision::Bf16`;
//! - **walk** (the fallback when the tiles do not fit in shared memory): one warp per state
//!   row or column walks the chunk's positions; with one chunk (chunk >= T) no carries are
//!   built: a serial walk over T.
//!
//! Written against [`Device`], so the same sequences run on a device and, in the tests,
//! in the SIMT emulator. The launchers `Ops::linear_attn_forward` / `linear_attn_backward`
//! take the workspace from the device's scratch and call them.

use super::{i32_of, kern, AsDv, Device, Dv};
use crate::error::{AsaError, Result};

/// Environment override of the algorithm: `tiled`, `tiled:<chunk>`, `walk` or `walk:<chunk>`
/// (for tuning and A/B timings on a device).
pub const LINEAR_ENV: &str = "ASA_CUDA_LINEAR";

/// Threads of a block of the tiled kernels (`LT_THREADS` in cuda/linear.cu).
const TILED_THREADS: u32 = 256;

/// How the kernels cut time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearAlgo {
    /// One warp per state row or column walks chunks of `chunk` positions (chunk >= T: one
    /// serial walk over T).
    Walk { chunk: usize },
    /// One block per chunk of `chunk` positions: shared-memory tiles and matrix products.
    Tiled { chunk: usize },
}

impl LinearAlgo {
    /// `tiled`, `tiled:<chunk>`, `walk`, `walk:<chunk>` for sequences of `t` positions of `m`
    /// features on a device with `smem` bytes of shared memory per block; None when unparsable.
    pub fn parse(s: &str, t: usize, m: usize, smem: usize, tc: bool) -> Option<LinearAlgo> {
        let (name, chunk) = match s.trim().split_once(':') {
            Some((a, c)) => (a, Some(c.trim().parse::<usize>().ok().filter(|&c| c > 0)?)),
            None => (s.trim(), None),
        };
        match name {
            "walk" => Some(LinearAlgo::Walk {
                chunk: chunk.unwrap_or_else(|| walk_chunk(t)),
            }),
            "tiled" => Some(LinearAlgo::Tiled {
                chunk: chunk.or_else(|| tiled_chunk(t, m, smem, tc))?,
            }),
            _ => None,
        }
    }

    /// The default: tiled with chunks of 32 positions, or of 16 or 8 where those do not fit in
    /// `smem` bytes (the whole sequence when shorter), else the walk; `tc`: the tensor-core
    /// tiles' padding. `ASA_CUDA_LINEAR` overrides it; a value it cannot parse is an error.
    pub fn choose(t: usize, m: usize, smem: usize, tc: bool) -> Result<LinearAlgo> {
        if let Ok(v) = std::env::var(LINEAR_ENV) {
            if !v.trim().is_empty() {
                return LinearAlgo::parse(&v, t, m, smem, tc).ok_or_else(|| {
                    AsaError::Input(format!(
                        "{LINEAR_ENV}='{v}': expected tiled, tiled:<chunk>, walk or walk:<chunk> (tiles that fit the device's shared memory)"
                    ))
                });
            }
        }
        Ok(match tiled_chunk(t, m, smem, tc) {
            Some(chunk) => LinearAlgo::Tiled { chunk },
            None => LinearAlgo::Walk {
                chunk: walk_chunk(t),
            },
        })
    }
}

/// The walk's chunk for `t` positions: one serial walk up to 128 positions, else chunks of 64.
pub fn walk_chunk(t: usize) -> usize {
    if t <= 128 {
        t.max(1)
    } else {
        64
    }
}

/// The default tiled chunk: the longest of 32, 16, 8 positions (at most `t`) whose tiles fit
/// in `smem` bytes (`tc`: padded for the tensor cores). Not 64, though its tiles fit an H100 for 64 features: measured on an H200
/// (practice-run shape, B*H = 64, T = 1024, M = 64), chunks of 32 run the attention's forward +
/// backward in 2.00 ms against 2.19 ms for 64 (two blocks per SM instead of one) and 2.95 ms
/// for 16.
pub fn tiled_chunk(t: usize, m: usize, smem: usize, tc: bool) -> Option<usize> {
    [32usize, 16, 8]
        .into_iter()
        .map(|c| c.min(t.max(1)))
        .find(|&c| tiled_smem(c, m, tc) <= smem)
}

/// The tiles' padding (`lt_pad` of the kernels): 4 for the f64 products, 16 (the m16n8k16
/// fragments) for the tensor cores.
pub const fn tile_pad(tc: bool) -> usize {
    if tc {
        16
    } else {
        4
    }
}

/// Shared memory of the largest tiled kernel (the backward's) for chunks of `chunk` positions
/// and `m` features: four f64 matrices ([Mp][Mp+1] and [Cp][Cp+1] or [Cp][Mp+1]), a vector of
/// Cp f64, three f32 tiles [Cp][Mp+1] and a u8 one [Cp][Mp] (Cp, Mp: chunk and m rounded up
/// to [`tile_pad`]).
pub fn tiled_smem(chunk: usize, m: usize, tc: bool) -> usize {
    let pad = tile_pad(tc);
    let (cp, mp) = (chunk.div_ceil(pad) * pad, m.div_ceil(pad) * pad);
    let (lm, lc) = (mp + 1, cp + 1);
    8 * (mp * lm + 2 * cp * lm + cp * lc + cp) + 12 * cp * lm + cp * mp
}

/// Shapes of one call: `n` rows (B*H) of `t` positions of `m` features, cut into `nch` chunks
/// of `chunk` positions by `algo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    pub n: usize,
    pub t: usize,
    pub m: usize,
    pub chunk: usize,
    pub nch: usize,
    pub tiled: bool,
    /// The tiles' products on tensor cores (bf16 operands, f32 accumulation: the `_bf16`
    /// kernels); false: f64 on CUDA cores. The walk ignores it.
    pub tensor_cores: bool,
}

impl LinearPlan {
    /// A plan with exact (f64) tiles; the chunk is clamped to [1, t].
    pub fn new(n: usize, t: usize, m: usize, algo: LinearAlgo) -> LinearPlan {
        let (chunk, tiled) = match algo {
            LinearAlgo::Walk { chunk } => (chunk, false),
            LinearAlgo::Tiled { chunk } => (chunk, true),
        };
        let chunk = chunk.clamp(1, t.max(1));
        LinearPlan {
            n,
            t,
            m,
            chunk,
            nch: t.div_ceil(chunk),
            tiled,
            tensor_cores: false,
        }
    }

    /// The same plan with the tiles' products on tensor cores (`on`) or in f64.
    pub fn with_tensor_cores(self, on: bool) -> LinearPlan {
        LinearPlan {
            tensor_cores: on,
            ..self
        }
    }

    /// The plan for `dev` with `algo`, or [`LinearAlgo::choose`]'s default when None; tensor
    /// cores when the device computes in `Precision::Bf16` ([`super::tensor_cores`]).
    pub fn for_device<L: Device + ?Sized>(
        dev: &L,
        n: usize,
        t: usize,
        m: usize,
        algo: Option<LinearAlgo>,
    ) -> Result<LinearPlan> {
        let tc = super::tensor_cores(dev);
        let algo = match algo {
            Some(a) => a,
            None => LinearAlgo::choose(t, m, dev.max_smem(), tc)?,
        };
        Ok(LinearPlan::new(n, t, m, algo).with_tensor_cores(tc))
    }

    fn chunked(&self) -> bool {
        self.nch > 1
    }

    /// f64 elements of one set of carries: [N,nch,M,M] then [N,nch,M] (none for one chunk).
    fn carries_len(&self) -> usize {
        if self.chunked() {
            self.n * self.nch * self.m * (self.m + 1)
        } else {
            0
        }
    }

    /// f64 elements of the forward's workspace (its carries).
    pub fn ws_forward(&self) -> usize {
        self.carries_len()
    }

    /// f64 elements of the backward's workspace: gden [N,T] and two sets of carries. The
    /// backward also needs a u8 scratch of N*T*M ([`LinearWs::zlive`]).
    pub fn ws_backward(&self) -> usize {
        self.n * self.t + 2 * self.carries_len()
    }

    /// Shared memory of the tiled kernels (0 for the walk).
    pub fn smem(&self) -> usize {
        if self.tiled {
            tiled_smem(self.chunk, self.m, self.tensor_cores)
        } else {
            0
        }
    }

    /// The cost model's `steps` of a tiled kernel (passes of its static code): the chunk's
    /// positions for the f64 tiles (their products' inner loops run over the chunk; 3.6x
    /// pessimistic against the one H200 profile), the chunk's 16-position row blocks on tensor
    /// cores (a warp's loops there run one to two passes of the code in all for the practice
    /// run's shape, so this stays on the pessimistic side).
    fn tiled_steps(&self) -> usize {
        if self.tensor_cores {
            self.chunk.div_ceil(16)
        } else {
            self.chunk
        }
    }

    /// The kernels' trailing ints: n, t, m, chunk.
    fn ints(&self) -> Result<(i32, i32, i32, i32)> {
        Ok((
            i32_of("N", self.n)?,
            i32_of("T", self.t)?,
            self.m as i32,
            self.chunk as i32,
        ))
    }

    /// Walk: one warp per (row, chunk, feature), four warps per block (as `cfg_warps_small`).
    fn walk_grid(&self) -> (u32, u32) {
        ((self.n * self.nch * self.m).div_ceil(4) as u32, 128)
    }

    /// Tiled: one block per (row, chunk).
    fn tiled_grid(&self) -> Result<u32> {
        u32::try_from(self.n * self.nch)
            .map_err(|_| AsaError::Device("linear attention: too many chunks for one grid".into()))
    }

    /// The tiled kernels' shared memory must fit the device.
    fn check_fits<L: Device + ?Sized>(&self, dev: &L) -> Result<()> {
        if self.smem() > dev.max_smem() {
            return Err(AsaError::Device(format!(
                "linear attention: tiles of {} positions x {} features need {} bytes of shared memory, the device has {}",
                self.chunk,
                self.m,
                self.smem(),
                dev.max_smem()
            )));
        }
        Ok(())
    }
}

/// The workspace of one call, carved by [`LinearWs::forward`], [`LinearWs::backward`] or
/// [`LinearWs::backward_reusing`]: the forward carries (cs, cz), the backward's gden and
/// carries (ds, dz), zlive.
#[derive(Clone, Copy, Debug)]
pub struct LinearWs {
    pub cs: Dv<f64>,
    pub cz: Dv<f64>,
    pub gden: Dv<f64>,
    pub ds: Dv<f64>,
    pub dz: Dv<f64>,
    pub zlive: Dv<u8>,
    /// a backward's cs, cz hold the forward's carries already (not recomputed)
    pub forward_carries_kept: bool,
}

impl LinearWs {
    /// A forward's workspace out of `f` (at least `ws_forward()` f64s): the carries, null for
    /// a one-chunk plan.
    pub fn forward(p: &LinearPlan, f: Dv<f64>) -> LinearWs {
        Self::carve(p, f, Dv::null(), false)
    }

    /// A backward's workspace out of `f` (at least `ws_backward()` f64s) and `zlive` (N*T*M
    /// bytes): gden [N,T], then both sets of carries (null for a one-chunk plan).
    pub fn backward(p: &LinearPlan, f: Dv<f64>, zlive: Dv<u8>) -> LinearWs {
        Self::carve(p, f, zlive, true)
    }

    /// A backward's workspace whose forward carries are those the forward left in `kept` (its
    /// [`LinearWs::forward`] range, untouched since): the backward skips their recomputation
    /// (two launches). `f` as for [`LinearWs::backward`].
    pub fn backward_reusing(p: &LinearPlan, f: Dv<f64>, zlive: Dv<u8>, kept: Dv<f64>) -> LinearWs {
        assert!(
            kept.len >= p.ws_forward(),
            "linear attention: kept carries too short"
        );
        let fwd = Self::forward(p, kept);
        LinearWs {
            cs: fwd.cs,
            cz: fwd.cz,
            forward_carries_kept: true,
            ..Self::carve(p, f, zlive, true)
        }
    }

    fn carve(p: &LinearPlan, f: Dv<f64>, zlive: Dv<u8>, backward: bool) -> LinearWs {
        let (s, z) = (p.n * p.nch * p.m * p.m, p.n * p.nch * p.m);
        // gden first in a backward's workspace, then the carries
        let c0 = if backward { p.n * p.t } else { 0 };
        let part = |off: usize, len: usize, want: bool| {
            if want && p.chunked() {
                f.sub(c0 + off, len)
            } else {
                Dv::null()
            }
        };
        LinearWs {
            cs: part(0, s, true),
            cz: part(s, z, true),
            gden: if backward { f.sub(0, c0) } else { Dv::null() },
            ds: part(s + z, s, backward),
            dz: part(2 * s + z, z, backward),
            zlive,
            forward_carries_kept: false,
        }
    }
}

/// Grid-stride launch shape for `n` items.
fn elems<L: Device + ?Sized>(dev: &L, n: usize) -> u32 {
    (n.div_ceil(256) as u32).clamp(1, dev.max_grid().max(1))
}

/// A carry kernel's handle (`kern::linear_attn_{forward,backward}_carry`): sums s, z, n, nch, m.
type CarryKernel = fn(Dv<f64>, Dv<f64>, i32, i32, i32) -> kern::Launch<5>;

/// The carry pass over the chunks' sums `s`, `z`: `kernel`, `linear_attn_forward_carry`
/// (exclusive prefix for the forward) or `linear_attn_backward_carry` (suffix for the backward).
fn carry<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    kernel: CarryKernel,
    s: Dv<f64>,
    z: Dv<f64>,
) -> Result<()> {
    // a thread per state element walks the chunks, eight per pass of its unrolled loop
    // (`la_carry`): the cost model's steps are those passes
    kernel(s, z, i32_of("N", p.n)?, p.nch as i32, p.m as i32).walk(
        dev,
        elems(dev, p.n * p.m * p.m),
        256,
        0,
        p.nch.div_ceil(CARRY_UNROLL),
    )
}

/// Chunks per pass of `la_carry`'s loop (cuda/linear.cu).
const CARRY_UNROLL: usize = 8;

/// The forward carries cs, cz (state before each chunk) of a chunked plan.
fn forward_carries<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    ws: &LinearWs,
    kf: Dv<f32>,
    v: Dv<f32>,
) -> Result<()> {
    let (n, t, m, c) = p.ints()?;
    if p.tiled {
        // two f32 tiles [Cp][Mp+1] (K, V)
        let pad = tile_pad(p.tensor_cores);
        let smem = 8 * p.chunk.div_ceil(pad) * pad * (p.m.div_ceil(pad) * pad + 1);
        let sums = if p.tensor_cores {
            kern::linear_attn_forward_tiled_sums_bf16
        } else {
            kern::linear_attn_forward_tiled_sums
        };
        sums(ws.cs, ws.cz, kf, v, n, t, m, c).walk(
            dev,
            p.tiled_grid()?,
            TILED_THREADS,
            smem as u32,
            p.tiled_steps(),
        )?;
    } else {
        kern::linear_attn_forward_sums(ws.cs, ws.cz, kf, v, n, t, m, c).grid(
            dev,
            elems(dev, p.n * p.nch * p.m * p.m),
            256,
            0,
        )?;
    }
    carry(dev, p, kern::linear_attn_forward_carry, ws.cs, ws.cz)
}

/// out [N,T,M] (with its bf16 twin out16, nullable), den [N,T] (=) from qf, kf, v [N,T,M].
#[allow(clippy::too_many_arguments)]
pub fn forward<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    ws: &LinearWs,
    (out, out16): (Dv<f32>, Dv<u16>),
    den: Dv<f32>,
    qf: Dv<f32>,
    kf: Dv<f32>,
    v: Dv<f32>,
) -> Result<()> {
    if p.n == 0 || p.t == 0 {
        return Ok(());
    }
    assert!(
        out16.is_null() || out16.len == out.len,
        "linear attention: out16 shape"
    );
    p.check_fits(dev)?;
    if p.chunked() {
        forward_carries(dev, p, ws, kf, v)?;
    }
    let (n, t, m, c) = p.ints()?;
    if p.tiled {
        let fwd = if p.tensor_cores {
            kern::linear_attn_forward_tiled_bf16
        } else {
            kern::linear_attn_forward_tiled
        };
        fwd(out, den, qf, kf, v, ws.cs, ws.cz, n, t, m, c, out16).walk(
            dev,
            p.tiled_grid()?,
            TILED_THREADS,
            p.smem() as u32,
            p.tiled_steps(),
        )
    } else {
        let (grid, block) = p.walk_grid();
        kern::linear_attn_forward(out, den, qf, kf, v, ws.cs, ws.cz, n, t, m, c, out16)
            .grid(dev, grid, block, 0)
    }
}

/// dqf, dkf, dv [N,T,M] (+=) from dout, out [N,T,M], den [N,T] (the forward's) and the inputs.
#[allow(clippy::too_many_arguments)]
pub fn backward<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    ws: &LinearWs,
    dqf: Dv<f32>,
    dkf: Dv<f32>,
    dv: Dv<f32>,
    dout: Dv<f32>,
    out: Dv<f32>,
    den: Dv<f32>,
    qf: Dv<f32>,
    kf: Dv<f32>,
    v: Dv<f32>,
) -> Result<()> {
    if p.n == 0 || p.t == 0 {
        return Ok(());
    }
    assert!(
        !ws.gden.is_null() && ws.zlive.len == p.n * p.t * p.m,
        "linear attention backward: workspace too small"
    );
    p.check_fits(dev)?;
    let (n, t, m, c) = p.ints()?;
    if p.chunked() && !ws.forward_carries_kept {
        forward_carries(dev, p, ws, kf, v)?;
    }
    // the tensor-core dq kernel makes gden itself (the f64 one would spill with it)
    let gden_in_dq = p.tiled && p.tensor_cores;
    if gden_in_dq {
        return backward_tiled(dev, p, ws, [dqf, dkf, dv, dout, out, den, qf, kf, v]);
    }
    kern::linear_attn_backward_gden(ws.gden, dout, out, den, n, t, m).grid(
        dev,
        (p.n * p.t).div_ceil(4) as u32,
        128,
        0,
    )?;
    if p.tiled {
        return backward_tiled(dev, p, ws, [dqf, dkf, dv, dout, Dv::null(), den, qf, kf, v]);
    }
    let (grid, block) = p.walk_grid();
    kern::linear_attn_backward(
        dqf, ws.zlive, dout, den, ws.gden, kf, v, ws.cs, ws.cz, n, t, m, c,
    )
    .grid(dev, grid, block, 0)?;
    if p.chunked() {
        kern::linear_attn_backward_sums(ws.ds, ws.dz, dout, den, ws.gden, ws.zlive, qf, n, t, m, c)
            .grid(dev, elems(dev, p.n * p.nch * p.m * p.m), 256, 0)?;
        carry(dev, p, kern::linear_attn_backward_carry, ws.ds, ws.dz)?;
    }
    kern::linear_attn_backward_dk(
        dkf, ws.zlive, dout, den, ws.gden, qf, v, ws.ds, ws.dz, n, t, m, c,
    )
    .grid(dev, grid, block, 0)?;
    kern::linear_attn_backward_dv(dv, dout, den, qf, kf, ws.ds, n, t, m, c)
        .grid(dev, grid, block, 0)
}

/// The tiled backward: dq (with zlive, the backward carries' chunk sums, and gden from `out`
/// when that is not null: tensor cores), the carry pass, then dk and dv.
fn backward_tiled<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    ws: &LinearWs,
    io: [Dv<f32>; 9], // dqf, dkf, dv, dout, out, den, qf, kf, v
) -> Result<()> {
    let [dqf, dkf, dv, dout, out, den, qf, kf, v] = io;
    let (n, t, m, c) = p.ints()?;
    let (grid, smem, steps) = (p.tiled_grid()?, p.smem() as u32, p.tiled_steps());
    let (zlive, ds, dz, gden) = (ws.zlive, ws.ds, ws.dz, ws.gden);
    // both kernels: (outputs, zlive, ds, dz, dout, den, gden, qf, kf, v, [cs, cz,] n, t, m, c[, out]):
    // the dq kernel makes gden from out, the dk/dv kernel reads it
    if p.tensor_cores {
        // the tensor-core dq kernel takes out (it makes gden), the f64 one reads gden
        kern::linear_attn_backward_tiled_dq_bf16(
            dqf, zlive, ds, dz, dout, den, gden, qf, kf, v, ws.cs, ws.cz, n, t, m, c, out,
        )
        .walk(dev, grid, TILED_THREADS, smem, steps)?;
    } else {
        kern::linear_attn_backward_tiled_dq(
            dqf, zlive, ds, dz, dout, den, gden, qf, kf, v, ws.cs, ws.cz, n, t, m, c,
        )
        .walk(dev, grid, TILED_THREADS, smem, steps)?;
    }
    if p.chunked() {
        carry(dev, p, kern::linear_attn_backward_carry, ws.ds, ws.dz)?;
    }
    let dkdv = if p.tensor_cores {
        kern::linear_attn_backward_tiled_dkdv_bf16
    } else {
        kern::linear_attn_backward_tiled_dkdv
    };
    dkdv(
        dkf, dv, zlive, ds, dz, dout, den, gden, qf, kf, v, n, t, m, c,
    )
    .walk(dev, grid, TILED_THREADS, smem, steps)
}

/// The forward with its carries in `keep` (at least `ws_forward()` f64s, for
/// [`backward_scratch`] to reuse), or in the device's f64 scratch when `keep` is null.
pub(crate) fn forward_scratch<D: Device + ?Sized>(
    dev: &D,
    p: &LinearPlan,
    keep: Dv<f64>,
    io: [Dv<f32>; 5], // out, den, qf, kf, v
    out16: Dv<u16>,
) -> Result<()> {
    let f = if keep.is_null() {
        dev.scratch64(p.ws_forward().max(1), false)?
    } else {
        assert!(
            keep.len >= p.ws_forward(),
            "linear attention: keep too short"
        );
        keep
    };
    let ws = LinearWs::forward(p, f);
    let [out, den, qf, kf, v] = io;
    forward(dev, p, &ws, (out, out16), den, qf, kf, v)
}

/// The backward with its workspace from the device's f64 scratch and a fresh zlive, reusing
/// the forward's carries from `kept` (what [`forward_scratch`] kept; null: recomputed).
pub(crate) fn backward_scratch<D: Device + ?Sized>(
    dev: &D,
    p: &LinearPlan,
    kept: Dv<f64>,
    io: [Dv<f32>; 9], // dqf, dkf, dv, dout, out, den, qf, kf, v
) -> Result<()> {
    let f = dev.scratch64(p.ws_backward(), false)?;
    let zlive = dev.temp::<u8>(p.n * p.t * p.m)?;
    let ws = if kept.is_null() {
        LinearWs::backward(p, f, zlive.dv())
    } else {
        LinearWs::backward_reusing(p, f, zlive.dv(), kept)
    };
    let [dqf, dkf, dv, dout, out, den, qf, kf, v] = io;
    backward(dev, p, &ws, dqf, dkf, dv, dout, out, den, qf, kf, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cost model's steps of the carry pass follow its kernel's unrolling.
    #[test]
    fn the_carry_unroll_is_the_kernels() {
        let src = super::super::KERNELS
            .iter()
            .find(|(stem, _)| *stem == "linear")
            .expect("cuda/linear.cu")
            .1;
        let line = format!("#define LA_CARRY_UNROLL {CARRY_UNROLL} ");
        assert!(src.contains(&line), "cuda/linear.cu: {line}");
    }

    #[test]
    fn chunks_cover_the_sequence() {
        let walk = |chunk| LinearAlgo::Walk { chunk };
        let p = LinearPlan::new(3, 130, 8, walk(64));
        assert_eq!((p.chunk, p.nch, p.tiled), (64, 3, false));
        assert_eq!(LinearPlan::new(3, 10, 8, walk(64)).nch, 1);
        assert_eq!(LinearPlan::new(3, 10, 8, walk(0)).chunk, 1);
        assert_eq!(walk_chunk(128), 128);
        assert_eq!(walk_chunk(1024), 64);
    }

    #[test]
    fn the_default_is_the_longest_tiled_chunk_that_fits() {
        const H100: usize = 227 * 1024;
        // the practice run's slotspace (64 features): 32 positions, ~100 KiB (two blocks per
        // SM); chunks of 64 (by hand) fit too
        assert_eq!(tiled_chunk(1024, 64, H100, false), Some(32));
        assert!(tiled_smem(32, 64, false) <= H100 / 2 && tiled_smem(32, 64, false) > 90 * 1024);
        assert!(tiled_smem(64, 64, false) <= H100);
        // 128 features: shorter chunks; the plain 48 KiB: the walk
        assert_eq!(tiled_chunk(1024, 128, H100, false), Some(16));
        assert_eq!(
            tiled_chunk(1024, 128, crate::backend::cuda::SMEM_DEFAULT, false),
            None
        );
        // never longer than the sequence
        assert_eq!(tiled_chunk(5, 64, H100, false), Some(5));
        let p = |s: &str| LinearAlgo::parse(s, 1024, 64, H100, false);
        assert_eq!(p("tiled"), Some(LinearAlgo::Tiled { chunk: 32 }));
        assert_eq!(p("tiled:64"), Some(LinearAlgo::Tiled { chunk: 64 }));
        assert_eq!(p("tiled:16"), Some(LinearAlgo::Tiled { chunk: 16 }));
        assert_eq!(p("walk"), Some(LinearAlgo::Walk { chunk: 64 }));
        assert_eq!(p(" walk:2000 "), Some(LinearAlgo::Walk { chunk: 2000 }));
        assert_eq!(p("walk:0"), None);
        assert_eq!(p("serial"), None);
        assert_eq!(LinearAlgo::parse("tiled", 1024, 128, 1024, false), None);
    }

    #[test]
    fn workspace_ranges_do_not_overlap() {
        let p = LinearPlan::new(2, 9, 5, LinearAlgo::Walk { chunk: 4 });
        // SAFETY: ranges only, never dereferenced.
        let base = 1u64 << 20;
        let f = unsafe { Dv::<f64>::from_raw(base, p.ws_backward()) };
        let z = unsafe { Dv::<u8>::from_raw(1 << 40, p.n * p.t * p.m) };
        let ws = LinearWs::backward(&p, f, z);
        let mut r: Vec<(u64, usize)> = [ws.gden, ws.cs, ws.cz, ws.ds, ws.dz]
            .iter()
            .map(|d| ((d.ptr - base) / 8, d.len))
            .collect();
        r.sort();
        for w in r.windows(2) {
            assert!(w[0].0 + w[0].1 as u64 <= w[1].0, "{r:?}");
        }
        let last = r.last().unwrap();
        assert_eq!(last.0 + last.1 as u64, p.ws_backward() as u64);
        // a forward's workspace: carries only
        let fw = unsafe { Dv::<f64>::from_raw(base, p.ws_forward()) };
        let ws = LinearWs::forward(&p, fw);
        assert!(ws.gden.is_null() && ws.ds.is_null() && !ws.cs.is_null());
        assert_eq!(ws.cs.ptr, base);
        assert_eq!(
            (ws.cz.ptr - base) / 8 + ws.cz.len as u64,
            p.ws_forward() as u64
        );
    }
}
