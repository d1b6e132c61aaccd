//! `asa kernel-cost`: what one GPU training step costs, judged without a GPU (issue 11).
//!
//! Two sources, both static:
//! - the real step orchestration (`GpuLm::train_step`) run on a device that executes nothing
//!   ([`CountingDevice`]): per kernel its launches, blocks and block shape; per step the
//!   launches, cuBLAS calls and their FLOPs, host synchronisations, device allocations,
//!   memsets, copies and bytes converted to bf16. The first step (which grows the workspaces)
//!   and a steady-state step are counted apart.
//! - `ptxas -v` on the NVRTC output of every kernel file for the architecture: registers,
//!   spill bytes and static shared memory, and from them the occupancy at the launch shape the
//!   step used (`cost::occupancy`). Without NVRTC or `ptxas` those columns are empty and the
//!   report says why.
//!
//! - `nvdisasm` on the same cubins: each kernel's static SASS instruction mix.
//!
//! From both, a roofline prediction of each kernel's, each GEMM shape's and the step's time on
//! an H100 SXM (or an H200): [`roofline`] says how.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::cuda::cost::{
    self, CountingDevice, SassMix, SmLimits, StepCounts, H100_SMS, SM90,
};
use crate::backend::cuda::doctor::{find_nvdisasm, find_ptxas, ptxas_report, KernelResources};
use crate::backend::cuda::roofline::{self, GpuPeaks, KernelStatic, Overheads, Prediction};
use crate::backend::cuda::{self as cuda, GpuLm, KERNELS};
use crate::bench::{self, BenchOptions, BENCH_ADAM, BENCH_CLIP};
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;

/// One kernel of the report (or one GEMM shape: `cublas_gemm OPS MxNxK`, family `gemm`, its
/// output tiles as blocks).
#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    pub name: String,
    pub family: &'static str,
    pub launches_per_step: u64,
    pub blocks_per_launch: f64,
    pub threads_per_block: u32,
    pub dyn_smem_bytes: u32,
    /// bytes of the device ranges a launch names (the roofline's memory term)
    pub bytes_per_launch: f64,
    /// dependent iterations a block walks ([`crate::backend::cuda::Device::walk_launch`])
    pub serial_steps: u64,
    /// the roofline's time for all of this step's launches, and the bound that set it
    pub predicted_ms_per_step: f64,
    pub bound: &'static str,
    /// from `ptxas -v` (None without NVRTC/ptxas)
    pub registers: Option<u32>,
    pub spill_bytes: Option<u32>,
    /// static + dynamic shared memory per block
    pub smem_bytes: Option<u32>,
    /// active warps over the SM's warps at this launch shape
    pub occupancy: Option<f64>,
    /// static SASS instruction counts (None without nvdisasm)
    pub sass: Option<SassMix>,
    /// `sass.tensor_core` and `sass.fp64`, as the JSON names them
    pub tensor_core_instructions: Option<u32>,
    pub fp64_instructions: Option<u32>,
}

/// The counts of one step, with its launches (kernels + cuBLAS) and kernel launches, and the
/// roofline's time for it: by family, the overheads outside kernels, and in all.
#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    pub launches: u64,
    pub kernel_launches: u64,
    #[serde(flatten)]
    pub counts: StepCounts,
    pub predicted_ms: f64,
    pub predicted_ms_by_family: BTreeMap<&'static str, f64>,
    pub overheads: Overheads,
}

