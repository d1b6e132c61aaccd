//! The commands README.md and REPRODUCIBILITY.md show run as written, and make the files the
//! docs name.
//!
//! Every line of a ```bash block that starts with `cargo run --release -- ` or `asa ` is a doc
//! command. Each one runs through this build's binary (`CARGO_BIN_EXE_asa`), with the text after
//! the prefix passed to `sh -c` unchanged (globs, line continuations and trailing comments as a
//! reader's shell would see them), in a fresh temporary working directory. The docs' relative
//! paths (`tests/fixtures`, `configs/...`, `assets/corpus/*.txt`) are copied into that directory
//! first, and a command's inputs (a finished `runs/mini`, prepared shards) are made there by
//! earlier runs. A command that needs what a test machine lacks gets a stand-in or is skipped,
//! each listed in `plan` with its reason. A doc command this file does not know fails the test,
//! so a new command in the docs must be added here.

#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One command shown in a doc: where, and the text after `cargo run --release -- ` / `asa `.
#[derive(Debug, Clone)]
struct DocCmd {
    doc: &'static str,
    text: String,
}

impl DocCmd {
    /// The words before any `#` comment.
    fn words(&self) -> Vec<&str> {
        let code = self.text.split(" #").next().unwrap_or("");
        code.split_whitespace().collect()
    }
    fn sub(&self) -> &str {
        self.words().first().copied().unwrap_or("")
    }
    fn has(&self, flag: &str) -> bool {
        self.words().contains(&flag)
    }
    fn value(&self, flag: &str) -> Option<String> {
        let w = self.words();
        w.iter()
            .position(|&x| x == flag)
            .and_then(|i| w.get(i + 1))
            .map(|s| s.to_string())
    }
    /// The command's text with its comment and runs of spaces removed, for de-duplication.
    fn key(&self) -> String {
        self.words().join(" ")
    }
}

/// Doc commands of one Markdown file, in order.
fn extract(doc: &'static str) -> Vec<DocCmd> {
    extract_from(&std::fs::read_to_string(root().join(doc)).unwrap(), doc)
}

fn extract_from(text: &str, doc: &'static str) -> Vec<DocCmd> {
    let mut out = Vec::new();
    let mut in_bash = false;
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_bash = !in_bash && t == "```bash";
            pending.clear();
            continue;
        }
        if !in_bash {
            continue;
        }
        // a trailing backslash continues the command on the next line, as in a shell
        if let Some(head) = t.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + t;
        for prefix in ["cargo run --release -- ", "asa "] {
            if let Some(rest) = full.strip_prefix(prefix) {
                out.push(DocCmd {
                    doc,
                    text: rest.trim().to_string(),
                });
            }
        }
    }
    out
}

/// How a doc command is checked.
enum Plan {
    /// Run as written; `files` (relative to the working directory) must exist afterwards.
    Run { files: Vec<String> },
    /// Run this text instead, because the written one needs something absent here.
    StandIn {
        text: String,
        why: &'static str,
        files: Vec<String>,
    },
    /// Run as written; a non-usage exit is accepted, because the command reports on hardware the
    /// test machine may lack. `expect` must appear in stdout.
    Report {
        expect: &'static str,
        why: &'static str,
    },
}

const MINI_FILES: [&str; 7] = [
    "model.safetensors",
    "config.json",
    "train.json",
    "train_state.json",
    "checkpoint.safetensors",
    "metrics.jsonl",
    "report.json",
];

fn in_dir(dir: &str, names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("{dir}/{n}")).collect()
}

