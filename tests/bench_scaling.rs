//! `asa bench --seq-lens`: the scaling table of issue 16. Speed is never asserted; the tests
//! check the flags, the one-row-per-T table and JSON, the per-child peak RSS, and that a failing
//! reference child is a "failed: ..." cell, not the end of the run.

#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn asa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asa"))
}

/// A run config of a tiny model (milliseconds per step in a debug build).
fn tiny_config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    std::fs::write(
        &p,
        "data = \"data/none\"\nvocab_size = 97\nnum_layers = 1\nnum_slots = 4\n\
         slotspace_dim = 4\nmax_seq_len = 16\nembed_dim = 16\nnum_heads = 2\nbatch_size = 2\n\
         write_chunk_size = 16\nslotspace_chunk_size = 16\n",
    )
    .unwrap();
    p
}

/// A folder that passes the reference-checkout check (the fake Python never reads it).
fn fake_reference(dir: &Path) -> PathBuf {
    let r = dir.join("ref");
    std::fs::create_dir_all(r.join("src/asa")).unwrap();
    for f in ["config.py", "asm_lm.py", "asa.py", "asm_block.py"] {
        std::fs::write(r.join("src/asa").join(f), "").unwrap();
    }
    r
}

/// stderr of a failed command: exactly one `error:` line (no panic, no backtrace), exit 1.
fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("device:"))
        .collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    assert!(lines[0].starts_with("error: "), "stderr: {err}");
    lines[0].to_string()
}

