//! CUDA backend: the kernels of `cuda/*.cu` (embedded at build time, compiled at run time with
//! NVRTC), cuBLAS for the GEMMs, and a GPU ASA layer / language-model training step that mirror
//! the CPU reference op by op (`backend::cpu`).
//!
//! Everything here loads the CUDA libraries dynamically: the crate builds and its tests pass on a
//! machine without CUDA. `cuda_available()` says whether a driver and a device can be used;
//! `CudaBackend::new` returns `AsaError::Device` (never panics) when they cannot.
//!
//! Module map:
//! - this file: kernel sources, NVRTC compilation (cached per process), `CudaBackend` (context,
//!   stream, cuBLAS handle, loaded modules), the `Dv` device-range handle and the launch helper;
//! - [`ops`]: the `Ops` trait, one launcher per kernel, named after its CPU twin, with the CPU
//!   twin's arguments as device ranges, for any `Device` (this backend, or the tests' emulator);
//! - [`model`]: `GpuLm` (forward, fused classifier + cross-entropy, backward, AdamW, clipping) and
//!   the GPU ASA layer;
//! - [`intervene`]: the intervene variant's intervention (forward, thresholds, logs, backward);
//! - [`fused`]: the fused slot write scan + read, forward and backward (no state history);
//! - [`linear`]: the slotspace refine's causal linear attention, walked in chunks;
//! - [`cost`]: a device that executes nothing and counts a step's requests, and occupancy from
//!   `ptxas` resources (`asa kernel-cost`);
//! - [`graph`]: the training step captured as a CUDA graph, checked and replayed;
//! - [`doctor`]: the `asa doctor` report.
//!
//! The reference fixtures run on the GPU from `crate::parity::gpu` (above the backends).

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceSlice,
};
use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::error::{AsaError, Result};

pub mod cost;
pub mod decode;
pub mod doctor;
pub mod fused;
pub mod graph;
pub mod intervene;
pub mod kern;
pub mod layer;
pub mod linear;
pub mod lm;
pub mod ops;
pub mod refine;
pub mod roofline;

pub use crate::config::Precision;
pub use doctor::{doctor, DoctorReport};
pub use lm::GpuLm;
pub use ops::Ops;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Crate version of this build.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Short git commit of this build ("unknown" when git was not available).
pub const BUILD_GIT: &str = env!("ASA_BUILD_GIT");
/// Target triple of this build.
pub const BUILD_TARGET: &str = env!("ASA_BUILD_TARGET");
/// Cargo profile of this build.
pub const BUILD_PROFILE: &str = env!("ASA_BUILD_PROFILE");

/// Env var naming a `pip install --target` folder holding the CUDA 13 wheels
/// (`nvidia-cuda-nvrtc`, ...): libraries in `DIR/nvidia/cu13/lib`, `ptxas` in `DIR/nvidia/cu13/bin`.
pub const PYPI_DIR_ENV: &str = "ASA_CUDA_PYPI_DIR";

/// Dynamic shared memory a block may have without the kernel's opt-in (bytes).
pub const SMEM_DEFAULT: usize = 48 * 1024;
/// Bytes of cuBLAS' workspace (its recommendation for Hopper: 32 MiB).
pub const BLAS_WORKSPACE: usize = 32 << 20;

/// Arrival counters per device ([`Device::tickets`]): the most blocks a single-launch reduction
/// may count on at once (one counter per group of blocks that finishes one result).
pub const TICKETS: usize = 4096;

fn dev_err(ctx: &str, e: impl std::fmt::Display) -> AsaError {
    AsaError::Device(format!("{ctx}: {e}"))
}

// ------------------------------------------------------------------------------------------------
// kernel sources

/// The full source of `cuda/<stem>.cu` with its `#include "x.cuh"` lines replaced by the
/// embedded headers (so NVRTC needs no include path).
pub fn kernel_source(stem: &str) -> Option<String> {
    let src = KERNELS.iter().find(|(s, _)| *s == stem)?.1;
    let mut out = String::with_capacity(src.len() + 4096);
    for line in src.lines() {
        let t = line.trim();
        let inc = t
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'))
            .and_then(|name| HEADERS.iter().find(|(h, _)| *h == name));
        match inc {
            Some((_, text)) => out.push_str(text),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Some(out)
}

/// Names of the `extern "C" __global__` kernels of a source, in order of appearance (an
/// optional `__launch_bounds__(...)` before the name is skipped).
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let key = "__global__ void ";
    let mut rest = src;
    while let Some(pos) = rest.find(key) {
        let after = &rest[pos + key.len()..];
        let named = match after.trim_start().strip_prefix("__launch_bounds__(") {
            Some(r) => r.split_once(')').map(|(_, x)| x.trim_start()).unwrap_or(r),
            None => after,
        };
        let name: String = named
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[..pos].trim_end().ends_with("extern \"C\"") {
            names.push(name);
        }
        rest = after;
    }
    names
}

// ------------------------------------------------------------------------------------------------
// libraries

extern "C" {
    fn dlopen(filename: *const std::ffi::c_char, flag: std::ffi::c_int) -> *mut std::ffi::c_void;
}

/// The pip folder's `nvidia/cu13` directory, when `ASA_CUDA_PYPI_DIR` names one.
pub fn pypi_cuda_root() -> Option<PathBuf> {
    let dir = std::env::var_os(PYPI_DIR_ENV)?;
    let root = Path::new(&dir).join("nvidia").join("cu13");
    root.is_dir().then_some(root)
}

/// Loads the NVRTC libraries of `ASA_CUDA_PYPI_DIR` by absolute path (once per process), so
/// that the later loads by name (cudarc's, and NVRTC's own load of its builtins library) find
/// them even when LD_LIBRARY_PATH does not name that folder.
pub fn preload_pypi_libs() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Some(root) = pypi_cuda_root() else { return };
        let lib = root.join("lib");
        for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
            let p = lib.join(name);
            if !p.is_file() {
                continue;
            }
            if let Ok(c) = std::ffi::CString::new(p.to_string_lossy().as_bytes()) {
                // RTLD_NOW | RTLD_GLOBAL; the handle is kept for the process' lifetime.
                // SAFETY: a plain dlopen of a library path; no symbol is called here.
                unsafe {
                    dlopen(c.as_ptr(), 0x2 | 0x100);
                }
            }
        }
    });
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    preload_pypi_libs();
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// NVRTC's version (major, minor), if it can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: the library is present; two out-pointers to locals.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((a, b))
}

/// The driver's CUDA version as an integer (13000 = 13.0), if the driver loads.
pub fn driver_version() -> Option<i32> {
    if !driver_present() {
        return None;
    }
    let mut v = 0;
    // SAFETY: the library is present; one out-pointer to a local.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// True when a CUDA driver is present, a device can be opened and NVRTC and cuBLAS load.
/// Never panics.
pub fn cuda_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if !driver_present() || !nvrtc_present() || !cublas_present() {
            return false;
        }
        std::panic::catch_unwind(|| {
            matches!(CudaContext::device_count(), Ok(n) if n > 0) && CudaContext::new(0).is_ok()
        })
        .unwrap_or(false)
    })
}

// ------------------------------------------------------------------------------------------------
// NVRTC

