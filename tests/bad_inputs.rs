//! The bad-input catalogue (issue 10): a few hundred bad inputs and accidents a new user might
//! try, run against the `asa` binary, each classified as
//!
//! - `clear error`: exit 1 with one `error: ...` line last on stderr (or a clap usage error,
//!   exit 2), naming what the case expects it to name, no panic text;
//! - `recovered`: an accident the program must get through (stale lock, leftover temp files):
//!   exit 0 and the case's own check passes;
//! - `accepted`: exit 0 for an input that must be refused (a bad value silently trained on);
//! - `unclear`: refused, but not as one clear line naming the problem;
//! - `abort`: a signal, exit 101/134, or panic / allocation-failure text;
//! - `data lost`: a file of a pre-existing run (or data, or input) changed;
//! - `hang`: still running after `CASE_TIMEOUT`.
//!
//! The summary (per class and per command) is the reliability figure the project reports; the
//! test fails on any case outside the first two classes and prints each one with its stderr.
//! Every case is cheap: tiny models (embed 32, one layer), tiny prepared data, a few steps.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A case still running after this is a hang (tiny cases finish in well under a second).
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Address-space limit of each case: a bad size that slips past the checks then fails (and is
/// classified) instead of growing until the machine runs out of memory.
const CASE_MEMORY_LIMIT: u64 = 4 << 30;
/// Cases run at once.
const WORKERS: usize = 3;

#[path = "support/runs.rs"]
mod runs;
use runs::{asa, copy_dir};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// cases

#[derive(Clone, Debug)]
enum Expect {
    /// must be refused with a clear error whose text holds every needle (case-insensitive;
    /// `a|b` means either; a leading `!` means must not appear)
    Refuse(Vec<String>),
    /// a report, not an error: exit 1 with these needles on stdout (parity's FAIL lines)
    Report(Vec<String>),
    /// an accident the program must get through: exit 0 (and the case's check)
    Recover,
}

type Check = Box<dyn Fn() -> Result<(), String> + Send>;

/// A process that runs alongside the case (a second process on the same run folder).
struct Alongside {
    args: Vec<String>,
    /// the case starts once this holds (or after 30 s)
    ready: Box<dyn Fn() -> bool + Send>,
}

struct Case {
    cmd: &'static str,
    what: String,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    expect: Expect,
    /// files or folders that must be byte-identical afterwards
    guard: Vec<PathBuf>,
    check: Option<Check>,
    alongside: Option<Alongside>,
    /// run first (e.g. a training process killed mid-run)
    before: Option<Box<dyn FnOnce() + Send>>,
    timeout: Duration,
}

impl Case {
    fn new(cmd: &'static str, what: impl Into<String>, args: Vec<String>) -> Case {
        Case {
            cmd,
            what: what.into(),
            args,
            cwd: None,
            expect: Expect::Refuse(vec![]),
            guard: vec![],
            check: None,
            alongside: None,
            before: None,
            timeout: CASE_TIMEOUT,
        }
    }
    /// Needles the error must hold; one string may hold several, joined by `&&`.
    fn needs(mut self, needles: &[&str]) -> Case {
        self.expect = Expect::Refuse(
            needles
                .iter()
                .flat_map(|x| x.split("&&"))
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        );
        self
    }
    fn report(mut self, needles: &[&str]) -> Case {
        self.expect = Expect::Report(needles.iter().map(|x| x.to_string()).collect());
        self
    }
    fn recover(mut self) -> Case {
        self.expect = Expect::Recover;
        self
    }
    fn guard(mut self, p: &Path) -> Case {
        self.guard.push(p.to_path_buf());
        self
    }
    fn cwd(mut self, p: &Path) -> Case {
        self.cwd = Some(p.to_path_buf());
        self
    }
    fn check(mut self, f: impl Fn() -> Result<(), String> + Send + 'static) -> Case {
        self.check = Some(Box::new(f));
        self
    }
    fn before(mut self, f: impl FnOnce() + Send + 'static) -> Case {
        self.before = Some(Box::new(f));
        self
    }
    fn alongside(mut self, args: Vec<String>, ready: impl Fn() -> bool + Send + 'static) -> Case {
        self.alongside = Some(Alongside {
            args,
            ready: Box::new(ready),
        });
        // a second process that is let in would train as long as the first
        self.timeout = Duration::from_secs(20);
        self
    }
}

macro_rules! args {
    ($($x:expr),* $(,)?) => { vec![$(($x).to_string()),*] };
}

// ---------------------------------------------------------------------------------------------
// running and classifying

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    ClearError,
    Recovered,
    Accepted,
    Unclear,
    Abort,
    DataLost,
    Hang,
}

impl Class {
    const ALL: [Class; 7] = [
        Class::ClearError,
        Class::Recovered,
        Class::Accepted,
        Class::Unclear,
        Class::Abort,
        Class::DataLost,
        Class::Hang,
    ];
    fn name(self) -> &'static str {
        match self {
            Class::ClearError => "clear error",
            Class::Recovered => "recovered",
            Class::Accepted => "accepted",
            Class::Unclear => "unclear",
            Class::Abort => "abort",
            Class::DataLost => "data lost",
            Class::Hang => "hang",
        }
    }
    fn bad(self) -> bool {
        !matches!(self, Class::ClearError | Class::Recovered)
    }
}

struct Outcome {
    cmd: &'static str,
    what: String,
    args: Vec<String>,
    class: Class,
    why: String,
    code: Option<i32>,
    stderr: String,
    stdout: String,
    seconds: f64,
}

/// Every file under `p` (or `p` itself) with its bytes.
fn snapshot(p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    if p.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            snapshot(&e.path(), out);
        }
    } else if let Ok(b) = std::fs::read(p) {
        out.insert(p.to_path_buf(), b);
    }
}

/// Whether to put `CASE_MEMORY_LIMIT` on the cases: not where a CUDA driver is loaded (it
/// reserves a large address space of its own at initialisation).
static LIMIT_MEMORY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn limited(mut c: Command) -> Command {
    use std::os::unix::process::CommandExt;
    if !*LIMIT_MEMORY.get_or_init(|| !asa::backend::cuda::driver_present()) {
        return c;
    }
    // SAFETY: setrlimit is async-signal-safe; it only lowers this child's own limit.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: CASE_MEMORY_LIMIT,
                rlim_max: CASE_MEMORY_LIMIT,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    c
}

