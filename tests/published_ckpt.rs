//! The reference's published checkpoint path, end to end, on a stand-in written by the test.
//!
//! The reference publishes one model, `DigitalShogun/ASA-ASM-wikitext103-raw`, file
//! `ASA_ASM_wt103-rawv1_gpt2_T1024_L21_D384_H8_K16_M32_ropek1_alibi1_gamma1_step75000_best.pt`:
//! what its training notebooks' `save_ckpt` writes, `torch.save({"cfg": asdict(cfg), "model":
//! model.state_dict(), "opt": opt.state_dict(), "step": step, "best_val": best_val}, ".../best.pt")`,
//! for T = 1024 (max_seq_len), L = 21 layers, D = 384 (embed_dim), H = 8 heads, K = 16 slots,
//! M = 32 (slotspace_dim), RoPE keys, ALiBi write, content read (gamma) on, GPT-2 vocabulary
//! (50257), tied head. Its state dict has the notebooks' module names (`tok`, `norm`,
//! `blocks.N.norm1` / `norm2` / `asa`), no MLP biases, the head tied to the embedding (one
//! storage for `tok.weight` and `lm_head.weight`), and a `_metadata` attribute.
//!
//! Nothing is downloaded: the test writes a file of exactly that layout and naming (seeded
//! weights, full size: 56.7M values) with `support/torch_pt_writer.rs`, then runs the binary
//! through `asa convert`, `asa infos` (the .pt and the converted file give the same logits) and
//! `asa probe` on the converted file.

#[path = "support/torch_pt_writer.rs"]
mod torch_pt_writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use torch_pt_writer::{Py, TensorView, TorchSave};

const FILE: &str =
    "ASA_ASM_wt103-rawv1_gpt2_T1024_L21_D384_H8_K16_M32_ropek1_alibi1_gamma1_step75000_best.pt";
const T: usize = 1024;
const L: usize = 21;
const D: usize = 384;
const H: usize = 8;
const K: usize = 16;
const M: usize = 32;
const V: usize = 50257;
const HIDDEN: usize = 4 * D;
const STEP: i64 = 75000;
const BEST_VAL: f64 = 3.0416259765625;

fn asa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asa"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run asa");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// SplitMix64: deterministic values without depending on any crate's stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` values `center + scale * U[-1, 1)`.
    fn fill(&mut self, n: usize, center: f32, scale: f32) -> Vec<f32> {
        (0..n).map(|_| center + scale * self.sym()).collect()
    }
}

/// The notebooks' state dict, in `model.state_dict()` order, without the tied `lm_head.weight`:
/// (legacy name, shape, center, scale of its values). Linear weights as the notebooks initialise
/// them (std 0.02), LayerNorms near 1 / 0, the three scalars near where training leaves them.
fn legacy_layout() -> Vec<(String, Vec<usize>, f32, f32)> {
    // U[-a, a) has std a / sqrt(3): a = 0.0346 gives 0.02
    let w = 0.0346;
    let mut v = vec![("tok.weight".to_string(), vec![V, D], 0.0, w)];
    for i in 0..L {
        let b = |s: &str| format!("blocks.{i}.{s}");
        v.extend([
            (b("norm1.weight"), vec![D], 1.0, 0.1),
            (b("norm1.bias"), vec![D], 0.0, 0.02),
            (b("asa.slot_keys"), vec![H, K, D / H], 0.0, 0.25),
            (b("asa._alibi_strength_param"), vec![], -2.25, 0.5),
            (b("asa._content_read_gamma_raw"), vec![], -1.0, 0.5),
            (b("asa._slotspace_gate_raw"), vec![], -1.0, 0.5),
            (b("asa.Wk_write.weight"), vec![D, D], 0.0, w),
            (b("asa.Wv_write.weight"), vec![D, D], 0.0, w),
            (b("asa.Wq_read.weight"), vec![D, D], 0.0, w),
            (b("asa.out_proj.weight"), vec![D, D], 0.0, w),
            (b("asa.slot_in.weight"), vec![M, K], 0.0, 0.3),
            (b("asa.slot_q.weight"), vec![M, M], 0.0, 0.3),
            (b("asa.slot_k.weight"), vec![M, M], 0.0, 0.3),
            (b("asa.slot_v.weight"), vec![M, M], 0.0, 0.3),
            (b("asa.slot_out.weight"), vec![K, M], 0.0, 0.3),
            (b("norm2.weight"), vec![D], 1.0, 0.1),
            (b("norm2.bias"), vec![D], 0.0, 0.02),
            (b("mlp.0.weight"), vec![HIDDEN, D], 0.0, w),
            (b("mlp.3.weight"), vec![D, HIDDEN], 0.0, w),
        ]);
    }
    v.push(("norm.weight".to_string(), vec![D], 1.0, 0.1));
    v.push(("norm.bias".to_string(), vec![D], 0.0, 0.02));
    v
}

