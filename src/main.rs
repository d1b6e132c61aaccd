//! The `asa` command line. Every failure is one line on stderr and exit code 1 (2 for usage
//! errors, from clap); no panics reach the user.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use asa::config::Place;
use asa::error::{AsaError, Result};
use asa::{checkpoint, parity};

#[derive(Parser)]
#[command(
    name = "asa",
    version,
    about = "Training and analysis toolkit for Addressed State Models (ASM)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
}

/// Options every run command takes.
#[derive(clap::Args, Clone, Debug)]
struct Common {
    /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Seed of initialisation, data sampling and dropout.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

/// Fine-tuning flags of `train-mini` and `train`.
#[derive(clap::Args, Debug)]
struct FinetuneFlags {
    /// Start a new run from this checkpoint's weights and model config (a run folder, best/, a
    /// .safetensors file or a reference .pt); model keys or flags given with it must agree.
    #[arg(long, conflicts_with = "resume")]
    init_from: Option<PathBuf>,
    /// Keep the parameters whose PyTorch names match these globs fixed, e.g. 'blocks.*.mlp.*'
    /// (no update, no weight decay, no optimizer state; listed at the start; added to a run
    /// config's `freeze`).
    #[arg(long, num_args = 1..)]
    freeze: Vec<String>,
    /// Train only the parameters whose names match these globs, e.g. '*.slot_*'
    /// '*_slotspace_gate_raw' (every other parameter is kept fixed; replaces a run config's
    /// `trainable`).
    #[arg(long, num_args = 1..)]
    trainable: Vec<String>,
}

/// Forward controls of `probe`, `infos`, `generate` and `eval` (the reference's forward keyword
/// arguments and the intervene variant's settings).
#[derive(clap::Args, Debug, Clone, Default)]
struct ForwardFlags {
    /// How each token reads the slots: softmax (the model's own), top1, or topk (see --routing-topk).
    #[arg(long)]
    routing_mode: Option<String>,
    /// Slots kept by --routing-mode topk (1 to num_slots) [default: 2].
    #[arg(long)]
    routing_topk: Option<usize>,
    /// Noise added to the read logits before routing: gumbel or gaussian (with --routing-noise-scale).
    #[arg(long)]
    routing_noise: Option<String>,
    /// Scale of the routing noise (> 0).
    #[arg(long)]
    routing_noise_scale: Option<f64>,
    /// Seed of the routing noise [default: the model config's seed].
    #[arg(long)]
    noise_seed: Option<u64>,
    /// Slots to mask, e.g. 0,3 (0-based; at least one slot must stay).
    #[arg(long, value_delimiter = ',')]
    slot_mask: Option<Vec<usize>>,
    /// Where the slot mask acts: read (the read weights), content_read_only or slotspace_only [default: read].
    #[arg(long)]
    slot_mask_where: Option<String>,
    /// When the slot mask acts: all (every position) or last_pos_only [default: all].
    #[arg(long)]
    slot_mask_scope: Option<String>,
    /// Run the checkpoint as this variant: baseline or intervene (they share their parameters).
    #[arg(long)]
    variant: Option<String>,
    /// The intervene variant's settings as JSON (the reference's attributes, e.g.
    /// '{"_intv_mode": "orth_gate", "_intv_beta": 0.5}') or a path to a JSON file holding them.
    #[arg(long)]
    intervention: Option<String>,
}

impl ForwardFlags {
    /// The controls, checked on their own (before any checkpoint loads).
    fn controls(&self) -> Result<asa::controls::ForwardControls> {
        let intervention = match &self.intervention {
            None => None,
            Some(s) => {
                let text = if std::path::Path::new(s).is_file() {
                    std::fs::read_to_string(s)
                        .map_err(|e| AsaError::io(std::path::Path::new(s), e))?
                } else {
                    s.clone()
                };
                Some(serde_json::from_str(&text).map_err(|e| {
                    AsaError::Input(format!(
                        "--intervention: neither a JSON object nor a readable JSON file ({e})"
                    ))
                })?)
            }
        };
        let c = asa::controls::ForwardControls {
            routing_mode: self.routing_mode.clone(),
            routing_topk: self.routing_topk,
            noise: self.routing_noise.clone(),
            noise_scale: self.routing_noise_scale,
            noise_seed: self.noise_seed,
            slot_mask: self.slot_mask.clone(),
            slot_mask_where: self.slot_mask_where.clone(),
            slot_mask_scope: self.slot_mask_scope.clone(),
            variant: self
                .variant
                .as_deref()
                .map(|v| {
                    v.parse().map_err(|e| {
                        AsaError::Input(format!("--variant: {}", asa::controls::plain(&e)))
                    })
                })
                .transpose()?,
            intervention,
        };
        c.check()?;
        Ok(c)
    }
}

/// A probe setting's error in the words of its flag.
fn probe_flag_message(m: &str) -> String {
    m.replace("probe window and num_pcs", "--window and --num-pcs")
        .replace("the basin grid", "--basin-grid")
        .replace("probe layers:", "--layers:")
        .replace("basin layer:", "--basin-layer:")
        .replace("basin intervene layers:", "--basin-intervene:")
        .replace("sphere layer:", "--sphere-layer:")
        .replace("unknown experiment", "--experiments: unknown experiment")
        .replace(
            "no experiment selected",
            "--experiments: no experiment selected",
        )
        .replace(
            "timescales need batch >= 1, seq_len >= 2, max_lag >= 1 and write_timepoints >= 1",
            "--timescale-batch must be >= 1, --timescale-len >= 2 and --max-lag >= 1",
        )
}

#[derive(Subcommand)]
enum Cmd {
    /// Tiny model, one forward and one optimizer step across the feature toggles; checks shapes
    /// and finiteness and writes smoke.json.
    Smoke {
        #[command(flatten)]
        common: Common,
        /// Folder for smoke.json (created if missing).
        #[arg(long, default_value = "runs/smoke")]
        outdir: PathBuf,
    },
    /// Train a small ASM on the embedded default data (or --data files); saves runs/<name>/.
    TrainMini {
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Seed of initialisation, data sampling and dropout [default: 1337].
        #[arg(long)]
        seed: Option<u64>,
        /// Parent folder of the run directory.
        #[arg(long, default_value = "runs")]
        outdir: PathBuf,
        /// Run name: the run is saved under OUTDIR/NAME (one folder name, no '/').
        #[arg(long, default_value = "mini")]
        name: String,
        /// Total optimizer steps [default: 500]; with --resume, a new total for the run
        /// (extends a finished run; the cosine schedule follows the new total from then on).
        #[arg(long)]
        steps: Option<usize>,
        /// Stop after this step, saving a checkpoint (continue later with --resume).
        #[arg(long)]
        stop_at: Option<usize>,
        /// Rows per optimizer step [default: 16].
        #[arg(long)]
        batch_size: Option<usize>,
        /// Tokens per training window [default: 32].
        #[arg(long)]
        seq_len: Option<usize>,
        /// Peak learning rate [default: 0.003].
        #[arg(long)]
        lr: Option<f64>,
        /// Evaluate and save every this many steps [default: 50].
        #[arg(long)]
        eval_interval: Option<usize>,
        /// Train on these UTF-8 text files instead of the embedded corpus.
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// gpt2 (embedded GPT-2 BPE), byte (256 byte ids, no files) or a tokenizer.json path
        /// [default: gpt2].
        #[arg(long)]
        tokenizer: Option<String>,
        /// Continue the run in OUTDIR/NAME from its last checkpoint. Flags given with it must
        /// match the run's (except --steps, --stop-at, --device, --precision).
        #[arg(long, conflicts_with = "force")]
        resume: bool,
        /// Delete the run already in OUTDIR/NAME (its checkpoints, metrics and best/) and start
        /// a new one.
        #[arg(long)]
        force: bool,
        /// Model width, divisible by --num-heads [default: 128].
        #[arg(long)]
        embed_dim: Option<usize>,
        /// Number of ASM blocks [default: 4].
        #[arg(long)]
        num_layers: Option<usize>,
        /// ASA heads per layer [default: 4].
        #[arg(long)]
        num_heads: Option<usize>,
        /// Addressed slots per head [default: 16].
        #[arg(long)]
        num_slots: Option<usize>,
        /// Share of generated fact sentences in the embedded default text [default: 0.6].
        #[arg(long)]
        fact_frac: Option<f64>,
        /// GEMM precision on the GPU: bf16 (bf16 inputs, f32 accumulation) or f32.
        #[arg(long, default_value = "bf16")]
        precision: asa::config::Precision,
        #[command(flatten)]
        ft: FinetuneFlags,
    },
    /// Tokenize text files into binary token shards (+ a validation shard) for `asa train`.
    Prepare {
        /// UTF-8 text files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder (train_NNN.bin, val.bin, meta.json).
        #[arg(long)]
        outdir: PathBuf,
        /// gpt2 (embedded GPT-2 BPE), byte, or a tokenizer.json path.
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// Share of the text held out for validation, in (0, 1).
        #[arg(long, default_value_t = 0.005)]
        val_frac: f64,
        /// Maximum tokens per training shard (>= 1).
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// Replace existing shards in OUTDIR.
        #[arg(long)]
        force: bool,
    },
    /// Train on prepared shards with a run config (TOML, or the reference's config as JSON).
    Train {
        /// Run config: reference ASMTrainConfig field names plus `data` (the prepared folder).
        #[arg(long)]
        config: PathBuf,
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Overrides the config's seed (new runs only).
        #[arg(long)]
        seed: Option<u64>,
        /// Continue the run from its last checkpoint, exactly. The config must match the run's
        /// (each changed field is named); see --total-steps to extend it.
        #[arg(long, conflicts_with = "force")]
        resume: bool,
        /// Delete the run already in the run folder (its checkpoints, metrics and best/) and
        /// start a new one.
        #[arg(long)]
        force: bool,
        /// With --resume: the run's new total step count, e.g. to continue a finished run (the
        /// cosine schedule follows the new total from then on).
        #[arg(long, requires = "resume")]
        total_steps: Option<usize>,
        /// Stop after this step, saving a checkpoint.
        #[arg(long)]
        stop_at: Option<usize>,
        #[command(flatten)]
        ft: FinetuneFlags,
    },
    /// Tokens/s of one training step for a config, optionally against the reference (PyTorch).
    Bench {
        /// A preset (cpu-small, practice-run, cpu-asa) or a run config file (.toml / .json).
        #[arg(long, default_value = "cpu-small")]
        config: String,
        /// Sequence length T (default: the config's; the config's max_seq_len follows it).
        #[arg(long, conflicts_with = "seq_lens")]
        seq_len: Option<usize>,
        /// Scaling run: a list of T (e.g. 1024,4096,16384,65536 or 1K,4K,16K,64K); each T runs
        /// in a child process of its own (its peak RSS is that T's) and one table is printed.
        #[arg(long, allow_hyphen_values = true)]
        seq_lens: Option<String>,
        /// Batch size (default: the config's).
        #[arg(long)]
        batch: Option<usize>,
        /// With --seq-lens and --reference: the reference variants to time at each T.
        #[arg(long, default_value = "online,baseline", requires = "seq_lens")]
        reference_variants: String,
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// GEMM precision on the GPU (default: the preset's; bf16 for practice-run).
        #[arg(long)]
        precision: Option<asa::config::Precision>,
        /// Untimed training steps before the timed ones (0: none; default 2; with --seq-lens
        /// 2 up to T 4096, then 1).
        #[arg(long)]
        warmup: Option<usize>,
        /// Timed training steps (>= 1); tokens/s is taken from their median (default 5; with
        /// --seq-lens 5 up to T 4096, 3 up to 16384, then 2).
        #[arg(long)]
        iters: Option<usize>,
        /// A checkout of the reference (github digitaldaimyo/ASA): also time it, same config and device.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Python with PyTorch, for --reference.
        #[arg(long, default_value = "python3")]
        python: String,
        /// Threads on both sides (CPU; >= 1; default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// What one GPU training step costs, without a GPU: per kernel its launches, registers, spills, shared memory, occupancy, SASS mix and roofline time; per step launches, GEMMs, host syncs, allocations, memsets, bf16 conversions and the predicted step time.
    KernelCost {
        /// A preset (practice-run, cpu-small, cpu-asa) or a run config file (.toml / .json).
        #[arg(long, default_value = "practice-run")]
        config: String,
        /// Sequence length T (default: the config's).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Batch size (default: the config's).
        #[arg(long)]
        batch: Option<usize>,
        /// GEMM precision (default: the preset's; bf16 for practice-run).
        #[arg(long)]
        precision: Option<asa::config::Precision>,
        /// Architecture of the register, shared-memory and occupancy columns: sm_90 (H100,
        /// H200) or sm_80 (A100).
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// The GPU of the predicted times (roofline): h100-sxm or h200.
        #[arg(long, default_value = "h100-sxm")]
        gpu: String,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Test perplexity of a checkpoint by the reference's sliding windows (stride = T x --stride-frac).
    Eval {
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// A run directory, a .safetensors file (config.json beside it or in its metadata) or a
        /// reference .pt checkpoint. Default: the latest run under runs/.
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// Tokenizer of --text (gpt2, byte, or a tokenizer.json path); default: the run's own, else gpt2.
        #[arg(long)]
        tokenizer: Option<String>,
        /// A prepared data folder (`asa prepare`): its validation split (val.bin) is scored.
        /// Without --data and --text: the data the run (--ckpt, a run folder) held out.
        #[arg(long, conflicts_with = "text")]
        data: Option<PathBuf>,
        /// Text files to score, tokenized with the model's tokenizer and joined with blank lines.
        #[arg(long, num_args = 1..)]
        text: Vec<PathBuf>,
        /// With --text: build the stream as the reference notebooks build WikiText's (each
        /// non-empty line stripped and tokenized alone, then the end-of-text token).
        #[arg(long, requires = "text")]
        per_line: bool,
        /// Tokens each window predicts (T, >= 1).
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Window stride as a share of T, in (0, 1] (the reference's stride_frac_val; 1: no overlap).
        #[arg(long, default_value_t = 0.5)]
        stride_frac: f64,
        /// Windows per forward (>= 1).
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Score at most this many windows, the first ones (>= 1; default: all).
        #[arg(long)]
        max_windows: Option<usize>,
        /// GEMM precision on the GPU: f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: asa::config::Precision,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        forward: ForwardFlags,
    },
    /// Sample from a checkpoint by recurrent decoding (each token advances a fixed-size state), streaming the text.
    Generate {
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// A run directory, a .safetensors file (config.json beside it or in its metadata) or a
        /// reference .pt checkpoint. Default: the latest run under runs/.
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// Tokenizer (gpt2, byte, or a tokenizer.json path); default: the run's own, else gpt2.
        #[arg(long)]
        tokenizer: Option<String>,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most (stops early at the tokenizer's end-of-text token).
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Softmax temperature, >= 0; 0 is greedy (the first most likely token).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Keep only the K most likely tokens (0: off).
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        /// Nucleus sampling: keep the most likely tokens up to this cumulative probability, in (0, 1] (1: off).
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        /// Divide positive (multiply negative) logits of already generated tokens by this, > 0 (1: off).
        #[arg(long, default_value_t = 1.05)]
        repetition_penalty: f64,
        /// Never repeat an n-gram of this size from the prompt or the output (0 or 1: off).
        #[arg(long, default_value_t = 3)]
        no_repeat_ngram: usize,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep generating past the end-of-text token.
        #[arg(long)]
        ignore_eos: bool,
        /// Also write the prompt's token ids, the generated ids, the text and the timings here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Forward controls make each token a full forward over the sequence so far on the CPU
        /// (the recurrent decoder runs the model as trained).
        #[command(flatten)]
        forward: ForwardFlags,
    },
    /// Per-token decoding latency and state memory against position, recurrent vs a full forward per token.
    BenchDecode {
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// A checkpoint (run folder, .safetensors or .pt); default: a fresh model of --config.
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// Model of the benchmark without --ckpt: a bench preset (cpu-small, practice-run, cpu-asa) or a run config file.
        #[arg(long, default_value = "cpu-small")]
        config: String,
        /// Decode this many tokens (the last position measured).
        #[arg(long, default_value_t = 16384)]
        max_len: usize,
        /// Time the full forward per token at these positions too (comma-separated; empty: skip).
        #[arg(long, value_delimiter = ',', default_value = "128,512,2048,8192")]
        full_at: Vec<usize>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The per-layer analysis tensors of a checkpoint on given text (read/write logits and weights, slot state norms, refine deltas, gates) as one safetensors file.
    Infos {
        /// Where to run: auto picks CUDA when a GPU and driver are present, else the CPU (the GPU
        /// assembles the same tensors as the CPU, from its own forward).
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// A run directory, a .safetensors file (config.json beside it or in its metadata) or a
        /// reference .pt checkpoint. Default: the latest run under runs/.
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// Tokenizer (gpt2, byte, or a tokenizer.json path); default: the run's own, else gpt2.
        #[arg(long)]
        tokenizer: Option<String>,
        /// Prompts, each run alone (batch 1): its tensors are stored as prompt{P}.layer{L}.{key}.
        #[arg(long, num_args = 1..)]
        prompt: Vec<String>,
        /// Text files whose non-empty lines are the prompts (instead of --prompt).
        #[arg(long, num_args = 1.., conflicts_with = "prompt")]
        text: Vec<PathBuf>,
        /// Layers to keep, e.g. 0,3 (0-based; default: all).
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// Also store each prompt's logits [1,T,V].
        #[arg(long)]
        logits: bool,
        #[command(flatten)]
        forward: ForwardFlags,
        /// The safetensors file to write (tensor names and shapes in docs/METHOD.md section 7).
        #[arg(long)]
        out: PathBuf,
    },
    /// Fact recall of a checkpoint on prompt/completion pairs (the synthetic fine-tune notebooks' analysis): completion rank, probability, greedy exact match, per task; against --base to compare a fine-tune.
    Recall {
        /// Where to run the decoding: auto picks CUDA when a GPU and driver are present.
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// The checkpoint to score (a run directory, .safetensors or .pt). Default: the latest run under runs/.
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// A second checkpoint to score the same way, e.g. the one a fine-tune started from (same tokenizer).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Tokenizer (gpt2, byte, or a tokenizer.json path); default: the run's own, else gpt2.
        #[arg(long)]
        tokenizer: Option<String>,
        /// JSON Lines of {"prompt", "completion", "tag"} [default: the embedded fact corpus's
        /// pairs in the notebooks' templates: capitals, continents, landmarks].
        #[arg(long)]
        pairs: Option<PathBuf>,
        /// Greedy tokens generated per prompt for the exact match (>= 1).
        #[arg(long, default_value_t = 8)]
        max_new_tokens: usize,
        /// Folder for recall.json and recall.png (created if missing).
        #[arg(long, default_value = "runs/recall")]
        outdir: PathBuf,
    },
    /// Factual-recall probe: Paris margins and routing-vs-residual sweeps; writes summary.json and PNG plots.
    Probe {
        /// Where to run: the probe runs on the CPU (auto and cpu do; cuda is refused).
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Folder for summary.json and the PNG plots (created if missing).
        #[arg(long, default_value = "runs/probes")]
        outdir: PathBuf,
        /// A run directory, a .safetensors file (config.json beside it or in its metadata) or a
        /// reference .pt checkpoint. Default: the latest run under runs/.
        #[arg(long)]
        ckpt: Option<PathBuf>,
        /// Tokenizer (gpt2, or a tokenizer.json path); default: the run's own, else gpt2.
        #[arg(long)]
        tokenizer: Option<String>,
        /// Layers to sweep, e.g. 0,3 (0-based, each below the model's num_layers; default: all).
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// Late-window length (positions per prompt whose routing is perturbed; >= 1).
        #[arg(long, default_value_t = 5)]
        window: usize,
        /// Principal components swept per layer and space (>= 1).
        #[arg(long, default_value_t = 3)]
        num_pcs: usize,
        /// Canonical experiments to run, e.g. 1,4: 1 trajectory bundle + energy basin, 2 Paris
        /// basin on a simplex sphere, 3 attractor emergence across depth, 4 routing vs residual
        /// sweeps, 5 residual sweeps with routing frozen, 6 policy inertia and write timescales
        /// [default: all six].
        #[arg(long, value_delimiter = ',')]
        experiments: Option<Vec<u8>>,
        /// Experiment 1: layer of the trajectory PCA [default: min(10, num_layers - 1)].
        #[arg(long)]
        basin_layer: Option<usize>,
        /// Experiment 1: layers whose routing is forced, e.g. 3,7 [default: the PCA layer].
        #[arg(long, value_delimiter = ',')]
        basin_intervene: Option<Vec<usize>>,
        /// Experiment 1: grid points per axis of the energy basin (>= 2; one forward per point).
        #[arg(long, default_value_t = 24)]
        basin_grid: usize,
        /// Experiment 2: layer of the simplex sphere [default: min(10, num_layers - 1)].
        #[arg(long)]
        sphere_layer: Option<usize>,
        /// Experiment 6: text files to read windows from [default: the embedded English corpus].
        #[arg(long, num_args = 1..)]
        timescale_text: Vec<PathBuf>,
        /// Experiment 6: windows of text (>= 1).
        #[arg(long, default_value_t = 8)]
        timescale_batch: usize,
        /// Experiment 6: tokens per window (>= 2; capped at the model's max_seq_len).
        #[arg(long, default_value_t = 256)]
        timescale_len: usize,
        /// Experiment 6: largest lag of the policy-inertia curves (>= 1).
        #[arg(long, default_value_t = 64)]
        max_lag: usize,
        #[command(flatten)]
        forward: ForwardFlags,
    },
    /// Run reference fixture folders and report the worst error of each case against its tolerance.
    Parity {
        /// Case folders, or folders holding case folders (e.g. tests/fixtures).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to run the cases: cpu (default), cuda, or auto (CUDA when a GPU is usable).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Precision on the GPU: f32 (the fixture tolerances, float32 ones) or bf16 (bf16 GEMMs,
        /// the scan on tensor cores; checks held to bf16 tolerances instead: 5e-2 for outputs
        /// and losses, 1.5e-1 for gradients, 2.5e-1 for weights after training steps).
        #[arg(long, default_value = "f32")]
        precision: asa::config::Precision,
        /// Also print every compared tensor.
        #[arg(long)]
        verbose: bool,
    },
    /// Report the CUDA set-up (driver, GPU, NVRTC, cuBLAS) and compile every kernel.
    Doctor {
        /// Also assemble each kernel with this ptxas for sm_80, sm_90 and sm_90a.
        #[arg(long)]
        ptxas: Option<PathBuf>,
    },
    /// Convert a PyTorch checkpoint (torch.save .pt) into safetensors with the reference's key names.
    Convert {
        /// Input `.pt` file (a training-notebook dict {cfg, model, ...} or a bare state dict).
        input: PathBuf,
        /// Output `.safetensors` file.
        output: PathBuf,
        /// Model config JSON to use when the .pt file carries none.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the config (default: config.json beside OUTPUT).
        #[arg(long)]
        config_out: Option<PathBuf>,
    },
}

/// Resolves `--device`: `auto` takes CUDA when a driver and a device are there, else the CPU,
/// and says which; `cuda` without a usable GPU is an error. `cuda_capable` is false for commands
/// that only have a CPU path (they say so and run on the CPU under `auto`).
fn resolve_device(d: Device, cuda_capable: bool) -> Result<Place> {
    let gpu = asa::backend::cuda::cuda_available();
    match d {
        Device::Cpu => Ok(Place::Cpu),
        Device::Cuda if !gpu => Err(AsaError::Device(
            "--device cuda: no usable CUDA device (driver, NVRTC and cuBLAS are needed; `asa doctor` shows what is missing)".into(),
        )),
        Device::Cuda if !cuda_capable => Err(AsaError::Device(
            "--device cuda: this command runs on the CPU only; use --device cpu".into(),
        )),
        Device::Cuda => Ok(Place::Cuda),
        Device::Auto if gpu && cuda_capable => {
            eprintln!("device: cuda");
            Ok(Place::Cuda)
        }
        Device::Auto if gpu => {
            eprintln!("device: cpu (this command runs on the CPU only)");
            Ok(Place::Cpu)
        }
        Device::Auto => {
            eprintln!("device: cpu (no usable CUDA device found)");
            Ok(Place::Cpu)
        }
    }
}

/// Writes a bench report as JSON (temp file + rename).
/// A `--json` path whose folder does not exist is an error before the work, not after it.
fn check_json_dir(json: Option<&std::path::Path>) -> Result<()> {
    match json.and_then(|p| p.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(AsaError::Input(format!(
            "--json: the folder {} does not exist",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

fn write_bench_json<T: serde::Serialize>(path: &std::path::Path, r: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(|e| AsaError::Other(e.to_string()))?;
    // a report, not a checkpoint: say so when it cannot be written
    asa::checkpoint::write_bytes_atomic(path, text.as_bytes()).map_err(|e| match e {
        AsaError::Checkpoint(m) => AsaError::Other(format!("cannot write the bench report: {m}")),
        other => other,
    })
}

/// An output folder flag must name a folder (or nothing yet): a file there would otherwise end
/// the command with a bare "File exists" after all its work.
fn check_outdir(flag: &str, p: &std::path::Path) -> Result<()> {
    if p.exists() && !p.is_dir() {
        return Err(AsaError::Input(format!(
            "{flag} {} is a file, not a folder",
            p.display()
        )));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Smoke { common, outdir } => {
            check_outdir("--outdir", &outdir)?;
            resolve_device(common.device, false)?;
            let s = asa::smoke::run_smoke(common.seed, &outdir, "cpu")?;
            for c in &s.cases {
                let status = if c.ok { "ok  " } else { "FAIL" };
                println!(
                    "{status} {:<44} loss {:.4}  grad norm {:.3e}  {}",
                    c.name,
                    c.loss,
                    c.grad_norm,
                    c.problems.join("; ")
                );
            }
            println!("wrote {}", outdir.join("smoke.json").display());
            Ok(if s.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::TrainMini {
            device,
            seed,
            outdir,
            name,
            steps,
            batch_size,
            seq_len,
            lr,
            eval_interval,
            data,
            tokenizer,
            resume,
            force,
            embed_dim,
            num_layers,
            num_heads,
            num_slots,
            fact_frac,
            stop_at,
            precision,
            ft:
                FinetuneFlags {
                    init_from,
                    freeze,
                    trainable,
                },
        } => {
            let place = resolve_device(device, true)?;
            // on --resume only the flags typed are compared with the run's own values
            let mut explicit = Vec::new();
            for (flag, given) in [
                ("seed", seed.is_some()),
                ("batch-size", batch_size.is_some()),
                ("seq-len", seq_len.is_some()),
                ("lr", lr.is_some()),
                ("eval-interval", eval_interval.is_some()),
                ("data", !data.is_empty()),
                ("tokenizer", tokenizer.is_some()),
                ("embed-dim", embed_dim.is_some()),
                ("num-layers", num_layers.is_some()),
                ("num-heads", num_heads.is_some()),
                ("num-slots", num_slots.is_some()),
                ("fact-frac", fact_frac.is_some()),
            ] {
                if given {
                    explicit.push(flag);
                }
            }
            let d = asa::train::TrainMiniArgs::default();
            let args = asa::train::TrainMiniArgs {
                outdir,
                name,
                seed: seed.unwrap_or(d.seed),
                steps: steps.unwrap_or(d.steps),
                resume_steps: steps,
                stop_at,
                batch_size: batch_size.unwrap_or(d.batch_size),
                seq_len: seq_len.unwrap_or(d.seq_len),
                lr: lr.unwrap_or(d.lr),
                eval_interval: eval_interval.unwrap_or(d.eval_interval),
                data,
                tokenizer: tokenizer.unwrap_or(d.tokenizer),
                resume,
                force,
                explicit: Some(explicit),
                embed_dim: embed_dim.unwrap_or(d.embed_dim),
                num_layers: num_layers.unwrap_or(d.num_layers),
                num_heads: num_heads.unwrap_or(d.num_heads),
                num_slots: num_slots.unwrap_or(d.num_slots),
                fact_frac: fact_frac.unwrap_or(d.fact_frac),
                place,
                precision,
                quiet: false,
                init_from,
                freeze,
                trainable: (!trainable.is_empty()).then_some(trainable),
            };
            let r = asa::train::train_mini(&args)?;
            println!(
                "trained {} steps in {:.1}s ({:.0} tok/s): train loss {:.4}, val loss {:.4}{}",
                r.steps,
                r.seconds,
                r.tokens_per_sec,
                r.final_train_loss,
                r.final_val_loss,
                r.first_val_loss
                    .map(|v| format!(" (from {v:.4})"))
                    .unwrap_or_default()
            );
            println!("saved {}", r.run_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Eval {
            device,
            ckpt,
            tokenizer,
            data,
            text,
            per_line,
            seq_len,
            stride_frac,
            batch,
            max_windows,
            precision,
            json,
            forward,
        } => {
            let controls = forward.controls()?;
            let o = asa::eval::EvalOptions {
                seq_len,
                stride_frac,
                batch,
                max_windows,
                quiet: false,
            };
            // flags first: a typo should not wait for a checkpoint to load
            asa::eval::check_options(&o)?;
            check_json_dir(json.as_deref())?;
            let place = resolve_device(device, true)?;
            let ckpt = asa::train::resolve_checkpoint(ckpt.as_deref())?;
            if data.is_none() && text.is_empty() && !ckpt.is_dir() {
                return Err(AsaError::Input(format!(
                    "{} is a checkpoint file: give the tokens to score with --text FILE... or --data PREPARED_FOLDER (only a run folder knows the data it held out)",
                    ckpt.display()
                )));
            }
            let loaded = asa::train::load_for_analysis(Some(&ckpt), tokenizer.as_deref())?;
            let (lm, params, tok, name) = loaded;
            let vocab = lm.cfg.vocab_size;
            let (stream, data_name) = match &data {
                None if text.is_empty() => asa::eval::run_validation_stream(&ckpt, &tok, vocab)?,
                Some(dir) => {
                    let set = asa::data::shards::open_prepared(dir, vocab)?;
                    (
                        set.val.tokens.to_vec(),
                        format!("{} (val.bin)", dir.display()),
                    )
                }
                None => {
                    let joined = asa::data::batch::read_text_files(&text)?;
                    let names: Vec<String> = text.iter().map(|p| p.display().to_string()).collect();
                    if per_line {
                        let stream = asa::eval::line_stream(&joined, &tok)?;
                        (stream, format!("{} (line by line)", names.join(", ")))
                    } else {
                        (tok.encode(&joined)?, names.join(", "))
                    }
                }
            };
            let (lm, opts) = controls.apply(lm, &params)?;
            let mut engine = asa::engine::Engine::for_eval(lm, params, place, precision)?;
            engine.set_controls(opts)?;
            let mut r = asa::eval::run(&mut engine, &stream, vocab, &o, (name, data_name))?;
            if !controls.is_default() {
                r.forward_controls = Some(controls.clone());
            }
            println!(
                "loss {:.4}  perplexity {:.3}  ({} windows of {} tokens, stride {}; {} tokens scored of {}; {}, {:.1}s)",
                r.loss,
                r.perplexity,
                r.windows,
                r.seq_len,
                r.stride,
                r.tokens_scored,
                r.stream_tokens,
                r.device,
                r.seconds
            );
            if let Some(j) = &json {
                asa::eval::write_json(&r, j)?;
                println!("wrote {}", j.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Generate {
            device,
            ckpt,
            tokenizer,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            no_repeat_ngram,
            seed,
            ignore_eos,
            json,
            forward,
        } => {
            let controls = forward.controls()?;
            let mut o = asa::generate::SampleOptions {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                no_repeat_ngram,
                seed,
                eos: None,
            };
            // flags first: a typo should not wait for a checkpoint to load
            o.check()?;
            check_json_dir(json.as_deref())?;
            if !controls.is_default() && device == Device::Cuda {
                return Err(AsaError::Input(
                    "forward controls decode by a full forward per token on the CPU: leave out --device cuda (or the controls)".into(),
                ));
            }
            let place = if controls.is_default() {
                resolve_device(device, true)?
            } else {
                resolve_device(Device::Cpu, true)?
            };
            let (lm, params, tok, name) =
                asa::train::load_for_analysis(ckpt.as_deref(), tokenizer.as_deref())?;
            let ids = tok.encode(&prompt)?;
            if ids.is_empty() {
                return Err(AsaError::Input(
                    "--prompt is empty: give some text to continue".into(),
                ));
            }
            if !ignore_eos {
                o.eos = tok.single_token("<|endoftext|>");
            }
            use asa::generate::NextLogits;
            let mut model: Box<dyn NextLogits> = if !controls.is_default() {
                let (lm, opts) = controls.apply(lm, &params)?;
                let v = lm.cfg.vocab_size;
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
                    return Err(AsaError::Input(format!(
                        "the prompt gives token id {bad}, outside the model's vocab_size {v}"
                    )));
                }
                Box::new(asa::generate::CpuFullForward::new(lm, params).with_options(opts))
            } else if place.is_cuda() {
                Box::new(asa::generate::GpuRecurrent::new(&lm, &params)?)
            } else {
                Box::new(asa::generate::CpuRecurrent::new(lm, params)?)
            };
            let state_kib = model.state_bytes() as f64 / 1024.0;
            use std::io::Write;
            let mut out = std::io::stdout();
            print!("{prompt}");
            out.flush().ok();
            let mut stream = asa::generate::TextStream::new();
            let decode = |x: &[u32]| tok.decode(x);
            let g = asa::generate::generate(model.as_mut(), &ids, &o, |id| {
                let piece = stream.push(id, decode)?;
                print!("{piece}");
                out.flush().ok();
                Ok(())
            })?;
            let rest = stream.finish(decode)?;
            println!("{rest}");
            let n = g.generated_ids.len();
            let per = if n > 0 {
                g.token_seconds.iter().sum::<f64>() / n as f64
            } else {
                0.0
            };
            eprintln!(
                "{name}: {} prompt tokens ({:.1} ms), {n} generated ({:.2} ms/token), state {state_kib:.1} KiB, {}",
                ids.len(),
                g.prompt_seconds * 1e3,
                per * 1e3,
                model.name()
            );
            if let Some(j) = &json {
                let text = tok.decode(&g.generated_ids)?;
                let report = serde_json::json!({
                    "checkpoint": name,
                    "prompt": prompt,
                    "prompt_ids": g.prompt_ids,
                    "generated_ids": g.generated_ids,
                    "text": text,
                    "options": o,
                    "prompt_seconds": g.prompt_seconds,
                    "token_seconds": g.token_seconds,
                    "state_bytes": model.state_bytes(),
                    "device": model.name(),
                });
                let body = serde_json::to_string_pretty(&report)
                    .map_err(|e| AsaError::Other(e.to_string()))?;
                asa::checkpoint::write_bytes_atomic(j, body.as_bytes())?;
                eprintln!("wrote {}", j.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchDecode {
            device,
            ckpt,
            config,
            max_len,
            full_at,
            json,
        } => {
            if max_len == 0 {
                return Err(AsaError::Input("--max-len must be >= 1, got 0".into()));
            }
            check_json_dir(json.as_deref())?;
            let place = resolve_device(device, true)?;
            let (lm, params, name) = match &ckpt {
                Some(_) => {
                    let (lm, params, _, name) =
                        asa::train::load_for_analysis(ckpt.as_deref(), None)?;
                    (lm, params, name)
                }
                None => {
                    let o = asa::bench::options_for(&config)?;
                    let (lm, params) = asa::model::lm::Lm::new(&o.model)?;
                    (lm, params, format!("a fresh {config} model"))
                }
            };
            let r = asa::bench_decode::run(lm, params, &name, place, max_len, &full_at, false)?;
            print!("{}", asa::bench_decode::table(&r));
            if let Some(j) = &json {
                let body =
                    serde_json::to_string_pretty(&r).map_err(|e| AsaError::Other(e.to_string()))?;
                asa::checkpoint::write_bytes_atomic(j, body.as_bytes())?;
                println!("wrote {}", j.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Infos {
            device,
            ckpt,
            tokenizer,
            prompt,
            text,
            layers,
            logits,
            out,
            forward,
        } => {
            let controls = forward.controls()?;
            let place = resolve_device(device, true)?;
            if prompt.is_empty() && text.is_empty() {
                return Err(AsaError::Input(
                    "give the text to run: --prompt TEXT... or --text FILE...".into(),
                ));
            }
            check_json_dir(Some(&out)).map_err(|_| {
                AsaError::Input(format!(
                    "--out: the folder of {} does not exist",
                    out.display()
                ))
            })?;
            let prompts: Vec<String> = if text.is_empty() {
                prompt
            } else {
                let joined = asa::data::batch::read_text_files(&text)?;
                joined
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            };
            let (lm, params, tok, name) =
                asa::train::load_for_analysis(ckpt.as_deref(), tokenizer.as_deref())?;
            let (mut lm, opts) = controls.apply(lm, &params)?;
            let mut gpu = if place.is_cuda() {
                let mut g =
                    asa::backend::cuda::GpuLm::new(&lm.cfg, &params, asa::config::Precision::F32)?;
                g.set_rng(lm.rng_mut().clone());
                if let Some(l) = lm.layers.first() {
                    g.set_intervention(&l.intervention);
                }
                Some(g)
            } else {
                None
            };
            let mut r = asa::infos::run(
                &mut lm,
                gpu.as_mut(),
                &params,
                &tok,
                &prompts,
                layers.as_deref(),
                logits,
                &opts,
            )?;
            if !controls.is_default() {
                r.metadata.insert(
                    "forward_controls".into(),
                    serde_json::to_string(&controls).unwrap_or_default(),
                );
            }
            asa::infos::write(&r, &out)?;
            println!(
                "{name}: {} tensors for {} prompt(s) written to {}",
                r.tensors.len(),
                prompts.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Probe {
            device,
            outdir,
            ckpt,
            tokenizer,
            layers,
            window,
            num_pcs,
            experiments,
            basin_layer,
            basin_intervene,
            basin_grid,
            sphere_layer,
            timescale_text,
            timescale_batch,
            timescale_len,
            max_lag,
            forward,
        } => {
            // flags first: a typo should not wait for a checkpoint to load
            if layers.as_ref().is_some_and(|l| l.is_empty()) {
                return Err(AsaError::Input(
                    "--layers needs at least one layer index (leave it out for all)".into(),
                ));
            }
            if basin_intervene.as_ref().is_some_and(|l| l.is_empty()) {
                return Err(AsaError::Input(
                    "--basin-intervene needs at least one layer index (leave it out for the PCA layer)".into(),
                ));
            }
            let cfg = asa::probe::ProbeConfig {
                window,
                num_pcs,
                layers,
                experiments: experiments.unwrap_or_else(|| asa::probe::ALL_EXPERIMENTS.to_vec()),
                basin_layer,
                basin_intervene,
                basin_grid,
                sphere_layer,
                timescales: asa::probe::TimescaleConfig {
                    batch: timescale_batch,
                    seq_len: timescale_len,
                    max_lag,
                    ..Default::default()
                },
                ..Default::default()
            };
            // layer indices are checked once the model is known
            cfg.check(usize::MAX)
                .map_err(|e| AsaError::Input(probe_flag_message(&asa::controls::plain(&e))))?;
            let controls = forward.controls()?;
            check_outdir("--outdir", &outdir)?;
            resolve_device(device, false)?;
            let text = if timescale_text.is_empty() {
                None
            } else {
                Some(asa::data::batch::read_text_files(&timescale_text)?)
            };
            let loaded = asa::train::load_for_analysis(ckpt.as_deref(), tokenizer.as_deref())?;
            let (lm, params, tok, name) = loaded;
            let nl = lm.cfg.num_layers;
            cfg.check(nl)
                .map_err(|e| AsaError::Input(probe_flag_message(&asa::controls::plain(&e))))?;
            let (mut lm, opts) = controls.apply(lm, &params)?;
            let probe_text = cfg.runs(6).then(|| asa::probe::ProbeText {
                name: if timescale_text.is_empty() {
                    "the embedded English corpus".into()
                } else {
                    timescale_text
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                text: text
                    .as_deref()
                    .unwrap_or_else(|| asa::data::corpus::english_text()),
            });
            let mut summary =
                asa::probe::run_probe(&mut lm, &params, &tok, &cfg, &opts, probe_text)?;
            summary.model_name = name;
            if !controls.is_default() {
                summary.notes.push(format!(
                    "forward controls: {}",
                    serde_json::to_string(&controls).unwrap_or_default()
                ));
            }
            asa::probe::write_outputs(&summary, &outdir)?;
            println!(
                "Paris margin: research set (vs \" the\") {:+.3}, canonical set (vs \" London\") {:+.3}",
                summary.paris_margin_research_mean, summary.paris_margin_canonical_mean
            );
            for n in &summary.notes {
                println!("note: {n}");
            }
            println!("wrote {}", outdir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Recall {
            device,
            ckpt,
            base,
            tokenizer,
            pairs,
            max_new_tokens,
            outdir,
        } => {
            if max_new_tokens == 0 {
                return Err(AsaError::Input(
                    "--max-new-tokens must be >= 1, got 0".into(),
                ));
            }
            check_outdir("--outdir", &outdir)?;
            let place = resolve_device(device, true)?;
            let (all, source) = match &pairs {
                Some(p) => (asa::recall::read_pairs(p)?, p.display().to_string()),
                None => (
                    asa::data::corpus::fact_pairs(),
                    "the embedded fact corpus (asa::data::corpus::fact_pairs)".to_string(),
                ),
            };
            let (lm, params, tok, name) =
                asa::train::load_for_analysis(ckpt.as_deref(), tokenizer.as_deref())?;
            let (kept, dropped) = asa::recall::single_token_pairs(&all, &tok)?;
            if kept.is_empty() {
                return Err(AsaError::Input(format!(
                    "none of the {} pairs has a completion of one token under tokenizer '{}'",
                    all.len(),
                    tok.name()
                )));
            }
            let score = |lm: asa::model::lm::Lm,
                         params: asa::model::params::ParamStore,
                         name: &str|
             -> Result<asa::recall::Side> {
                if let Some(&(_, bad)) = kept
                    .iter()
                    .find(|(_, id)| *id as usize >= lm.cfg.vocab_size)
                {
                    return Err(AsaError::Input(format!(
                        "{name}: token id {bad} is outside its vocab_size {}",
                        lm.cfg.vocab_size
                    )));
                }
                use asa::generate::NextLogits;
                let mut model: Box<dyn NextLogits> = if place.is_cuda() {
                    Box::new(asa::generate::GpuRecurrent::new(&lm, &params)?)
                } else {
                    Box::new(asa::generate::CpuRecurrent::new(lm, params)?)
                };
                asa::recall::evaluate(model.as_mut(), name, &tok, &kept, max_new_tokens)
            };
            let model = score(lm, params, &name)?;
            let base = match &base {
                Some(b) => {
                    let (blm, bparams, btok, bname) =
                        asa::train::load_for_analysis(Some(b), Some(tok.name()))?;
                    if btok.vocab_size() != tok.vocab_size() {
                        return Err(AsaError::Input(format!(
                            "--base {} has another vocabulary ({} tokens) than --ckpt ({})",
                            b.display(),
                            btok.vocab_size(),
                            tok.vocab_size()
                        )));
                    }
                    Some(score(blm, bparams, &bname)?)
                }
                None => None,
            };
            let change = base.as_ref().map(|b| asa::recall::change(&model, b));
            let report = asa::recall::RecallReport {
                pairs_source: source,
                tokenizer: tok.name().to_string(),
                max_new_tokens,
                dropped,
                model,
                base,
                change,
            };
            asa::recall::write_outputs(&report, &outdir)?;
            let line = |s: &asa::recall::Side| {
                format!(
                    "{}: exact match {:.3}, top-1 {:.3}, median rank {}, mean p {:.4} ({} pairs)",
                    s.checkpoint,
                    s.overall.exact_match,
                    s.overall.top1_accuracy,
                    s.overall.median_rank,
                    s.overall.mean_p_target,
                    s.overall.n
                )
            };
            println!("{}", line(&report.model));
            if let Some(b) = &report.base {
                println!("base {}", line(b));
            }
            println!("wrote {}", outdir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prepare {
            inputs,
            outdir,
            tokenizer,
            val_frac,
            shard_tokens,
            force,
        } => {
            if !(val_frac.is_finite() && val_frac > 0.0 && val_frac < 1.0) {
                return Err(AsaError::Input(format!(
                    "--val-frac must be in (0, 1), got {val_frac}"
                )));
            }
            if shard_tokens == 0 {
                return Err(AsaError::Input("--shard-tokens must be >= 1, got 0".into()));
            }
            let tok = asa::train::tokenizer_by_name(&tokenizer)?;
            let r = asa::data::shards::prepare(&asa::data::shards::PrepareOptions {
                inputs,
                outdir: outdir.clone(),
                tokenizer: tok,
                val_frac,
                shard_tokens,
                force,
                progress: true,
            })?;
            println!(
                "wrote {} train shard(s) ({} tokens) and val.bin ({} tokens, {:.2}% held out) to {} ({}, vocab {})",
                r.train_shards.len(),
                r.train_tokens,
                r.val_tokens,
                100.0 * r.val_tokens as f64 / (r.train_tokens + r.val_tokens).max(1) as f64,
                outdir.display(),
                r.dtype,
                r.vocab_size
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Train {
            config,
            device,
            seed,
            resume,
            force,
            total_steps,
            stop_at,
            ft:
                FinetuneFlags {
                    init_from,
                    freeze,
                    trainable,
                },
        } => {
            let place = resolve_device(device, true)?;
            let r = asa::train::train(&asa::train::TrainArgs {
                config,
                seed,
                resume,
                force,
                total_steps,
                place,
                stop_at,
                quiet: false,
                init_from,
                freeze,
                trainable: (!trainable.is_empty()).then_some(trainable),
            })?;
            println!(
                "trained to step {} in {:.1}s ({:.0} tok/s): train loss {:.4}, val loss {:.4} (ppl {:.2})",
                r.steps,
                r.seconds,
                r.tokens_per_sec,
                r.final_train_loss,
                r.final_val_loss,
                r.final_val_loss.exp()
            );
            println!(
                "saved {} (best in {}/best)",
                r.run_dir.display(),
                r.run_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            config,
            seq_len,
            seq_lens,
            batch,
            reference_variants,
            device,
            precision,
            warmup,
            iters,
            reference,
            python,
            threads,
            json,
        } => {
            let place = resolve_device(device, true)?;
            let mut o = asa::bench::options_for(&config)?;
            o.place = place;
            o.set_shape(precision, seq_len, batch);
            o.progress = true;
            o.reference = reference;
            o.python = python;
            o.threads = threads;
            if let Some(list) = seq_lens {
                // the child runs this same command at one T: same config, device, precision
                // and batch (the parent adds --seq-len, --warmup, --iters, --threads, --json)
                let mut args: Vec<String> = vec!["bench".into(), "--config".into(), config.clone()];
                args.extend([
                    "--device".into(),
                    if o.place.is_cuda() { "cuda" } else { "cpu" }.into(),
                ]);
                args.extend([
                    "--precision".into(),
                    format!("{:?}", o.precision).to_lowercase(),
                ]);
                args.extend(["--batch".into(), o.batch.to_string()]);
                // a scaling run takes up to hours: a report that cannot be written is said
                // before it, not after
                check_json_dir(json.as_deref())?;
                let exe = std::env::current_exe().map_err(|e| {
                    AsaError::Other(format!("bench: cannot find this program's path: {e}"))
                })?;
                let so = asa::bench::ScalingOptions {
                    seq_lens: asa::bench::parse_seq_lens(&list)?,
                    variants: asa::bench::parse_reference_variants(&reference_variants)?,
                    warmup,
                    iters,
                    child: (exe, args),
                    bench: o,
                };
                let r = asa::bench::run_scaling(&so)?;
                println!(
                    "{} on {}: tokens/s of one training step at each T, B={}, {} threads on each side{}",
                    r.config_name,
                    r.device.as_deref().unwrap_or("?"),
                    r.batch,
                    r.threads,
                    r.torch_version
                        .as_deref()
                        .map(|v| format!(", reference under torch {v}"))
                        .unwrap_or_default()
                );
                print!("{}", asa::bench::scaling_table(&r));
                if let Some(path) = json {
                    write_bench_json(&path, &r)?;
                }
                if let Some(bad) = r.rows.iter().find(|row| row.asa.error.is_some()) {
                    return Err(AsaError::Other(format!(
                        "bench: asa failed at T={} (see the table): {}",
                        bad.seq_len,
                        bad.asa.error.as_deref().unwrap_or("")
                    )));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(w) = warmup {
                o.warmup = w;
            }
            if let Some(i) = iters {
                o.iters = i;
            }
            let r = asa::bench::run_bench(&o)?;
            println!(
                "{} on {}: B={} T={} ({} tokens/step), ours {:.0} tokens/s (median step {:.3}s){}",
                r.config_name,
                r.device,
                r.batch,
                r.seq_len,
                r.tokens_per_step,
                r.tokens_per_sec,
                asa::bench::median(&r.step_seconds),
                r.mfu
                    .map(|m| format!(", MFU {:.1}%", 100.0 * m))
                    .unwrap_or_default()
            );
            if let Some(g) = &r.graph {
                println!(
                    "CUDA graph: {} captured ({} requests), {} steps replayed, {} eager, {} dropped{}",
                    g.captures,
                    g.nodes,
                    g.replays,
                    g.eager,
                    g.dropped,
                    if g.captures == 0 && g.eager > 0 {
                        " (off: ASA_CUDA_GRAPH=0, ASA_CUDA_PROFILE, or warmup < 2)"
                    } else {
                        ""
                    }
                );
            }
            if let (Some(rf), Some(ratio)) = (&r.reference, r.ratio) {
                println!(
                    "reference (torch {} on {}): {:.0} tokens/s (median step {:.3}s); ours / reference = {ratio:.2}x (fastest steps: {:.2}x)",
                    rf.torch_version,
                    rf.device,
                    rf.tokens_per_sec,
                    asa::bench::median(&rf.step_seconds),
                    r.ratio_fastest.unwrap_or(f64::NAN)
                );
            }
            if let Some(path) = json {
                write_bench_json(&path, &r)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::KernelCost {
            config,
            seq_len,
            batch,
            precision,
            arch,
            gpu,
            json,
        } => {
            let peaks = asa::backend::cuda::roofline::gpu_peaks(&gpu).ok_or_else(|| {
                AsaError::Input(format!("--gpu '{gpu}': expected h100-sxm or h200"))
            })?;
            let mut o = asa::bench::options_for(&config)?;
            o.set_shape(precision, seq_len, batch);
            check_json_dir(json.as_deref())?;
            let rep = asa::kernel_cost::run(&o, &arch, &peaks)?;
            print!("{}", asa::kernel_cost::table(&rep));
            if let Some(path) = json {
                write_bench_json(&path, &rep)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor { ptxas } => {
            let rep = asa::backend::cuda::doctor(ptxas.as_deref());
            println!("{rep}");
            // on a machine without a CUDA driver the doctor passes when every kernel compiles;
            // with a driver, the GPU must also be usable
            let ok = rep.ok || (rep.compile_ok && !asa::backend::cuda::driver_present());
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Parity {
            dirs,
            device,
            precision,
            verbose,
        } => {
            let place = resolve_device(device, true)?;
            let cases = parity::find_cases(&dirs)?;
            let mut failed = 0;
            for dir in &cases {
                let rep = match place {
                    Place::Cpu => parity::run_case(dir),
                    Place::Cuda => asa::parity::gpu::run_case_cuda(dir, precision),
                };
                println!("{}", rep.line());
                if verbose {
                    for c in &rep.checks {
                        println!(
                            "    {:<48} {:.3e} (tol {:e}){}",
                            c.name,
                            c.err,
                            c.tol,
                            if c.ok() { "" } else { "  FAIL" }
                        );
                    }
                }
                if !rep.passed() {
                    failed += 1;
                }
            }
            println!("{} passed, {} failed", cases.len() - failed, failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Convert {
            input,
            output,
            config,
            config_out,
        } => {
            let s =
                checkpoint::convert_pt(&input, &output, config.as_deref(), config_out.as_deref())?;
            println!(
                "wrote {} ({} tensors, {} values{}), config {}",
                output.display(),
                s.num_tensors,
                s.num_elements,
                if s.legacy {
                    ", legacy names mapped"
                } else {
                    ""
                },
                s.config_path.display()
            );
            if let Some(step) = s.step {
                println!(
                    "checkpoint step {step}{}",
                    s.best_val
                        .map(|v| format!(", best_val {v}"))
                        .unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    // a bug must still end as one line, not a backtrace
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (please report): {info}");
    }));
    asa::backend::cpu::tune_allocator();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `asa <cmd> --help` must describe every flag and argument: a bare `--lr <LR>` leaves the
    /// user guessing its meaning and range.
    #[test]
    fn every_argument_has_help_text() {
        let cmd = Cli::command();
        let mut missing = Vec::new();
        let mut seen = 0;
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                seen += 1;
                let text = arg
                    .get_help()
                    .or(arg.get_long_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if text.trim().is_empty() {
                    let flag = arg
                        .get_long()
                        .map(|l| format!("--{l}"))
                        .unwrap_or_else(|| format!("<{id}>"));
                    missing.push(format!("asa {} {flag}", sub.get_name()));
                }
            }
        }
        assert!(seen > 40, "only {seen} arguments found: the walk is broken");
        assert!(
            missing.is_empty(),
            "arguments without help text: {}",
            missing.join(", ")
        );
    }

    /// The probe draws no random numbers, so it takes no --seed (it used to take one and
    /// ignore it).
    #[test]
    fn probe_takes_no_seed() {
        assert!(Cli::try_parse_from(["asa", "probe", "--seed", "3"]).is_err());
        assert!(Cli::try_parse_from(["asa", "probe", "--window", "3"]).is_ok());
    }
}
