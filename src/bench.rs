//! `asa bench`: throughput of one training step, ours and (optionally) the PyTorch reference's,
//! measured in the same run on the same config, batch, sequence length, device and thread count.
//!
//! The step timed on both sides is a full optimizer step on one fixed batch of uniform random
//! token ids (targets = the ids shifted by one): forward in training mode, mean cross-entropy,
//! backward, global-norm clipping to 1.0 and AdamW (PyTorch semantics; lr 3e-4, betas
//! (0.9, 0.95), weight decay 0.01). All dropouts (`dropout`, `slot_dropout`,
//! `slotspace_dropout`) are set to 0 on both sides, whatever the config says, so that both
//! implementations do the same work and draw no random masks. Ours runs on the CPU path
//! (`Lm` + `AdamW`, as `train-mini` does) or on the GPU through `GpuLm::train_step`, whose
//! download of the loss synchronises the device, so wall clock per step is exact.
//!
//! Each side runs `warmup` untimed steps, then `iters` timed ones; tokens/s is
//! `batch * seq_len / median(step seconds)`, and the ratio is ours over the reference's.
//!
//! The reference side is `scripts/reference_bench.py`, embedded in this binary and fed to
//! `python -` on stdin (so a prebuilt binary needs no checkout of this repository). It imports the
//! reference from `--reference PATH` (a checkout of github.com/digitaldaimyo/ASA), builds the
//! `baseline` variant with the same config and runs the same step with PyTorch (CUDA + bf16:
//! under `torch.autocast`). Threads: ours runs in a local rayon pool of `threads` workers (all
//! of the global pool when not given), and the reference gets `torch.set_num_threads` with that
//! same number (and `OMP_NUM_THREADS` / `MKL_NUM_THREADS`).
//!
//! Speed is never asserted in tests; only parsing and presets are.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::cuda::graph::GraphStats;
use crate::config::Precision;
use crate::config::{ModelConfig, Place, Variant};
use crate::engine::{Engine, StepBatch};
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::optim::{AdamW, AdamWConfig};

/// The reference-side script (also usable by hand: `python3 scripts/reference_bench.py --help`).
pub const REFERENCE_SCRIPT: &str = include_str!("../scripts/reference_bench.py");

/// Optimizer of the timed step on both sides (the reference's training settings).
pub const BENCH_ADAM: AdamWConfig = AdamWConfig {
    lr: 3e-4,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.01,
};
/// Global gradient-norm clip of the timed step.
pub const BENCH_CLIP: f64 = 1.0;

/// The standard benchmark configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchPreset {
    /// vocab 50257, embed 256, 4 layers, 4 heads, 16 slots, slotspace 32, T 256, batch 4,
    /// write/slotspace chunks 128, f32.
    CpuSmall,
    /// The reference's practice run: vocab 50257, embed 768, 27 layers, 8 heads, 16 slots,
    /// slotspace 64, T 1024, batch 8, chunks 512, bf16 GEMMs on the GPU.
    PracticeRun,
    /// The scaling benchmark's config (issue 16): vocab 512, embed 256, 2 layers, 4 heads,
    /// 16 slots, slotspace 32, write/slotspace chunks 128, batch 1, T 1024, f32. The small
    /// vocabulary keeps the head cheap, so the step's time is the slot scan's.
    CpuAsa,
}

impl BenchPreset {
    pub const ALL: [BenchPreset; 3] = [
        BenchPreset::CpuSmall,
        BenchPreset::PracticeRun,
        BenchPreset::CpuAsa,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            BenchPreset::CpuSmall => "cpu-small",
            BenchPreset::PracticeRun => "practice-run",
            BenchPreset::CpuAsa => "cpu-asa",
        }
    }

    /// (model config with dropouts 0, batch, seq_len).
    pub fn config(&self) -> (ModelConfig, usize, usize) {
        let (vocab, embed, layers, heads, slots, ss, t, b, chunk) = match self {
            BenchPreset::CpuSmall => (50257, 256, 4, 4, 16, 32, 256, 4, 128),
            BenchPreset::PracticeRun => (50257, 768, 27, 8, 16, 64, 1024, 8, 512),
            BenchPreset::CpuAsa => (512, 256, 2, 4, 16, 32, 1024, 1, 128),
        };
        let cfg = ModelConfig {
            vocab_size: vocab,
            max_seq_len: t,
            embed_dim: embed,
            num_layers: layers,
            num_heads: heads,
            num_slots: slots,
            slotspace_dim: ss,
            write_chunk_size: chunk,
            slotspace_chunk_size: chunk,
            dropout: 0.0,
            slot_dropout: 0.0,
            slotspace_dropout: 0.0,
            mlp_bias: Some(true),
            ..Default::default()
        };
        (cfg, b, t)
    }

    /// GEMM precision on the GPU (the practice run trained in bf16).
    pub fn precision(&self) -> Precision {
        match self {
            BenchPreset::CpuSmall | BenchPreset::CpuAsa => Precision::F32,
            BenchPreset::PracticeRun => Precision::Bf16,
        }
    }
}

impl std::fmt::Display for BenchPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BenchPreset {
    type Err = AsaError;
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        BenchPreset::ALL
            .into_iter()
            .find(|p| p.name() == key)
            .ok_or_else(|| {
                AsaError::Input(format!(
                    "--config '{s}' is neither a preset (cpu-small, practice-run, cpu-asa) nor a config file"
                ))
            })
    }
}

/// What to benchmark and how.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// shown in the report (a preset's name, or e.g. a config file's)
    pub config_name: String,
    pub model: ModelConfig,
    pub batch: usize,
    pub seq_len: usize,
    /// ours on the GPU (`GpuLm`), the reference with `--device cuda`
    pub place: Place,
    /// GEMM precision of ours on the GPU; `Bf16` runs the reference under bf16 autocast
    pub precision: Precision,
    pub warmup: usize,
    pub iters: usize,
    /// a checkout of github.com/digitaldaimyo/ASA: also time the reference
    pub reference: Option<PathBuf>,
    /// Python with PyTorch (default `python3`)
    pub python: String,
    /// worker threads on both sides (default: all of rayon's global pool)
    pub threads: Option<usize>,
    /// one line per step on stderr (the command line's bench; off in the library's tests)
    pub progress: bool,
}