/// `asdict(cfg)` of the notebooks' `ASMTrainConfig` (its fields in their order) with the
/// published run's values: the name's T, L, D, H, K, M and switches, the rest the defaults.
fn published_cfg() -> Py {
    let s = Py::str;
    let (i, f, b) = (Py::Int, Py::Float, Py::Bool);
    Py::dict(vec![
        ("dataset_name", s("wikitext")),
        ("dataset_config", s("wikitext-103-raw-v1")),
        ("tokenizer_name", s("gpt2")),
        ("max_seq_len", i(T as i64)),
        ("stride_frac_val", f(0.5)),
        ("seed", i(1337)),
        ("train_samples_target", i(100_000_000)),
        ("val_samples_target", i(25_000)),
        ("batch_size", i(64)),
        ("learning_rate", f(3e-4)),
        ("weight_decay", f(0.01)),
        // asdict keeps the tuple a tuple
        ("betas", Py::Tuple(vec![f(0.9), f(0.95)])),
        ("grad_clip", f(1.0)),
        ("warmup_steps", i(1000)),
        ("total_steps", i(STEP)),
        ("eval_interval", i(1000)),
        ("log_interval", i(100)),
        ("vocab_size", i(V as i64)),
        ("embed_dim", i(D as i64)),
        ("num_layers", i(L as i64)),
        ("num_heads", i(H as i64)),
        ("num_slots", i(K as i64)),
        ("mlp_ratio", f(4.0)),
        ("dropout", f(0.1)),
        ("tie_weights", b(true)),
        ("read_temperature", f(1.0)),
        ("write_temperature", f(1.0)),
        ("slot_dropout", f(0.05)),
        ("state_fp32", b(true)),
        ("normalize_k", b(false)),
        ("use_abs_pos", b(false)),
        ("use_rope_keys", b(true)),
        ("rope_base", f(10000.0)),
        ("use_alibi_write", b(true)),
        ("alibi_strength_init", f(0.1)),
        ("learn_alibi_strength", b(true)),
        ("min_strength", f(0.0)),
        ("use_content_read", b(true)),
        ("content_read_init", f(-4.0)),
        ("content_read_max_gamma", f(3.0)),
        ("use_slotspace_refine", b(true)),
        ("slotspace_dim", i(M as i64)),
        ("slotspace_gate_init", f(-4.0)),
        ("slotspace_dropout", f(0.05)),
        ("slotspace_signed_weights", b(true)),
        ("use_rope_slotspace", b(true)),
        ("rope_base_slotspace", f(100000.0)),
        ("write_chunk_size", i(128)),
        ("slotspace_chunk_size", i(128)),
        ("enable_compiled", b(false)),
        ("eval_max_batches", i(150)),
        ("analytics_last_k", i(32)),
        ("output_dir", s("./drive/MyDrive/asm_outputs")),
        (
            "tag",
            s("ASA_ASM_wt103-rawv1_gpt2_T1024_L21_D384_H8_K16_M32_ropek1_alibi1_gamma1"),
        ),
        ("cache_dir", s("./drive/MyDrive/asm_caches")),
        (
            "val_windows_cache",
            s("./drive/MyDrive/asm_val_cache_windows_1024.pkl"),
        ),
    ])
}

