//! Run folders of `asa train` and `asa train-mini`: an existing run is never overwritten without
//! `--force`, one process at a time holds a run, run names stay inside `--outdir`, `best/` is a
//! whole snapshot that resumes exactly, leftovers of killed saves are removed, `--resume` refuses
//! a changed config, and `probe` reads runs of `asa train`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "support/runs.rs"]
mod runs;
use runs::{asa, copy_dir, prepare_with, write_config};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

fn fails(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    stderr(o)
}

fn prepare(dir: &Path) -> PathBuf {
    prepare_with(dir, "byte")
}

fn train(cfg: &Path, args: &[&str]) -> Output {
    asa()
        .args(["train", "--device", "cpu", "--config"])
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

/// A tiny train-mini run on the embedded text with byte tokens.
fn mini(outdir: &Path, args: &[&str]) -> Output {
    asa()
        .args([
            "train-mini",
            "--device",
            "cpu",
            "--tokenizer",
            "byte",
            "--embed-dim",
            "16",
            "--num-layers",
            "1",
            "--num-heads",
            "2",
            "--num-slots",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--eval-interval",
            "2",
            "--outdir",
        ])
        .arg(outdir)
        .args(args)
        .output()
        .unwrap()
}

/// (step, loss, grad_norm, val_loss) of every record of a run's metrics, in order.
fn metrics(run: &Path) -> Vec<(u64, String, String, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].to_string(),
                v["grad_norm"].to_string(),
                v["val_loss"].to_string(),
            )
        })
        .collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The id of a process that has exited (and been reaped): a pid no live process has, for now.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn an_existing_run_is_kept_without_resume_or_force() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    ok(&mini(&runs, &["--steps", "4"]));
    let run = runs.join("mini");
    let ckpt = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let m = std::fs::read(run.join("metrics.jsonl")).unwrap();
    // the same command again: refused, nothing touched
    let err = fails(&mini(&runs, &["--steps", "6"]));
    assert!(
        err.contains("already holds a run") && err.contains("--resume") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        ckpt
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), m);
    // a run killed before its first checkpoint (metrics only) is a run too
    let half = runs.join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("metrics.jsonl"), "{\"step\":1,\"loss\":5.0}\n").unwrap();
    let err = fails(&mini(&runs, &["--name", "half", "--steps", "2"]));
    assert!(err.contains("metrics.jsonl"), "{err}");
    let err = fails(&mini(
        &runs,
        &["--name", "half", "--steps", "2", "--resume"],
    ));
    assert!(
        err.contains("no run to resume") && err.contains("--force"),
        "{err}"
    );
    // --force replaces the run: its files are the new run's
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let out = mini(&runs, &["--steps", "6", "--force"]);
    ok(&out);
    assert!(
        stderr(&out).contains("deleted the previous run"),
        "{}",
        stderr(&out)
    );
    assert_eq!(metrics(&run).len(), 6);
    assert_eq!(json(&run.join("train_state.json"))["step"], 6);
    assert_eq!(
        std::fs::read_to_string(run.join("notes.txt")).unwrap(),
        "mine"
    );
    // --resume and --force together: a usage error
    assert_eq!(mini(&runs, &["--resume", "--force"]).status.code(), Some(2));

    // the same for `asa train`
    let data = prepare(tmp.path());
    let cfg = write_config(tmp.path(), &data, "t", "total_steps = 3\nwarmup_steps = 1");
    ok(&train(&cfg, &[]));
    let trun = runs.join("t");
    let before = std::fs::read(trun.join("checkpoint.safetensors")).unwrap();
    let err = fails(&train(&cfg, &[]));
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(trun.join("checkpoint.safetensors")).unwrap(),
        before
    );
    ok(&train(&cfg, &["--force"]));
}

#[test]
fn run_names_stay_inside_outdir() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let abs = tmp.path().join("abs").display().to_string();
    for name in ["../x", "a/b", "..", ".", "", abs.as_str(), "a\\b"] {
        let err = fails(&mini(&runs, &["--name", name, "--steps", "2"]));
        assert!(err.contains("not a valid run name"), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("abs").exists());
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0);
    let data = tmp.path().join("nodata");
    for (key, extra) in [
        ("name", "name = \"../up\""),
        ("name", "name = \"\""),
        ("tag", "tag = \"..\""),
    ] {
        let cfg = write_config(tmp.path(), &data, "n", "");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("name = \"n\"\n", &format!("{extra}\n"));
        std::fs::write(&cfg, text).unwrap();
        let err = fails(&train(&cfg, &[]));
        assert!(
            err.contains("not a valid run name") && err.contains(key),
            "{err}"
        );
    }
    assert!(!tmp.path().join("up").exists());
}

