//! Exact resume of `asa train`: a run killed with SIGKILL at arbitrary moments (during steps and
//! during saves) and resumed from its last checkpoint each time ends with weights and per-step
//! losses bit-identical to an uninterrupted run. Also the data and non-finite guards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "support/runs.rs"]
mod runs;
use runs::{asa, prepare_with, write_config};

fn prepare(dir: &Path) -> PathBuf {
    prepare_with(dir, "byte")
}

fn train(cfg: &Path, resume: bool) -> std::process::Output {
    let mut c = asa();
    c.args(["train", "--device", "cpu", "--config"]).arg(cfg);
    if resume {
        c.arg("--resume");
    }
    c.output().unwrap()
}

/// (step, loss, grad_norm) of every step in a run's metrics, in order.
fn losses(run: &Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].to_string(),
                v["grad_norm"].to_string(),
            )
        })
        .collect()
}

#[test]
fn killed_and_resumed_run_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let straight = write_config(tmp.path(), &data, "straight", "");
    let out = train(&straight, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let killed = write_config(tmp.path(), &data, "killed", "");
    let run = tmp.path().join("runs/killed");
    // kill at a spread of moments: a few milliseconds in (before or during the first save), and
    // later, at points that fall anywhere in a step or a save
    let mut kills = 0;
    for delay_ms in [40u64, 90, 150, 230, 330] {
        let resume = run.join("checkpoint.safetensors").is_file();
        let mut c = asa();
        c.args(["train", "--device", "cpu", "--config"])
            .arg(&killed)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // a run killed before its first checkpoint left metrics.jsonl only: start it over
        c.arg(if resume { "--resume" } else { "--force" });
        let mut child = c.spawn().unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 1,
        "the run finished before any kill: make it longer"
    );
    // finish it (unless a try ran to the end before its kill: resuming a finished run is an error)
    let state = std::fs::read_to_string(run.join("train_state.json")).unwrap_or_default();
    let done = serde_json::from_str::<serde_json::Value>(&state)
        .is_ok_and(|v| v["step"].as_u64() == Some(40));
    if !done {
        let resume = run.join("checkpoint.safetensors").is_file();
        let mut c = asa();
        c.args(["train", "--device", "cpu", "--config"])
            .arg(&killed);
        c.arg(if resume { "--resume" } else { "--force" });
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let a = asa::checkpoint::read_safetensors(&tmp.path().join("runs/straight/model.safetensors"))
        .unwrap();
    let b = asa::checkpoint::read_safetensors(&run.join("model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, ta) in &a {
        assert!(
            ta.to_f32() == b[k].to_f32(),
            "{k} differs after {kills} kills and resumes"
        );
    }
    let la = losses(&tmp.path().join("runs/straight"));
    let lb = losses(&run);
    assert_eq!(la.len(), 40);
    assert_eq!(
        la, lb,
        "per-step losses differ after {kills} kills and resumes"
    );
}

#[test]
fn bad_data_is_a_clear_error_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // wrong vocabulary: the model expects GPT-2's
    let cfg = write_config(tmp.path(), &data, "vocab", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("vocab_size = 256", "vocab_size = 50257");
    std::fs::write(&cfg, text).unwrap();
    let out = train(&cfg, false);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vocab"), "{err}");
    assert!(!tmp
        .path()
        .join("runs/vocab/checkpoint.safetensors")
        .exists());
    // truncated shard
    let shard = data.join("train_000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    let cfg = write_config(tmp.path(), &data, "trunc", "");
    let out = train(&cfg, false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("train_000.bin"));
    // missing data folder
    let cfg = write_config(tmp.path(), &tmp.path().join("nothing"), "none", "");
    let out = train(&cfg, false);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn non_finite_loss_stops_with_the_last_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // a learning rate this large blows the weights up within a few steps
    let cfg = write_config(tmp.path(), &data, "nan", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("learning_rate = 3e-3", "learning_rate = 1e30");
    std::fs::write(&cfg, text).unwrap();
    let out = train(&cfg, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("non-finite"), "{err}");
    // whatever was saved before is loadable and finite
    let run = tmp.path().join("runs/nan");
    if run.join("checkpoint.safetensors").exists() {
        let t = asa::checkpoint::read_safetensors(&run.join("checkpoint.safetensors")).unwrap();
        for (k, v) in &t {
            assert!(
                v.to_f32().unwrap().iter().all(|x| x.is_finite()),
                "{k} is not finite in the saved checkpoint"
            );
        }
    }
    // with skip_nonfinite the run goes on, counting the skipped steps
    let cfg = write_config(tmp.path(), &data, "skip", "skip_nonfinite = true");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("learning_rate = 3e-3", "learning_rate = 1e30");
    std::fs::write(&cfg, text).unwrap();
    let out = train(&cfg, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("runs/skip/train_state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["skipped_steps"].as_u64().unwrap() > 0);
}
