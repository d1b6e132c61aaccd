//! The GPU step's cost without a GPU (issue 11): a [`Device`] that executes nothing and counts
//! what the real step orchestration asks of it, and the occupancy of a kernel at its launch
//! shape from `ptxas` resources.
//!
//! [`CountingDevice`] stands in for [`super::CudaBackend`] under the same [`super::GpuLm`] code,
//! so every launch, GEMM, host synchronisation, allocation, memset and copy of a training step
//! is counted exactly as that code issues it (the GEMM's bf16 conversions as
//! `ops::cublas_gemm` makes them). Device pointers are fake addresses. Downloads return small
//! finite values that differ from one download to the next (the orchestration reads back the
//! loss, the norm and the scalar parameters), so choices that depend on them behave as on a
//! device during training: a buffer re-uploaded only when it changes (the ALiBi bias follows a
//! learned strength) is uploaded every step here too. Nothing here needs a GPU, a driver or
//! NVRTC.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use cudarc::driver::LaunchConfig;
use serde::Serialize;

use super::ops::{self, Gemm, Ops};
use super::{Bf16Copy, Device, Dv, Elem, KArg, Precision, Temp, TempCache, SMEM_DEFAULT};
use crate::error::Result;

/// Streaming multiprocessors of an H100 SXM (the cost model's reference device).
pub const H100_SMS: usize = 132;

/// What one kernel name was launched with during the counted work.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct KernelCount {
    pub launches: u64,
    /// blocks summed over the launches
    pub blocks: u64,
    /// the largest block (threads) it was launched with
    pub threads_per_block: u32,
    /// the largest dynamic shared memory (bytes) it was launched with
    pub dyn_smem_bytes: u32,
    /// bytes of the device ranges passed to it, summed over the launches (each read or written
    /// once: the memory term of the roofline)
    pub bytes: u64,
    /// the dependent iterations each block walks one after another (1 unless launched with
    /// [`Device::walk_launch`]; the largest over the launches)
    pub steps: u64,
}

/// One GEMM shape as cuBLAS is called with it (column-major; `ops` `N` or `T` per operand).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct GemmShape {
    pub ops: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// C is read too (beta != 0)
    pub accumulate: bool,
}

/// Everything a stretch of device work asked for (see [`CountingDevice::take`]).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StepCounts {
    /// kernel launches by kernel name (cuBLAS calls are `gemms`, not here); reported per
    /// kernel, so left out of this struct's JSON
    #[serde(skip)]
    pub kernels: BTreeMap<String, KernelCount>,
    /// cuBLAS GEMM calls and their FLOPs (2 m n k each)
    pub gemms: u64,
    pub gemm_flops: f64,
    /// the GEMM calls by shape (reported per shape, so left out of this struct's JSON)
    #[serde(skip)]
    pub gemm_shapes: BTreeMap<GemmShape, u64>,
    /// calls that block the host: downloads, uploads from host memory, explicit syncs
    pub host_syncs: u64,
    pub downloads: u64,
    pub uploads: u64,
    /// uploads queued on the stream from pinned memory (not blocking the host)
    pub async_uploads: u64,
    /// bytes of both kinds of upload
    pub upload_bytes: u64,
    pub syncs: u64,
    /// device allocations (temporaries the cache could not serve, scratch growth) and their
    /// bytes
    pub device_allocations: u64,
    pub allocated_bytes: u64,
    /// at the end of the step: the most bytes of temporaries alive at once so far, and the bytes
    /// of temporaries allocated so far (alive or cached for reuse)
    pub temp_peak_bytes: u64,
    pub temp_footprint_bytes: u64,
    /// memsets (explicit, and the zero fill of every new temporary) and their bytes
    pub memsets: u64,
    pub memset_bytes: u64,
    /// device-to-device copies and their bytes
    pub copies: u64,
    pub copy_bytes: u64,
    /// bytes read and written by f32 -> bf16 conversions of GEMM operands
    pub bytes_converted: u64,
    /// every request in order, with its launch shape and arguments (device addresses, scalars;
    /// not the bytes uploaded): what a CUDA graph captured from one step would replay
    #[serde(skip)]
    pub calls: Vec<String>,
}