impl StepRow {
    fn new(c: &StepCounts, rows: &[KernelRow], over: Overheads) -> Self {
        let mut fam = BTreeMap::new();
        for r in rows {
            *fam.entry(r.family).or_insert(0.0) += r.predicted_ms_per_step;
        }
        StepRow {
            launches: c.launches(),
            kernel_launches: c.launches() - c.gemms,
            counts: c.clone(),
            predicted_ms: fam.values().sum::<f64>() + over.total_ms(),
            predicted_ms_by_family: fam,
            overheads: over,
        }
    }
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct KernelCostReport {
    pub config: String,
    pub batch: usize,
    pub seq_len: usize,
    pub precision: String,
    pub arch: String,
    pub sm_count: usize,
    /// the GPU of the predicted times, and its peaks
    pub gpu: GpuPeaks,
    /// where the resource columns come from, or why they are empty
    pub resources: String,
    /// where the SASS columns come from, or why they are empty
    pub sass: String,
    /// steady state (the second step), longest predicted first
    pub kernels: Vec<KernelRow>,
    pub step: StepRow,
    /// the first step, which also grows the workspaces
    pub first_step: StepRow,
    /// whether the steady step could be captured once as a CUDA graph and replayed
    pub replay: Replay,
}

/// Two steady steps compared request by request (launch shape and arguments, GEMMs, memsets,
/// copies, transfers' addresses): a CUDA graph captured from one step replays exactly its
/// requests with its arguments, so every request that differs in the next step (a scalar
/// computed on the host per step, a buffer that moved, a changed sequence) keeps the step
/// from being replayed as it is.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    /// the steady step's requests
    pub requests: usize,
    /// requests of the next step that differ at their position (all past the shorter
    /// sequence when the lengths differ)
    pub differing: usize,
    /// the differing requests by kernel (or request kind)
    pub differing_by_kernel: BTreeMap<String, usize>,
}

impl Replay {
    fn of(a: &StepCounts, b: &StepCounts) -> Replay {
        let mut by = BTreeMap::new();
        let n = a.calls.len().max(b.calls.len());
        for i in 0..n {
            let (x, y) = (a.calls.get(i), b.calls.get(i));
            if x != y {
                let name = x.or(y).and_then(|c| c.split(' ').next()).unwrap_or("?");
                *by.entry(name.to_string()).or_insert(0) += 1;
            }
        }
        Replay {
            requests: a.calls.len(),
            differing: by.values().sum(),
            differing_by_kernel: by,
        }
    }

    /// The table's cell: "yes", or what differs.
    fn summary(&self) -> String {
        if self.differing == 0 {
            return format!(
                "yes: the next step makes the same {} requests",
                self.requests
            );
        }
        let mut v: Vec<(&String, &usize)> = self.differing_by_kernel.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!(
            "no: {} of {} requests differ in the next step ({})",
            self.differing,
            self.requests,
            list.join(", ")
        )
    }
}

/// The architectures the occupancy limits are known for: (name, NVRTC target, limits).
fn arch_limits(arch: &str) -> Result<(&'static str, SmLimits)> {
    match arch {
        "sm_90" => Ok(("compute_90", SM90)),
        "sm_80" => Ok((
            "compute_80",
            SmLimits {
                smem: 164 * 1024,
                ..SM90
            },
        )),
        _ => Err(AsaError::Input(format!(
            "--arch '{arch}': expected sm_90 (H100, H200) or sm_80 (A100)"
        ))),
    }
}

/// What `ptxas -v` and `nvdisasm` say of every kernel for `arch` (one `ptxas` run per kernel
/// file): resources by kernel and where they come from (or why there are none), SASS mixes by
/// kernel and where they come from (or why there are none).
type StaticColumns = (
    BTreeMap<String, KernelResources>,
    String,
    BTreeMap<String, SassMix>,
    String,
);

