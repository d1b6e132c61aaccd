//! The fused slot write scan + read (`cuda/fused.cu`): the write scan, the read logits, softmax
//! routing with the read slot mask and the read output in one pass over time, forward and
//! backward, without the `[B,H,T,K,d]` state history in global memory.
//!
//! It replaces, in the GPU layer (`layer.rs`), the op-by-op chain
//! `slot_scan_forward -> read_logits_forward -> read_weights_forward -> slot_mix_forward` (and
//! the refine's `slot_mix_forward` over the states) and the matching backward chain, with the
//! CPU twins' semantics: the reference's chunked running-max softmax with its exact
//! `write_chunk_size` behaviour, and the gradient through the running max.
//!
//! Scheme (see the head of `cuda/fused.cu` for the math). Time is cut into tiles: tiles of whole
//! write chunks when the chunk is at most the tile length, else equal sub-tiles of each chunk.
//! Forward: (0) `rmax` = the prefix max of the write logits (one warp per slot), (1) per-tile
//! sums (one block per (b,h,tile)), (2) the carries at tile starts (one warp per slot, sequential
//! over tiles only), (3) one block per (b,h,tile) walks its positions with every slot's state in
//! registers and writes `den`, `rw` and `out1`; the chunk carries are saved (`cn_chunk`,
//! `[B*H, nchunks, K, d]`) with the tile carries for the backward. Backward: the refine's
//! weight gradient (`dot`) and the read backward (`dq`, slot keys, gamma, and per-position
//! coefficients of the state gradient) walk the tiles again from the saved carries; the scan
//! backward is the same three levels in reverse (tile sums, carries at tile ends, a reverse walk
//! giving `dv` and two scalars per position); one warp per slot finishes the running-max
//! gradient as two affine scans.
//!
//! Supported: softmax routing, read slot masks (`read`, `content_read_only`; `all` and
//! `last_pos_only`), content read on/off, any chunk size, attention masks (through the write
//! logits), `num_slots` <= 128 and `head_dim` <= 256 within the block limits of
//! [`FusedPlan::new`]. Other routing modes and the intervene variant use the op-by-op path
//! (`layer_plan` returns `None`), as does everything when `ASA_CUDA_FUSED=0`.
//!
//! The launch sequence is written against [`Device`] so that it can be driven by a kernel
//! emulator as well as by [`CudaBackend`].

use super::ops::{DevSlotMask, Learned};
use super::{i32_of, kern, AsDv, Backend, Device, Dv, Temp};
use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::vocab::dims::SlotDims;

/// Env var: `0` (or `false`, `off`) makes the GPU layer use the op-by-op path.
pub const FUSED_ENV: &str = "ASA_CUDA_FUSED";
/// Env var: the longest tile (positions per block of the fused kernels), 1..=1024.
pub const FUSED_TILE_ENV: &str = "ASA_CUDA_FUSED_TILE";

/// Whether the fused path is on by default (`ASA_CUDA_FUSED` unset or not `0`/`false`/`off`).
pub fn fused_default() -> bool {
    !matches!(
        std::env::var(FUSED_ENV).map(|v| v.trim().to_ascii_lowercase()),
        Ok(v) if v == "0" || v == "false" || v == "off"
    )
}

/// Longest tile by default.
pub const MAX_TILE: usize = 64;
/// Shortest automatic tile (short sequences get more, shorter tiles to fill the device).
pub const MIN_TILE: usize = 16;
/// State elements per lane (`FU_E` of the kernels).
const FU_E: usize = 8;
/// Warps per block (`FU_MAXNW`).
const FU_MAXNW: usize = 16;
/// Threads of `slot_scan_read_forward_bf16` (`FT_THREADS`).
const TC_THREADS: u32 = 256;
/// Dynamic shared memory limit: 48 KiB (the most without opt-in) less room for the kernels'
/// static shared arrays (128 bytes).
const SMEM_LIMIT: usize = super::SMEM_DEFAULT - 256;

// ------------------------------------------------------------------------------------------------
// plan

/// Shapes, tiling and thread layout of the fused kernels for one (B, H, T, K, d, chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedPlan {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub k: usize,
    pub d: usize,
    /// write chunk, clamped to 1..=T
    pub chunk: usize,
    /// tile length (positions per block)
    pub tile: usize,
    /// 0: tiles hold whole chunks (`tile` is a multiple of `chunk`); else sub-tiles per chunk
    pub nsub: usize,
    pub ntiles: usize,
    pub nchunks: usize,
    /// lanes per slot (a power of two with 8 * group >= d)
    pub group: usize,
    /// warps per block
    pub warps: usize,
    /// The forward's per-tile kernel on tensor cores (`slot_scan_read_forward_bf16`, bf16
    /// operands, f32 accumulation) instead of the f64 walk; see [`FusedPlan::with_tensor_cores`].
    pub tensor_cores: bool,
}

impl FusedPlan {
    /// The plan for `dm` with tiles of at most `max_tile` positions; `None` when the fused
    /// kernels do not support the shape (then the op-by-op path runs).
    pub fn new(dm: SlotDims, chunk: usize, max_tile: usize) -> Option<Self> {
        let SlotDims { b, h, t, k, d } = dm;
        if b == 0 || h == 0 || t == 0 || k == 0 || k > 128 || d == 0 || d > 256 {
            return None;
        }
        let chunk = chunk.max(1).min(t);
        let mut group = 1;
        while group * FU_E < d {
            group *= 2;
        }
        let warps = k.div_ceil(32 / group);
        if warps > FU_MAXNW {
            return None;
        }
        let lmax = max_tile.max(1);
        let (tile, nsub, ntiles) = if chunk <= lmax {
            let tile = (lmax / chunk) * chunk;
            (tile, 0, t.div_ceil(tile))
        } else {
            let nsub = chunk.div_ceil(lmax);
            let tile = chunk.div_ceil(nsub);
            (tile, nsub, (t / chunk) * nsub + (t % chunk).div_ceil(tile))
        };
        let p = FusedPlan {
            b,
            h,
            t,
            k,
            d,
            chunk,
            tile,
            nsub,
            ntiles,
            nchunks: t.div_ceil(chunk),
            group,
            warps,
            tensor_cores: false,
        };
        // 32-bit kernel sizes: positions (t + chunk), blocks, and the f32 element counts
        let nbh = b * h;
        let fits = |x: usize| x < i32::MAX as usize;
        if !fits(t + chunk)
            || !fits(nbh * ntiles)
            || !fits(nbh * k)
            || !fits(nbh * p.nchunks)
            || p.smem_read() > SMEM_LIMIT
        {
            return None;
        }
        Some(p)
    }

