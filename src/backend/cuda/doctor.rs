//! `asa doctor`: what the CUDA backend finds on this machine. Reports the build, the driver and
//! GPUs, the NVRTC and cuBLAS libraries and their versions, compiles every kernel with NVRTC
//! (one line per kernel) and, given `ptxas`, assembles each kernel file for sm_80, sm_90 and
//! sm_90a. On a GPU machine it also opens the device, loads every module and runs one kernel.

use std::path::Path;
use std::process::Command;

use super::{kernel_names, KERNELS};

/// The report: one line per finding; `ok` when every attempted check passed and a GPU is usable;
/// `compile_ok` when every kernel compiled (and assembled, with ptxas).
#[derive(Debug, Clone, Default)]
pub struct DoctorReport {
    pub lines: Vec<String>,
    pub ok: bool,
    pub compile_ok: bool,
    pub gpu: bool,
}

impl std::fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        write!(
            f,
            "doctor: {}",
            if self.ok {
                "OK"
            } else if self.compile_ok {
                "kernels compile, but no usable GPU"
            } else {
                "FAILED"
            }
        )
    }
}

/// Runs `ptxas -arch=<sm> [-v]` on `ptx` into a temporary cubin and, given `nvdisasm`, that
/// cubin through `nvdisasm -c`: (ptxas' stderr, the `-v` report; the SASS), or Err(message).
fn assemble(
    ptxas: &Path,
    ptx: &str,
    sm: &str,
    tag: &str,
    verbose: bool,
    nvdisasm: Option<&Path>,
) -> Result<(String, Option<String>), String> {
    let dir = std::env::temp_dir().join(format!("asa-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
    let v = if verbose { ".v" } else { "" };
    let src = dir.join(format!("{tag}{v}.ptx"));
    let cubin = dir.join(format!("{tag}{v}.{sm}.cubin"));
    std::fs::write(&src, ptx).map_err(|e| format!("writing {}: {e}", src.display()))?;
    // (stdout, stderr) of a successful run, else the first lines of its stderr
    let run = |cmd: &mut Command, what: &Path| -> Result<(String, String), String> {
        let res = cmd
            .output()
            .map_err(|e| format!("running {}: {e}", what.display()))?;
        let err = String::from_utf8_lossy(&res.stderr).into_owned();
        if res.status.success() {
            Ok((String::from_utf8_lossy(&res.stdout).into_owned(), err))
        } else {
            Err(err.lines().take(5).collect::<Vec<_>>().join(" | "))
        }
    };
    let mut cmd = Command::new(ptxas);
    cmd.arg(format!("-arch={sm}"));
    if verbose {
        cmd.arg("-v");
    }
    let out = run(cmd.arg(&src).arg("-o").arg(&cubin), ptxas).and_then(|(_, report)| {
        let sass = match nvdisasm {
            Some(nd) => Some(run(Command::new(nd).arg("-c").arg(&cubin), nd)?.0),
            None => None,
        };
        Ok((report, sass))
    });
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&cubin);
    out
}

/// `nvdisasm`: the PyPI wheel's (`nvidia-cuda-nvdisasm`, under `ASA_CUDA_PYPI_DIR`), else the
/// first on `PATH`, else `/usr/local/cuda/bin/nvdisasm`.
pub fn find_nvdisasm() -> Option<std::path::PathBuf> {
    find_cuda_tool("nvdisasm")
}

/// Assembles `ptx` with `ptxas -arch=<sm>`; Err(message) on failure.
pub fn ptxas_assemble(ptxas: &Path, ptx: &str, sm: &str, tag: &str) -> Result<(), String> {
    assemble(ptxas, ptx, sm, tag, false, None).map(|_| ())
}

/// Resources of one kernel as `ptxas -v` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    /// bytes spilled to local memory (stores)
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// static shared memory per block (bytes)
    pub smem_bytes: u32,
}

/// `ptxas`: the PyPI wheel's (under `ASA_CUDA_PYPI_DIR`), else the first on `PATH`, else
/// `/usr/local/cuda/bin/ptxas`.
pub fn find_ptxas() -> Option<std::path::PathBuf> {
    find_cuda_tool("ptxas")
}

/// A CUDA command-line tool: `bin/<name>` of the PyPI wheels' folder, else the first on
/// `PATH`, else `/usr/local/cuda/bin/<name>`.
fn find_cuda_tool(name: &str) -> Option<std::path::PathBuf> {
    let wheel = super::pypi_cuda_root().map(|root| root.join("bin").join(name));
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name));
    wheel
        .into_iter()
        .chain(path)
        .chain(std::iter::once(Path::new("/usr/local/cuda/bin").join(name)))
        .find(|p| p.is_file())
}

/// Registers and spills of every kernel in `ptx` for `sm` (`ptxas -v`): without a GPU, the
/// number that decides a kernel's occupancy.
pub fn ptxas_resources(
    ptxas: &Path,
    ptx: &str,
    sm: &str,
    tag: &str,
) -> Result<Vec<KernelResources>, String> {
    Ok(ptxas_report(ptxas, None, ptx, sm, tag)?.0)
}

