//! The loss curve of 50 training steps on the GPU tracks the CPU reference (same data, same
//! init, no dropout): f32 GEMMs within 1e-3 of the CPU loss at every step, bf16 within 3e-2.
//! Skipped, by name, without a usable CUDA device.

#[path = "support/train_cases.rs"]
mod train_cases;

use asa::backend::cuda::{cuda_available, CudaBackend, GpuLm, Precision};
use asa::model::layer::AsaOptions;
use asa::model::lm::{Lm, LmCache};
use asa::optim::{clip_grad_norm, AdamW};
use train_cases::{adam_cfg, batches, cfg};

fn curves(precision: Precision) -> Option<(Vec<f64>, Vec<f64>)> {
    if !cuda_available() {
        println!("SKIPPED loss_curve_{precision:?}: no CUDA device");
        return None;
    }
    let c = cfg();
    let (b, t) = (4, 32);
    let data = batches(50, b, t, c.vocab_size);
    let adam_cfg = adam_cfg();
    // CPU
    let (mut lm, mut params) = Lm::new(&c).unwrap();
    let mut gpu = GpuLm::new(&c, &params, precision).unwrap();
    let mut adam = AdamW::new(adam_cfg, &params);
    let mut cache = LmCache::default();
    let opts = AsaOptions {
        training: true,
        ..Default::default()
    };
    let mut cpu_losses = Vec::new();
    let mut gpu_losses = Vec::new();
    for (inp, tgt) in &data {
        lm.forward(&params, inp, b, t, &opts, &mut cache).unwrap();
        cpu_losses.push(lm.loss(&mut cache, tgt, None).unwrap());
        let mut grads = params.zeros_like();
        lm.backward(&params, &mut cache, &opts, &mut grads);
        clip_grad_norm(&mut grads, 1.0);
        adam.step(&mut params, &grads, adam_cfg.lr);
        let (l, _) = gpu
            .train_step(inp, tgt, b, t, b, adam_cfg.lr, &adam_cfg, Some(1.0), true)
            .unwrap();
        gpu_losses.push(l);
    }
    Some((cpu_losses, gpu_losses))
}

fn check(precision: Precision, tol: f64) {
    let Some((cpu, gpu)) = curves(precision) else {
        return;
    };
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
        .fold(0.0, f64::max);
    println!("loss curve {precision:?}: cpu {:.4} -> {:.4}, gpu {:.4} -> {:.4}, worst rel diff {worst:.2e}", cpu[0], cpu[49], gpu[0], gpu[49]);
    assert!(
        cpu[49] < cpu[0] - 0.5,
        "the toy run must learn: {} -> {}",
        cpu[0],
        cpu[49]
    );
    assert!(
        worst < tol,
        "GPU loss curve leaves the CPU one: worst relative difference {worst}"
    );
}

#[test]
fn loss_curve_f32_tracks_cpu() {
    check(Precision::F32, 1e-3);
}

#[test]
fn loss_curve_bf16_tracks_cpu() {
    check(Precision::Bf16, 3e-2);
}

/// Gradient accumulation on the GPU (see tests/support/train_cases.rs).
#[test]
fn accumulation_matches_whole_batch_and_cpu() {
    if !cuda_available() {
        println!("SKIPPED accumulation_matches_whole_batch_and_cpu: no CUDA device");
        return;
    }
    train_cases::accumulation_matches_whole_batch_and_cpu(&|| CudaBackend::new(0).unwrap());
}

/// A non-finite step changes nothing on the GPU (see tests/support/train_cases.rs).
#[test]
fn non_finite_step_changes_nothing() {
    if !cuda_available() {
        println!("SKIPPED non_finite_step_changes_nothing: no CUDA device");
        return;
    }
    train_cases::non_finite_step_changes_nothing(&|| CudaBackend::new(0).unwrap());
}

/// CUDA graph capture and replay take the eager steps bit for bit (see
/// tests/support/train_cases.rs).
#[test]
fn graph_replay_matches_eager() {
    if !cuda_available() {
        println!("SKIPPED graph_replay_matches_eager: no CUDA device");
        return;
    }
    train_cases::graph_replay_matches_eager(&|| CudaBackend::new(0).unwrap());
}
