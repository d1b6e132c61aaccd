//! CUDA kernels run on the CPU through the SIMT emulator (tests/support/simt.rs) and compared
//! with their CPU twins: kernel logic (indexing, barriers, shuffles, reduction order) is checked
//! on machines without a GPU, CI included. Launch shapes and arguments mirror the launchers in
//! src/backend/cuda/ops.rs. Timing means nothing here; tests/cuda_ops.rs checks the same kernels
//! on a real device.
//!
//! Without a C++ compiler every test prints SKIPPED and returns.

#![allow(clippy::too_many_arguments)]

#[path = "support/simt.rs"]
mod simt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use asa::backend::cpu::asa as ca;
use asa::backend::cpu::ops as co;
use simt::{Arg, Simt};

fn emu(name: &str) -> Option<&'static Simt> {
    let s = Simt::get();
    if s.is_none() {
        println!("SKIPPED {name}: no C++ compiler for the SIMT emulator");
    }
    s
}

fn rv(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..=hi)).collect()
}

/// max |a - b| / max(1, max |b|): the error relative to the reference's scale.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length");
    let scale = b.iter().fold(1.0f64, |m, &x| m.max((x as f64).abs()));
    let worst = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    worst / scale
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// `cfg_warps_small` of the launchers: one warp per item, four warps per block.
fn warps_small(n: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((n.div_ceil(4) as u32, 1, 1), (128, 1, 1))
}

const TOL: f64 = 1e-6;

#[test]
fn kernel_names_are_found_in_every_source() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
    let mut total = 0;
    for f in ["ops.cu", "asa.cu", "fused.cu", "intervene.cu"] {
        let src = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        let names = simt::kernel_names(&src);
        assert_eq!(
            names.len(),
            src.matches("__global__").count(),
            "{f}: every __global__ is a found kernel"
        );
        total += names.len();
    }
    assert!(total > 50, "found {total} kernels");
}

#[test]
fn emulated_layernorm_matches_cpu() {
    let Some(e) = emu("emulated_layernorm_matches_cpu") else {
        return;
    };
    let (n, c) = (7, 80);
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let x = rv(&mut r, n * c, -2.0, 2.0);
    let w = rv(&mut r, c, 0.5, 1.5);
    let b = rv(&mut r, c, -0.5, 0.5);
    let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
    co::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, c);
    let (mut go, mut gm, mut gr) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
    // one warp per row, 4 warps per block (a partial last block: rows beyond n return)
    e.launch(
        "layernorm_forward",
        ((n.div_ceil(4)) as u32, 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::of(&mut go),
            Arg::of(&mut gm),
            Arg::of(&mut gr),
            Arg::ro(&x),
            Arg::ro(&w),
            Arg::ro(&b),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
        ],
    )
    .unwrap();
    assert_close("layernorm out", &go, &out, TOL);
    assert_close("layernorm mean", &gm, &mean, TOL);
    assert_close("layernorm rstd", &gr, &rstd, TOL);
}

#[test]
fn emulated_crossentropy_matches_cpu() {
    let Some(e) = emu("emulated_crossentropy_matches_cpu") else {
        return;
    };
    let (n, v) = (5, 300);
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let logits = rv(&mut r, n * v, -4.0, 4.0);
    let targets: Vec<i64> = (0..n)
        .map(|i| if i == 3 { -100 } else { (i * 37 % v) as i64 })
        .collect();
    let mut probs = vec![0f32; n * v];
    let (loss, count) =
        co::crossentropy_forward(&mut probs, &logits, &targets, None, n, v).unwrap();
    let mut gp = vec![0f32; n * v];
    let mut row_loss = vec![0f64; n];
    // one block of 256 threads per row (block reductions through shared memory)
    e.launch(
        "crossentropy_forward",
        (n as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::of(&mut gp),
            Arg::of(&mut row_loss),
            Arg::ro(&logits),
            Arg::ro(&targets),
            Arg::null(),
            Arg::I32(n as i32),
            Arg::I32(v as i32),
        ],
    )
    .unwrap();
    assert_close("probs", &gp, &probs, TOL);
    assert_eq!(row_loss[3], 0.0, "an ignored target adds no loss");
    let mean = row_loss.iter().sum::<f64>() / count as f64;
    assert!(
        (mean - loss).abs() < 1e-6 * loss.abs().max(1.0),
        "{mean} vs {loss}"
    );
}

#[test]
fn emulated_prefix_max_matches_a_serial_scan() {
    let Some(e) = emu("emulated_prefix_max_matches_a_serial_scan") else {
        return;
    };
    // fused.cu's running max: one warp per row, 32 positions per step (shfl_up scan)
    let (rows, t) = (6, 77);
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let wl = rv(&mut r, rows * t, -3.0, 3.0);
    let mut rmax = vec![0f32; rows * t];
    let (grid, block) = warps_small(rows);
    e.launch(
        "slot_scan_read_forward_rmax",
        grid,
        block,
        0,
        &[
            Arg::of(&mut rmax),
            Arg::ro(&wl),
            Arg::I32(rows as i32),
            Arg::I32(t as i32),
            Arg::I32(1),
        ],
    )
    .unwrap();
    for row in 0..rows {
        let mut m = f32::NEG_INFINITY;
        for ti in 0..t {
            m = m.max(wl[row * t + ti]);
            assert_eq!(rmax[row * t + ti], m, "row {row} t {ti}");
        }
    }
}

/// Random slotspace inputs: phi features are positive (elu + 1), values signed.
fn linear_inputs(n: usize, t: usize, m: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (
        rv(&mut r, n * t * m, 0.05, 1.5),
        rv(&mut r, n * t * m, 0.05, 1.5),
        rv(&mut r, n * t * m, -1.0, 1.0),
    )
}

