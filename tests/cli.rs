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
