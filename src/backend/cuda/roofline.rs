//! A roofline prediction of the GPU step's time from what [`super::cost::CountingDevice`]
//! counted and what `ptxas` / `nvdisasm` say of each kernel (issue 11), so that speed work can
//! be judged without a GPU.
//!
//! Per kernel launch (averaged over its launches), the largest of four bounds plus a launch gap:
//! - **memory**: the bytes of the device ranges passed to it (each read or written once) over
//!   the sustained HBM bandwidth ([`MEM_EFF`] of the peak);
//! - **issue**: the warp-instructions of the busiest SM (ceil(blocks / SMs) blocks of `w` warps,
//!   each running its static SASS `steps` times) over 4 schedulers x 1 instruction per clock;
//! - **fp64**: the same count of fp64 instructions over the SM's 2 fp64 warp-instructions per
//!   clock (64 fp64 lanes on sm_90);
//! - **latency**: the waves of resident blocks (ceil(blocks / (SMs x blocks per SM at the
//!   kernel's occupancy))) times one block's critical path: `steps` x static instructions x
//!   [`CPI_DEP`] clocks.
//!
//! `steps` is what the launcher declares with [`super::Device::walk_launch`] (the positions of
//! a tile a block walks, the chunks a carry walks; 1 for the rest), and "each step runs the
//! kernel's whole static code" is the model's simplification: it overstates kernels with large
//! prologues or feature branches not taken, and understates nested loops. Without `ptxas` and
//! `nvdisasm` only the memory bound and the gap remain.
//!
//! A GEMM (cuBLAS) is tiled into 128 x 128 output tiles, and split along K when there are
//! fewer tiles than SMs ([`gemm_split_k`]); its time is the waves of (tile, split) pieces over
//! the SMs, each `2 x 128 x 128 x k / splits` FLOPs at an SM's share of the tensor-core peak
//! (bf16) or of the SIMT fp32 peak (f32) times [`GEMM_EFF`], or its bytes (operands, C, split
//! partials) over the bandwidth, whichever is larger, plus the gap. Memsets and copies are bandwidth plus a gap;
//! each device allocation costs [`ALLOC_S`] and each blocking host sync [`SYNC_S`] (the queue
//! drains and refills). Nothing overlaps: the step is the sum.

use serde::Serialize;

use super::cost::{GemmShape, KernelCount, StepCounts};

/// The peaks of one GPU.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GpuPeaks {
    pub name: &'static str,
    pub sms: usize,
    /// boost clock (Hz)
    pub clock_hz: f64,
    /// HBM bandwidth (bytes/s)
    pub hbm_bytes_per_s: f64,
    /// dense bf16 tensor-core FLOP/s (f32 accumulate)
    pub bf16_tensor_flops: f64,
    /// SIMT fp32 FLOP/s (FMA = 2)
    pub f32_flops: f64,
}

/// H100 SXM5: 132 SMs at 1.98 GHz, 3.35 TB/s, 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32.
pub const H100_SXM: GpuPeaks = GpuPeaks {
    name: "H100 SXM",
    sms: 132,
    clock_hz: 1.98e9,
    hbm_bytes_per_s: 3.35e12,
    bf16_tensor_flops: 989.4e12,
    f32_flops: 66.9e12,
};

/// H200: the H100 SXM's SMs and clocks with 4.8 TB/s of HBM3e.
pub const H200: GpuPeaks = GpuPeaks {
    name: "H200",
    hbm_bytes_per_s: 4.8e12,
    ..H100_SXM
};

/// The GPUs `--gpu` names.
pub fn gpu_peaks(name: &str) -> Option<GpuPeaks> {
    match name {
        "h100" | "h100-sxm" => Some(H100_SXM),
        "h200" => Some(H200),
        _ => None,
    }
}

/// Sustained fraction of the HBM peak a streaming kernel reaches.
pub const MEM_EFF: f64 = 0.8;
/// Sustained fraction of the tensor-core (or fp32) peak inside a GEMM tile.
pub const GEMM_EFF: f64 = 0.75;
/// Clocks between dependent instructions of one warp (ALU ~4, fp64 ~8, shared ~30, L2 ~200;
/// a serial walk's mix, most of it register arithmetic).
pub const CPI_DEP: f64 = 4.0;
/// Gap between two launches on a stream without a CUDA graph (launch latency and tail).
pub const LAUNCH_S: f64 = 2.0e-6;
/// One stream-ordered device allocation.
pub const ALLOC_S: f64 = 2.0e-6;
/// One blocking host synchronisation: the device's queue drains and the host round trip.
pub const SYNC_S: f64 = 10.0e-6;
/// cuBLAS output tile (square).
pub const GEMM_TILE: usize = 128;

/// What `ptxas` and `nvdisasm` say of a kernel, as the model needs it.
#[derive(Debug, Clone, Copy)]
pub struct KernelStatic {
    /// static SASS instructions
    pub instructions: u32,
    pub fp64: u32,
    /// active warps over the SM's warps at the launch shape
    pub occupancy: f64,
}