/// `state_dict()._metadata`: every module's path (parameterless ones too) -> `{'version': 1}`.
fn module_metadata() -> Py {
    let mut paths = vec![String::new(), "tok".into(), "drop".into(), "blocks".into()];
    for i in 0..L {
        let b = format!("blocks.{i}");
        paths.push(b.clone());
        paths.push(format!("{b}.norm1"));
        paths.push(format!("{b}.asa"));
        for m in [
            "dropout",
            "slotspace_dropout",
            "Wk_write",
            "Wv_write",
            "Wq_read",
            "out_proj",
            "rope",
            "slot_in",
            "slot_q",
            "slot_k",
            "slot_v",
            "slot_out",
            "rope_slotspace",
        ] {
            paths.push(format!("{b}.asa.{m}"));
        }
        paths.push(format!("{b}.norm2"));
        paths.push(format!("{b}.mlp"));
        for j in 0..5 {
            paths.push(format!("{b}.mlp.{j}"));
        }
    }
    paths.push("norm".into());
    paths.push("lm_head".into());
    Py::OrderedDict {
        items: paths
            .into_iter()
            .map(|p| (Py::Str(p), Py::dict(vec![("version", Py::Int(1))])))
            .collect(),
        metadata: None,
    }
}

/// Writes the stand-in at `path`; returns the values written under each legacy name.
fn write_published(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut ts = TorchSave::new();
    let mut rng = Rng(0x5eed_a5a0_2024);
    let mut values = BTreeMap::new();
    let mut items = Vec::new();
    let mut tok_storage = None;
    let mut shapes = Vec::new();
    for (name, shape, center, scale) in legacy_layout() {
        let n = shape.iter().product::<usize>();
        let data = rng.fill(n, center, scale);
        // trained on a GPU: the storages say cuda:0 (loaders map them to the CPU)
        let sid = ts.storage_f32(&data, "cuda:0");
        if name == "tok.weight" {
            tok_storage = Some(sid);
        }
        items.push((
            Py::Str(name.clone()),
            Py::Tensor(TensorView::contiguous(sid, &shape)),
        ));
        shapes.push(shape.clone());
        values.insert(name, (shape, data));
    }
    let n_params = shapes.len() as i64;
    // the tied head: the embedding's storage again, as `model.state_dict()` saves it
    items.push((
        Py::str("lm_head.weight"),
        Py::Tensor(TensorView::contiguous(tok_storage.unwrap(), &[V, D])),
    ));
    let model = Py::OrderedDict {
        items,
        metadata: Some(Box::new(module_metadata())),
    };

    // AdamW's state_dict: per parameter (`model.parameters()`, the tied head once) a step
    // tensor and two moments. The moments are zero-stride views of one one-element storage: the
    // pickle has the real structure while the archive stays small (nothing reads them).
    let zero = ts.storage_f32(&[0.0], "cuda:0");
    let state: Vec<(Py, Py)> = (0..n_params)
        .map(|p| {
            let shape = &shapes[p as usize];
            let moment = || {
                Py::Tensor(TensorView {
                    storage: zero,
                    offset: 0,
                    size: shape.clone(),
                    stride: vec![0; shape.len()],
                })
            };
            let step = ts.tensor_f32(&[STEP as f32], &[], "cpu");
            (
                Py::Int(p),
                Py::dict(vec![
                    ("step", step),
                    ("exp_avg", moment()),
                    ("exp_avg_sq", moment()),
                ]),
            )
        })
        .collect();
    let group = Py::dict(vec![
        ("lr", Py::Float(3.0e-5)),
        ("betas", Py::Tuple(vec![Py::Float(0.9), Py::Float(0.95)])),
        ("eps", Py::Float(1e-8)),
        ("weight_decay", Py::Float(0.01)),
        ("amsgrad", Py::Bool(false)),
        ("foreach", Py::None),
        ("maximize", Py::Bool(false)),
        ("capturable", Py::Bool(false)),
        ("differentiable", Py::Bool(false)),
        ("fused", Py::None),
        ("initial_lr", Py::Float(3.0e-4)),
        ("params", Py::List((0..n_params).map(Py::Int).collect())),
    ]);
    let opt = Py::dict(vec![
        ("state", Py::Dict(state)),
        ("param_groups", Py::List(vec![group])),
    ]);
    let root = Py::dict(vec![
        ("cfg", published_cfg()),
        ("model", model),
        ("opt", opt),
        ("step", Py::Int(STEP)),
        ("best_val", Py::Float(BEST_VAL)),
    ]);
    // saved as `<out_dir>/best.pt`, then uploaded under its long name: the archive's folder is
    // `best/`
    ts.write(path, "best", &root).unwrap();
    values
}