fn static_columns(nvrtc_arch: &'static str, arch: &str) -> StaticColumns {
    let none = |why: String| {
        (
            BTreeMap::new(),
            why.clone(),
            BTreeMap::new(),
            format!("none ({why})"),
        )
    };
    if !cuda::nvrtc_present() {
        return none(format!(
            "no NVRTC (libnvrtc.so.13: set {} to a pip --target folder with nvidia-cuda-nvrtc==13.0.88)",
            cuda::PYPI_DIR_ENV
        ));
    }
    let Some(ptxas) = find_ptxas() else {
        return none(format!(
            "no ptxas (nvidia-cuda-nvcc==13.0.88 in {}, or on PATH)",
            cuda::PYPI_DIR_ENV
        ));
    };
    let nvd = find_nvdisasm();
    let (mut res, mut mixes) = (BTreeMap::new(), BTreeMap::new());
    for (stem, _) in KERNELS {
        let report = cuda::compile_ptx(stem, nvrtc_arch)
            .map_err(|e| e.to_string())
            .and_then(|ptx| ptxas_report(&ptxas, nvd.as_deref(), &ptx, arch, stem));
        match report {
            Ok((r, sass)) => {
                res.extend(r.into_iter().map(|k| (k.name.clone(), k)));
                mixes.extend(sass.map(|s| cost::sass_mix(&s)).unwrap_or_default());
            }
            Err(why) => return none(why),
        }
    }
    let sass_src = match nvd {
        Some(_) => format!("nvdisasm, {arch}, static counts"),
        None => format!(
            "no nvdisasm (pip install --no-deps --target ${} nvidia-cuda-nvdisasm==13.2.86)",
            cuda::PYPI_DIR_ENV
        ),
    };
    (res, format!("ptxas -v, {arch}"), mixes, sass_src)
}

/// Counts a first and a steady-state training step of `o`'s config on a [`CountingDevice`]
/// with an H100's multiprocessors, and joins the counts with the kernels' resources.
pub fn run(o: &BenchOptions, arch: &str, peaks: &GpuPeaks) -> Result<KernelCostReport> {
    let (nvrtc_arch, lim) = arch_limits(arch)?;
    if o.batch == 0 || o.seq_len == 0 {
        return Err(AsaError::Input(format!(
            "kernel-cost: the config's batch ({}) and sequence length ({}) must be >= 1",
            o.batch, o.seq_len
        )));
    }
    let mut cfg = o.model.clone();
    cfg.max_seq_len = cfg.max_seq_len.max(o.seq_len);
    cfg.validate()?;
    // the host copy of the weights is all this allocates (twice: ours and GpuLm's template)
    crate::preflight::check_run(&cfg, 1, 1, false, crate::config::Place::Cpu, None)?;
    let (_, params) = Lm::new(&cfg)?;
    let mut gpu = GpuLm::with_backend(CountingDevice::new(H100_SMS), &cfg, &params, o.precision)?;
    drop(params);
    let _ = gpu.backend().take(); // the upload of the weights is not a step's
                                  // a new batch each step (the replay check must not depend on the data), and a learning
                                  // rate that moves (as a schedule's)
    let mut k = 0;
    let mut step = || -> Result<StepCounts> {
        let (inp, tgt) = bench::random_batch(cfg.vocab_size, o.batch, o.seq_len, cfg.seed + k);
        k += 1;
        gpu.train_step(
            &inp,
            &tgt,
            o.batch,
            o.seq_len,
            o.batch,
            BENCH_ADAM.lr * (1.0 + 0.01 * k as f64),
            &BENCH_ADAM,
            Some(BENCH_CLIP),
            true,
        )?;
        Ok(gpu.backend().take())
    };
    let first = step()?;
    let steady = step()?;
    let next = step()?;
    let replay = Replay::of(&steady, &next);

    let (res, resources, mixes, sass_src) = static_columns(nvrtc_arch, arch);
    let bf16 = o.precision == cuda::Precision::Bf16;
    let rows = |c: &StepCounts| kernel_rows(c, &res, &mixes, lim, peaks, bf16);
    let (first_rows, mut kernels) = (rows(&first), rows(&steady));
    kernels.sort_by(|a, b| {
        b.predicted_ms_per_step
            .total_cmp(&a.predicted_ms_per_step)
            .then(a.name.cmp(&b.name))
    });
    Ok(KernelCostReport {
        config: o.config_name.clone(),
        batch: o.batch,
        seq_len: o.seq_len,
        precision: format!("{:?}", o.precision).to_lowercase(),
        arch: arch.into(),
        sm_count: H100_SMS,
        gpu: *peaks,
        resources,
        sass: sass_src,
        step: StepRow::new(&steady, &kernels, Overheads::of(peaks, &steady)),
        first_step: StepRow::new(&first, &first_rows, Overheads::of(peaks, &first)),
        kernels,
        replay,
    })
}