/// What each doc command is expected to do. Unknown commands are an error.
fn plan(c: &DocCmd) -> Result<Plan, String> {
    let files = match c.sub() {
        "smoke" => {
            let out = c.value("--outdir").unwrap_or("runs/smoke".into());
            vec![format!("{out}/smoke.json")]
        }
        "train-mini" => {
            let out = c.value("--outdir").unwrap_or("runs".into());
            let name = c.value("--name").unwrap_or("mini".into());
            let files = in_dir(&format!("{out}/{name}"), &MINI_FILES);
            if let (true, Some(n)) = (c.has("--init-from"), c.value("--steps")) {
                return Ok(Plan::StandIn {
                    text: c.text.replace(&format!("--steps {n}"), "--steps 4"),
                    why: "the fine-tune recipe cut to 4 steps; every other flag as written",
                    files,
                });
            }
            files
        }
        "eval" if c.has("--per-line") => {
            // the WikiText-103 recipe: the train-mini model stands in for the converted
            // reference checkpoint and a few lines of the corpus for the WikiText files
            let text = match c.value("--seq-len") {
                Some(n) => c.text.replace(&format!("--seq-len {n}"), "--seq-len 64"),
                None => c.text.clone(),
            };
            return Ok(Plan::StandIn {
                text,
                why: "the train-mini run's weights stand in for the converted WikiText-103 \
                      checkpoint and corpus lines for wiki.*.raw; --seq-len 64",
                files: c.value("--json").into_iter().collect(),
            });
        }
        // stdout (and the --json file when given)
        "generate" | "eval" => c.value("--json").into_iter().collect(),
        "infos" => c.value("--out").into_iter().collect(),
        "recall" => {
            let out = c.value("--outdir").unwrap_or("runs/recall".into());
            in_dir(&out, &["recall.json", "recall.png"])
        }
        "bench-decode" => {
            let mut text = c.text.split(" #").next().unwrap_or("").to_string();
            for flag in ["--max-len", "--full-at"] {
                if let Some(v) = c.value(flag) {
                    text = text.replace(&format!("{flag} {v}"), "");
                }
            }
            return Ok(Plan::StandIn {
                text: format!("{text} --max-len 256 --full-at 64,256"),
                why: "to 256 tokens with the full forward at 64 and 256 (the real 16k-token \
                      curve takes half a minute and gigabytes of logits); the same checkpoint",
                files: c.value("--json").into_iter().collect(),
            });
        }
        "probe" => {
            let out = c.value("--outdir").unwrap_or("runs/probes".into());
            in_dir(
                &out,
                &[
                    "summary.json",
                    "paris_margin.png",
                    "pca_explained_variance.png",
                    "sweep_layer_00.png",
                    "trajectory_basin.png",
                    "simplex_sphere.png",
                    "depth_sweep.png",
                    "policy_inertia.png",
                ],
            )
        }
        // stdout only; checked in `check_output`
        "parity" => Vec::new(),
        "convert" => {
            let w = c.words();
            let out = PathBuf::from(w.get(2).ok_or("convert without OUT")?);
            let cfg = out.with_file_name("config.json");
            vec![
                out.to_string_lossy().into_owned(),
                cfg.to_string_lossy().into_owned(),
            ]
        }
        "prepare" => {
            let out = c.value("--outdir").ok_or("prepare without --outdir")?;
            in_dir(&out, &["train_000.bin", "val.bin", "meta.json"])
        }
        "train" => {
            // runs/<name>/ of the config (cpu-small), in the train-mini layout plus best/
            let mut f = in_dir("runs/cpu-small", &MINI_FILES[..6]);
            f.push("runs/cpu-small/best".into());
            let cfg = c.value("--config").ok_or("train without --config")?;
            if cfg != "configs/cpu-small.toml" {
                return Err(format!("train with an unknown config {cfg}"));
            }
            // `--total-steps N` (extending the run on --resume) shrinks with the config: 8
            let text = match c.value("--total-steps") {
                Some(n) => c
                    .text
                    .replace(&format!("--total-steps {n}"), "--total-steps 8"),
                None => c.text.clone(),
            };
            return Ok(Plan::StandIn {
                text,
                why: "runs with a copy of configs/cpu-small.toml cut to 4 steps (the real 200 \
                      steps take minutes; --total-steps becomes 8); the copy keeps every other \
                      setting",
                files: f,
            });
        }
        "bench" => {
            if c.has("--seq-lens") {
                // the scaling run (issue 16): T up to 64K takes many minutes per length; the
                // same command at two short lengths, one step each, ours only
                let w = c.words();
                let mut keep = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    match w[i] {
                        "--reference" | "--python" | "--warmup" | "--iters" => i += 2,
                        "--seq-lens" => {
                            keep.extend(["--seq-lens", "64,128"]);
                            i += 2;
                        }
                        x => {
                            keep.push(x);
                            i += 1;
                        }
                    }
                }
                keep.extend(["--warmup", "0", "--iters", "1"]);
                return Ok(Plan::StandIn {
                    text: keep.join(" "),
                    why: "the scaling run at T 64 and 128, one step each, ours only (the real \
                          lengths take many minutes; --reference needs PyTorch)",
                    files: c.value("--json").into_iter().collect(),
                });
            }
            if c.has("--reference") {
                // drop `--reference X` and `--python Y`: the reference needs its checkout and
                // PyTorch, which a test machine does not have
                let w = c.words();
                let mut keep = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if w[i] == "--reference" || w[i] == "--python" {
                        i += 2;
                        continue;
                    }
                    keep.push(w[i]);
                    i += 1;
                }
                return Ok(Plan::StandIn {
                    text: keep.join(" "),
                    why: "--reference needs a checkout of digitaldaimyo/ASA and PyTorch; runs \
                          our side of the bench with the same flags",
                    files: Vec::new(),
                });
            }
            Vec::new()
        }
        "kernel-cost" => {
            // the practice run's 230M weights take minutes to initialise in a debug build; the
            // same command on the small cpu-asa preset counts the same orchestration
            let text = match c.value("--config") {
                Some(cfg) => c
                    .text
                    .replace(&format!("--config {cfg}"), "--config cpu-asa"),
                None => format!("{} --config cpu-asa", c.text),
            };
            return Ok(Plan::StandIn {
                text,
                why: "the cpu-asa preset instead of practice-run (its weights take minutes to \
                      initialise in a debug build); every other flag as written",
                files: c.value("--json").into_iter().collect(),
            });
        }
        "doctor" => {
            return Ok(Plan::Report {
                expect: "doctor:",
                why: "exits 1 by design when no GPU, driver or NVRTC is present",
            })
        }
        other => {
            return Err(format!(
                "{}: `{}`: subcommand {other:?} is not covered by tests/docs_commands.rs",
                c.doc, c.text
            ))
        }
    };
    Ok(Plan::Run { files })
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

