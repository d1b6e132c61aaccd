//! Runs the kernels of `cuda/*.cu` on the CPU through the SIMT emulator of `tests/simt/` (one
//! fiber per GPU thread, barriers and warp shuffles emulated), so that kernels can be checked
//! against their CPU twins on machines without a GPU.
//!
//! The emulator is built once per test binary with the system C++ compiler (`$CXX`, else `c++`,
//! `g++`, `clang++`) into `CARGO_TARGET_TMPDIR`, keyed by a hash of the sources, and loaded with
//! `dlopen`. Without a C++ compiler [`Simt::get`] returns `None` and the tests say SKIPPED.
//! Launches are serialised (the emulator has global state).

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use std::cell::RefCell;
use std::rc::Rc;

use asa::backend::cuda::graph::{self, Issue, StepGraph};
use asa::backend::cuda::ops::{gemm_operands, Gemm, Op};
use asa::backend::cuda::{
    kernel_names, AsDv, Bf16Copy, Device, Dv, KArg, Ops, Precision, Temp, TempCache,
};
use cudarc::driver::LaunchConfig;

use crate::dev::{Elem, TestDev};

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut c_void,
    c_int,
    *mut c_char,
    usize,
) -> c_int;

/// One kernel parameter, passed by value as cuLaunchKernel does.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(*mut c_void),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl Arg {
    /// A device pointer: here the host address of the slice's first element.
    pub fn of<T>(x: &mut [T]) -> Arg {
        Arg::Ptr(x.as_mut_ptr() as *mut c_void)
    }
    /// A read-only input (the kernel must not write it).
    pub fn ro<T>(x: &[T]) -> Arg {
        Arg::Ptr(x.as_ptr() as *mut c_void)
    }
    pub fn null() -> Arg {
        Arg::Ptr(std::ptr::null_mut())
    }
}

pub struct Simt {
    launch: LaunchFn,
    lock: Mutex<()>,
}

// SAFETY: the library handle is never closed and `launch` is only called under `lock`.
unsafe impl Sync for Simt {}
unsafe impl Send for Simt {}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compiler() -> Option<String> {
    let mut cands: Vec<String> = Vec::new();
    if let Ok(c) = std::env::var("CXX") {
        cands.push(c);
    }
    cands.extend(["c++", "g++", "clang++"].map(String::from));
    cands.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// The kernel files: every `cuda/*.cu`, and the emulator's own self-test kernels.
fn sources() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("cuda"))
        .expect("cuda/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    v.push(repo().join("tests/simt/selftest.cu"));
    v
}

