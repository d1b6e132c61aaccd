//! End-to-end checks of the `asa` binary: parity, convert and its error paths.

use std::path::{Path, PathBuf};
use std::process::Command;

fn asa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asa"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn copy_case(name: &str, dst: &Path) -> PathBuf {
    let src = fixtures().join(name);
    let out = dst.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
    }
    out
}

#[test]
fn parity_passes_on_public_fixtures() {
    let out = asa().arg("parity").arg(fixtures()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().filter(|l| l.starts_with("PASS")).count() >= 14);
    assert!(text.contains("0 failed"));
}

#[test]
fn parity_fails_loudly_on_a_corrupted_case() {
    let tmp = tempfile::tempdir().unwrap();
    let case = copy_case("lm_full", tmp.path());
    let io = case.join("io.safetensors");
    let bytes = std::fs::read(&io).unwrap();
    std::fs::write(&io, &bytes[..bytes.len() / 2]).unwrap();
    let out = asa().arg("parity").arg(&case).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL") && text.contains("io.safetensors"),
        "{text}"
    );
}

#[test]
fn parity_fails_on_wrong_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let case = copy_case("lm_minimal", tmp.path());
    // weights of another case with another shape: a clear load error naming a key
    std::fs::copy(
        fixtures().join("lm_full/model.safetensors"),
        case.join("model.safetensors"),
    )
    .unwrap();
    let out = asa().arg("parity").arg(&case).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL") && text.contains("blocks."), "{text}");
}