fn sh(dir: &Path, text: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("exec \"$ASA_BIN\" {text}"))
        .env("ASA_BIN", env!("CARGO_BIN_EXE_asa"))
        .current_dir(dir)
        .output()
        .unwrap()
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A small generated text corpus, the stand-in for the reader's `my_corpus/*.txt`.
fn write_corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cities = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna"];
    let lands = ["France", "Italy", "Germany", "Spain", "Portugal", "Austria"];
    for f in 0..2 {
        let mut s = String::new();
        for i in 0..400 {
            let j = (i * 7 + f) % cities.len();
            s.push_str(&format!(
                "Line {i}: the capital of {} is {}, a city on a river.\n",
                lands[j], cities[j]
            ));
        }
        std::fs::write(dir.join(format!("part{f}.txt")), s).unwrap();
    }
}

/// The working directory of one command: the docs' relative inputs, and what it needs from
/// earlier commands.
struct Workspace {
    /// runs/ of a finished default train-mini, made by the first train-mini doc command
    mini_runs: Option<PathBuf>,
    /// keeps every command's directory alive until the end, for the report
    dirs: Vec<tempfile::TempDir>,
}

impl Workspace {
    fn fresh(&mut self, c: &DocCmd) -> Result<PathBuf, String> {
        let td = tempfile::tempdir().unwrap();
        let dir = td.path().to_path_buf();
        self.dirs.push(td);
        let copy_mini = |to: &Path| -> Result<(), String> {
            let src = self
                .mini_runs
                .as_ref()
                .ok_or("no train-mini doc command produced runs/mini before this one")?;
            copy_dir(&src.join("mini"), to);
            Ok(())
        };
        match c.sub() {
            "parity" => copy_dir(&root().join("tests/fixtures"), &dir.join("tests/fixtures")),
            "convert" => {
                // the fixture's legacy torch.save checkpoint stands in for the reader's IN.pt
                let input = c.words().get(1).copied().ok_or("convert without IN")?;
                std::fs::copy(
                    root().join("tests/fixtures/legacy_pt/checkpoint.pt"),
                    dir.join(input),
                )
                .unwrap();
            }
            "prepare" => {
                copy_dir(&root().join("assets/corpus"), &dir.join("assets/corpus"));
                write_corpus(&dir.join("my_corpus"));
            }
            "probe" => match c.value("--ckpt") {
                // a PATH placeholder: put the train-mini run there, so the line runs unchanged
                Some(p) => copy_mini(Path::new(&dir.join(&p)).parent().unwrap())?,
                None => copy_mini(&dir.join("runs/mini"))?,
            },
            "train-mini" if c.has("--resume") || c.has("--init-from") => {
                copy_mini(&dir.join("runs/mini"))?
            }
            "eval" if c.has("--per-line") => {
                // stand-ins for a converted reference checkpoint and the WikiText files
                let ckpt = c.value("--ckpt").ok_or("eval --per-line without --ckpt")?;
                let tmp = dir.join("mini.tmp");
                copy_mini(&tmp)?;
                std::fs::copy(tmp.join("model.safetensors"), dir.join(&ckpt)).unwrap();
                std::fs::copy(
                    tmp.join("config.json"),
                    dir.join(&ckpt).with_file_name("config.json"),
                )
                .unwrap();
                let text = c.value("--text").ok_or("eval --per-line without --text")?;
                let corpus =
                    std::fs::read_to_string(root().join("assets/corpus/sonnets.txt")).unwrap();
                let f = dir.join(&text);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, corpus).unwrap();
            }
            // the checkpoint and its base: the train-mini run copied to each path named
            "recall" => {
                for flag in ["--ckpt", "--base"] {
                    if let Some(p) = c.value(flag) {
                        copy_mini(&dir.join(p))?;
                    }
                }
                if c.value("--ckpt").is_none() {
                    copy_mini(&dir.join("runs/mini"))?;
                }
            }
            // commands that read a finished run (`--ckpt runs/mini`)
            "generate" | "eval" | "bench-decode" | "infos" => copy_mini(&dir.join("runs/mini"))?,
            "train" => {
                let cfg = std::fs::read_to_string(root().join("configs/cpu-small.toml")).unwrap();
                let mut short = cfg.clone();
                for (from, to) in [
                    ("total_steps = 200", "total_steps = 4"),
                    ("warmup_steps = 20", "warmup_steps = 1"),
                    ("eval_interval = 50", "eval_interval = 2"),
                    ("val_windows = 32", "val_windows = 2"),
                ] {
                    assert!(short.contains(from), "configs/cpu-small.toml lost `{from}`");
                    short = short.replace(from, to);
                }
                std::fs::create_dir_all(dir.join("configs")).unwrap();
                std::fs::write(dir.join("configs/cpu-small.toml"), short).unwrap();
                copy_dir(&root().join("assets/corpus"), &dir.join("assets/corpus"));
                // the config's data folder, as its header comment says to make it
                let o = sh(&dir, "prepare assets/corpus/*.txt --outdir data/corpus");
                if !o.status.success() {
                    return Err(format!("setup prepare failed: {}", describe(&o)));
                }
                if c.has("--resume") {
                    let o = sh(&dir, "train --config configs/cpu-small.toml --device cpu");
                    if !o.status.success() {
                        return Err(format!("setup train failed: {}", describe(&o)));
                    }
                }
            }
            _ => {}
        }
        Ok(dir)
    }
}

