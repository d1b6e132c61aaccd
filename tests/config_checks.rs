//! Run configs, model configs and command flags: every bad value is one clear error line that
//! names the key or flag, with exit code 1, and nothing is allocated for a model that cannot fit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use asa::checkpoint;
use asa::config::ModelConfig;
use asa::train::read_run_config;

fn asa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asa"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A small, valid run config; `extra` lines are appended (a key given twice is a TOML error, so
/// the base leaves out what the cases set).
fn toml_with(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "data = \"data/none\"\nvocab_size = 97\nnum_layers = 1\nnum_slots = 4\n\
             slotspace_dim = 4\nmax_seq_len = 16\n{extra}\n"
        ),
    )
    .unwrap();
    p
}

fn config_error(dir: &Path, extra: &str) -> String {
    let p = toml_with(dir, "c.toml", extra);
    match read_run_config(&p) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(e) => e.to_string(),
    }
}

/// stderr of a failed command: exactly one `error:` line and exit code 1.
fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| {
            !l.starts_with("device:") && !l.starts_with("note:") && !l.starts_with("bench: ")
        })
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    lines[0].to_string()
}

#[test]
fn the_base_config_is_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = read_run_config(&toml_with(tmp.path(), "c.toml", "")).unwrap();
    assert_eq!(m.vocab_size, 97);
    assert_eq!(r.batch_size, 64);
    // the shipped configs too
    for name in ["cpu-small.toml", "practice-run.toml"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(name);
        read_run_config(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn unknown_toml_keys_are_rejected_with_the_closest_key() {
    let tmp = tempfile::tempdir().unwrap();
    let e = config_error(tmp.path(), "embedd_dim = 64");
    assert!(
        e.contains("`embedd_dim`") && e.contains("did you mean `embed_dim`?"),
        "{e}"
    );
    let e = config_error(tmp.path(), "learning_rte = 1e-3");
    assert!(e.contains("did you mean `learning_rate`?"), "{e}");
    let e = config_error(tmp.path(), "warmup = 10");
    assert!(e.contains("`warmup`") && e.contains("warmup_steps"), "{e}");
    // nothing close: still rejected, without a wild guess
    let e = config_error(tmp.path(), "zzzzzzzzzzzzzzzzzzzz = 1");
    assert!(e.contains("unknown key `zzzzzzzzzzzzzzzzzzzz`") && !e.contains("did you mean"));
    // a table is not a place for model fields
    let e = config_error(tmp.path(), "[model]\nembed_dim = 64");
    assert!(e.contains("unknown key `model`"), "{e}");
}

#[test]
fn reference_json_configs_pass_and_typos_in_them_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    // the `model` object of a fixture is the reference's asdict(ASMTrainConfig)
    let text = std::fs::read_to_string(fixtures().join("lm_full/config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut obj = v["model"].as_object().unwrap().clone();
    obj.insert("data".into(), "data/none".into());
    let good = tmp.path().join("ref.json");
    std::fs::write(&good, serde_json::to_string(&obj).unwrap()).unwrap();
    let (m, r) = read_run_config(&good).unwrap();
    assert_eq!((m.embed_dim, r.warmup_steps), (48, 1000));
    // the notebooks' extra fields are reference fields too
    obj.insert("eval_max_batches".into(), 150.into());
    obj.insert("output_dir".into(), "./out".into());
    std::fs::write(&good, serde_json::to_string(&obj).unwrap()).unwrap();
    read_run_config(&good).unwrap();
    obj.insert("num_slot".into(), 4.into());
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_string(&obj).unwrap()).unwrap();
    let e = read_run_config(&bad).unwrap_err().to_string();
    assert!(e.contains("`num_slot`") && e.contains("`num_slots`"), "{e}");
    // an alias the reference's loader maps is not one of its field names: not in a run config
    obj.remove("num_slot");
    obj.insert("n_layer".into(), 3.into());
    std::fs::write(&bad, serde_json::to_string(&obj).unwrap()).unwrap();
    assert!(read_run_config(&bad).is_err());
}

#[test]
fn nan_and_inf_in_toml_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    for (line, want) in [
        (
            "learning_rate = nan",
            "`learning_rate = NaN` is not a finite number",
        ),
        (
            "grad_clip = inf",
            "`grad_clip = inf` is not a finite number",
        ),
        ("dropout = -inf", "`dropout = -inf` is not a finite number"),
        (
            "betas = [0.9, nan]",
            "`betas[1] = NaN` is not a finite number",
        ),
        (
            "mlp_ratio = inf",
            "`mlp_ratio = inf` is not a finite number",
        ),
    ] {
        let e = config_error(tmp.path(), line);
        assert!(e.contains(want), "{line}: {e}");
        assert!(!e.contains("null"), "{line}: {e}");
    }
}

#[test]
fn every_numeric_field_is_range_checked_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    for (line, field) in [
        ("learning_rate = 0.0", "learning_rate"),
        ("learning_rate = -1.0", "learning_rate"),
        ("min_lr = -0.1", "min_lr"),
        ("learning_rate = 1e-3\nmin_lr = 1e-2", "min_lr"),
        ("grad_clip = -1.0", "grad_clip"),
        ("grad_clip = 0.0", "grad_clip"),
        ("betas = [1.0, 0.95]", "betas[0]"),
        ("betas = [0.9, -0.1]", "betas[1]"),
        ("betas = [0.9]", "betas"),
        ("weight_decay = -0.01", "weight_decay"),
        ("warmup_steps = 200\ntotal_steps = 100", "warmup_steps"),
        ("batch_size = 0", "batch_size"),
        ("total_steps = 0\nwarmup_steps = 0", "total_steps"),
        ("eval_interval = 0", "eval_interval"),
        ("val_windows = 0", "val_windows"),
        ("grad_accum_steps = 0", "grad_accum_steps"),
        ("batch_size = 8\nmicro_batch_size = 3", "micro_batch_size"),
        ("stride_frac_val = 0.0", "stride_frac_val"),
        ("precision = \"fp8\"", "precision"),
        ("name = \"../elsewhere\"", "name"),
        ("dropout = 1.0", "dropout"),
        ("slot_dropout = -0.1", "slot_dropout"),
        ("slotspace_dropout = 1.5", "slotspace_dropout"),
        ("embed_dim = 0", "embed_dim"),
        ("num_heads = 0", "num_heads"),
        ("embed_dim = 50\nnum_heads = 4", "num_heads"),
        ("embed_dim = 12\nnum_heads = 4", "head_dim"),
        ("num_slots_x = 1", "num_slots"),
        ("write_chunk_size = 0", "write_chunk_size"),
        ("slotspace_chunk_size = 0", "slotspace_chunk_size"),
        ("mlp_ratio = 0.0", "mlp_ratio"),
        ("read_temperature = 0.0", "read_temperature"),
        ("write_temperature = -1.0", "write_temperature"),
        ("rope_base = 0.0", "rope_base"),
        ("min_strength = -1.0", "min_strength"),
        ("content_read_max_gamma = -1.0", "content_read_max_gamma"),
        ("embed_dim = -1", "embed_dim"),
        ("embed_dim = 2.5", "embed_dim"),
        ("embed_dim = \"wide\"", "embed_dim"),
        ("tie_weights = 1", "tie_weights"),
        ("variant = \"fast\"", "variant"),
        ("data = 3", "data"),
    ] {
        let e = config_error(tmp.path(), line);
        assert!(
            e.contains(field),
            "{line}: error does not name {field}: {e}"
        );
        assert!(e.starts_with("config error:"), "{line}: {e}");
    }
}