    /// The plan with the forward's tiles on tensor cores when `on` and the plan allows it:
    /// every tile inside one write chunk (sub-tiles of a chunk, tiles of one chunk, or one
    /// chunk in all), at most [`MAX_TILE`] positions, and [`FusedPlan::smem_tc`] within
    /// `max_smem` bytes; else the f64 walk (the flag stays false).
    pub fn with_tensor_cores(self, on: bool, max_smem: usize) -> Self {
        let one_chunk = self.nsub > 0 || self.tile == self.chunk || self.nchunks == 1;
        let tensor_cores = on && one_chunk && self.tile <= MAX_TILE && self.smem_tc() <= max_smem;
        FusedPlan {
            tensor_cores,
            ..self
        }
    }

    /// Dynamic shared memory of `slot_scan_read_forward_bf16` (its layout is in cuda/fused.cu):
    /// f32 tiles of the padded sizes (multiples of 16) with odd row strides, two f64 rows of K.
    pub fn smem_tc(&self) -> usize {
        let pad = |x: usize| x.div_ceil(16) * 16;
        let (lp, kp, dp) = (pad(self.tile.min(self.t)), pad(self.k), pad(self.d));
        let (ld, lk, ll) = (dp + 1, kp + 1, lp + 1);
        // G of the scan backward shares the keys' room where it fits
        let g = if kp * ld >= lp * lk { 0 } else { lp * lk };
        16 * kp + 4 * (2 * lp * ld + 3 * kp * ld + lp * ll + 6 * lp * lk + g + kp)
    }

    /// The cost model's `steps` of a tensor-core tile kernel: its 16-position row blocks.
    pub fn tc_steps(&self) -> usize {
        self.tile.min(self.t).div_ceil(16)
    }

    /// Launches the tensor-core tile kernel of `l` (cuda/fused.cu, `FT_THREADS`): a block per
    /// tile, every position of a tile at once; for the cost model one pass of the kernel's code
    /// per 16 positions (conservative: most of its loops run fewer times than that).
    fn launch_tc<L: Device + ?Sized, const N: usize>(
        &self,
        dev: &L,
        l: kern::Launch<N>,
    ) -> Result<()> {
        l.walk(
            dev,
            self.tiles_grid(),
            TC_THREADS,
            self.smem_tc() as u32,
            self.tc_steps(),
        )
    }

    /// Launches a per-tile kernel of the plan: on tensor cores ([`FusedPlan::launch_tc`]) when
    /// the plan runs there, else a block per tile walking its positions, with `smem` bytes.
    fn launch_tiles<L: Device + ?Sized, const N: usize>(
        &self,
        dev: &L,
        l: kern::Launch<N>,
        smem: u32,
    ) -> Result<()> {
        if self.tensor_cores {
            return self.launch_tc(dev, l);
        }
        l.walk(dev, self.tiles_grid(), self.block(), smem, self.tile)
    }

    /// The automatic tile length for `nbh` (batch, head) rows of `t` positions on `sm` SMs:
    /// at least two blocks per SM where the sequence allows it, between MIN_TILE and MAX_TILE.
    pub fn auto_tile(nbh: usize, t: usize, sm: usize) -> usize {
        let want = (nbh * t).div_ceil(2 * sm.max(1));
        want.next_power_of_two().clamp(MIN_TILE, MAX_TILE)
    }

    pub fn nbh(&self) -> usize {
        self.b * self.h
    }

    pub fn dims(&self) -> SlotDims {
        SlotDims {
            b: self.b,
            h: self.h,
            t: self.t,
            k: self.k,
            d: self.d,
        }
    }

    /// Threads per block of the per-tile kernels.
    pub fn block(&self) -> u32 {
        (self.warps * 32) as u32
    }

    /// Dynamic shared memory of the kernels with a read (two rows of K floats twice, two
    /// partial rows of d doubles per warp).
    pub fn smem_read(&self) -> usize {
        16 * self.warps * self.d + 16 * self.k
    }

    /// Dynamic shared memory of the kernels with only the cross-slot sum.
    pub fn smem_mix(&self) -> usize {
        16 * self.warps * self.d
    }

    fn tiles_grid(&self) -> u32 {
        (self.nbh() * self.ntiles) as u32
    }

    /// One warp per (b,h,s), four warps per block.
    fn warps_grid(&self) -> u32 {
        (self.nbh() * self.k).div_ceil(4) as u32
    }

    /// (f64, f32) element counts of the workspace ([`FusedWs::carve`]).
    pub fn ws_len(&self) -> (usize, usize) {
        let l = WsLens::of(self);
        (l.total64(), l.total32())
    }

    /// The kernels' trailing size arguments.
    fn dims_arg(&self) -> kern::FusedDims {
        kern::FusedDims {
            nbh: self.nbh() as i32,
            h: self.h as i32,
            t: self.t as i32,
            nk: self.k as i32,
            d: self.d as i32,
            chunk: self.chunk as i32,
            tile: self.tile as i32,
            nsub: self.nsub as i32,
            ntiles: self.ntiles as i32,
            nchunks: self.nchunks as i32,
            group: self.group as i32,
        }
    }