/// Checks beyond exit status and files, per subcommand.
fn check_output(c: &DocCmd, dir: &Path, o: &Output) -> Result<(), String> {
    let stdout = String::from_utf8_lossy(&o.stdout);
    match c.sub() {
        "parity" => {
            let passes = stdout.lines().filter(|l| l.starts_with("PASS")).count();
            if passes < 14 || !stdout.contains("0 failed") {
                return Err(format!("parity: {passes} PASS lines\n{stdout}"));
            }
        }
        "smoke" => {
            let out = c.value("--outdir").unwrap_or("runs/smoke".into());
            let j = std::fs::read_to_string(dir.join(out).join("smoke.json")).unwrap();
            if !j.replace(' ', "").contains("\"ok\":true") {
                return Err(format!("smoke.json is not ok: {j}"));
            }
        }
        "bench" if !stdout.contains("tokens/s") => {
            return Err(format!("bench printed no tokens/s:\n{stdout}"));
        }
        _ => {}
    }
    Ok(())
}

/// Runs one doc command in a fresh directory and checks it. Returns the directory, the run's
/// output and a line for the report.
fn run_one(ws: &mut Workspace, c: &DocCmd) -> Result<(PathBuf, Output, String), String> {
    let p = plan(c)?;
    let dir = ws
        .fresh(c)
        .map_err(|e| format!("{}: `{}`: {e}", c.doc, c.text))?;
    let t0 = std::time::Instant::now();
    let (text, files, how) = match &p {
        Plan::Run { files } => (c.text.clone(), files.clone(), "ran".to_string()),
        Plan::StandIn { text, why, files } => {
            (text.clone(), files.clone(), format!("stand-in: {why}"))
        }
        Plan::Report { why, .. } => (c.text.clone(), Vec::new(), format!("report: {why}")),
    };
    let o = sh(&dir, &text);
    let line = format!(
        "{:>6.1} s  {}: {}  [{how}]",
        t0.elapsed().as_secs_f64(),
        c.doc,
        c.key()
    );
    let ok = match &p {
        Plan::Report { expect, .. } => {
            matches!(o.status.code(), Some(0) | Some(1))
                && String::from_utf8_lossy(&o.stdout).contains(expect)
        }
        _ => o.status.success(),
    };
    if !ok {
        return Err(format!("{}: `{}`: {}", c.doc, text, describe(&o)));
    }
    let missing: Vec<&String> = files.iter().filter(|f| !dir.join(f).exists()).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{}: `{}`: did not write {missing:?}",
            c.doc, c.text
        ));
    }
    check_output(c, &dir, &o).map_err(|e| format!("{}: `{}`: {e}", c.doc, c.text))?;
    Ok((dir, o, line))
}