/// Compiles one kernel file (`stem` of `cuda/<stem>.cu`) to PTX for a virtual architecture
/// (`compute_80`, `compute_90`, ...). PTX is cached per process and architecture.
pub fn compile_ptx(stem: &str, arch: &'static str) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<(String, &'static str), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache
        .lock()
        .map_err(|_| dev_err("ptx cache", "poisoned"))?
        .get(&(stem.to_string(), arch))
    {
        return Ok(p.clone());
    }
    if !nvrtc_present() {
        return Err(AsaError::Device(
            "NVRTC not found (libnvrtc.so.13; set LD_LIBRARY_PATH or ASA_CUDA_PYPI_DIR)".into(),
        ));
    }
    let src = kernel_source(stem)
        .ok_or_else(|| dev_err("kernel source", format!("no cuda/{stem}.cu")))?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(format!("{stem}.cu")),
        ..Default::default()
    };
    let ptx = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(&src, opts))
        .map_err(|_| dev_err(&format!("NVRTC compiling {stem}.cu for {arch}"), "panicked"))?
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => dev_err(
                &format!("NVRTC compiling {stem}.cu for {arch}"),
                log.to_string_lossy(),
            ),
            e => dev_err(&format!("NVRTC compiling {stem}.cu for {arch}"), e),
        })?;
    let text = ptx.to_src();
    cache
        .lock()
        .map_err(|_| dev_err("ptx cache", "poisoned"))?
        .insert((stem.to_string(), arch), text.clone());
    Ok(text)
}

/// The NVRTC virtual architecture for a compute capability (`compute_90` for 9.0).
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, _) => "compute_90",
        (10, 0) => "compute_100",
        (10, _) => "compute_100",
        (12, _) => "compute_120",
        (8, _) => "compute_80",
        _ => "compute_80",
    }
}

// ------------------------------------------------------------------------------------------------
// device ranges

/// A device range: a raw device pointer and an element count. Obtained from a `CudaSlice` or a
/// view with `.dv()`; a null range (pointer 0) stands for an absent optional tensor.
///
/// The backend runs on one stream with cudarc's event tracking off, so a range stays valid while
/// its owner is alive; frees are stream-ordered.
#[derive(Debug)]
pub struct Dv<T> {
    pub ptr: u64,
    pub len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Dv<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Dv<T> {}

impl<T> Dv<T> {
    /// # Safety
    /// `ptr` must address `len` elements of `T` in device memory of the backend's context.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        Dv {
            ptr,
            len,
            _t: PhantomData,
        }
    }
    pub fn null() -> Self {
        Dv {
            ptr: 0,
            len: 0,
            _t: PhantomData,
        }
    }
    pub fn is_null(&self) -> bool {
        self.ptr == 0
    }
    /// Sub-range [start, start+len).
    pub fn sub(&self, start: usize, len: usize) -> Self {
        assert!(
            start + len <= self.len,
            "Dv::sub out of range: {start}+{len} > {}",
            self.len
        );
        Dv {
            ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
}

/// `.dv()`: the device range of a cudarc slice or view.
pub trait AsDv<T> {
    fn dv(&self) -> Dv<T>;
}

impl<T> AsDv<T> for CudaSlice<T> {
    fn dv(&self) -> Dv<T> {
        let (p, _sync) = self.device_ptr(self.stream());
        Dv {
            ptr: p,
            len: self.len(),
            _t: PhantomData,
        }
    }
}
impl<T> AsDv<T> for CudaView<'_, T> {
    fn dv(&self) -> Dv<T> {
        let (p, _sync) = self.device_ptr(self.stream());
        Dv {
            ptr: p,
            len: self.len(),
            _t: PhantomData,
        }
    }
}
impl<T> AsDv<T> for CudaViewMut<'_, T> {
    fn dv(&self) -> Dv<T> {
        let (p, _sync) = self.device_ptr(self.stream());
        Dv {
            ptr: p,
            len: self.len(),
            _t: PhantomData,
        }
    }
}
impl<T> AsDv<T> for Dv<T> {
    fn dv(&self) -> Dv<T> {
        *self
    }
}
impl<T, A: AsDv<T>> AsDv<T> for Option<A> {
    fn dv(&self) -> Dv<T> {
        self.as_ref().map(|a| a.dv()).unwrap_or_else(Dv::null)
    }
}

/// Element types of device buffers.
pub trait Elem: DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone + 'static {}
impl<T: DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone + 'static> Elem for T {}

/// A temporary device buffer: its range, and whatever keeps the memory alive. A temporary
/// taken from a [`TempCache`] goes back to it when dropped.
pub struct Temp<T> {
    keep: Option<Box<dyn std::any::Any>>,
    /// the cache it returns to, and the size it is filed under
    home: Option<(Rc<TempCache>, usize)>,
    dv: Dv<T>,
}

impl<T> Temp<T> {
    /// `keep` owns the memory that `dv` addresses.
    pub fn new(keep: Box<dyn std::any::Any>, dv: Dv<T>) -> Temp<T> {
        Temp {
            keep: Some(keep),
            home: None,
            dv,
        }
    }
    /// Elements.
    pub fn len(&self) -> usize {
        self.dv.len
    }
    pub fn is_empty(&self) -> bool {
        self.dv.len == 0
    }
}

impl<T> AsDv<T> for Temp<T> {
    fn dv(&self) -> Dv<T> {
        self.dv
    }
}

impl<T> Drop for Temp<T> {
    fn drop(&mut self) {
        if let (Some((cache, bytes)), Some(keep)) = (self.home.take(), self.keep.take()) {
            cache.put(bytes, keep);
        }
    }
}

/// A device buffer of a cache, (re)allocated on demand to a length and kept from call to call
/// while the length stays (so a steady step gets the same addresses).
pub struct DevBuf<T> {
    s: Option<Temp<T>>,
    n: usize,
}

impl<T> Default for DevBuf<T> {
    fn default() -> Self {
        DevBuf { s: None, n: 0 }
    }
}

impl<T: Elem> DevBuf<T> {
    /// The buffer with `n` elements (zeroed when new; contents unspecified when it already
    /// had that length).
    pub fn ensure<D: Device>(&mut self, be: &D, n: usize) -> Result<Dv<T>> {
        if self.s.is_none() || self.n != n {
            self.s = Some(be.temp::<T>(n)?);
            self.n = n;
        }
        Ok(self.dv())
    }

    /// Its range (null before the first `ensure`).
    pub fn dv(&self) -> Dv<T> {
        match &self.s {
            Some(s) => s.dv().sub(0, self.n),
            None => Dv::null(),
        }
    }
}

/// Registered bf16 copies of f32 ranges: the weights' (see [`Device::set_bf16_copy`]), those
/// held for a few GEMMs ([`ops::Ops::with_bf16`], [`ops::Ops::with_bf16_twin`]) and the
/// activations' twins, written by the kernels that make the activations and kept until the
/// next forward ([`Device::add_bf16_twin`]).
#[derive(Debug)]
pub struct Bf16Copy {
    weights: std::cell::Cell<Option<(Dv<f32>, Dv<u16>)>>,
    held: RefCell<Vec<(Dv<f32>, Dv<u16>)>>,
    twins: RefCell<Vec<(Dv<f32>, Dv<u16>)>>,
    /// whether producers write twins ([`Device::bf16_twins`]; off: every activation is
    /// converted where a GEMM reads it, as before the twins)
    twins_on: std::cell::Cell<bool>,
}

