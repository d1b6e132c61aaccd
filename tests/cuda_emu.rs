//! CUDA kernels run on the CPU through the SIMT emulator (tests/support/simt.rs) and compared
//! with their CPU twins: kernel logic (indexing, barriers, shuffles, reduction order) is checked
//! on machines without a GPU, CI included. Launch shapes and arguments mirror the launchers in
//! src/backend/cuda/ops.rs. Timing means nothing here; tests/cuda_ops.rs checks the same kernels
//! on a real device.
//!
//! Without a C++ compiler every test prints SKIPPED and returns.

#![allow(clippy::too_many_arguments)]

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
#[path = "support/simt.rs"]
mod simt;
#[path = "support/train_cases.rs"]
mod train_cases;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use asa::backend::cpu::ops as co;
use asa::backend::cpu::slot_ops as ca;
use asa::backend::cuda::linear::{self, LinearAlgo, LinearPlan, LinearWs};
use check::close;
use dev::TestDev;
use simt::{Arg, EmuDev, Simt};

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

/// `cfg_warps_small` of the launchers: one warp per item, four warps per block.
fn warps_small(n: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((n.div_ceil(4) as u32, 1, 1), (128, 1, 1))
}

const TOL: f64 = 1e-6;

/// The emulator registers the kernels that `kernel_names` finds: every `__global__` of every
/// source must be among them.
#[test]
fn kernel_names_are_found_in_every_source() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
    let mut total = 0;
    for f in [
        "ops.cu",
        "slot_ops.cu",
        "fused.cu",
        "intervene.cu",
        "linear.cu",
    ] {
        let src = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        let names = asa::backend::cuda::kernel_names(&src);
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
            Arg::null(), // no bf16 twin
        ],
    )
    .unwrap();
    close("layernorm out", &go, &out, TOL);
    close("layernorm mean", &gm, &mean, TOL);
    close("layernorm rstd", &gr, &rstd, TOL);
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
            Arg::I32(0), // probabilities, not their gradient
            Arg::F32(0.0),
            Arg::null(),
        ],
    )
    .unwrap();
    close("probs", &gp, &probs, TOL);
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