impl BenchOptions {
    /// The options of a preset: its config, batch, length and precision; 2 warmup and 5 timed
    /// steps, on the CPU, no reference.
    pub fn from_preset(p: BenchPreset) -> Self {
        let (model, batch, seq_len) = p.config();
        BenchOptions {
            config_name: p.name().into(),
            model,
            batch,
            seq_len,
            place: Place::Cpu,
            precision: p.precision(),
            warmup: 2,
            iters: 5,
            reference: None,
            python: "python3".into(),
            threads: None,
            progress: false,
        }
    }
}

impl BenchOptions {
    /// The command line's overrides: GEMM precision, T (the config's `max_seq_len` follows it)
    /// and batch, each where given.
    pub fn set_shape(
        &mut self,
        precision: Option<Precision>,
        seq_len: Option<usize>,
        batch: Option<usize>,
    ) {
        if let Some(p) = precision {
            self.precision = p;
        }
        if let Some(t) = seq_len {
            self.seq_len = t;
            self.model.max_seq_len = t;
        }
        if let Some(b) = batch {
            self.batch = b;
        }
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions::from_preset(BenchPreset::CpuSmall)
    }
}

/// The options of `--config`: a preset's name, or a run config file (.toml / .json) whose
/// model, micro-batch, length and precision are taken.
pub fn options_for(config: &str) -> Result<BenchOptions> {
    match config.parse::<BenchPreset>() {
        Ok(p) => Ok(BenchOptions::from_preset(p)),
        Err(e) if !Path::new(config).exists() => Err(e),
        Err(_) => {
            let (model, rc) = crate::train::read_run_config(Path::new(config))?;
            let micro = if rc.micro_batch_size == 0 {
                rc.batch_size
            } else {
                rc.micro_batch_size
            };
            Ok(BenchOptions {
                config_name: config.to_string(),
                batch: micro,
                seq_len: model.max_seq_len,
                precision: rc.precision.parse()?,
                model,
                ..Default::default()
            })
        }
    }
}

/// The reference's measurement (the script's JSON line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefResult {
    pub tokens_per_sec: f64,
    pub step_seconds: Vec<f64>,
    pub torch_version: String,
    pub device: String,
}

/// One benchmark run. `ratio` = ours / reference tokens per second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub device: String,
    pub config_name: String,
    pub batch: usize,
    pub seq_len: usize,
    /// worker threads of ours (and of the reference)
    pub threads: usize,
    pub precision: String,
    pub tokens_per_step: usize,
    pub step_seconds: Vec<f64>,
    /// `tokens_per_step / median(step_seconds)`
    pub tokens_per_sec: f64,
    /// model FLOPs per token of one training step (`train_flops_per_token`)
    pub flops_per_token: f64,
    /// GPU only, known devices only: achieved model FLOP/s over the device's dense bf16 peak
    pub mfu: Option<f64>,
    pub reference: Option<RefResult>,
    pub ratio: Option<f64>,
    /// ours / reference on each side's fastest step: the lower bound of the ratio when the
    /// reference's steps vary a lot (Python, allocator, threads)
    pub ratio_fastest: Option<f64>,
    /// GPU only: how the steps used CUDA graphs (captured at the second step, then replayed;
    /// `ASA_CUDA_GRAPH=0`: none)
    #[serde(default)]
    pub graph: Option<crate::backend::cuda::graph::GraphStats>,
}

/// Median of a non-empty list (mean of the two middle values for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub use crate::engine::{peak_bf16_flops, train_flops_per_token};

/// Most warmup or timed steps one bench takes (a million steps of the smallest model already
/// take hours).
pub const MAX_BENCH_STEPS: usize = 1_000_000;
/// Most worker threads a bench asks for.
pub const MAX_BENCH_THREADS: usize = 4096;

/// Runs the benchmark (ours, then the reference when `o.reference` is set). Prints one line
/// per step on stderr when `o.progress` is set, nothing else.
pub fn run_bench(o: &BenchOptions) -> Result<BenchReport> {
    if o.iters == 0 {
        return Err(AsaError::Input(
            "bench: --iters must be >= 1 (the timed steps), got 0".into(),
        ));
    }
    if o.batch == 0 || o.seq_len == 0 {
        return Err(AsaError::Input(format!(
            "bench: the config's batch ({}) and sequence length ({}) must be >= 1",
            o.batch, o.seq_len
        )));
    }
    if o.threads == Some(0) {
        return Err(AsaError::Input(
            "bench: --threads must be >= 1, got 0".into(),
        ));
    }
    // upper bounds: the step times are kept in memory (1e12 iterations aborted on the
    // allocation, warmup + iters overflowed) and a pool of 1e9 threads takes a minute to fail
    for (flag, v) in [("--warmup", o.warmup), ("--iters", o.iters)] {
        if v > MAX_BENCH_STEPS {
            return Err(AsaError::Input(format!(
                "bench: {flag} must be at most {MAX_BENCH_STEPS}, got {v}"
            )));
        }
    }
    if let Some(n) = o.threads.filter(|&n| n > MAX_BENCH_THREADS) {
        return Err(AsaError::Input(format!(
            "bench: --threads must be at most {MAX_BENCH_THREADS}, got {n}"
        )));
    }
    if let Some(r) = &o.reference {
        check_reference_dir(r)?;
    }
    let mut cfg = bench_config(&o.model);
    cfg.max_seq_len = cfg.max_seq_len.max(o.seq_len);
    // validates the config, then checks the run fits in memory
    crate::preflight::check_run(
        &cfg,
        o.batch,
        o.seq_len,
        false,
        o.place,
        crate::backend::cuda::free_memory_at(o.place),
    )?;

    let (inp, tgt) = random_batch(cfg.vocab_size, o.batch, o.seq_len, cfg.seed);
    let pool = match o.threads {
        Some(n) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| AsaError::Other(format!("bench: cannot start {n} threads: {e}")))?,
        ),
        None => None,
    };
    let threads = pool
        .as_ref()
        .map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
    let run = || bench_engine(&cfg, o, &inp, &tgt);
    let (device, step_seconds, graph) = match &pool {
        Some(p) => p.install(run)?,
        None => run()?,
    };
    let device = device.unwrap_or_else(|| format!("cpu ({threads} threads)"));
    drop(pool);

    let tokens_per_step = o.batch * o.seq_len;
    let tokens_per_sec = tokens_per_step as f64 / median(&step_seconds);
    let flops_per_token = train_flops_per_token(&cfg);
    let mfu = if o.place.is_cuda() {
        peak_bf16_flops(&device).map(|p| tokens_per_sec * flops_per_token / p)
    } else {
        None
    };
    let reference = match &o.reference {
        Some(r) => Some(run_reference(r, &cfg, o, threads)?),
        None => None,
    };
    let ratio = reference
        .as_ref()
        .map(|r| tokens_per_sec / r.tokens_per_sec);
    let fastest = |xs: &[f64]| xs.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio_fastest = reference
        .as_ref()
        .map(|r| fastest(&r.step_seconds) / fastest(&step_seconds));
    Ok(BenchReport {
        device,
        config_name: o.config_name.clone(),
        batch: o.batch,
        seq_len: o.seq_len,
        threads,
        precision: if o.place.is_cuda() {
            format!("{:?}", o.precision).to_lowercase()
        } else {
            "f32".into()
        },
        tokens_per_step,
        step_seconds,
        tokens_per_sec,
        flops_per_token,
        mfu,
        reference,
        ratio,
        ratio_fastest,
        graph,
    })
}