/// `ptxas_resources`, and given `nvdisasm` the SASS of the same cubin (one `ptxas` run).
pub fn ptxas_report(
    ptxas: &Path,
    nvdisasm: Option<&Path>,
    ptx: &str,
    sm: &str,
    tag: &str,
) -> Result<(Vec<KernelResources>, Option<String>), String> {
    let (report, sass) = assemble(ptxas, ptx, sm, tag, true, nvdisasm)?;
    Ok((parse_resources(&report), sass))
}

/// The kernels of a `ptxas -v` report.
fn parse_resources(report: &str) -> Vec<KernelResources> {
    // "Compiling entry function 'NAME' for 'sm_90'", then "... N bytes spill stores, M bytes
    // spill loads" and "Used R registers ..."
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut out_v: Vec<KernelResources> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out_v.push(KernelResources {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                smem_bytes: 0,
            });
        } else if let Some(k) = out_v.last_mut() {
            if let Some(n) = num_before(line, "bytes spill stores") {
                k.spill_stores = n;
            }
            if let Some(n) = num_before(line, "bytes spill loads") {
                k.spill_loads = n;
            }
            if let Some(n) = num_before(line, "registers") {
                k.registers = n;
            }
            if let Some(n) = num_before(line, "bytes smem") {
                k.smem_bytes = n;
            }
        }
    }
    out_v
}

/// The single `kernels:` line of a report without NVRTC: what is missing and how to install it.
pub fn nvrtc_missing_line() -> String {
    let nk: usize = KERNELS.iter().map(|(_, src)| kernel_names(src).len()).sum();
    let env = super::PYPI_DIR_ENV;
    let set = match std::env::var_os(env) {
        Some(d) => format!(
            " ({env}={} has no nvidia/cu13/lib/libnvrtc.so.13)",
            Path::new(&d).display()
        ),
        None => String::new(),
    };
    format!(
        "kernels: {nk} in {} files NOT COMPILED: NVRTC (libnvrtc.so.13) not found{set}. Fix: \
         `pip install --no-deps --target DIR nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 \
         nvidia-cuda-nvcc==13.0.88` and `export {env}=DIR`, or install the CUDA 13 toolkit and \
         put its lib64 on LD_LIBRARY_PATH",
        KERNELS.len()
    )
}