struct LinearGrads {
    out: Vec<f32>,
    den: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// `backend::cuda::linear` forward then backward (accumulating into grads0) in the emulator;
/// `tc`: the tiles on tensor cores.
fn emu_linear_attention(
    e: &'static Simt,
    qf: &[f32],
    kf: &[f32],
    v: &[f32],
    dout: &[f32],
    grads0: &[f32],
    (n, t, m, algo, tc): (usize, usize, usize, LinearAlgo, bool),
) -> LinearGrads {
    let dev = EmuDev::new(e);
    let p = LinearPlan::new(n, t, m, algo).with_tensor_cores(tc);
    let len = n * t * m;
    let (q_d, k_d, v_d, go_d) = (dev.put(qf), dev.put(kf), dev.put(v), dev.put(dout));
    let (out_d, den_d) = (
        dev.put(&vec![f32::NAN; len]),
        dev.put(&vec![f32::NAN; n * t]),
    );
    // workspaces start as NaN: every range a kernel reads must have been written
    let wf = dev.put(&vec![f64::NAN; p.ws_forward().max(1)]);
    let ws = LinearWs::forward(&p, wf);
    let out16 = dev.zeroed::<u16>(len);
    linear::forward(&dev, &p, &ws, (out_d, out16), den_d, q_d, k_d, v_d).unwrap();
    op_cases::twin_matches(&dev, "linear attention", out_d, out16);
    let (dq_d, dk_d, dv_d) = (
        dev.put(&grads0[..len]),
        dev.put(&grads0[len..2 * len]),
        dev.put(&grads0[2 * len..]),
    );
    let wb = dev.put(&vec![f64::NAN; p.ws_backward()]);
    let zl = dev.zeroed::<u8>(len);
    let ws = LinearWs::backward(&p, wb, zl);
    linear::backward(
        &dev, &p, &ws, dq_d, dk_d, dv_d, go_d, out_d, den_d, q_d, k_d, v_d,
    )
    .unwrap();
    LinearGrads {
        out: dev.get(out_d),
        den: dev.get(den_d),
        dq: dev.get(dq_d),
        dk: dev.get(dk_d),
        dv: dev.get(dv_d),
    }
}

#[test]
fn emulated_chunked_linear_attention_matches_cpu() {
    let Some(e) = emu("emulated_chunked_linear_attention_matches_cpu") else {
        return;
    };
    let (walk, tiled) = (
        |chunk| LinearAlgo::Walk { chunk },
        |chunk| LinearAlgo::Tiled { chunk },
    );
    // M below, at and above one warp's lanes and not a multiple of 4 (the tiles' padding);
    // the walk: one serial walk, uneven chunks, single steps; the tiles: one chunk, uneven
    // chunks (a short last one), chunks of 1 and 64
    for (n, t, m, algos) in [
        (
            2usize,
            19usize,
            8usize,
            &[
                walk(19),
                walk(5),
                walk(2),
                walk(1),
                tiled(19),
                tiled(5),
                tiled(1),
            ][..],
        ),
        (
            2,
            13,
            40,
            &[walk(13), walk(4), walk(1), tiled(13), tiled(4)][..],
        ),
        (1, 9, 100, &[walk(9), walk(4), tiled(9), tiled(2)][..]),
        (1, 70, 7, &[tiled(64), tiled(8)][..]),
    ] {
        let (mut qf, mut kf, v) = linear_inputs(n, t, m, 4 + m as u64);
        // the last row starts with keys so small that Z stays below eps (clamped: no gradient
        // to Z there, while S and the output are not zero) and, in its first position, a zero
        // query too (a padded position)
        let last = (n - 1) * t * m;
        for i in 0..2 * m {
            kf[last + i] = 1e-11;
        }
        for i in 0..m {
            qf[last + i] = 0.0;
        }
        let mut r = ChaCha8Rng::seed_from_u64(5);
        let len = n * t * m;
        let dout = rv(&mut r, len, -1.0, 1.0);
        let grads0 = rv(&mut r, 3 * len, -0.1, 0.1);
        let (mut out, mut den) = (vec![0f32; len], vec![0f32; n * t]);
        ca::linear_attn_forward(&mut out, &mut den, &qf, &kf, &v, t, m);
        let (mut dq, mut dk, mut dv) = (
            grads0[..len].to_vec(),
            grads0[len..2 * len].to_vec(),
            grads0[2 * len..].to_vec(),
        );
        ca::linear_attn_backward(
            &mut dq, &mut dk, &mut dv, &dout, &out, &den, &qf, &kf, &v, t, m,
        );
        // every algorithm exact, then the tiles on tensor cores (bf16 operands: bf16's
        // agreement, the walks' den exact, and visibly rounded)
        let tc = algos
            .iter()
            .filter(|a| matches!(a, LinearAlgo::Tiled { .. }))
            .map(|&a| (a, true));
        for (algo, tc) in algos.iter().map(|&a| (a, false)).chain(tc) {
            let g = emu_linear_attention(e, &qf, &kf, &v, &dout, &grads0, (n, t, m, algo, tc));
            let tag = format!("m {m} {algo:?} tensor cores {tc}");
            let tol = if tc { op_cases::LINEAR_BF16_TOL } else { TOL };
            if tc {
                let err = check::rel_err(&g.out, &out);
                println!(
                    "{tag}: out {err:.2e} dq {:.2e} dk {:.2e} dv {:.2e}",
                    check::rel_err(&g.dq, &dq),
                    check::rel_err(&g.dk, &dk),
                    check::rel_err(&g.dv, &dv)
                );
                assert!(err > 1e-7, "{tag}: no bf16 rounding ({err:e})");
            }
            close(&format!("out, {tag}"), &g.out, &out, tol);
            close(&format!("den, {tag}"), &g.den, &den, TOL);
            close(&format!("dqf, {tag}"), &g.dq, &dq, tol);
            close(&format!("dkf, {tag}"), &g.dk, &dk, tol);
            close(&format!("dv, {tag}"), &g.dv, &dv, tol);
        }
    }
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
fn emulator_reports_divergent_barriers_unknown_kernels_and_wrong_arities() {
    let Some(e) = emu("emulator_reports_divergent_barriers_unknown_kernels_and_wrong_arities")
    else {
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
    // an argument list of the wrong length (cuLaunchKernel would read garbage)
    let mut short = vec![0i32; 32];
    let err = e
        .launch(
            "simt_selftest_exchange",
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[Arg::of(&mut short)],
        )
        .unwrap_err();
    assert!(
        err.contains("1 arguments for a kernel of 2 parameters"),
        "{err}"
    );
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

#[test]
fn emulated_fused_scan_read_matches_cpu() {
    let Some(e) = emu("emulated_fused_scan_read_matches_cpu") else {
        return;
    };
    // the GPU test's cases (tests/support/fused_case.rs) small enough to emulate quickly: every
    // chunk x tile combination, masks, refine, padding, ties and most layouts
    let cases: Vec<_> = fused_case::fused_cases()
        .into_iter()
        .filter(|c| c.b * c.h * c.t * c.k * c.d <= 60_000)
        .collect();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for cs in &cases {
        let dev = EmuDev::new(e);
        fused_case::fused_case_matches_cpu(&dev, &dev, cs, 1e-5);
    }
}

#[test]
fn emulated_fused_forward_on_tensor_cores_matches_cpu() {
    let Some(e) = emu("emulated_fused_forward_on_tensor_cores_matches_cpu") else {
        return;
    };
    for cs in &fused_case::fused_cases_tc() {
        let dev = EmuDev::new(e);
        fused_case::fused_case_matches_cpu(&dev, &dev, cs, 1e-5);
    }
}

// The GPU suite's op-level tests (tests/support/op_cases.rs): every launcher of
// `backend::cuda::ops` against its CPU twin, through the same launch code as on a device.

#[test]
fn emulated_generic_ops_match_cpu() {
    if let Some(e) = emu("emulated_generic_ops_match_cpu") {
        {
            let dev = EmuDev::new(e);
            op_cases::generic_ops(&dev, &dev);
        }
    }
}

#[test]
fn emulated_asa_elementwise_ops_match_cpu() {
    if let Some(e) = emu("emulated_asa_elementwise_ops_match_cpu") {
        {
            let dev = EmuDev::new(e);
            op_cases::asa_elementwise_ops(&dev, &dev);
        }
    }
}

#[test]
fn emulated_asa_slot_ops_match_cpu() {
    if let Some(e) = emu("emulated_asa_slot_ops_match_cpu") {
        {
            let dev = EmuDev::new(e);
            op_cases::asa_slot_ops(&dev, &dev);
        }
    }
}

// The GPU suite's model-level tests (tests/support/model_cases.rs): the GPU layer and language
// model (forward, backward, AdamW steps, the fused path, the intervene variant) against the CPU
// model, with every kernel emulated; the training step also in bf16 (the emulated GEMM rounds
// its operands to bf16 as cuBLAS is given them, the linear attention runs its tensor-core tiles).

#[test]
fn emulated_layer_matches_cpu() {
    if let Some(e) = emu("emulated_layer_matches_cpu") {
        model_cases::layer_matches_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_lm_train_step_matches_cpu() {
    if let Some(e) = emu("emulated_lm_train_step_matches_cpu") {
        model_cases::lm_train_step_matches_cpu(&|| EmuDev::new(e), true);
    }
}

#[test]
fn emulated_fused_layer_matches_unfused_and_cpu() {
    if let Some(e) = emu("emulated_fused_layer_matches_unfused_and_cpu") {
        model_cases::fused_layer_matches_unfused_and_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_fused_lm_matches_unfused_and_cpu() {
    if let Some(e) = emu("emulated_fused_lm_matches_unfused_and_cpu") {
        model_cases::fused_lm_matches_unfused_and_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_gpu_infos_match_cpu() {
    if let Some(e) = emu("emulated_gpu_infos_match_cpu") {
        model_cases::gpu_infos_match_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_noisy_forward_matches_cpu() {
    if let Some(e) = emu("emulated_noisy_forward_matches_cpu") {
        model_cases::noisy_forward_matches_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_intervene_layer_matches_cpu() {
    if let Some(e) = emu("emulated_intervene_layer_matches_cpu") {
        model_cases::intervene_layer_matches_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_accumulation_matches_whole_batch_and_cpu() {
    if let Some(e) = emu("emulated_accumulation_matches_whole_batch_and_cpu") {
        train_cases::accumulation_matches_whole_batch_and_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_non_finite_step_changes_nothing() {
    if let Some(e) = emu("emulated_non_finite_step_changes_nothing") {
        train_cases::non_finite_step_changes_nothing(&|| EmuDev::new(e));
    }
}

/// Every public fixture (tests/fixtures) through the GPU code path in `precision`, every kernel
/// emulated: the same runner as `asa parity --device cuda --precision ...`.
fn fixtures_pass_emulated(e: &'static Simt, precision: asa::backend::cuda::Precision) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cases = asa::parity::find_cases(&[root]).unwrap();
    assert!(cases.len() >= 14, "found {} cases", cases.len());
    let mut failed = Vec::new();
    for dir in &cases {
        let rep = asa::parity::gpu::run_case_on(dir, precision, &|| Ok(EmuDev::new(e)));
        println!("{}", rep.line());
        if !rep.passed() {
            failed.push(rep.line());
        }
    }
    assert!(failed.is_empty(), "failing cases:\n{}", failed.join("\n"));
}

/// f32 GEMMs and the f64 scan: the fixtures' float32 tolerances.
#[test]
fn emulated_gpu_path_passes_every_public_fixture() {
    if let Some(e) = emu("emulated_gpu_path_passes_every_public_fixture") {
        fixtures_pass_emulated(e, asa::backend::cuda::Precision::F32);
    }
}

/// bf16 GEMM operands, the fused scan and linear attention on tensor cores, at bf16's
/// tolerances: the tensor-core kernels compute the same model on every fixture's configuration.
#[test]
fn emulated_bf16_path_passes_every_public_fixture_at_bf16_tolerance() {
    if let Some(e) = emu("emulated_bf16_path_passes_every_public_fixture_at_bf16_tolerance") {
        fixtures_pass_emulated(e, asa::backend::cuda::Precision::Bf16);
    }
}

#[test]
fn emulated_gpu_decoding_matches_cpu() {
    if let Some(e) = emu("emulated_gpu_decoding_matches_cpu") {
        model_cases::gpu_decoding_matches_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_frozen_training_matches_cpu() {
    if let Some(e) = emu("emulated_frozen_training_matches_cpu") {
        model_cases::frozen_training_matches_cpu(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_resume_and_eval_match() {
    if let Some(e) = emu("emulated_resume_and_eval_match") {
        model_cases::resume_and_eval_match(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_training_with_dropout_runs_and_learns() {
    if let Some(e) = emu("emulated_training_with_dropout_runs_and_learns") {
        model_cases::training_with_dropout_runs_and_learns(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_bf16_training_curve_follows_f32() {
    if let Some(e) = emu("emulated_bf16_training_curve_follows_f32") {
        let worst = model_cases::bf16_curve_follows_f32(&|| EmuDev::new(e), 50, 2e-3);
        println!("bf16 vs f32 loss curve, 50 steps: largest relative difference {worst:.2e}");
    }
}

#[test]
fn emulated_bf16_twins_change_nothing() {
    if let Some(e) = emu("emulated_bf16_twins_change_nothing") {
        model_cases::bf16_twins_change_nothing(&|| EmuDev::new(e));
    }
}

#[test]
fn emulated_graph_replay_matches_eager() {
    if let Some(e) = emu("emulated_graph_replay_matches_eager") {
        train_cases::graph_replay_matches_eager(&|| EmuDev::new(e));
    }
}