/// The config as both sides run it: dropouts 0 (no random masks, the same work on both
/// sides) and MLP biases (the reference library's MLP always has them).
fn bench_config(model: &ModelConfig) -> ModelConfig {
    let mut cfg = model.clone();
    cfg.dropout = 0.0;
    cfg.slot_dropout = 0.0;
    cfg.slotspace_dropout = 0.0;
    cfg.mlp_bias = Some(true);
    cfg
}

/// One fixed batch: `b` rows of `t + 1` uniform ids; inputs are the first `t`, targets the last `t`.
pub fn random_batch(vocab: usize, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbe_4c);
    let (mut inp, mut tgt) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for _ in 0..b {
        let row: Vec<u32> = (0..=t).map(|_| rng.gen_range(0..vocab as u32)).collect();
        inp.extend_from_slice(&row[..t]);
        tgt.extend(row[1..].iter().map(|&x| x as i64));
    }
    (inp, tgt)
}

fn check_step(loss: f64, norm: f64) -> Result<()> {
    if loss.is_finite() && norm.is_finite() {
        Ok(())
    } else {
        Err(AsaError::Other(format!(
            "bench: non-finite loss ({loss}) or gradient norm ({norm})"
        )))
    }
}

/// One line per step on stderr (a practice-run step on the CPU takes minutes: the user sees
/// that it is working and how long the rest will take).
fn progress(o: &BenchOptions, i: usize, dt: f64, loss: f64) {
    if !o.progress {
        return;
    }
    let tokens = (o.batch * o.seq_len) as f64;
    if i < o.warmup {
        eprintln!(
            "bench: warmup {}/{}  {dt:.3}s  loss {loss:.4}",
            i + 1,
            o.warmup
        );
    } else {
        eprintln!(
            "bench: step {}/{}  {dt:.3}s  {:.0} tokens/s  loss {loss:.4}",
            i + 1 - o.warmup,
            o.iters,
            tokens / dt
        );
    }
}

/// Our step through the training engine (`train` and `train-mini` run the same), on the CPU
/// or the GPU (synchronised by its read-back of the loss): the device's name (None on the
/// CPU), the timed steps' seconds, and how the GPU's steps used CUDA graphs.
fn bench_engine(
    cfg: &ModelConfig,
    o: &BenchOptions,
    inp: &[u32],
    tgt: &[i64],
) -> Result<(Option<String>, Vec<f64>, Option<GraphStats>)> {
    let (_, params) = Lm::new(cfg)?;
    let adam = AdamW::new(BENCH_ADAM, &params);
    let mut engine = Engine::new(cfg, params, adam, o.place, o.precision)?;
    let batch = StepBatch::whole(inp, tgt, o.batch, o.seq_len);
    let mut secs = Vec::with_capacity(o.iters);
    for i in 0..o.warmup + o.iters {
        let t0 = Instant::now();
        let (loss, norm) = engine.step(batch, BENCH_ADAM.lr, Some(BENCH_CLIP))?;
        let dt = t0.elapsed().as_secs_f64();
        check_step(loss, norm)?;
        progress(o, i, dt, loss);
        if i >= o.warmup {
            secs.push(dt);
        }
    }
    Ok((engine.device_name(), secs, engine.graph_stats()))
}