/// The library's name for each legacy name written (the mapping `asa convert` must apply).
fn library_name(legacy: &str) -> String {
    if let Some(r) = legacy.strip_prefix("tok.") {
        return format!("token_emb.{r}");
    }
    if let Some(r) = legacy.strip_prefix("norm.") {
        return format!("ln_f.{r}");
    }
    legacy
        .replacen(".norm1.", ".ln_1.", 1)
        .replacen(".norm2.", ".ln_2.", 1)
        .replacen(".asa.", ".attn.", 1)
}

/// The library's parameter names for L layers: tests/golden_state_dict_keys.txt (block 0)
/// expanded to every block, less the MLP biases the published model does not have.
fn expected_names() -> Vec<String> {
    let golden = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden_state_dict_keys.txt"),
    )
    .unwrap();
    let mut names = Vec::new();
    for k in golden.lines().map(str::trim).filter(|k| !k.is_empty()) {
        match k.strip_prefix("blocks.0.") {
            Some(tail) if tail.starts_with("mlp.") && tail.ends_with(".bias") => {}
            Some(tail) => names.extend((0..L).map(|i| format!("blocks.{i}.{tail}"))),
            None => names.push(k.to_string()),
        }
    }
    names.sort();
    names
}

fn logits_of(file: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = asa::checkpoint::read_safetensors(file).unwrap();
    let l = &t["prompt0.logits"];
    (l.shape.clone(), l.to_f32().unwrap())
}