/// A predicted time per step and the bound that set it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub ms: f64,
    /// `memory`, `issue`, `fp64`, `latency`, `tensor`, `fp32` or `launch`
    pub bound: &'static str,
}

fn largest(bounds: &[(&'static str, f64)]) -> (&'static str, f64) {
    bounds
        .iter()
        .copied()
        .fold(("launch", 0.0), |a, b| if b.1 > a.1 { b } else { a })
}

/// One kernel's time per step (all its launches).
pub fn kernel(p: &GpuPeaks, k: &KernelCount, st: Option<KernelStatic>) -> Prediction {
    if k.launches == 0 {
        return Prediction {
            ms: 0.0,
            bound: "launch",
        };
    }
    let n = k.launches as f64;
    let blocks = (k.blocks as f64 / n).ceil().max(1.0);
    let mut bounds = vec![("memory", k.bytes as f64 / n / (p.hbm_bytes_per_s * MEM_EFF))];
    if let Some(st) = st {
        let warps = k.threads_per_block.div_ceil(32).max(1) as f64;
        let steps = k.steps.max(1) as f64;
        let sms = p.sms as f64;
        let per_sm = (blocks / sms).ceil() * warps * steps; // warp-passes on the busiest SM
        let resident = (st.occupancy * 64.0 / warps).floor().max(1.0);
        let waves = (blocks / (sms * resident)).ceil();
        bounds.push((
            "issue",
            per_sm * st.instructions as f64 / (4.0 * p.clock_hz),
        ));
        bounds.push(("fp64", per_sm * st.fp64 as f64 / (2.0 * p.clock_hz)));
        bounds.push((
            "latency",
            waves * steps * st.instructions as f64 * CPI_DEP / p.clock_hz,
        ));
    }
    let (bound, s) = largest(&bounds);
    Prediction {
        ms: 1e3 * n * (s + LAUNCH_S),
        bound,
    }
}

/// Bytes one GEMM moves: its operands (bf16 or f32) once, C (f32) written, and read too when
/// it accumulates.
pub fn gemm_bytes(g: &GemmShape, bf16: bool) -> f64 {
    let el = if bf16 { 2.0 } else { 4.0 };
    let c_passes = if g.accumulate { 2.0 } else { 1.0 };
    el * (g.m * g.k + g.k * g.n) as f64 + 4.0 * c_passes * (g.m * g.n) as f64
}

/// The K-splits of a GEMM with fewer output tiles than SMs (cuBLAS' split-K for the weight
/// gradients' long sums): enough to fill the SMs, each at least 256 long.
pub fn gemm_split_k(p: &GpuPeaks, g: &GemmShape) -> usize {
    let tiles = g.m.div_ceil(GEMM_TILE) * g.n.div_ceil(GEMM_TILE);
    if tiles >= p.sms {
        return 1;
    }
    (p.sms / tiles).min(g.k / 256).max(1)
}

/// `calls` cuBLAS GEMMs of one shape; `bf16`: tensor cores, else SIMT fp32.
pub fn gemm(p: &GpuPeaks, g: &GemmShape, calls: u64, bf16: bool) -> Prediction {
    let tiles = g.m.div_ceil(GEMM_TILE) * g.n.div_ceil(GEMM_TILE);
    let split = gemm_split_k(p, g);
    let waves = (tiles * split).div_ceil(p.sms) as f64;
    let peak = if bf16 {
        p.bf16_tensor_flops
    } else {
        p.f32_flops
    };
    let tile_flops = 2.0 * (GEMM_TILE * GEMM_TILE) as f64 * g.k.div_ceil(split) as f64;
    let compute = waves * tile_flops / (peak / p.sms as f64 * GEMM_EFF);
    // split-K partial sums are written and read back once more
    let partials = if split > 1 {
        8.0 * (split * g.m * g.n) as f64
    } else {
        0.0
    };
    let (bound, s) = largest(&[
        (if bf16 { "tensor" } else { "fp32" }, compute),
        (
            "memory",
            (gemm_bytes(g, bf16) + partials) / (p.hbm_bytes_per_s * MEM_EFF),
        ),
    ]);
    Prediction {
        ms: 1e3 * calls as f64 * (s + LAUNCH_S),
        bound,
    }
}

/// The step's costs outside kernels and GEMMs (ms): memsets, copies, allocations, host syncs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Overheads {
    pub memsets_ms: f64,
    pub copies_ms: f64,
    pub allocations_ms: f64,
    pub host_syncs_ms: f64,
}

impl Overheads {
    pub fn of(p: &GpuPeaks, c: &StepCounts) -> Self {
        let bw = p.hbm_bytes_per_s * MEM_EFF;
        Overheads {
            memsets_ms: 1e3 * (c.memsets as f64 * LAUNCH_S + c.memset_bytes as f64 / bw),
            // a copy reads and writes its bytes
            copies_ms: 1e3 * (c.copies as f64 * LAUNCH_S + 2.0 * c.copy_bytes as f64 / bw),
            allocations_ms: 1e3 * c.device_allocations as f64 * ALLOC_S,
            host_syncs_ms: 1e3 * c.host_syncs as f64 * SYNC_S,
        }
    }

    pub fn total_ms(&self) -> f64 {
        self.memsets_ms + self.copies_ms + self.allocations_ms + self.host_syncs_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(launches: u64, blocks: u64, threads: u32, bytes: u64, steps: u64) -> KernelCount {
        KernelCount {
            launches,
            blocks,
            threads_per_block: threads,
            dyn_smem_bytes: 0,
            bytes,
            steps,
        }
    }

    /// A streaming kernel is bound by its bytes: 1 GB at 80% of 3.35 TB/s is 0.373 ms.
    #[test]
    fn a_streaming_kernel_is_memory_bound() {
        let k = count(1, 132 * 32, 256, 1_000_000_000, 1);
        let st = KernelStatic {
            instructions: 400,
            fp64: 0,
            occupancy: 1.0,
        };
        let pr = kernel(&H100_SXM, &k, Some(st));
        assert_eq!(pr.bound, "memory");
        let want = 1e3 * (1e9 / (3.35e12 * MEM_EFF) + LAUNCH_S);
        assert!((pr.ms - want).abs() < 1e-9, "{} vs {want}", pr.ms);
        // the H200's bandwidth makes it faster by 4.8 / 3.35
        assert!(kernel(&H200, &k, Some(st)).ms < pr.ms);
    }

    /// A serial walk: one block of one warp walking 1,000 steps of 100 instructions is
    /// latency-bound at 1,000 x 100 x CPI_DEP clocks; more blocks than fit in one wave add
    /// waves; launches add up.
    #[test]
    fn a_serial_walk_is_latency_bound_and_counts_waves() {
        let st = KernelStatic {
            instructions: 100,
            fp64: 10,
            occupancy: 1.0 / 64.0, // one warp per SM
        };
        let one = kernel(&H100_SXM, &count(1, 1, 32, 0, 1000), Some(st));
        assert_eq!(one.bound, "latency");
        let want = 1e3 * (1000.0 * 100.0 * CPI_DEP / 1.98e9 + LAUNCH_S);
        assert!((one.ms - want).abs() < 1e-9);
        // 133 blocks on 132 SMs with one resident block each: two waves
        let two = kernel(&H100_SXM, &count(1, 133, 32, 0, 1000), Some(st));
        assert!((two.ms - 1e3 * LAUNCH_S - 2.0 * (one.ms - 1e3 * LAUNCH_S)).abs() < 1e-9);
        let three_launches = kernel(&H100_SXM, &count(3, 3, 32, 0, 1000), Some(st));
        assert!((three_launches.ms - 3.0 * one.ms).abs() < 1e-9);
        // without static columns only the memory bound is left
        let bare = kernel(&H100_SXM, &count(1, 1, 32, 0, 1000), None);
        assert_eq!(bare.bound, "launch");
    }

    /// A large square bf16 GEMM runs at GEMM_EFF of the tensor peak; fewer output tiles than
    /// SMs are split along K.
    #[test]
    fn gemms_follow_tiles_and_waves() {
        let shape = |m, n, k| GemmShape {
            ops: "NN".into(),
            m,
            n,
            k,
            accumulate: false,
        };
        let big = gemm(&H100_SXM, &shape(8192, 8192, 8192), 1, true);
        assert_eq!(big.bound, "tensor");
        let flops = 2.0 * 8192f64.powi(3);
        let ideal = 1e3 * flops / (989.4e12 * GEMM_EFF);
        // 4096 tiles = 31.03 waves -> 32 waves: 3% over the ideal
        assert!(
            big.ms > ideal && big.ms < 1.04 * ideal + 1e-2,
            "{} {ideal}",
            big.ms
        );
        let t36 = gemm(&H100_SXM, &shape(768, 768, 8192), 1, true);
        let t132 = gemm(&H100_SXM, &shape(1408, 1536, 8192), 1, true);
        assert_eq!(gemm_split_k(&H100_SXM, &shape(768, 768, 8192)), 3);
        assert_eq!(gemm_split_k(&H100_SXM, &shape(1408, 1536, 8192)), 1);
        // 36 tiles split in 3 = 108 pieces: one wave of a third of the work
        assert!(t36.ms < t132.ms / 2.0, "{} {}", t36.ms, t132.ms);
        // one tile, a long sum: split to fill the SMs (the slotspace weights' gradients)
        assert_eq!(gemm_split_k(&H100_SXM, &shape(64, 64, 65536)), 132);
        // f32 runs at the SIMT peak: 989.4 / 66.9 = 14.8x slower than bf16
        let f32 = gemm(&H100_SXM, &shape(8192, 8192, 8192), 1, false);
        assert_eq!(f32.bound, "fp32");
        assert!((f32.ms / big.ms - 14.8).abs() < 0.1, "{}", f32.ms / big.ms);
    }
}