#[test]
fn emulated_linear_attention_matches_cpu() {
    let Some(e) = emu("emulated_linear_attention_matches_cpu") else {
        return;
    };
    let (n, t, m) = (2, 19, 40);
    let (qf, kf, v) = linear_inputs(n, t, m, 4);
    let mut out = vec![0f32; n * t * m];
    let mut den = vec![0f32; n * t];
    ca::linear_attn_forward(&mut out, &mut den, &qf, &kf, &v, t, m);
    let (mut go, mut gd) = (vec![0f32; n * t * m], vec![0f32; n * t]);
    let (grid, block) = warps_small(n * m);
    e.launch(
        "linear_attn_forward",
        grid,
        block,
        0,
        &[
            Arg::of(&mut go),
            Arg::of(&mut gd),
            Arg::ro(&qf),
            Arg::ro(&kf),
            Arg::ro(&v),
            Arg::I32(n as i32),
            Arg::I32(t as i32),
            Arg::I32(m as i32),
        ],
    )
    .unwrap();
    assert_close("linear attention out", &go, &out, TOL);
    assert_close("linear attention den", &gd, &den, TOL);

    // backward (accumulating into non-zero gradients)
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let dout = rv(&mut r, n * t * m, -1.0, 1.0);
    let init = rv(&mut r, 3 * n * t * m, -0.1, 0.1);
    let (mut dq, mut dk, mut dv) = (
        init[..n * t * m].to_vec(),
        init[n * t * m..2 * n * t * m].to_vec(),
        init[2 * n * t * m..].to_vec(),
    );
    let (mut gq, mut gk, mut gv) = (dq.clone(), dk.clone(), dv.clone());
    ca::linear_attn_backward(
        &mut dq, &mut dk, &mut dv, &dout, &out, &den, &qf, &kf, &v, t, m,
    );
    let mut zlive = vec![0u8; n * t * m];
    let (ni, ti, mi) = (Arg::I32(n as i32), Arg::I32(t as i32), Arg::I32(m as i32));
    e.launch(
        "linear_attn_backward",
        grid,
        block,
        0,
        &[
            Arg::of(&mut gq),
            Arg::of(&mut gk),
            Arg::of(&mut zlive),
            Arg::ro(&dout),
            Arg::ro(&out),
            Arg::ro(&den),
            Arg::ro(&qf),
            Arg::ro(&kf),
            Arg::ro(&v),
            ni,
            ti,
            mi,
        ],
    )
    .unwrap();
    e.launch(
        "linear_attn_backward_dv",
        grid,
        block,
        0,
        &[
            Arg::of(&mut gv),
            Arg::ro(&dout),
            Arg::ro(&den),
            Arg::ro(&qf),
            Arg::ro(&kf),
            ni,
            ti,
            mi,
        ],
    )
    .unwrap();
    assert_close("dqf", &gq, &dq, TOL);
    assert_close("dkf", &gk, &dk, TOL);
    assert_close("dv", &gv, &dv, TOL);
}

#[test]
fn emulator_shuffles_and_shared_memory_follow_cuda() {
    let Some(e) = emu("emulator_shuffles_and_shared_memory_follow_cuda") else {
        return;
    };
    let (blocks, threads) = (2usize, 64usize);
    let mut out = vec![0i32; blocks * threads * 4];
    let mut out2 = vec![0i32; blocks * threads];
    e.launch(
        "simt_selftest_exchange",
        (blocks as u32, 1, 1),
        (threads as u32, 1, 1),
        0,
        &[Arg::of(&mut out), Arg::of(&mut out2)],
    )
    .unwrap();
    for b in 0..blocks {
        for tid in 0..threads {
            let lane = tid % 32;
            let base = tid - lane;
            let val = |l: usize| (1000 * b + base + l) as i32;
            let o = &out[(b * threads + tid) * 4..][..4];
            assert_eq!(o[0], val(lane ^ 1), "xor, block {b} thread {tid}");
            assert_eq!(o[1], val(if lane >= 3 { lane - 3 } else { lane }), "up");
            assert_eq!(
                o[2],
                val(if lane + 5 < 32 { lane + 5 } else { lane }),
                "down"
            );
            assert_eq!(o[3], val(7), "broadcast");
            assert_eq!(
                out2[b * threads + tid],
                (1000 * b + threads - 1 - tid) as i32,
                "shared memory after __syncthreads"
            );
        }
    }
}

#[test]
fn emulator_reports_divergent_barriers_and_unknown_kernels() {
    let Some(e) = emu("emulator_reports_divergent_barriers_and_unknown_kernels") else {
        return;
    };
    let mut out = vec![0i32; 64];
    let err = e
        .launch(
            "simt_selftest_divergent_sync",
            (1, 1, 1),
            (64, 1, 1),
            0,
            &[Arg::of(&mut out)],
        )
        .unwrap_err();
    assert!(err.contains("deadlock"), "{err}");
    let err = e
        .launch("no_such_kernel", (1, 1, 1), (32, 1, 1), 0, &[])
        .unwrap_err();
    assert!(err.contains("no kernel named"), "{err}");
    // the emulator is usable after an error
    let mut out2 = vec![0i32; 32];
    let mut out4 = vec![0i32; 32 * 4];
    e.launch(
        "simt_selftest_exchange",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Arg::of(&mut out4), Arg::of(&mut out2)],
    )
    .unwrap();
    assert_eq!(out2[0], 31);
}