impl StepCounts {
    /// Kernel launches plus GEMM calls.
    pub fn launches(&self) -> u64 {
        self.kernels.values().map(|k| k.launches).sum::<u64>() + self.gemms
    }
}

/// A device that executes nothing and counts every request (see the module docs).
pub struct CountingDevice {
    counts: RefCell<StepCounts>,
    next_ptr: Cell<u64>,
    precision: Cell<Precision>,
    sm_count: usize,
    /// sizes (bytes) and addresses of the backend's four grow-on-demand scratch buffers and its
    /// ticket counters
    scratch: RefCell<[(usize, u64); 5]>,
    /// downloads so far (their values follow it)
    served: Cell<u64>,
    /// the CUDA backend's cache of freed temporaries, so that a cached request is not counted
    /// as an allocation
    temps: Rc<TempCache>,
    /// the model's bf16 weight copy, as the CUDA backend keeps it
    bf16_copy: Bf16Copy,
}

impl CountingDevice {
    /// A device with `sm_count` multiprocessors (grid sizes of grid-stride kernels follow it).
    pub fn new(sm_count: usize) -> Self {
        CountingDevice {
            counts: RefCell::new(StepCounts::default()),
            next_ptr: Cell::new(1 << 32),
            precision: Cell::new(Precision::F32),
            sm_count: sm_count.max(1),
            scratch: RefCell::new([(0, 0); 5]),
            served: Cell::new(0),
            temps: Rc::new(TempCache::default()),
            bf16_copy: Bf16Copy::default(),
        }
    }

    /// The counts since the last `take`, and a fresh start.
    pub fn take(&self) -> StepCounts {
        let mut c = std::mem::take(&mut *self.counts.borrow_mut());
        c.temp_peak_bytes = self.temps.peak_in_use_bytes() as u64;
        c.temp_footprint_bytes = self.temps.footprint_bytes() as u64;
        c
    }

    /// A fake device address for `bytes` (256-byte aligned, never reused).
    fn fake(&self, bytes: usize) -> u64 {
        let p = self.next_ptr.get();
        self.next_ptr
            .set(p + (bytes.max(1) as u64).div_ceil(256) * 256);
        p
    }

    fn alloc(&self, bytes: usize) -> u64 {
        let mut c = self.counts.borrow_mut();
        c.device_allocations += 1;
        c.allocated_bytes += bytes as u64;
        drop(c);
        self.fake(bytes)
    }

    /// A temporary from the cache, as the CUDA backend takes it (a new fake address counted as
    /// an allocation when none of that size is free).
    fn cached<T>(&self, n: usize) -> Result<Temp<T>> {
        self.temps.take::<T>(
            n,
            |b| Ok(Box::new(self.alloc(b))),
            |k| {
                *k.downcast_ref::<u64>()
                    .expect("the cache holds fake addresses")
            },
        )
    }

    fn scratch_range<T>(&self, cell: usize, n: usize) -> Dv<T> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        let (size, at) = self.scratch.borrow()[cell];
        // a grown scratch is a new allocation, as in the CUDA backend; else the same range
        let p = if size < bytes {
            let p = self.alloc(bytes);
            self.scratch.borrow_mut()[cell] = (bytes, p);
            p
        } else {
            at
        };
        // SAFETY: the address is never dereferenced (nothing executes on this device).
        unsafe { Dv::from_raw(p, n) }
    }
}

