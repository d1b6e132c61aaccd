//! GPU-vs-CPU comparisons: every CUDA op against its CPU twin on random inputs, the GPU ASA
//! layer and a full training step against the CPU model, and the reference fixtures on the GPU.
//! Each test first checks `cuda_available()`; without a GPU it prints `SKIPPED <test>: no CUDA
//! device` and returns.
//!
//! Tolerances: f32 results within 1e-4 of the CPU relative to the tensor's scale (max |CPU|,
//! floor 1); bf16 GEMM inputs (`Precision::Bf16`): 3e-2 relative on GEMM outputs and 5e-2 on
//! losses, gradients and updated weights after a step (bf16 keeps 8 mantissa bits: relative
//! rounding 2^-9 per input, accumulated over the GEMM's inner dimension and the layers).

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use rand::Rng;

use asa::backend::cuda::{self, AsDv, CudaBackend, Device, Dv, GpuLm, Precision};
use asa::config::Variant;
use asa::model::layer::{AsaOptions, SlotMask};
use asa::model::lm::{Lm, LmCache};
use asa::model::params::{AsaIds, Init, ParamStore};
use asa::optim::AdamWConfig;

#[path = "support/check.rs"]
mod check;
#[path = "support/dev.rs"]
mod dev;
#[path = "support/fused_case.rs"]
mod fused_case;
#[path = "support/model_cases.rs"]
mod model_cases;
#[path = "support/op_cases.rs"]
mod op_cases;
#[path = "support/train_cases.rs"]
mod train_cases;

use check::{close, close_params, rng};
use dev::{Elem, TestDev};
use model_cases::small_cfg;

const TOL: f64 = 1e-4;

fn backend(name: &str) -> Option<CudaBackend> {
    if !cuda::cuda_available() {
        println!("SKIPPED {name}: no CUDA device");
        return None;
    }
    Some(CudaBackend::new(0).expect("CUDA backend"))
}

/// Test memory on the GPU: the buffers a test uploaded, kept alive (launches go to the backend).
struct G<'a> {
    be: &'a CudaBackend,
    keep: std::cell::RefCell<Vec<Box<dyn std::any::Any>>>,
}

impl<'a> G<'a> {
    fn new(be: &'a CudaBackend) -> Self {
        G {
            be,
            keep: Default::default(),
        }
    }
}

impl TestDev for G<'_> {
    fn put<T: Elem>(&self, x: &[T]) -> Dv<T> {
        let t = self.be.temp_from(x).unwrap();
        let d = t.dv();
        self.keep.borrow_mut().push(Box::new(t));
        d
    }
    fn get<T: Elem>(&self, x: Dv<T>) -> Vec<T> {
        self.be.download(x).unwrap()
    }
    fn try_precision(&self, p: Precision) -> bool {
        self.be.precision.set(p);
        true
    }
}

// ------------------------------------------------------------------------------------------------

#[test]
fn cuda_generic_ops_match_cpu() {
    let Some(be) = backend("cuda_generic_ops_match_cpu") else {
        return;
    };
    op_cases::generic_ops(&be, &G::new(&be));
}

// ------------------------------------------------------------------------------------------------

#[test]
fn cuda_asa_elementwise_ops_match_cpu() {
    let Some(be) = backend("cuda_asa_elementwise_ops_match_cpu") else {
        return;
    };
    op_cases::asa_elementwise_ops(&be, &G::new(&be));
}

#[test]
fn cuda_asa_slot_ops_match_cpu() {
    let Some(be) = backend("cuda_asa_slot_ops_match_cpu") else {
        return;
    };
    op_cases::asa_slot_ops(&be, &G::new(&be));
}

// ------------------------------------------------------------------------------------------------