#[test]
fn one_process_at_a_time_holds_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let run = runs.join("mini");
    {
        let _held = asa::train::RunLock::acquire(&run).unwrap();
        let err = fails(&mini(&runs, &["--steps", "2"]));
        assert!(
            err.contains("in use by another asa process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(!run.join("checkpoint.safetensors").exists());
    }
    // a lock file left by a process that died: explained and taken over
    let pid = dead_pid();
    std::fs::write(
        run.join(".lock"),
        format!("pid={pid}\nhost=elsewhere-or-here\nstarted_unix=1\n"),
    )
    .unwrap();
    let out = mini(&runs, &["--steps", "2"]);
    ok(&out);
    assert!(
        stderr(&out).contains("stale lock") && stderr(&out).contains(&format!("pid {pid}")),
        "{}",
        stderr(&out)
    );
    // released on exit: the next resume takes it without a note
    let out = mini(&runs, &["--resume", "--steps", "3"]);
    ok(&out);
    assert!(!stderr(&out).contains("stale"), "{}", stderr(&out));
}

#[test]
fn best_is_a_snapshot_that_resumes_exactly_and_leftovers_are_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let runs = tmp.path().join("runs");
    // the original: stopped at step 20 (best/ is then from an evaluation step before it), then
    // finished to step 40
    let cfg = write_config(tmp.path(), &data, "orig", "");
    ok(&train(&cfg, &["--stop-at", "20"]));
    let orig = runs.join("orig");
    let best_step = json(&orig.join("best/train_state.json"))["step"]
        .as_u64()
        .unwrap();
    assert!(
        best_step < 20 && best_step.is_multiple_of(3) || best_step == 1,
        "{best_step}"
    );
    // best/ is one step's whole state: its checkpoint and its files agree
    let (_, meta) =
        asa::checkpoint::read_safetensors_with_metadata(&orig.join("best/checkpoint.safetensors"))
            .unwrap();
    let st: serde_json::Value = serde_json::from_str(&meta["state"]).unwrap();
    assert_eq!(st, json(&orig.join("best/train_state.json")));
    assert_eq!(metrics(&orig.join("best")).len() as u64, best_step);
    copy_dir(&orig.join("best"), &runs.join("copy"));

    // leftovers of killed saves, planted before the resume: temp files, a half-written best
    let pid = dead_pid();
    let junk = [
        orig.join(format!("checkpoint.safetensors.tmp-{pid}")),
        orig.join(format!("metrics.jsonl.tmp-{pid}")),
        orig.join(format!("best/model.safetensors.tmp-{pid}")),
        orig.join(format!("best.tmp-{pid}/checkpoint.safetensors")),
    ];
    for j in &junk {
        std::fs::create_dir_all(j.parent().unwrap()).unwrap();
        std::fs::write(j, vec![0u8; 1000]).unwrap();
    }
    let out = train(&cfg, &["--resume"]);
    ok(&out);
    assert!(stderr(&out).contains("temporary file"), "{}", stderr(&out));
    for j in &junk {
        assert!(!j.exists(), "{} was left", j.display());
    }
    assert!(!orig.join(format!("best.tmp-{pid}")).exists());

    // the copy of best/ resumes to step 40 exactly as the original went on from that step
    let copy_cfg = write_config(tmp.path(), &data, "copy", "");
    ok(&train(&copy_cfg, &["--resume"]));
    let (a, b) = (metrics(&orig), metrics(&runs.join("copy")));
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "resuming a copy of best/ (step {best_step}) diverged");

    // a kill between the two renames of a best/ save: best.old-PID holds the whole previous one
    let finished = std::fs::read(orig.join("best/checkpoint.safetensors")).unwrap();
    std::fs::rename(orig.join("best"), orig.join(format!("best.old-{pid}"))).unwrap();
    std::fs::create_dir_all(orig.join(format!("best.tmp-{pid}"))).unwrap();
    let out = train(&cfg, &["--resume", "--total-steps", "41"]);
    ok(&out);
    assert!(stderr(&out).contains("restored best/"), "{}", stderr(&out));
    assert!(!orig.join(format!("best.old-{pid}")).exists());
    assert!(orig.join("best/checkpoint.safetensors").is_file());
    let _ = finished;
}