#[test]
fn huge_models_are_refused_quickly_and_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, extra) in ["embed_dim = 1048576", "num_layers = 100000"]
        .iter()
        .enumerate()
    {
        let p = tmp.path().join(format!("big{i}.toml"));
        std::fs::write(
            &p,
            format!("data = \"{}\"\n{extra}\n", tmp.path().display()),
        )
        .unwrap();
        let t0 = Instant::now();
        let out = asa()
            .args(["train", "--device", "cpu", "--config"])
            .arg(&p)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let line = one_error_line(&out);
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{extra}: took {:?}",
            t0.elapsed()
        );
        assert!(
            line.contains("parameters") && line.contains("available") && line.contains("GiB"),
            "{extra}: {line}"
        );
    }
    // sizes whose parameter count overflows 64 bits are refused by the same guard
    let cfg = ModelConfig {
        embed_dim: 1 << 40,
        num_heads: 1,
        ..Default::default()
    };
    assert!(cfg.validate().unwrap_err().to_string().contains("overflow"));
}

#[test]
fn every_fixture_config_still_loads() {
    let mut n = 0;
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let dir = e.unwrap().path();
        let cfg = dir.join("config.json");
        if !cfg.is_file() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        if v.get("model").is_some() {
            ModelConfig::from_json_value(&v)
                .unwrap_or_else(|e| panic!("{}: {e}", cfg.display()))
                .validate()
                .unwrap();
            let st = dir.join("model.safetensors");
            if st.is_file() {
                let ck = checkpoint::read_checkpoint(&st)
                    .unwrap_or_else(|e| panic!("{}: {e}", st.display()));
                assert!(ck.config.is_some(), "{}", st.display());
            }
            n += 1;
        }
    }
    assert!(n >= 8, "only {n} fixture model configs found");
    // the reference .pt's own cfg
    let ck = checkpoint::read_checkpoint(&fixtures().join("legacy_pt/checkpoint.pt")).unwrap();
    assert_eq!(ck.config.unwrap().embed_dim, 48);
}