#[test]
fn cuda_layer_matches_cpu() {
    if backend("cuda_layer_matches_cpu").is_none() {
        return;
    }
    model_cases::layer_matches_cpu(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_lm_train_step_matches_cpu() {
    if backend("cuda_lm_train_step_matches_cpu").is_none() {
        return;
    }
    model_cases::lm_train_step_matches_cpu(&|| CudaBackend::new(0).unwrap(), true);
}

#[test]
fn cuda_bf16_twins_change_nothing() {
    if backend("cuda_bf16_twins_change_nothing").is_none() {
        return;
    }
    model_cases::bf16_twins_change_nothing(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_bf16_training_curve_follows_f32() {
    if backend("cuda_bf16_training_curve_follows_f32").is_none() {
        return;
    }
    let worst = model_cases::bf16_curve_follows_f32(&|| CudaBackend::new(0).unwrap(), 50, 2e-3);
    println!("bf16 vs f32 loss curve, 50 steps: largest relative difference {worst:.2e}");
}

#[test]
fn cuda_training_with_dropout_runs_and_learns() {
    if backend("cuda_training_with_dropout_runs_and_learns").is_none() {
        return;
    }
    model_cases::training_with_dropout_runs_and_learns(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_parity_fixtures() {
    let Some(_be) = backend("cuda_parity_fixtures") else {
        return;
    };
    // relative to the working directory first (prebuilt test executables run from a repo copy)
    let rel = std::path::PathBuf::from("tests/fixtures");
    let dir = if rel.is_dir() {
        rel
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    };
    let cases = asa::parity::find_cases(&[dir]).unwrap();
    let mut failed = Vec::new();
    for case in cases {
        let rep = asa::parity::gpu::run_case_cuda(&case, Precision::F32);
        println!("{}", rep.line());
        let unsupported = rep
            .error
            .as_deref()
            .map(|e| e.contains("not supported on the CUDA backend"))
            .unwrap_or(false);
        if unsupported {
            continue;
        }
        if !rep.passed() {
            failed.push(rep.line());
        }
    }
    assert!(
        failed.is_empty(),
        "GPU parity failures:\n{}",
        failed.join("\n")
    );
}

#[test]
fn cuda_doctor_reports_ok() {
    let Some(_be) = backend("cuda_doctor_reports_ok") else {
        return;
    };
    let rep = cuda::doctor(None);
    println!("{rep}");
    assert!(rep.ok, "doctor:\n{rep}");
}

#[test]
fn cuda_gpu_decoding_matches_cpu() {
    if backend("cuda_gpu_decoding_matches_cpu").is_none() {
        return;
    }
    model_cases::gpu_decoding_matches_cpu(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_frozen_training_matches_cpu() {
    if backend("cuda_frozen_training_matches_cpu").is_none() {
        return;
    }
    model_cases::frozen_training_matches_cpu(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_gpu_infos_match_cpu() {
    if backend("cuda_gpu_infos_match_cpu").is_none() {
        return;
    }
    model_cases::gpu_infos_match_cpu(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_noisy_forward_matches_cpu() {
    if backend("cuda_noisy_forward_matches_cpu").is_none() {
        return;
    }
    model_cases::noisy_forward_matches_cpu(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_resume_and_eval_match() {
    if backend("cuda_resume_and_eval_match").is_none() {
        return;
    }
    model_cases::resume_and_eval_match(&|| CudaBackend::new(0).unwrap());
}

// ------------------------------------------------------------------------------------------------
// intervene variant

#[test]
fn cuda_intervene_layer_matches_cpu() {
    if backend("cuda_intervene_layer_matches_cpu").is_none() {
        return;
    }
    model_cases::intervene_layer_matches_cpu(&|| CudaBackend::new(0).unwrap());
}

#[test]
fn cuda_intervene_lm_matches_cpu() {
    let Some(_be) = backend("cuda_intervene_lm_matches_cpu") else {
        return;
    };
    use asa::model::layer::{Intervention, IntvMode, ScoreKind};
    let mut r = rng(22);
    let (b, t) = (2, 17);
    let cfg = small_cfg(Variant::Intervene);
    let (_lm, store) = Lm::new(&cfg).unwrap();
    let inputs: Vec<u32> = (0..b * t)
        .map(|_| r.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let targets: Vec<i64> = (0..b * t)
        .map(|_| r.gen_range(0..cfg.vocab_size as i64))
        .collect();
    for it in [
        Intervention::default(),
        Intervention {
            mode: IntvMode::OrthGate,
            score_kind: ScoreKind::SlotPeaked,
            soft_temp: 0.2,
            ..Default::default()
        },
        Intervention {
            mode: IntvMode::DeltaOrth,
            head_mask: Some(vec![1.0, 0.0, 1.0, 0.5]),
            ..Default::default()
        },
    ] {
        let (mut lm, _) = Lm::new(&cfg).unwrap();
        lm.set_intervention(&it);
        let mut cache = LmCache::default();
        let opts = AsaOptions::default();
        lm.forward(&store, &inputs, b, t, &opts, &mut cache)
            .unwrap();
        let loss = lm.loss(&mut cache, &targets, None).unwrap();
        let mut grads = store.zeros_like();
        lm.backward(&store, &mut cache, &opts, &mut grads);

        let mut gl = GpuLm::new(&cfg, &store, Precision::F32).unwrap();
        gl.set_intervention(&it);
        let glog = gl.forward_logits(&inputs, b, t, None).unwrap();
        close(&format!("lm logits {it:?}"), &glog, &cache.logits, TOL);
        let (gloss, ggrads) = gl.loss_and_grads(&inputs, &targets, None, b, t).unwrap();
        assert!(
            (gloss - loss).abs() < 1e-5,
            "loss {gloss} vs {loss} ({it:?})"
        );
        close_params(&format!("lm grad {it:?}"), &ggrads, &grads, TOL);
        // training runs and stays finite
        let acfg = AdamWConfig::default();
        for _ in 0..2 {
            let (l, n) = gl
                .train_step(&inputs, &targets, b, t, b, 1e-3, &acfg, Some(1.0), true)
                .unwrap();
            assert!(
                l.is_finite() && n.is_finite(),
                "train step {l} {n} ({it:?})"
            );
        }
    }
}

#[test]
fn cuda_intervene_rejects_slot_masks() {
    let Some(_be) = backend("cuda_intervene_rejects_slot_masks") else {
        return;
    };
    let cfg = small_cfg(Variant::Intervene);
    let mut store = ParamStore::new();
    let ids = AsaIds::register(&mut store, "", &cfg, &mut Init::new(3));
    let mut run = cuda::layer::GpuLayerRunner::new(&cfg, ids, &store, Precision::F32).unwrap();
    let opts = AsaOptions {
        slot_mask: Some(SlotMask::new(&[1.0, 0.0, 1.0, 1.0, 1.0, 1.0], "read", "all").unwrap()),
        ..Default::default()
    };
    let x = vec![0.1; 2 * 4 * cfg.embed_dim];
    let err = run.forward(&x, 2, 4, &opts).unwrap_err();
    assert!(err.to_string().contains("no slot masks"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// the fused write scan + read (`cuda/fused.cu`, `backend::cuda::fused`)

#[test]
fn cuda_fused_scan_read_matches_cpu() {
    let Some(be) = backend("cuda_fused_scan_read_matches_cpu") else {
        return;
    };
    let g = G::new(&be);
    for cs in fused_case::fused_cases()
        .iter()
        .chain(&fused_case::fused_cases_tc())
    {
        fused_case::fused_case_matches_cpu(&be, &g, cs, 1e-5);
    }
}

/// The GPU layer with the fused write scan + read against the op-by-op GPU path (1e-5) and the
/// CPU (TOL), forward and backward: chunk sizes 1, 7, T, left padding, content read and the
/// refine path on and off, read slot masks.
#[test]
fn cuda_fused_layer_matches_unfused_and_cpu() {
    if backend("cuda_fused_layer_matches_unfused_and_cpu").is_none() {
        return;
    }
    model_cases::fused_layer_matches_unfused_and_cpu(&|| CudaBackend::new(0).unwrap());
}

/// The language model's loss and gradients with the fused write scan + read against the
/// op-by-op GPU path (1e-5) and the CPU (TOL), with an attention mask (left padding), for the
/// baseline and online variants and write chunks 1, 7 and T.
#[test]
fn cuda_fused_lm_matches_unfused_and_cpu() {
    if backend("cuda_fused_lm_matches_unfused_and_cpu").is_none() {
        return;
    }
    model_cases::fused_lm_matches_unfused_and_cpu(&|| CudaBackend::new(0).unwrap());
}