#[test]
fn resume_refuses_a_changed_config_and_extends_explicitly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let runs = tmp.path().join("runs");
    let cfg = write_config(tmp.path(), &data, "r", "total_steps = 8");
    ok(&train(&cfg, &["--stop-at", "4"]));
    let run = runs.join("r");
    let ckpt = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let edit = |from: &str, to: &str| {
        let p = tmp.path().join("edited.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains(from));
        std::fs::write(&p, text.replace(from, to)).unwrap();
        p
    };
    // two changes: both named, old -> new
    let p = edit(
        "learning_rate = 3e-3\nwarmup_steps = 5",
        "learning_rate = 1e-3\nwarmup_steps = 2",
    );
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("embed_dim = 32", "embed_dim = 64");
    std::fs::write(&p, text).unwrap();
    let err = fails(&train(&p, &["--resume"]));
    assert!(err.contains("learning_rate: 0.003 -> 0.001"), "{err}");
    assert!(err.contains("warmup_steps: 5 -> 2"), "{err}");
    assert!(err.contains("embed_dim: 32 -> 64"), "{err}");
    // data and seed
    let other = tmp.path().join("data2");
    let err = fails(&train(
        &edit(&data.display().to_string(), &other.display().to_string()),
        &["--resume"],
    ));
    assert!(err.contains("data:"), "{err}");
    let err = fails(&train(&cfg, &["--resume", "--seed", "7"]));
    assert!(err.contains("seed") && err.contains("-> 7"), "{err}");
    // total_steps in the file alone: refused, pointing at --total-steps
    let err = fails(&train(
        &edit("total_steps = 8", "total_steps = 10"),
        &["--resume"],
    ));
    assert!(
        err.contains("total_steps: 8 -> 10") && err.contains("--total-steps"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        ckpt
    );
    // skip_nonfinite may be switched on
    let p = tmp.path().join("skip.toml");
    std::fs::write(
        &p,
        std::fs::read_to_string(&cfg).unwrap() + "skip_nonfinite = true\n",
    )
    .unwrap();
    ok(&train(&p, &["--resume"]));
    assert!(json(&run.join("train.json"))["skip_nonfinite"]
        .as_bool()
        .unwrap());
    // finished: resuming says so; --total-steps extends it
    let err = fails(&train(&cfg, &["--resume"]));
    assert!(
        err.contains("already at step 8 of 8") && err.contains("--total-steps"),
        "{err}"
    );
    let err = fails(&train(&cfg, &["--resume", "--total-steps", "8"]));
    assert!(err.contains("already at step 8"), "{err}");
    ok(&train(&cfg, &["--resume", "--total-steps", "10"]));
    assert_eq!(json(&run.join("train_state.json"))["step"], 10);
    assert_eq!(json(&run.join("train.json"))["steps"], 10);
    assert_eq!(metrics(&run).len(), 10);
    // --total-steps without --resume is a usage error
    assert_eq!(train(&cfg, &["--total-steps", "12"]).status.code(), Some(2));
    // --stop-at 0, beyond the total, or not after the current step
    let err = fails(&train(
        &cfg,
        &["--resume", "--total-steps", "12", "--stop-at", "0"],
    ));
    assert!(err.contains("--stop-at 0"), "{err}");
    let err = fails(&train(
        &cfg,
        &["--resume", "--total-steps", "12", "--stop-at", "13"],
    ));
    assert!(err.contains("beyond"), "{err}");
    let err = fails(&train(
        &cfg,
        &["--resume", "--total-steps", "12", "--stop-at", "10"],
    ));
    assert!(err.contains("already at step 10"), "{err}");

    // train-mini: only the flags typed count
    let mruns = tmp.path().join("mruns");
    ok(&mini(&mruns, &["--steps", "4", "--stop-at", "2"]));
    let err = fails(&mini(&mruns, &["--resume", "--lr", "0.01", "--seed", "9"]));
    assert!(
        err.contains("--lr: 0.003 -> 0.01") && err.contains("--seed: 1337 -> 9"),
        "{err}"
    );
    let bare = asa()
        .args(["train-mini", "--device", "cpu", "--resume", "--outdir"])
        .arg(&mruns)
        .output()
        .unwrap();
    ok(&bare);
    let err = fails(&mini(&mruns, &["--resume"]));
    assert!(
        err.contains("already at step 4 of 4") && err.contains("--steps"),
        "{err}"
    );
    ok(&mini(&mruns, &["--resume", "--steps", "6"]));
    assert_eq!(json(&mruns.join("mini/train_state.json"))["step"], 6);
    let err = fails(&mini(
        &mruns,
        &["--steps", "4", "--stop-at", "0", "--force"],
    ));
    assert!(err.contains("--stop-at 0"), "{err}");
    let err = fails(&mini(
        &mruns,
        &["--steps", "4", "--stop-at", "5", "--force"],
    ));
    assert!(err.contains("beyond"), "{err}");
    // neither error deleted the run
    assert_eq!(json(&mruns.join("mini/train_state.json"))["step"], 6);
}

#[test]
fn report_keeps_the_runs_first_val_loss_across_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    ok(&mini(&runs, &["--steps", "6", "--stop-at", "3"]));
    ok(&mini(&runs, &["--resume"]));
    let run = runs.join("mini");
    let first = metrics(&run)
        .iter()
        .find(|m| m.3 != "null")
        .map(|m| m.3.clone())
        .unwrap();
    let report = json(&run.join("report.json"));
    assert_eq!(report["first_val_loss"].to_string(), first);
    assert_eq!(
        json(&run.join("train_state.json"))["first_val_loss"].to_string(),
        first
    );
}