impl Device for CountingDevice {
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        if g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Ok(()); // as the CUDA backend: an empty grid is no launch
        }
        let mut c = self.counts.borrow_mut();
        let bytes = args
            .iter()
            .map(|a| match a {
                KArg::Ptr(_, bytes) => *bytes,
                _ => 0,
            })
            .sum::<u64>();
        if name == "convert_f32_bf16" {
            c.bytes_converted += bytes;
        }
        c.calls.push(format!(
            "{name} {g:?} {b:?} {} {args:?}",
            cfg.shared_mem_bytes
        ));
        let k = c.kernels.entry(name.to_string()).or_default();
        k.launches += 1;
        k.blocks += g.0 as u64 * g.1 as u64 * g.2 as u64;
        k.threads_per_block = k.threads_per_block.max(b.0 * b.1 * b.2);
        k.dyn_smem_bytes = k.dyn_smem_bytes.max(cfg.shared_mem_bytes);
        k.bytes += bytes;
        k.steps = k.steps.max(1);
        Ok(())
    }

    fn walk_launch(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        smem: u32,
        args: &[KArg],
        steps: usize,
    ) -> Result<()> {
        self.grid_launch(name, grid, block, smem, args)?;
        if let Some(k) = self.counts.borrow_mut().kernels.get_mut(name) {
            k.steps = k.steps.max(steps as u64);
        }
        Ok(())
    }

    fn max_grid(&self) -> u32 {
        (self.sm_count as u32) * 32
    }

    fn scratch64(&self, n: usize, second: bool) -> Result<Dv<f64>> {
        Ok(self.scratch_range(second as usize, n))
    }

    fn scratch_bf16(&self, n: usize, second: bool) -> Result<Dv<u16>> {
        Ok(self.scratch_range(2 + second as usize, n))
    }

    fn tickets(&self) -> Result<Dv<u32>> {
        Ok(self.scratch_range(4, super::TICKETS))
    }

    fn temp<T: Elem>(&self, n: usize) -> Result<Temp<T>> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        let t = self.cached::<T>(n)?;
        let mut c = self.counts.borrow_mut(); // zeroed
        c.calls
            .push(format!("memset {:#x} {}", super::AsDv::dv(&t).ptr, n));
        c.memsets += 1;
        c.memset_bytes += bytes as u64;
        Ok(t)
    }

    fn temp_from<T: Elem>(&self, x: &[T]) -> Result<Temp<T>> {
        let bytes = std::mem::size_of_val(x);
        let t = self.cached::<T>(x.len())?;
        let mut c = self.counts.borrow_mut();
        c.calls.push(format!(
            "upload (new) {} x {} bytes",
            x.len(),
            std::mem::size_of::<T>()
        ));
        c.uploads += 1;
        c.upload_bytes += bytes as u64;
        c.host_syncs += 1;
        Ok(t)
    }

    fn memset_zero<T>(&self, x: Dv<T>) -> Result<()> {
        if x.len > 0 {
            let mut c = self.counts.borrow_mut();
            c.calls.push(format!("memset {:#x} {}", x.ptr, x.len));
            c.memsets += 1;
            c.memset_bytes += (x.len * std::mem::size_of::<T>()) as u64;
        }
        Ok(())
    }

    fn download<T: Elem>(&self, x: Dv<T>) -> Result<Vec<T>> {
        let mut c = self.counts.borrow_mut();
        c.calls.push(format!("download {:#x} {}", x.ptr, x.len));
        c.downloads += 1;
        c.host_syncs += 1;
        // floats: a value of this download's own (see the module docs); other types: 0
        let k = self.served.get() + 1;
        self.served.set(k);
        let mut v = vec![T::default(); x.len];
        let any: &mut dyn std::any::Any = &mut v;
        if let Some(f) = any.downcast_mut::<Vec<f32>>() {
            f.iter_mut().for_each(|y| *y = 1e-3 * k as f32);
        } else if let Some(f) = any.downcast_mut::<Vec<f64>>() {
            f.iter_mut().for_each(|y| *y = 1e-3 * k as f64);
        }
        Ok(v)
    }

    fn upload_into<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        assert!(x.len() <= dst.len, "upload_into: {} > {}", x.len(), dst.len);
        let mut c = self.counts.borrow_mut();
        c.calls.push(format!("upload {:#x} {}", dst.ptr, x.len()));
        c.uploads += 1;
        c.upload_bytes += std::mem::size_of_val(x) as u64;
        c.host_syncs += 1;
        Ok(())
    }

    fn upload_async<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        assert!(
            x.len() <= dst.len,
            "upload_async: {} > {}",
            x.len(),
            dst.len
        );
        let mut c = self.counts.borrow_mut();
        c.calls
            .push(format!("upload (queued) {:#x} {}", dst.ptr, x.len()));
        c.async_uploads += 1;
        c.upload_bytes += std::mem::size_of_val(x) as u64;
        Ok(())
    }

    fn copy(&self, dst: Dv<f32>, src: Dv<f32>) -> Result<()> {
        assert!(src.len <= dst.len, "copy: {} > {}", src.len, dst.len);
        if src.len > 0 {
            let mut c = self.counts.borrow_mut();
            c.calls
                .push(format!("copy {:#x} <- {:#x} {}", dst.ptr, src.ptr, src.len));
            c.copies += 1;
            c.copy_bytes += 4 * src.len as u64;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut c = self.counts.borrow_mut();
        c.calls.push("sync".into());
        c.syncs += 1;
        c.host_syncs += 1;
        Ok(())
    }

    fn precision(&self) -> Precision {
        self.precision.get()
    }

    fn set_precision(&self, p: Precision) {
        self.precision.set(p)
    }

    fn sm_count(&self) -> usize {
        self.sm_count
    }

    fn bf16_copies(&self) -> Option<&Bf16Copy> {
        Some(&self.bf16_copy)
    }

    fn temp_uninit<T: Elem>(&self, n: usize) -> Result<Temp<T>> {
        self.cached::<T>(n)
    }

    /// An H100's opt-in limit per block.
    fn max_smem(&self) -> usize {
        (227 * 1024).max(SMEM_DEFAULT)
    }

    /// The operands as `ops::cublas_gemm` prepares them (`ops::gemm_operands`: the bf16
    /// conversions, or a memset for an empty sum), then one cuBLAS call.
    fn gemm(&self, g: &Gemm) -> Result<()> {
        if ops::gemm_operands(self, g)?.is_some() {
            let mut c = self.counts.borrow_mut();
            c.calls.push(format!("cublas_gemm {g:?}"));
            c.gemms += 1;
            c.gemm_flops += 2.0 * g.m as f64 * g.n as f64 * g.k as f64;
            let shape = GemmShape {
                ops: format!("{:?}{:?}", g.ta, g.tb),
                m: g.m,
                n: g.n,
                k: g.k,
                accumulate: g.beta != 0.0,
            };
            *c.gemm_shapes.entry(shape).or_default() += 1;
        }
        Ok(())
    }
}