    /// Bytes that the scan + read forward must move at least: read wl, v, q and the slot keys,
    /// write out1, rw and the per-token statistics den, rmax (f32). The numerator of the
    /// memory-bandwidth roofline; the fused path's own carries are not counted.
    pub fn forward_min_bytes(&self) -> usize {
        let (nbh, t, k, d) = (self.nbh(), self.t, self.k, self.d);
        let reads = nbh * k * t + 2 * nbh * t * d + self.h * k * d;
        let writes = nbh * t * d + nbh * t * k + 2 * nbh * k * t;
        4 * (reads + writes)
    }
}

/// Workspace layout (element counts).
struct WsLens {
    tkd: usize,  // [B*H, ntiles, K, d]
    tk: usize,   // [B*H, ntiles, K]
    bhkt: usize, // [B,H,K,T] = [B,H,T,K]
    ckd: usize,  // [B*H, nchunks, K, d]
    nt: usize,   // [B*H*ntiles]
}

impl WsLens {
    fn of(p: &FusedPlan) -> Self {
        let nbh = p.nbh();
        WsLens {
            tkd: nbh * p.ntiles * p.k * p.d,
            tk: nbh * p.ntiles * p.k,
            bhkt: nbh * p.k * p.t,
            ckd: nbh * p.nchunks * p.k * p.d,
            nt: nbh * p.ntiles,
        }
    }
    // f64: cn, cp, sum_n, sum2_n, bc_n, dkeys_part (6 tkd); cd, cpd, sum_d, sum2_d, prod, bc_d
    // (6 tk); gc, gsum, xo, yo (4 bhkt); dgamma_part (nt)
    fn total64(&self) -> usize {
        6 * self.tkd + 6 * self.tk + 4 * self.bhkt + self.nt
    }
    // f32: rmax, den, cm (3 bhkt); cn_chunk (ckd)
    fn total32(&self) -> usize {
        3 * self.bhkt + self.ckd
    }
}

/// Device workspace of the fused path, carved out of one f64 and one f32 buffer. The forward's
/// statistics and carries (`rmax`, `den`, `cn_chunk`, `cn`, `cd`, `cp`, `cpd`) must stay
/// untouched until the backward.
#[derive(Debug, Clone, Copy)]
pub struct FusedWs {
    /// [B,H,K,T] the running max (the reference's R_t)
    pub rmax: Dv<f32>,
    /// [B,H,K,T] the write-scan denominators
    pub den: Dv<f32>,
    /// [B,H,K,T] scratch: chunk-local cummax (backward)
    pub cm: Dv<f32>,
    /// [B*H, nchunks, K, d] chunk carries num (f32)
    pub cn_chunk: Dv<f32>,
    /// [B*H, ntiles, K, d] chunk carry num / in-chunk partial sums at tile starts
    pub cn: Dv<f64>,
    pub cp: Dv<f64>,
    /// [B*H, ntiles, K] the same for den
    pub cd: Dv<f64>,
    pub cpd: Dv<f64>,
    /// scratch: per-tile sums (forward level 1, backward level 1)
    pub sum_n: Dv<f64>,
    pub sum2_n: Dv<f64>,
    pub sum_d: Dv<f64>,
    pub sum2_d: Dv<f64>,
    pub prod: Dv<f64>,
    /// scratch: backward carries at tile ends
    pub bc_n: Dv<f64>,
    pub bc_d: Dv<f64>,
    /// scratch [B,H,T,K]: state-gradient coefficients of the read backward
    pub gc: Dv<f64>,
    pub gsum: Dv<f64>,
    /// scratch [B,H,K,T]: per-position scan-gradient scalars
    pub xo: Dv<f64>,
    pub yo: Dv<f64>,
    /// scratch: per-tile slot-key and gamma gradient partials
    pub dkeys_part: Dv<f64>,
    pub dgamma_part: Dv<f64>,
}

impl FusedWs {
    /// Splits `b64` (at least `ws_len().0` elements) and `b32` (`ws_len().1`) into the
    /// workspace ranges.
    pub fn carve(p: &FusedPlan, b64: Dv<f64>, b32: Dv<f32>) -> Self {
        let l = WsLens::of(p);
        assert!(
            b64.len >= l.total64() && b32.len >= l.total32(),
            "fused workspace too small"
        );
        let mut o64 = 0;
        let mut take64 = |n: usize| {
            let r = b64.sub(o64, n);
            o64 += n;
            r
        };
        let cn = take64(l.tkd);
        let cp = take64(l.tkd);
        let sum_n = take64(l.tkd);
        let sum2_n = take64(l.tkd);
        let bc_n = take64(l.tkd);
        let dkeys_part = take64(l.tkd);
        let cd = take64(l.tk);
        let cpd = take64(l.tk);
        let sum_d = take64(l.tk);
        let sum2_d = take64(l.tk);
        let prod = take64(l.tk);
        let bc_d = take64(l.tk);
        let gc = take64(l.bhkt);
        let gsum = take64(l.bhkt);
        let xo = take64(l.bhkt);
        let yo = take64(l.bhkt);
        let dgamma_part = take64(l.nt);
        let mut o32 = 0;
        let mut take32 = |n: usize| {
            let r = b32.sub(o32, n);
            o32 += n;
            r
        };
        let rmax = take32(l.bhkt);
        let den = take32(l.bhkt);
        let cm = take32(l.bhkt);
        let cn_chunk = take32(l.ckd);
        FusedWs {
            rmax,
            den,
            cm,
            cn_chunk,
            cn,
            cp,
            cd,
            cpd,
            sum_n,
            sum2_n,
            sum_d,
            sum2_d,
            prod,
            bc_n,
            bc_d,
            gc,
            gsum,
            xo,
            yo,
            dkeys_part,
            dgamma_part,
        }
    }
}

