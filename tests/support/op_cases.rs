//! The op-level CUDA tests (every launcher against its CPU twin on random inputs), written
//! against [`Ops`] (launches) and [`TestDev`] (memory) so that they run on a GPU (tests/cuda_ops.rs) and in the SIMT emulator
//! (tests/cuda_emu.rs).

#![allow(dead_code, clippy::too_many_arguments, clippy::needless_range_loop)]

use asa::backend::cpu::ops as co;
use asa::backend::cpu::slot_ops::{self as ca, ReadMask, Routing, SlotDims, SlotKeep};
use asa::backend::cuda::linear::{self, LinearAlgo};
use asa::backend::cuda::ops::{AlibiFinish, DevRouting, DevSlotMask, KeysFinish, WritePrologue};
use asa::backend::cuda::{AsDv, Dv, Ops, Precision};
use asa::model::params::ParamStore;
use asa::optim::{clip_grad_norm, global_norm, AdamW, AdamWConfig};

use crate::check::{close, rng, rv};
use crate::dev::TestDev;

/// Tolerance of f32 results against the CPU twins (relative to the tensor's scale).
pub const TOL: f64 = 1e-4;
/// Linear attention on tensor cores (bf16 operands, f32 accumulation) against the f64 CPU twin.
pub const LINEAR_BF16_TOL: f64 = 2e-2;

/// Checks a producer's bf16 twin: bit for bit the round-to-nearest-even bf16 of its f32 output
/// (what `convert_f32_bf16` makes of it, so that GEMMs reading the twin see the same operand).
pub fn twin_matches<M: TestDev>(
    mem: &M,
    name: &str,
    out: asa::backend::cuda::Dv<f32>,
    out16: asa::backend::cuda::Dv<u16>,
) {
    let want: Vec<u16> = mem
        .get(out)
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    assert_eq!(mem.get(out16), want, "{name}: bf16 twin");
}

pub fn dims() -> SlotDims {
    SlotDims {
        b: 2,
        h: 2,
        t: 37,
        k: 5,
        d: 40,
    }
}