/// The rows of one counted step: its kernels with their resources, SASS and predicted time,
/// then one row per GEMM shape.
fn kernel_rows(
    c: &StepCounts,
    res: &BTreeMap<String, KernelResources>,
    mixes: &BTreeMap<String, SassMix>,
    lim: SmLimits,
    gpu: &GpuPeaks,
    bf16: bool,
) -> Vec<KernelRow> {
    let mut rows: Vec<KernelRow> = c
        .kernels
        .iter()
        .map(|(name, k)| {
            let r = res.get(name);
            let mix = mixes.get(name);
            let smem = r.map(|r| r.smem_bytes + k.dyn_smem_bytes);
            let occupancy = r
                .map(|r| cost::occupancy(lim, r.registers, k.threads_per_block, smem.unwrap_or(0)));
            let st = match (mix, occupancy) {
                (Some(m), Some(occ)) => Some(KernelStatic {
                    instructions: m.total,
                    fp64: m.fp64,
                    occupancy: occ,
                }),
                _ => None,
            };
            let Prediction { ms, bound } = roofline::kernel(gpu, k, st);
            KernelRow {
                name: name.clone(),
                family: cost::kernel_family(name),
                launches_per_step: k.launches,
                blocks_per_launch: k.blocks as f64 / k.launches.max(1) as f64,
                threads_per_block: k.threads_per_block,
                dyn_smem_bytes: k.dyn_smem_bytes,
                bytes_per_launch: k.bytes as f64 / k.launches.max(1) as f64,
                serial_steps: k.steps,
                predicted_ms_per_step: ms,
                bound,
                registers: r.map(|r| r.registers),
                spill_bytes: r.map(|r| r.spill_stores + r.spill_loads),
                smem_bytes: smem,
                occupancy,
                sass: mix.cloned(),
                tensor_core_instructions: mix.map(|m| m.tensor_core),
                fp64_instructions: mix.map(|m| m.fp64),
            }
        })
        .collect();
    for (g, &calls) in &c.gemm_shapes {
        let Prediction { ms, bound } = roofline::gemm(gpu, g, calls, bf16);
        let tile = roofline::GEMM_TILE;
        rows.push(KernelRow {
            name: format!("cublas_gemm {} {}x{}x{}", g.ops, g.m, g.n, g.k),
            family: "gemm",
            launches_per_step: calls,
            blocks_per_launch: (g.m.div_ceil(tile) * g.n.div_ceil(tile)) as f64,
            threads_per_block: 0,
            dyn_smem_bytes: 0,
            bytes_per_launch: roofline::gemm_bytes(g, bf16),
            serial_steps: 1,
            predicted_ms_per_step: ms,
            bound,
            registers: None,
            spill_bytes: None,
            smem_bytes: None,
            occupancy: None,
            sass: None,
            tensor_core_instructions: None,
            fp64_instructions: None,
        });
    }
    rows
}