#[test]
fn probe_reads_a_run_of_asa_train() {
    let tmp = tempfile::tempdir().unwrap();
    // the probe's prompts need GPT-2 tokens (" Paris" is one token)
    let data = prepare_with(tmp.path(), "gpt2");
    let extra = "total_steps = 2\nwarmup_steps = 1\nvocab_size = 50257\nmax_seq_len = 32";
    let cfg = write_config(tmp.path(), &data, "p", extra);
    ok(&train(&cfg, &[]));
    let run = tmp.path().join("runs/p");
    assert_eq!(json(&run.join("train.json"))["tokenizer"], "gpt2");
    let probe = |args: &[&str]| {
        asa()
            .current_dir(tmp.path())
            .args([
                "probe",
                "--device",
                "cpu",
                "--num-pcs",
                "1",
                "--layers",
                "0",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = probe(&["--ckpt", run.to_str().unwrap(), "--outdir", "probe1"]);
    ok(&out);
    assert!(tmp.path().join("probe1/summary.json").is_file());
    // a run saved before the tokenizer was recorded: the data folder's meta.json says it
    let p = run.join("train.json");
    let mut s = json(&p);
    s["tokenizer"] = "".into();
    std::fs::write(&p, s.to_string()).unwrap();
    ok(&probe(&[
        "--ckpt",
        run.to_str().unwrap(),
        "--outdir",
        "probe2",
    ]));
    // the default: the most recently saved run under runs/ (of any command)
    std::thread::sleep(std::time::Duration::from_millis(20));
    ok(&train(
        &write_config(tmp.path(), &data, "newer", extra),
        &[],
    ));
    let out = probe(&["--outdir", "probe3"]);
    ok(&out);
    assert!(stderr(&out).contains("newer"), "{}", stderr(&out));
}

#[test]
fn a_file_as_outdir_and_resume_of_nothing_are_clear_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let err = fails(&mini(&file, &["--steps", "2"]));
    assert!(err.contains("is a file, not a folder"), "{err}");
    let runs = tmp.path().join("runs");
    let err = fails(&mini(&runs, &["--resume", "--name", "nothere"]));
    assert!(err.contains("no run to resume"), "{err}");
    assert!(!runs.join("nothere").exists());
}

/// `train --init-from` with `trainable` in the run config: the model comes from the checkpoint,
/// frozen weights do not move, the fine-tune resumes (its config leaving the model out is no
/// change), and a config key that contradicts the checkpoint is refused naming it.
#[test]
fn train_init_from_fine_tunes_resumes_and_refuses_contradictions() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let base = write_config(
        tmp.path(),
        &data,
        "base",
        "total_steps = 3\nwarmup_steps = 1",
    );
    ok(&train(&base, &[]));
    let from = tmp.path().join("runs").join("base");
    let ft = write_config(
        tmp.path(),
        &data,
        "ft",
        "total_steps = 6\nwarmup_steps = 1\ntrainable = [\"*.slot_{in,q,k,v,out}.weight\", \"*_slotspace_gate_raw\"]",
    );
    let o = train(
        &ft,
        &["--init-from", from.to_str().unwrap(), "--stop-at", "3"],
    );
    ok(&o);
    assert!(stderr(&o).contains("frozen:"), "{}", stderr(&o));
    let o = train(&ft, &["--resume"]);
    ok(&o);
    assert!(stderr(&o).contains("frozen:"), "{}", stderr(&o));
    let read = |p: &Path| asa::checkpoint::read_safetensors(&p.join("model.safetensors")).unwrap();
    let (a, b) = (read(&from), read(&tmp.path().join("runs").join("ft")));
    for (k, t) in &a {
        let trains = (k.contains(".slot_") && !k.contains("slot_keys"))
            || k.ends_with("_slotspace_gate_raw");
        if !trains {
            assert_eq!(t.to_f32(), b[k].to_f32(), "{k} moved but was frozen");
        }
    }
    assert!(a
        .iter()
        .any(|(k, t)| k.contains(".slot_in.") && t.to_f32() != b[k].to_f32()));
    // --init-from with --resume, and a config that contradicts the checkpoint
    let o = train(&ft, &["--resume", "--init-from", from.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--init-from"), "{}", stderr(&o));
    let bad = write_config(tmp.path(), &data, "bad", "embed_dim = 64");
    let e = fails(&train(&bad, &["--init-from", from.to_str().unwrap()]));
    assert!(e.contains("embed_dim: 64 (the checkpoint has 32)"), "{e}");
    assert!(!tmp.path().join("runs").join("bad").exists());
}
