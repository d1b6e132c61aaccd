//! Build script: embeds the CUDA kernel sources (`cuda/*.cu`, plus the shared `cuda/*.cuh`
//! headers) into `$OUT_DIR/kernels.rs`, writes one typed launch handle per kernel into
//! `$OUT_DIR/handles.rs` (see `handles` below and src/backend/cuda/kern.rs), and records the
//! build's version information as `ASA_BUILD_*` environment variables for `env!`.

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
    let mut out = handles::groups();
    let mut names = Vec::new();
    for (stem, path) in &kernels {
        let text = fs::read_to_string(path).expect("kernel source");
        out.push_str(&handles::of_source(stem, &text, &mut names));
    }
    out.push_str(&format!(
        "/// The kernels that have a handle here (every kernel of cuda/*.cu), in source order.\n\
         pub const HANDLES: &[&str] = &{names:?};\n"
    ));
    fs::write(Path::new(&out_dir).join("handles.rs"), out).expect("write handles.rs");

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

/// The typed launch handles: for every `extern "C" __global__` kernel of a source, a Rust
/// function of the same name whose parameters are the kernel's, in the kernel's order, typed
/// from its C signature (`float*` -> `Dv<f32>`, `int` -> `i32`, ...), returning the kernel's
/// `Launch` (name and erased arguments). A launcher that passes arguments in the wrong order or
/// of the wrong type does not compile. Runs of parameters that recur across kernels are taken
/// as one typed group (`GROUPS`, and `float X_value, const double* X_at` as a `Learned`).
mod handles {
    type Group = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );

    /// (Rust struct, its doc, the run of C parameters it stands for: name and pointee/scalar
    /// type). A kernel's parameters are matched against these runs by name and type (const and
    /// `__restrict__` aside).
    const GROUPS: &[Group] = &[
        (
            "FusedDims",
            "The trailing size arguments of the tiled slot-scan kernels (cuda/fused.cu).",
            &[
                ("nbh", "int"),
                ("h", "int"),
                ("t", "int"),
                ("nk", "int"),
                ("d", "int"),
                ("chunk", "int"),
                ("tile", "int"),
                ("nsub", "int"),
                ("ntiles", "int"),
                ("nchunks", "int"),
                ("group", "int"),
            ],
        ),
        (
            "Carry",
            "The per-tile carries of the tiled slot scan (cuda/fused.cu): [B*H, tiles, K] sums.",
            &[
                ("cn", "double*"),
                ("cd", "double*"),
                ("cp", "double*"),
                ("cpd", "double*"),
            ],
        ),
        (
            "SlotMask",
            "A read slot mask: keep [K] (null: none), last_pos_only, mask_mode (0 read, 1 \
             content only).",
            &[
                ("keep", "int*"),
                ("last_pos_only", "int"),
                ("mask_mode", "int"),
            ],
        ),
    ];

    struct Param {
        name: String,
        /// without `const` and `__restrict__`
        ty: String,
        /// as written
        c: String,
    }

    /// The C type of a parameter without `const` and `__restrict__`, spaces normalised.
    fn bare(ty: &str) -> String {
        let t = ty.replace("__restrict__", " ").replace("const ", " ");
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        t.replace(" *", "*")
    }

    /// The Rust type of a bare C parameter type.
    fn rust_type(ty: &str, kernel: &str) -> String {
        let scalar = |t: &str| -> Option<&str> {
            Some(match t {
                "int" => "i32",
                "i64" | "long long" => "i64",
                "u64" | "unsigned long long" => "u64",
                "unsigned" | "unsigned int" => "u32",
                "unsigned short" => "u16",
                "unsigned char" => "u8",
                "float" => "f32",
                "double" => "f64",
                _ => return None,
            })
        };
        if let Some(base) = ty.strip_suffix('*') {
            if let Some(r) = scalar(base.trim()) {
                return format!("Dv<{r}>");
            }
        } else if let Some(r) = scalar(ty) {
            if matches!(r, "i32" | "i64" | "u64" | "f32" | "f64") {
                return r.to_string();
            }
        }
        panic!("kernel {kernel}: no Rust type for the C parameter type `{ty}` (build.rs handles)")
    }

    fn rust_name(c: &str) -> String {
        match c {
            "in" | "ref" | "type" | "fn" | "mod" | "move" | "loop" | "match" | "use" | "impl"
            | "self" | "box" | "where" | "as" | "mut" | "dyn" => format!("{c}_"),
            _ => c.to_string(),
        }
    }

    fn camel_to_snake(s: &str) -> String {
        let mut o = String::new();
        for (i, ch) in s.chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                o.push('_');
            }
            o.push(ch.to_ascii_lowercase());
        }
        o
    }

    /// Every kernel of `src`: (name, parameters, the `// twin:` line above it, line number).
    fn kernels(src: &str) -> Vec<(String, Vec<Param>, String, usize)> {
        let mut out = Vec::new();
        let key = "extern \"C\" __global__";
        let mut at = 0;
        while let Some(i) = src[at..].find(key) {
            let start = at + i;
            let open = start + src[start..].find('(').expect("kernel parameter list");
            let mut head: &str = &src[start + key.len()..open];
            // `void __launch_bounds__(N) name(`: skip the bounds' parentheses
            let mut open = open;
            if head.contains("__launch_bounds__") {
                let close = open + src[open..].find(')').expect("launch bounds");
                open = close + 1 + src[close + 1..].find('(').expect("kernel parameter list");
                head = &src[close + 1..open];
            }
            let name = head
                .split_whitespace()
                .last()
                .expect("kernel name")
                .to_string();
            let close = open + src[open..].find(')').expect("end of the parameter list");
            let params = src[open + 1..close]
                .split(',')
                .map(|p| {
                    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                    let cut = p
                        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .expect("parameter type");
                    Param {
                        name: p[cut + 1..].to_string(),
                        ty: bare(&p[..=cut]),
                        c: p.replace(" __restrict__", ""),
                    }
                })
                .collect();
            let line = src[..start].lines().count() + 1;
            let twin = src[..start]
                .lines()
                .rev()
                .take_while(|l| l.trim_start().starts_with("//"))
                .find_map(|l| {
                    l.trim_start()
                        .strip_prefix("// twin:")
                        .map(|t| t.trim().to_string())
                })
                .unwrap_or_default();
            out.push((name, params, twin, line));
            at = close;
        }
        out
    }

    /// One argument or run of arguments of a handle: (Rust parameter, its KArg expressions).
    fn lower(params: &[Param], kernel: &str) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let mut i = 0;
        'next: while i < params.len() {
            for (group, _, run) in GROUPS {
                let hit = run.len() <= params.len() - i
                    && run
                        .iter()
                        .zip(&params[i..])
                        .all(|((n, t), p)| p.name == *n && p.ty == *t);
                if hit {
                    let var = camel_to_snake(group);
                    let args = run
                        .iter()
                        .map(|(n, _)| format!("KArg::from({var}.{n})"))
                        .collect();
                    out.push((format!("{var}: {group}"), args));
                    i += run.len();
                    continue 'next;
                }
            }
            let p = &params[i];
            if let (Some(stem), Some(next)) = (p.name.strip_suffix("_value"), params.get(i + 1)) {
                if p.ty == "float" && next.ty == "double*" && next.name == format!("{stem}_at") {
                    let var = rust_name(stem);
                    out.push((
                        format!("{var}: Learned"),
                        vec![
                            format!("KArg::from({var}.by_value())"),
                            format!("KArg::from({var}.at)"),
                        ],
                    ));
                    i += 2;
                    continue;
                }
            }
            let var = rust_name(&p.name);
            out.push((
                format!("{var}: {}", rust_type(&p.ty, kernel)),
                vec![format!("KArg::from({var})")],
            ));
            i += 1;
        }
        out
    }

    /// The structs of the parameter groups.
    pub fn groups() -> String {
        let mut o = String::new();
        for (group, doc, run) in GROUPS {
            o.push_str(&format!(
                "/// {doc}\n#[derive(Clone, Copy, Debug)]\npub struct {group} {{\n"
            ));
            for (n, t) in run.iter() {
                o.push_str(&format!(
                    "    pub {}: {},\n",
                    rust_name(n),
                    rust_type(t, group)
                ));
            }
            o.push_str("}\n\n");
        }
        o
    }

    /// The handles of the kernels of one source.
    pub fn of_source(stem: &str, src: &str, names: &mut Vec<String>) -> String {
        let mut o = String::new();
        for (name, params, twin, line) in kernels(src) {
            names.push(name.clone());
            let lowered = lower(&params, &name);
            let n: usize = lowered.iter().map(|(_, a)| a.len()).sum();
            let sig = params
                .iter()
                .map(|p| p.c.clone())
                .collect::<Vec<_>>()
                .join(", ");
            o.push_str(&format!(
                "/// `{name}` of cuda/{stem}.cu (line {line}): `{sig}`.\n"
            ));
            if !twin.is_empty() {
                o.push_str(&format!("///\n/// CPU twin: {twin}\n"));
            }
            o.push_str("#[allow(clippy::too_many_arguments)]\n");
            o.push_str(&format!(
                "pub fn {name}({}) -> Launch<{n}> {{\n    Launch::new({name:?}, [{}])\n}}\n\n",
                lowered
                    .iter()
                    .map(|(p, _)| p.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                lowered
                    .iter()
                    .flat_map(|(_, a)| a.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        o
    }
}
