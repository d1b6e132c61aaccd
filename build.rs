//! Build script: embeds the CUDA kernel sources (`cuda/*.cu`, plus the shared `cuda/*.cuh`
//! headers) into `$OUT_DIR/kernels.rs`, and records the build's version information as
//! `ASA_BUILD_*` environment variables for `env!`.

use std::fs;
use std::path::Path;
use std::process::Command;

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=build.rs");

    // ---- kernel sources --------------------------------------------------------------------
    let mut kernels: Vec<(String, String)> = Vec::new();
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Ok(rd) = fs::read_dir("cuda") {
        for e in rd.flatten() {
            let p = e.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            if ext != "cu" && ext != "cuh" {
                continue;
            }
            println!("cargo:rerun-if-changed={}", p.display());
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let abs = fs::canonicalize(&p).expect("kernel source path");
            if ext == "cu" {
                kernels.push((stem, abs.display().to_string()));
            } else {
                headers.push((name, abs.display().to_string()));
            }
        }
    }
    kernels.sort();
    headers.sort();
    let mut src = String::from(
        "/// Every `cuda/*.cu` kernel source: (file stem, source text), sorted by stem.\n\
         pub static KERNELS: &[(&str, &str)] = &[\n",
    );
    for (stem, path) in &kernels {
        src.push_str(&format!("    ({stem:?}, include_str!({path:?})),\n"));
    }
    src.push_str("];\n\n");
    src.push_str(
        "/// Every `cuda/*.cuh` header: (file name, text); `#include \"NAME\"` lines of a kernel\n\
         /// source are replaced by these texts before NVRTC sees it.\n\
         pub static HEADERS: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &headers {
        src.push_str(&format!("    ({name:?}, include_str!({path:?})),\n"));
    }
    src.push_str("];\n");
    fs::write(Path::new(&out_dir).join("kernels.rs"), src).expect("write kernels.rs");

    // ---- version information ---------------------------------------------------------------
    let git = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    if Path::new(".git/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
    }
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=ASA_BUILD_GIT={git}");
    println!("cargo:rustc-env=ASA_BUILD_TARGET={target}");
    println!("cargo:rustc-env=ASA_BUILD_PROFILE={profile}");
}