#[test]
fn unknown_keys_beside_a_checkpoint_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("lm_full").join(f), tmp.path().join(f)).unwrap();
    }
    let cpath = tmp.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    v["model"]["num_layer"] = 2.into();
    std::fs::write(&cpath, serde_json::to_string(&v).unwrap()).unwrap();
    let e = checkpoint::read_checkpoint(&tmp.path().join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`num_layer`") && e.contains("`num_layers`"),
        "{e}"
    );
    // the reference loader's aliases are mapped as it maps them
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lm_full/config.json")).unwrap(),
    )
    .unwrap();
    let m = v["model"].as_object_mut().unwrap();
    let layers = m.remove("num_layers").unwrap();
    m.insert("n_layer".into(), layers);
    let c = ModelConfig::from_json_value(&v).unwrap();
    assert_eq!(c.num_layers, 2);
}

#[test]
fn bench_flags_are_checked_and_steps_are_shown() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, flag) in [
        (&["--iters", "0"][..], "--iters"),
        (&["--threads", "0"][..], "--threads"),
        (
            &["--config", "cpu-smal"][..],
            "preset (cpu-small, practice-run, cpu-asa)",
        ),
    ] {
        let out = asa()
            .args(["bench", "--device", "cpu"])
            .args(args)
            .output()
            .unwrap();
        let line = one_error_line(&out);
        assert!(line.contains(flag), "{line}");
    }
    // progress: one line per warmup and timed step on stderr
    let p = toml_with(
        tmp.path(),
        "tiny.toml",
        "embed_dim = 16\nnum_heads = 2\nbatch_size = 2",
    );
    let out = asa()
        .args([
            "bench", "--device", "cpu", "--warmup", "1", "--iters", "2", "--config",
        ])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("bench: warmup 1/1"), "{err}");
    assert!(
        err.contains("bench: step 1/2") && err.contains("bench: step 2/2"),
        "{err}"
    );
    // a bench report that cannot be written is not a "checkpoint error"
    let out = asa()
        .args([
            "bench", "--device", "cpu", "--iters", "1", "--warmup", "0", "--json",
        ])
        .arg(tmp.path().join("no/such/dir/b.json"))
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    let line = one_error_line(&out);
    assert!(!line.contains("checkpoint"), "{line}");
}