/// The tile carries of the forward (cn, cd, cp, cpd).
fn carry(ws: &FusedWs) -> kern::Carry {
    kern::Carry {
        cn: ws.cn,
        cd: ws.cd,
        cp: ws.cp,
        cpd: ws.cpd,
    }
}

fn nullable_len(x: Dv<f32>, n: usize, what: &str) {
    assert!(
        x.is_null() || x.len == n,
        "fused: {what} has {} elements, expected {n}",
        x.len
    );
}

// ------------------------------------------------------------------------------------------------
// launch sequences

/// Inputs and outputs of [`forward`].
#[derive(Debug, Clone, Copy)]
pub struct FwdIo {
    /// [B,H,T,d] the read output (out1)
    pub out1: Dv<f32>,
    /// [B,H,T,K] the read weights
    pub rw: Dv<f32>,
    /// nullable: the bf16 twin of rw (the refine's slot_in GEMM reads it)
    pub rw16: Dv<u16>,
    /// [B,H,T,K] nullable: the read logits (key part, content part, total)
    pub lkey: Dv<f32>,
    pub lcont: Dv<f32>,
    pub logits: Dv<f32>,
    /// [B,H,K,T] the write logits (temperature, ALiBi and attention mask applied)
    pub wl: Dv<f32>,
    /// [B,H,T,d] values and read queries
    pub v: Dv<f32>,
    pub q: Dv<f32>,
    /// [H,K,d] slot keys (after slot dropout)
    pub keys: Dv<f32>,
    /// the content read's gamma
    pub gamma: Learned,
    pub rtemp: f32,
    /// the read slot mask (`read` or `content_read_only`)
    pub mask: Option<DevSlotMask>,
    /// content read on
    pub content: bool,
}

/// The fused forward: `slot_scan_forward` + `read_logits_forward` + `read_weights_forward`
/// (softmax) + `slot_mix_forward`. Leaves `rmax`, `den` ([B,H,K,T]) and the carries in `ws`.
pub fn forward<L: Device + ?Sized>(dev: &L, p: &FusedPlan, ws: &FusedWs, io: &FwdIo) -> Result<()> {
    let (nbh, t, nk, d) = (p.nbh(), p.t, p.k, p.d);
    assert_eq!(io.out1.len, nbh * t * d, "fused forward: out1 shape");
    assert_eq!(io.rw.len, nbh * t * nk, "fused forward: rw shape");
    assert!(
        io.rw16.is_null() || io.rw16.len == io.rw.len,
        "fused forward: rw16 shape"
    );
    assert_eq!(io.wl.len, nbh * nk * t, "fused forward: wl shape");
    assert_eq!(io.v.len, nbh * t * d, "fused forward: v shape");
    assert_eq!(io.q.len, nbh * t * d, "fused forward: q shape");
    assert_eq!(io.keys.len, p.h * nk * d, "fused forward: keys shape");
    for (x, n) in [
        (io.lkey, "lkey"),
        (io.lcont, "lcont"),
        (io.logits, "logits"),
    ] {
        nullable_len(x, nbh * t * nk, n);
    }
    if let Some(m) = io.mask {
        assert_eq!(m.keep.len, nk, "fused forward: slot mask shape");
    }
    let dims = p.dims_arg();
    kern::slot_scan_read_forward_rmax(
        ws.rmax,
        io.wl,
        i32_of("B*H", nbh)?,
        i32_of("T", t)?,
        nk as i32,
    )
    .walk(dev, p.warps_grid(), 128, 0, p.t.div_ceil(32))?;
    let f = if p.tensor_cores {
        kern::slot_scan_read_forward_sums_bf16
    } else {
        kern::slot_scan_read_forward_sums
    };
    p.launch_tiles(
        dev,
        f(ws.sum_n, ws.sum_d, ws.prod, io.wl, ws.rmax, io.v, dims),
        0,
    )?;
    kern::slot_scan_read_forward_carry(carry(ws), ws.sum_n, ws.sum_d, ws.prod, ws.rmax, dims)
        .walk(dev, p.warps_grid(), 128, 0, p.ntiles)?;
    let (mask, content) = (DevSlotMask::arg(io.mask), io.content as i32);
    let f = if p.tensor_cores {
        kern::slot_scan_read_forward_bf16
    } else {
        kern::slot_scan_read_forward
    };
    p.launch_tiles(
        dev,
        f(
            io.out1,
            io.rw,
            io.lkey,
            io.lcont,
            io.logits,
            ws.den,
            ws.cn_chunk,
            io.wl,
            ws.rmax,
            io.v,
            io.q,
            io.keys,
            carry(ws),
            io.gamma,
            io.rtemp,
            mask,
            content,
            dims,
            io.rw16,
        ),
        p.smem_read() as u32,
    )
}

/// What [`mix`] also writes when it makes the refine's delta: the layer's heads output
/// base + gate * delta (the refine's out_h = out1 + gate * delta) straight into the merged
/// layout that out_proj reads, with its bf16 twin (no axpy, no merge_heads after it).
#[derive(Clone, Copy, Debug)]
pub struct MixMerge {
    /// [B,H,T,d] out1
    pub base: Dv<f32>,
    /// the refine gate
    pub gate: Learned,
    /// [B,T,H*d] (=) base + gate * delta, merged
    pub merged: Dv<f32>,
    /// nullable: the bf16 twin of merged
    pub merged16: Dv<u16>,
}