impl Default for Bf16Copy {
    fn default() -> Self {
        Bf16Copy {
            weights: Default::default(),
            held: Default::default(),
            twins: Default::default(),
            twins_on: std::cell::Cell::new(true),
        }
    }
}

impl Bf16Copy {
    pub fn set(&self, weights: Dv<f32>, copy: Dv<u16>) {
        assert!(
            copy.len >= weights.len,
            "bf16 copy shorter than its weights"
        );
        self.weights.set(Some((weights, copy)));
    }
    pub fn push(&self, x: Dv<f32>, copy: Dv<u16>) {
        assert!(copy.len >= x.len, "bf16 copy shorter than its range");
        self.held.borrow_mut().push((x, copy));
    }
    pub fn pop(&self) {
        self.held.borrow_mut().pop();
    }
    pub fn add_twin(&self, x: Dv<f32>, copy: Dv<u16>) {
        assert!(copy.len >= x.len, "bf16 twin shorter than its range");
        self.twins.borrow_mut().push((x, copy));
    }
    pub fn clear_twins(&self) {
        self.twins.borrow_mut().clear();
    }
    pub fn twins_on(&self) -> bool {
        self.twins_on.get()
    }
    pub fn set_twins_on(&self, on: bool) {
        self.twins_on.set(on);
        self.clear_twins();
    }
    /// The bf16 copy of `x` from a registered range that holds it, at a 16-byte aligned place.
    pub fn of(&self, x: Dv<f32>) -> Option<Dv<u16>> {
        let within = |(w, c): (Dv<f32>, Dv<u16>)| {
            let end = |d: Dv<f32>| d.ptr + 4 * d.len as u64;
            if x.ptr < w.ptr || end(x) > end(w) {
                return None;
            }
            let off = ((x.ptr - w.ptr) / 4) as usize;
            // bf16 tensor-core GEMMs load 16 bytes at a time; elsewhere convert into scratch
            (off.is_multiple_of(8) && c.ptr.is_multiple_of(16)).then(|| c.sub(off, x.len))
        };
        let held = self.held.borrow().iter().rev().find_map(|&h| within(h));
        let twin = || self.twins.borrow().iter().rev().find_map(|&h| within(h));
        held.or_else(twin).or_else(|| within(self.weights.get()?))
    }
}

/// Device memory of dropped temporaries, kept by exact size for the next request of that size
/// (issue 11: no device allocation inside a training step after the first, whose sequence of
/// requests every later step repeats). Reuse is safe without events because the backend runs
/// on one stream: a kernel that reads a reused buffer is queued after every kernel that used it
/// before. When an allocation fails the cache is emptied and the allocation tried once more.
#[derive(Default)]
pub struct TempCache {
    /// size in bytes -> free allocations of exactly that size
    free: RefCell<HashMap<usize, Vec<Box<dyn std::any::Any>>>>,
    /// bytes held free
    held: std::cell::Cell<usize>,
    /// bytes of the temporaries alive now, and their most since the start
    in_use: std::cell::Cell<usize>,
    peak_in_use: std::cell::Cell<usize>,
    /// a graph capture is under way: a failed allocation must not free the cached ones (the
    /// frees would be captured into the graph, not run)
    frozen: std::cell::Cell<bool>,
}

impl TempCache {
    /// A temporary of `n` elements addressed by `ptr(&keep)`: a cached allocation of its size
    /// (`n` elements, at least one) when there is one, else `alloc(bytes)` (after emptying the
    /// cache if the first try fails). Of several cached ones it takes the lowest address, so
    /// that a step that starts with the same buffers free and asks for the same sizes in the
    /// same order gets the same addresses (a captured CUDA graph replays them).
    pub fn take<T>(
        self: &Rc<Self>,
        n: usize,
        alloc: impl Fn(usize) -> Result<Box<dyn std::any::Any>>,
        ptr: impl Fn(&dyn std::any::Any) -> u64,
    ) -> Result<Temp<T>> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        let cached = self.free.borrow_mut().get_mut(&bytes).and_then(|v| {
            let i = (0..v.len()).min_by_key(|&i| ptr(v[i].as_ref()))?;
            Some(v.swap_remove(i))
        });
        let keep = match cached {
            Some(k) => {
                self.held.set(self.held.get() - bytes);
                k
            }
            None => match alloc(bytes) {
                Ok(k) => k,
                Err(_) if self.held.get() > 0 && !self.frozen.get() => {
                    self.clear();
                    alloc(bytes)?
                }
                Err(e) => return Err(e),
            },
        };
        self.in_use.set(self.in_use.get() + bytes);
        self.peak_in_use
            .set(self.peak_in_use.get().max(self.in_use.get()));
        // SAFETY: `keep` owns at least `bytes >= n * size_of::<T>()` bytes at that address.
        let dv = unsafe { Dv::from_raw(ptr(keep.as_ref()), n) };
        Ok(Temp {
            keep: Some(keep),
            home: Some((self.clone(), bytes)),
            dv,
        })
    }

    fn put(&self, bytes: usize, keep: Box<dyn std::any::Any>) {
        self.free.borrow_mut().entry(bytes).or_default().push(keep);
        self.held.set(self.held.get() + bytes);
        self.in_use.set(self.in_use.get() - bytes);
    }

    /// While `on`, a failed allocation leaves the cached ones alone (graph capture).
    pub fn freeze(&self, on: bool) {
        self.frozen.set(on);
    }

    /// Frees every cached allocation.
    pub fn clear(&self) {
        self.free.borrow_mut().clear();
        self.held.set(0);
    }

    /// Bytes held free for reuse.
    pub fn held_bytes(&self) -> usize {
        self.held.get()
    }

    /// Bytes of temporaries alive or cached: the device memory they take.
    pub fn footprint_bytes(&self) -> usize {
        self.held.get() + self.in_use.get()
    }

    /// The most bytes of temporaries alive at once so far: what the device would need without
    /// the cache.
    pub fn peak_in_use_bytes(&self) -> usize {
        self.peak_in_use.get()
    }
}