#[test]
fn published_checkpoint_converts_and_probes() {
    let start = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let pt = tmp.path().join(FILE);
    let written = write_published(&pt);
    let t_write = start.elapsed();

    // ---- convert
    let out_dir = tmp.path().join("wt103");
    std::fs::create_dir(&out_dir).unwrap();
    let st = out_dir.join("model.safetensors");
    let stdout = run_ok(asa().arg("convert").arg(&pt).arg(&st));
    assert!(stdout.contains("legacy names mapped"), "{stdout}");
    assert!(
        stdout.contains(&format!("checkpoint step {STEP}, best_val {BEST_VAL}")),
        "{stdout}"
    );
    let t_convert = start.elapsed();

    // exactly the library's names, with the written shapes and values
    let (tensors, meta) = asa::checkpoint::read_safetensors_with_metadata(&st).unwrap();
    let names: Vec<String> = tensors.keys().cloned().collect();
    let expected = expected_names();
    assert_eq!(names, expected, "converted tensor names");
    assert_eq!(names.len(), 3 + 1 + L * 19);
    for (legacy, (shape, data)) in &written {
        let name = library_name(legacy);
        let t = &tensors[&name];
        assert_eq!(&t.shape, shape, "{legacy} -> {name}: shape");
        assert_eq!(t.dtype_name(), "F32", "{name}");
        assert!(
            t.to_f32().unwrap() == *data,
            "{legacy} -> {name}: values differ"
        );
    }
    assert_eq!(
        tensors["lm_head.weight"].to_f32(),
        tensors["token_emb.weight"].to_f32(),
        "tied head"
    );

    // the config was carried, into config.json and the file's metadata
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    let meta_cfg: serde_json::Value = serde_json::from_str(&meta["asa_config"]).unwrap();
    for c in [&cfg, &meta_cfg] {
        let c = c.get("model").unwrap_or(c);
        for (k, v) in [
            ("num_layers", L),
            ("embed_dim", D),
            ("num_heads", H),
            ("num_slots", K),
            ("slotspace_dim", M),
            ("max_seq_len", T),
            ("vocab_size", V),
        ] {
            assert_eq!(c[k], serde_json::json!(v), "{k} in {c}");
        }
        assert_eq!(c["mlp_bias"], serde_json::json!(false), "{c}");
        assert_eq!(c["tie_weights"], serde_json::json!(true), "{c}");
        assert_eq!(c["use_abs_pos"], serde_json::json!(false), "{c}");
        assert_eq!(c["use_rope_keys"], serde_json::json!(true), "{c}");
        assert_eq!(c["use_alibi_write"], serde_json::json!(true), "{c}");
        assert_eq!(c["use_content_read"], serde_json::json!(true), "{c}");
        assert_eq!(c["use_slotspace_refine"], serde_json::json!(true), "{c}");
    }

    // ---- the .pt and the converted file give the same logits
    let infos = |ckpt: &Path, out: &PathBuf| {
        run_ok(
            asa()
                .args(["infos", "--device", "cpu", "--tokenizer", "gpt2", "--ckpt"])
                .arg(ckpt)
                .args(["--prompt", "The capital of France is", "--layers", "20"])
                .arg("--logits")
                .arg("--out")
                .arg(out),
        );
        logits_of(out)
    };
    let (shape_pt, logits_pt) = infos(&pt, &tmp.path().join("infos_pt.safetensors"));
    let (shape_st, logits_st) = infos(&st, &tmp.path().join("infos_st.safetensors"));
    // "The capital of France is": 5 GPT-2 tokens
    assert_eq!(shape_pt, vec![1, 5, V]);
    assert_eq!(shape_pt, shape_st);
    let scale = logits_pt.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale.is_finite() && scale > 0.0, "logits scale {scale}");
    let worst = logits_pt
        .iter()
        .zip(&logits_st)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-6 * scale.max(1.0),
        "logits differ by {worst} (scale {scale})"
    );
    let t_infos = start.elapsed();

    // ---- probe on the converted file
    let probe_dir = tmp.path().join("probe");
    let help = run_ok(asa().args(["probe", "--help"]));
    let mut probe = asa();
    probe
        .args(["probe", "--device", "cpu", "--tokenizer", "gpt2", "--ckpt"])
        .arg(&st)
        .args(["--layers", "20", "--num-pcs", "1", "--window", "2"])
        .arg("--outdir")
        .arg(&probe_dir);
    if help.contains("--experiments") {
        probe.args(["--experiments", "4,5"]);
    }
    let stdout = run_ok(&mut probe);
    assert!(stdout.contains("Paris margin"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(probe_dir.join("summary.json")).unwrap())
            .unwrap();
    for k in [
        "paris_margin_mean",
        "paris_margin_research_mean",
        "paris_margin_canonical_mean",
    ] {
        let m = summary[k].as_f64();
        assert!(m.is_some_and(f64::is_finite), "{k}: {:?}", summary[k]);
    }
    assert_eq!(
        summary["paris_margin_mean"],
        summary["paris_margin_research_mean"]
    );
    eprintln!(
        "published_ckpt: write {:.1?}, convert {:.1?}, infos x2 {:.1?}, probe {:.1?}",
        t_write,
        t_convert - t_write,
        t_infos - t_convert,
        start.elapsed() - t_infos
    );
}