impl Ops for CountingDevice {}

/// The family of a kernel for the cost report: `slot_scan`, `linear_attention`, `gemm`,
/// `conversion`, `norm`, `elementwise`, `loss`, `optimizer` or `other`.
pub fn kernel_family(name: &str) -> &'static str {
    let starts = |ps: &[&str]| ps.iter().any(|p| name.starts_with(p));
    if starts(&["linear_attn"]) {
        "linear_attention"
    } else if starts(&[
        "slot_scan",
        "slot_mix",
        "read_logits",
        "write_logits",
        "read_weights",
        "softmax_slots",
        "slot_mask_weights",
        "sum_batch_add",
    ]) {
        "slot_scan"
    } else if name == "cublas_gemm" {
        "gemm"
    } else if starts(&["convert_"]) {
        "conversion"
    } else if starts(&["layernorm", "l2normalize", "residual_layernorm"]) {
        "norm"
    } else if starts(&["crossentropy"]) {
        "loss"
    } else if starts(&["adamw", "clip_scale", "global_norm", "sum_f64", "scale_f64"]) {
        "optimizer"
    } else if starts(&[
        "gelu",
        "bias_gelu",
        "dropout",
        "residual",
        "axpy",
        "gate_backward",
        "fill",
        "rope",
        "split_heads",
        "merge_heads",
        "refine_qkv",
        "tanh_",
        "encoder",
        "matmul_forward_bias",
    ]) {
        "elementwise"
    } else {
        "other"
    }
}

