//! Launch sequences of the slotspace refine's causal linear attention (kernels `linear_attn_*`
//! in cuda/asa.cu; CPU twins `linear_attn_forward` / `linear_attn_backward` in
//! `backend::cpu::asa`).
//!
//! Time is walked in chunks: a chunk's warps start from carries (the state before the chunk in
//! the forward, the gradient sums after it in the backward), built by a parallel pass of
//! per-chunk sums and a short pass over the chunks, so the sequential depth is one chunk
//! instead of T. With one chunk (chunk >= T) no carries are built: the plain serial walk.
//!
//! Written against [`Device`], so the same sequences run on a device and, in the tests,
//! in the SIMT emulator. The launchers `Ops::linear_attn_forward` / `linear_attn_backward`
//! take the workspace from the device's scratch and call them.

use super::{i32_of, AsDv, Device, Dv, KArg};
use crate::error::Result;

/// Environment override of the chunk length (positions; for tuning on a device).
pub const LINEAR_CHUNK_ENV: &str = "ASA_CUDA_LINEAR_CHUNK";

/// The chunk length for sequences of `t` positions: the serial walk (one chunk) up to 128
/// positions, else chunks of 64, so a warp walks at most 64 steps and the per-chunk sums
/// (O(T M^2) work, all parallel) stay cheap. `ASA_CUDA_LINEAR_CHUNK` overrides it.
pub fn default_chunk(t: usize) -> usize {
    std::env::var(LINEAR_CHUNK_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&c| c > 0)
        .unwrap_or(if t <= 128 { t } else { 64 })
        .clamp(1, t.max(1))
}

/// Shapes of one call: `n` rows (B*H) of `t` positions of `m` features, walked in chunks of
/// `chunk` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    pub n: usize,
    pub t: usize,
    pub m: usize,
    pub chunk: usize,
    pub nch: usize,
}

impl LinearPlan {
    /// A plan; `chunk` is clamped to [1, t].
    pub fn new(n: usize, t: usize, m: usize, chunk: usize) -> LinearPlan {
        let chunk = chunk.clamp(1, t.max(1));
        LinearPlan {
            n,
            t,
            m,
            chunk,
            nch: t.div_ceil(chunk),
        }
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

    fn ints(&self) -> Result<[KArg; 4]> {
        Ok([
            KArg::I32(i32_of("N", self.n)?),
            KArg::I32(i32_of("T", self.t)?),
            KArg::I32(self.m as i32),
            KArg::I32(self.chunk as i32),
        ])
    }

    /// One warp per (row, chunk, feature), four warps per block (as `cfg_warps_small`).
    fn walk_grid(&self) -> (u32, u32) {
        ((self.n * self.nch * self.m).div_ceil(4) as u32, 128)
    }
}

/// The workspace of one call, carved by [`LinearWs::forward`] or [`LinearWs::backward`]: the
/// forward carries (cs, cz), the backward's gden and carries (ds, dz), zlive.
#[derive(Clone, Copy, Debug)]
pub struct LinearWs {
    pub cs: Dv<f64>,
    pub cz: Dv<f64>,
    pub gden: Dv<f64>,
    pub ds: Dv<f64>,
    pub dz: Dv<f64>,
    pub zlive: Dv<u8>,
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
        }
    }
}

/// Per-chunk sums then the carry pass: `{prefix}_sums` and `{prefix}_carry`.
fn carries<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    prefix: &str,
    sums_args: &[KArg],
    s: Dv<f64>,
    z: Dv<f64>,
) -> Result<()> {
    let elems = |n: usize| (n.div_ceil(256) as u32).clamp(1, dev.max_grid().max(1));
    dev.grid_launch(
        &format!("{prefix}_sums"),
        elems(p.n * p.nch * p.m * p.m),
        256,
        0,
        sums_args,
    )?;
    let carry = [
        KArg::from(s),
        KArg::from(z),
        KArg::I32(i32_of("N", p.n)?),
        KArg::I32(p.nch as i32),
        KArg::I32(p.m as i32),
    ];
    dev.grid_launch(
        &format!("{prefix}_carry"),
        elems(p.n * p.m * p.m),
        256,
        0,
        &carry,
    )
}

fn forward_carries<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    ws: &LinearWs,
    kf: Dv<f32>,
    v: Dv<f32>,
) -> Result<()> {
    let [n, t, m, c] = p.ints()?;
    let args = [ws.cs.into(), ws.cz.into(), kf.into(), v.into(), n, t, m, c];
    carries(dev, p, "linear_attn_forward", &args, ws.cs, ws.cz)
}