fn build(cxx: &str) -> Result<PathBuf, String> {
    let simt_dir = repo().join("tests/simt");
    let mut h = DefaultHasher::new();
    let mut inputs = sources();
    inputs.push(repo().join("cuda/common.cuh"));
    inputs.push(simt_dir.join("simt.hpp"));
    inputs.push(simt_dir.join("runtime.cpp"));
    for p in &inputs {
        std::fs::read(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .hash(&mut h);
    }
    cxx.hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("simt-{:016x}", h.finish()));
    let lib = dir.join("libasa_simt.so");
    if lib.exists() {
        return Ok(lib);
    }
    // objects in a directory of this process (concurrent builds do not mix), the library
    // renamed into place at the end
    let work = dir.join(format!("build-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let flags = [
        "-std=c++17",
        "-O1",
        "-g0",
        "-fPIC",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-Wno-unknown-pragmas",
    ];
    // one translation unit per kernel file (their static helpers may share names)
    let mut units = vec![simt_dir.join("runtime.cpp")];
    for src in sources() {
        let text = std::fs::read_to_string(&src).map_err(|e| e.to_string())?;
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let mut gen = format!("#include \"{}\"\n", src.display());
        for (i, k) in kernel_names(&text).iter().enumerate() {
            gen += &format!(
                "static simt::Reg simt_reg_{i}(\"{k}\", [](void** a) {{ simt::call(&{k}, a); }}, simt::arity(&{k}));\n"
            );
        }
        let unit = work.join(format!("{stem}.cpp"));
        std::fs::write(&unit, gen).map_err(|e| e.to_string())?;
        units.push(unit);
    }
    let children: Vec<_> = units
        .iter()
        .map(|u| {
            let obj = work.join(u.file_name().unwrap()).with_extension("o");
            let child = Command::new(cxx)
                .args(flags)
                .arg("-I")
                .arg(repo().join("cuda"))
                .arg("-include")
                .arg(simt_dir.join("simt.hpp"))
                .arg("-c")
                .arg(u)
                .arg("-o")
                .arg(&obj)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("{cxx}: {e}"));
            (obj, child)
        })
        .collect();
    let mut objs = Vec::new();
    for (obj, child) in children {
        let out = child?.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "compiling {} failed:\n{}",
                obj.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        objs.push(obj);
    }
    let tmp = dir.join(format!("libasa_simt.so.{}", std::process::id()));
    let out = Command::new(cxx)
        .arg("-shared")
        .args(&objs)
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "linking the emulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    // builds of older sources are not needed any more
    if let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) {
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("simt-") && p != dir {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    Ok(lib)
}

impl Simt {
    /// The emulator, built on first use; `None` (with the reason printed) without a C++
    /// compiler. A compile error in the kernels or the emulator is a panic: it is a bug.
    pub fn get() -> Option<&'static Simt> {
        static CELL: OnceLock<Option<Simt>> = OnceLock::new();
        CELL.get_or_init(|| {
            let Some(cxx) = compiler() else {
                println!("simt: no C++ compiler (set CXX): emulated kernel tests are skipped");
                return None;
            };
            let lib = build(&cxx).unwrap_or_else(|e| panic!("simt emulator: {e}"));
            let path = CString::new(lib.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: dlopen/dlsym with valid C strings; the handle is kept for the process.
            unsafe {
                let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                assert!(
                    !h.is_null(),
                    "dlopen {}: {}",
                    lib.display(),
                    CStr::from_ptr(libc::dlerror()).to_string_lossy()
                );
                let sym = libc::dlsym(h, c"simt_launch".as_ptr());
                assert!(!sym.is_null(), "simt_launch missing from {}", lib.display());
                Some(Simt {
                    launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym),
                    lock: Mutex::new(()),
                })
            }
        })
        .as_ref()
    }

    /// Runs kernel `name` on `grid` x `block` threads with `smem` bytes of dynamic shared memory.
    ///
    /// Every pointer argument must address host memory large enough for what the kernel
    /// touches with these arguments (as device memory would have to be).
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: usize,
        args: &[Arg],
    ) -> Result<(), String> {
        // values in stable storage, then the array of pointers to them
        let mut vals: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut b = [0u8; 8];
                match *a {
                    Arg::Ptr(p) => b.copy_from_slice(&(p as usize as u64).to_ne_bytes()),
                    Arg::I32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
                    Arg::I64(x) => b.copy_from_slice(&x.to_ne_bytes()),
                    Arg::F32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
                    Arg::F64(x) => b.copy_from_slice(&x.to_ne_bytes()),
                }
                b
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        let cname = CString::new(name).unwrap();
        let mut err = vec![0 as c_char; 512];
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the argument array matches what cuLaunchKernel would get; the caller
        // guarantees the pointed-to buffers (see above).
        let rc = unsafe {
            (self.launch)(
                cname.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                smem,
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: the emulator NUL-terminates its message within the buffer.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    }
}

/// The emulator as a [`TestDev`]: buffers are host memory (8-byte aligned, kept until the
/// device is dropped) addressed through [`Dv`]; launches go to [`Simt::launch`]; GEMMs run on
/// the host in f64 with cuBLAS' conventions (f32 inputs: the emulated device has no bf16 path).
/// Grid-stride kernels get at most 3 blocks, so their loops turn. Temporaries come from a
/// [`TempCache`] as on the device; graphs are recorded requests replayed in order (a request
/// the CUDA backend would refuse inside a capture is refused here too).
pub struct EmuDev {
    simt: &'static Simt,
    bufs: RefCell<Vec<Box<[u64]>>>,
    scratch: RefCell<[Option<Box<[u64]>>; 5]>,
    /// `Bf16`: GEMM operands rounded to bf16 as on a device (converted by the kernel, or read
    /// from the registered bf16 copies), and the kernels' tensor-core paths
    precision: std::cell::Cell<Precision>,
    bf16: Bf16Copy,
    temps: Rc<TempCache>,
    graph: StepGraph,
    /// the requests of the capture under way, and the graph held
    recording: RefCell<Vec<EmuReq>>,
    held: RefCell<Vec<EmuReq>>,
}

/// One device request, as a graph holds it.
#[derive(Clone, Debug)]
enum EmuReq {
    Launch(String, LaunchConfig, Vec<KArg>),
    Memset(u64, usize),
    Copy(u64, u64, usize),
    /// the GEMM, its operands' addresses and whether they are bf16
    Gemm(Gemm, u64, u64, bool),
}

impl EmuDev {
    pub fn new(simt: &'static Simt) -> EmuDev {
        EmuDev {
            simt,
            bufs: RefCell::new(Vec::new()),
            scratch: RefCell::new([None, None, None, None, None]),
            precision: std::cell::Cell::new(Precision::F32),
            bf16: Bf16Copy::default(),
            temps: Rc::new(TempCache::default()),
            graph: StepGraph::default(),
            recording: RefCell::new(Vec::new()),
            held: RefCell::new(Vec::new()),
        }
    }

    /// An uninitialised temporary from the cache (an allocation is refused inside a graph).
    fn cached<T>(&self, n: usize) -> asa::error::Result<Temp<T>> {
        self.temps.take::<T>(
            n,
            |bytes| {
                self.graph.refuse("an allocation")?;
                Ok(Box::new(Self::storage(bytes)))
            },
            |k| {
                k.downcast_ref::<Box<[u64]>>()
                    .expect("the cache holds host storage")
                    .as_ptr() as u64
            },
        )
    }

    /// Scratch cell `i` grows (a new allocation) inside a graph: refused.
    fn refuse_growth(&self, i: usize, bytes: usize) -> asa::error::Result<()> {
        let small = self.scratch.borrow()[i]
            .as_ref()
            .is_none_or(|b| b.len() * 8 < bytes);
        if small {
            self.graph.refuse("a scratch allocation")?;
        }
        Ok(())
    }

    /// Runs, records or skips `r` as the graph mode says.
    fn issue(&self, r: EmuReq) -> asa::error::Result<()> {
        let hash = || match &r {
            EmuReq::Launch(name, cfg, args) => graph::hash_launch(name, cfg, args),
            EmuReq::Memset(p, bytes) => graph::hash_memset(*p, *bytes),
            EmuReq::Copy(d, s, n) => graph::hash_copy(*d, *s, *n),
            EmuReq::Gemm(g, a, b, bf16) => g.hash(*a, *b, *bf16, false),
        };
        match self.graph.note(hash) {
            Issue::Run => self.run(&r),
            Issue::Record => {
                self.recording.borrow_mut().push(r);
                Ok(())
            }
            Issue::Skip => Ok(()),
        }
    }

    /// Executes one request.
    fn run(&self, r: &EmuReq) -> asa::error::Result<()> {
        match r {
            EmuReq::Launch(name, cfg, args) => {
                let a: Vec<Arg> = args
                    .iter()
                    .map(|k| match *k {
                        KArg::Ptr(p, _) => Arg::Ptr(p as usize as *mut c_void),
                        KArg::I32(x) => Arg::I32(x),
                        KArg::I64(x) => Arg::I64(x),
                        KArg::U64(x) => Arg::I64(x as i64),
                        KArg::F32(x) => Arg::F32(x),
                        KArg::F64(x) => Arg::F64(x),
                    })
                    .collect();
                let (g, b) = (cfg.grid_dim, cfg.block_dim);
                self.simt
                    .launch(name, g, b, cfg.shared_mem_bytes as usize, &a)
                    .map_err(asa::error::AsaError::Device)
            }
            // SAFETY: the range lies in one of this device's buffers.
            EmuReq::Memset(p, bytes) => unsafe {
                std::ptr::write_bytes(*p as usize as *mut u8, 0, *bytes);
                Ok(())
            },
            // SAFETY: both address live host buffers of this device (they may overlap only
            // if equal, which `copy` permits).
            EmuReq::Copy(d, s, n) => unsafe {
                std::ptr::copy(*s as usize as *const f32, *d as usize as *mut f32, *n);
                Ok(())
            },
            EmuReq::Gemm(g, pa, pb, bf16) => {
                gemm_host(g, *pa, *pb, *bf16);
                Ok(())
            }
        }
    }

    /// 8-byte aligned host storage of at least `bytes` bytes (NaN-free zeros).
    fn storage(bytes: usize) -> Box<[u64]> {
        vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice()
    }

    /// Scratch cell `i`, grown to `bytes` when smaller (older ranges into it become invalid,
    /// as on the device).
    fn scratch_ptr(&self, i: usize, bytes: usize) -> u64 {
        let mut cells = self.scratch.borrow_mut();
        let cell = &mut cells[i];
        if cell.as_ref().map(|b| b.len() * 8 < bytes).unwrap_or(true) {
            *cell = Some(Self::storage(bytes));
        }
        cell.as_mut().unwrap().as_mut_ptr() as u64
    }
}

impl Device for EmuDev {
    fn max_grid(&self) -> u32 {
        3
    }

    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> asa::error::Result<()> {
        let g = cfg.grid_dim;
        if g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Ok(()); // as the CUDA backend: an empty grid is no launch
        }
        self.issue(EmuReq::Launch(name.to_string(), cfg, args.to_vec()))
    }

    fn graph(&self) -> Option<&StepGraph> {
        Some(&self.graph)
    }

    fn graph_capture_begin(&self) -> asa::error::Result<()> {
        self.held.borrow_mut().clear();
        self.recording.borrow_mut().clear();
        self.temps.freeze(true);
        self.graph.begin(graph::Mode::Capture);
        Ok(())
    }

    fn graph_capture_end(&self) -> asa::error::Result<()> {
        let reqs = std::mem::take(&mut *self.recording.borrow_mut());
        self.temps.freeze(false);
        if !self.graph.end() {
            return Err(asa::error::AsaError::Device(
                "the graph capture did not complete".into(),
            ));
        }
        *self.held.borrow_mut() = reqs;
        Ok(())
    }

    fn graph_launch(&self) -> asa::error::Result<()> {
        for r in self.held.borrow().iter() {
            self.run(r)?;
        }
        Ok(())
    }

    fn scratch64(&self, n: usize, second: bool) -> asa::error::Result<Dv<f64>> {
        self.refuse_growth(second as usize, n.max(1) * 8)?;
        let p = self.scratch_ptr(second as usize, n.max(1) * 8);
        // SAFETY: the cell holds at least n f64s and lives as long as the device.
        Ok(unsafe { Dv::from_raw(p, n) })
    }

    fn scratch_bf16(&self, n: usize, second: bool) -> asa::error::Result<Dv<u16>> {
        self.refuse_growth(2 + second as usize, n.max(1) * 2)?;
        let p = self.scratch_ptr(2 + second as usize, n.max(1) * 2);
        // SAFETY: as scratch64.
        Ok(unsafe { Dv::from_raw(p, n) })
    }

    fn tickets(&self) -> asa::error::Result<Dv<u32>> {
        let n = asa::backend::cuda::TICKETS;
        let p = self.scratch_ptr(4, n * 4);
        // SAFETY: as scratch64 (never grown past its first size, so the counters persist).
        Ok(unsafe { Dv::from_raw(p, n) })
    }

    /// Zeroed (a memset request, as on the device).
    fn temp<T: Elem>(&self, n: usize) -> asa::error::Result<Temp<T>> {
        let t = self.cached::<T>(n)?;
        self.memset_zero(t.dv())?;
        Ok(t)
    }

    /// Filled with 0xFF bytes (NaN floats, -1 integers), so that a kernel reading a buffer it
    /// was meant to overwrite shows in the results (a free buffer: no request of a step reads
    /// it before writing it).
    fn temp_uninit<T: Elem>(&self, n: usize) -> asa::error::Result<Temp<T>> {
        let t = self.cached::<T>(n)?;
        let bytes = n * std::mem::size_of::<T>();
        // SAFETY: the temporary holds `bytes` bytes at that address.
        unsafe { std::ptr::write_bytes(t.dv().ptr as usize as *mut u8, 0xFF, bytes) };
        Ok(t)
    }

    fn temp_from<T: Elem>(&self, x: &[T]) -> asa::error::Result<Temp<T>> {
        self.graph.refuse("an upload")?;
        let t = self.cached::<T>(x.len())?;
        let d = t.dv();
        if !x.is_empty() {
            // SAFETY: d addresses x.len() elements of T.
            unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), d.ptr as usize as *mut T, x.len()) };
        }
        Ok(t)
    }

    fn memset_zero<T>(&self, x: Dv<T>) -> asa::error::Result<()> {
        if x.len > 0 {
            self.issue(EmuReq::Memset(x.ptr, x.len * std::mem::size_of::<T>()))?;
        }
        Ok(())
    }

    fn download<T: Elem>(&self, x: Dv<T>) -> asa::error::Result<Vec<T>> {
        self.graph.refuse("a download")?;
        Ok(self.get(x))
    }

    fn upload_into<T: Elem>(&self, dst: Dv<T>, x: &[T]) -> asa::error::Result<()> {
        assert!(x.len() <= dst.len, "upload_into: {} > {}", x.len(), dst.len);
        self.graph.refuse("an upload")?;
        // SAFETY: dst addresses at least x.len() elements of T.
        unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), dst.ptr as usize as *mut T, x.len()) };
        Ok(())
    }

    fn copy(&self, dst: Dv<f32>, src: Dv<f32>) -> asa::error::Result<()> {
        assert!(src.len <= dst.len, "copy: {} > {}", src.len, dst.len);
        if src.len == 0 {
            return Ok(());
        }
        self.issue(EmuReq::Copy(dst.ptr, src.ptr, src.len))
    }

    fn sync(&self) -> asa::error::Result<()> {
        self.graph.refuse("a synchronisation") // launches run to completion
    }

    fn precision(&self) -> Precision {
        self.precision.get()
    }

    fn set_precision(&self, p: Precision) {
        self.precision.set(p)
    }

    fn bf16_copies(&self) -> Option<&Bf16Copy> {
        Some(&self.bf16)
    }

    fn sm_count(&self) -> usize {
        4
    }

    /// An H100's opt-in limit (the emulator's shared memory is host memory).
    fn max_smem(&self) -> usize {
        227 * 1024
    }

    fn gemm(&self, g: &Gemm) -> asa::error::Result<()> {
        // the operands as cuBLAS would get them: f32, or bf16 (converted by the kernel into
        // scratch, or a registered copy), exact in f32 either way
        let Some((pa, pb, bf16)) = gemm_operands(self, g)? else {
            return Ok(());
        };
        self.issue(EmuReq::Gemm(*g, pa, pb, bf16))
    }
}