#[test]
fn probe_and_prepare_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "some text to prepare\n").unwrap();
    let out_dir = tmp.path().join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["probe".into(), "--window".into(), "0".into()],
            "--window",
        ),
        (
            vec!["probe".into(), "--num-pcs".into(), "0".into()],
            "--num-pcs",
        ),
        (
            vec![
                "prepare".into(),
                text.display().to_string(),
                "--outdir".into(),
                out_dir.display().to_string(),
                "--val-frac".into(),
                "1.5".into(),
            ],
            "--val-frac",
        ),
        (
            vec![
                "prepare".into(),
                text.display().to_string(),
                "--outdir".into(),
                out_dir.display().to_string(),
                "--val-frac".into(),
                "0".into(),
            ],
            "--val-frac",
        ),
        (
            vec![
                "prepare".into(),
                text.display().to_string(),
                "--outdir".into(),
                out_dir.display().to_string(),
                "--shard-tokens".into(),
                "0".into(),
            ],
            "--shard-tokens",
        ),
    ];
    for (args, flag) in cases {
        let out = asa().args(&args).output().unwrap();
        let line = one_error_line(&out);
        assert!(line.contains(flag), "{args:?}: {line}");
    }
    assert!(
        !out_dir.exists(),
        "a refused prepare wrote {}",
        out_dir.display()
    );
    // an output folder that is a file: said before any work, naming the flag
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for cmd in ["smoke", "probe"] {
        let out = asa()
            .args([cmd, "--device", "cpu", "--outdir"])
            .arg(&file)
            .output()
            .unwrap();
        let line = one_error_line(&out);
        assert!(
            line.contains("--outdir") && line.contains("is a file"),
            "{cmd}: {line}"
        );
    }

    // --layers past the model's layers: a byte-vocabulary model of 2 layers
    let cfg = ModelConfig {
        vocab_size: 256,
        embed_dim: 16,
        num_layers: 2,
        num_heads: 2,
        num_slots: 4,
        slotspace_dim: 4,
        max_seq_len: 32,
        mlp_bias: Some(true),
        ..Default::default()
    };
    let (_, params) = asa::model::lm::Lm::new(&cfg).unwrap();
    let st = tmp.path().join("m.safetensors");
    checkpoint::save_params(&st, &params, cfg.tie_weights, Some(&cfg)).unwrap();
    let out = asa()
        .args([
            "probe",
            "--device",
            "cpu",
            "--tokenizer",
            "byte",
            "--layers",
            "0,5",
        ])
        .arg("--ckpt")
        .arg(&st)
        .arg("--outdir")
        .arg(tmp.path().join("probe"))
        .output()
        .unwrap();
    let line = one_error_line(&out);
    assert!(line.contains("--layers") && line.contains('5'), "{line}");
}

/// Mutated run configs (byte flips, truncations, digit changes, inserted keys) end in a valid
/// config or a clear error: never a panic, and never a model allocated (`read_run_config` only
/// validates; the size guard refuses what could not be built).
#[test]
fn mutated_run_configs_load_or_fail_cleanly() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/cpu-small.toml"))
        .unwrap();
    let json = {
        let text = std::fs::read_to_string(fixtures().join("lm_full/config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut obj = v["model"].as_object().unwrap().clone();
        obj.insert("data".into(), "data/none".into());
        serde_json::to_vec_pretty(&obj).unwrap()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let (mut ok, mut refused) = (0, 0);
    for case in 0..2000 {
        let (src, ext) = if case % 2 == 0 {
            (&base, "toml")
        } else {
            (&json, "json")
        };
        let mut b = src.clone();
        match rng.gen_range(0..5) {
            0 => {
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..b.len());
                    b[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            1 => b.truncate(rng.gen_range(0..b.len())),
            2 => {
                // a digit becomes another (sizes, rates and steps change, often out of range)
                let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
                let i = digits[rng.gen_range(0..digits.len())];
                b[i] = b"0123456789-"[rng.gen_range(0..11)];
            }
            3 => {
                let i = rng.gen_range(0..b.len());
                let junk: &[u8] = [
                    &b"nan"[..],
                    b"inf",
                    b"1e308",
                    b"-1",
                    b"99999999999",
                    b"\"x\"",
                ][rng.gen_range(0..6)];
                b.splice(i..i, junk.iter().copied());
            }
            _ => {
                // a huge size
                let text = String::from_utf8_lossy(&b).to_string();
                let key = [
                    "embed_dim",
                    "num_layers",
                    "vocab_size",
                    "num_slots",
                    "max_seq_len",
                ][rng.gen_range(0..5)];
                b = text
                    .replacen(&format!("{key} = "), &format!("{key} = 4000000"), 1)
                    .replacen(&format!("\"{key}\": "), &format!("\"{key}\": 4000000"), 1)
                    .into_bytes();
            }
        }
        let p = tmp.path().join(format!("m.{ext}"));
        std::fs::write(&p, &b).unwrap();
        match std::panic::catch_unwind(|| read_run_config(&p)) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                let m = e.to_string();
                assert!(!m.contains('\n'), "case {case}: not one line: {m}");
                refused += 1;
            }
            Err(_) => panic!(
                "case {case}: read_run_config panicked on\n{}",
                String::from_utf8_lossy(&b)
            ),
        }
    }
    assert!(ok > 100 && refused > 700, "ok {ok}, refused {refused}");
}