/// out [B,H,T,d] = sum_s w[b,h,t,s] * state (`slot_mix_forward` over the states of the last
/// [`forward`], which must have run with the same `wl`, `v`); with `merge`, also its
/// [`MixMerge`] output. `z`: null, or (tensor-core plans only) the refine's slot_out output
/// [B,H,T,K], whose tanh (`tanh_forward`) the kernel takes as the weights and stores into `w`.
#[allow(clippy::too_many_arguments)]
pub fn mix<L: Device + ?Sized>(
    dev: &L,
    p: &FusedPlan,
    ws: &FusedWs,
    out: Dv<f32>,
    w: Dv<f32>,
    wl: Dv<f32>,
    v: Dv<f32>,
    merge: Option<MixMerge>,
    z: Dv<f32>,
) -> Result<()> {
    let (nbh, t, nk, d) = (p.nbh(), p.t, p.k, p.d);
    assert_eq!(out.len, nbh * t * d, "fused mix: out shape");
    assert_eq!(w.len, nbh * t * nk, "fused mix: w shape");
    assert!(z.is_null() || z.len == w.len, "fused mix: z shape");
    assert!(
        z.is_null() || p.tensor_cores,
        "fused mix: tanh of z on tensor-core plans only"
    );
    assert_eq!(wl.len, nbh * nk * t, "fused mix: wl shape");
    assert_eq!(v.len, nbh * t * d, "fused mix: v shape");
    let m = match merge {
        Some(m) => {
            assert_eq!(m.base.len, out.len, "fused mix: base shape");
            assert_eq!(m.merged.len, out.len, "fused mix: merged shape");
            assert!(
                m.merged16.is_null() || m.merged16.len == out.len,
                "fused mix: merged16 shape"
            );
            m
        }
        None => MixMerge {
            base: Dv::null(),
            gate: Learned::value(0.0),
            merged: Dv::null(),
            merged16: Dv::null(),
        },
    };
    let dims = p.dims_arg();
    if p.tensor_cores {
        return p.launch_tc(
            dev,
            kern::slot_scan_read_mix_bf16(
                out,
                w,
                z,
                wl,
                ws.rmax,
                v,
                ws.den,
                carry(ws),
                dims,
                m.merged,
                m.merged16,
                m.base,
                m.gate,
            ),
        );
    }
    kern::slot_scan_read_mix(
        out,
        w,
        wl,
        ws.rmax,
        v,
        carry(ws),
        dims,
        m.merged,
        m.merged16,
        m.base,
        m.gate,
    )
    .walk(dev, p.tiles_grid(), p.block(), p.smem_mix() as u32, p.tile)
}

/// `tanh_backward` of the refine's signed slot weights, joined to [`dot`]: dz [B,H,T,K] +=
/// dsw * (1 - sw^2), with its bf16 twin (nullable).
#[derive(Clone, Copy, Debug)]
pub struct TanhBack {
    pub dz: Dv<f32>,
    pub dz16: Dv<u16>,
    /// [B,H,T,K] the weights tanh(z)
    pub sw: Dv<f32>,
}

/// out [B,H,T,K] += x . state (the weight gradient of `slot_mix_backward` over the states of
/// the last [`forward`]); with `tanh` (tensor-core plans only) also its [`TanhBack`] on the
/// updated out.
#[allow(clippy::too_many_arguments)]
pub fn dot<L: Device + ?Sized>(
    dev: &L,
    p: &FusedPlan,
    ws: &FusedWs,
    out: Dv<f32>,
    x: Dv<f32>,
    wl: Dv<f32>,
    v: Dv<f32>,
    tanh: Option<TanhBack>,
) -> Result<()> {
    let (nbh, t, nk, d) = (p.nbh(), p.t, p.k, p.d);
    assert_eq!(out.len, nbh * t * nk, "fused dot: out shape");
    assert_eq!(x.len, nbh * t * d, "fused dot: x shape");
    assert_eq!(wl.len, nbh * nk * t, "fused dot: wl shape");
    assert_eq!(v.len, nbh * t * d, "fused dot: v shape");
    if let Some(tb) = &tanh {
        assert!(
            p.tensor_cores,
            "fused dot: tanh_backward on tensor-core plans only"
        );
        assert!(
            tb.dz.len == out.len && tb.sw.len == out.len,
            "fused dot: dz, sw shape"
        );
        assert!(
            tb.dz16.is_null() || tb.dz16.len == out.len,
            "fused dot: dz16 shape"
        );
    }
    if p.tensor_cores {
        let tb = tanh.unwrap_or(TanhBack {
            dz: Dv::null(),
            dz16: Dv::null(),
            sw: Dv::null(),
        });
        return p.launch_tc(
            dev,
            kern::slot_scan_read_dot_bf16(
                out,
                x,
                wl,
                ws.rmax,
                v,
                ws.den,
                carry(ws),
                p.dims_arg(),
                tb.dz,
                tb.dz16,
                tb.sw,
            ),
        );
    }
    kern::slot_scan_read_dot(out, x, wl, ws.rmax, v, carry(ws), p.dims_arg()).walk(
        dev,
        p.tiles_grid(),
        p.block(),
        0,
        p.tile,
    )
}

/// Inputs and outputs of [`backward`]. Gradient outputs accumulate (`+=`) except `dgamma`.
#[derive(Debug, Clone, Copy)]
pub struct BwdIo {
    /// [B,H,K,T] += d(write logits)
    pub dwl: Dv<f32>,
    /// [B,H,T,d] += d(values), d(read queries)
    pub dv: Dv<f32>,
    pub dq: Dv<f32>,
    /// [H,K,d] += d(slot keys) of the read logits
    pub dkeys: Dv<f32>,
    /// [1] (=) d(gamma) = sum dlogits * lcont (f64); may be null
    pub dgamma: Dv<f64>,
    /// [1] nullable, with dgamma: += (f32)(d(gamma) * gamma_factor), the gradient of the
    /// parameter gamma comes from (d gamma / d raw)
    pub dgamma_grad: Dv<f32>,
    pub gamma_factor: f64,
    /// [B,H,T,d] d(out1)
    pub dout1: Dv<f32>,
    /// [B,H,T,K] nullable: the refine path's gradient into the read weights
    pub drw: Dv<f32>,
    /// [B,H,T,K] the read weights of the forward
    pub rw: Dv<f32>,
    /// refine (all null without it): sw [B,H,T,K] the slotspace weights, ddelta [B,H,T,d] the
    /// gradient of delta = sum_s sw * state, dsw [B,H,T,K] = ddelta . state (from [`dot`])
    pub sw: Dv<f32>,
    pub ddelta: Dv<f32>,
    pub dsw: Dv<f32>,
    /// the forward's inputs
    pub q: Dv<f32>,
    pub keys: Dv<f32>,
    pub v: Dv<f32>,
    pub wl: Dv<f32>,
    /// the content read's gamma (where it is read at `gamma.at`, so is `gamma_factor`)
    pub gamma: Learned,
    pub rtemp: f32,
    pub mask: Option<DevSlotMask>,
    pub content: bool,
}