/// out [N,T,M], den [N,T] (=) from qf, kf, v [N,T,M].
#[allow(clippy::too_many_arguments)]
pub fn forward<L: Device + ?Sized>(
    dev: &L,
    p: &LinearPlan,
    ws: &LinearWs,
    out: Dv<f32>,
    den: Dv<f32>,
    qf: Dv<f32>,
    kf: Dv<f32>,
    v: Dv<f32>,
) -> Result<()> {
    if p.n == 0 || p.t == 0 {
        return Ok(());
    }
    if p.chunked() {
        forward_carries(dev, p, ws, kf, v)?;
    }
    let [n, t, m, c] = p.ints()?;
    let (grid, block) = p.walk_grid();
    let args = [
        out.into(),
        den.into(),
        qf.into(),
        kf.into(),
        v.into(),
        ws.cs.into(),
        ws.cz.into(),
        n,
        t,
        m,
        c,
    ];
    dev.grid_launch("linear_attn_forward", grid, block, 0, &args)
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
    let [n, t, m, c] = p.ints()?;
    if p.chunked() {
        forward_carries(dev, p, ws, kf, v)?;
    }
    let gden_args = [ws.gden.into(), dout.into(), out.into(), den.into(), n, t, m];
    dev.grid_launch(
        "linear_attn_backward_gden",
        (p.n * p.t).div_ceil(4) as u32,
        128,
        0,
        &gden_args,
    )?;
    let (grid, block) = p.walk_grid();
    let dq_args = [
        dqf.into(),
        ws.zlive.into(),
        dout.into(),
        den.into(),
        ws.gden.into(),
        kf.into(),
        v.into(),
        ws.cs.into(),
        ws.cz.into(),
        n,
        t,
        m,
        c,
    ];
    dev.grid_launch("linear_attn_backward", grid, block, 0, &dq_args)?;
    if p.chunked() {
        let args = [
            ws.ds.into(),
            ws.dz.into(),
            dout.into(),
            den.into(),
            ws.gden.into(),
            ws.zlive.into(),
            qf.into(),
            n,
            t,
            m,
            c,
        ];
        carries(dev, p, "linear_attn_backward", &args, ws.ds, ws.dz)?;
    }
    let dk_args = [
        dkf.into(),
        ws.zlive.into(),
        dout.into(),
        den.into(),
        ws.gden.into(),
        qf.into(),
        v.into(),
        ws.ds.into(),
        ws.dz.into(),
        n,
        t,
        m,
        c,
    ];
    dev.grid_launch("linear_attn_backward_dk", grid, block, 0, &dk_args)?;
    let dv_args = [
        dv.into(),
        dout.into(),
        den.into(),
        qf.into(),
        kf.into(),
        ws.ds.into(),
        n,
        t,
        m,
        c,
    ];
    dev.grid_launch("linear_attn_backward_dv", grid, block, 0, &dv_args)
}

/// The forward with its workspace from the device's f64 scratch.
pub(crate) fn forward_scratch<D: Device + ?Sized>(
    dev: &D,
    p: &LinearPlan,
    io: [Dv<f32>; 5], // out, den, qf, kf, v
) -> Result<()> {
    let f = dev.scratch64(p.ws_forward().max(1), false)?;
    let ws = LinearWs::forward(p, f);
    let [out, den, qf, kf, v] = io;
    forward(dev, p, &ws, out, den, qf, kf, v)
}

/// The backward with its workspace from the device's f64 scratch and a fresh zlive.
pub(crate) fn backward_scratch<D: Device + ?Sized>(
    dev: &D,
    p: &LinearPlan,
    io: [Dv<f32>; 9], // dqf, dkf, dv, dout, out, den, qf, kf, v
) -> Result<()> {
    let f = dev.scratch64(p.ws_backward(), false)?;
    let zlive = dev.temp::<u8>(p.n * p.t * p.m)?;
    let ws = LinearWs::backward(p, f, zlive.dv());
    let [dqf, dkf, dv, dout, out, den, qf, kf, v] = io;
    backward(dev, p, &ws, dqf, dkf, dv, dout, out, den, qf, kf, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_sequence() {
        let p = LinearPlan::new(3, 130, 8, 64);
        assert_eq!((p.chunk, p.nch), (64, 3));
        assert_eq!(LinearPlan::new(3, 10, 8, 64).nch, 1);
        assert_eq!(LinearPlan::new(3, 10, 8, 0).chunk, 1);
        if std::env::var_os(LINEAR_CHUNK_ENV).is_none() {
            assert_eq!(default_chunk(128), 128);
            assert_eq!(default_chunk(1024), 64);
        }
    }

    #[test]
    fn workspace_ranges_do_not_overlap() {
        let p = LinearPlan::new(2, 9, 5, 4);
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