fn bench(dir: &Path, extra: &[&str]) -> Output {
    asa()
        .current_dir(dir)
        .args(["bench", "--device", "cpu", "--threads", "1", "--config"])
        .arg(tiny_config(dir))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn bad_seq_lens_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (list, needle) in [
        ("0", ">= 1"),
        ("32,0", ">= 1"),
        ("abc", "'abc' is not a sequence length"),
        ("32,,64", "empty entry"),
        ("", "empty entry"),
        ("32,64,32", "32 is listed twice"),
        ("1K,1024", "1024 is listed twice"),
        ("-5", "not a sequence length"),
        ("99999999999999999999", "not a sequence length"),
        ("99999999999", "over the limit"),
        ("3.5", "not a sequence length"),
    ] {
        let out = bench(tmp.path(), &["--seq-lens", list]);
        let line = one_error_line(&out);
        assert!(line.contains("--seq-lens"), "{list}: {line}");
        assert!(line.contains(needle), "{list}: {line}");
    }
    for (args, needle) in [
        (
            &["--seq-lens", "32", "--reference-variants", "intervene"][..],
            "'intervene' is not a variant",
        ),
        (
            &["--seq-lens", "32", "--reference-variants", "online,online"][..],
            "online is listed twice",
        ),
        (
            &["--seq-lens", "32", "--iters", "0"][..],
            "--iters must be >= 1",
        ),
        (
            &["--seq-lens", "32", "--batch", "0"][..],
            "batch must be >= 1",
        ),
        (
            &["--seq-lens", "32", "--reference", "/nonexistent/asa-ref"][..],
            "not a checkout",
        ),
        // said before the run, not after it
        (
            &["--seq-lens", "32", "--json", "/nonexistent/dir/s.json"][..],
            "--json: the folder /nonexistent/dir does not exist",
        ),
    ] {
        let line = one_error_line(&bench(tmp.path(), args));
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    // usage errors (clap, exit 2): one T and a list, or variants without a list
    for args in [
        &["--seq-len", "32", "--seq-lens", "32,64"][..],
        &["--reference-variants", "online"][..],
    ] {
        let out = bench(tmp.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn scaling_run_has_one_row_per_length() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("scaling.json");
    let out = asa()
        .current_dir(tmp.path())
        .args(["bench", "--device", "cpu", "--threads", "1", "--config"])
        .arg(tiny_config(tmp.path()))
        .args([
            "--seq-lens",
            "16,48",
            "--warmup",
            "0",
            "--iters",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // progress: each T is announced, and the child's steps are relayed
    assert!(stderr.contains("bench: T=16 (1/2)"), "{stderr}");
    assert!(stderr.contains("bench: T=48 (2/2)"), "{stderr}");
    assert!(stderr.contains("bench: step 2/2"), "{stderr}");
    // the table: a header and one row per T, in the order given
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| T ") && !l.starts_with("| ---"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows[0].starts_with("| 16 |") && rows[1].starts_with("| 48 |"),
        "{stdout}"
    );
    assert!(stdout.contains("asa tok/s vs T=16"), "{stdout}");
    // no reference asked: its cells are "-"
    assert!(rows[0].contains("| - | - |"), "{stdout}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    for (row, t) in rows.iter().zip([16, 48]) {
        assert_eq!(row["seq_len"], t, "{row}");
        assert_eq!(row["iters"], 2, "{row}");
        let asa = &row["asa"];
        assert!(asa["tokens_per_sec"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(asa["step_seconds"].as_array().unwrap().len(), 2, "{row}");
        // a real peak: at least a MiB (the binary alone), far below the machine's memory
        let rss = asa["peak_rss_bytes"].as_u64().unwrap();
        assert!(rss > (1 << 20) && rss < (64u64 << 30), "{row}");
        assert!(asa["error"].is_null(), "{row}");
        assert!(row["reference_online"].is_null(), "{row}");
    }
    assert_eq!(rows[0]["asa_vs_first"], 1.0);
    assert!(rows[1]["asa_vs_first"].as_f64().unwrap() > 0.0);
    assert_eq!(v["threads"], 1);
    // the device as our child reported it
    assert_eq!(v["device"], "cpu (1 threads)", "{v}");
    assert_eq!(v["batch"], 2);
    // no temp report of a child is left behind
    let pid_files = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("asa-bench-") && n.ends_with("-16.json")
        })
        .count();
    assert_eq!(pid_files, 0);
}

#[test]
fn failing_reference_is_a_failed_cell() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = fake_reference(tmp.path());
    // a "Python" that fails like a missing PyTorch: a message on stderr, exit 1
    let py = tmp.path().join("fake-python");
    std::fs::write(
        &py,
        "#!/bin/sh\necho 'warming up' >&2\necho 'reference_bench: error: no torch in this python' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
    let json = tmp.path().join("s.json");
    let out = asa()
        .current_dir(tmp.path())
        .args(["bench", "--device", "cpu", "--threads", "1", "--config"])
        .arg(tiny_config(tmp.path()))
        .args(["--seq-lens", "16,32", "--warmup", "0", "--iters", "1"])
        .arg("--reference")
        .arg(&reference)
        .arg("--python")
        .arg(&py)
        .args(["--reference-variants", "online", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // the run goes on past the failed reference and ends well: ours has a row per T
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout
            .matches("| failed: no torch in this python |")
            .count(),
        2,
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for row in v["rows"].as_array().unwrap() {
        assert!(
            row["asa"]["tokens_per_sec"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        let on = &row["reference_online"];
        assert_eq!(on["error"], "no torch in this python", "{row}");
        assert!(on["tokens_per_sec"].is_null(), "{row}");
        // the failed child's peak RSS is still measured
        assert!(on["peak_rss_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["ratio_online"].is_null(), "{row}");
        // not asked for
        assert!(row["reference_baseline"].is_null(), "{row}");
    }

    // a reference killed by a signal (as the OOM killer does) names the signal
    std::fs::write(&py, "#!/bin/sh\nkill -9 $$\n").unwrap();
    let out = asa()
        .current_dir(tmp.path())
        .args(["bench", "--device", "cpu", "--threads", "1", "--config"])
        .arg(tiny_config(tmp.path()))
        .args(["--seq-lens", "16", "--warmup", "0", "--iters", "1"])
        .arg("--reference")
        .arg(&reference)
        .arg("--python")
        .arg(&py)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(
        stdout.matches("failed: killed by signal 9").count(),
        2,
        "{stdout}"
    );

    // a Python that is not there at all
    let out = asa()
        .current_dir(tmp.path())
        .args(["bench", "--device", "cpu", "--threads", "1", "--config"])
        .arg(tiny_config(tmp.path()))
        .args(["--seq-lens", "16", "--warmup", "0", "--iters", "1"])
        .arg("--reference")
        .arg(&reference)
        .args([
            "--python",
            "/nonexistent/python3",
            "--reference-variants",
            "baseline",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("failed: cannot run '/nonexistent/python3'"),
        "{stdout}"
    );
}