/// `cuda_generic_ops_match_cpu` of tests/cuda_ops.rs, on any device.
pub fn generic_ops<D: Ops, M: TestDev>(dev: &D, mem: &M) {
    let mut r = rng(1);
    let (b, t, c, v, hid) = (2, 5, 24, 13, 40);
    let n = b * t;

    // f32 -> bf16 (the bf16 GEMMs' inputs): nearest even, ties, infinities; aligned ranges
    // (four at a time) and misaligned ones (one by one), with tails
    let mut xs = rv(&mut r, 203, 3.0);
    xs.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
        f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
        f32::MAX,
    ]);
    let xs_d = mem.put(&xs);
    for (off, len) in [(0usize, xs.len()), (0, 9), (1, 13), (3, 101), (4, 200)] {
        let y_d = mem.zeroed::<u16>(len);
        dev.convert_f32_bf16(y_d, xs_d.dv().sub(off, len)).unwrap();
        let want: Vec<u16> = xs[off..off + len]
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        assert_eq!(mem.get(y_d), want, "convert_f32_bf16 at {off}+{len}");
    }

    // encoder
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7) % v) as u32).collect();
    let wte = rv(&mut r, v * c, 1.0);
    let wpe = rv(&mut r, 8 * c, 1.0);
    let mut out = vec![0.0; n * c];
    co::encoder_forward(&mut out, &ids, &wte, Some(&wpe), b, t, c);
    let ids_d = mem.put(&ids);
    let (wte_d, wpe_d, out_d) = (mem.put(&wte), mem.put(&wpe), mem.zeroed::<f32>(n * c));
    dev.encoder_forward(out_d, ids_d.dv().sub(0, n), wte_d, wpe_d, b, t, c)
        .unwrap();
    close("encoder_forward", &mem.get(out_d), &out, 0.0);
    let dout = rv(&mut r, n * c, 1.0);
    let (mut dwte, mut dwpe) = (vec![0.5; v * c], vec![0.25; 8 * c]);
    co::encoder_backward(&mut dwte, Some(&mut dwpe), &dout, &ids, b, t, c);
    let (dwte_d, dwpe_d, dout_d) = (
        mem.put(&vec![0.5; v * c]),
        mem.put(&vec![0.25; 8 * c]),
        mem.put(&dout),
    );
    dev.encoder_backward(dwte_d, dwpe_d, dout_d, &ids, b, t, c)
        .unwrap();
    close("encoder_backward wte", &mem.get(dwte_d), &dwte, TOL);
    close("encoder_backward wpe", &mem.get(dwpe_d), &dwpe, TOL);

    // layernorm
    let x: Vec<f32> = rv(&mut r, n * c, 2.0).iter().map(|a| a + 0.3).collect();
    let (w, bias) = (rv(&mut r, c, 1.5), rv(&mut r, c, 1.0));
    let (mut y, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    co::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &bias, n, c);
    let (x_d, w_d, b_d) = (mem.put(&x), mem.put(&w), mem.put(&bias));
    let (y_d, m_d, r_d) = (
        mem.zeroed::<f32>(n * c),
        mem.zeroed::<f32>(n),
        mem.zeroed::<f32>(n),
    );
    let y16 = mem.zeroed::<u16>(n * c);
    dev.layernorm_forward(y_d, m_d, r_d, x_d, w_d, b_d, n, c, y16)
        .unwrap();
    close("layernorm_forward", &mem.get(y_d), &y, TOL);
    twin_matches(mem, "layernorm_forward", y_d, y16);
    close("layernorm mean", &mem.get(m_d), &mean, TOL);
    close("layernorm rstd", &mem.get(r_d), &rstd, TOL);
    // the residual step and the next norm in one pass, with and without the bias of b's GEMM
    let rb = rv(&mut r, n * c, 1.0);
    let bb = rv(&mut r, c, 0.5);
    for with_bias in [false, true] {
        let mut b2 = rb.clone();
        if with_bias {
            for row in b2.chunks_mut(c) {
                row.iter_mut().zip(&bb).for_each(|(v, b)| *v += b);
            }
        }
        let mut res = vec![0.0; n * c];
        co::residual_forward(&mut res, &x, &b2);
        let (mut y2, mut mean2, mut rstd2) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        co::layernorm_forward(&mut y2, &mut mean2, &mut rstd2, &res, &w, &bias, n, c);
        let (rb_d, bb_d) = (mem.put(&rb), mem.put(&bb));
        let (res_d, y2_d) = (
            mem.put(&vec![f32::NAN; n * c]),
            mem.put(&vec![f32::NAN; n * c]),
        );
        let (m2_d, r2_d, y2_16) = (
            mem.zeroed::<f32>(n),
            mem.zeroed::<f32>(n),
            mem.zeroed::<u16>(n * c),
        );
        let bias_b = if with_bias {
            bb_d
        } else {
            asa::backend::cuda::Dv::null()
        };
        dev.residual_layernorm_forward(
            (res_d, y2_d, m2_d, r2_d),
            (x_d, rb_d, bias_b),
            w_d,
            b_d,
            n,
            c,
            y2_16,
        )
        .unwrap();
        let tag = format!("residual_layernorm_forward bias {with_bias}");
        close(&format!("{tag} res"), &mem.get(res_d), &res, TOL);
        close(&format!("{tag} out"), &mem.get(y2_d), &y2, TOL);
        close(&format!("{tag} mean"), &mem.get(m2_d), &mean2, TOL);
        close(&format!("{tag} rstd"), &mem.get(r2_d), &rstd2, TOL);
        twin_matches(mem, &tag, y2_d, y2_16);
    }
    let dy = rv(&mut r, n * c, 1.0);
    let (mut dx, mut dw, mut db) = (vec![0.1; n * c], vec![0.0; c], vec![0.0; c]);
    co::layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd, n, c);
    let (dx_d, dw_d, db_d, dy_d) = (
        mem.put(&vec![0.1; n * c]),
        mem.zeroed::<f32>(c),
        mem.zeroed::<f32>(c),
        mem.put(&dy),
    );
    let dx16 = mem.zeroed::<u16>(n * c);
    dev.layernorm_backward(dx_d, dw_d, db_d, dy_d, x_d, w_d, m_d, r_d, n, c, dx16)
        .unwrap();
    close("layernorm_backward dx", &mem.get(dx_d), &dx, TOL);
    twin_matches(mem, "layernorm_backward", dx_d, dx16);
    close("layernorm_backward dw", &mem.get(dw_d), &dw, TOL);
    close("layernorm_backward db", &mem.get(db_d), &db, TOL);

    // matmul, f32 and bf16
    let wm = rv(&mut r, hid * c, 0.5);
    let bm = rv(&mut r, hid, 0.5);
    let mut h = vec![0.0; n * hid];
    co::matmul_forward(&mut h, &x, &wm, Some(&bm), n, c, hid);
    let (wm_d, bm_d, h_d) = (mem.put(&wm), mem.put(&bm), mem.zeroed::<f32>(n * hid));
    dev.matmul_forward(h_d, x_d, wm_d, bm_d, n, c, hid).unwrap();
    close("matmul_forward", &mem.get(h_d), &h, TOL);
    let dh = rv(&mut r, n * hid, 1.0);
    let (mut dxm, mut dwm, mut dbm) = (vec![0.0; n * c], vec![0.0; hid * c], vec![0.0; hid]);
    co::matmul_backward(&mut dxm, &mut dwm, Some(&mut dbm), &dh, &x, &wm, n, c, hid);
    let (dxm_d, dwm_d, dbm_d, dh_d) = (
        mem.zeroed::<f32>(n * c),
        mem.zeroed::<f32>(hid * c),
        mem.zeroed::<f32>(hid),
        mem.put(&dh),
    );
    dev.matmul_backward(dxm_d, dwm_d, dbm_d, dh_d, x_d, wm_d, n, c, hid)
        .unwrap();
    close("matmul_backward dinp", &mem.get(dxm_d), &dxm, TOL);
    close("matmul_backward dweight", &mem.get(dwm_d), &dwm, TOL);
    close("matmul_backward dbias", &mem.get(dbm_d), &dbm, TOL);
    // bf16 GEMM inputs (devices with that path)
    if mem.try_precision(Precision::Bf16) {
        let h16 = mem.zeroed::<f32>(n * hid);
        dev.matmul_forward(h16, x_d, wm_d, bm_d, n, c, hid).unwrap();
        close("matmul_forward bf16", &mem.get(h16), &h, 3e-2);
        // outputs only GEMMs read, written by cuBLAS in bf16 alone: the same bits as the
        // f32 output rounded (what a conversion after it makes)
        let hb = mem.zeroed::<f32>(n * hid);
        dev.matmul_forward(hb, x_d, wm_d, Dv::null(), n, c, hid)
            .unwrap();
        let (hb2, hb2_16) = (mem.zeroed::<f32>(n * hid), mem.zeroed::<u16>(n * hid));
        dev.matmul_forward_to_bf16((hb2, hb2_16), x_d, wm_d, n, c, hid)
            .unwrap();
        twin_matches(mem, "matmul_forward_to_bf16", hb, hb2_16);
        let (dx1, dw1) = (mem.zeroed::<f32>(n * c), mem.put(&vec![0.5f32; hid * c]));
        dev.matmul_backward_store(dx1, dw1, Dv::null(), dh_d, x_d, wm_d, n, c, hid)
            .unwrap();
        let (dx2, dx2_16) = (mem.zeroed::<f32>(n * c), mem.zeroed::<u16>(n * c));
        let dw2 = mem.put(&vec![0.5f32; hid * c]);
        dev.matmul_backward_store_to_bf16((dx2, dx2_16), dw2, dh_d, x_d, wm_d, n, c, hid)
            .unwrap();
        twin_matches(mem, "matmul_backward_store_to_bf16", dx1, dx2_16);
        assert_eq!(
            mem.get(dw2),
            mem.get(dw1),
            "matmul_backward_store_to_bf16 dweight"
        );
        mem.try_precision(Precision::F32);
    }

    // gelu
    let mut gl = vec![0.0; n * hid];
    co::gelu_forward(&mut gl, &h);
    let gl_d = mem.zeroed::<f32>(n * hid);
    let gl16 = mem.zeroed::<u16>(n * hid);
    dev.gelu_forward(gl_d, h_d, gl16).unwrap();
    close("gelu_forward", &mem.get(gl_d), &gl, TOL);
    twin_matches(mem, "gelu_forward", gl_d, gl16);
    // the first MLP GEMM's bias and the GELU in one pass: h without its bias in, with it out
    let mut h0 = vec![0.0; n * hid];
    co::matmul_forward(&mut h0, &x, &wm, None, n, c, hid);
    let (h0_d, gb_d) = (mem.put(&h0), mem.put(&vec![f32::NAN; n * hid]));
    let gb16 = mem.zeroed::<u16>(n * hid);
    dev.bias_gelu_forward(gb_d, h0_d, bm_d, n, hid, gb16)
        .unwrap();
    close("bias_gelu_forward h", &mem.get(h0_d), &h, TOL);
    close("bias_gelu_forward", &mem.get(gb_d), &gl, TOL);
    twin_matches(mem, "bias_gelu_forward", gb_d, gb16);
    let mut dgl = vec![0.0; n * hid];
    co::gelu_backward(&mut dgl, &h, &dh);
    let dgl_d = mem.put(&vec![f32::NAN; n * hid]); // a store (the CPU twin adds into zeros)
    let dgl16 = mem.zeroed::<u16>(n * hid);
    let null = asa::backend::cuda::Dv::null();
    // no bias of its own, the next GEMM's bias gradient (column sums of dh) after it
    let db2_d = mem.put(&vec![0.25f32; hid]);
    dev.gelu_backward(dgl_d, h_d, dh_d, dgl16, null, (db2_d, dh_d))
        .unwrap();
    close("gelu_backward", &mem.get(dgl_d), &dgl, TOL);
    let db2: Vec<f32> = (0..hid)
        .map(|j| 0.25 + (0..n).map(|i| dh[i * hid + j] as f64).sum::<f64>() as f32)
        .collect();
    close(
        "gelu_backward (colsum_add after it)",
        &mem.get(db2_d),
        &db2,
        TOL,
    );
    twin_matches(mem, "gelu_backward", dgl_d, dgl16);
    // with the bias gradient: += the column sums of dinp
    let (dgl2_d, dgb_d) = (
        mem.put(&vec![f32::NAN; n * hid]),
        mem.put(&vec![0.5f32; hid]),
    );
    let dgl2_16 = mem.zeroed::<u16>(n * hid);
    dev.gelu_backward(dgl2_d, h_d, dh_d, dgl2_16, dgb_d, (null, null))
        .unwrap();
    let dgb: Vec<f32> = (0..hid)
        .map(|j| 0.5 + (0..n).map(|i| dgl[i * hid + j] as f64).sum::<f64>() as f32)
        .collect();
    close("gelu_backward_colsum", &mem.get(dgl2_d), &dgl, TOL);
    close("gelu_backward_colsum dbias", &mem.get(dgb_d), &dgb, TOL);
    twin_matches(mem, "gelu_backward_colsum", dgl2_d, dgl2_16);

    single_launch_reductions(dev, mem);

    // dropout: p = 0 is a copy; p = 0.5 keeps about half, mask 0 or 2, out = inp*mask
    let nn = 20_000;
    let xin = rv(&mut r, nn, 1.0);
    let (xin_d, o_d, mk_d) = (mem.put(&xin), mem.zeroed::<f32>(nn), mem.zeroed::<f32>(nn));
    let none = Dv::<u64>::null();
    dev.dropout_forward(o_d, mk_d, xin_d, 0.0, (7, none))
        .unwrap();
    close("dropout p=0", &mem.get(o_d), &xin, 0.0);
    dev.dropout_forward(o_d, mk_d, xin_d, 0.5, (7, none))
        .unwrap();
    let (o, mk) = (mem.get(o_d), mem.get(mk_d));
    let kept = mk.iter().filter(|&&m| m != 0.0).count();
    assert!((9_000..=11_000).contains(&kept), "dropout kept {kept}");
    for i in 0..nn {
        assert!(mk[i] == 0.0 || mk[i] == 2.0);
        assert_eq!(o[i], xin[i] * mk[i]);
    }
    dev.dropout_forward(o_d, mk_d, xin_d, 0.5, (7, none))
        .unwrap();
    assert_eq!(mem.get(mk_d), mk, "same seed, same mask");
    // the seed read on the device (the step's draws) wins over the argument
    let (seven, eight) = (mem.put(&[7u64]), mem.put(&[8u64]));
    dev.dropout_forward(o_d, mk_d, xin_d, 0.5, (0, seven))
        .unwrap();
    assert_eq!(mem.get(mk_d), mk, "seed 7 read on the device");
    dev.dropout_forward(o_d, mk_d, xin_d, 0.5, (7, eight))
        .unwrap();
    assert_ne!(mem.get(mk_d), mk, "seed 8 read on the device");
    dev.dropout_forward(o_d, mk_d, xin_d, 0.5, (7, none))
        .unwrap();
    let ddx_d = mem.put(&vec![1.0; nn]);
    dev.dropout_backward(ddx_d, xin_d, mk_d).unwrap();
    let want: Vec<f32> = (0..nn).map(|i| 1.0 + xin[i] * mk[i]).collect();
    close("dropout_backward", &mem.get(ddx_d), &want, 0.0);

    // residual
    let mut res = vec![0.0; n * c];
    co::residual_forward(&mut res, &x, &dy);
    let res_d = mem.zeroed::<f32>(n * c);
    dev.residual_forward(res_d, x_d, dy_d).unwrap();
    close("residual_forward", &mem.get(res_d), &res, 0.0);

    // cross-entropy with an invalid row and an ignored target
    let logits = rv(&mut r, n * v, 3.0);
    let mut targets: Vec<i64> = (0..n).map(|i| ((i * 5) % v) as i64).collect();
    targets[3] = -100;
    let valid: Vec<bool> = (0..n).map(|i| i != 6).collect();
    let mut probs = vec![0.0; n * v];
    let (loss, count) =
        co::crossentropy_forward(&mut probs, &logits, &targets, Some(&valid), n, v).unwrap();
    let mut dl = vec![0.0; n * v];
    co::crossentropy_backward(
        &mut dl,
        &probs,
        &targets,
        Some(&valid),
        1.0 / count as f32,
        n,
        v,
    );
    let lg_d = mem.put(&logits);
    let rl = mem.zeroed::<f64>(n);
    let tg = mem.put(&targets);
    let vd = mem.put(&valid.iter().map(|&x| x as u8).collect::<Vec<_>>());
    dev.crossentropy_forward(lg_d, rl.dv(), lg_d, tg.dv(), vd.dv(), n, v)
        .unwrap();
    close("crossentropy probs", &mem.get(lg_d), &probs, TOL);
    let sum = mem.zeroed::<f64>(1);
    dev.sum_f64(sum.dv(), rl.dv(), false).unwrap();
    let gl_loss = mem.get(sum.dv())[0] / count as f64;
    assert!(
        (gl_loss - loss).abs() < 1e-5 * loss.abs().max(1.0),
        "loss {gl_loss} vs {loss}"
    );
    let dl16 = mem.zeroed::<u16>(n * v);
    let scale = 1.0 / count as f32;
    dev.crossentropy_backward(lg_d, lg_d, tg.dv(), vd.dv(), scale, n, v, true, dl16)
        .unwrap();
    close("crossentropy_backward in place", &mem.get(lg_d), &dl, TOL);
    twin_matches(mem, "crossentropy_backward", lg_d, dl16);
    // both in one pass: the same row losses, dlogits in place of the logits
    let (lg2_d, rl2) = (mem.put(&logits), mem.put(&vec![7.0f64; n]));
    let dl2_16 = mem.zeroed::<u16>(n * v);
    dev.crossentropy_forward_backward(lg2_d, rl2.dv(), tg.dv(), vd.dv(), scale, n, v, dl2_16)
        .unwrap();
    close("crossentropy_forward_backward", &mem.get(lg2_d), &dl, TOL);
    twin_matches(mem, "crossentropy_forward_backward", lg2_d, dl2_16);
    assert_eq!(
        mem.get(rl2.dv()),
        mem.get(rl.dv()),
        "crossentropy_forward_backward row losses"
    );

    // AdamW, global norm, clipping
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut ps = ParamStore::new();
    ps.push("a", &[300], rv(&mut r, 300, 1.0));
    ps.push("b", &[7], rv(&mut r, 7, 1.0));
    let mut opt = AdamW::new(cfg, &ps);
    let p_d = mem.put(&ps.data.concat());
    let (m_d, v_d) = (mem.zeroed::<f32>(307), mem.zeroed::<f32>(307));
    let p16 = mem.zeroed::<u16>(307); // the weights' bf16 copy, written with them
    for step in 1..=3u64 {
        let mut gs = ps.zeros_like();
        gs.data[0] = rv(&mut r, 300, 2.0);
        gs.data[1] = rv(&mut r, 7, 2.0);
        let g_d = mem.put(&gs.data.concat());
        let norm_d = mem.zeroed::<f64>(1);
        dev.global_norm(norm_d.dv(), g_d).unwrap();
        let gn = mem.get(norm_d.dv())[0];
        let want = clip_grad_norm(&mut gs, 1.0);
        assert!(
            (gn - want).abs() < 1e-9 * want,
            "global_norm {gn} vs {want}"
        );
        dev.clip_scale(g_d, norm_d.dv(), 1.0).unwrap();
        close("clip_scale", &mem.get(g_d), &gs.data.concat(), 1e-6);
        let lr = 1e-2 * step as f64;
        opt.step(&mut ps, &gs, lr);
        // a non-finite value in the guard leaves everything as it was
        let (p0, m0, v0, c0) = (mem.get(p_d), mem.get(m_d), mem.get(v_d), mem.get(p16));
        for bad in [f64::NAN, f64::INFINITY] {
            let guard = mem.put(&[1.5, bad]);
            dev.adamw_update(p_d, m_d, v_d, g_d, &cfg, lr, step, guard, p16, Dv::null())
                .unwrap();
            assert_eq!(
                (mem.get(p_d), mem.get(m_d), mem.get(v_d), mem.get(p16)),
                (p0.clone(), m0.clone(), v0.clone(), c0.clone()),
                "adamw_update with a guard {bad} updated"
            );
        }
        let guard = mem.put(&[1.5, gn]);
        let guard = if step == 2 {
            asa::backend::cuda::Dv::null()
        } else {
            guard
        };
        // step 3 without the copy: it keeps step 2's values
        let copy = if step == 3 {
            asa::backend::cuda::Dv::null()
        } else {
            p16
        };
        // step 2 reads its step scalars at a block on the device (the learning rate passed is
        // NaN there: unused)
        let (lr_arg, at) = if step == 2 {
            let s = asa::backend::cuda::ops::adamw_step_scalars(&cfg, lr, step);
            let s: Vec<f64> = s.iter().map(|&x| x as f64).collect();
            (f64::NAN, mem.put(&s))
        } else {
            (lr, Dv::null())
        };
        dev.adamw_update(p_d, m_d, v_d, g_d, &cfg, lr_arg, step, guard, copy, at)
            .unwrap();
        close(
            "adamw_update params",
            &mem.get(p_d),
            &ps.data.concat(),
            1e-6,
        );
        if step < 3 {
            twin_matches(mem, "adamw_update", p_d, p16);
        } else {
            assert_eq!(mem.get(p16), c0, "adamw_update wrote a null copy");
        }
    }
    let _ = global_norm(&ps);
}