/// The fused backward of [`forward`] (plus the refine's state path): `slot_mix_backward` (out1
/// and delta), `read_weights_backward` (softmax), `read_logits_backward`, `slot_scan_backward`.
/// Needs the workspace of the forward untouched.
pub fn backward<L: Device + ?Sized>(
    dev: &L,
    p: &FusedPlan,
    ws: &FusedWs,
    io: &BwdIo,
) -> Result<()> {
    let (nbh, t, nk, d) = (p.nbh(), p.t, p.k, p.d);
    assert_eq!(io.dwl.len, nbh * nk * t, "fused backward: dwl shape");
    assert_eq!(io.dv.len, nbh * t * d, "fused backward: dv shape");
    assert_eq!(io.dq.len, nbh * t * d, "fused backward: dq shape");
    assert_eq!(io.dkeys.len, p.h * nk * d, "fused backward: dkeys shape");
    assert!(
        io.dgamma.is_null() || io.dgamma.len >= 1,
        "fused backward: dgamma"
    );
    assert_eq!(io.dout1.len, nbh * t * d, "fused backward: dout1 shape");
    nullable_len(io.drw, nbh * t * nk, "drw");
    assert_eq!(io.rw.len, nbh * t * nk, "fused backward: rw shape");
    let refine = !io.sw.is_null();
    assert!(
        io.ddelta.is_null() != refine && io.dsw.is_null() != refine,
        "fused backward: sw, ddelta and dsw go together"
    );
    nullable_len(io.sw, nbh * t * nk, "sw");
    nullable_len(io.dsw, nbh * t * nk, "dsw");
    nullable_len(io.ddelta, nbh * t * d, "ddelta");
    assert_eq!(io.q.len, nbh * t * d, "fused backward: q shape");
    assert_eq!(io.v.len, nbh * t * d, "fused backward: v shape");
    assert_eq!(io.keys.len, p.h * nk * d, "fused backward: keys shape");
    assert_eq!(io.wl.len, nbh * nk * t, "fused backward: wl shape");
    if let Some(m) = io.mask {
        assert_eq!(m.keep.len, nk, "fused backward: slot mask shape");
    }
    let dims = p.dims_arg();
    let (tg, blk) = (p.tiles_grid(), p.block());
    // read backward: dq, key/gamma partials, gc, gsum
    let (mask, content) = (DevSlotMask::arg(io.mask), io.content as i32);
    if p.tensor_cores {
        p.launch_tc(
            dev,
            kern::slot_scan_read_backward_read_bf16(
                io.dq,
                ws.gc,
                ws.gsum,
                ws.dkeys_part,
                ws.dgamma_part,
                io.drw,
                io.dout1,
                io.rw,
                io.sw,
                io.dsw,
                io.q,
                io.keys,
                io.wl,
                ws.rmax,
                io.v,
                ws.den,
                carry(ws),
                io.gamma,
                io.rtemp,
                mask,
                content,
                dims,
            ),
        )?;
    } else {
        kern::slot_scan_read_backward_read(
            io.dq,
            ws.gc,
            ws.gsum,
            ws.dkeys_part,
            ws.dgamma_part,
            io.drw,
            io.dout1,
            io.rw,
            io.sw,
            io.dsw,
            io.q,
            io.keys,
            io.wl,
            ws.rmax,
            io.v,
            carry(ws),
            io.gamma,
            io.rtemp,
            mask,
            content,
            dims,
        )
        .walk(dev, tg, blk, p.smem_read() as u32, p.tile)?;
    }
    // a block per (head, slot): groups of d threads (head_dim <= 256) sum batches' tiles side
    // by side, as many groups as batches up to 1,024 threads; with dgamma one more block sums
    // the gamma partials
    let kb = (p.b.clamp(1, 1024 / d) * d).next_multiple_of(32);
    let groups = kb / d; // the kernel's count (blockDim.x / d)
    let items = p.h * nk + usize::from(!io.dgamma.is_null());
    assert!(
        io.dgamma_grad.is_null() || !io.dgamma.is_null(),
        "fused backward: dgamma_grad without dgamma"
    );
    kern::slot_scan_read_backward_keys(
        io.dkeys,
        ws.dkeys_part,
        p.b as i32,
        p.h as i32,
        p.ntiles as i32,
        nk as i32,
        d as i32,
        io.dgamma,
        io.dgamma_grad,
        super::ops::step_arg(io.gamma_factor, io.gamma.at),
        ws.dgamma_part,
        i32_of("B*H*tiles", nbh * p.ntiles)?,
        io.gamma.at,
    )
    .walk(
        dev,
        items.clamp(1, 65535) as u32,
        kb as u32,
        (groups * d * 4) as u32,
        (p.b.div_ceil(groups) * p.ntiles).max((nbh * p.ntiles).div_ceil(kb)),
    )?;
    // scan backward, level 1: tile sums (reverse)
    let f = if p.tensor_cores {
        kern::slot_scan_read_backward_sums_bf16
    } else {
        kern::slot_scan_read_backward_sums
    };
    p.launch_tiles(
        dev,
        f(
            ws.sum_n, ws.sum_d, ws.sum2_n, ws.sum2_d, ws.prod, io.rw, io.sw, ws.gc, ws.gsum,
            io.dout1, io.ddelta, io.q, ws.den, ws.rmax, dims,
        ),
        0,
    )?;
    // level 2: carries at tile ends
    kern::slot_scan_read_backward_carry(
        ws.bc_n, ws.bc_d, ws.sum_n, ws.sum_d, ws.sum2_n, ws.sum2_d, ws.prod, ws.rmax, dims,
    )
    .walk(dev, p.warps_grid(), 128, 0, p.ntiles)?;
    // level 3: reverse walk -> dv, xo, yo
    let f = if p.tensor_cores {
        kern::slot_scan_read_backward_bf16
    } else {
        kern::slot_scan_read_backward
    };
    p.launch_tiles(
        dev,
        f(
            io.dv,
            ws.xo,
            ws.yo,
            ws.bc_n,
            ws.bc_d,
            ws.cn_chunk,
            io.rw,
            io.sw,
            ws.gc,
            ws.gsum,
            io.dout1,
            io.ddelta,
            io.q,
            io.v,
            io.wl,
            ws.den,
            ws.rmax,
            dims,
        ),
        p.smem_mix() as u32,
    )?;
    // running max
    kern::slot_scan_read_backward_route(
        io.dwl,
        ws.cm,
        ws.xo,
        ws.yo,
        io.wl,
        ws.rmax,
        nbh as i32,
        t as i32,
        nk as i32,
        p.chunk as i32,
    )
    .walk(
        dev,
        p.warps_grid(),
        128,
        0,
        2 * t.div_ceil(32), // forward and reverse passes
    )
}