/// What the kernel launchers ([`ops::Ops`]) and the launch sequences of [`fused`] and
/// [`linear`] need from a device: launches, scratch and temporary buffers, copies, and GEMMs
/// with cuBLAS' conventions. Implemented by [`CudaBackend`] and, in the tests, by the SIMT
/// emulator (tests/support/simt.rs), so that the same launch code runs on a GPU and on the CPU.
pub trait Device {
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()>;
    /// The most blocks worth giving a grid-stride kernel.
    fn max_grid(&self) -> u32;
    /// An f64 scratch range of `n` elements (one of two independent scratch buffers).
    fn scratch64(&self, n: usize, second: bool) -> Result<Dv<f64>>;
    /// A bf16 scratch range of `n` elements (one of two).
    fn scratch_bf16(&self, n: usize, second: bool) -> Result<Dv<u16>>;
    /// The [`TICKETS`] arrival counters of single-launch reductions (`asa_last_block` in
    /// cuda/common.cuh): zero between launches, each kernel that counts on one returns it to 0.
    fn tickets(&self) -> Result<Dv<u32>>;
    /// A new zero-filled buffer of `n` elements.
    fn temp<T: Elem>(&self, n: usize) -> Result<Temp<T>>;
    /// A new buffer of `n` elements with unspecified contents, for an output written whole
    /// (no memset where the device can skip it).
    fn temp_uninit<T: Elem>(&self, n: usize) -> Result<Temp<T>> {
        self.temp(n)
    }
    /// A new buffer holding `x`.
    fn temp_from<T: Elem>(&self, x: &[T]) -> Result<Temp<T>>;
    /// Zeroes a range.
    fn memset_zero<T>(&self, x: Dv<T>) -> Result<()>;
    /// Device range -> host vector (synchronises).
    fn download<T: Elem>(&self, x: Dv<T>) -> Result<Vec<T>>;
    /// Host -> existing device range (`x.len() <= dst.len`).
    fn upload_into<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> Result<()>;
    /// [`Device::upload_into`] without blocking the host: the copy is queued on the stream like
    /// a kernel (the CUDA backend stages `x` in pinned memory, reused after the next blocking
    /// call). For the per-step batch, so that a training step blocks only once, at its end.
    fn upload_async<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        self.upload_into(dst, x)
    }
    /// Device -> device copy of `src` into `dst` (`src.len <= dst.len`).
    fn copy(&self, dst: Dv<f32>, src: Dv<f32>) -> Result<()>;
    /// Waits for the queued work.
    fn sync(&self) -> Result<()>;
    /// The device's graph bookkeeping ([`graph`]); None where it cannot capture graphs.
    fn graph(&self) -> Option<&graph::StepGraph> {
        None
    }
    /// Starts capturing the requests that follow into a graph (they are not run).
    fn graph_capture_begin(&self) -> Result<()> {
        Err(AsaError::Device("this device cannot capture graphs".into()))
    }
    /// Ends the capture and holds its graph in place of the last; an error (a request the
    /// capture could not take) holds none.
    fn graph_capture_end(&self) -> Result<()> {
        Err(AsaError::Device("this device cannot capture graphs".into()))
    }
    /// Runs the held graph.
    fn graph_launch(&self) -> Result<()> {
        Err(AsaError::Device("no graph held".into()))
    }
    /// The GEMM input precision.
    fn precision(&self) -> Precision;
    fn set_precision(&self, p: Precision);
    /// The device's registry of bf16 copies, where its GEMMs convert operands to bf16 (None:
    /// the methods below do nothing).
    fn bf16_copies(&self) -> Option<&Bf16Copy> {
        None
    }
    /// Registers `copy` as the bf16 rounding of `weights` (kept current by their owner, the
    /// model, after every change): bf16 GEMMs then read operands that lie inside `weights` from
    /// it instead of converting them call by call ([`ops::gemm_operands`]).
    fn set_bf16_copy(&self, weights: Dv<f32>, copy: Dv<u16>) {
        if let Some(r) = self.bf16_copies() {
            r.set(weights, copy)
        }
    }
    /// The registered bf16 copy of `x`, when `x` lies inside a registered range at a 16-byte
    /// aligned place of its copy.
    fn bf16_copy_of(&self, x: Dv<f32>) -> Option<Dv<u16>> {
        self.bf16_copies()?.of(x)
    }
    /// Registers `copy` as the bf16 rounding of `x` until the matching
    /// [`Device::pop_bf16_held`] (see [`ops::Ops::with_bf16`]).
    fn push_bf16_held(&self, x: Dv<f32>, copy: Dv<u16>) {
        if let Some(r) = self.bf16_copies() {
            r.push(x, copy)
        }
    }
    fn pop_bf16_held(&self) {
        if let Some(r) = self.bf16_copies() {
            r.pop()
        }
    }
    /// Whether producers write bf16 twins of the activations that bf16 GEMMs read (the GEMMs
    /// convert operands, [`ops::bf16_converted`], and the twins are not switched off).
    fn bf16_twins(&self) -> bool {
        ops::bf16_converted(self) && self.bf16_copies().is_some_and(|r| r.twins_on())
    }
    /// Registers `copy` as the bf16 twin of the activation `x` until
    /// [`Device::clear_bf16_twins`] (the next forward): its producer writes both, and nothing
    /// writes `x` again before the registry is cleared.
    fn add_bf16_twin(&self, x: Dv<f32>, copy: Dv<u16>) {
        if let Some(r) = self.bf16_copies() {
            r.add_twin(x, copy)
        }
    }
    fn clear_bf16_twins(&self) {
        if let Some(r) = self.bf16_copies() {
            r.clear_twins()
        }
    }
    /// Switches the twins off (every activation then converted where a GEMM reads it: the
    /// tests' bit-for-bit comparison, the cost model's A/B) or on (the default).
    fn set_bf16_twins(&self, on: bool) {
        if let Some(r) = self.bf16_copies() {
            r.set_twins_on(on)
        }
    }
    /// Streaming multiprocessors (sizes the fused kernels' tiles).
    fn sm_count(&self) -> usize;
    /// Bytes of dynamic shared memory one block may have ([`SMEM_DEFAULT`] without the opt-in).
    fn max_smem(&self) -> usize {
        SMEM_DEFAULT
    }
    /// One GEMM ([`ops::Gemm`]: cuBLAS' conventions), inputs in the device's GEMM precision,
    /// f32 accumulation.
    fn gemm(&self, g: &ops::Gemm) -> Result<()>;

    /// Launches `name` on a 1-D grid of `grid` blocks of `block` threads with `smem` bytes of
    /// dynamic shared memory (the form of the multi-kernel sequences in [`fused`] and
    /// [`linear`]).
    fn grid_launch(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        smem: u32,
        args: &[KArg],
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        self.launch(name, cfg, args)
    }

    /// [`Device::grid_launch`] of a kernel whose blocks walk `steps` dependent iterations one
    /// after another (the positions of a tile, the tiles of a sequence), each a pass through
    /// the kernel's code: the cost model's latency term ([`cost`]). Devices that execute ignore
    /// `steps`.
    fn walk_launch(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        smem: u32,
        args: &[KArg],
        steps: usize,
    ) -> Result<()> {
        let _ = steps;
        self.grid_launch(name, grid, block, smem, args)
    }

    /// Grid-stride launch shape for `n` elements (256 threads per block).
    fn cfg_elems(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.max_grid().max(1) as usize);
        LaunchConfig {
            grid_dim: (if n == 0 { 0 } else { blocks as u32 }, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A block of 256 threads per row (`rows` rows; grid-stride over rows past `max_grid`).
    fn cfg_rows(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.min(self.max_grid().max(1) as usize) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One warp per item (`n` items), 8 warps per block.
    fn cfg_warps(&self, n: usize) -> Result<LaunchConfig> {
        warps_cfg(n, 8)
    }

    /// One warp per item, 4 warps per block (kernels with many registers per thread).
    fn cfg_warps_small(&self, n: usize) -> Result<LaunchConfig> {
        warps_cfg(n, 4)
    }
}

/// A device with the launchers: what the GPU model (`model`, `fused`, `intervene`) runs on.
pub trait Backend: Device + Ops {}
impl<T: Device + Ops> Backend for T {}

fn warps_cfg(n: usize, per_block: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(n.div_ceil(per_block))
        .map_err(|_| AsaError::Device(format!("{n} warps exceed one grid")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: ((per_block * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Device for CudaBackend {
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        CudaBackend::launch(self, name, cfg, args)
    }
    fn max_grid(&self) -> u32 {
        (self.sm_count.max(1) as u32) * 32
    }
    fn scratch64(&self, n: usize, second: bool) -> Result<Dv<f64>> {
        CudaBackend::scratch64(self, n, second)
    }
    fn scratch_bf16(&self, n: usize, second: bool) -> Result<Dv<u16>> {
        CudaBackend::scratch_bf16(self, n, second)
    }
    fn tickets(&self) -> Result<Dv<u32>> {
        let mut s = self.tickets.borrow_mut();
        if s.is_none() {
            *s = Some(self.zeros::<u32>(TICKETS)?);
        }
        Ok(s.as_ref().unwrap().dv())
    }
    fn temp<T: Elem>(&self, n: usize) -> Result<Temp<T>> {
        let t = self.cached::<T>(n)?;
        CudaBackend::memset_zero(self, t.dv)?;
        Ok(t)
    }
    fn temp_from<T: Elem>(&self, x: &[T]) -> Result<Temp<T>> {
        let t = self.cached::<T>(x.len())?;
        CudaBackend::upload_into(self, t.dv, x)?;
        Ok(t)
    }
    fn memset_zero<T>(&self, x: Dv<T>) -> Result<()> {
        CudaBackend::memset_zero(self, x)
    }
    fn download<T: Elem>(&self, x: Dv<T>) -> Result<Vec<T>> {
        CudaBackend::download(self, x)
    }
    fn upload_into<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        CudaBackend::upload_into(self, dst, x)
    }
    fn upload_async<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        CudaBackend::upload_async(self, dst, x)
    }
    fn copy(&self, dst: Dv<f32>, src: Dv<f32>) -> Result<()> {
        CudaBackend::copy(self, dst, src)
    }
    fn sync(&self) -> Result<()> {
        CudaBackend::sync(self)
    }
    /// None while profiling (`ASA_CUDA_PROFILE` times every launch with host syncs).
    fn graph(&self) -> Option<&graph::StepGraph> {
        self.profile.is_none().then_some(&self.graph)
    }
    fn graph_capture_begin(&self) -> Result<()> {
        *self.graph_exec.borrow_mut() = None;
        self.temps.freeze(true);
        self.graph.begin(graph::Mode::Capture);
        self.stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| {
                self.graph.end();
                self.temps.freeze(false);
                dev_err("beginning a graph capture", e)
            })
    }
    fn graph_capture_end(&self) -> Result<()> {
        // the trace is complete only when nothing was refused (`StepGraph::refuse`)
        let complete = self.graph.end();
        self.temps.freeze(false);
        let g = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(|e| dev_err("ending a graph capture", e))?;
        match g {
            Some(g) if complete => {
                g.upload().map_err(|e| dev_err("uploading a graph", e))?;
                *self.graph_exec.borrow_mut() = Some(g);
                Ok(())
            }
            _ => Err(AsaError::Device(
                "the graph capture did not complete".into(),
            )),
        }
    }
    fn graph_launch(&self) -> Result<()> {
        match self.graph_exec.borrow().as_ref() {
            Some(g) => g
                .launch()
                .map_err(|e| dev_err("launching the step graph", e)),
            None => Err(AsaError::Device("no graph held".into())),
        }
    }
    fn precision(&self) -> Precision {
        self.precision.get()
    }
    fn set_precision(&self, p: Precision) {
        self.precision.set(p)
    }
    fn sm_count(&self) -> usize {
        self.sm_count.max(1) as usize
    }
    fn bf16_copies(&self) -> Option<&Bf16Copy> {
        Some(&self.bf16_copy)
    }
    fn temp_uninit<T: Elem>(&self, n: usize) -> Result<Temp<T>> {
        self.cached::<T>(n)
    }
    fn max_smem(&self) -> usize {
        self.max_smem
    }
    fn gemm(&self, g: &ops::Gemm) -> Result<()> {
        ops::cublas_gemm(self, g)
    }
}

/// One kernel argument (the C types of the kernels: pointers, int, long long, float, double).
#[derive(Debug, Clone, Copy)]
pub enum KArg {
    /// a device address, and the bytes of the range it names (for the cost model)
    Ptr(u64, u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl<T> From<Dv<T>> for KArg {
    fn from(d: Dv<T>) -> Self {
        KArg::Ptr(d.ptr, (d.len * std::mem::size_of::<T>()) as u64)
    }
}
impl From<i32> for KArg {
    fn from(x: i32) -> Self {
        KArg::I32(x)
    }
}
impl From<i64> for KArg {
    fn from(x: i64) -> Self {
        KArg::I64(x)
    }
}
impl From<u64> for KArg {
    fn from(x: u64) -> Self {
        KArg::U64(x)
    }
}
impl From<f32> for KArg {
    fn from(x: f32) -> Self {
        KArg::F32(x)
    }
}
impl From<f64> for KArg {
    fn from(x: f64) -> Self {
        KArg::F64(x)
    }
}

/// Free memory of CUDA device 0, in bytes, when a driver and a device are there (the memory
/// preflight's, `crate::preflight::check_run`).
pub fn device_free_memory() -> Option<u64> {
    if !driver_present() {
        return None;
    }
    let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
        .ok()?
        .ok()?;
    let (free, _total) = ctx.mem_get_info().ok()?;
    Some(free as u64)
}

/// The free device memory of a run at `place` (None on the CPU, or where no GPU answers).
pub fn free_memory_at(place: crate::config::Place) -> Option<u64> {
    place.is_cuda().then(device_free_memory).flatten()
}

/// Environment switch of the tensor-core tile kernels (the fused slot scan, the linear
/// attention's tiles, the write keys' gradient): `0`, `false` or `off` keeps their f64 kernels
/// under `Precision::Bf16` too (for A/B timings on a device).
pub const TENSOR_CORES_ENV: &str = "ASA_CUDA_TENSOR_CORES";

/// Whether `be` runs the tensor-core tile kernels: under `Precision::Bf16`, unless
/// [`TENSOR_CORES_ENV`] turns them off.
pub fn tensor_cores<D: Device + ?Sized>(be: &D) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| {
        matches!(
            std::env::var(TENSOR_CORES_ENV).map(|v| v.trim().to_ascii_lowercase()),
            Ok(v) if v == "0" || v == "false" || v == "off"
        )
    });
    be.precision() == Precision::Bf16 && !off
}

/// A size as a kernel `int`, or a clear error when it does not fit.
pub fn i32_of(name: &str, x: usize) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| AsaError::Device(format!("{name} = {x} exceeds the kernels' 32-bit sizes")))
}

// ------------------------------------------------------------------------------------------------
// the backend

/// Context, stream, cuBLAS handle and the loaded kernel modules of one device.
pub struct CudaBackend {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub arch: &'static str,
    pub device_name: String,
    pub sm_count: i32,
    /// Dynamic shared memory per block with the opt-in (bytes).
    pub max_smem: usize,
    /// GEMM input precision (see `Precision`); everything else is f32.
    pub precision: std::cell::Cell<Precision>,
    modules: HashMap<String, Arc<CudaModule>>,
    /// kernel name -> file stem
    index: HashMap<String, String>,
    funcs: RefCell<HashMap<String, CudaFunction>>,
    /// kernels opted in to more than 48 KiB of dynamic shared memory
    smem_opted: RefCell<std::collections::HashSet<String>>,
    /// `ASA_CUDA_PROFILE=1`: per-kernel (launches, seconds), timed by synchronising around each
    /// launch; reported on stderr when the backend is dropped.
    profile: Option<RefCell<HashMap<String, (u64, f64)>>>,
    /// scratch for reductions (f64) and bf16 GEMM inputs, grown on demand (stream-ordered reuse)
    pub(crate) scratch_f64: RefCell<Option<CudaSlice<f64>>>,
    pub(crate) scratch_f64b: RefCell<Option<CudaSlice<f64>>>,
    pub(crate) scratch_bf16_a: RefCell<Option<CudaSlice<u16>>>,
    pub(crate) scratch_bf16_b: RefCell<Option<CudaSlice<u16>>>,
    /// arrival counters of the single-launch reductions ([`Device::tickets`])
    tickets: RefCell<Option<CudaSlice<u32>>>,
    /// freed temporaries kept for reuse (no allocation inside a step after the first)
    pub(crate) temps: Rc<TempCache>,
    /// pinned host memory that `upload_async` copies from, and whether a copy from it may
    /// still be queued (cleared by every stream synchronisation)
    staging: RefCell<Option<cudarc::driver::PinnedHostSlice<u8>>>,
    staging_busy: std::cell::Cell<bool>,
    /// the model's bf16 weight copy, read by bf16 GEMMs
    bf16_copy: Bf16Copy,
    /// graph capture: the bookkeeping, and the graph held ([`graph`])
    graph: graph::StepGraph,
    graph_exec: RefCell<Option<cudarc::driver::CudaGraph>>,
    /// cuBLAS' workspace (set once: no allocation of its own inside a captured step)
    _blas_workspace: CudaSlice<u8>,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // the pinned staging buffer of `upload_async` must not be freed under a queued copy
        let _ = self.sync();
        if let Some(r) = self.profile_report() {
            eprintln!("{r}");
        }
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({}, {})", self.device_name, self.arch)
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or takes from the process cache) every kernel file for
    /// its architecture and loads them. `AsaError::Device` when no driver/device/library is found.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(AsaError::Device(
                "no CUDA driver found: libcuda.so could not be loaded (is an NVIDIA driver installed?)".into(),
            ));
        }
        if !nvrtc_present() {
            return Err(AsaError::Device(
                "NVRTC not found: libnvrtc.so.13 could not be loaded (add the CUDA lib folder to LD_LIBRARY_PATH or set ASA_CUDA_PYPI_DIR)".into(),
            ));
        }
        if !cublas_present() {
            return Err(AsaError::Device(
                "cuBLAS not found: libcublas.so.13 could not be loaded (add the CUDA lib folder to LD_LIBRARY_PATH)".into(),
            ));
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| AsaError::Device("opening the CUDA context panicked".into()))?
            .map_err(|e| dev_err(&format!("opening CUDA device {ordinal}"), e))?;
        // One stream only: no per-slice events (see `Dv`).
        // SAFETY: every buffer of this backend lives on `stream`.
        unsafe { ctx.disable_event_tracking() };
        // a stream of its own (the legacy default stream cannot be captured into a graph)
        let stream = ctx
            .new_stream()
            .map_err(|e| dev_err("creating the CUDA stream", e))?;
        let (maj, min) = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        let arch = arch_for(maj, min);
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(108);
        let max_smem = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map(|b| b.max(0) as usize)
            .unwrap_or(SMEM_DEFAULT);
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| dev_err("creating the cuBLAS handle", e))?;
        // SAFETY: cuBLAS' scratch; it never reads what it has not written.
        let blas_workspace = unsafe { stream.alloc::<u8>(BLAS_WORKSPACE) }
            .map_err(|e| dev_err("allocating the cuBLAS workspace", e))?;
        // SAFETY: the workspace outlives the handle (both are fields of the backend, the
        // handle dropped first) and is used on the handle's stream only.
        let st = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                blas_workspace.dv().ptr as *mut std::ffi::c_void,
                BLAS_WORKSPACE,
            )
        };
        if st != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(AsaError::Device(format!(
                "setting the cuBLAS workspace: {st:?}"
            )));
        }
        let mut modules = HashMap::new();
        let mut index = HashMap::new();
        for (stem, src) in KERNELS {
            let ptx = compile_ptx(stem, arch)?;
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| dev_err(&format!("loading the {stem} kernels for {arch}"), e))?;
            for name in kernel_names(src) {
                index.insert(name, stem.to_string());
            }
            modules.insert(stem.to_string(), m);
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            arch,
            device_name,
            sm_count,
            max_smem,
            precision: std::cell::Cell::new(Precision::F32),
            modules,
            index,
            funcs: RefCell::new(HashMap::new()),
            smem_opted: RefCell::new(std::collections::HashSet::new()),
            profile: std::env::var_os("ASA_CUDA_PROFILE")
                .filter(|v| !v.is_empty() && v != "0")
                .map(|_| RefCell::new(HashMap::new())),
            scratch_f64: RefCell::new(None),
            scratch_f64b: RefCell::new(None),
            scratch_bf16_a: RefCell::new(None),
            scratch_bf16_b: RefCell::new(None),
            tickets: RefCell::new(None),
            temps: Rc::new(TempCache::default()),
            staging: RefCell::new(None),
            staging_busy: std::cell::Cell::new(false),
            bf16_copy: Bf16Copy::default(),
            graph: graph::StepGraph::default(),
            graph_exec: RefCell::new(None),
            _blas_workspace: blas_workspace,
        })
    }

    /// The loaded kernel `name`.
    pub fn func(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.funcs.borrow().get(name) {
            return Ok(f.clone());
        }
        let stem = self
            .index
            .get(name)
            .ok_or_else(|| AsaError::Device(format!("no kernel named {name} in cuda/*.cu")))?;
        let f = self.modules[stem]
            .load_function(name)
            .map_err(|e| dev_err(&format!("loading kernel {name}"), e))?;
        self.funcs.borrow_mut().insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Launches kernel `name` on the backend's stream.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 || cfg.grid_dim.2 == 0 {
            return Ok(()); // nothing to do
        }
        if self.graph.note(|| graph::hash_launch(name, &cfg, args)) == graph::Issue::Skip {
            return Ok(());
        }
        let f = self.func(name)?;
        if cfg.shared_mem_bytes as usize > SMEM_DEFAULT && !self.smem_opted.borrow().contains(name)
        {
            // more than the default dynamic shared memory needs the kernel's opt-in
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.max_smem as i32,
            )
            .map_err(|e| dev_err(&format!("shared memory opt-in of {name}"), e))?;
            self.smem_opted.borrow_mut().insert(name.to_string());
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                KArg::Ptr(x, _) | KArg::U64(x) => b.arg(x),
                KArg::I32(x) => b.arg(x),
                KArg::I64(x) => b.arg(x),
                KArg::F32(x) => b.arg(x),
                KArg::F64(x) => b.arg(x),
            };
        }
        let t0 = self.profile_start()?;
        // SAFETY: the argument lists of ops.rs match the kernels' C signatures (checked by the
        // CUDA tests); device ranges are live (see `Dv`).
        unsafe { b.launch(cfg) }.map_err(|e| dev_err(&format!("launching {name}"), e))?;
        self.profile_end(name, t0)
    }

    /// Profiling: synchronise and start a timer (when `ASA_CUDA_PROFILE` is set).
    pub(crate) fn profile_start(&self) -> Result<Option<std::time::Instant>> {
        if self.profile.is_none() {
            return Ok(None);
        }
        self.sync()?;
        Ok(Some(std::time::Instant::now()))
    }

    /// Profiling: synchronise and book the time since `t0` under `name`.
    pub(crate) fn profile_end(&self, name: &str, t0: Option<std::time::Instant>) -> Result<()> {
        if let (Some(p), Some(t0)) = (&self.profile, t0) {
            self.sync()?;
            let dt = t0.elapsed().as_secs_f64();
            let mut m = p.borrow_mut();
            let e = m.entry(name.to_string()).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += dt;
        }
        Ok(())
    }

    /// The per-kernel profile (`ASA_CUDA_PROFILE=1`), most expensive first.
    pub fn profile_report(&self) -> Option<String> {
        let p = self.profile.as_ref()?.borrow();
        let mut v: Vec<(&String, &(u64, f64))> = p.iter().collect();
        v.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let total: f64 = v.iter().map(|x| x.1 .1).sum();
        let mut out = format!(
            "CUDA profile ({}): {:.3} s in kernels\n",
            self.device_name, total
        );
        for (name, (n, t)) in v {
            out.push_str(&format!(
                "  {:>9.3} ms {:>5.1}% {:>8} x {name}\n",
                t * 1e3,
                100.0 * t / total.max(1e-12),
                n
            ));
        }
        Some(out)
    }

    /// An uninitialised temporary of `n` elements from the backend's [`TempCache`].
    fn cached<T>(&self, n: usize) -> Result<Temp<T>> {
        self.temps.take::<T>(
            n,
            |b| Ok(Box::new(self.alloc_bytes(b)?)),
            |k| {
                k.downcast_ref::<CudaSlice<u8>>()
                    .expect("the cache holds CudaSlice<u8>")
                    .dv()
                    .ptr
            },
        )
    }

    fn alloc_bytes(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.graph.refuse("an allocation")?;
        // SAFETY: the bytes are written (memset or upload) before any kernel reads them.
        unsafe { self.stream.alloc::<u8>(bytes) }
            .map_err(|e| dev_err(&format!("allocating {bytes} bytes"), e))
    }

    /// Zero-filled device buffer.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.graph.refuse("an allocation")?;
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| dev_err(&format!("allocating {n} elements"), e))
    }

    /// Host -> new device buffer (an empty slice gives a 1-element zero buffer).
    pub fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        x: &[T],
    ) -> Result<CudaSlice<T>> {
        if x.is_empty() {
            return self.zeros::<T>(1);
        }
        self.graph.refuse("an upload")?;
        self.stream
            .clone_htod(x)
            .map_err(|e| dev_err(&format!("uploading {} elements", x.len()), e))
    }

    /// Device range -> host vector (synchronises the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, x: Dv<T>) -> Result<Vec<T>> {
        let mut out = vec![T::default(); x.len];
        if x.len == 0 {
            return Ok(out);
        }
        self.graph.refuse("a download")?;
        // SAFETY: `x` is a live device range of `x.len` elements (see `Dv`); the copy is
        // synchronous with respect to the host (the stream is synchronised before returning).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out[..], x.ptr, self.stream.cu_stream())
                .map_err(|e| dev_err("downloading", e))?;
        }
        self.sync()?;
        Ok(out)
    }

    /// Host -> existing device range (`x.len() <= dst.len`).
    pub fn upload_into<T: DeviceRepr>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        assert!(x.len() <= dst.len, "upload_into: {} > {}", x.len(), dst.len);
        if x.is_empty() {
            return Ok(());
        }
        self.graph.refuse("an upload")?;
        // SAFETY: `dst` is a live device range with room for `x`; the host slice outlives the
        // copy because the stream is synchronised before returning.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr, x, self.stream.cu_stream())
                .map_err(|e| dev_err("uploading", e))?;
        }
        self.sync()
    }

    /// Host -> existing device range, queued on the stream without blocking the host: `x` is
    /// copied into the pinned staging buffer first (after waiting for the stream if a copy from
    /// that buffer may still be queued).
    pub fn upload_async<T: DeviceRepr>(&self, dst: Dv<T>, x: &[T]) -> Result<()> {
        assert!(
            x.len() <= dst.len,
            "upload_async: {} > {}",
            x.len(),
            dst.len
        );
        let bytes = std::mem::size_of_val(x);
        if bytes == 0 {
            return Ok(());
        }
        self.graph.refuse("an upload")?;
        if self.staging_busy.get() {
            self.sync()?;
        }
        let mut staging = self.staging.borrow_mut();
        if staging.as_ref().map(|s| s.len() < bytes).unwrap_or(true) {
            // SAFETY: the bytes are written below before any copy reads them.
            *staging = Some(
                unsafe { self.ctx.alloc_pinned::<u8>(bytes.max(1 << 16)) }.map_err(|e| {
                    dev_err(&format!("allocating {bytes} bytes of pinned memory"), e)
                })?,
            );
        }
        let host = staging
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(|e| dev_err("pinned staging buffer", e))?;
        // SAFETY: `x` is `bytes` bytes of plain data; `host` has room for them and no queued copy
        // reads it (the stream was synchronised since the last one).
        unsafe {
            std::ptr::copy_nonoverlapping(x.as_ptr() as *const u8, host.as_mut_ptr(), bytes);
            cudarc::driver::result::memcpy_htod_async(
                dst.ptr,
                &host[..bytes],
                self.stream.cu_stream(),
            )
            .map_err(|e| dev_err("uploading", e))?;
        }
        self.staging_busy.set(true);
        Ok(())
    }

    /// Device -> device copy of `src` into `dst` (`src.len <= dst.len`).
    pub fn copy(&self, dst: Dv<f32>, src: Dv<f32>) -> Result<()> {
        assert!(src.len <= dst.len, "copy: {} > {}", src.len, dst.len);
        if src.len == 0 {
            return Ok(());
        }
        let h = || graph::hash_copy(dst.ptr, src.ptr, src.len);
        if self.graph.note(h) == graph::Issue::Skip {
            return Ok(());
        }
        // SAFETY: both ranges are live device memory of this context (see `Dv`).
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr,
                src.ptr,
                src.len * 4,
                self.stream.cu_stream(),
            )
            .map_err(|e| dev_err("device copy", e))
        }
    }

    /// Zeroes a device range.
    pub fn memset_zero<T>(&self, x: Dv<T>) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        let bytes = x.len * std::mem::size_of::<T>();
        if self.graph.note(|| graph::hash_memset(x.ptr, bytes)) == graph::Issue::Skip {
            return Ok(());
        }
        // SAFETY: `x` is a live device range (see `Dv`).
        unsafe {
            cudarc::driver::result::memset_d8_async(
                x.ptr,
                0,
                x.len * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
            .map_err(|e| dev_err("memset", e))
        }
    }

    /// Waits for the stream; surfaces asynchronous kernel errors.
    pub fn sync(&self) -> Result<()> {
        self.graph.refuse("a synchronisation")?;
        self.stream
            .synchronize()
            .map_err(|e| dev_err("CUDA stream", e))?;
        self.staging_busy.set(false);
        Ok(())
    }

    /// An f64 scratch range of at least `n` elements (one of two independent scratch buffers).
    pub(crate) fn scratch64(&self, n: usize, second: bool) -> Result<Dv<f64>> {
        let cell = if second {
            &self.scratch_f64b
        } else {
            &self.scratch_f64
        };
        let mut s = cell.borrow_mut();
        if s.as_ref().map(|b| b.len() < n).unwrap_or(true) {
            *s = Some(self.zeros::<f64>(n.max(1024))?);
        }
        Ok(s.as_ref().unwrap().dv().sub(0, n))
    }

    pub(crate) fn scratch_bf16(&self, n: usize, second: bool) -> Result<Dv<u16>> {
        let cell = if second {
            &self.scratch_bf16_b
        } else {
            &self.scratch_bf16_a
        };
        let mut s = cell.borrow_mut();
        if s.as_ref().map(|b| b.len() < n).unwrap_or(true) {
            *s = Some(self.zeros::<u16>(n.max(1024))?);
        }
        Ok(s.as_ref().unwrap().dv().sub(0, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache over fake allocations: `limit` bytes of "device memory", addresses counted up.
    struct Fake {
        next: std::cell::Cell<u64>,
        used: std::cell::Cell<usize>,
        limit: usize,
    }

    impl Fake {
        fn take(&self, cache: &Rc<TempCache>, n: usize) -> Result<Temp<f32>> {
            cache.take::<f32>(
                n,
                |b| {
                    if self.used.get() + b > self.limit {
                        return Err(AsaError::Device("out of memory".into()));
                    }
                    self.used.set(self.used.get() + b);
                    let p = self.next.get();
                    self.next.set(p + b as u64);
                    Ok(Box::new(p))
                },
                |k| *k.downcast_ref::<u64>().unwrap(),
            )
        }
    }

    /// A registered bf16 copy serves the ranges inside its weights that start at a multiple of
    /// 8 elements (16 bytes of bf16), at the same element offset; nothing else.
    #[test]
    fn the_bf16_copy_serves_aligned_ranges_inside_the_weights() {
        // SAFETY: addresses only compared and offset, never dereferenced.
        let (w, c) = unsafe {
            (
                Dv::<f32>::from_raw(4096, 100),
                Dv::<u16>::from_raw(1 << 20, 100),
            )
        };
        let copy = Bf16Copy::default();
        assert!(copy.of(w).is_none(), "nothing registered");
        copy.set(w, c);
        let at = |off: usize, len: usize| copy.of(w.sub(off, len)).map(|d| (d.ptr, d.len));
        assert_eq!(at(0, 100), Some((1 << 20, 100)));
        assert_eq!(at(16, 40), Some(((1 << 20) + 32, 40)));
        assert_eq!(at(3, 8), None, "misaligned");
        let outside = unsafe { Dv::<f32>::from_raw(4096 + 96 * 4, 8) };
        assert_eq!(copy.of(outside).map(|d| d.len), None, "past the end");
        let before = unsafe { Dv::<f32>::from_raw(4096 - 32, 8) };
        assert!(copy.of(before).is_none(), "before the start");
        // a held range serves while held, before the weights; then the weights again
        let (x, xc) = unsafe {
            (
                Dv::<f32>::from_raw(1 << 30, 64),
                Dv::<u16>::from_raw(1 << 31, 64),
            )
        };
        assert!(copy.of(x).is_none());
        copy.push(x, xc);
        assert_eq!(copy.of(x.sub(8, 8)).map(|d| d.ptr), Some((1 << 31) + 16));
        assert_eq!(at(0, 100), Some((1 << 20, 100)), "the weights still");
        copy.pop();
        assert!(copy.of(x).is_none(), "released");
    }

    /// A dropped temporary serves the next request of its size; other sizes allocate; an
    /// allocation that fails empties the cache and is tried once more.
    #[test]
    fn the_temp_cache_reuses_by_size_and_frees_on_failure() {
        let cache = Rc::new(TempCache::default());
        let dev = Fake {
            next: std::cell::Cell::new(4096),
            used: std::cell::Cell::new(0),
            limit: 1000,
        };
        let a = dev.take(&cache, 100).unwrap();
        let pa = a.dv().ptr;
        drop(a);
        assert_eq!(cache.held_bytes(), 400);
        let b = dev.take(&cache, 100).unwrap();
        assert_eq!(b.dv().ptr, pa, "the same size reuses the allocation");
        assert_eq!((b.len(), cache.held_bytes()), (100, 0));
        let c = dev.take(&cache, 50).unwrap();
        assert_ne!(c.dv().ptr, pa);
        assert_eq!(dev.used.get(), 600);
        drop(c);
        // 600 used of 1000 (200 of them cached): 500 more fits only once the cache is emptied,
        // and in this fake freed memory is not returned, so it fails
        assert_eq!(cache.footprint_bytes(), 600);
        assert!(dev.take(&cache, 125).is_err());
        assert_eq!(
            cache.held_bytes(),
            0,
            "a failed allocation empties the cache"
        );
        assert_eq!(cache.peak_in_use_bytes(), 600);
        drop(b);
        assert_eq!(cache.footprint_bytes(), 400);
        // frozen (a graph capture): a failed allocation keeps the cached ones
        cache.freeze(true);
        assert!(dev.take(&cache, 200).is_err());
        assert_eq!(cache.held_bytes(), 400, "frozen: nothing freed");
        cache.freeze(false);
        assert!(dev.take(&cache, 200).is_err());
        assert_eq!(cache.held_bytes(), 0, "thawed: emptied again");
    }

    /// Of several free allocations of a size the lowest address comes first, whatever order
    /// they were freed in: the same requests after the same frees get the same addresses.
    #[test]
    fn the_temp_cache_hands_out_the_lowest_free_address() {
        let cache = Rc::new(TempCache::default());
        let dev = Fake {
            next: std::cell::Cell::new(4096),
            used: std::cell::Cell::new(0),
            limit: 1 << 20,
        };
        let mut ts: Vec<Option<Temp<f32>>> = (0..3)
            .map(|_| Some(dev.take(&cache, 10).unwrap()))
            .collect();
        let ps: Vec<u64> = ts.iter().map(|t| t.as_ref().unwrap().dv().ptr).collect();
        assert!(ps[0] < ps[1] && ps[1] < ps[2]);
        for i in [0, 2, 1] {
            ts[i] = None; // freed in this order: last in, first out would give ps[1] first
        }
        let again: Vec<Temp<f32>> = (0..3).map(|_| dev.take(&cache, 10).unwrap()).collect();
        let got: Vec<u64> = again.iter().map(|t| t.dv().ptr).collect();
        assert_eq!(got, ps);
        assert_eq!(dev.used.get(), 120, "no new allocation");
    }
}