fn spawn(args: &[String], cwd: Option<&Path>, quiet: bool) -> Child {
    let mut c = asa();
    c.args(args).stdin(Stdio::null());
    if quiet {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    limited(c).spawn().expect("spawn asa")
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

fn matches_needle(text: &str, needle: &str) -> bool {
    let text = text.to_lowercase();
    if let Some(n) = needle.strip_prefix('!') {
        return !text.contains(&n.to_lowercase());
    }
    needle.split('|').any(|n| text.contains(&n.to_lowercase()))
}

fn abort_text(err: &str) -> Option<&'static str> {
    [
        "panicked",
        "internal error",
        "memory allocation of",
        "stack backtrace",
        "RUST_BACKTRACE",
        "core dumped",
        "stack overflow",
    ]
    .into_iter()
    .find(|m| err.contains(m))
}

fn run_case(mut c: Case) -> Outcome {
    if let Some(f) = c.before.take() {
        f();
    }
    let mut before = BTreeMap::new();
    for g in &c.guard {
        snapshot(g, &mut before);
    }
    let mut side = c.alongside.as_ref().map(|a| {
        let child = spawn(&a.args, c.cwd.as_deref(), true);
        let t0 = Instant::now();
        while !(a.ready)() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    });

    let started = Instant::now();
    let mut child = spawn(&c.args, c.cwd.as_deref(), false);
    let out_t = drain(child.stdout.take().unwrap());
    let err_t = drain(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let mut hung = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > c.timeout {
            let _ = child.kill();
            let _ = child.wait();
            hung = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    if let Some(mut sc) = side.take() {
        let _ = sc.kill();
        let _ = sc.wait();
    }
    let code = status.and_then(|s| s.code());

    let mut after = BTreeMap::new();
    for g in &c.guard {
        snapshot(g, &mut after);
    }
    let lost: Vec<String> = before
        .iter()
        .filter(|(p, b)| after.get(*p) != Some(*b))
        .map(|(p, _)| {
            if after.contains_key(p) {
                format!("{} changed", p.display())
            } else {
                format!("{} removed", p.display())
            }
        })
        .collect();

    let (class, why) = classify(&c, hung, status, code, &stdout, &stderr, &lost);
    Outcome {
        cmd: c.cmd,
        what: c.what,
        args: c.args,
        class,
        why,
        code,
        stderr,
        stdout,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn classify(
    c: &Case,
    hung: bool,
    status: Option<std::process::ExitStatus>,
    code: Option<i32>,
    stdout: &str,
    stderr: &str,
    lost: &[String],
) -> (Class, String) {
    if hung {
        return (Class::Hang, format!("still running after {:?}", c.timeout));
    }
    if code.is_none() {
        use std::os::unix::process::ExitStatusExt;
        let sig = status.and_then(|s| s.signal());
        return (Class::Abort, format!("killed by signal {sig:?}"));
    }
    if matches!(code, Some(101) | Some(134)) {
        return (Class::Abort, format!("exit {}", code.unwrap()));
    }
    if let Some(m) = abort_text(stderr) {
        return (Class::Abort, format!("stderr holds '{m}'"));
    }
    if !lost.is_empty() {
        return (Class::DataLost, lost.join("; "));
    }
    let code = code.unwrap();
    match &c.expect {
        Expect::Recover => {
            if code != 0 {
                return (Class::Unclear, format!("exit {code}, expected to recover"));
            }
            if let Some(f) = &c.check {
                if let Err(e) = f() {
                    return (Class::Unclear, e);
                }
            }
            (Class::Recovered, String::new())
        }
        Expect::Report(needles) => {
            if code == 0 {
                return (Class::Accepted, "exit 0".into());
            }
            let missing: Vec<&String> = needles
                .iter()
                .filter(|n| !matches_needle(stdout, n))
                .collect();
            if code != 1 || !stdout.contains("FAIL") || !missing.is_empty() {
                return (
                    Class::Unclear,
                    format!("exit {code}, report lacks FAIL or {missing:?}"),
                );
            }
            (Class::ClearError, String::new())
        }
        Expect::Refuse(needles) => {
            if code == 0 {
                return (Class::Accepted, "exit 0".into());
            }
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let text = match code {
                // clap: "error: ..." and usage lines (or the help, for no subcommand); the
                // offending argument is quoted, so the needles are not asked for
                2 => {
                    if !(lines.first().is_some_and(|l| l.starts_with("error: "))
                        || stderr.contains("Usage:"))
                    {
                        return (Class::Unclear, "exit 2 without a usage error".into());
                    }
                    String::new()
                }
                1 => {
                    let last = lines.last().copied().unwrap_or("");
                    let errors = lines.iter().filter(|l| l.starts_with("error")).count();
                    if !last.starts_with("error: ") || errors != 1 {
                        return (
                            Class::Unclear,
                            format!("exit 1 but not one `error: ` line last on stderr ({errors} error lines)"),
                        );
                    }
                    last.to_string()
                }
                other => return (Class::Unclear, format!("exit {other}")),
            };
            let missing: Vec<&String> = needles
                .iter()
                .filter(|n| code == 1 && !matches_needle(&text, n))
                .collect();
            if !missing.is_empty() {
                return (Class::Unclear, format!("message lacks {missing:?}"));
            }
            if let Some(f) = &c.check {
                if let Err(e) = f() {
                    return (Class::Unclear, e);
                }
            }
            (Class::ClearError, String::new())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fixtures: prepared data, template runs, configs

struct Ctx {
    root: PathBuf,
    /// prepared byte-level shards of the sonnets
    data: PathBuf,
    /// a train-mini run (byte tokenizer) stopped at step 2 of 4, copied for each case that
    /// changes it
    mini: PathBuf,
    /// the same run finished (step 4 of 4)
    mini_fin: PathBuf,
    /// a finished 2-step train-mini run with the GPT-2 tokenizer (read only: probe cases)
    gpt2: PathBuf,
    /// an `asa train` run named `t` stopped at step 2 of 4, and the same run finished
    trun: PathBuf,
    trun_fin: PathBuf,
    n: AtomicUsize,
}

fn must(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tiny train-mini flags (byte tokenizer unless `extra` says otherwise).
fn mini_args(outdir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args![
        "train-mini",
        "--device",
        "cpu",
        "--outdir",
        s(outdir),
        "--name",
        name,
        "--eval-interval",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--embed-dim",
        "32",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--num-slots",
        "4"
    ];
    if !extra.contains(&"--tokenizer") {
        a.extend(args!["--tokenizer", "byte"]);
    }
    if !extra.contains(&"--steps") && !extra.contains(&"--resume") {
        a.extend(args!["--steps", "4"]);
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// The tiny `asa train` config as ordered (key, TOML/JSON literal) pairs.
fn base_cfg(data: &Path, outdir: &Path) -> Vec<(String, String)> {
    let q = |p: &Path| format!("\"{}\"", p.display());
    [
        ("data", q(data)),
        ("outdir", q(outdir)),
        ("name", "\"t\"".into()),
        ("vocab_size", "256".into()),
        ("max_seq_len", "16".into()),
        ("embed_dim", "32".into()),
        ("num_layers", "1".into()),
        ("num_heads", "2".into()),
        ("num_slots", "4".into()),
        ("slotspace_dim", "8".into()),
        ("write_chunk_size", "8".into()),
        ("slotspace_chunk_size", "8".into()),
        ("batch_size", "2".into()),
        ("learning_rate", "3e-3".into()),
        ("warmup_steps", "1".into()),
        ("total_steps", "4".into()),
        ("eval_interval", "2".into()),
        ("val_windows", "4".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `pairs` with each (key, Some(value)) replaced or added and each (key, None) removed.
fn with(mut pairs: Vec<(String, String)>, edits: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
    for (k, v) in edits {
        let pos = pairs.iter().position(|(pk, _)| pk == k);
        match (pos, v) {
            (Some(i), Some(v)) => pairs[i].1 = v.to_string(),
            (Some(i), None) => {
                pairs.remove(i);
            }
            (None, Some(v)) => pairs.push((k.to_string(), v.to_string())),
            (None, None) => {}
        }
    }
    pairs
}

fn toml_text(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
}

fn json_text(pairs: &[(String, String)]) -> String {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("  \"{k}\": {v}"))
        .collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}

impl Ctx {
    fn setup() -> Ctx {
        let root = tempfile::Builder::new()
            .prefix("asa-bad-inputs-")
            .tempdir()
            .unwrap()
            .keep();
        let data = root.join("data");
        must(
            asa()
                .args([
                    "prepare",
                    "--tokenizer",
                    "byte",
                    "--val-frac",
                    "0.05",
                    "--outdir",
                ])
                .arg(&data)
                .arg(repo().join("assets/corpus/sonnets.txt"))
                .output()
                .unwrap(),
            "prepare",
        );
        let tpl = root.join("tpl");
        // runs stopped at step 2 of 4 (resumable as they are) and finished ones (4 of 4)
        must(
            asa()
                .args(mini_args(&tpl, "mini", &["--stop-at", "2"]))
                .output()
                .unwrap(),
            "template train-mini run",
        );
        must(
            asa()
                .args(mini_args(&tpl, "mini_fin", &[]))
                .output()
                .unwrap(),
            "template finished train-mini run",
        );
        must(
            asa()
                .args(mini_args(
                    &tpl,
                    "gpt2",
                    &["--tokenizer", "gpt2", "--steps", "2"],
                ))
                .output()
                .unwrap(),
            "template gpt2 run",
        );
        for (name, stop) in [("t", Some("2")), ("t_fin", None)] {
            let pairs = with(
                base_cfg(&data, &tpl),
                &[("name", Some(&format!("\"{name}\"")))],
            );
            let cfg = tpl.join(format!("{name}.toml"));
            std::fs::write(&cfg, toml_text(&pairs)).unwrap();
            let mut c = asa();
            c.args(["train", "--device", "cpu", "--config"]).arg(&cfg);
            if let Some(s) = stop {
                c.args(["--stop-at", s]);
            }
            must(c.output().unwrap(), "template train run");
        }
        Ctx {
            mini: tpl.join("mini"),
            mini_fin: tpl.join("mini_fin"),
            gpt2: tpl.join("gpt2"),
            trun: tpl.join("t"),
            trun_fin: tpl.join("t_fin"),
            root,
            data,
            n: AtomicUsize::new(0),
        }
    }

    /// A new empty folder for one case.
    fn dir(&self, tag: &str) -> PathBuf {
        let i = self.n.fetch_add(1, Ordering::Relaxed);
        let d = self.root.join(format!("c{i:03}-{tag}"));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A fresh outdir holding a copy of the template train-mini run as `mini`.
    fn mini_copy(&self) -> (PathBuf, PathBuf) {
        self.mini_copy_of(&self.mini)
    }

    fn mini_copy_of(&self, tpl: &Path) -> (PathBuf, PathBuf) {
        let d = self.dir("mini");
        copy_dir(tpl, &d.join("mini"));
        let run = d.join("mini");
        (d, run)
    }

    /// A fresh folder with a copy of the data.
    fn data_copy(&self) -> PathBuf {
        let d = self.dir("data").join("data");
        copy_dir(&self.data, &d);
        d
    }

    /// A config file (TOML, or JSON when `json`) in a fresh folder whose runs go there.
    fn cfg(&self, edits: &[(&str, Option<&str>)], json: bool) -> (PathBuf, PathBuf) {
        let d = self.dir("cfg");
        let pairs = with(base_cfg(&self.data, &d.join("runs")), edits);
        let p = if json {
            let p = d.join("run.json");
            std::fs::write(&p, json_text(&pairs)).unwrap();
            p
        } else {
            let p = d.join("run.toml");
            std::fs::write(&p, toml_text(&pairs)).unwrap();
            p
        };
        (p, d)
    }

    /// A config whose run folder already holds a copy of the template `train` run.
    fn train_copy(&self, edits: &[(&str, Option<&str>)]) -> (PathBuf, PathBuf) {
        self.train_copy_of(&self.trun, edits)
    }

    fn train_copy_of(&self, tpl: &Path, edits: &[(&str, Option<&str>)]) -> (PathBuf, PathBuf) {
        let (p, d) = self.cfg(edits, false);
        let run = d.join("runs/t");
        copy_dir(tpl, &run);
        (p, run)
    }
}

fn train_args(cfg: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args!["train", "--device", "cpu", "--config", s(cfg)];
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

// ---------------------------------------------------------------------------------------------
// file damage

fn flip_byte(p: &Path, at: usize) {
    let mut b = std::fs::read(p).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x5a;
    std::fs::write(p, b).unwrap();
}

fn truncate(p: &Path, len: usize) {
    let b = std::fs::read(p).unwrap();
    std::fs::write(p, &b[..len.min(b.len())]).unwrap();
}

/// Rewrites a safetensors file through the library, changing tensors and metadata.
fn rewrite_st(
    p: &Path,
    edit: impl Fn(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>, &mut HashMap<String, String>),
) {
    let (t, mut meta) = asa::checkpoint::read_safetensors_with_metadata(p).unwrap();
    let mut map: BTreeMap<String, (Vec<usize>, Vec<f32>)> = t
        .iter()
        .map(|(k, v)| (k.clone(), (v.shape.clone(), v.to_f32().unwrap())))
        .collect();
    edit(&mut map, &mut meta);
    let tensors: Vec<(String, Vec<usize>, &[f32])> = map
        .iter()
        .map(|(k, (sh, d))| (k.clone(), sh.clone(), d.as_slice()))
        .collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    asa::checkpoint::write_safetensors(p, &tensors, meta).unwrap();
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Replaces the bytes of a stored zip member in place (same length), fixing its CRC-32 in the
/// local and central headers when `fix_crc` (so only the content is wrong, not the archive).
fn patch_zip_member(p: &Path, member: &str, f: impl Fn(&mut [u8]), fix_crc: bool) {
    let (start, len, local, central) = {
        let mut z = zip::ZipArchive::new(std::fs::File::open(p).unwrap()).unwrap();
        let m = z.by_name(member).unwrap();
        (
            m.data_start() as usize,
            m.compressed_size() as usize,
            m.header_start() as usize,
            m.central_header_start() as usize,
        )
    };
    let mut b = std::fs::read(p).unwrap();
    f(&mut b[start..start + len]);
    if fix_crc {
        let crc = crc32(&b[start..start + len]).to_le_bytes();
        b[local + 14..local + 18].copy_from_slice(&crc);
        b[central + 16..central + 20].copy_from_slice(&crc);
    }
    std::fs::write(p, b).unwrap();
}

fn nan_bytes(b: &mut [u8]) {
    for c in b.chunks_exact_mut(4) {
        c.copy_from_slice(&f32::NAN.to_le_bytes());
    }
}

fn shard_header_set(p: &Path, at: usize, v: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[at..at + v.len()].copy_from_slice(v);
    std::fs::write(p, b).unwrap();
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// the catalogue

fn catalogue(ctx: &Ctx, cuda: bool) -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let fx = repo().join("tests/fixtures");
    let a_file = ctx.dir("file").join("not-a-folder");
    std::fs::write(&a_file, "x").unwrap();

    // --- global ------------------------------------------------------------------------------
    v.push(Case::new("global", "no subcommand", args![]));
    v.push(Case::new(
        "global",
        "unknown subcommand",
        args!["frobnicate"],
    ));
    v.push(Case::new("global", "unknown global flag", args!["--bogus"]));

    // --- train-mini: each numeric flag ------------------------------------------------------
    let tm = |flag: &str, val: &str, needle: &str| -> Case {
        let d = ctx.dir("tm");
        let mut a = mini_args(&d, "x", &[]);
        // the later occurrence of a flag would be a clap error; replace the value in place
        if let Some(i) = a.iter().position(|x| x == flag) {
            a[i + 1] = val.to_string();
        } else {
            a.extend(args![flag, val]);
        }
        Case::new("train-mini", format!("{flag} {val}"), a).needs(&[needle])
    };
    for (flag, vals, needle) in [
        (
            "--steps",
            &["0", "-1", "abc", "1e3", "99999999999999999999999"][..],
            "steps",
        ),
        ("--stop-at", &["0", "-2", "x"][..], "stop"),
        (
            "--batch-size",
            &["0", "-1", "1.5", "1000000000000"][..],
            "batch",
        ),
        ("--seq-len", &["0", "-16", "100000000000"][..], "seq"),
        (
            "--lr",
            &["0", "-1", "nan", "inf", "-inf", "1e309", "abc"][..],
            "lr",
        ),
        ("--eval-interval", &["0", "-5"][..], "eval"),
        ("--embed-dim", &["0", "31", "1048576", "-32"][..], "embed"),
        ("--num-layers", &["0", "100000", "-1"][..], "layers"),
        ("--num-heads", &["0", "3", "64"][..], "heads"),
        ("--num-slots", &["0", "1000000000000"][..], "slots"),
        ("--fact-frac", &["2", "-0.1", "nan", "inf"][..], "fact"),
        ("--seed", &["-1", "abc", "1.5"][..], "seed"),
        ("--precision", &["fp8", ""][..], "precision"),
        ("--device", &["tpu"][..], "device"),
    ] {
        for val in vals {
            // huge sizes are refused by the memory estimate, which names memory, not the flag
            let huge = format!("memory|{needle}");
            let needle = match *val {
                "1048576" | "100000" | "1000000000000" | "100000000000" => huge.as_str(),
                _ => needle,
            };
            v.push(tm(flag, val, needle));
        }
    }
    if !cuda {
        v.push(tm("--device", "cuda", "cuda"));
    }
    {
        let d = ctx.dir("tm");
        v.push(
            Case::new(
                "train-mini",
                "--stop-at beyond --steps",
                mini_args(&d, "x", &["--stop-at", "10"]),
            )
            .needs(&["stop"]),
        );
    }
    // --- train-mini: tokenizer, data, names, folders ----------------------------------------
    {
        let d = ctx.dir("tm");
        let bin = d.join("binary.txt");
        std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x80, 0xc3, 0x28]).unwrap();
        let empty = d.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        let short = d.join("short.txt");
        std::fs::write(&short, "tiny").unwrap();
        let notjson = d.join("tok.json");
        std::fs::write(&notjson, "not json").unwrap();
        let out = d.join("runs");
        for (what, extra, needle) in [
            (
                "unknown tokenizer",
                vec!["--tokenizer", "nonsense"],
                "nonsense",
            ),
            (
                "tokenizer file missing",
                vec!["--tokenizer", "/nonexistent/tokenizer.json"],
                "tokenizer",
            ),
            (
                "tokenizer file not JSON",
                vec!["--tokenizer", notjson.to_str().unwrap()],
                "tok.json",
            ),
            (
                "--data missing file",
                vec!["--data", "/nonexistent/corpus.txt"],
                "corpus.txt",
            ),
            ("--data a folder", vec!["--data", d.to_str().unwrap()], ""),
            (
                "--data not UTF-8",
                vec!["--data", bin.to_str().unwrap()],
                "binary.txt",
            ),
            (
                "--data empty file",
                vec!["--data", empty.to_str().unwrap()],
                "",
            ),
            (
                "--data shorter than a window",
                vec!["--data", short.to_str().unwrap()],
                "",
            ),
            ("--data with no file", vec!["--data"], ""),
        ] {
            // each case its own run folder: parallel cases on one folder meet its lock
            let mut a = mini_args(&out.join(v.len().to_string()), "x", &[]);
            if what.contains("tokenizer") {
                let i = a.iter().position(|x| x == "--tokenizer").unwrap();
                a[i + 1] = extra[1].to_string();
            } else {
                a.extend(extra.iter().map(|x| x.to_string()));
            }
            v.push(Case::new("train-mini", what, a).needs(&[needle]));
        }
        for name in ["../escape", "a/b", "", ".", "..", "/abs/path"] {
            let d = ctx.dir("name");
            let out = d.join("runs");
            let outside = d.join("escape");
            v.push(
                Case::new(
                    "train-mini",
                    format!("--name '{name}'"),
                    mini_args(&out, name, &[]),
                )
                .needs(&["name"])
                .check(move || match outside.exists() {
                    true => Err(format!("wrote {}", outside.display())),
                    false => Ok(()),
                }),
            );
        }
        v.push(
            Case::new(
                "train-mini",
                "--outdir is a file",
                mini_args(&a_file, "x", &[]),
            )
            .needs(&["not-a-folder", "!file exists"])
            .guard(&a_file),
        );
    }
    // --- train-mini: accidents on an existing run --------------------------------------------
    {
        let (out, run) = ctx.mini_copy();
        v.push(
            Case::new(
                "train-mini",
                "new run over an existing run (no --resume)",
                mini_args(&out, "mini", &[]),
            )
            .needs(&["--resume", "--force"])
            .guard(&run),
        );
        for (what, extra, needle) in [
            (
                "--resume with another --embed-dim",
                vec!["--embed-dim", "64"],
                "embed",
            ),
            ("--resume with another --lr", vec!["--lr", "0.1"], "lr"),
            (
                "--resume with another --batch-size",
                vec!["--batch-size", "4"],
                "batch",
            ),
            (
                "--resume with another --seq-len",
                vec!["--seq-len", "8"],
                "seq",
            ),
            (
                "--resume with another --num-slots",
                vec!["--num-slots", "8"],
                "slots",
            ),
            ("--resume with another --seed", vec!["--seed", "7"], "seed"),
            (
                "--resume with another --tokenizer",
                vec!["--tokenizer", "gpt2"],
                "tokenizer",
            ),
            (
                "--resume with another --fact-frac",
                vec!["--fact-frac", "0.1"],
                "fact",
            ),
            (
                "--resume of a finished run without --steps",
                vec![],
                "--steps",
            ),
        ] {
            let (out, run) = if extra.is_empty() {
                ctx.mini_copy_of(&ctx.mini_fin)
            } else {
                ctx.mini_copy()
            };
            // the template's own flags, changed where the case says
            let mut a = mini_args(&out, "mini", &["--resume"]);
            if let Some(i) = extra.first().and_then(|f| a.iter().position(|x| x == f)) {
                a[i + 1] = extra[1].to_string();
            } else {
                a.extend(extra.iter().map(|x| x.to_string()));
            }
            v.push(
                Case::new("train-mini", what, a)
                    .needs(&[needle])
                    .guard(&run),
            );
        }
        let d = ctx.dir("tm");
        v.push(
            Case::new(
                "train-mini",
                "--resume with no run",
                mini_args(&d, "none", &["--resume"]),
            )
            .needs(&["resume"]),
        );
        // damaged checkpoints, then --resume
        type Damage = Box<dyn Fn(&Path)>;
        let damages: Vec<(&str, Damage, &str)> = vec![
            (
                "truncated to half",
                Box::new(|p: &Path| truncate(p, std::fs::metadata(p).unwrap().len() as usize / 2)),
                "checkpoint",
            ),
            (
                "truncated to 0 bytes",
                Box::new(|p: &Path| truncate(p, 0)),
                "checkpoint",
            ),
            (
                "truncated to 7 bytes",
                Box::new(|p: &Path| truncate(p, 7)),
                "checkpoint",
            ),
            (
                "header length u64::MAX",
                Box::new(|p: &Path| shard_header_set(p, 0, &u64::MAX.to_le_bytes())),
                "checkpoint",
            ),
            (
                "header JSON bit flip",
                Box::new(|p: &Path| flip_byte(p, 12)),
                "checkpoint",
            ),
            (
                "NaN in a weight",
                Box::new(|p: &Path| {
                    rewrite_st(p, |m, _| {
                        m.get_mut("token_emb.weight").unwrap().1[3] = f32::NAN;
                    })
                }),
                "token_emb.weight",
            ),
            (
                "inf in a weight",
                Box::new(|p: &Path| {
                    rewrite_st(p, |m, _| {
                        let k = m
                            .keys()
                            .find(|k| k.ends_with("slot_keys") && !k.starts_with("exp_avg"))
                            .unwrap()
                            .clone();
                        m.get_mut(&k).unwrap().1[0] = f32::INFINITY;
                    })
                }),
                "slot_keys",
            ),
            (
                "NaN in an Adam moment",
                Box::new(|p: &Path| {
                    rewrite_st(p, |m, _| {
                        m.get_mut("exp_avg_sq.token_emb.weight").unwrap().1[0] = f32::NAN;
                    })
                }),
                "exp_avg_sq",
            ),
            (
                "all-NaN checkpoint",
                Box::new(|p: &Path| {
                    rewrite_st(p, |m, _| {
                        for (_, d) in m.values_mut() {
                            d.iter_mut().for_each(|x| *x = f32::NAN);
                        }
                    })
                }),
                "nan|finite",
            ),
            (
                "a tensor missing",
                Box::new(|p: &Path| {
                    rewrite_st(p, |m, _| {
                        m.remove("token_emb.weight");
                    })
                }),
                "token_emb.weight",
            ),
            (
                "a tensor of the wrong shape",
                Box::new(|p: &Path| {
                    rewrite_st(p, |m, _| {
                        let t = m.get_mut("token_emb.weight").unwrap();
                        t.1.truncate(32);
                        t.0 = vec![1, 32];
                    })
                }),
                "token_emb.weight",
            ),
            (
                "state metadata missing",
                Box::new(|p: &Path| {
                    rewrite_st(p, |_, meta| {
                        meta.remove("state");
                    })
                }),
                "state",
            ),
            (
                "config metadata with embed_dim 0",
                Box::new(|p: &Path| {
                    rewrite_st(p, |_, meta| {
                        let c = meta["config"].replace("\"embed_dim\":32", "\"embed_dim\":0");
                        meta.insert("config".into(), c);
                    })
                }),
                "embed_dim",
            ),
            (
                "state metadata with a bad generator position",
                Box::new(|p: &Path| {
                    rewrite_st(p, |_, meta| {
                        let c =
                            meta["state"].replace("\"data_rng_pos\":\"", "\"data_rng_pos\":\"x");
                        meta.insert("state".into(), c);
                    })
                }),
                "position",
            ),
        ];
        for (what, damage, needle) in damages {
            let (out, run) = ctx.mini_copy();
            damage(&run.join("checkpoint.safetensors"));
            v.push(
                Case::new(
                    "train-mini",
                    format!("--resume from a checkpoint: {what}"),
                    mini_args(&out, "mini", &["--resume"]),
                )
                .needs(&[needle])
                .guard(&run.join("checkpoint.safetensors")),
            );
        }
        // two processes on one run folder: the second one must stop
        let (out, run) = ctx.mini_copy();
        let metrics = run.join("metrics.jsonl");
        let base = lines(&metrics);
        v.push(
            Case::new(
                "train-mini",
                "second process on a run folder in use",
                mini_args(&out, "mini", &["--resume", "--steps", "100000"]),
            )
            .needs(&["lock|in use|pid"])
            .alongside(
                mini_args(&out, "mini", &["--resume", "--steps", "100000"]),
                move || lines(&metrics) > base,
            ),
        );
        // a stale lock (a dead pid) is taken over; temp files of a killed save are removed
        for (what, text) in [
            (
                "stale lock of a dead pid",
                "pid=999999999\nhost=elsewhere\nstarted_unix=1\n",
            ),
            ("lock file with garbage text", "\u{0}\u{1}garbage"),
            ("empty lock file", ""),
        ] {
            let (out, run) = ctx.mini_copy();
            std::fs::write(run.join(".lock"), text).unwrap();
            v.push(
                Case::new(
                    "train-mini",
                    what,
                    mini_args(&out, "mini", &["--resume", "--steps", "5"]),
                )
                .recover(),
            );
        }
        let (out, run) = ctx.mini_copy();
        let tmp = run.join("checkpoint.safetensors.tmp-999999999");
        std::fs::write(&tmp, vec![0u8; 4096]).unwrap();
        v.push(
            Case::new(
                "train-mini",
                "temp file of a killed save left in the run",
                mini_args(&out, "mini", &["--resume", "--steps", "5"]),
            )
            .recover()
            .check(move || match tmp.exists() {
                true => Err(format!("{} left behind", tmp.display())),
                false => Ok(()),
            }),
        );
        let (p, run) = ctx.train_copy(&[]);
        let tmp_dir = run.join("best.tmp-999999999");
        std::fs::create_dir_all(&tmp_dir).unwrap();
        std::fs::write(tmp_dir.join("checkpoint.safetensors"), vec![0u8; 4096]).unwrap();
        let tmp_file = run.join("model.safetensors.tmp-999999999");
        std::fs::write(&tmp_file, vec![0u8; 4096]).unwrap();
        v.push(
            Case::new(
                "train",
                "temp files of a killed save (file and best.tmp folder) left in the run",
                train_args(&p, &["--resume"]),
            )
            .recover()
            .check(move || match (tmp_dir.exists(), tmp_file.exists()) {
                (false, false) => Ok(()),
                _ => Err("temp files of a killed save left behind".into()),
            }),
        );
        // a training process killed (SIGKILL, SIGINT) once it has saved, then resumed
        for (cmd, sig) in [("train-mini", libc::SIGKILL), ("train", libc::SIGINT)] {
            let (first, resume, ck) = if cmd == "train-mini" {
                let (out, run) = ctx.mini_copy();
                let _ = std::fs::remove_dir_all(&run);
                (
                    mini_args(&out, "mini", &["--steps", "100000"]),
                    mini_args(&out, "mini", &["--resume", "--stop-at", "40"]),
                    run,
                )
            } else {
                let (p, run) = ctx.train_copy(&[("total_steps", Some("100000"))]);
                let _ = std::fs::remove_dir_all(&run);
                (
                    train_args(&p, &[]),
                    train_args(&p, &["--resume", "--stop-at", "40"]),
                    run,
                )
            };
            let run = ck.clone();
            v.push(
                Case::new(
                    cmd,
                    format!("resume after the run was killed (signal {sig})"),
                    resume,
                )
                .recover()
                .before(move || {
                    let mut child = spawn(&first, None, true);
                    let t0 = Instant::now();
                    while !ck.join("checkpoint.safetensors").is_file()
                        && t0.elapsed() < Duration::from_secs(30)
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    // SAFETY: a signal to our own child, not yet waited for
                    unsafe { libc::kill(child.id() as i32, sig) };
                    let _ = child.wait();
                })
                .check(move || {
                    let st = std::fs::read_to_string(run.join("train_state.json"))
                        .map_err(|e| e.to_string())?;
                    match st.contains("\"step\": 40") {
                        true => Ok(()),
                        false => Err(format!("not at step 40 after the resume: {st}")),
                    }
                }),
            );
        }
    }

    // --- train: each config field out of range -----------------------------------------------
    let tc = |what: String, edits: &[(&str, Option<&str>)], json: bool, needles: &[&str]| -> Case {
        let (p, _) = ctx.cfg(edits, json);
        Case::new("train", what, train_args(&p, &[])).needs(needles)
    };
    let fields: Vec<(&str, Vec<&str>)> = vec![
        ("vocab_size", vec!["0", "-1", "100", "4000000000"]),
        ("max_seq_len", vec!["0", "100000000000"]),
        ("embed_dim", vec!["0", "31", "1048576"]),
        ("num_layers", vec!["0", "100000"]),
        ("num_heads", vec!["0", "3", "64"]),
        ("num_slots", vec!["0", "1000000000000"]),
        ("mlp_ratio", vec!["0", "-1", "nan", "inf", "1e12"]),
        ("dropout", vec!["-0.1", "1.0", "nan"]),
        ("slot_dropout", vec!["1.5", "-0.5"]),
        ("slotspace_dropout", vec!["-1", "1"]),
        ("read_temperature", vec!["0", "-1", "inf", "nan"]),
        ("write_temperature", vec!["0", "nan"]),
        ("rope_base", vec!["0", "-1", "nan"]),
        ("rope_base_slotspace", vec!["0", "inf"]),
        ("alibi_strength_init", vec!["nan", "inf"]),
        ("min_strength", vec!["nan", "inf"]),
        ("content_read_init", vec!["nan"]),
        ("content_read_max_gamma", vec!["nan", "inf"]),
        ("slotspace_gate_init", vec!["nan"]),
        ("write_chunk_size", vec!["0"]),
        ("slotspace_dim", vec!["0", "7", "1000000000000"]),
        ("slotspace_chunk_size", vec!["0"]),
        ("batch_size", vec!["0", "1000000000000"]),
        ("micro_batch_size", vec!["3", "1000000000000"]),
        ("grad_accum_steps", vec!["0"]),
        ("learning_rate", vec!["0", "-1", "nan", "inf"]),
        ("min_lr", vec!["-1", "1.0", "nan"]),
        ("weight_decay", vec!["-1", "nan", "inf"]),
        ("grad_clip", vec!["-1", "nan"]),
        ("warmup_steps", vec!["10"]),
        ("total_steps", vec!["0"]),
        ("eval_interval", vec!["0"]),
        ("stride_frac_val", vec!["0", "2", "nan"]),
        ("val_windows", vec!["0"]),
        ("seed", vec!["-1", "1.5"]),
    ];
    for (field, vals) in &fields {
        for val in vals {
            let huge = format!("memory|{field}");
            let needle: &str = match *val {
                "1048576" | "100000" | "1000000000000" | "100000000000" | "4000000000" | "1e12" => {
                    huge.as_str()
                }
                "100" if *field == "vocab_size" => "vocab",
                _ => field,
            };
            v.push(tc(
                format!("{field} = {val}"),
                &[(field, Some(val))],
                false,
                &[needle],
            ));
        }
    }
    for (k, val, needle) in [
        ("betas", "[1.0, 0.95]", "beta"),
        ("betas", "[0.9, 1.0]", "beta"),
        ("betas", "[-0.1, 0.95]", "beta"),
        ("betas", "[nan, 0.95]", "beta"),
        ("betas", "[0.9]", "betas"),
        ("betas", "[0.9, 0.95, 0.99]", "betas"),
        ("betas", "0.9", "betas"),
        ("precision", "\"fp8\"", "fp8"),
        ("variant", "\"bogus\"", "bogus"),
        ("embed_dim", "\"big\"", "embed_dim"),
        ("embed_dim", "1.5", "embed_dim"),
        ("tie_weights", "\"yes\"", "tie_weights"),
        ("data", "5", "data"),
        ("name", "3", "name"),
        ("skip_nonfinite", "1", "skip_nonfinite"),
    ] {
        v.push(tc(
            format!("{k} = {val}"),
            &[(k, Some(val))],
            false,
            &[needle],
        ));
    }
    // unknown keys: named, with the closest known key
    for (typo, right) in [
        ("embedd_dim", "embed_dim"),
        ("learning_rat", "learning_rate"),
        ("num_layer", "num_layers"),
        ("totl_steps", "total_steps"),
        ("warmup", "warmup_steps"),
        ("dropuot", "dropout"),
    ] {
        v.push(tc(
            format!("unknown key {typo}"),
            &[(typo, Some("64"))],
            false,
            &[typo, right],
        ));
    }
    v.push(tc(
        "unknown key in JSON (embedd_dim)".into(),
        &[("embedd_dim", Some("64"))],
        true,
        &["embedd_dim", "embed_dim"],
    ));
    v.push(tc(
        "unknown key in JSON (lr)".into(),
        &[("lr", Some("0.1"))],
        true,
        &["lr", "learning_rate"],
    ));
    v.push(tc(
        "JSON: embed_dim 0".into(),
        &[("embed_dim", Some("0"))],
        true,
        &["embed_dim"],
    ));
    v.push(tc(
        "JSON: learning_rate 1e999".into(),
        &[("learning_rate", Some("1e999"))],
        true,
        &["learning_rate|1e999|number"],
    ));
    v.push(tc(
        "JSON: num_heads null".into(),
        &[("num_heads", Some("null"))],
        true,
        &["num_heads"],
    ));
    v.push(tc(
        "JSON: betas as a string".into(),
        &[("betas", Some("\"0.9,0.95\""))],
        true,
        &["betas"],
    ));
    // inconsistent sizes
    v.push(tc(
        "heads do not divide embed".into(),
        &[("embed_dim", Some("30")), ("num_heads", Some("4"))],
        false,
        &["num_heads|divisible"],
    ));
    v.push(tc(
        "odd head_dim with RoPE".into(),
        &[("embed_dim", Some("6")), ("num_heads", Some("2"))],
        false,
        &["head_dim"],
    ));
    v.push(tc(
        "micro_batch_size above batch_size".into(),
        &[("micro_batch_size", Some("4"))],
        false,
        &["micro_batch_size"],
    ));
    v.push(tc(
        "vocab_size below the data's ids".into(),
        &[("vocab_size", Some("200"))],
        false,
        &["vocab"],
    ));
    v.push(tc(
        "max_seq_len above the validation shard".into(),
        &[
            ("max_seq_len", Some("8192")),
            ("write_chunk_size", Some("64")),
            ("slotspace_chunk_size", Some("64")),
        ],
        false,
        &["window|validation|val"],
    ));
    v.push(tc(
        "config without data".into(),
        &[("data", None)],
        false,
        &["data"],
    ));
    // names and folders
    for (k, val) in [
        ("name", "\"../escape\""),
        ("name", "\"a/b\""),
        ("name", "\"\""),
        ("name", "\"/abs\""),
        ("name", "\"..\""),
    ] {
        v.push(tc(
            format!("{k} = {val}"),
            &[(k, Some(val))],
            false,
            &["name"],
        ));
    }
    v.push(tc(
        "tag = \"a/b\" (no name)".into(),
        &[("name", None), ("tag", Some("\"a/b\""))],
        false,
        &["tag|name"],
    ));
    {
        let f = a_file.display().to_string();
        v.push(
            tc(
                "outdir is a file".into(),
                &[("outdir", Some(&format!("\"{f}\"")))],
                false,
                &["not-a-folder", "!file exists"],
            )
            .guard(&a_file),
        );
    }
    // the config file itself
    {
        let d = ctx.dir("cfgfile");
        let write = |name: &str, body: &[u8]| {
            let p = d.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let empty = write("empty.toml", b"");
        let syntax = write("syntax.toml", b"embed_dim = = 3\n");
        let binary = write("binary.toml", &[0xff, 0xfe, 0, 1, 2, 0x80]);
        let dup = write(
            "dup.toml",
            format!("{}embed_dim = 64\n", toml_text(&base_cfg(&ctx.data, &d))).as_bytes(),
        );
        let badjson = write("bad.json", b"{\"embed_dim\": ");
        let arr = write("array.json", b"[1, 2, 3]");
        let nested = write(
            "nested.toml",
            format!(
                "{}[model]\nembed_dim = 64\n",
                toml_text(&base_cfg(&ctx.data, &d))
            )
            .as_bytes(),
        );
        for (what, p, needle) in [
            (
                "config file missing",
                d.join("missing.toml"),
                "missing.toml",
            ),
            ("config is a folder", d.clone(), "cfgfile"),
            ("empty TOML", empty, "data"),
            ("TOML syntax error", syntax, "syntax.toml"),
            ("binary config", binary, "binary.toml"),
            ("duplicate key", dup, "embed_dim"),
            ("truncated JSON", badjson, "bad.json"),
            ("JSON array, not an object", arr, "array.json"),
            ("unknown [model] table", nested, "model"),
        ] {
            v.push(Case::new("train", what, train_args(&p, &[])).needs(&[needle]));
        }
    }
    // shards: missing, truncated, wrong header, ids out of range
    {
        type Damage = Box<dyn Fn(&Path)>;
        let damages: Vec<(&str, Damage, &str)> = vec![
            (
                "data folder missing",
                Box::new(|d: &Path| std::fs::remove_dir_all(d).unwrap()),
                "data",
            ),
            (
                "meta.json missing",
                Box::new(|d: &Path| std::fs::remove_file(d.join("meta.json")).unwrap()),
                "meta.json",
            ),
            (
                "meta.json not JSON",
                Box::new(|d: &Path| std::fs::write(d.join("meta.json"), "{").unwrap()),
                "meta.json",
            ),
            (
                "val.bin missing",
                Box::new(|d: &Path| std::fs::remove_file(d.join("val.bin")).unwrap()),
                "val.bin",
            ),
            (
                "train shard missing",
                Box::new(|d: &Path| std::fs::remove_file(d.join("train_000.bin")).unwrap()),
                "train_000.bin",
            ),
            (
                "train shard truncated mid-token",
                Box::new(|d: &Path| {
                    let p = d.join("train_000.bin");
                    truncate(&p, std::fs::metadata(&p).unwrap().len() as usize - 1001);
                }),
                "train_000.bin",
            ),
            (
                "train shard truncated in the header",
                Box::new(|d: &Path| truncate(&d.join("train_000.bin"), 20)),
                "train_000.bin",
            ),
            (
                "train shard empty",
                Box::new(|d: &Path| truncate(&d.join("train_000.bin"), 0)),
                "train_000.bin",
            ),
            (
                "wrong magic",
                Box::new(|d: &Path| shard_header_set(&d.join("train_000.bin"), 0, b"NOTTOKS!")),
                "train_000.bin",
            ),
            (
                "wrong version",
                Box::new(|d: &Path| {
                    shard_header_set(&d.join("train_000.bin"), 8, &7u32.to_le_bytes())
                }),
                "version",
            ),
            (
                "dtype 3 bytes",
                Box::new(|d: &Path| {
                    shard_header_set(&d.join("train_000.bin"), 12, &3u32.to_le_bytes())
                }),
                "train_000.bin",
            ),
            (
                "count beyond the file",
                Box::new(|d: &Path| {
                    shard_header_set(&d.join("train_000.bin"), 16, &u64::MAX.to_le_bytes())
                }),
                "train_000.bin",
            ),
            (
                "header vocab differs",
                Box::new(|d: &Path| {
                    shard_header_set(&d.join("val.bin"), 24, &50257u32.to_le_bytes())
                }),
                "vocab",
            ),
            (
                "token id out of range",
                Box::new(|d: &Path| {
                    shard_header_set(
                        &d.join("train_000.bin"),
                        32 + 2 * 500,
                        &300u16.to_le_bytes(),
                    )
                }),
                "300",
            ),
            (
                "val shard shorter than a window",
                Box::new(|d: &Path| {
                    let p = d.join("val.bin");
                    truncate(&p, 32 + 2 * 10);
                    shard_header_set(&p, 16, &10u64.to_le_bytes());
                }),
                "val",
            ),
            (
                "data path is a file",
                Box::new(|d: &Path| {
                    std::fs::remove_dir_all(d).unwrap();
                    std::fs::write(d, "x").unwrap();
                }),
                "data",
            ),
        ];
        for (what, damage, needle) in damages {
            let data = ctx.data_copy();
            damage(&data);
            let q = format!("\"{}\"", data.display());
            let (p, _) = ctx.cfg(&[("data", Some(&q))], false);
            v.push(
                Case::new("train", format!("shards: {what}"), train_args(&p, &[])).needs(&[needle]),
            );
        }
    }
    // flags
    {
        let (p, _) = ctx.cfg(&[], false);
        for (what, extra, needle) in [
            ("--stop-at 0", vec!["--stop-at", "0"], "stop"),
            ("--seed -1", vec!["--seed", "-1"], "seed"),
            ("--device tpu", vec!["--device", "tpu"], "device"),
            ("--resume with no run", vec!["--resume"], "resume"),
        ] {
            v.push(Case::new("train", what, train_args(&p, &extra)).needs(&[needle]));
        }
        if !cuda {
            v.push(
                Case::new(
                    "train",
                    "--device cuda",
                    args!["train", "--device", "cuda", "--config", s(&p)],
                )
                .needs(&["cuda"]),
            );
        }
        v.push(
            Case::new("train", "no --config", args!["train", "--device", "cpu"]).needs(&["config"]),
        );
    }
    // accidents on an existing `train` run
    {
        let (p, run) = ctx.train_copy(&[]);
        v.push(
            Case::new(
                "train",
                "new run over an existing run (no --resume)",
                train_args(&p, &[]),
            )
            .needs(&["--resume", "--force"])
            .guard(&run),
        );
        let other_data = ctx.data_copy();
        let od = format!("\"{}\"", other_data.display());
        for (what, edits, needle) in [
            (
                "--resume with another learning_rate",
                vec![("learning_rate", Some("0.1"))],
                "learning_rate",
            ),
            (
                "--resume with another embed_dim",
                vec![("embed_dim", Some("64"))],
                "embed_dim",
            ),
            (
                "--resume with another batch_size",
                vec![("batch_size", Some("4"))],
                "batch_size",
            ),
            (
                "--resume with another dropout",
                vec![("dropout", Some("0.2"))],
                "dropout",
            ),
            (
                "--resume with other data",
                vec![("data", Some(od.as_str()))],
                "data",
            ),
            (
                "--resume with total_steps changed in the file",
                vec![("total_steps", Some("8"))],
                "--total-steps",
            ),
            ("--resume of a finished run", vec![], "--total-steps"),
        ] {
            let (p, run) = if edits.is_empty() {
                ctx.train_copy_of(&ctx.trun_fin, &edits)
            } else {
                ctx.train_copy(&edits)
            };
            v.push(
                Case::new("train", what, train_args(&p, &["--resume"]))
                    .needs(&[needle])
                    .guard(&run),
            );
        }
        // extending and stopping below where the run already is (it stands at step 2)
        for (what, extra) in [
            (
                "--total-steps below the run's step",
                vec!["--resume", "--total-steps", "1"],
            ),
            (
                "--stop-at below the run's step",
                vec!["--resume", "--stop-at", "1"],
            ),
            ("--total-steps without --resume", vec!["--total-steps", "8"]),
            ("--force with --resume", vec!["--resume", "--force"]),
        ] {
            let (p, run) = ctx.train_copy(&[]);
            v.push(
                Case::new("train", what, train_args(&p, &extra))
                    .needs(&["step|resume|force"])
                    .guard(&run),
            );
        }
        for (what, extra) in [
            (
                "--resume --steps below the run's step",
                vec!["--resume", "--steps", "1"],
            ),
            (
                "--resume --stop-at below the run's step",
                vec!["--resume", "--stop-at", "1"],
            ),
            ("--force with --resume", vec!["--resume", "--force"]),
        ] {
            let (out, run) = ctx.mini_copy();
            v.push(
                Case::new("train-mini", what, mini_args(&out, "mini", &extra))
                    .needs(&["step|resume|force"])
                    .guard(&run),
            );
        }
        let (p, run) = ctx.train_copy(&[]);
        v.push(
            Case::new(
                "train",
                "--resume with another --seed",
                train_args(&p, &["--resume", "--seed", "7"]),
            )
            .needs(&["seed"])
            .guard(&run),
        );
        // NaN weights in the run, then --resume
        let (p, run) = ctx.train_copy(&[]);
        rewrite_st(&run.join("checkpoint.safetensors"), |m, _| {
            m.get_mut("token_emb.weight").unwrap().1[0] = f32::NAN;
        });
        v.push(
            Case::new(
                "train",
                "--resume from a checkpoint with a NaN weight",
                train_args(&p, &["--resume"]),
            )
            .needs(&["token_emb.weight"])
            .guard(&run.join("checkpoint.safetensors")),
        );
        // a second process
        let (p, run) = ctx.train_copy(&[("total_steps", Some("100000"))]);
        let _ = std::fs::remove_dir_all(&run);
        let ck = run.join("checkpoint.safetensors");
        v.push(
            Case::new(
                "train",
                "second process on a run folder in use",
                train_args(&p, &["--resume"]),
            )
            .needs(&["lock|in use|pid"])
            .alongside(train_args(&p, &[]), move || ck.is_file()),
        );
    }

    // --- prepare ------------------------------------------------------------------------------
    {
        let d = ctx.dir("prep");
        let src = repo().join("assets/corpus/sonnets.txt");
        let prep = |extra: &[&str], out: &Path| -> Vec<String> {
            let mut a = args!["prepare", "--tokenizer", "byte", "--outdir", s(out)];
            a.extend(extra.iter().map(|x| x.to_string()));
            a.push(s(&src));
            a
        };
        for (flag, val, needle) in [
            ("--val-frac", "0", "val-frac|val_frac"),
            ("--val-frac", "1", "val-frac|val_frac"),
            ("--val-frac", "-0.1", "val-frac|val_frac"),
            ("--val-frac", "1.5", "val-frac|val_frac"),
            ("--val-frac", "nan", "val-frac|val_frac"),
            ("--val-frac", "inf", "val-frac|val_frac"),
            ("--shard-tokens", "0", "shard-tokens|shard_tokens"),
            ("--shard-tokens", "-1", "shard-tokens"),
            ("--tokenizer", "nonsense", "nonsense"),
        ] {
            let out = d.join(format!("out{}", v.len()));
            let mut a = prep(&[], &out);
            if flag == "--tokenizer" {
                a[2] = val.to_string();
            } else {
                a.insert(1, val.to_string());
                a.insert(1, flag.to_string());
            }
            v.push(Case::new("prepare", format!("{flag} {val}"), a).needs(&[needle]));
        }
        let bin = d.join("binary.txt");
        std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
        let empty = d.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        for (what, input, needle) in [
            ("input missing", d.join("missing.txt"), "missing.txt"),
            ("input is a folder", d.clone(), "prep"),
            ("input not UTF-8", bin, "binary.txt"),
            ("input empty", empty, "empty.txt|no text|empty"),
        ] {
            let out = d.join(format!("out{}", v.len()));
            v.push(
                Case::new(
                    "prepare",
                    what,
                    args![
                        "prepare",
                        "--tokenizer",
                        "byte",
                        "--outdir",
                        s(&out),
                        s(&input)
                    ],
                )
                .needs(&[needle]),
            );
        }
        v.push(Case::new(
            "prepare",
            "no input",
            args!["prepare", "--outdir", s(&d.join("o"))],
        ));
        v.push(
            Case::new("prepare", "outdir is a file", prep(&[], &a_file))
                .needs(&["not-a-folder", "!file exists"])
                .guard(&a_file),
        );
        let data = ctx.data_copy();
        v.push(
            Case::new(
                "prepare",
                "over existing shards without --force",
                prep(&["--val-frac", "0.5"], &data),
            )
            .needs(&["--force"])
            .guard(&data),
        );
        let data = ctx.data_copy();
        v.push(
            Case::new(
                "prepare",
                "over existing shards, other tokenizer, no --force",
                args!["prepare", "--outdir", s(&data), s(&src)],
            )
            .needs(&["--force"])
            .guard(&data),
        );
    }

    // --- bench --------------------------------------------------------------------------------
    {
        let (tiny, _) = ctx.cfg(&[], false);
        let b = |extra: &[&str]| -> Vec<String> {
            let mut a = args![
                "bench",
                "--device",
                "cpu",
                "--config",
                s(&tiny),
                "--warmup",
                "0",
                "--iters",
                "1"
            ];
            for pair in extra.chunks(2) {
                if let Some(i) = a.iter().position(|x| x == pair[0]) {
                    a[i + 1] = pair[1].to_string();
                } else {
                    a.extend(pair.iter().map(|x| x.to_string()));
                }
            }
            a
        };
        for (what, extra, needle) in [
            ("--iters 0", vec!["--iters", "0"], "iters"),
            ("--iters -1", vec!["--iters", "-1"], "iters"),
            ("--warmup -1", vec!["--warmup", "-1"], "warmup"),
            ("--iters 1e12", vec!["--iters", "1000000000000"], "iters"),
            ("--threads 0", vec!["--threads", "0"], "threads"),
            ("--threads 1e9", vec!["--threads", "1000000000"], "threads"),
            (
                "--warmup + --iters overflow",
                vec!["--warmup", "1", "--iters", "18446744073709551615"],
                "iters",
            ),
            ("--precision fp8", vec!["--precision", "fp8"], "fp8"),
            (
                "--config missing file",
                vec!["--config", "/nonexistent/run.toml"],
                "run.toml",
            ),
            (
                "--config unknown preset",
                vec!["--config", "gpu-huge"],
                "gpu-huge",
            ),
            (
                "--reference missing folder",
                vec!["--reference", "/nonexistent/ASA"],
                "/nonexistent/ASA",
            ),
            (
                "--json into a missing folder",
                vec!["--json", "/nonexistent/dir/b.json"],
                "b.json|/nonexistent/dir",
            ),
            (
                "--json is a folder",
                vec!["--json", "/tmp"],
                "/tmp && !checkpoint error",
            ),
        ] {
            v.push(Case::new("bench", what, b(&extra)).needs(&[needle]));
        }
        for (what, edits, needle) in [
            (
                "config embed_dim 0",
                vec![("embed_dim", Some("0"))],
                "embed_dim",
            ),
            (
                "config embed_dim 1048576",
                vec![("embed_dim", Some("1048576"))],
                "memory|embed_dim",
            ),
            (
                "config num_layers 100000",
                vec![("num_layers", Some("100000"))],
                "memory|num_layers",
            ),
            (
                "config unknown key",
                vec![("embedd_dim", Some("64"))],
                "embedd_dim",
            ),
            (
                "config learning_rate nan",
                vec![("learning_rate", Some("nan"))],
                "learning_rate",
            ),
        ] {
            let (p, _) = ctx.cfg(&edits, false);
            v.push(Case::new("bench", what, b(&["--config", &s(&p)])).needs(&[needle]));
        }
        if !cuda {
            v.push(
                Case::new(
                    "bench",
                    "--device cuda",
                    args!["bench", "--device", "cuda", "--config", s(&tiny)],
                )
                .needs(&["cuda"]),
            );
        }
    }

    // --- probe --------------------------------------------------------------------------------
    {
        let d = ctx.dir("probe");
        let out = d.join("out");
        let g = ctx.gpt2.clone();
        let p = |extra: &[&str]| -> Vec<String> {
            let mut a = args![
                "probe",
                "--device",
                "cpu",
                "--num-pcs",
                "1",
                "--ckpt",
                s(&g),
                "--outdir",
                s(&out)
            ];
            for pair in extra.chunks(2) {
                if let Some(i) = a.iter().position(|x| x == pair[0]) {
                    a[i + 1] = pair[1].to_string();
                } else {
                    a.extend(pair.iter().map(|x| x.to_string()));
                }
            }
            a
        };
        let text = d.join("notes.txt");
        std::fs::write(&text, "not a checkpoint").unwrap();
        let emptyd = d.join("empty-run");
        std::fs::create_dir_all(&emptyd).unwrap();
        // safetensors with config.json beside it: truncated, NaN, bit-flipped header
        let mk = |tag: &str| -> PathBuf {
            let dd = d.join(tag);
            std::fs::create_dir_all(&dd).unwrap();
            std::fs::copy(g.join("model.safetensors"), dd.join("model.safetensors")).unwrap();
            std::fs::copy(g.join("config.json"), dd.join("config.json")).unwrap();
            dd.join("model.safetensors")
        };
        let trunc = mk("trunc");
        truncate(&trunc, 5000);
        let nan = mk("nan");
        rewrite_st(&nan, |m, _| {
            m.get_mut("token_emb.weight").unwrap().1[7] = f32::NAN;
        });
        let allnan = mk("allnan");
        rewrite_st(&allnan, |m, _| {
            for (_, d) in m.values_mut() {
                d.iter_mut().for_each(|x| *x = f32::NAN);
            }
        });
        // the config lives in the file's metadata too: remove it there, so config.json counts
        let badcfg = mk("badcfg");
        rewrite_st(&badcfg, |_, meta| {
            meta.remove("asa_config");
        });
        std::fs::write(badcfg.with_file_name("config.json"), "{\"embed_dim\": 0}").unwrap();
        let nocfg = mk("nocfg");
        rewrite_st(&nocfg, |_, meta| {
            meta.remove("asa_config");
        });
        std::fs::remove_file(nocfg.with_file_name("config.json")).unwrap();
        let badpt = d.join("flipped.pt");
        std::fs::copy(fx.join("legacy_pt/checkpoint.pt"), &badpt).unwrap();
        patch_zip_member(&badpt, "checkpoint/data/0", |b| b[10] ^= 0x40, false);
        for (what, extra, needle) in [
            (
                "--ckpt missing",
                vec!["--ckpt", "/nonexistent/run"],
                "/nonexistent/run",
            ),
            (
                "--ckpt an empty folder",
                vec!["--ckpt", emptyd.to_str().unwrap()],
                "empty-run",
            ),
            (
                "--ckpt a text file",
                vec!["--ckpt", text.to_str().unwrap()],
                "notes.txt",
            ),
            (
                "--ckpt truncated safetensors",
                vec!["--ckpt", trunc.to_str().unwrap()],
                "model.safetensors",
            ),
            (
                "--ckpt with a NaN weight",
                vec!["--ckpt", nan.to_str().unwrap()],
                "token_emb.weight",
            ),
            (
                "--ckpt all NaN",
                vec!["--ckpt", allnan.to_str().unwrap()],
                "nan|finite",
            ),
            (
                "--ckpt with config.json embed_dim 0",
                vec!["--ckpt", badcfg.to_str().unwrap()],
                "embed_dim",
            ),
            (
                "--ckpt without any config",
                vec!["--ckpt", nocfg.to_str().unwrap()],
                "config",
            ),
            (
                "--ckpt a .pt with flipped tensor bytes",
                vec!["--ckpt", badpt.to_str().unwrap()],
                "data/0|crc",
            ),
            ("--window 0", vec!["--window", "0"], "window"),
            ("--num-pcs 0", vec!["--num-pcs", "0"], "num-pcs|num_pcs"),
            ("--layers 5 (one layer)", vec!["--layers", "5"], "layer"),
            ("--layers 0,99", vec!["--layers", "0,99"], "layer"),
            ("--layers -1", vec!["--layers", "-1"], "layers"),
            (
                "--experiments 9",
                vec!["--experiments", "9"],
                "--experiments: unknown experiment 9",
            ),
            (
                "--basin-layer 5 (one layer)",
                vec!["--basin-layer", "5"],
                "--basin-layer: layer 5",
            ),
            (
                "--basin-intervene 0,7",
                vec!["--basin-intervene", "0,7"],
                "--basin-intervene: layer 7",
            ),
            (
                "--sphere-layer 3",
                vec!["--sphere-layer", "3"],
                "--sphere-layer: layer 3",
            ),
            ("--basin-grid 1", vec!["--basin-grid", "1"], "--basin-grid"),
            ("--max-lag 0", vec!["--max-lag", "0"], "--max-lag"),
            (
                "--timescale-len 1",
                vec!["--timescale-len", "1"],
                "--timescale-len",
            ),
            (
                "--timescale-text missing",
                vec!["--timescale-text", "/nonexistent/t.txt"],
                "/nonexistent/t.txt",
            ),
            (
                "--tokenizer nonsense",
                vec!["--tokenizer", "nonsense"],
                "nonsense",
            ),
            (
                "--tokenizer of another vocabulary",
                vec!["--tokenizer", "byte"],
                "vocab",
            ),
            (
                "--outdir is a file",
                vec!["--outdir", a_file.to_str().unwrap()],
                "not-a-folder && !file exists",
            ),
            ("--window x", vec!["--window", "x"], "window"),
        ] {
            v.push(Case::new("probe", what, p(&extra)).needs(&[needle]));
        }
        let empty_cwd = ctx.dir("probe-cwd");
        v.push(
            Case::new(
                "probe",
                "no --ckpt and no runs/",
                args!["probe", "--device", "cpu"],
            )
            .cwd(&empty_cwd)
            .needs(&["runs"]),
        );
    }

    // --- parity -------------------------------------------------------------------------------
    {
        let d = ctx.dir("parity");
        let case = |name: &str, tag: &str| -> PathBuf {
            let dst = d.join(tag);
            copy_dir(&fx.join(name), &dst);
            dst
        };
        let trunc = case("lm_minimal", "trunc");
        truncate(&trunc.join("io.safetensors"), 3000);
        let nan = case("lm_minimal", "nan");
        rewrite_st(&nan.join("model.safetensors"), |m, _| {
            for (_, d) in m.values_mut() {
                d.iter_mut().for_each(|x| *x = f32::NAN);
            }
        });
        let wrong = case("lm_minimal", "wrong");
        std::fs::copy(
            fx.join("lm_full/model.safetensors"),
            wrong.join("model.safetensors"),
        )
        .unwrap();
        let badcfg = case("lm_minimal", "badcfg");
        std::fs::write(
            badcfg.join("config.json"),
            "{\"model\": {\"embed_dim\": 0}}",
        )
        .unwrap();
        let nocfg = case("lm_minimal", "nocfg");
        std::fs::remove_file(nocfg.join("config.json")).unwrap();
        v.push(
            Case::new(
                "parity",
                "missing folder",
                args!["parity", "/nonexistent/dir"],
            )
            .needs(&["/nonexistent/dir"]),
        );
        v.push(Case::new("parity", "a file", args!["parity", s(&a_file)]).needs(&["not-a-folder"]));
        v.push(
            Case::new(
                "parity",
                "an empty folder",
                args!["parity", s(&ctx.dir("parity-empty"))],
            )
            .needs(&["parity-empty"]),
        );
        v.push(
            Case::new(
                "parity",
                "truncated io.safetensors",
                args!["parity", s(&trunc)],
            )
            .report(&["io.safetensors"]),
        );
        v.push(Case::new("parity", "all-NaN weights", args!["parity", s(&nan)]).report(&[]));
        v.push(
            Case::new(
                "parity",
                "weights of another model",
                args!["parity", s(&wrong)],
            )
            .report(&["blocks."]),
        );
        v.push(
            Case::new(
                "parity",
                "config.json embed_dim 0",
                args!["parity", s(&badcfg)],
            )
            .report(&["embed_dim"]),
        );
        v.push(
            Case::new("parity", "no config.json", args!["parity", s(&nocfg)])
                .needs(&["nocfg|config"]),
        );
        v.push(
            Case::new(
                "parity",
                "--precision fp8",
                args!["parity", "--precision", "fp8", s(&fx)],
            )
            .needs(&["fp8"]),
        );
        v.push(Case::new("parity", "no folder", args!["parity"]));
        if !cuda {
            v.push(
                Case::new(
                    "parity",
                    "--device cuda",
                    args!["parity", "--device", "cuda", s(&fx.join("lm_minimal"))],
                )
                .needs(&["cuda"]),
            );
        }
    }

    // --- convert ------------------------------------------------------------------------------
    {
        let d = ctx.dir("convert");
        let pt = fx.join("legacy_pt/checkpoint.pt");
        let len = std::fs::metadata(&pt).unwrap().len() as usize;
        let mk = |tag: &str| -> PathBuf {
            let p = d.join(format!("{tag}.pt"));
            std::fs::copy(&pt, &p).unwrap();
            p
        };
        let out = |tag: &str| s(&d.join(format!("{tag}.safetensors")));
        let mut pts: Vec<(String, PathBuf, &str)> = Vec::new();
        for cut in [0usize, 4, 100, len / 2, len - 22, len - 1] {
            let p = mk(&format!("trunc{cut}"));
            truncate(&p, cut);
            pts.push((format!("truncated to {cut} bytes"), p, "trunc"));
        }
        let flipped = mk("flipped");
        patch_zip_member(&flipped, "checkpoint/data/0", |b| b[100] ^= 0x01, false);
        pts.push((
            "one bit flipped in tensor bytes".into(),
            flipped,
            "data/0|crc",
        ));
        let zeroed = mk("zeroed");
        patch_zip_member(
            &zeroed,
            "checkpoint/data/7",
            |b| b.iter_mut().for_each(|x| *x = 0),
            false,
        );
        pts.push(("tensor bytes overwritten".into(), zeroed, "data/7|crc"));
        let nan = mk("nan");
        patch_zip_member(&nan, "checkpoint/data/0", nan_bytes, true);
        pts.push(("NaN tensor (valid CRC)".into(), nan, "nan|finite"));
        let inf = mk("inf");
        patch_zip_member(
            &inf,
            "checkpoint/data/7",
            |b| b[..4].copy_from_slice(&f32::INFINITY.to_le_bytes()),
            true,
        );
        pts.push(("inf in a tensor (valid CRC)".into(), inf, "inf|finite"));
        let pkl = mk("pkl");
        patch_zip_member(
            &pkl,
            "checkpoint/data.pkl",
            |b| {
                let n = b.len();
                b[n / 2..n / 2 + 8].copy_from_slice(b"\xff\xfe\xfd\xfc\x00\x01\x02\x03");
            },
            true,
        );
        pts.push(("pickle garbage (valid CRC)".into(), pkl, "pkl|pickle"));
        let pklcut = mk("pklcut");
        patch_zip_member(
            &pklcut,
            "checkpoint/data.pkl",
            |b| b.iter_mut().for_each(|x| *x = b'.'),
            true,
        );
        pts.push((
            "pickle of stop opcodes (valid CRC)".into(),
            pklcut,
            "pkl|pickle|checkpoint",
        ));
        let text = d.join("text.pt");
        std::fs::write(&text, "just text").unwrap();
        pts.push(("a text file".into(), text, "text.pt"));
        pts.push(("input missing".into(), d.join("missing.pt"), "missing.pt"));
        pts.push((
            "input is a folder".into(),
            ctx.dir("convert-dir"),
            "convert-dir",
        ));
        pts.push((
            "a safetensors file, not .pt".into(),
            fx.join("lm_minimal/model.safetensors"),
            "model.safetensors",
        ));
        for (i, (what, p, needle)) in pts.into_iter().enumerate() {
            v.push(
                Case::new(
                    "convert",
                    what,
                    args!["convert", s(&p), out(&format!("o{i}"))],
                )
                .needs(&[needle])
                .guard(&p),
            );
        }
        let cfg0 = d.join("cfg0.json");
        std::fs::write(&cfg0, "{\"embed_dim\": 0}").unwrap();
        let cfgbad = d.join("cfgbad.json");
        std::fs::write(&cfgbad, "{").unwrap();
        let cfgtypo = d.join("cfgtypo.json");
        std::fs::write(&cfgtypo, "{\"embedd_dim\": 48}").unwrap();
        for (what, extra, needle) in [
            (
                "--config missing",
                vec!["--config".to_string(), "/nonexistent/c.json".into()],
                "c.json",
            ),
            (
                "--config not JSON",
                vec!["--config".into(), s(&cfgbad)],
                "cfgbad.json",
            ),
            (
                "--config embed_dim 0",
                vec!["--config".into(), s(&cfg0)],
                "embed_dim",
            ),
            (
                "--config with a typo key",
                vec!["--config".into(), s(&cfgtypo)],
                "embedd_dim",
            ),
            (
                "--config-out under a file",
                vec!["--config-out".into(), s(&a_file.join("c.json"))],
                "not-a-folder",
            ),
        ] {
            let mut a = args!["convert", s(&pt), out(&format!("c{}", v.len()))];
            a.extend(extra);
            v.push(Case::new("convert", what, a).needs(&[needle]));
        }
        v.push(
            Case::new(
                "convert",
                "output in a missing folder",
                args!["convert", s(&pt), "/nonexistent/dir/o.safetensors"],
            )
            .needs(&["/nonexistent/dir"]),
        );
        v.push(
            Case::new(
                "convert",
                "output is a folder",
                args!["convert", s(&pt), s(&d)],
            )
            .needs(&["convert"]),
        );
        let same = mk("same");
        v.push(
            Case::new(
                "convert",
                "output is the input",
                args!["convert", s(&same), s(&same)],
            )
            .needs(&["same.pt"])
            .guard(&same),
        );
        v.push(Case::new("convert", "no output", args!["convert", s(&pt)]));
    }

    // --- smoke and doctor ---------------------------------------------------------------------
    v.push(
        Case::new(
            "smoke",
            "--outdir is a file",
            args!["smoke", "--device", "cpu", "--outdir", s(&a_file)],
        )
        .needs(&["not-a-folder", "!file exists"])
        .guard(&a_file),
    );
    v.push(
        Case::new(
            "smoke",
            "--outdir under a file",
            args![
                "smoke",
                "--device",
                "cpu",
                "--outdir",
                s(&a_file.join("sub"))
            ],
        )
        .needs(&["not-a-folder"]),
    );
    v.push(Case::new("smoke", "--seed -1", args!["smoke", "--seed", "-1"]).needs(&["seed"]));
    v.push(
        Case::new(
            "smoke",
            "--device cuda (CPU-only command)",
            args!["smoke", "--device", "cuda"],
        )
        .needs(&["cuda"]),
    );
    v.push(Case::new(
        "smoke",
        "unexpected argument",
        args!["smoke", "extra"],
    ));
    v.push(Case::new(
        "doctor",
        "unknown flag",
        args!["doctor", "--bogus"],
    ));
    v.push(Case::new(
        "doctor",
        "unexpected argument",
        args!["doctor", "extra"],
    ));
    v
}

// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inputs_catalogue() {
    let t0 = Instant::now();
    let ctx = Ctx::setup();
    let cuda = asa::backend::cuda::cuda_available();
    let cases = catalogue(&ctx, cuda);
    let total = cases.len();
    let queue = Mutex::new(cases.into_iter().collect::<std::collections::VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..WORKERS {
            sc.spawn(|| loop {
                let next = queue.lock().unwrap().pop_front();
                let Some(c) = next else { break };
                let o = run_case(c);
                results.lock().unwrap().push(o);
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by(|a, b| (a.cmd, &a.what).cmp(&(b.cmd, &b.what)));

    // summary: per class, per command
    let mut per_cmd: BTreeMap<&str, BTreeMap<Class, usize>> = BTreeMap::new();
    let mut per_class: BTreeMap<Class, usize> = BTreeMap::new();
    for o in &results {
        *per_cmd
            .entry(o.cmd)
            .or_default()
            .entry(o.class)
            .or_default() += 1;
        *per_class.entry(o.class).or_default() += 1;
    }
    let mut report = format!(
        "bad-input catalogue: {total} cases in {:.1}s\n{:<12}{:>6}",
        t0.elapsed().as_secs_f64(),
        "command",
        "tried"
    );
    for c in Class::ALL {
        report += &format!("{:>13}", c.name());
    }
    report.push('\n');
    let row = |name: &str, m: &BTreeMap<Class, usize>| {
        let mut r = format!("{name:<12}{:>6}", m.values().sum::<usize>());
        for c in Class::ALL {
            r += &format!("{:>13}", m.get(&c).copied().unwrap_or(0));
        }
        r + "\n"
    };
    for (cmd, m) in &per_cmd {
        report += &row(cmd, m);
    }
    report += &row("all", &per_class);
    let mut slow: Vec<&Outcome> = results.iter().collect();
    slow.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    report += "slowest:";
    for o in slow.iter().take(5) {
        report += &format!(" {} '{}' {:.1}s;", o.cmd, o.what, o.seconds);
    }
    report.push('\n');
    let bad: Vec<&Outcome> = results.iter().filter(|o| o.class.bad()).collect();
    for o in &bad {
        report += &format!(
            "\n[{}] {}: {} ({})\n  args: {}\n  exit {:?}\n  stderr: {}\n",
            o.class.name(),
            o.cmd,
            o.what,
            o.why,
            o.args.join(" "),
            o.code,
            o.stderr
                .trim()
                .lines()
                .rev()
                .take(6)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n          "),
        );
        if !o.stdout.trim().is_empty() && o.class != Class::Accepted {
            report += &format!(
                "  stdout: {}\n",
                o.stdout.trim().lines().last().unwrap_or("")
            );
        }
    }
    println!("{report}");
    if std::env::var_os("ASA_BAD_INPUTS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&ctx.root);
    } else {
        println!("kept {}", ctx.root.display());
    }
    assert!(total >= 180, "only {total} cases");
    assert!(
        bad.is_empty(),
        "{} of {total} bad inputs were not refused clearly (the list is printed above)",
        bad.len()
    );
}