/// Checks that `dir` looks like a checkout of the reference (its package under `src/asa`).
pub fn check_reference_dir(dir: &Path) -> Result<()> {
    let pkg = dir.join("src").join("asa");
    for f in ["config.py", "asm_lm.py", "asa.py", "asm_block.py"] {
        if !pkg.join(f).is_file() {
            return Err(AsaError::Input(format!(
                "--reference {}: not a checkout of github.com/digitaldaimyo/ASA (no src/asa/{f})",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The arguments passed to the reference script (after `python -`).
pub fn reference_args(
    reference: &Path,
    cfg: &ModelConfig,
    o: &BenchOptions,
    threads: usize,
) -> Result<Vec<String>> {
    let cfg_json = serde_json::to_string(cfg)
        .map_err(|e| AsaError::Other(format!("bench: cannot serialise the config: {e}")))?;
    let dtype = if o.place.is_cuda() && o.precision == Precision::Bf16 {
        "bf16"
    } else {
        "f32"
    };
    let variant = format!("{:?}", cfg.variant).to_lowercase();
    Ok(vec![
        "--ref".into(),
        reference.display().to_string(),
        "--config-json".into(),
        cfg_json,
        "--variant".into(),
        variant,
        "--batch".into(),
        o.batch.to_string(),
        "--seq-len".into(),
        o.seq_len.to_string(),
        "--device".into(),
        if o.place.is_cuda() { "cuda" } else { "cpu" }.into(),
        "--dtype".into(),
        dtype.into(),
        "--warmup".into(),
        o.warmup.to_string(),
        "--iters".into(),
        o.iters.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--seed".into(),
        cfg.seed.to_string(),
    ])
}

/// `python - ARGS` with the thread count in the BLAS/OpenMP environment (the script is fed on
/// stdin).
fn reference_command(python: &str, args: &[String], threads: usize) -> Command {
    let mut c = Command::new(python);
    c.arg("-")
        .args(args)
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Runs the embedded reference script with `o.python` and parses its JSON line.
fn run_reference(
    reference: &Path,
    cfg: &ModelConfig,
    o: &BenchOptions,
    threads: usize,
) -> Result<RefResult> {
    let args = reference_args(reference, cfg, o, threads)?;
    let mut child = reference_command(&o.python, &args, threads)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            AsaError::Other(format!(
                "bench: cannot run '{}' for the reference ({e}); pass --python PATH to a Python with PyTorch",
                o.python
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // a failed write shows up as the script's own failure below
        let _ = stdin.write_all(REFERENCE_SCRIPT.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| AsaError::Other(format!("bench: waiting for the reference run: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim()
            .trim_start_matches("reference_bench: ");
        return Err(AsaError::Other(format!(
            "bench: the reference run failed ({}, {}): {why}",
            o.python, out.status
        )));
    }
    parse_reference_output(&stdout)
}

/// Parses the reference script's output: its last line that is a JSON object.
pub fn parse_reference_output(stdout: &str) -> Result<RefResult> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            AsaError::Other("bench: the reference run printed no JSON result line".into())
        })?;
    let r: RefResult = serde_json::from_str(line).map_err(|e| {
        AsaError::Other(format!(
            "bench: cannot parse the reference result ({e}): {line}"
        ))
    })?;
    if !(r.tokens_per_sec.is_finite() && r.tokens_per_sec > 0.0) || r.step_seconds.is_empty() {
        return Err(AsaError::Other(format!(
            "bench: the reference result holds no valid timing: {line}"
        )));
    }
    Ok(r)
}

// ---- scaling: `asa bench --seq-lens` ----------------------------------------------------------
//
// One row per sequence length T. Every measurement runs in a child process of its own (ours: this
// binary's single-T bench, re-invoked with `--seq-len T`; the reference: one Python per variant),
// so that the peak resident memory the kernel reports for the child (`wait4`'s `ru_maxrss`) is
// that T's and that side's alone: a process's peak never goes down, so one process timing all
// lengths would report the largest T's peak for every row. The launcher itself builds no model
// and stays at a few MiB (the kernel counts the launcher's peak into the child's at `exec`).

/// Longest T `--seq-lens` accepts (a single T past this is hours per step on any CPU).
pub const MAX_SCALING_SEQ_LEN: usize = 1 << 24;
/// Most lengths in one `--seq-lens` list.
pub const MAX_SCALING_LENS: usize = 64;

/// Parses `--seq-lens`: a comma-separated list of T >= 1 (`1024` or `1K` = 1024), none twice.
pub fn parse_seq_lens(s: &str) -> Result<Vec<usize>> {
    let bad = |why: String| AsaError::Input(format!("--seq-lens '{s}': {why}"));
    let mut out = Vec::new();
    for item in s.split(',') {
        let w = item.trim();
        if w.is_empty() {
            return Err(bad(
                "empty entry (expected a list like 1024,4096 or 1K,4K)".into()
            ));
        }
        let (digits, mult) = match w.strip_suffix(['k', 'K']) {
            Some(d) => (d, 1024usize),
            None => (w, 1usize),
        };
        let n = digits
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(|| {
                bad(format!(
                    "'{w}' is not a sequence length (a whole number, e.g. 4096 or 4K)"
                ))
            })?;
        if n == 0 {
            return Err(bad("a sequence length must be >= 1".into()));
        }
        if n > MAX_SCALING_SEQ_LEN {
            return Err(bad(format!(
                "{n} is over the limit of {MAX_SCALING_SEQ_LEN}"
            )));
        }
        if out.contains(&n) {
            return Err(bad(format!("{n} is listed twice")));
        }
        out.push(n);
    }
    if out.len() > MAX_SCALING_LENS {
        return Err(bad(format!(
            "at most {MAX_SCALING_LENS} lengths, got {}",
            out.len()
        )));
    }
    Ok(out)
}

/// Parses `--reference-variants`: a comma-separated list of `online` and `baseline`, none twice.
pub fn parse_reference_variants(s: &str) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    for item in s.split(',') {
        let v = match item.trim().to_ascii_lowercase().as_str() {
            "online" => Variant::Online,
            "baseline" => Variant::Baseline,
            other => {
                return Err(AsaError::Input(format!(
                    "--reference-variants '{s}': '{other}' is not a variant the scaling bench times (online, baseline)"
                )))
            }
        };
        if out.contains(&v) {
            return Err(AsaError::Input(format!(
                "--reference-variants '{s}': {} is listed twice",
                variant_name(v)
            )));
        }
        out.push(v);
    }
    Ok(out)
}

fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Baseline => "baseline",
        Variant::Online => "online",
        Variant::Intervene => "intervene",
    }
}

/// Warmup and timed steps at length `t` when the user gave none: the single-T defaults (2 and
/// 5) up to 4096 tokens per row, then 1 warmup and 3 timed steps up to 16384, then 1 and 2 (one
/// reference step at 64K takes minutes on two cores).
pub fn scaling_steps(t: usize) -> (usize, usize) {
    if t <= 4096 {
        (2, 5)
    } else if t <= 16384 {
        (1, 3)
    } else {
        (1, 2)
    }
}

/// A scaling run: `bench` holds the config, batch, device, reference and threads (its
/// `seq_len`, `warmup` and `iters` are not used).
#[derive(Debug, Clone)]
pub struct ScalingOptions {
    pub bench: BenchOptions,
    pub seq_lens: Vec<usize>,
    /// reference variants to time at each T (with `bench.reference`)
    pub variants: Vec<Variant>,
    /// the user's `--warmup` / `--iters`; None: `scaling_steps(T)`
    pub warmup: Option<usize>,
    pub iters: Option<usize>,
    /// the program and arguments that run our single-T bench of this config
    /// (`asa bench --config X --device D ...`); `--seq-len T --warmup W --iters I --threads N
    /// --json FILE` are appended
    pub child: (PathBuf, Vec<String>),
}

/// One side's measurement at one T: tokens/s and peak RSS, or why it failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SideRun {
    pub tokens_per_sec: Option<f64>,
    pub step_seconds: Vec<f64>,
    /// peak resident memory of the side's process (`wait4`'s `ru_maxrss`)
    pub peak_rss_bytes: Option<u64>,
    /// "failed: ..." reason (the child's last error line, or its exit status)
    pub error: Option<String>,
}

/// One row of the scaling table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingRow {
    pub seq_len: usize,
    pub warmup: usize,
    pub iters: usize,
    pub asa: SideRun,
    /// None: not asked for (no `--reference`, or not in `--reference-variants`)
    pub reference_online: Option<SideRun>,
    pub reference_baseline: Option<SideRun>,
    /// ours / the reference's online variant, tokens per second
    pub ratio_online: Option<f64>,
    pub ratio_baseline: Option<f64>,
    /// our tokens/s over our tokens/s at the first T
    pub asa_vs_first: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingReport {
    pub config_name: String,
    /// ours at the first T that ran, as its child reported it (e.g. "cpu (2 threads)")
    pub device: Option<String>,
    pub batch: usize,
    pub threads: usize,
    pub torch_version: Option<String>,
    pub rows: Vec<ScalingRow>,
}

/// How a child ended, its output, and its peak RSS.
struct Measured {
    /// None: exit status 0; else e.g. "exit status 1", "killed by signal 9 (SIGKILL: ...)"
    failure: Option<String>,
    stdout: String,
    /// the last stderr line that says "error", else the last non-empty one
    last_err: String,
    peak_rss_bytes: Option<u64>,
}

/// Runs `cmd` to its end with `stdin` fed to it, stdout captured and stderr captured (and
/// copied to ours line by line when `relay`, so that its progress shows), then reaps it with
/// `wait4` for its peak RSS.
fn run_measured(cmd: &mut Command, stdin: Option<&[u8]>, relay: bool) -> std::io::Result<Measured> {
    use std::io::{BufRead, Read};
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        // a child that exits before reading all of it shows up as its own failure below
        let _ = w.write_all(data);
    }
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut last = String::new();
    let mut last_error = String::new();
    if let Some(err) = child.stderr.take() {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if relay {
                eprintln!("  {line}");
            }
            let t = line.trim();
            if !t.is_empty() {
                last = t.to_string();
                if t.to_ascii_lowercase().contains("error") {
                    last_error = t.to_string();
                }
            }
        }
    }
    let (failure, peak_rss_bytes) = reap(&mut child)?;
    let stdout = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    Ok(Measured {
        failure,
        stdout,
        last_err: if last_error.is_empty() {
            last
        } else {
            last_error
        },
        peak_rss_bytes,
    })
}

/// Waits for the child with `wait4`, which also returns its resource usage: (failure, peak RSS).
#[cfg(unix)]
fn reap(child: &mut std::process::Child) -> std::io::Result<(Option<String>, Option<u64>)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: plain syscall on our own child's pid, with pointers to locals.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // Linux reports KiB, macOS bytes
    let unit: u64 = if cfg!(target_os = "macos") { 1 } else { 1024 };
    let rss = (ru.ru_maxrss > 0).then(|| ru.ru_maxrss as u64 * unit);
    let failure = if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => None,
            c => Some(format!("exit status {c}")),
        }
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        Some(if sig == libc::SIGKILL {
            "killed by signal 9 (SIGKILL; out of memory?)".to_string()
        } else {
            format!("killed by signal {sig}")
        })
    } else {
        Some(format!("ended with wait status {status}"))
    };
    Ok((failure, rss))
}