/// Per-SM limits of one architecture for the occupancy calculation.
#[derive(Debug, Clone, Copy)]
pub struct SmLimits {
    pub registers: u32,
    /// registers are allocated per warp in units of this many
    pub reg_unit: u32,
    pub threads: u32,
    pub blocks: u32,
    /// shared memory per SM and the part of it reserved per block (bytes)
    pub smem: u32,
    pub smem_reserved: u32,
}

/// sm_90 (H100, H200): 64K registers, 2,048 threads, 32 blocks, 228 KiB shared memory per SM.
pub const SM90: SmLimits = SmLimits {
    registers: 65536,
    reg_unit: 256,
    threads: 2048,
    blocks: 32,
    smem: 228 * 1024,
    smem_reserved: 1024,
};

/// Fraction of an SM's warp slots a kernel can keep busy (the CUDA occupancy calculator's
/// rule): blocks per SM limited by registers (allocated per warp), threads, blocks and shared
/// memory, times warps per block, over the SM's warps. 0 when one block does not fit.
pub fn occupancy(
    lim: SmLimits,
    registers: u32,
    threads_per_block: u32,
    smem_per_block: u32,
) -> f64 {
    if threads_per_block == 0 {
        return 0.0;
    }
    let warps = threads_per_block.div_ceil(32);
    let regs_per_warp = (registers.max(1) * 32).div_ceil(lim.reg_unit) * lim.reg_unit;
    let by_regs = (lim.registers / regs_per_warp) / warps;
    let by_threads = lim.threads / (warps * 32);
    let by_smem = if smem_per_block == 0 {
        lim.blocks
    } else {
        lim.smem / (smem_per_block + lim.smem_reserved)
    };
    let blocks = by_regs.min(by_threads).min(by_smem).min(lim.blocks);
    (blocks * warps) as f64 / (lim.threads / 32) as f64
}

/// Static SASS instruction counts of one kernel by class (instructions in its code, not
/// executed instructions; padding `NOP`s are left out).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SassMix {
    pub total: u32,
    /// `HMMA`, `HGMMA`, `IMMA`, `DMMA`, `BMMA`
    pub tensor_core: u32,
    /// `DADD`, `DMUL`, `DFMA`, `DSETP`, `DMNMX`
    pub fp64: u32,
    /// `FADD`, `FMUL`, `FFMA`, `FSETP`, `FMNMX`, `FSEL`
    pub fp32: u32,
    /// `MUFU` (the special-function unit: exp, rcp, sqrt, ...)
    pub sfu: u32,
    /// global memory: `LDG`, `STG`, `LDGSTS`, `ATOMG`, `RED`
    pub global: u32,
    /// shared memory: `LDS`, `STS`, `LDSM`, `ATOMS`
    pub shared: u32,
    /// local memory (spills, stack arrays): `LDL`, `STL`
    pub local: u32,
    /// `BAR`
    pub barriers: u32,
}