/// `cuda_asa_elementwise_ops_match_cpu` of tests/cuda_ops.rs, on any device.
/// The reductions that finish in their last block (`asa_last_block`): shapes of several
/// column tiles and row chunks (several blocks per arrival ticket), each run twice in a row so
/// that the second launch finds its tickets returned to 0.
fn single_launch_reductions<D: Ops, M: TestDev>(dev: &D, mem: &M) {
    let mut r = rng(11);
    let (n, c) = (530, 140); // 3 chunks of 256 rows x 2 tiles of 128 columns
                             // column sums (matmul_backward's bias gradient): dbias += colsum(dout), twice
    let (i, x) = (3, rv(&mut r, 530 * 3, 1.0));
    let (w, dy) = (rv(&mut r, c * i, 0.5), rv(&mut r, n * c, 1.0));
    let (mut dx, mut dw, mut db) = (vec![0.0; n * i], vec![0.0; c * i], vec![0.0; c]);
    for _ in 0..2 {
        co::matmul_backward(&mut dx, &mut dw, Some(&mut db), &dy, &x, &w, n, i, c);
    }
    let (x_d, w_d, dy_d) = (mem.put(&x), mem.put(&w), mem.put(&dy));
    let (dx_d, dw_d, db_d) = (
        mem.zeroed::<f32>(n * i),
        mem.zeroed::<f32>(c * i),
        mem.zeroed::<f32>(c),
    );
    for _ in 0..2 {
        dev.matmul_backward(dx_d, dw_d, db_d, dy_d, x_d, w_d, n, i, c)
            .unwrap();
    }
    close("colsum_add (twice)", &mem.get(db_d), &db, TOL);
    // gelu_backward's bias gradient (the column sums of its output), twice
    let hh = rv(&mut r, n * c, 2.0);
    let mut dgl = vec![0.0; n * c];
    co::gelu_backward(&mut dgl, &hh, &dy);
    let gb: Vec<f32> = (0..c)
        .map(|j| 2.0 * (0..n).map(|i| dgl[i * c + j] as f64).sum::<f64>() as f32)
        .collect();
    // with the next GEMM's bias gradient in the same launch: its own 3 column tiles
    let c2 = 300;
    let x2 = rv(&mut r, n * c2, 1.0);
    let gb2: Vec<f32> = (0..c2)
        .map(|j| 2.0 * (0..n).map(|i| x2[i * c2 + j] as f64).sum::<f64>() as f32)
        .collect();
    let (hh_d, dgl_d, gb_d) = (mem.put(&hh), mem.zeroed::<f32>(n * c), mem.zeroed::<f32>(c));
    let (x2_d, gb2_d) = (mem.put(&x2), mem.zeroed::<f32>(c2));
    for _ in 0..2 {
        let null16 = asa::backend::cuda::Dv::null();
        dev.gelu_backward(dgl_d, hh_d, dy_d, null16, gb_d, (gb2_d, x2_d))
            .unwrap();
    }
    close("gelu_backward_colsum (twice)", &mem.get(gb_d), &gb, TOL);
    close(
        "gelu_backward_colsum x2 (twice)",
        &mem.get(gb2_d),
        &gb2,
        TOL,
    );
    close("gelu_backward_colsum dinp", &mem.get(dgl_d), &dgl, TOL);
    // LayerNorm parameter gradients, twice
    let xl = rv(&mut r, n * c, 1.0);
    let (wl, bl) = (rv(&mut r, c, 1.0), rv(&mut r, c, 0.5));
    let (mut y, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    co::layernorm_forward(&mut y, &mut mean, &mut rstd, &xl, &wl, &bl, n, c);
    let (mut dxl, mut dwl, mut dbl) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    for _ in 0..2 {
        co::layernorm_backward(
            &mut dxl, &mut dwl, &mut dbl, &dy, &xl, &wl, &mean, &rstd, n, c,
        );
    }
    let (xl_d, wl_d, m_d, r_d) = (mem.put(&xl), mem.put(&wl), mem.put(&mean), mem.put(&rstd));
    let (dxl_d, dwl_d, dbl_d) = (
        mem.zeroed::<f32>(n * c),
        mem.zeroed::<f32>(c),
        mem.zeroed::<f32>(c),
    );
    for _ in 0..2 {
        let null16 = asa::backend::cuda::Dv::null();
        dev.layernorm_backward(
            dxl_d, dwl_d, dbl_d, dy_d, xl_d, wl_d, m_d, r_d, n, c, null16,
        )
        .unwrap();
    }
    close("layernorm_backward dw (twice)", &mem.get(dwl_d), &dwl, TOL);
    close("layernorm_backward db (twice)", &mem.get(dbl_d), &dbl, TOL);
    close("layernorm_backward dx (twice)", &mem.get(dxl_d), &dxl, TOL);
    // the gate's backward: ddelta = gate * dy (stored), dgrad += factor * sum(dy * delta)
    let (dyv, delta) = (&dy[..1000], rv(&mut r, 1000, 1.0));
    let (gate, factor) = (0.37f64, 0.81f64);
    let (dyv_d, delta_d) = (mem.put(dyv), mem.put(&delta));
    let (dd_d, dg_d) = (mem.put(&vec![9.0f32; 1000]), mem.put(&[0.5f32]));
    let dot: f64 = (0..1000).map(|i| dyv[i] as f64 * delta[i] as f64).sum();
    let mut want = 0.5f32;
    for _ in 0..2 {
        dev.gate_backward(dd_d, dg_d, dyv_d, delta_d, gate, factor)
            .unwrap();
        want += (dot * factor) as f32;
    }
    let dd: Vec<f32> = dyv.iter().map(|&g| (gate * g as f64) as f32).collect();
    close("gate_backward ddelta", &mem.get(dd_d), &dd, 0.0);
    close("gate_backward dgrad (twice)", &mem.get(dg_d), &[want], 1e-6);
    // with split_heads of dy before it in the same pass, over more rows than blocks
    for (bb, tt, hh, dd) in [(2usize, 5usize, 3usize, 4usize), (1, 1100, 2, 3)] {
        let nn = bb * tt * hh * dd;
        let (dym, dl) = (rv(&mut r, nn, 1.0), rv(&mut r, nn, 1.0));
        let mut split = vec![0.0f32; nn];
        ca::split_heads(&mut split, &dym, bb, tt, hh, dd);
        let dot: f64 = (0..nn).map(|i| split[i] as f64 * dl[i] as f64).sum();
        let (dym_d, dl_d) = (mem.put(&dym), mem.put(&dl));
        let (oh_d, dd_d) = (mem.put(&vec![f32::NAN; nn]), mem.put(&vec![f32::NAN; nn]));
        let dg_d = mem.put(&[0.5f32]);
        let mut want = 0.5f32;
        for _ in 0..2 {
            let dims = (bb, tt, hh, dd);
            let g = (gate, factor, Dv::null());
            dev.gate_backward_split(dd_d, dg_d, oh_d, dym_d, dl_d, g, dims)
                .unwrap();
            want += (dot * factor) as f32;
        }
        close("gate_backward_split out_h", &mem.get(oh_d), &split, 0.0);
        let gd: Vec<f32> = split.iter().map(|&g| (gate * g as f64) as f32).collect();
        close("gate_backward_split ddelta", &mem.get(dd_d), &gd, 0.0);
        close(
            "gate_backward_split dgrad (twice)",
            &mem.get(dg_d),
            &[want],
            1e-6,
        );
        // gate and factor read at the step's scalar block (the values passed unused)
        let (gl, fl) = (0.9f32 as f64, 0.3f64);
        let at = mem.put(&[gl, fl]);
        let (dd2_d, dg2_d) = (mem.put(&vec![f32::NAN; nn]), mem.put(&[0.5f32]));
        let g = (f64::NAN, f64::NAN, at);
        dev.gate_backward_split(dd2_d, dg2_d, oh_d, dym_d, dl_d, g, (bb, tt, hh, dd))
            .unwrap();
        let gd: Vec<f32> = split.iter().map(|&g| (gl * g as f64) as f32).collect();
        close(
            "gate_backward_split ddelta (raw)",
            &mem.get(dd2_d),
            &gd,
            0.0,
        );
        let want = 0.5f32 + (dot * fl) as f32;
        close(
            "gate_backward_split dgrad (raw)",
            &mem.get(dg2_d),
            &[want],
            1e-6,
        );
    }
}

/// `refine::qkv_forward` / `qkv_backward` against the CPU chain they replace (the thirds of
/// qkv, RoPE, the padding masks in the variant's order, phi; and back): with and without
/// RoPE, padding, in both mask orders, with and without the bf16 twin, at a width whose pairs
/// outnumber a block's threads and one whose positions share a block.
fn refine_qkv<D: Ops, M: TestDev>(dev: &D, mem: &M) {
    use asa::backend::cuda::refine::{self, QkvShape};
    let mut r = rng(21);
    for (b, h, t, m) in [(2usize, 3usize, 7usize, 6usize), (1, 2, 3, 520)] {
        let (nn, rows) = (b * h, b * h * t);
        let len = rows * m;
        let qkv = rv(&mut r, 3 * len, 1.5);
        let (dqf, dkf, dvs) = (
            rv(&mut r, len, 1.0),
            rv(&mut r, len, 1.0),
            rv(&mut r, len, 1.0),
        );
        let tab = ca::rope_table(t, m, 10000.0);
        let valid: Vec<bool> = (0..b * t).map(|i| i % 3 != 1).collect();
        let vd = mem.put(&valid.iter().map(|&x| x as u8).collect::<Vec<_>>());
        let (qkv_d, cos_d, sin_d) = (mem.put(&qkv), mem.put(&tab.cos), mem.put(&tab.sin));
        let (dqf_d, dkf_d, dvs_d) = (mem.put(&dqf), mem.put(&dkf), mem.put(&dvs));
        for (use_rope, padded, online) in [
            (true, false, false),
            (false, false, false),
            (true, true, false),
            (true, true, true),
            (false, true, true),
        ] {
            let tag = format!("refine qkv m {m} rope {use_rope} padded {padded} online {online}");
            // the CPU chain: thirds, RoPE, masks (online: before phi), phi
            let third = |j: usize| -> Vec<f32> {
                (0..rows)
                    .flat_map(|row| qkv[row * 3 * m + j * m..row * 3 * m + (j + 1) * m].to_vec())
                    .collect()
            };
            let (mut q, mut k, mut v) = (third(0), third(1), third(2));
            if use_rope {
                for x in [&mut q, &mut k] {
                    let x0 = x.clone();
                    ca::rope_forward(x, &x0, &tab, nn);
                }
            }
            let mask = |x: &mut Vec<f32>| {
                if padded {
                    ca::mask_rows_forward(x, &valid, h, t, m);
                }
            };
            if online {
                mask(&mut q);
                mask(&mut k);
            }
            let (mut qf, mut kf) = (vec![0.0; len], vec![0.0; len]);
            ca::phi_forward(&mut qf, &q);
            ca::phi_forward(&mut kf, &k);
            if !online {
                mask(&mut qf);
                mask(&mut kf);
            }
            mask(&mut v);
            let outs: Vec<_> = (0..5).map(|_| mem.put(&vec![f32::NAN; len])).collect();
            let shape = QkvShape {
                n: nn,
                t,
                m,
                h,
                valid: if padded {
                    vd.dv()
                } else {
                    asa::backend::cuda::Dv::null()
                },
                online,
            };
            let rope = use_rope.then_some((cos_d.dv(), sin_d.dv()));
            let o5 = [outs[0], outs[1], outs[2], outs[3], outs[4]];
            refine::qkv_forward(dev, o5, qkv_d, rope, shape).unwrap();
            for (i, (want, what)) in [(&q, "qs"), (&k, "ks"), (&qf, "qf"), (&kf, "kf"), (&v, "vs")]
                .into_iter()
                .enumerate()
            {
                close(&format!("{tag} {what}"), &mem.get(outs[i]), want, TOL);
            }
            // and back: masks (baseline: before phi'; online: after it), phi', RoPE^T, thirds
            let (mut gq, mut gk, mut gv) = (dqf.clone(), dkf.clone(), dvs.clone());
            if !online {
                mask(&mut gq);
                mask(&mut gk);
            }
            mask(&mut gv);
            let (mut dq, mut dk) = (vec![0.0; len], vec![0.0; len]);
            ca::phi_backward(&mut dq, &q, &gq);
            ca::phi_backward(&mut dk, &k, &gk);
            if online {
                mask(&mut dq);
                mask(&mut dk);
            }
            if use_rope {
                for x in [&mut dq, &mut dk] {
                    let g = x.clone();
                    x.iter_mut().for_each(|e| *e = 0.0);
                    ca::rope_backward(x, &g, &tab, nn);
                }
            }
            let mut d3 = vec![0.0; 3 * len];
            for row in 0..rows {
                for (j, x) in [&dq, &dk, &gv].into_iter().enumerate() {
                    let at = row * 3 * m + j * m;
                    d3[at..at + m].copy_from_slice(&x[row * m..(row + 1) * m]);
                }
            }
            let d3_d = mem.put(&vec![f32::NAN; 3 * len]);
            let d3_16 = mem.zeroed::<u16>(3 * len);
            let twin = if padded {
                d3_16
            } else {
                asa::backend::cuda::Dv::null()
            };
            let ins = [dqf_d, dkf_d, dvs_d];
            refine::qkv_backward(dev, (d3_d, twin), ins, [outs[0], outs[1]], rope, shape).unwrap();
            close(&format!("{tag} d3"), &mem.get(d3_d), &d3, TOL);
            if padded {
                twin_matches(mem, &tag, d3_d, d3_16);
            }
        }
    }
}

pub fn asa_elementwise_ops<D: Ops, M: TestDev>(dev: &D, mem: &M) {
    let mut r = rng(2);
    let dm = dims();
    let (b, h, t, d) = (dm.b, dm.h, dm.t, dm.d);
    let n = b * h * t * d;

    // rope
    let tab = ca::rope_table(t, d, 10000.0);
    let x = rv(&mut r, n, 1.0);
    let mut y = vec![0.0; n];
    ca::rope_forward(&mut y, &x, &tab, b * h);
    let (x_d, y_d, cos, sin) = (
        mem.put(&x),
        mem.zeroed::<f32>(n),
        mem.put(&tab.cos),
        mem.put(&tab.sin),
    );
    dev.rope_forward(y_d, x_d, cos, sin, b * h, t, d).unwrap();
    close("rope_forward", &mem.get(y_d), &y, TOL);
    let gy = rv(&mut r, n, 1.0);
    let mut dx = vec![0.3; n];
    ca::rope_backward(&mut dx, &gy, &tab, b * h);
    let (dx_d, gy_d) = (mem.put(&vec![0.3; n]), mem.put(&gy));
    dev.rope_backward(dx_d, gy_d, cos, sin, b * h, t, d)
        .unwrap();
    close("rope_backward", &mem.get(dx_d), &dx, TOL);
    // the launch shape's edges: one pair a row (256 positions a block), more pairs than threads
    for (nr, tr, dr) in [(3usize, 300usize, 2usize), (2, 3, 520)] {
        let tab = ca::rope_table(tr, dr, 10000.0);
        let len = nr * tr * dr;
        let x = rv(&mut r, len, 1.0);
        let mut y = vec![0.0; len];
        ca::rope_forward(&mut y, &x, &tab, nr);
        let (x2, y2) = (mem.put(&x), mem.put(&vec![f32::NAN; len]));
        let (cos, sin) = (mem.put(&tab.cos), mem.put(&tab.sin));
        dev.rope_forward(y2, x2, cos, sin, nr, tr, dr).unwrap();
        close(&format!("rope_forward d{dr}"), &mem.get(y2), &y, TOL);
        let mut dx = vec![0.3; len];
        ca::rope_backward(&mut dx, &x, &tab, nr);
        let dx2 = mem.put(&vec![0.3; len]);
        dev.rope_backward(dx2, x2, cos, sin, nr, tr, dr).unwrap();
        close(&format!("rope_backward d{dr}"), &mem.get(dx2), &dx, TOL);
    }

    // heads
    let mut sh = vec![0.0; n];
    ca::split_heads(&mut sh, &x, b, t, h, d);
    let sh_d = mem.zeroed::<f32>(n);
    dev.split_heads(sh_d, x_d, b, t, h, d).unwrap();
    close("split_heads", &mem.get(sh_d), &sh, 0.0);
    let mut mh = vec![1.0; n];
    ca::merge_heads(&mut mh, &x, b, t, h, d);
    let mh_d = mem.put(&vec![f32::NAN; n]); // a store: what was there does not matter
    let mh16 = mem.zeroed::<u16>(n);
    dev.merge_heads(mh_d, x_d, b, t, h, d, mh16).unwrap();
    close("merge_heads", &mem.get(mh_d), &mh, 0.0);
    twin_matches(mem, "merge_heads", mh_d, mh16);
    // the fused QKV projection's three thirds: [B,T,3C] <-> three [B,H,T,d]
    let c3 = 3 * h * d;
    let x3 = rv(&mut r, b * t * c3, 1.0);
    let thirds: Vec<Vec<f32>> = (0..3)
        .map(|w| {
            let mut third = vec![0.0; n];
            for row in 0..b * t {
                third[row * h * d..(row + 1) * h * d]
                    .copy_from_slice(&x3[row * c3 + w * h * d..row * c3 + (w + 1) * h * d]);
            }
            third
        })
        .collect();
    let x3_d = mem.put(&x3);
    let outs = [
        mem.zeroed::<f32>(n),
        mem.zeroed::<f32>(n),
        mem.zeroed::<f32>(n),
    ];
    dev.split_heads3(outs, x3_d, b, t, h, d, None).unwrap();
    let mut heads = Vec::new();
    for (w, o) in outs.iter().enumerate() {
        let mut want = vec![0.0; n];
        ca::split_heads(&mut want, &thirds[w], b, t, h, d);
        close(&format!("split_heads3 {w}"), &mem.get(*o), &want, 0.0);
        heads.push(want);
    }
    let back = mem.put(&vec![f32::NAN; b * t * c3]);
    let back16 = mem.zeroed::<u16>(b * t * c3);
    dev.merge_heads3(back, outs, b, t, h, d, back16, None)
        .unwrap();
    close("merge_heads3", &mem.get(back), &x3, 0.0);
    twin_matches(mem, "merge_heads3", back, back16);
    // with the keys' RoPE: the first third leaves split_heads3 roped, and merge_heads3 takes
    // the first input back through RoPE (rope_backward into zeros)
    let tab3 = ca::rope_table(t, d, 500.0);
    let (cos3, sin3) = (mem.put(&tab3.cos), mem.put(&tab3.sin));
    let rope3 = Some((cos3.dv(), sin3.dv()));
    let outs_r = [
        mem.put(&vec![f32::NAN; n]),
        mem.put(&vec![f32::NAN; n]),
        mem.put(&vec![f32::NAN; n]),
    ];
    dev.split_heads3(outs_r, x3_d, b, t, h, d, rope3).unwrap();
    let mut k_roped = vec![0.0; n];
    ca::rope_forward(&mut k_roped, &heads[0], &tab3, b * h);
    close("split_heads3 RoPE k", &mem.get(outs_r[0]), &k_roped, TOL);
    close("split_heads3 RoPE v", &mem.get(outs_r[1]), &heads[1], 0.0);
    close("split_heads3 RoPE q", &mem.get(outs_r[2]), &heads[2], 0.0);
    let back_r = mem.put(&vec![f32::NAN; b * t * c3]);
    let back_r16 = mem.zeroed::<u16>(b * t * c3);
    dev.merge_heads3(back_r, outs, b, t, h, d, back_r16, rope3)
        .unwrap();
    let mut dk = vec![0.0; n];
    ca::rope_backward(&mut dk, &heads[0], &tab3, b * h);
    let mut want3 = vec![0.0; b * t * c3];
    for (w, x) in [&dk, &heads[1], &heads[2]].into_iter().enumerate() {
        let mut m = vec![0.0; n];
        ca::merge_heads_acc(&mut m, x, b, t, h, d);
        for row in 0..b * t {
            want3[row * c3 + w * h * d..row * c3 + (w + 1) * h * d]
                .copy_from_slice(&m[row * h * d..(row + 1) * h * d]);
        }
    }
    close("merge_heads3 RoPE", &mem.get(back_r), &want3, TOL);
    twin_matches(mem, "merge_heads3 RoPE", back_r, back_r16);

    // l2normalize (one zero row)
    let mut xz = x.clone();
    xz[..d].iter_mut().for_each(|v| *v = 0.0);
    let rows = n / d;
    let (mut o, mut nrm) = (vec![0.0; n], vec![0.0; rows]);
    ca::l2normalize_forward(&mut o, &mut nrm, &xz, d);
    let (xz_d, o_d, nrm_d) = (mem.put(&xz), mem.zeroed::<f32>(n), mem.zeroed::<f32>(rows));
    dev.l2normalize_forward(o_d, nrm_d, xz_d, d).unwrap();
    close("l2normalize_forward", &mem.get(o_d), &o, TOL);
    close("l2normalize norm", &mem.get(nrm_d), &nrm, TOL);
    let mut dxz = vec![0.0; n];
    ca::l2normalize_backward(&mut dxz, &gy, &o, &nrm, d);
    let dxz_d = mem.zeroed::<f32>(n);
    dev.l2normalize_backward(dxz_d, gy_d, o_d, nrm_d, d)
        .unwrap();
    close("l2normalize_backward", &mem.get(dxz_d), &dxz, TOL);

    // the refine's qkv stages, tanh, softmax_slots, slot_mask_weights
    refine_qkv(dev, mem);
    let mut th = vec![0.0; n];
    ca::tanh_forward(&mut th, &x);
    let th_d = mem.zeroed::<f32>(n);
    dev.tanh_forward(th_d, x_d).unwrap();
    close("tanh_forward", &mem.get(th_d), &th, TOL);
    let mut dth = vec![0.0; n];
    ca::tanh_backward(&mut dth, &th, &gy);
    let dth_d = mem.zeroed::<f32>(n);
    let dth16 = mem.zeroed::<u16>(dth.len());
    dev.tanh_backward(dth_d, th_d, gy_d, dth16).unwrap();
    close("tanh_backward", &mem.get(dth_d), &dth, TOL);
    twin_matches(mem, "tanh_backward", dth_d, dth16);

    let nk = dm.k;
    let z = rv(&mut r, b * h * t * nk, 3.0);
    let mut sw = vec![0.0; z.len()];
    ca::softmax_slots_forward(&mut sw, &z, nk);
    let (z_d, sw_d) = (mem.put(&z), mem.zeroed::<f32>(z.len()));
    dev.softmax_slots_forward(sw_d, z_d, nk).unwrap();
    close("softmax_slots_forward", &mem.get(sw_d), &sw, TOL);
    let gz = rv(&mut r, z.len(), 1.0);
    let mut dz = vec![0.0; z.len()];
    ca::softmax_slots_backward(&mut dz, &sw, &gz, nk);
    let (dz_d, gz_d) = (mem.zeroed::<f32>(z.len()), mem.put(&gz));
    dev.softmax_slots_backward(dz_d, sw_d, gz_d, nk).unwrap();
    close("softmax_slots_backward", &mem.get(dz_d), &dz, TOL);
    for (lpo, renorm) in [(false, true), (true, true), (false, false)] {
        let keep = SlotKeep {
            keep: vec![true, false, true, true, false],
            last_pos_only: lpo,
        };
        let keep_d = mem.put(&keep.keep.iter().map(|&k| k as i32).collect::<Vec<_>>());
        let (mut w, mut pre) = (sw.clone(), vec![0.0; sw.len()]);
        ca::slot_mask_weights_forward(&mut w, &mut pre, &keep, renorm, dm);
        let (w_d, pre_d) = (mem.put(&sw), mem.zeroed::<f32>(sw.len()));
        dev.slot_mask_weights_forward(w_d, pre_d, keep_d.dv(), lpo, renorm, dm)
            .unwrap();
        close("slot_mask_weights_forward", &mem.get(w_d), &w, TOL);
        let mut dpre = vec![0.0; sw.len()];
        ca::slot_mask_weights_backward(&mut dpre, &gz, &w, &pre, &keep, renorm, dm);
        let dpre_d = mem.zeroed::<f32>(sw.len());
        dev.slot_mask_weights_backward(dpre_d, gz_d, w_d, pre_d, keep_d.dv(), lpo, renorm, dm)
            .unwrap();
        close("slot_mask_weights_backward", &mem.get(dpre_d), &dpre, TOL);
    }

    // linear attention, M = 8, 64 and 100
    for m in [8usize, 64, 100] {
        let nrow = b * h;
        let len = nrow * t * m;
        let mut qf = rv(&mut r, len, 1.0);
        let mut kf = rv(&mut r, len, 1.0);
        ca::phi_forward(&mut qf.clone(), &qf.clone());
        qf.iter_mut().for_each(|v| *v = v.abs() + 0.01);
        kf.iter_mut().for_each(|v| *v = v.abs() + 0.01);
        // a padded prefix: zero keys/queries in row 1
        for i in 0..3 * m {
            qf[t * m + i] = 0.0;
            kf[t * m + i] = 0.0;
        }
        let vv = rv(&mut r, len, 1.0);
        let (mut out, mut den) = (vec![0.0; len], vec![0.0; nrow * t]);
        ca::linear_attn_forward(&mut out, &mut den, &qf, &kf, &vv, t, m);
        let go = rv(&mut r, len, 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
        ca::linear_attn_backward(
            &mut dq, &mut dk, &mut dv, &go, &out, &den, &qf, &kf, &vv, t, m,
        );
        let (q_d, k_d, v_d, go_d) = (mem.put(&qf), mem.put(&kf), mem.put(&vv), mem.put(&go));
        // the walk: serial (one chunk), uneven chunks, single steps; the tiles: one chunk,
        // uneven chunks, the default; then the tiles on tensor cores (Precision::Bf16: bf16
        // operands, so agreement to bf16's 3 digits, and visibly not the f64 products)
        let (walk, tiled) = (
            |chunk| LinearAlgo::Walk { chunk },
            |chunk| LinearAlgo::Tiled { chunk },
        );
        let auto = LinearAlgo::choose(t, m, dev.max_smem(), false).unwrap();
        let auto_tc = LinearAlgo::choose(t, m, dev.max_smem(), true).unwrap();
        let exact =
            [walk(t), walk(5), walk(2), walk(1), tiled(t), tiled(5), auto].map(|a| (a, false));
        let tc = [tiled(t), tiled(5), auto_tc].map(|a| (a, true));
        for (algo, bf16) in exact.into_iter().chain(tc) {
            let (o_d, den_d) = (mem.zeroed::<f32>(len), mem.zeroed::<f32>(nrow * t));
            if let LinearAlgo::Tiled { chunk } = algo {
                if linear::tiled_smem(chunk, m, bf16) > dev.max_smem() {
                    continue; // a device without the shared memory for these tiles
                }
            }
            dev.set_precision(if bf16 {
                Precision::Bf16
            } else {
                Precision::F32
            });
            let tol = if bf16 { LINEAR_BF16_TOL } else { TOL };
            // the carries kept for the backward (the exact cases) or recomputed by it (the
            // tensor-core ones)
            let nc = dev
                .linear_attn_carries(len / (t * m), t, m, Some(algo))
                .unwrap();
            let keep = if bf16 {
                asa::backend::cuda::Dv::null()
            } else {
                mem.put(&vec![f64::NAN; nc.max(1)]).sub(0, nc)
            };
            let o16 = mem.zeroed::<u16>(len);
            dev.linear_attn_forward(o_d, den_d, q_d, k_d, v_d, t, m, Some(algo), keep, o16)
                .unwrap();
            twin_matches(mem, &format!("linear_attn_forward {algo:?}"), o_d, o16);
            let tag = format!("m{m} {algo:?} bf16 {bf16}");
            if bf16 {
                let e = crate::check::rel_err(&mem.get(o_d), &out);
                assert!(
                    e > 1e-6,
                    "linear_attn_forward {tag}: no bf16 rounding ({e:e})"
                );
            }
            close(
                &format!("linear_attn_forward {tag}"),
                &mem.get(o_d),
                &out,
                tol,
            );
            close(
                &format!("linear_attn den {tag}"),
                &mem.get(den_d),
                &den,
                tol,
            );
            let (dq_d, dk_d, dv_d) = (
                mem.zeroed::<f32>(len),
                mem.zeroed::<f32>(len),
                mem.zeroed::<f32>(len),
            );
            dev.linear_attn_backward(
                dq_d,
                dk_d,
                dv_d,
                go_d,
                o_d,
                den_d,
                q_d,
                k_d,
                v_d,
                t,
                m,
                Some(algo),
                keep,
            )
            .unwrap();
            dev.set_precision(Precision::F32);
            close(
                &format!("linear_attn_backward dq {tag}"),
                &mem.get(dq_d),
                &dq,
                tol,
            );
            close(
                &format!("linear_attn_backward dk {tag}"),
                &mem.get(dk_d),
                &dk,
                tol,
            );
            close(
                &format!("linear_attn_backward dv {tag}"),
                &mem.get(dv_d),
                &dv,
                tol,
            );
        }
    }
}

/// `cuda_asa_slot_ops_match_cpu` of tests/cuda_ops.rs, on any device.
pub fn asa_slot_ops<D: Ops, M: TestDev>(dev: &D, mem: &M) {
    let mut r = rng(3);
    let dm = dims();
    let (b, h, t, nk, d) = (dm.b, dm.h, dm.t, dm.k, dm.d);
    let keys = rv(&mut r, h * nk * d, 0.5);
    let kk = rv(&mut r, b * h * t * d, 1.0);
    let vv = rv(&mut r, b * h * t * d, 1.0);
    let q = rv(&mut r, b * h * t * d, 1.0);
    let bias = vec![0.05f32, -0.02];
    // left padding in batch 1
    let valid: Vec<bool> = (0..b * t).map(|i| !(i >= t && i < t + 4)).collect();
    let vd = mem.put(&valid.iter().map(|&x| x as u8).collect::<Vec<_>>());
    let (keys_d, k_d, v_d, q_d, bias_d) = (
        mem.put(&keys),
        mem.put(&kk),
        mem.put(&vv),
        mem.put(&q),
        mem.put(&bias),
    );

    // write logits
    let bhkt = b * h * nk * t;
    let (mut raw, mut wl) = (vec![0.0; bhkt], vec![0.0; bhkt]);
    ca::write_logits_forward(
        &mut raw,
        &mut wl,
        &keys,
        &kk,
        0.7,
        Some(&bias),
        Some(&valid),
        dm,
    );
    let (raw_d, wl_d) = (mem.zeroed::<f32>(bhkt), mem.zeroed::<f32>(bhkt));
    let none = WritePrologue::default();
    dev.write_logits_forward(raw_d, wl_d, keys_d, k_d, 0.7, bias_d, vd.dv(), dm, none)
        .unwrap();
    close("write_logits raw", &mem.get(raw_d), &raw, TOL);
    close("write_logits wl", &mem.get(wl_d), &wl, TOL);
    let gw = rv(&mut r, bhkt, 1.0);
    let (mut dkeys, mut dk, mut dbias) =
        (vec![0.0; h * nk * d], vec![0.0; kk.len()], vec![0.0f64; h]);
    ca::write_logits_backward(
        &mut dkeys,
        &mut dk,
        Some(&mut dbias),
        &gw,
        &keys,
        &kk,
        0.7,
        Some(&valid),
        dm,
    );
    let (dkeys_d, dk_d, gw_d) = (
        mem.zeroed::<f32>(h * nk * d),
        mem.zeroed::<f32>(kk.len()),
        mem.put(&gw),
    );
    let pb = mem.zeroed::<f64>(b * h * nk);
    let none = KeysFinish::default();
    dev.write_logits_backward(
        dkeys_d,
        dk_d,
        pb.dv(),
        gw_d,
        keys_d,
        k_d,
        0.7,
        vd.dv(),
        dm,
        none,
    )
    .unwrap();
    close(
        "write_logits_backward dkeys",
        &mem.get(dkeys_d),
        &dkeys,
        TOL,
    );
    close("write_logits_backward dk", &mem.get(dk_d), &dk, TOL);
    // the finish in the last block: the slot keys parameter's gradient (+= dkeys * keep) and
    // the ALiBi strength's (+= factor * sum_h slope * sum pbias)
    let slopes: Vec<f32> = (0..h).map(|i| 0.5 / (i + 1) as f32).collect();
    let keep: Vec<f32> = (0..h * nk).map(|i| (i % 3 != 1) as u8 as f32).collect();
    let (sl_d, keep_d) = (mem.put(&slopes), mem.put(&keep));
    let (dp_d, da) = (mem.put(&vec![0.25f32; h * nk * d]), mem.put(&[0.125f32]));
    // write_logits_backward into fresh outputs with `finish`: dkeys
    let with_finish = |finish: KeysFinish| {
        let (dkeys_d, dk_d, pb) = (
            mem.zeroed::<f32>(h * nk * d),
            mem.zeroed::<f32>(kk.len()),
            mem.zeroed::<f64>(b * h * nk),
        );
        let (wt, vdd) = (0.7, vd.dv());
        dev.write_logits_backward(
            dkeys_d,
            dk_d,
            pb.dv(),
            gw_d,
            keys_d,
            k_d,
            wt,
            vdd,
            dm,
            finish,
        )
        .unwrap();
        dkeys_d
    };
    let finish = KeysFinish {
        param: Some((dp_d, keep_d)),
        alibi: Some(AlibiFinish {
            grad: da,
            slopes: sl_d,
            factor: 0.5,
            at: Dv::null(),
        }),
    };
    let dkeys2_d = with_finish(finish);
    close(
        "write_logits_backward finish dkeys",
        &mem.get(dkeys2_d),
        &dkeys,
        TOL,
    );
    let dp: Vec<f32> = (0..h * nk * d)
        .map(|i| 0.25 + dkeys[i] * keep[i / d])
        .collect();
    close(
        "write_logits_backward finish dparam",
        &mem.get(dp_d),
        &dp,
        TOL,
    );
    let want: f64 = (0..h).map(|i| dbias[i] * slopes[i] as f64).sum::<f64>() * 0.5;
    close(
        "alibi_grad (finish)",
        &mem.get(da),
        &[0.125 + want as f32],
        TOL,
    );
    // the factor read at the step's scalar block, not the argument's
    let sig = 0.6f64;
    let (at_d, da2) = (mem.put(&[0.0, sig]), mem.put(&[0.125f32]));
    let finish = KeysFinish {
        param: None,
        alibi: Some(AlibiFinish {
            grad: da2,
            slopes: sl_d,
            factor: 99.0,
            at: at_d,
        }),
    };
    with_finish(finish);
    let want: f64 = (0..h).map(|i| dbias[i] * slopes[i] as f64).sum::<f64>() * sig;
    close(
        "alibi_grad (finish, factor at the step block)",
        &mem.get(da2),
        &[0.125 + want as f32],
        TOL,
    );
    // bf16 (devices with that path): the slot keys' gradient on tensor cores, the ALiBi partials
    // as exact as in f32, dk unchanged
    if mem.try_precision(Precision::Bf16) {
        let (dkeys16, dk16, pb16) = (
            mem.zeroed::<f32>(h * nk * d),
            mem.zeroed::<f32>(kk.len()),
            mem.zeroed::<f64>(b * h * nk),
        );
        dev.write_logits_backward(
            dkeys16,
            dk16,
            pb16.dv(),
            gw_d,
            keys_d,
            k_d,
            0.7,
            vd.dv(),
            dm,
            KeysFinish::default(),
        )
        .unwrap();
        mem.try_precision(Precision::F32);
        let got = mem.get(dkeys16);
        close("write_logits_backward dkeys bf16", &got, &dkeys, 1e-2);
        let e = crate::check::rel_err(&got, &dkeys);
        assert!(
            e > 1e-7,
            "write_logits_backward dkeys bf16: no bf16 rounding ({e:e})"
        );
        close("write_logits_backward dk bf16", &mem.get(dk16), &dk, TOL);
        let (p32, p16) = (mem.get(pb.dv()), mem.get(pb16.dv()));
        for (i, (x, y)) in p32.iter().zip(&p16).enumerate() {
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "pbias bf16 {i}: {y} vs {x}"
            );
        }
    }
    // the prologue along: the slot keys through the slot dropout (param * keep, stored), and
    // the ALiBi bias from the learned strength's parameter on the device, or from the init
    let slopes_h = ca::alibi_slopes(h);
    let keep: Vec<f32> = (0..h * nk).map(|i| (i % 4 != 2) as u8 as f32).collect();
    let kept: Vec<f32> = (0..h * nk * d).map(|i| keys[i] * keep[i / d]).collect();
    let (sl_d, keep_d) = (mem.put(&slopes_h), mem.put(&keep));
    for araw in [Some(-1.3f32), Some(0.4), Some(25.0), None] {
        let mut bias_a = vec![0.0f32; h];
        ca::alibi_bias(&mut bias_a, &slopes_h, araw, 0.7, 1e-3);
        let (mut raw2, mut wl2) = (vec![0.0; bhkt], vec![0.0; bhkt]);
        let (bv, v) = (Some(&bias_a[..]), Some(&valid[..]));
        ca::write_logits_forward(&mut raw2, &mut wl2, &kept, &kk, 0.7, bv, v, dm);
        let (raw_d2, wl_d2) = (mem.zeroed::<f32>(bhkt), mem.zeroed::<f32>(bhkt));
        let keys_out = mem.put(&vec![f32::NAN; h * nk * d]);
        let araw_d = araw.map(|x| mem.put(&[x]));
        let pro = WritePrologue {
            keys: Some((keys_d, keep_d)),
            alibi: Some((sl_d, araw_d.dv(), 0.7, 1e-3)),
        };
        let null = asa::backend::cuda::Dv::null();
        dev.write_logits_forward(raw_d2, wl_d2, keys_out, k_d, 0.7, null, vd.dv(), dm, pro)
            .unwrap();
        let tag = format!("write_logits prologue (ALiBi raw {araw:?})");
        close(&format!("{tag} keys"), &mem.get(keys_out), &kept, 0.0);
        close(&format!("{tag} raw"), &mem.get(raw_d2), &raw2, TOL);
        close(&format!("{tag} wl"), &mem.get(wl_d2), &wl2, TOL);
    }

    // write scan, several chunk sizes, forward and backward
    for chunk in [1usize, 4, 16, 64] {
        let st_len = b * h * t * nk * d;
        let (mut st, mut den, mut rm) = (vec![0.0; st_len], vec![0.0; bhkt], vec![0.0; bhkt]);
        ca::slot_scan_forward(&mut st, &mut den, &mut rm, &wl, &vv, chunk, dm);
        let (st_d, den_d, rm_d) = (
            mem.zeroed::<f32>(st_len),
            mem.zeroed::<f32>(bhkt),
            mem.zeroed::<f32>(bhkt),
        );
        dev.slot_scan_forward(st_d, den_d, rm_d, wl_d, v_d, chunk, dm)
            .unwrap();
        close(
            &format!("slot_scan_forward state c{chunk}"),
            &mem.get(st_d),
            &st,
            TOL,
        );
        close(
            &format!("slot_scan_forward den c{chunk}"),
            &mem.get(den_d),
            &den,
            TOL,
        );
        close(
            &format!("slot_scan_forward rmax c{chunk}"),
            &mem.get(rm_d),
            &rm,
            TOL,
        );
        let gs = rv(&mut r, st_len, 1.0);
        let (mut dwl, mut dv) = (vec![0.0; bhkt], vec![0.0; vv.len()]);
        ca::slot_scan_backward(&mut dwl, &mut dv, &gs, &st, &den, &rm, &wl, &vv, chunk, dm);
        let (dwl_d, dv_d, gs_d) = (
            mem.zeroed::<f32>(bhkt),
            mem.zeroed::<f32>(vv.len()),
            mem.put(&gs),
        );
        dev.slot_scan_backward(dwl_d, dv_d, gs_d, st_d, den_d, rm_d, wl_d, v_d, chunk, dm)
            .unwrap();
        close(
            &format!("slot_scan_backward dwl c{chunk}"),
            &mem.get(dwl_d),
            &dwl,
            TOL,
        );
        close(
            &format!("slot_scan_backward dv c{chunk}"),
            &mem.get(dv_d),
            &dv,
            TOL,
        );
    }

    // state for the read ops
    let st_len = b * h * t * nk * d;
    let (mut st, mut den, mut rm) = (vec![0.0; st_len], vec![0.0; bhkt], vec![0.0; bhkt]);
    ca::slot_scan_forward(&mut st, &mut den, &mut rm, &wl, &vv, 16, dm);
    let st_d = mem.put(&st);
    let bhtk = b * h * t * nk;
    let keepv = vec![true, false, true, true, true];
    let keep_i = mem.put(&keepv.iter().map(|&k| k as i32).collect::<Vec<_>>());
    for (mi, mask) in [
        None,
        Some((false, ReadMask::Read)),
        Some((true, ReadMask::ContentOnly)),
        Some((false, ReadMask::ContentOnly)),
    ]
    .into_iter()
    .enumerate()
    {
        let sk = mask.map(|(lpo, _)| SlotKeep {
            keep: keepv.clone(),
            last_pos_only: lpo,
        });
        let cm = sk.as_ref().zip(mask).map(|(s, (_, m))| (s, m));
        let dmask = mask.map(|(lpo, m)| DevSlotMask {
            keep: keep_i.dv(),
            last_pos_only: lpo,
            mode: m,
        });
        let (mut lk, mut lc, mut lg) = (vec![0.0; bhtk], vec![0.0; bhtk], vec![0.0; bhtk]);
        ca::read_logits_forward(&mut lk, Some(&mut lc), &mut lg, &q, &keys, &st, 0.8, cm, dm);
        let (lk_d, lc_d, lg_d) = (
            mem.zeroed::<f32>(bhtk),
            mem.zeroed::<f32>(bhtk),
            mem.zeroed::<f32>(bhtk),
        );
        dev.read_logits_forward(lk_d, lc_d, lg_d, q_d, keys_d, st_d, 0.8, dmask, dm)
            .unwrap();
        close(&format!("read_logits lkey {mi}"), &mem.get(lk_d), &lk, TOL);
        close(&format!("read_logits lcont {mi}"), &mem.get(lc_d), &lc, TOL);
        close(
            &format!("read_logits logits {mi}"),
            &mem.get(lg_d),
            &lg,
            TOL,
        );
        let mut glg = rv(&mut r, bhtk, 1.0);
        glg.iter_mut().zip(&lg).for_each(|(a, l)| {
            if !l.is_finite() {
                *a = 0.0
            }
        });
        let (mut dq, mut dkeys, mut dst) =
            (vec![0.0; q.len()], vec![0.0; keys.len()], vec![0.0; st_len]);
        let dgam = ca::read_logits_backward(
            &mut dq,
            &mut dkeys,
            Some(&mut dst),
            &glg,
            Some(&lc),
            &q,
            &keys,
            &st,
            0.8,
            cm,
            dm,
        );
        let (dq_d, dkeys_d, dst_d, glg_d) = (
            mem.zeroed::<f32>(q.len()),
            mem.zeroed::<f32>(keys.len()),
            mem.zeroed::<f32>(st_len),
            mem.put(&glg),
        );
        let dg = mem.zeroed::<f64>(1);
        dev.read_logits_backward(
            dq_d,
            dkeys_d,
            dst_d,
            dg.dv(),
            glg_d,
            lc_d,
            q_d,
            keys_d,
            st_d,
            0.8,
            dmask,
            dm,
        )
        .unwrap();
        close(
            &format!("read_logits_backward dq {mi}"),
            &mem.get(dq_d),
            &dq,
            TOL,
        );
        close(
            &format!("read_logits_backward dkeys {mi}"),
            &mem.get(dkeys_d),
            &dkeys,
            TOL,
        );
        close(
            &format!("read_logits_backward dstate {mi}"),
            &mem.get(dst_d),
            &dst,
            TOL,
        );
        let gd = mem.get(dg.dv())[0];
        assert!(
            (gd - dgam).abs() <= 1e-4 * dgam.abs().max(1.0),
            "dgamma {gd} vs {dgam}"
        );
    }

    // read weights: every routing, with and without the read mask
    let lg = rv(&mut r, bhtk, 2.0);
    let ext = rv(&mut r, bhtk, 1.0)
        .iter()
        .map(|x| x.abs())
        .collect::<Vec<f32>>();
    let mut ovr = rv(&mut r, bhtk, 1.0);
    ovr[3] = f32::NAN;
    let (lg_d, ext_d, ovr_d) = (mem.put(&lg), mem.put(&ext), mem.put(&ovr));
    let grw = rv(&mut r, bhtk, 1.0);
    let grw_d = mem.put(&grw);
    for (ri, (cr, dr)) in [
        (Routing::Softmax, DevRouting::Softmax),
        (Routing::Top1, DevRouting::Top1),
        (Routing::TopK(2), DevRouting::TopK(2)),
        (Routing::External(&ext), DevRouting::External(ext_d)),
        (Routing::Override(&ovr), DevRouting::Override(ovr_d)),
    ]
    .into_iter()
    .enumerate()
    {
        for lpo in [None, Some(false), Some(true)] {
            let sk = lpo.map(|l| SlotKeep {
                keep: keepv.clone(),
                last_pos_only: l,
            });
            let dk = lpo.map(|l| (keep_i.dv(), l));
            let mut rw = vec![0.0; bhtk];
            ca::read_weights_forward(&mut rw, &lg, &cr, 1.3, sk.as_ref(), dm);
            let rw_d = mem.zeroed::<f32>(bhtk);
            dev.read_weights_forward(rw_d, lg_d, dr, 1.3, dk, dm)
                .unwrap();
            close(
                &format!("read_weights_forward r{ri} {lpo:?}"),
                &mem.get(rw_d),
                &rw,
                TOL,
            );
            let mut dl = vec![0.0; bhtk];
            ca::read_weights_backward(&mut dl, &grw, &rw, &lg, &cr, 1.3, sk.as_ref(), dm);
            let dl_d = mem.zeroed::<f32>(bhtk);
            dev.read_weights_backward(dl_d, grw_d, rw_d, lg_d, dr, 1.3, dk, dm)
                .unwrap();
            close(
                &format!("read_weights_backward r{ri} {lpo:?}"),
                &mem.get(dl_d),
                &dl,
                TOL,
            );
        }
    }

    // slot mix
    let w = rv(&mut r, bhtk, 1.0);
    let w_d = mem.put(&w);
    let mut o = vec![0.0; q.len()];
    ca::slot_mix_forward(&mut o, &w, &st, dm);
    let o_d = mem.zeroed::<f32>(q.len());
    dev.slot_mix_forward(o_d, w_d, st_d, dm).unwrap();
    close("slot_mix_forward", &mem.get(o_d), &o, TOL);
    let go = rv(&mut r, q.len(), 1.0);
    let (mut dw, mut dst) = (vec![0.0; bhtk], vec![0.0; st_len]);
    ca::slot_mix_backward(&mut dw, &mut dst, &go, &w, &st, dm);
    let (dw_d, dst_d, go_d) = (
        mem.zeroed::<f32>(bhtk),
        mem.zeroed::<f32>(st_len),
        mem.put(&go),
    );
    dev.slot_mix_backward(dw_d, dst_d, go_d, w_d, st_d, dm)
        .unwrap();
    close("slot_mix_backward dw", &mem.get(dw_d), &dw, TOL);
    close("slot_mix_backward dstate", &mem.get(dst_d), &dst, TOL);
}