#[cfg(not(unix))]
fn reap(child: &mut std::process::Child) -> std::io::Result<(Option<String>, Option<u64>)> {
    let st = child.wait()?;
    Ok(((!st.success()).then(|| st.to_string()), None))
}

/// The failure text of a child: its error line, else its exit status.
fn failure_text(m: &Measured, exit: &str) -> String {
    let line = m
        .last_err
        .trim_start_matches("reference_bench: ")
        .trim_start_matches("error: ");
    if exit.starts_with("killed") || line.is_empty() {
        exit.to_string()
    } else {
        line.to_string()
    }
}

/// Our single-T bench at `t` in a child process.
fn scaling_ours(
    o: &ScalingOptions,
    t: usize,
    warmup: usize,
    iters: usize,
    threads: usize,
) -> (SideRun, Option<String>) {
    let tmp = std::env::temp_dir().join(format!("asa-bench-{}-{t}.json", std::process::id()));
    let mut cmd = Command::new(&o.child.0);
    cmd.args(&o.child.1)
        .args(["--seq-len", &t.to_string()])
        .args(["--warmup", &warmup.to_string()])
        .args(["--iters", &iters.to_string()])
        .args(["--threads", &threads.to_string()])
        .arg("--json")
        .arg(&tmp);
    let mut run = SideRun::default();
    let mut device = None;
    match run_measured(&mut cmd, None, o.bench.progress) {
        Err(e) => run.error = Some(format!("cannot run {}: {e}", o.child.0.display())),
        Ok(m) => {
            run.peak_rss_bytes = m.peak_rss_bytes;
            if let Some(exit) = &m.failure {
                run.error = Some(failure_text(&m, exit));
            } else {
                let rep = std::fs::read_to_string(&tmp)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        serde_json::from_str::<BenchReport>(&s).map_err(|e| e.to_string())
                    });
                match rep {
                    Ok(r) => {
                        run.tokens_per_sec = Some(r.tokens_per_sec);
                        run.step_seconds = r.step_seconds;
                        device = Some(r.device);
                    }
                    Err(e) => run.error = Some(format!("no report from the child ({e})")),
                }
            }
        }
    }
    let _ = std::fs::remove_file(&tmp);
    (run, device)
}