/// The `SassMix` of every kernel in `nvdisasm -c` output, by kernel name. Each kernel's section
/// (`.text.<name>`) holds its code and the internal subroutines it calls.
pub fn sass_mix(sass: &str) -> BTreeMap<String, SassMix> {
    let mut out: BTreeMap<String, SassMix> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in sass.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix(".text.").and_then(|r| r.strip_suffix(':')) {
            cur = Some(name.to_string());
            out.entry(name.to_string()).or_default();
            continue;
        }
        // "/*0070*/   [@!P0] OPCODE.MOD operands ;"
        let Some(rest) = l
            .strip_prefix("/*")
            .and_then(|r| r.split_once("*/"))
            .map(|x| x.1)
        else {
            continue;
        };
        let Some(k) = cur.as_ref().and_then(|c| out.get_mut(c)) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let mut op = words.next().unwrap_or("");
        if op.starts_with('@') {
            op = words.next().unwrap_or("");
        }
        let base = op.split('.').next().unwrap_or("");
        if base.is_empty() || base == "NOP" {
            continue;
        }
        k.total += 1;
        let class = match base {
            "HMMA" | "HGMMA" | "IMMA" | "DMMA" | "BMMA" => &mut k.tensor_core,
            "DADD" | "DMUL" | "DFMA" | "DSETP" | "DMNMX" => &mut k.fp64,
            "FADD" | "FMUL" | "FFMA" | "FSETP" | "FMNMX" | "FSEL" => &mut k.fp32,
            "MUFU" => &mut k.sfu,
            "LDG" | "STG" | "LDGSTS" | "ATOMG" | "RED" => &mut k.global,
            "LDS" | "STS" | "LDSM" | "ATOMS" => &mut k.shared,
            "LDL" | "STL" => &mut k.local,
            "BAR" => &mut k.barriers,
            _ => continue,
        };
        *class += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_follows_the_calculator() {
        // 256 threads, 32 registers: 8 blocks by threads and registers -> full
        assert_eq!(occupancy(SM90, 32, 256, 0), 1.0);
        // 128 registers x 256 threads: 64K / (128*32*8) = 2 blocks -> 16 of 64 warps
        assert_eq!(occupancy(SM90, 128, 256, 0), 0.25);
        // 255 registers round to 256 per thread: 1 block of 256
        assert_eq!(occupancy(SM90, 255, 256, 0), 0.125);
        // 100 KiB of shared memory: 2 blocks of 128 threads -> 8 of 64 warps
        assert_eq!(occupancy(SM90, 32, 128, 100 * 1024), 0.125);
        // a block that needs more shared memory than the SM has
        assert_eq!(occupancy(SM90, 32, 128, 300 * 1024), 0.0);
    }

    #[test]
    fn sass_mix_counts_by_class_per_kernel() {
        let sass = "
//--------------------- .text.k1 --------------------------
k1:
.text.k1:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.64 R2, desc[UR6][R2.64] ;
        /*0020*/               @!P0 DFMA R8, -R6, R4, 1 ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   MUFU.EX2 R5, R7 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   STL [R1], R3 ;
        /*0070*/                   NOP ;
.L_x_0:
        /*0080*/               @P1 FFMA R4, RZ, R7, R3 ;
//--------------------- .text.k2 --------------------------
.text.k2:
        /*0000*/                   STS [R0], R1 ;
        /*0010*/                   EXIT ;
";
        let m = sass_mix(sass);
        let k1 = &m["k1"];
        assert_eq!(
            (
                k1.total,
                k1.global,
                k1.fp64,
                k1.tensor_core,
                k1.sfu,
                k1.barriers,
                k1.local,
                k1.fp32
            ),
            (8, 1, 1, 1, 1, 1, 1, 1)
        );
        assert_eq!((m["k2"].total, m["k2"].shared), (2, 1));
    }

    #[test]
    fn families_cover_the_names() {
        assert_eq!(kernel_family("slot_scan_read_forward_rmax"), "slot_scan");
        assert_eq!(kernel_family("linear_attn_backward_dk"), "linear_attention");
        assert_eq!(kernel_family("convert_f32_bf16"), "conversion");
        assert_eq!(kernel_family("layernorm_backward"), "norm");
        assert_eq!(kernel_family("adamw_update"), "optimizer");
        assert_eq!(kernel_family("gelu_backward"), "elementwise");
        assert_eq!(kernel_family("bias_gelu_forward"), "elementwise");
        assert_eq!(kernel_family("residual_layernorm_forward"), "norm");
        assert_eq!(kernel_family("crossentropy_forward"), "loss");
        assert_eq!(kernel_family("colsum_add"), "other");
    }
}