#[test]
fn doc_commands_run_as_written() {
    let mut cmds: Vec<DocCmd> = extract("README.md");
    let n_readme = cmds.len();
    cmds.extend(extract("REPRODUCIBILITY.md"));
    // the extraction itself must see the commands the docs are known to show
    assert!(n_readme >= 8, "README.md: only {n_readme} commands found");
    assert!(
        cmds.len() - n_readme >= 8,
        "REPRODUCIBILITY.md: too few commands found"
    );
    for sub in [
        "smoke",
        "train-mini",
        "probe",
        "parity",
        "convert",
        "prepare",
        "train",
        "bench",
    ] {
        assert!(
            cmds.iter().any(|c| c.sub() == sub),
            "no doc command runs `{sub}`"
        );
    }

    // the same command in several places runs once
    let mut seen = std::collections::HashSet::new();
    cmds.retain(|c| seen.insert(c.key()));
    // a fresh train-mini first: later commands (probe, --resume) start from its run
    cmds.sort_by_key(|c| c.sub() != "train-mini" || c.has("--resume"));

    let mut ws = Workspace {
        mini_runs: None,
        dirs: Vec::new(),
    };
    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut mini_weights: Vec<(String, Vec<u8>)> = Vec::new();
    for c in &cmds {
        let (dir, o, line) = match run_one(&mut ws, c) {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        report.push(line);
        if c.sub() == "train-mini" && !c.has("--resume") {
            let out = c.value("--outdir").unwrap_or("runs".into());
            if ws.mini_runs.is_none() && c.value("--name").is_none() {
                ws.mini_runs = Some(dir.join(&out));
            }
            // the docs say two runs give byte-identical weights; the doc commands differ only in
            // spelling out defaults, so on the CPU they must agree
            if String::from_utf8_lossy(&o.stdout).contains("device cpu") {
                let w = std::fs::read(dir.join(&out).join("mini/model.safetensors")).unwrap();
                mini_weights.push((c.key(), w));
            }
        }
    }
    if let Some((k0, w0)) = mini_weights.first() {
        for (k, w) in &mini_weights[1..] {
            if w != w0 {
                failures.push(format!("`{k}` and `{k0}` wrote different weights"));
            }
        }
    }
    eprintln!("doc commands:\n{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} doc command(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The harness reads code blocks as a shell would, and only ```bash blocks.
#[test]
fn extraction_joins_continuations_and_skips_other_blocks() {
    let md = "text `cargo run --release -- smoke`\n```bash\n# a comment\ncargo run --release -- bench --config cpu-small \\\n    --iters 1   # why\ncargo test\nasa doctor\n```\n```toml\nasa = 1\n```\n";
    let cmds = extract_from(md, "x.md");
    let keys: Vec<String> = cmds.iter().map(DocCmd::key).collect();
    assert_eq!(keys, ["bench --config cpu-small --iters 1", "doctor"]);
    assert_eq!(cmds[0].value("--config").as_deref(), Some("cpu-small"));
}

/// A doc command that no longer parses (here a misspelt flag), an unknown subcommand, a missing
/// input and a wrong result each fail, with the command in the message.
#[test]
fn a_broken_doc_command_fails() {
    let mut ws = Workspace {
        mini_runs: None,
        dirs: Vec::new(),
    };
    let cmd = |text: &str| DocCmd {
        doc: "README.md",
        text: text.into(),
    };
    let e = run_one(&mut ws, &cmd("smoke --outdirr runs/smoke")).unwrap_err();
    assert!(e.contains("--outdirr") && e.contains("exit Some(2)"), "{e}");
    let e = run_one(&mut ws, &cmd("frobnicate --x")).unwrap_err();
    assert!(e.contains("not covered"), "{e}");
    // probe needs a train-mini run from an earlier command
    let e = run_one(&mut ws, &cmd("probe")).unwrap_err();
    assert!(e.contains("train-mini"), "{e}");
    // a working command passes, its files looked for under its own --outdir
    let ok = run_one(&mut ws, &cmd("smoke --outdir elsewhere")).unwrap();
    assert!(ok.0.join("elsewhere/smoke.json").exists());
    // parity on one case passes but is not the docs' full fixture set
    let e = run_one(&mut ws, &cmd("parity tests/fixtures/lm_full")).unwrap_err();
    assert!(e.contains("1 PASS lines"), "{e}");
}