#[test]
fn convert_legacy_pt_reproduces_fixture_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("converted");
    std::fs::create_dir(&case).unwrap();
    let st = case.join("model.safetensors");
    let out = asa()
        .args(["convert"])
        .arg(fixtures().join("legacy_pt/checkpoint.pt"))
        .arg(&st)
        .arg("--config-out")
        .arg(tmp.path().join("converted.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the converted weights + the fixture's config and io form a parity case
    std::fs::copy(
        fixtures().join("legacy_pt/config.json"),
        case.join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("legacy_pt/io.safetensors"),
        case.join("io.safetensors"),
    )
    .unwrap();
    let out = asa().arg("parity").arg(&case).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let names = asa::checkpoint::read_safetensors(&st).unwrap();
    assert!(
        names.contains_key("token_emb.weight") && names.contains_key("blocks.1.attn.slot_keys")
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("converted.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["mlp_bias"], serde_json::Value::Bool(false));
}

#[test]
fn user_errors_are_one_line_and_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["parity".into(), "/nonexistent/dir".into()],
            "not a fixture folder",
        ),
        (
            vec![
                "parity".into(),
                fixtures().display().to_string(),
                "--device".into(),
                "cuda".into(),
            ],
            "cuda",
        ),
        (
            vec![
                "convert".into(),
                "/nonexistent.pt".into(),
                tmp.path().join("x.safetensors").display().to_string(),
            ],
            "nonexistent",
        ),
        (
            vec![
                "convert".into(),
                fixtures().join("lm_full/config.json").display().to_string(),
                tmp.path().join("y.safetensors").display().to_string(),
            ],
            "config.json",
        ),
    ];
    for (args, needle) in cases {
        let out = asa().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    // a bad flag is a usage error from clap (exit 2), not a panic
    let out = asa().args(["parity", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn tiny_train(outdir: &Path, name: &str, steps: usize, extra: &[&str]) -> std::process::Output {
    let steps = steps.to_string();
    let mut args = vec![
        "train-mini",
        "--device",
        "cpu",
        "--name",
        name,
        "--steps",
        &steps,
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
        "4",
    ];
    args.extend_from_slice(extra);
    asa()
        .args(&args)
        .arg("--outdir")
        .arg(outdir)
        .output()
        .unwrap()
}

#[test]
fn smoke_writes_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = asa()
        .args(["smoke", "--device", "cpu", "--seed", "3", "--outdir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("smoke.json")).unwrap())
            .unwrap();
    assert_eq!(v["ok"], serde_json::Value::Bool(true));
    assert_eq!(v["seed"], serde_json::json!(3));
}

#[test]
fn train_mini_writes_a_complete_run_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "straight", 6, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("straight");
    for f in [
        "model.safetensors",
        "config.json",
        "train.json",
        "train_state.json",
        "checkpoint.safetensors",
        "metrics.jsonl",
        "report.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    assert!(metrics.lines().any(|l| l.contains("val_loss")));
    // stop after 3 of 6 steps (between checkpoints' regular cadence), then resume: same weights
    // as the straight run, bit for bit
    let out = tiny_train(tmp.path(), "split", 6, &["--stop-at", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("split/train_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], serde_json::json!(3));
    let out = tiny_train(tmp.path(), "split", 6, &["--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = asa::checkpoint::read_safetensors(&run.join("model.safetensors")).unwrap();
    let b = asa::checkpoint::read_safetensors(&tmp.path().join("split/model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, ta) in &a {
        assert_eq!(ta.to_f32(), b[k].to_f32(), "{k} differs after resume");
    }
}

#[test]
fn train_mini_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "none", 2, &["--resume"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run to resume"));
    let missing = tmp.path().join("missing.txt");
    let out = tiny_train(tmp.path(), "x", 2, &["--data", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.txt"));
    let out = tiny_train(tmp.path(), "y", 2, &["--tokenizer", "nonsense"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn probe_runs_on_a_train_mini_run_and_writes_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "p", 2, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probes = tmp.path().join("probes");
    let out = asa()
        .args(["probe", "--device", "cpu", "--num-pcs", "1", "--ckpt"])
        .arg(tmp.path().join("p"))
        .arg("--outdir")
        .arg(&probes)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris margin"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(probes.join("summary.json")).unwrap())
            .unwrap();
    assert!(summary["paris_margin_mean"].as_f64().unwrap().is_finite());
    // the other experiments on the trained run: present, shaped, finite
    let fin = |v: &serde_json::Value| v.as_f64().is_some_and(f64::is_finite);
    let tb = &summary["trajectory_basin"];
    let grid = tb["energy"].as_array().unwrap();
    assert_eq!(grid.len(), 24);
    assert!(grid.iter().flat_map(|r| r.as_array().unwrap()).all(fin));
    assert!(fin(&tb["endpoint_energy"]) && fin(&tb["baseline_energy"]));
    let sp = &summary["simplex_sphere"];
    assert_eq!(sp["endpoints"].as_array().unwrap().len(), 17);
    for e in sp["endpoints"].as_array().unwrap() {
        let n: f64 = e["sphere"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum();
        assert!((n - 1.0).abs() < 1e-9);
    }
    // the tiny run has one layer
    let ds = summary["depth_sweep"]["rows"].as_array().unwrap();
    assert_eq!(ds.len(), 1);
    assert!(fin(&ds[0]["entropy_late"]) && fin(&ds[0]["read_entropy_late"]));
    let ts = &summary["timescales"];
    assert_eq!(ts["inertia"].as_array().unwrap().len(), 1);
    let curve = ts["inertia"][0]["curve"].as_array().unwrap();
    assert_eq!(curve.len(), ts["lags"].as_u64().unwrap() as usize);
    assert!(curve.iter().all(fin));
    assert_eq!(
        ts["write"][0]["head_slot_ess"].as_array().unwrap().len(),
        2,
        "[H][K] with H = 2"
    );
    for f in [
        "paris_margin.png",
        "pca_explained_variance.png",
        "sweep_layer_00.png",
        "trajectory_basin.png",
        "simplex_sphere.png",
        "depth_sweep.png",
        "policy_inertia.png",
        "timescales_vs_layer.png",
        "half_life_heatmap.png",
        "ess_heatmap.png",
    ] {
        let len = std::fs::metadata(probes.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "{f} missing or empty");
    }
    // a missing checkpoint is one clear error
    let out = asa()
        .args(["probe", "--device", "cpu", "--ckpt", "/nonexistent/run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn eval_scores_text_on_a_train_mini_run_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "e", 2, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = tmp.path().join("test.txt");
    std::fs::write(&text, "The capital of France is Paris. ".repeat(40)).unwrap();
    let json = tmp.path().join("eval.json");
    let eval = |extra: &[&str]| {
        asa()
            .args(["eval", "--device", "cpu", "--seq-len", "16", "--ckpt"])
            .arg(tmp.path().join("e"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = asa()
        .args(["eval", "--device", "cpu", "--seq-len", "16", "--ckpt"])
        .arg(tmp.path().join("e"))
        .arg("--text")
        .arg(&text)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("perplexity"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (loss, ppl) = (
        r["loss"].as_f64().unwrap(),
        r["perplexity"].as_f64().unwrap(),
    );
    assert!(loss.is_finite() && loss > 0.0, "{r}");
    assert!((ppl - loss.exp()).abs() <= 1e-9 * ppl, "{r}");
    // windows of 17 tokens every 8 over the stream
    let n = r["stream_tokens"].as_u64().unwrap();
    assert_eq!(r["stride"].as_u64(), Some(8));
    assert_eq!(r["windows"].as_u64(), Some((n - 17) / 8 + 1));
    assert_eq!(
        r["tokens_scored"].as_u64(),
        Some(16 * r["windows"].as_u64().unwrap())
    );
    // without --text or --data: the data the run held out (the last val_frac of its text)
    let held = tmp.path().join("held.json");
    let out = eval(&["--json", held.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&held).unwrap()).unwrap();
    assert!(r["data"].as_str().unwrap().contains("held-out"), "{r}");
    assert!(r["loss"].as_f64().unwrap().is_finite(), "{r}");
    // a bad stride, --data with --text, a checkpoint file without data: one line each
    let file = tmp.path().join("e").join("model.safetensors");
    for (extra, code) in [
        (vec!["--stride-frac", "0", "--text", "x"], 1),
        (vec!["--data", "d", "--text", "x"], 2),
    ] {
        let out = eval(&extra);
        assert_eq!(out.status.code(), Some(code), "{extra:?}");
    }
    let out = asa()
        .args(["eval", "--device", "cpu", "--ckpt"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--text"));
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Paris.").unwrap();
    let out = eval(&["--text", short.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fewer than one window"), "{err}");
}

#[test]
fn generate_streams_text_writes_json_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "g", 2, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("g");
    let json = tmp.path().join("gen.json");
    let gen = |extra: &[&str]| {
        asa()
            .args(["generate", "--device", "cpu", "--ckpt"])
            .arg(&run)
            .args(extra)
            .output()
            .unwrap()
    };
    // greedy, no repetition controls, past the run's write chunk (16) so that a fold happens
    let out = gen(&[
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--no-repeat-ngram",
        "0",
        "--max-new-tokens",
        "24",
        "--ignore-eos",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.starts_with("The capital of France is"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let generated: Vec<u32> = r["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let prompt: Vec<u32> = r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(generated.len(), 24);
    assert_eq!(
        stdout.trim_end(),
        format!("The capital of France is{}", r["text"].as_str().unwrap()).trim_end()
    );
    // the same tokens by greedy decoding with repeated full forwards of the saved model
    let (lm, params, _, _) = asa::train::load_for_analysis(Some(&run), None).unwrap();
    let mut full = asa::generate::CpuFullForward::new(lm, params);
    let g = asa::generate::generate(
        &mut full,
        &prompt,
        &asa::generate::SampleOptions::greedy(24),
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(g.generated_ids, generated);
    // seeded sampling repeats itself
    let sample = |seed: &str| {
        let out = gen(&[
            "--prompt",
            "Paris is",
            "--seed",
            seed,
            "--max-new-tokens",
            "8",
        ]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(sample("3"), sample("3"));
    // bad flags and --device cuda: one line, exit 1, before any loading
    for extra in [
        vec!["--prompt", "x", "--top-p", "0"],
        vec!["--prompt", "x", "--temperature=-1"],
        vec!["--prompt", ""],
    ] {
        let out = gen(&extra);
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = asa()
        .args(["generate", "--prompt", "x", "--device", "cuda", "--ckpt"])
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device cuda"));
    let out = asa()
        .args(["generate", "--prompt", "x", "--ckpt"])
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bench_decode_reports_flat_recurrent_cost() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "b", 2, &[]);
    assert!(out.status.success());
    let json = tmp.path().join("bd.json");
    let out = asa()
        .args([
            "bench-decode",
            "--device",
            "cpu",
            "--max-len",
            "64",
            "--full-at",
            "8,64",
            "--ckpt",
        ])
        .arg(tmp.path().join("b"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    // positions 0, 1, 3, 7, 15, 31, 63; the full forward at 8 and 64 tokens (positions 7, 63)
    let pos: Vec<u64> = rows
        .iter()
        .map(|x| x["position"].as_u64().unwrap())
        .collect();
    assert_eq!(pos, vec![0, 1, 3, 7, 15, 31, 63]);
    let state: Vec<u64> = rows
        .iter()
        .map(|x| x["state_bytes"].as_u64().unwrap())
        .collect();
    assert!(state.iter().all(|&s| s == state[0] && s > 0), "{state:?}");
    assert!(rows[3]["full_forward_s"].as_f64().is_some());
    assert!(rows[6]["full_forward_s"].as_f64().is_some());
    assert!(rows[0]["full_forward_s"].is_null());
    // without --ckpt: a fresh model of the default preset
    let out = asa()
        .args([
            "bench-decode",
            "--device",
            "cpu",
            "--max-len",
            "4",
            "--full-at",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fine_tuning_starts_from_a_checkpoint_and_keeps_frozen_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "base", 2, &[]);
    assert!(out.status.success());
    let base = tmp.path().join("base");
    // train only the slotspace refine, from the base run
    let out = asa()
        .args([
            "train-mini",
            "--device",
            "cpu",
            "--name",
            "ft",
            "--steps",
            "3",
        ])
        .args([
            "--eval-interval",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
        ])
        .arg("--outdir")
        .arg(tmp.path())
        .arg("--init-from")
        .arg(&base)
        .args([
            "--trainable",
            "*.slot_{in,q,k,v,out}.weight",
            "*_slotspace_gate_raw",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("frozen:") && err.contains("weights from"),
        "{err}"
    );
    let read = |p: &Path| asa::checkpoint::read_safetensors(p).unwrap();
    let a = read(&base.join("model.safetensors"));
    let b = read(&tmp.path().join("ft").join("model.safetensors"));
    assert_eq!(a.len(), b.len());
    let mut moved = 0;
    for (k, ta) in &a {
        let same = ta.to_f32() == b[k].to_f32();
        let trains =
            k.contains(".slot_") && !k.contains("slot_keys") || k.ends_with("_slotspace_gate_raw");
        if trains {
            moved += usize::from(!same);
        } else {
            assert!(same, "{k} moved but was frozen");
        }
    }
    assert!(moved > 0, "nothing trained");
    // the fine-tune resumes with its freeze list and checkpoint model
    let out = asa()
        .args([
            "train-mini",
            "--device",
            "cpu",
            "--name",
            "ft",
            "--steps",
            "4",
            "--resume",
        ])
        .arg("--outdir")
        .arg(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("frozen:"), "{err}");
    // a model flag that contradicts the checkpoint, a pattern matching nothing, a missing
    // checkpoint: one clear line each
    for (extra, needle) in [
        (
            vec!["--embed-dim", "64"],
            "--embed-dim: 64 (the checkpoint has 32)",
        ),
        (
            vec!["--freeze", "blocks.7.*"],
            "'blocks.7.*' matches no parameter",
        ),
    ] {
        let out = asa()
            .args([
                "train-mini",
                "--device",
                "cpu",
                "--name",
                "bad",
                "--steps",
                "1",
            ])
            .arg("--outdir")
            .arg(tmp.path())
            .arg("--init-from")
            .arg(&base)
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!tmp.path().join("bad").join("model.safetensors").exists());
    }
    let out = asa()
        .args([
            "train-mini",
            "--device",
            "cpu",
            "--name",
            "bad2",
            "--init-from",
        ])
        .arg(tmp.path().join("nope"))
        .arg("--outdir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}

#[test]
fn infos_writes_every_layers_tensors_with_their_descriptions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "i", 2, &[]);
    assert!(out.status.success());
    let file = tmp.path().join("infos.safetensors");
    let run = |extra: &[&str]| {
        asa()
            .args(["infos", "--device", "cpu", "--ckpt"])
            .arg(tmp.path().join("i"))
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[
        "--prompt",
        "The capital of France is",
        "Paris",
        "--layers",
        "0",
        "--logits",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (t, meta) = asa::checkpoint::read_safetensors_with_metadata(&file).unwrap();
    let ids = t["prompt0.input_ids"].to_f32().unwrap();
    let n = ids.len();
    // the tiny run: 2 heads, 4 slots, one layer
    let rw = &t["prompt0.layer0.read_weights"];
    assert_eq!(rw.shape, vec![1, 2, n, 4]);
    for row in rw.to_f32().unwrap().chunks(4) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "{row:?}");
    }
    assert_eq!(t["prompt0.layer0.write_logits"].shape, vec![1, 2, 4, n]);
    assert_eq!(t["prompt0.layer0.slot_state_norm"].shape, vec![1, 2, 4, n]);
    assert_eq!(t["prompt0.layer0.slotspace_delta"].shape[3], 16);
    assert!(t.contains_key("prompt1.layer0.read_weights"));
    assert_eq!(t["prompt1.logits"].shape[2], 50257);
    let keys: serde_json::Value = serde_json::from_str(&meta["keys"]).unwrap();
    assert!(keys["read_weights"].as_str().unwrap().contains("[B,H,T,K]"));
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    assert_eq!(prompts, vec!["The capital of France is", "Paris"]);
    // a layer that does not exist, no text, cuda: one line, exit 1
    for extra in [
        vec![
            "--prompt",
            "x",
            "--layers",
            "3",
            "--out",
            file.to_str().unwrap(),
        ],
        vec!["--out", file.to_str().unwrap()],
    ] {
        let o = run(&extra);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
    }
}

#[test]
fn forward_controls_reach_infos_eval_generate_and_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "fc", 2, &[]);
    assert!(out.status.success());
    let ckpt = tmp.path().join("fc");
    let file = tmp.path().join("infos.safetensors");
    let run = |args: &[&str]| asa().args(args).arg("--ckpt").arg(&ckpt).output().unwrap();
    let infos = |extra: &[&str]| {
        let mut a = vec![
            "infos",
            "--device",
            "cpu",
            "--prompt",
            "The capital of France is",
            "--out",
            file.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = run(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        asa::checkpoint::read_safetensors_with_metadata(&file).unwrap()
    };
    // top-2 routing: at most two slots read per row, still a distribution
    let (t, meta) = infos(&["--routing-mode", "topk", "--routing-topk", "2"]);
    for row in t["prompt0.layer0.read_weights"].to_f32().unwrap().chunks(4) {
        assert!(row.iter().filter(|&&w| w > 0.0).count() <= 2, "{row:?}");
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert!(meta["forward_controls"].contains("topk"));
    // a masked slot is never read
    let (t, _) = infos(&["--slot-mask", "1,3"]);
    for row in t["prompt0.layer0.read_weights"].to_f32().unwrap().chunks(4) {
        assert_eq!((row[1], row[3]), (0.0, 0.0), "{row:?}");
    }
    // noise changes the reads, and the noise seed makes them repeatable
    let noisy = |seed: &str| {
        let (t, _) = infos(&[
            "--routing-noise",
            "gumbel",
            "--routing-noise-scale",
            "1.0",
            "--noise-seed",
            seed,
        ]);
        t["prompt0.layer0.read_weights"].to_f32().unwrap()
    };
    let (plain, _) = infos(&[]);
    let plain = plain["prompt0.layer0.read_weights"].to_f32().unwrap();
    let (a, b, c) = (noisy("1"), noisy("1"), noisy("2"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, plain);

    // eval: a slot mask changes the loss and is recorded in the report
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "The capital of France is Paris. ".repeat(40)).unwrap();
    let eval = |extra: &[&str], json: &Path| {
        let mut a = vec![
            "eval",
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--max-windows",
            "4",
            "--text",
            text.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = run(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        v
    };
    let e0 = eval(&[], &tmp.path().join("e0.json"));
    let e1 = eval(&["--slot-mask", "0,1,2"], &tmp.path().join("e1.json"));
    assert_ne!(e0["loss"], e1["loss"]);
    assert!(e0.get("forward_controls").is_none());
    assert_eq!(
        e1["forward_controls"]["slot_mask"],
        serde_json::json!([0, 1, 2])
    );

    // generate: with controls it decodes by full forwards on the CPU, repeatably
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--device",
            "cpu",
            "--prompt",
            "The capital",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let g1 = gen(&["--routing-mode", "top1"]);
    assert!(
        g1.status.success(),
        "{}",
        String::from_utf8_lossy(&g1.stderr)
    );
    assert!(String::from_utf8_lossy(&g1.stderr).contains("full forward"));
    assert_eq!(gen(&["--routing-mode", "top1"]).stdout, g1.stdout);

    // probe: the controls are noted in the summary
    let probes = tmp.path().join("probes");
    let o = run(&[
        "probe",
        "--device",
        "cpu",
        "--experiments",
        "3",
        "--slot-mask",
        "0",
        "--outdir",
        probes.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = std::fs::read_to_string(probes.join("summary.json")).unwrap();
    assert!(s.contains("forward controls"));

    // bad combinations: one line, exit 1, naming the flag
    for (args, needle) in [
        (
            vec!["--routing-topk", "2"],
            "--routing-topk applies to --routing-mode topk",
        ),
        (
            vec!["--routing-mode", "topk", "--routing-topk", "9"],
            "more than the model's 4 slots",
        ),
        (vec!["--routing-mode", "external"], "library option"),
        (vec!["--routing-mode", "sharp"], "unknown mode 'sharp'"),
        (
            vec!["--routing-noise", "gumbel"],
            "needs --routing-noise-scale",
        ),
        (vec!["--routing-noise-scale", "1"], "needs --routing-noise"),
        (
            vec!["--routing-noise", "uniform", "--routing-noise-scale", "1"],
            "unknown kind",
        ),
        (
            vec!["--routing-noise", "gumbel", "--routing-noise-scale", "0"],
            "> 0",
        ),
        (vec!["--noise-seed", "3"], "needs --routing-noise"),
        (vec!["--slot-mask", "9"], "slot 9 does not exist"),
        (
            vec!["--slot-mask", "0,1,2,3"],
            "at least one slot must stay",
        ),
        (vec!["--slot-mask-where", "read"], "need --slot-mask"),
        (
            vec!["--slot-mask", "0", "--slot-mask-scope", "first"],
            "unknown slot_mask_scope",
        ),
        (
            vec!["--intervention", "{\"_intv_mode\": \"orth_gate\"}"],
            "add --variant intervene",
        ),
        (
            vec![
                "--variant",
                "intervene",
                "--intervention",
                "{\"_intv_mode\": \"sideways\"}",
            ],
            "--intervention",
        ),
        (vec!["--intervention", "not json"], "neither a JSON object"),
        (vec!["--variant", "online"], "online variant"),
        (vec!["--variant", "sideways"], "--variant: unknown variant"),
    ] {
        for cmd in ["infos", "eval", "probe"] {
            let mut a = vec![cmd, "--device", "cpu"];
            match cmd {
                "infos" => a.extend(["--prompt", "x", "--out", file.to_str().unwrap()]),
                "eval" => a.extend(["--text", text.to_str().unwrap(), "--seq-len", "16"]),
                _ => a.extend(["--experiments", "3", "--outdir", probes.to_str().unwrap()]),
            }
            a.extend_from_slice(&args);
            let o = run(&a);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{cmd} {args:?}: {err}");
            assert!(err.contains(needle), "{cmd} {args:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{cmd} {args:?}: {err}");
        }
    }
    let o = run(&[
        "generate",
        "--device",
        "cuda",
        "--prompt",
        "The capital",
        "--routing-mode",
        "top1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("full forward per token on the CPU"));
    // the intervene variant runs a baseline checkpoint with an intervention
    let (t, _) = infos(&[
        "--variant",
        "intervene",
        "--intervention",
        "{\"_intv_mode\": \"delta_par\", \"_intv_beta\": 0.5}",
    ]);
    assert!(t.contains_key("prompt0.layer0.read_weights"));
}

#[test]
fn recall_scores_pairs_and_compares_with_a_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_train(tmp.path(), "rc", 2, &[]);
    assert!(out.status.success());
    let ckpt = tmp.path().join("rc");
    let outdir = tmp.path().join("recall");
    let run = |extra: &[&str]| {
        asa()
            .args(["recall", "--device", "cpu", "--ckpt"])
            .arg(&ckpt)
            .arg("--outdir")
            .arg(&outdir)
            .args(extra)
            .output()
            .unwrap()
    };
    // the same checkpoint as its own base: every change is zero
    let o = run(&["--base", ckpt.to_str().unwrap(), "--max-new-tokens", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("exact match"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(outdir.join("recall.json")).unwrap())
            .unwrap();
    let pairs = r["model"]["pairs"].as_array().unwrap();
    assert!(pairs.len() > 300, "{}", pairs.len());
    for p in pairs {
        let rank = p["rank"].as_u64().unwrap();
        let pt = p["p_target"].as_f64().unwrap();
        assert!((1..=50257).contains(&rank) && pt > 0.0 && pt <= 1.0, "{p}");
        // rank 1 exactly when the top-1 token is the completion
        assert_eq!(rank == 1, p["top1_id"] == p["target_id"], "{p}");
    }
    for (task, c) in r["change"].as_object().unwrap() {
        for k in [
            "exact_match",
            "top1_accuracy",
            "median_rank",
            "mean_p_target",
        ] {
            assert_eq!(c[k].as_f64().unwrap(), 0.0, "{task} {k}");
        }
    }
    assert!(r["model"]["by_task"]["capital"]["n"].as_u64().unwrap() > 100);
    assert!(std::fs::metadata(outdir.join("recall.png")).unwrap().len() > 1000);
    // a pairs file of one's own
    let pf = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pf,
        "{\"prompt\": \"The capital of France is\", \"completion\": \" Paris\", \"tag\": \"capital\"}\n\
         {\"prompt\": \"The capital of Italy is\", \"completion\": \" Rome\"}\n\
         {\"prompt\": \"A long one is\", \"completion\": \" antidisestablishmentarianism\"}\n",
    )
    .unwrap();
    let o = run(&["--pairs", pf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(outdir.join("recall.json")).unwrap())
            .unwrap();
    assert_eq!(r["model"]["pairs"].as_array().unwrap().len(), 2);
    assert_eq!(r["dropped"].as_array().unwrap().len(), 1);
    assert!(r["base"].is_null());
    // bad inputs: one line, exit 1
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"x\"}\n").unwrap();
    let multi = tmp.path().join("multi.jsonl");
    std::fs::write(
        &multi,
        "{\"prompt\": \"x\", \"completion\": \" antidisestablishmentarianism\"}\n",
    )
    .unwrap();
    for (extra, needle) in [
        (vec!["--max-new-tokens", "0"], "--max-new-tokens"),
        (
            vec!["--pairs", "/nonexistent/p.jsonl"],
            "/nonexistent/p.jsonl",
        ),
        (vec!["--pairs", bad.to_str().unwrap()], "line 1"),
        (vec!["--pairs", multi.to_str().unwrap()], "one token"),
        (vec!["--base", "/nonexistent/run"], "/nonexistent/run"),
    ] {
        let o = run(&extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
    }
}