/// The reference's `variant` at `t` in a Python child; (run, torch version).
fn scaling_reference(
    o: &ScalingOptions,
    reference: &Path,
    cfg: &ModelConfig,
    variant: Variant,
    t: usize,
    warmup: usize,
    iters: usize,
    threads: usize,
) -> (SideRun, Option<String>) {
    let mut cfg = cfg.clone();
    cfg.variant = variant;
    let bo = BenchOptions {
        seq_len: t,
        warmup,
        iters,
        ..o.bench.clone()
    };
    let mut run = SideRun::default();
    let mut args = match reference_args(reference, &cfg, &bo, threads) {
        Ok(a) => a,
        Err(e) => {
            run.error = Some(e.to_string());
            return (run, None);
        }
    };
    if o.bench.progress {
        args.push("--progress".into());
    }
    let mut cmd = reference_command(&o.bench.python, &args, threads);
    match run_measured(
        &mut cmd,
        Some(REFERENCE_SCRIPT.as_bytes()),
        o.bench.progress,
    ) {
        Err(e) => {
            run.error = Some(format!(
                "cannot run '{}' ({e}); pass --python PATH to a Python with PyTorch",
                o.bench.python
            ));
            (run, None)
        }
        Ok(m) => {
            run.peak_rss_bytes = m.peak_rss_bytes;
            if let Some(exit) = &m.failure {
                run.error = Some(failure_text(&m, exit));
                return (run, None);
            }
            match parse_reference_output(&m.stdout) {
                Ok(r) => {
                    run.tokens_per_sec = Some(r.tokens_per_sec);
                    run.step_seconds = r.step_seconds;
                    (run, Some(r.torch_version))
                }
                Err(e) => {
                    run.error = Some(e.to_string().trim_start_matches("bench: ").to_string());
                    (run, None)
                }
            }
        }
    }
}

/// Runs the scaling benchmark: for each T, ours, then each asked reference variant, each in its
/// own child process. A side that fails at some T is a "failed: ..." cell, not the end of the
/// run; only inputs that would fail every row (bad flags, config, reference folder) are errors.
pub fn run_scaling(o: &ScalingOptions) -> Result<ScalingReport> {
    if o.seq_lens.is_empty() {
        return Err(AsaError::Input(
            "--seq-lens: no sequence length given".into(),
        ));
    }
    if o.iters == Some(0) {
        return Err(AsaError::Input(
            "bench: --iters must be >= 1 (the timed steps), got 0".into(),
        ));
    }
    for (flag, v) in [("--warmup", o.warmup), ("--iters", o.iters)] {
        if let Some(v) = v.filter(|&v| v > MAX_BENCH_STEPS) {
            return Err(AsaError::Input(format!(
                "bench: {flag} must be at most {MAX_BENCH_STEPS}, got {v}"
            )));
        }
    }
    let b = &o.bench;
    if b.batch == 0 {
        return Err(AsaError::Input(
            "bench: the batch must be >= 1, got 0".into(),
        ));
    }
    match b.threads {
        Some(0) => {
            return Err(AsaError::Input(
                "bench: --threads must be >= 1, got 0".into(),
            ))
        }
        Some(n) if n > MAX_BENCH_THREADS => {
            return Err(AsaError::Input(format!(
                "bench: --threads must be at most {MAX_BENCH_THREADS}, got {n}"
            )))
        }
        _ => {}
    }
    if let Some(r) = &b.reference {
        check_reference_dir(r)?;
        if o.variants.is_empty() {
            return Err(AsaError::Input(
                "--reference-variants: no variant given (online, baseline)".into(),
            ));
        }
    }
    // the config as both sides run it; at each T its max_seq_len is T (learned positions
    // have max_seq_len rows, so the model follows T)
    let mut cfg = bench_config(&b.model);
    cfg.max_seq_len = *o.seq_lens.iter().max().unwrap();
    cfg.validate()?;
    // the same count on both sides; ours gets it as --threads
    let threads = b
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    let mut rows: Vec<ScalingRow> = Vec::new();
    let mut torch_version = None;
    let mut device = None;
    let n = o.seq_lens.len();
    for (i, &t) in o.seq_lens.iter().enumerate() {
        let (dw, di) = scaling_steps(t);
        let (warmup, iters) = (o.warmup.unwrap_or(dw), o.iters.unwrap_or(di));
        if b.progress {
            eprintln!(
                "bench: T={t} ({}/{n}): asa, {warmup} warmup + {iters} timed steps",
                i + 1
            );
        }
        let (asa, dev) = scaling_ours(o, t, warmup, iters, threads);
        if device.is_none() {
            device = dev;
        }
        let mut refs: [Option<SideRun>; 2] = [None, None];
        if let Some(r) = &b.reference {
            let mut c = cfg.clone();
            c.max_seq_len = t;
            for &v in &o.variants {
                if b.progress {
                    eprintln!(
                        "bench: T={t} ({}/{n}): reference {}, {warmup} warmup + {iters} timed steps",
                        i + 1,
                        variant_name(v)
                    );
                }
                let (run, tv) = scaling_reference(o, r, &c, v, t, warmup, iters, threads);
                if torch_version.is_none() {
                    torch_version = tv;
                }
                refs[usize::from(v == Variant::Baseline)] = Some(run);
            }
        }
        let ratio = |r: &Option<SideRun>| match (
            asa.tokens_per_sec,
            r.as_ref().and_then(|r| r.tokens_per_sec),
        ) {
            (Some(a), Some(x)) => Some(a / x),
            _ => None,
        };
        let first = rows.first().and_then(|r| r.asa.tokens_per_sec);
        let asa_vs_first = match (i, first, asa.tokens_per_sec) {
            (0, _, Some(_)) => Some(1.0),
            (_, Some(f), Some(a)) => Some(a / f),
            _ => None,
        };
        let [online, baseline] = refs;
        rows.push(ScalingRow {
            seq_len: t,
            warmup,
            iters,
            ratio_online: ratio(&online),
            ratio_baseline: ratio(&baseline),
            asa,
            reference_online: online,
            reference_baseline: baseline,
            asa_vs_first,
        });
    }
    Ok(ScalingReport {
        config_name: b.config_name.clone(),
        device,
        batch: b.batch,
        threads,
        torch_version,
        rows,
    })
}