/// The report as Markdown: the kernels, then the step's counts (first and steady state).
pub fn table(rep: &KernelCostReport) -> String {
    let opt = |x: Option<u32>| x.map_or("-".to_string(), |v| v.to_string());
    let mut s = format!(
        "kernel-cost: {} (B={}, T={}, {}), one training step on {} with {} SMs; resources: {}; SASS: {}; predicted for an {}\n\n",
        rep.config, rep.batch, rep.seq_len, rep.precision, rep.arch, rep.sm_count, rep.resources, rep.sass, rep.gpu.name
    );
    s += "| kernel | family | predicted ms/step (bound) | launches/step | blocks/launch | threads | MB/launch | steps | registers | spill bytes | smem bytes | occupancy | SASS (mma / fp64 / fp32 / sfu / global / shared / local / bar) |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for k in &rep.kernels {
        let mix = k.sass.as_ref().map_or("-".to_string(), |m| {
            format!(
                "{} ({} / {} / {} / {} / {} / {} / {} / {})",
                m.total,
                m.tensor_core,
                m.fp64,
                m.fp32,
                m.sfu,
                m.global,
                m.shared,
                m.local,
                m.barriers
            )
        });
        s += &format!(
            "| {} | {} | {:.3} ({}) | {} | {:.0} | {} | {:.2} | {} | {} | {} | {} | {} | {mix} |\n",
            k.name,
            k.family,
            k.predicted_ms_per_step,
            k.bound,
            k.launches_per_step,
            k.blocks_per_launch,
            k.threads_per_block,
            k.bytes_per_launch / 1e6,
            k.serial_steps,
            opt(k.registers),
            opt(k.spill_bytes),
            opt(k.smem_bytes),
            k.occupancy
                .map_or("-".to_string(), |o| format!("{:.0}%", 100.0 * o)),
        );
    }
    s += "\n| per step | first step | steady state |\n| --- | --- | --- |\n";
    let (a, b) = (&rep.first_step, &rep.step);
    let rows: [(&str, String, String); 11] = [
        (
            "launches (kernels + cuBLAS)",
            a.launches.to_string(),
            b.launches.to_string(),
        ),
        (
            "cuBLAS GEMMs",
            a.counts.gemms.to_string(),
            b.counts.gemms.to_string(),
        ),
        (
            "GEMM GFLOP",
            format!("{:.1}", a.counts.gemm_flops / 1e9),
            format!("{:.1}", b.counts.gemm_flops / 1e9),
        ),
        (
            "host syncs (downloads / uploads / syncs); queued uploads",
            format!(
                "{} ({} / {} / {}); {}",
                a.counts.host_syncs,
                a.counts.downloads,
                a.counts.uploads,
                a.counts.syncs,
                a.counts.async_uploads
            ),
            format!(
                "{} ({} / {} / {}); {}",
                b.counts.host_syncs,
                b.counts.downloads,
                b.counts.uploads,
                b.counts.syncs,
                b.counts.async_uploads
            ),
        ),
        (
            "device allocations",
            a.counts.device_allocations.to_string(),
            b.counts.device_allocations.to_string(),
        ),
        (
            "allocated MiB",
            format!("{:.1}", a.counts.allocated_bytes as f64 / 1048576.0),
            format!("{:.1}", b.counts.allocated_bytes as f64 / 1048576.0),
        ),
        (
            "temporaries MiB (peak alive / cached footprint)",
            format!(
                "{:.1} / {:.1}",
                a.counts.temp_peak_bytes as f64 / 1048576.0,
                a.counts.temp_footprint_bytes as f64 / 1048576.0
            ),
            format!(
                "{:.1} / {:.1}",
                b.counts.temp_peak_bytes as f64 / 1048576.0,
                b.counts.temp_footprint_bytes as f64 / 1048576.0
            ),
        ),
        (
            "memsets",
            a.counts.memsets.to_string(),
            b.counts.memsets.to_string(),
        ),
        (
            "device copies",
            a.counts.copies.to_string(),
            b.counts.copies.to_string(),
        ),
        (
            "MB converted to bf16",
            format!("{:.1}", a.counts.bytes_converted as f64 / 1e6),
            format!("{:.1}", b.counts.bytes_converted as f64 / 1e6),
        ),
        (
            "spilling kernels",
            "-".into(),
            rep.kernels
                .iter()
                .filter(|k| k.spill_bytes.unwrap_or(0) > 0)
                .count()
                .to_string(),
        ),
    ];
    for (what, x, y) in rows {
        s += &format!("| {what} | {x} | {y} |\n");
    }
    s += &format!(
        "| replayable as a CUDA graph (same requests and arguments as the next step) | - | {} |\n",
        rep.replay.summary()
    );
    s += &format!(
        "\n| predicted on an {} (ms) | first step | steady state |\n| --- | --- | --- |\n",
        rep.gpu.name
    );
    let fams: std::collections::BTreeSet<&str> = a
        .predicted_ms_by_family
        .keys()
        .chain(b.predicted_ms_by_family.keys())
        .copied()
        .collect();
    let ms = |r: &StepRow, f: &str| r.predicted_ms_by_family.get(f).copied().unwrap_or(0.0);
    for f in fams {
        s += &format!("| {f} | {:.2} | {:.2} |\n", ms(a, f), ms(b, f));
    }
    let (oa, ob) = (&a.overheads, &b.overheads);
    for (what, x, y) in [
        ("memsets", oa.memsets_ms, ob.memsets_ms),
        ("device copies", oa.copies_ms, ob.copies_ms),
        ("device allocations", oa.allocations_ms, ob.allocations_ms),
        ("blocking host syncs", oa.host_syncs_ms, ob.host_syncs_ms),
    ] {
        s += &format!("| {what} | {x:.2} | {y:.2} |\n");
    }
    let tokens = (rep.batch * rep.seq_len) as f64;
    s += &format!(
        "| **step** | **{:.1}** | **{:.1}** |\n| tokens/s | {:.0} | {:.0} |\n| MFU (GEMM FLOPs / bf16 peak) | {:.1}% | {:.1}% |\n",
        a.predicted_ms,
        b.predicted_ms,
        tokens / (a.predicted_ms / 1e3),
        tokens / (b.predicted_ms / 1e3),
        100.0 * a.counts.gemm_flops / (a.predicted_ms / 1e3) / rep.gpu.bf16_tensor_flops,
        100.0 * b.counts.gemm_flops / (b.predicted_ms / 1e3) / rep.gpu.bf16_tensor_flops,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::kernel_names;
    use crate::bench::BenchPreset;

    /// A small config: every feature of the preset, a short sequence.
    fn small() -> BenchOptions {
        let mut o = BenchOptions::from_preset(BenchPreset::CpuAsa);
        o.seq_len = 48;
        o.model.max_seq_len = 48;
        o.model.write_chunk_size = 16;
        o.model.slotspace_chunk_size = 16;
        o.batch = 2;
        o
    }

    /// The counting device sees every GEMM of the step: their FLOPs are three times the
    /// forward's dense products (the input and the weight gradient of each in the backward),
    /// counted here from the config; and the steady state repeats exactly.
    #[test]
    fn a_counted_step_holds_every_gemm_and_repeats() {
        let o = small();
        let cfg = &o.model;
        let (_, params) = Lm::new(cfg).unwrap();
        let mut gpu =
            GpuLm::with_backend(CountingDevice::new(H100_SMS), cfg, &params, o.precision).unwrap();
        let (inp, tgt) = bench::random_batch(cfg.vocab_size, o.batch, o.seq_len, 1);
        let mut step = || {
            gpu.train_step(
                &inp,
                &tgt,
                o.batch,
                o.seq_len,
                o.batch,
                1e-3,
                &BENCH_ADAM,
                Some(1.0),
                true,
            )
            .unwrap();
            gpu.backend().take()
        };
        let first = step();
        let (s2, s3) = (step(), step());
        // the counts (the requests' arguments may hold per-step scalars: `replay_...` below)
        let counts = |s: &StepCounts| StepCounts {
            calls: Vec::new(),
            ..s.clone()
        };
        assert_eq!(counts(&s2), counts(&s3), "two steady-state steps differ");

        let (c, h, k, m) = (
            cfg.embed_dim as f64,
            cfg.num_heads as f64,
            cfg.num_slots as f64,
            cfg.slotspace_dim as f64,
        );
        let hid = cfg.hidden_dim() as f64;
        let per_layer = 2.0 * 4.0 * c * c // Wk_write, Wv_write, Wq_read, out_proj
            + 2.0 * 2.0 * c * hid // the MLP
            + h * 2.0 * (k * m + 3.0 * m * m + m * k); // slot_in, slot_q/k/v, slot_out per head
        let fwd = (o.batch * o.seq_len) as f64
            * (cfg.num_layers as f64 * per_layer + 2.0 * c * cfg.vocab_size as f64);
        let rel = (s2.gemm_flops - 3.0 * fwd).abs() / (3.0 * fwd);
        assert!(
            rel < 1e-12,
            "GEMM FLOPs {} vs 3 x forward {}",
            s2.gemm_flops,
            3.0 * fwd
        );
        // every launch names a kernel of the sources
        let known: std::collections::HashSet<String> = KERNELS
            .iter()
            .flat_map(|(_, src)| kernel_names(src))
            .collect();
        for name in s2.kernels.keys() {
            assert!(known.contains(name), "launch of an unknown kernel {name}");
        }
        assert!(s2.launches() > s2.gemms);
        // the batch goes up queued, and the step blocks once: its read-back at the end
        assert_eq!(
            (s2.host_syncs, s2.downloads, s2.async_uploads),
            (1, 1, 1),
            "{s2:?}"
        );
        // temporaries come from the cache after the first step, at little memory over the peak
        assert!(first.device_allocations > 0);
        assert_eq!(s2.device_allocations, 0, "a steady-state step allocates");
        assert!(
            s2.temp_footprint_bytes as f64 <= 1.25 * s2.temp_peak_bytes as f64,
            "cached {} bytes for a peak of {}",
            s2.temp_footprint_bytes,
            s2.temp_peak_bytes
        );
    }

    /// Two steady steps on different batches at different learning rates make the same
    /// requests in the same order with the same arguments (a CUDA graph captured from one
    /// replays the next): the temporaries' cache hands out the lowest free address of a size,
    /// the scratch buffers stay put, the batch's upload has one layout for every batch of a
    /// shape, and what the host computes per step (gamma, the refine gate, their gradient
    /// factors, AdamW's scalars) goes up in the step's scalar block instead of by argument.
    /// Mutation-checked: AdamW's scalars by argument, the ids unpadded, or a counting device
    /// whose scratch moves fail here (the cache's order:
    /// `the_temp_cache_hands_out_the_lowest_free_address`).
    #[test]
    fn replay_steady_steps_make_the_same_requests() {
        let mut o = small();
        o.precision = cuda::Precision::Bf16;
        let cfg = &o.model;
        let (_, params) = Lm::new(cfg).unwrap();
        let mut gpu =
            GpuLm::with_backend(CountingDevice::new(H100_SMS), cfg, &params, o.precision).unwrap();
        let mut step = |k: u64| {
            // batches with different numbers of distinct ids (5 + k of them)
            let (inp, tgt) = bench::random_batch(cfg.vocab_size, o.batch, o.seq_len, k);
            let inp: Vec<u32> = inp.iter().map(|&x| x % (5 + k as u32)).collect();
            let lr = 1e-3 * (1.0 + k as f64);
            gpu.train_step(
                &inp,
                &tgt,
                o.batch,
                o.seq_len,
                o.batch,
                lr,
                &BENCH_ADAM,
                Some(1.0),
                true,
            )
            .unwrap();
            gpu.backend().take()
        };
        let _first = step(1);
        let (s2, s3) = (step(2), step(3));
        let r = Replay::of(&s2, &s3);
        assert_eq!(r.requests, s2.calls.len());
        assert_eq!(r.differing, 0, "{}", r.summary());
        assert!(r.summary().starts_with("yes: "), "{}", r.summary());
        // what a difference looks like: the first words of the requests that differ
        let mut s4 = s3.clone();
        s4.calls[0] = "adamw_update changed".into();
        let r = Replay::of(&s2, &s4);
        assert_eq!(r.differing, 1);
        assert!(r.summary().starts_with("no: 1 of "), "{}", r.summary());
    }

    /// With bf16 GEMMs no weight is converted call by call, and no activation that a kernel of
    /// ours makes: the producers write bf16 twins. Without the twins (the A/B switch) each dense
    /// product's three GEMMs (forward, input gradient, weight gradient) convert three operands
    /// (its input in the forward and in the weight gradient, its output gradient): one per
    /// GEMM (an ASA layer's three projections and the refine's are one GEMM each); AdamW
    /// writes the weights' copy. With the twins (and the bench's dropouts of 0, the fused
    /// read) nothing converts but slot_out's output gradient where softmax weights make it
    /// (signed weights: the fused dot's `tanh_backward` writes its twin): 0 or 1 per layer.
    /// The read weights and the linear attention's output have their producers' twins;
    /// slot_in's output u and its gradient du, read by GEMMs only, come out of cuBLAS in bf16.
    #[test]
    fn bf16_gemms_read_weights_from_their_copy_and_activations_from_their_twins() {
        use crate::backend::cuda::Device;
        let mut o = small();
        o.precision = cuda::Precision::Bf16;
        let cfg = &o.model;
        assert!(cfg.use_slotspace_refine);
        let (_, params) = Lm::new(cfg).unwrap();
        let (inp, tgt) = bench::random_batch(cfg.vocab_size, o.batch, o.seq_len, 1);
        let (steps, layers) = (2, cfg.num_layers as u64);
        let count = |twins: bool| {
            let dev = CountingDevice::new(H100_SMS);
            dev.set_bf16_twins(twins);
            let mut gpu = GpuLm::with_backend(dev, cfg, &params, o.precision).unwrap();
            gpu.backend().take();
            for _ in 0..steps {
                gpu.train_step(
                    &inp,
                    &tgt,
                    o.batch,
                    o.seq_len,
                    o.batch,
                    1e-3,
                    &BENCH_ADAM,
                    Some(1.0),
                    true,
                )
                .unwrap();
            }
            gpu.backend().take()
        };
        let (off, on) = (count(false), count(true));
        assert_eq!(off.gemms, on.gemms);
        assert_eq!(off.gemms % 3, 0);
        let converts = |s: &StepCounts| s.kernels.get("convert_f32_bf16").map_or(0, |k| k.launches);
        assert_eq!(converts(&off), off.gemms, "{} GEMMs", off.gemms);
        let per_layer = if cfg.slotspace_signed_weights { 0 } else { 1 };
        assert_eq!(converts(&on), steps * per_layer * layers);
        assert!(on.bytes_converted < off.bytes_converted);
    }

    /// The report runs without NVRTC or a GPU and says where its resource columns come from.
    #[test]
    fn the_report_runs_without_a_gpu() {
        let rep = run(&small(), "sm_90", &roofline::H100_SXM).unwrap();
        assert!(!rep.kernels.is_empty());
        assert_eq!(
            rep.step.launches,
            rep.step.kernel_launches + rep.step.counts.gemms
        );
        let t = table(&rep);
        assert!(t.contains("| launches (kernels + cuBLAS) |"), "{t}");
        assert!(run(&small(), "sm_75", &roofline::H100_SXM).is_err());
        // with the CUDA wheels (as CI installs them) the resource and SASS columns are filled
        let tools = cuda::nvrtc_present() && find_ptxas().is_some() && find_nvdisasm().is_some();
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        if ci {
            assert!(
                tools,
                "CI: NVRTC, ptxas and nvdisasm must be installed ({})",
                rep.sass
            );
        }
        if tools {
            let scan = rep
                .kernels
                .iter()
                .find(|k| k.family == "slot_scan" && k.registers.is_some())
                .expect("a slot-scan kernel with resources");
            let mix = scan.sass.as_ref().expect("SASS of a slot-scan kernel");
            assert!(
                mix.total > 0 && scan.fp64_instructions == Some(mix.fp64),
                "{mix:?}"
            );
        } else {
            eprintln!("SKIPPED kernel-cost resource columns: {}", rep.resources);
        }
    }
}