/// Runs every check; never panics.
pub fn doctor(ptxas: Option<&Path>) -> DoctorReport {
    let mut r = DoctorReport::default();
    let mut l = |s: String| r.lines.push(s);
    l(format!(
        "build: asa {} (git {}), {} {}",
        super::BUILD_VERSION,
        super::BUILD_GIT,
        super::BUILD_TARGET,
        super::BUILD_PROFILE
    ));
    if let Some(root) = super::pypi_cuda_root() {
        l(format!("{}: {}", super::PYPI_DIR_ENV, root.display()));
    }

    // driver and devices
    let driver = super::driver_present();
    let mut device_arch: Option<&'static str> = None;
    if driver {
        let v = super::driver_version().unwrap_or(0);
        l(format!(
            "driver: libcuda loaded, CUDA {}.{}",
            v / 1000,
            (v % 1000) / 10
        ));
        let info = std::panic::catch_unwind(|| -> Result<Vec<String>, String> {
            let n = cudarc::driver::CudaContext::device_count().map_err(|e| format!("{e}"))?;
            let mut out = vec![format!("devices: {n}")];
            for i in 0..n.max(0) as usize {
                let ctx =
                    cudarc::driver::CudaContext::new(i).map_err(|e| format!("device {i}: {e}"))?;
                let (a, b) = ctx.compute_capability().map_err(|e| format!("{e}"))?;
                let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
                out.push(format!(
                    "gpu {i}: {} (sm_{a}{b}, {:.1} GiB) -> NVRTC arch {}",
                    ctx.name().unwrap_or_default(),
                    mem,
                    super::arch_for(a, b)
                ));
            }
            Ok(out)
        });
        match info {
            Ok(Ok(lines)) => {
                for s in lines {
                    l(s);
                }
            }
            Ok(Err(e)) => l(format!("devices: error: {e}")),
            Err(_) => l("devices: querying the driver panicked".into()),
        }
    } else {
        l("driver: no CUDA driver found (libcuda.so not loadable)".into());
    }

    // libraries
    match super::nvrtc_version() {
        Some((a, b)) => l(format!("nvrtc: {a}.{b}")),
        None => l(
            "nvrtc: NOT FOUND (libnvrtc.so.13; set LD_LIBRARY_PATH or ASA_CUDA_PYPI_DIR)".into(),
        ),
    }
    if super::cublas_present() {
        let mut v = [0i32; 3];
        let props = [
            cudarc::cublas::sys::libraryPropertyType::MAJOR_VERSION,
            cudarc::cublas::sys::libraryPropertyType::MINOR_VERSION,
            cudarc::cublas::sys::libraryPropertyType::PATCH_LEVEL,
        ];
        for (slot, p) in v.iter_mut().zip(props) {
            // SAFETY: the library is present; one out-pointer to a local.
            unsafe {
                cudarc::cublas::sys::cublasGetProperty(p, slot);
            }
        }
        l(format!("cublas: {}.{}.{}", v[0], v[1], v[2]));
    } else {
        l("cublas: NOT FOUND (libcublas.so.13)".into());
    }

    // kernels: NVRTC for compute_80 and compute_90 (and the device's arch), ptxas per file
    let mut archs: Vec<&'static str> = vec!["compute_80", "compute_90"];
    if driver {
        if let Ok(Ok((a, b))) = std::panic::catch_unwind(|| {
            cudarc::driver::CudaContext::new(0).and_then(|c| c.compute_capability())
        }) {
            let arch = super::arch_for(a, b);
            device_arch = Some(arch);
            if !archs.contains(&arch) {
                archs.push(arch);
            }
        }
    }
    let nvrtc = super::nvrtc_present();
    let mut compile_ok = nvrtc;
    let mut nkernels = 0;
    if !nvrtc {
        // One cause, one line: not a FAIL line per kernel (88 of them) for a missing library.
        r.lines.push(nvrtc_missing_line());
        r.compile_ok = false;
    }
    for (stem, src) in KERNELS.iter().filter(|_| nvrtc) {
        let mut status: Vec<String> = Vec::new();
        let mut file_ok = true;
        for arch in &archs {
            match super::compile_ptx(stem, arch) {
                Ok(ptx) => {
                    status.push(format!("nvrtc {arch} ok"));
                    if let Some(px) = ptxas {
                        let sms: &[&str] = match *arch {
                            "compute_80" => &["sm_80"],
                            "compute_90" => &["sm_90", "sm_90a"],
                            _ => &[],
                        };
                        for sm in sms {
                            match ptxas_assemble(px, &ptx, sm, stem) {
                                Ok(()) => status.push(format!("ptxas {sm} ok")),
                                Err(e) => {
                                    file_ok = false;
                                    status.push(format!("ptxas {sm} FAILED: {e}"));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    file_ok = false;
                    status.push(format!(
                        "nvrtc {arch} FAILED: {}",
                        e.to_string()
                            .lines()
                            .take(8)
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ));
                }
            }
        }
        compile_ok &= file_ok;
        for name in kernel_names(src) {
            nkernels += 1;
            r.lines.push(format!(
                "  {} {stem}.cu:{name}",
                if file_ok { "ok  " } else { "FAIL" }
            ));
        }
        r.lines.push(format!("  {stem}.cu: {}", status.join(", ")));
    }
    if nvrtc {
        r.lines.push(format!(
            "kernels: {nkernels} in {} files, {}",
            KERNELS.len(),
            if compile_ok {
                "all compile"
            } else {
                "COMPILE ERRORS"
            }
        ));
    }
    r.compile_ok = compile_ok;

    // the device: load every module, run one kernel
    if driver && device_arch.is_some() && compile_ok {
        let res = std::panic::catch_unwind(|| -> crate::error::Result<String> {
            let be = super::CudaBackend::new(0)?;
            let x = be.upload(&[1.0f32, -0.5, 0.0, 2.0])?;
            let y = be.zeros::<f32>(4)?;
            use super::{AsDv, Ops};
            be.gelu_forward(y.dv(), x.dv(), super::Dv::null())?;
            let got = be.download(y.dv())?;
            let want = [0.841_344_8_f32, -0.154_268_8, 0.0, 1.954_5];
            let err = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            if err > 1e-4 {
                return Err(crate::error::AsaError::Device(format!(
                    "gelu smoke test off by {err}"
                )));
            }
            Ok(format!(
                "device: {} modules loaded, smoke kernel ok ({}; {} SMs, {} KiB of shared memory per block)",
                KERNELS.len(),
                be.device_name,
                be.sm_count,
                be.max_smem / 1024
            ))
        });
        match res {
            Ok(Ok(s)) => {
                r.lines.push(s);
                r.gpu = true;
            }
            Ok(Err(e)) => r.lines.push(format!("device: FAILED: {e}")),
            Err(_) => r.lines.push("device: FAILED: panicked".into()),
        }
    }
    r.ok = r.compile_ok && r.gpu;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_nvrtc_is_one_line_with_the_fix() {
        let line = nvrtc_missing_line();
        assert!(
            line.contains("NOT COMPILED")
                && line.contains("nvidia-cuda-nvrtc==13.0.88")
                && line.contains(super::super::PYPI_DIR_ENV),
            "{line}"
        );
        if super::super::nvrtc_present() {
            return; // this process has NVRTC: the per-kernel lines are the report
        }
        let r = doctor(None);
        let text = r.to_string();
        assert_eq!(
            r.lines.iter().filter(|l| l.contains("FAIL")).count(),
            0,
            "{text}"
        );
        assert_eq!(
            r.lines
                .iter()
                .filter(|l| l.contains("NOT COMPILED"))
                .count(),
            1,
            "{text}"
        );
        assert!(
            !r.compile_ok && !r.ok && text.ends_with("doctor: FAILED"),
            "{text}"
        );
    }
}
