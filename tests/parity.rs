//! Every public fixture case under tests/fixtures, held to the fixtures README's tolerance table,
//! through the same runner as `asa parity`.

use std::path::{Path, PathBuf};

use asa::parity::{find_cases, run_case};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn every_public_fixture_case_passes() {
    let cases = find_cases(&[fixtures()]).unwrap();
    assert!(
        cases.len() >= 14,
        "expected the public fixture set, found {} cases",
        cases.len()
    );
    let mut failed = Vec::new();
    for dir in &cases {
        let rep = run_case(dir);
        println!("{}", rep.line());
        if !rep.passed() {
            failed.push(rep.line());
        }
    }
    assert!(failed.is_empty(), "failing cases:\n{}", failed.join("\n"));
}

#[test]
fn every_case_compares_something_with_gradients_where_given() {
    // guards against a runner that silently skips tensors
    for dir in find_cases(&[fixtures()]).unwrap() {
        let rep = run_case(&dir);
        assert!(!rep.checks.is_empty(), "{}: nothing compared", rep.name);
        let io = asa::checkpoint::read_safetensors(&dir.join("io.safetensors")).unwrap();
        for key in io.keys().filter(|k| {
            k.starts_with("grad.")
                || k.starts_with("info.")
                || k.starts_with("final.")
                || k.starts_with("logits")
        }) {
            assert!(
                rep.checks.iter().any(|c| &c.name == key),
                "{}: io tensor {key} was not compared",
                rep.name
            );
        }
    }
}

#[test]
fn a_perturbed_reference_fails() {
    // copy lm_full, scale one reference gradient by 1.01: the case must fail on that tensor alone
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("lm_full");
    let dst = tmp.path().join("lm_full_perturbed");
    std::fs::create_dir(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let target = "grad.blocks.0.attn.slot_keys";
    let bytes = std::fs::read(src.join("io.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == target {
            assert_eq!(view.dtype(), safetensors::Dtype::F64);
            for ch in data.chunks_mut(8) {
                let v = f64::from_le_bytes(ch.try_into().unwrap()) * 1.01;
                ch.copy_from_slice(&v.to_le_bytes());
            }
        }
        owned.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, dt, sh, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dst.join("io.safetensors"),
        safetensors::serialize(views, &None).unwrap(),
    )
    .unwrap();
    let rep = run_case(&dst);
    assert!(
        !rep.passed(),
        "a 1% change of a reference gradient must fail"
    );
    let bad: Vec<&str> = rep
        .checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.name.as_str())
        .collect();
    // both scan forms are held to the fixture, so both report the perturbed gradient
    let serial = format!("{target} [serial]");
    assert_eq!(bad, vec![target, serial.as_str()]);
}