/// A table cell of tokens/s: the number, "failed: why" (shortened; the JSON has all of it)
/// or "-" when not asked for.
fn tok_cell(r: Option<&SideRun>) -> String {
    match r {
        None => "-".into(),
        Some(SideRun {
            tokens_per_sec: Some(x),
            ..
        }) => format!("{x:.0}"),
        Some(r) => {
            let why = r.error.as_deref().unwrap_or("no result");
            let short: String = why.chars().take(100).collect();
            let dots = if short.len() < why.len() { "..." } else { "" };
            format!("failed: {}{dots}", short.replace('|', "/"))
        }
    }
}

fn rss_cell(r: Option<&SideRun>) -> String {
    match r.and_then(|r| r.peak_rss_bytes) {
        Some(b) => crate::preflight::human(b),
        None if r.is_none() => "-".into(),
        None => "?".into(),
    }
}

fn x_cell(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

/// The scaling table in Markdown, one row per T.
pub fn scaling_table(rep: &ScalingReport) -> String {
    let first = rep.rows.first().map_or(0, |r| r.seq_len);
    let mut s = format!(
        "| T | asa tok/s | reference online tok/s | reference baseline tok/s | asa / online | asa peak RSS | reference online peak RSS | reference baseline peak RSS | asa tok/s vs T={first} |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for r in &rep.rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.seq_len,
            tok_cell(Some(&r.asa)),
            tok_cell(r.reference_online.as_ref()),
            tok_cell(r.reference_baseline.as_ref()),
            x_cell(r.ratio_online),
            rss_cell(Some(&r.asa)),
            rss_cell(r.reference_online.as_ref()),
            rss_cell(r.reference_baseline.as_ref()),
            x_cell(r.asa_vs_first),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for p in BenchPreset::ALL {
            assert_eq!(p.name().parse::<BenchPreset>().unwrap(), p);
            let (cfg, b, t) = p.config();
            cfg.validate().unwrap();
            assert_eq!(cfg.max_seq_len, t);
            assert!(b > 0);
            assert_eq!(cfg.dropout, 0.0);
        }
        assert_eq!(
            "Practice_Run".parse::<BenchPreset>().unwrap(),
            BenchPreset::PracticeRun
        );
        let e = "gpu-big".parse::<BenchPreset>().unwrap_err().to_string();
        assert!(e.contains("cpu-small"), "{e}");

        let (c, b, t) = BenchPreset::CpuSmall.config();
        assert_eq!(
            (
                c.vocab_size,
                c.embed_dim,
                c.num_layers,
                c.num_heads,
                c.num_slots
            ),
            (50257, 256, 4, 4, 16)
        );
        assert_eq!(
            (c.slotspace_dim, c.write_chunk_size, c.slotspace_chunk_size),
            (32, 128, 128)
        );
        assert_eq!((b, t), (4, 256));
        let (c, b, t) = BenchPreset::PracticeRun.config();
        assert_eq!(
            (
                c.vocab_size,
                c.embed_dim,
                c.num_layers,
                c.num_heads,
                c.num_slots
            ),
            (50257, 768, 27, 8, 16)
        );
        assert_eq!(
            (c.slotspace_dim, c.write_chunk_size, c.slotspace_chunk_size),
            (64, 512, 512)
        );
        assert_eq!((b, t), (8, 1024));
        assert_eq!(BenchPreset::PracticeRun.precision(), Precision::Bf16);
    }

    #[test]
    fn cpu_asa_preset_is_issue_16s_config() {
        let (c, b, t) = BenchPreset::CpuAsa.config();
        assert_eq!(
            (
                c.vocab_size,
                c.embed_dim,
                c.num_layers,
                c.num_heads,
                c.num_slots
            ),
            (512, 256, 2, 4, 16)
        );
        assert_eq!(
            (c.slotspace_dim, c.write_chunk_size, c.slotspace_chunk_size),
            (32, 128, 128)
        );
        assert_eq!((b, t, c.max_seq_len), (1, 1024, 1024));
        assert_eq!(BenchPreset::CpuAsa.precision(), Precision::F32);
        assert_eq!(
            "cpu-asa".parse::<BenchPreset>().unwrap(),
            BenchPreset::CpuAsa
        );
    }

    #[test]
    fn seq_lens_and_variants_parse() {
        assert_eq!(
            parse_seq_lens("1024,4096,16384,65536").unwrap(),
            vec![1024, 4096, 16384, 65536]
        );
        assert_eq!(
            parse_seq_lens(" 1K, 4k ,16K,64K").unwrap(),
            vec![1024, 4096, 16384, 65536]
        );
        // the order given is kept (the last column is relative to the first T)
        assert_eq!(parse_seq_lens("4096,1024").unwrap(), vec![4096, 1024]);
        for bad in [
            "", "0", "1,,2", "x", "1K,1024", "2,2", "16777217", "1.5K", "K",
        ] {
            let e = parse_seq_lens(bad).unwrap_err().to_string();
            assert!(e.contains("--seq-lens"), "{bad}: {e}");
        }
        let many = (1..=65)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(parse_seq_lens(&many).is_err());
        assert_eq!(
            parse_reference_variants("online,baseline").unwrap(),
            vec![Variant::Online, Variant::Baseline]
        );
        assert_eq!(
            parse_reference_variants("Baseline").unwrap(),
            vec![Variant::Baseline]
        );
        for bad in ["", "intervene", "online,online", "online;baseline"] {
            assert!(parse_reference_variants(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scaling_steps_shrink_with_length() {
        assert_eq!(scaling_steps(1024), (2, 5));
        assert_eq!(scaling_steps(4096), (2, 5));
        assert_eq!(scaling_steps(16384), (1, 3));
        assert_eq!(scaling_steps(65536), (1, 2));
    }

    #[test]
    fn scaling_table_cells() {
        let ok = |tps: f64, rss: u64| SideRun {
            tokens_per_sec: Some(tps),
            step_seconds: vec![1.0],
            peak_rss_bytes: Some(rss),
            error: None,
        };
        let failed = SideRun {
            error: Some("out of memory | really".into()),
            peak_rss_bytes: Some(3 << 30),
            ..Default::default()
        };
        let rep = ScalingReport {
            config_name: "cpu-asa".into(),
            device: Some("cpu (2 threads)".into()),
            batch: 1,
            threads: 2,
            torch_version: Some("2.15.0".into()),
            rows: vec![
                ScalingRow {
                    seq_len: 1024,
                    warmup: 2,
                    iters: 5,
                    asa: ok(3000.0, 50 << 20),
                    reference_online: Some(ok(1000.0, 800 << 20)),
                    reference_baseline: None,
                    ratio_online: Some(3.0),
                    ratio_baseline: None,
                    asa_vs_first: Some(1.0),
                },
                ScalingRow {
                    seq_len: 65536,
                    warmup: 1,
                    iters: 2,
                    asa: ok(2700.0, 200 << 20),
                    reference_online: Some(failed),
                    reference_baseline: None,
                    ratio_online: None,
                    ratio_baseline: None,
                    asa_vs_first: Some(0.9),
                },
            ],
        };
        let t = scaling_table(&rep);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].ends_with("asa tok/s vs T=1024 |"), "{t}");
        assert_eq!(
            lines[2],
            "| 1024 | 3000 | 1000 | - | 3.00x | 50.0 MiB | 800.0 MiB | - | 1.00x |"
        );
        // a failure's text cannot break the table's columns
        assert_eq!(
            lines[3],
            "| 65536 | 2700 | failed: out of memory / really | - | - | 200.0 MiB | 3.0 GiB | - | 0.90x |"
        );
        for l in &lines {
            assert_eq!(l.matches('|').count(), 10, "{l}");
        }
    }

    #[test]
    fn parses_reference_line() {
        let out = "some warning\n{\"tokens_per_sec\": 1234.5, \"step_seconds\": [0.8, 0.83], \
                   \"torch_version\": \"2.5.1\", \"device\": \"cpu (2 threads)\", \"dtype\": \"f32\"}\n";
        let r = parse_reference_output(out).unwrap();
        assert_eq!(r.tokens_per_sec, 1234.5);
        assert_eq!(r.step_seconds, vec![0.8, 0.83]);
        assert_eq!(r.torch_version, "2.5.1");
        assert!(parse_reference_output("nothing\n").is_err());
        assert!(parse_reference_output("{\"tokens_per_sec\": 1}").is_err());
        assert!(parse_reference_output(
            "{\"tokens_per_sec\": 0, \"step_seconds\": [], \"torch_version\": \"x\", \"device\": \"cpu\"}"
        )
        .is_err());
    }

    #[test]
    fn reference_args_carry_the_run() {
        let mut o = BenchOptions::from_preset(BenchPreset::PracticeRun);
        o.place = Place::Cuda;
        let (cfg, _, _) = BenchPreset::PracticeRun.config();
        let a = reference_args(Path::new(".ref"), &cfg, &o, 16).unwrap();
        let val = |k: &str| a[a.iter().position(|x| x == k).unwrap() + 1].clone();
        assert_eq!(val("--ref"), ".ref");
        assert_eq!(val("--device"), "cuda");
        assert_eq!(val("--dtype"), "bf16");
        assert_eq!(val("--seq-len"), "1024");
        assert_eq!(val("--batch"), "8");
        assert_eq!(val("--threads"), "16");
        assert_eq!(val("--variant"), "baseline");
        let back: ModelConfig = serde_json::from_str(&val("--config-json")).unwrap();
        assert_eq!(back, cfg);
        o.place = Place::Cpu;
        let a = reference_args(Path::new(".ref"), &cfg, &o, 2).unwrap();
        assert!(a.windows(2).any(|w| w[0] == "--dtype" && w[1] == "f32"));
    }

    #[test]
    fn median_and_flops() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let (c, _, _) = BenchPreset::CpuSmall.config();
        // head: 3 * 2 * 256 * 50257; layers add about a fifth of that
        let f = train_flops_per_token(&c);
        let head = 6.0 * 256.0 * 50257.0;
        assert!(f > head && f < 1.5 * head, "{f}");
        assert_eq!(peak_bf16_flops("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(peak_bf16_flops("NVIDIA H200"), Some(989e12));
        assert_eq!(peak_bf16_flops("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(peak_bf16_flops("cpu"), None);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let o = BenchOptions {
            iters: 0,
            ..Default::default()
        };
        assert!(run_bench(&o).is_err());
        let o = BenchOptions {
            reference: Some(PathBuf::from("/nonexistent/asa-ref")),
            ..Default::default()
        };
        let e = run_bench(&o).unwrap_err().to_string();
        assert!(e.contains("not a checkout"), "{e}");
    }

    #[test]
    fn random_batch_is_shifted() {
        let (inp, tgt) = random_batch(100, 2, 5, 7);
        assert_eq!(inp.len(), 10);
        assert_eq!(tgt.len(), 10);
        for r in 0..2 {
            for j in 0..4 {
                assert_eq!(inp[r * 5 + j + 1] as i64, tgt[r * 5 + j]);
            }
        }
        assert!(inp.iter().all(|&x| x < 100));
    }
}