/// One GEMM on the host in f64 with cuBLAS' conventions, its operands at `pa`, `pb` (f32, or
/// bf16 when `bf16`).
fn gemm_host(g: &Gemm, pa: u64, pb: u64, bf16: bool) {
    {
        let Gemm {
            ta,
            tb,
            m,
            n,
            k: kk,
            lda,
            ldb,
            c,
            ldc,
            beta,
            ..
        } = *g;
        let el = |p: u64, i: usize| -> f32 {
            // SAFETY: p addresses the operand (f32, or u16 when bf16) and i lies in its shape.
            unsafe {
                if bf16 {
                    f32::from_bits((*(p as usize as *const u16).add(i) as u32) << 16)
                } else {
                    *(p as usize as *const f32).add(i)
                }
            }
        };
        // column-major: A(i,l) = a[i + l*lda] (Op::N) or a[l + i*lda] (Op::T); same for B
        let pc = c.ptr as usize as *mut f32;
        // SAFETY: the launcher checked the ranges' shapes as it does for cuBLAS.
        unsafe {
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0.0f64;
                    for l in 0..kk {
                        let x = match ta {
                            Op::N => el(pa, i + l * lda),
                            Op::T => el(pa, l + i * lda),
                        };
                        let y = match tb {
                            Op::N => el(pb, l + j * ldb),
                            Op::T => el(pb, j + l * ldb),
                        };
                        acc += x as f64 * y as f64;
                    }
                    let o = pc.add(i + j * ldc);
                    if !g.c16.is_null() {
                        // cuBLAS' bf16 output (round to nearest even); the f32 range it stands
                        // for turns NaN, so that a reader of it shows
                        let o16 = (g.c16.ptr as usize as *mut u16).add(i + j * ldc);
                        *o16 = half::bf16::from_f32(acc as f32).to_bits();
                        *o = f32::NAN;
                        continue;
                    }
                    *o = if beta == 0.0 {
                        acc as f32
                    } else {
                        (acc + beta as f64 * *o as f64) as f32
                    };
                }
            }
        }
    }
}

impl Ops for EmuDev {}

impl TestDev for EmuDev {
    fn try_precision(&self, p: Precision) -> bool {
        self.set_precision(p);
        true
    }

    fn put<T: Elem>(&self, x: &[T]) -> Dv<T> {
        let bytes = std::mem::size_of_val(x);
        let mut b = Self::storage(bytes);
        // SAFETY: b holds at least `bytes` bytes; T is plain data (DeviceRepr).
        unsafe {
            std::ptr::copy_nonoverlapping(x.as_ptr() as *const u8, b.as_mut_ptr() as *mut u8, bytes)
        };
        let ptr = b.as_mut_ptr() as u64;
        self.bufs.borrow_mut().push(b);
        // SAFETY: the buffer lives as long as the device and holds x.len() elements.
        unsafe { Dv::from_raw(ptr, x.len()) }
    }

    fn get<T: Elem>(&self, x: Dv<T>) -> Vec<T> {
        let mut out = vec![T::default(); x.len];
        if x.len > 0 {
            // SAFETY: x addresses x.len elements of one of this device's buffers.
            unsafe {
                std::ptr::copy_nonoverlapping(x.ptr as usize as *const T, out.as_mut_ptr(), x.len)
            };
        }
        out
    }
}