// ------------------------------------------------------------------------------------------------
// the GPU layer's state

/// The plan for a layer forward, or `None` when the op-by-op path must run: the intervene
/// variant, a routing other than softmax, or a shape the fused kernels do not support.
/// The tile comes from `ASA_CUDA_FUSED_TILE` or [`FusedPlan::auto_tile`]. Under
/// `Precision::Bf16` ([`super::tensor_cores`]) the tiles run on tensor cores where the plan
/// allows it (tiles then never hold more than one write chunk: chunks shorter than the tile are
/// the tiles).
pub fn layer_plan<D: Device + ?Sized>(
    dev: &D,
    cfg: &ModelConfig,
    softmax_routing: bool,
    dm: SlotDims,
) -> Option<FusedPlan> {
    if cfg.variant == Variant::Intervene || !softmax_routing {
        return None;
    }
    let mut tile = std::env::var(FUSED_TILE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&v| (1..=1024).contains(&v))
        .unwrap_or_else(|| FusedPlan::auto_tile(dm.b * dm.h, dm.t, dev.sm_count()));
    let bf16 = super::tensor_cores(dev);
    let chunk = cfg.write_chunk_size.max(1);
    if bf16 && chunk < tile && chunk < dm.t {
        tile = chunk;
    }
    Some(FusedPlan::new(dm, cfg.write_chunk_size, tile)?.with_tensor_cores(bf16, dev.max_smem()))
}

/// The fused path's device state in a layer cache: the plan of the last forward, the
/// workspace (kept from the forward for the backward), and the refine backward's inputs.
#[derive(Default)]
pub struct FusedState {
    plan: Option<FusedPlan>,
    b64: Option<Temp<f64>>,
    b32: Option<Temp<f32>>,
    ws: Option<FusedWs>,
    /// ddelta [B,H,T,d] and dsw [B,H,T,K] of the last `refine_backward` (the caller's ranges,
    /// which it keeps until `backward`: no copies)
    refine_io: Option<(Dv<f32>, Dv<f32>)>,
}

impl FusedState {
    /// Whether the last forward ran fused.
    pub fn active(&self) -> bool {
        self.plan.is_some()
    }

    /// Marks the next forward as op by op.
    pub fn deactivate(&mut self) {
        self.plan = None;
        self.refine_io = None;
    }

    fn ensure<B: Backend>(&mut self, be: &B, plan: FusedPlan) -> Result<FusedWs> {
        let (n64, n32) = plan.ws_len();
        if self.b64.as_ref().map(|b| b.len() < n64).unwrap_or(true) {
            self.b64 = Some(be.temp::<f64>(n64)?);
        }
        if self.b32.as_ref().map(|b| b.len() < n32).unwrap_or(true) {
            self.b32 = Some(be.temp::<f32>(n32)?);
        }
        let ws = FusedWs::carve(
            &plan,
            self.b64.as_ref().unwrap().dv(),
            self.b32.as_ref().unwrap().dv(),
        );
        self.ws = Some(ws);
        self.plan = Some(plan);
        self.refine_io = None;
        Ok(ws)
    }

    fn get(&self) -> Result<(FusedPlan, FusedWs)> {
        match (self.plan, self.ws) {
            (Some(p), Some(w)) => Ok((p, w)),
            _ => Err(AsaError::Other(
                "fused slot scan: no fused forward to go back through".into(),
            )),
        }
    }

    /// The fused forward of a layer (see [`forward`]).
    pub fn forward<B: Backend>(&mut self, be: &B, plan: FusedPlan, io: &FwdIo) -> Result<()> {
        let ws = self.ensure(be, plan)?;
        forward(be, &plan, &ws, io)
    }

    /// The refine's delta = sum_s sw * state, and with `merge` the layer's merged heads (see
    /// [`mix`]).
    #[allow(clippy::too_many_arguments)]
    /// `z`: null, or the refine's slot_out output whose tanh the weights `w` are (stored
    /// into `w`: by the tensor-core mix itself, else by `tanh_forward` before it).
    #[allow(clippy::too_many_arguments)]
    pub fn mix<B: Backend>(
        &self,
        be: &B,
        out: Dv<f32>,
        w: Dv<f32>,
        wl: Dv<f32>,
        v: Dv<f32>,
        merge: Option<MixMerge>,
        z: Dv<f32>,
    ) -> Result<()> {
        let (p, ws) = self.get()?;
        if !p.tensor_cores && !z.is_null() {
            be.tanh_forward(w, z)?;
            return mix(be, &p, &ws, out, w, wl, v, merge, Dv::null());
        }
        mix(be, &p, &ws, out, w, wl, v, merge, z)
    }

    /// The refine backward's state part: dsw [B,H,T,K] += ddelta . state. [`FusedState::backward`]
    /// then reads ddelta and dsw where they are (it adds sw * ddelta to the state gradient): the
    /// caller keeps both ranges alive and unchanged until then.
    /// With `tanh`, also its [`TanhBack`] (in the tensor-core dot, else by `tanh_backward`
    /// after it).
    pub fn refine_backward<B: Backend>(
        &mut self,
        be: &B,
        dsw: Dv<f32>,
        ddelta: Dv<f32>,
        wl: Dv<f32>,
        v: Dv<f32>,
        tanh: Option<TanhBack>,
    ) -> Result<()> {
        let (p, ws) = self.get()?;
        match tanh {
            Some(tb) if !p.tensor_cores => {
                dot(be, &p, &ws, dsw, ddelta, wl, v, None)?;
                be.tanh_backward(tb.dz, tb.sw, dsw, tb.dz16)?;
            }
            _ => dot(be, &p, &ws, dsw, ddelta, wl, v, tanh)?,
        }
        self.refine_io = Some((ddelta, dsw));
        Ok(())
    }

    /// The fused backward (see [`backward`]); `io.sw` is the slotspace weights when the layer
    /// has a refine path (its `ddelta`, `dsw` fields are filled from `refine_backward`).
    pub fn backward<B: Backend>(&mut self, be: &B, io: &BwdIo) -> Result<()> {
        let (p, ws) = self.get()?;
        let mut io = *io;
        if !io.sw.is_null() {
            let Some((ddelta, dsw)) = self.refine_io else {
                return Err(AsaError::Other(
                    "fused slot scan: refine_backward must run before backward".into(),
                ));
            };
            io.ddelta = ddelta;
            io.dsw = dsw;
        } else {
            io.ddelta = Dv::null();
            io.dsw = Dv::null();
        }
        let r = backward(be, &p, &ws, &io);
        self.refine_io = None;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm(b: usize, h: usize, t: usize, k: usize, d: usize) -> SlotDims {
        SlotDims { b, h, t, k, d }
    }

    /// Tile bounds as the kernels compute them (`fu_tile`).
    fn tile_bounds(p: &FusedPlan, i: usize) -> (usize, usize) {
        match (i.checked_div(p.nsub), i.checked_rem(p.nsub)) {
            (Some(ci), Some(kk)) => {
                let cs = ci * p.chunk;
                let t0 = cs + kk * p.tile;
                (t0, (t0 + p.tile).min(cs + p.chunk).min(p.t))
            }
            _ => {
                let t0 = i * p.tile;
                (t0, (t0 + p.tile).min(p.t))
            }
        }
    }

    #[test]
    fn tiles_cover_time_and_respect_chunks() {
        for t in [1usize, 2, 5, 23, 64, 65, 100, 257, 1000] {
            for chunk in [1usize, 3, 7, 16, 64, 100, 128, 1000, 5000] {
                for lmax in [1usize, 2, 3, 4, 16, 64] {
                    let p = FusedPlan::new(dm(2, 3, t, 5, 12), chunk, lmax).unwrap();
                    let c = p.chunk;
                    let mut next = 0;
                    for i in 0..p.ntiles {
                        let (t0, t1) = tile_bounds(&p, i);
                        assert_eq!(t0, next, "t{t} c{chunk} l{lmax} tile {i}");
                        assert!(t1 > t0 && t1 - t0 <= lmax);
                        if p.nsub == 0 {
                            assert_eq!(t0 % c, 0);
                            assert!(t1 % c == 0 || t1 == t);
                        } else {
                            // inside one chunk
                            assert_eq!(t0 / c, (t1 - 1) / c);
                        }
                        next = t1;
                    }
                    assert_eq!(next, t, "t{t} c{chunk} l{lmax}");
                    assert_eq!(p.nchunks, t.div_ceil(c));
                }
            }
        }
    }

    #[test]
    fn thread_layout_limits() {
        let p = FusedPlan::new(dm(1, 4, 256, 32, 64), 128, 64).unwrap();
        assert_eq!((p.group, p.warps, p.block()), (8, 8, 256));
        let p = FusedPlan::new(dm(16, 4, 32, 16, 32), 32, 64).unwrap();
        assert_eq!((p.group, p.warps), (4, 2));
        let p = FusedPlan::new(dm(2, 4, 23, 6, 12), 5, 64).unwrap();
        assert_eq!((p.group, p.warps, p.nsub, p.tile), (2, 1, 0, 60));
        assert!(FusedPlan::new(dm(1, 1, 8, 128, 64), 4, 64).is_none()); // 32 warps
        assert!(FusedPlan::new(dm(1, 1, 8, 129, 8), 4, 64).is_none());
        assert!(FusedPlan::new(dm(1, 1, 8, 4, 257), 4, 64).is_none());
        for d in 1..=256 {
            if let Some(p) = FusedPlan::new(dm(1, 1, 8, 4, d), 4, 64) {
                assert!(p.group * FU_E >= d && p.group <= 32);
                assert!(p.smem_read() <= SMEM_LIMIT);
            }
        }
        assert_eq!(FusedPlan::auto_tile(4, 4096, 132), 64);
        assert_eq!(FusedPlan::auto_tile(4, 1024, 132), 16);
        assert_eq!(FusedPlan::auto_tile(4, 256, 132), MIN_TILE);
        assert_eq!(FusedPlan::auto_tile(4, 1 << 20, 132), MAX_TILE);
    }
}
