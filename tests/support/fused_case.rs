//! The fused write scan + read (`cuda/fused.cu`, `backend::cuda::fused`) against the CPU
//! twins' chain, on any device ([`Device`] for launches, [`TestDev`] for memory): a GPU
//! (tests/cuda_ops.rs) or the SIMT emulator (tests/cuda_emu.rs).

#![allow(dead_code, clippy::too_many_arguments)]

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use asa::backend::cpu::slot_ops::{self as ca, ReadMask, Routing, SlotDims, SlotKeep};
use asa::backend::cuda::ops::{DevSlotMask, Learned};
use asa::backend::cuda::{Device, Dv};

use crate::check::{close, rv};
use crate::dev::TestDev;

/// One op-level case of the fused kernels.
#[derive(Debug, Clone)]
pub struct FusedCase {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub k: usize,
    pub d: usize,
    pub chunk: usize,
    pub tile: usize,
    pub content: bool,
    /// read slot mask: (last_pos_only, mode)
    pub mask: Option<(bool, ReadMask)>,
    pub refine: bool,
    /// left padding (write logits -inf) of the last batch row
    pub pad: usize,
    /// write logits on a 0.5 grid (exact ties in the running max)
    pub ties: bool,
    /// a per-head ALiBi-like ramp of the write logits
    pub ramp: f32,
    pub seed: u64,
    /// the forward's tiles on tensor cores (the plan must allow it); then the forward's
    /// products and everything downstream agree to [`TC_TOL`]
    pub tensor_cores: bool,
}

/// Tolerance of the tensor-core forward (bf16 operands, f32 accumulation) and of the backward
/// that starts from its read weights.
pub const TC_TOL: f64 = 1e-2;

/// The fused forward, state mix, state dot and backward against the CPU twins' chain
/// (`slot_scan_forward`, `read_logits_forward`, `read_weights_forward`, `slot_mix_forward` and
/// their backwards, the refine's `slot_mix` over the states included) at `tol` relative (the
/// running max and the denominators, exact on tensor cores too, always at `tol`).
pub fn fused_case_matches_cpu<D: Device, M: TestDev>(dev: &D, mem: &M, cs: &FusedCase, tol: f64) {
    use asa::backend::cuda::fused::{self, BwdIo, FusedPlan, FusedWs, FwdIo};
    let mut r = ChaCha8Rng::seed_from_u64(cs.seed);
    let dm = SlotDims {
        b: cs.b,
        h: cs.h,
        t: cs.t,
        k: cs.k,
        d: cs.d,
    };
    let (b, h, t, nk, d) = (cs.b, cs.h, cs.t, cs.k, cs.d);
    let nbh = b * h;
    let (bhkt, bhtd, bhtk) = (nbh * nk * t, nbh * t * d, nbh * t * nk);
    let mut wl = rv(&mut r, bhkt, 2.0);
    for bh in 0..nbh {
        for s in 0..nk {
            for ti in 0..t {
                let i = (bh * nk + s) * t + ti;
                if cs.ties {
                    wl[i] = (wl[i] * 2.0).round() / 2.0;
                }
                wl[i] += cs.ramp * ti as f32 * ((bh % 3) as f32 - 1.0);
                if bh / h == b - 1 && ti < cs.pad {
                    wl[i] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let v = rv(&mut r, bhtd, 1.0);
    let q = rv(&mut r, bhtd, 1.0);
    let keys = rv(&mut r, h * nk * d, 0.7);
    let sw = rv(&mut r, bhtk, 1.0);
    // gamma, its gradient factor and the refine gate by value, or (odd seeds) read at a step
    // scalar block ([value, factor] pairs, `Learned`; the values passed along are NaN, so a
    // kernel that reads them shows)
    let learned = cs.seed % 2 == 1;
    let (gamma, gfactor_at) = if learned {
        (0.9f32, 0.55f64)
    } else {
        (0.8f32, 0.0)
    };
    let rtemp = 1.3f32;
    let gamma_at = mem.put(&[gamma as f64, gfactor_at]);
    let gate_at = mem.put(&[0.41f32 as f64, 0.6]);
    let gamma_l = if learned {
        Learned {
            value: f32::NAN,
            at: gamma_at,
        }
    } else {
        Learned::value(gamma)
    };
    let keepv: Vec<bool> = (0..nk).map(|s| s % 3 != 1).collect();
    let keep_i = mem.put(&keepv.iter().map(|&x| x as i32).collect::<Vec<_>>());
    let sk = cs.mask.map(|(lpo, _)| SlotKeep {
        keep: keepv.clone(),
        last_pos_only: lpo,
    });
    let cmask = sk.as_ref().zip(cs.mask).map(|(s, (_, m))| (s, m));
    let read_keep = sk
        .as_ref()
        .filter(|_| matches!(cs.mask, Some((_, ReadMask::Read))));
    let tag = format!("{cs:?}");

    // CPU forward
    let mut st = vec![0.0f32; nbh * t * nk * d];
    let (mut den, mut rm) = (vec![0.0f32; bhkt], vec![0.0f32; bhkt]);
    ca::slot_scan_forward(&mut st, &mut den, &mut rm, &wl, &v, cs.chunk, dm);
    let (mut lk, mut lc, mut lg) = (vec![0.0; bhtk], vec![0.0; bhtk], vec![0.0; bhtk]);
    ca::read_logits_forward(
        &mut lk,
        cs.content.then_some(&mut lc[..]),
        &mut lg,
        &q,
        &keys,
        &st,
        gamma,
        cmask,
        dm,
    );
    let mut rw = vec![0.0f32; bhtk];
    ca::read_weights_forward(&mut rw, &lg, &Routing::Softmax, rtemp, read_keep, dm);
    let mut out1 = vec![0.0f32; bhtd];
    ca::slot_mix_forward(&mut out1, &rw, &st, dm);
    let mut delta = vec![0.0f32; bhtd];
    ca::slot_mix_forward(&mut delta, &sw, &st, dm);

    // GPU forward
    let plan = FusedPlan::new(dm, cs.chunk, cs.tile)
        .expect("fused plan")
        .with_tensor_cores(cs.tensor_cores, dev.max_smem());
    assert_eq!(
        plan.tensor_cores, cs.tensor_cores,
        "tensor cores for {cs:?}"
    );
    let (exact_tol, tol) = (tol, if cs.tensor_cores { TC_TOL } else { tol });
    let (n64, n32) = plan.ws_len();
    let b64 = mem.zeroed::<f64>(n64);
    let b32 = mem.zeroed::<f32>(n32);
    let ws = FusedWs::carve(&plan, b64, b32);
    let (wl_d, v_d, q_d, keys_d, sw_d) = (
        mem.put(&wl),
        mem.put(&v),
        mem.put(&q),
        mem.put(&keys),
        mem.put(&sw),
    );
    let (out1_d, rw_d) = (mem.zeroed::<f32>(bhtd), mem.zeroed::<f32>(bhtk));
    let (lk_d, lc_d, lg_d) = (
        mem.zeroed::<f32>(bhtk),
        mem.zeroed::<f32>(bhtk),
        mem.zeroed::<f32>(bhtk),
    );
    let dmask = cs.mask.map(|(lpo, m)| DevSlotMask {
        keep: keep_i,
        last_pos_only: lpo,
        mode: m,
    });
    // rw's bf16 twin (with the refine)
    let rw16 = if cs.refine {
        mem.zeroed::<u16>(rw_d.len)
    } else {
        Dv::null()
    };
    let io = FwdIo {
        out1: out1_d,
        rw: rw_d,
        rw16,
        lkey: lk_d,
        lcont: if cs.content { lc_d } else { Dv::null() },
        logits: lg_d,
        wl: wl_d,
        v: v_d,
        q: q_d,
        keys: keys_d,
        gamma: gamma_l,
        rtemp,
        mask: dmask,
        content: cs.content,
    };
    fused::forward(dev, &plan, &ws, &io).unwrap();
    close(
        &format!("fused rmax {tag}"),
        &mem.get(ws.rmax),
        &rm,
        exact_tol,
    );
    close(
        &format!("fused den {tag}"),
        &mem.get(ws.den),
        &den,
        exact_tol,
    );
    if cs.tensor_cores {
        let e = crate::check::rel_err(&mem.get(out1_d), &out1);
        assert!(e > 1e-7, "fused out1 {tag}: no bf16 rounding ({e:e})");
    }
    close(&format!("fused lkey {tag}"), &mem.get(lk_d), &lk, tol);
    if cs.content {
        close(&format!("fused lcont {tag}"), &mem.get(lc_d), &lc, tol);
    }
    close(&format!("fused logits {tag}"), &mem.get(lg_d), &lg, tol);
    close(&format!("fused rw {tag}"), &mem.get(rw_d), &rw, tol);
    if cs.refine {
        crate::op_cases::twin_matches(mem, &format!("fused rw {tag}"), rw_d, rw16);
    }
    close(&format!("fused out1 {tag}"), &mem.get(out1_d), &out1, tol);
    if cs.refine {
        let delta_d = mem.zeroed::<f32>(bhtd);
        fused::mix(dev, &plan, &ws, delta_d, sw_d, wl_d, v_d, None, Dv::null()).unwrap();
        close(
            &format!("fused delta {tag}"),
            &mem.get(delta_d),
            &delta,
            tol,
        );
        // with the merge: out1 + gate * delta in [B,T,H*d] (and its bf16 twin)
        let (gate, gate_l) = if learned {
            let l = Learned {
                value: f32::NAN,
                at: gate_at,
            };
            (0.41f32, l)
        } else {
            (0.37f32, Learned::value(0.37))
        };
        let (merged_d, merged16) = (mem.put(&vec![f32::NAN; bhtd]), mem.zeroed::<u16>(bhtd));
        let delta2_d = mem.zeroed::<f32>(bhtd);
        let merge = fused::MixMerge {
            base: out1_d,
            gate: gate_l,
            merged: merged_d,
            merged16,
        };
        fused::mix(
            dev,
            &plan,
            &ws,
            delta2_d,
            sw_d,
            wl_d,
            v_d,
            Some(merge),
            Dv::null(),
        )
        .unwrap();
        let (dd, o1) = (mem.get(delta2_d), mem.get(out1_d));
        close(&format!("fused delta (merge) {tag}"), &dd, &delta, tol);
        let mut want = vec![0.0f32; bhtd];
        for (bh, (orow, drow)) in o1.chunks(t * d).zip(dd.chunks(t * d)).enumerate() {
            let (bi, hi) = (bh / h, bh % h);
            for ti in 0..t {
                for j in 0..d {
                    let i = ti * d + j;
                    want[((bi * t + ti) * h + hi) * d + j] = orow[i] + gate * drow[i];
                }
            }
        }
        close(
            &format!("fused merged {tag}"),
            &mem.get(merged_d),
            &want,
            tol,
        );
        crate::op_cases::twin_matches(mem, &format!("fused merged {tag}"), merged_d, merged16);
        if cs.tensor_cores {
            // the weights as the tanh of slot_out's output, taken (and stored) by the mix
            let zs = rv(&mut r, bhtk, 2.0);
            let swt: Vec<f32> = zs.iter().map(|&x| (x as f64).tanh() as f32).collect();
            let mut delta_t = vec![0.0f32; bhtd];
            ca::slot_mix_forward(&mut delta_t, &swt, &st, dm);
            let (z_d, swt_d, delta3_d) = (
                mem.put(&zs),
                mem.put(&vec![f32::NAN; bhtk]),
                mem.zeroed::<f32>(bhtd),
            );
            fused::mix(dev, &plan, &ws, delta3_d, swt_d, wl_d, v_d, None, z_d).unwrap();
            close(
                &format!("fused tanh weights {tag}"),
                &mem.get(swt_d),
                &swt,
                1e-6,
            );
            close(
                &format!("fused delta (tanh) {tag}"),
                &mem.get(delta3_d),
                &delta_t,
                tol,
            );
        }
    }

    // backward
    let dout1 = rv(&mut r, bhtd, 1.0);
    let drw_ref = rv(&mut r, bhtk, 0.5);
    let ddelta = rv(&mut r, bhtd, 1.0);
    let mut dstate = vec![0.0f32; st.len()];
    let mut dsw = vec![0.0f32; bhtk];
    if cs.refine {
        ca::slot_mix_backward(&mut dsw, &mut dstate, &ddelta, &sw, &st, dm);
    }
    let mut drw = if cs.refine {
        drw_ref.clone()
    } else {
        vec![0.0; bhtk]
    };
    ca::slot_mix_backward(&mut drw, &mut dstate, &dout1, &rw, &st, dm);
    let mut dlog = vec![0.0f32; bhtk];
    ca::read_weights_backward(
        &mut dlog,
        &drw,
        &rw,
        &lg,
        &Routing::Softmax,
        rtemp,
        read_keep,
        dm,
    );
    let (mut dq, mut dkeys) = (vec![0.0f32; bhtd], vec![0.0f32; h * nk * d]);
    let dgam = ca::read_logits_backward(
        &mut dq,
        &mut dkeys,
        cs.content.then_some(&mut dstate[..]),
        &dlog,
        cs.content.then_some(&lc[..]),
        &q,
        &keys,
        &st,
        gamma,
        cmask,
        dm,
    );
    let (mut dwl, mut dv) = (vec![0.0f32; bhkt], vec![0.0f32; bhtd]);
    ca::slot_scan_backward(
        &mut dwl, &mut dv, &dstate, &st, &den, &rm, &wl, &v, cs.chunk, dm,
    );
    let (dout1_d, ddelta_d, drw_d, dsw_d) = (
        mem.put(&dout1),
        mem.put(&ddelta),
        mem.put(&drw_ref),
        mem.zeroed::<f32>(bhtk),
    );
    if cs.refine {
        fused::dot(dev, &plan, &ws, dsw_d, ddelta_d, wl_d, v_d, None).unwrap();
        close(&format!("fused dsw {tag}"), &mem.get(dsw_d), &dsw, tol);
        if cs.tensor_cores {
            // with tanh_backward on the updated dsw: dz += dsw * (1 - sw^2), and its twin
            let dsw2_d = mem.zeroed::<f32>(bhtk);
            let dz0 = rv(&mut r, bhtk, 0.5);
            let (dz_d, dz16) = (mem.put(&dz0), mem.zeroed::<u16>(bhtk));
            let tb = fused::TanhBack {
                dz: dz_d,
                dz16,
                sw: sw_d,
            };
            fused::dot(dev, &plan, &ws, dsw2_d, ddelta_d, wl_d, v_d, Some(tb)).unwrap();
            close(
                &format!("fused dsw (tanh) {tag}"),
                &mem.get(dsw2_d),
                &dsw,
                tol,
            );
            let mut dz = dz0.clone();
            ca::tanh_backward(&mut dz, &sw, &mem.get(dsw2_d));
            close(&format!("fused dz (tanh) {tag}"), &mem.get(dz_d), &dz, 1e-6);
            crate::op_cases::twin_matches(mem, &format!("fused dz {tag}"), dz_d, dz16);
        }
    }
    let (dwl_d, dv_d, dq_d, dk_d) = (
        mem.zeroed::<f32>(bhkt),
        mem.zeroed::<f32>(bhtd),
        mem.zeroed::<f32>(bhtd),
        mem.zeroed::<f32>(h * nk * d),
    );
    let dg = mem.zeroed::<f64>(1);
    // the raw parameter's gradient: += d gamma * factor onto what it holds
    let (g0, gfactor) = (0.25f32, 0.7f64);
    let dgg = mem.put(&[g0]);
    let bio = BwdIo {
        dwl: dwl_d,
        dv: dv_d,
        dq: dq_d,
        dkeys: dk_d,
        dgamma: dg,
        dgamma_grad: dgg,
        gamma_factor: gfactor,
        dout1: dout1_d,
        drw: if cs.refine { drw_d } else { Dv::null() },
        rw: rw_d,
        sw: if cs.refine { sw_d } else { Dv::null() },
        ddelta: if cs.refine { ddelta_d } else { Dv::null() },
        dsw: if cs.refine { dsw_d } else { Dv::null() },
        q: q_d,
        keys: keys_d,
        v: v_d,
        wl: wl_d,
        gamma: gamma_l,
        rtemp,
        mask: dmask,
        content: cs.content,
    };
    fused::backward(dev, &plan, &ws, &bio).unwrap();
    // the factor the kernel takes: the argument's, or the block's
    let gfactor = if learned { gfactor_at } else { gfactor };
    close(&format!("fused dq {tag}"), &mem.get(dq_d), &dq, tol);
    close(&format!("fused dkeys {tag}"), &mem.get(dk_d), &dkeys, tol);
    close(&format!("fused dv {tag}"), &mem.get(dv_d), &dv, tol);
    close(&format!("fused dwl {tag}"), &mem.get(dwl_d), &dwl, tol);
    if cs.content {
        let gd = mem.get(dg)[0];
        assert!(
            (gd - dgam).abs() <= tol * dgam.abs().max(1.0),
            "fused dgamma {gd} vs {dgam} {tag}"
        );
        let want = g0 + (dgam * gfactor) as f32;
        let got = mem.get(dgg)[0];
        assert!(
            (got - want).abs() <= tol as f32 * want.abs().max(1.0),
            "fused dgamma_grad {got} vs {want} {tag}"
        );
    }
}

/// The op-level cases: chunk sizes x tiles (whole chunks per tile and sub-tiles of a chunk),
/// content read, read masks, refine, left padding, ties in the running max, ALiBi-like ramps,
/// and other layouts (lanes per slot 1..32, several warps, K up to 128, d up to 256, long T, a
/// fully padded row, the bench shape).
pub fn fused_cases() -> Vec<FusedCase> {
    let base = FusedCase {
        b: 2,
        h: 2,
        t: 23,
        k: 5,
        d: 12,
        chunk: 5,
        tile: 64,
        content: true,
        mask: None,
        refine: true,
        pad: 4,
        ties: false,
        ramp: 0.0,
        seed: 0,
        tensor_cores: false,
    };
    let mut cases = vec![];
    let mut seed = 100;
    // chunk sizes 1, 7, T (and others) x tiles: whole chunks per tile and sub-tiles of a chunk
    for chunk in [1usize, 2, 5, 7, 16, 23] {
        for tile in [1usize, 3, 4, 8, 64] {
            seed += 1;
            cases.push(FusedCase {
                chunk,
                tile,
                seed,
                ..base.clone()
            });
        }
    }
    for (content, mask, refine, pad, ties, ramp) in [
        (false, None, false, 0, false, 0.0),
        (true, Some((false, ReadMask::Read)), true, 3, false, 0.0),
        (true, Some((true, ReadMask::Read)), false, 0, true, 0.0),
        (
            true,
            Some((false, ReadMask::ContentOnly)),
            true,
            5,
            true,
            0.3,
        ),
        (
            true,
            Some((true, ReadMask::ContentOnly)),
            true,
            0,
            false,
            0.5,
        ),
        (false, Some((false, ReadMask::Read)), true, 2, true, 0.2),
    ] {
        for (chunk, tile) in [(1usize, 4usize), (4, 3), (7, 64), (23, 4), (6, 8)] {
            seed += 1;
            cases.push(FusedCase {
                content,
                mask,
                refine,
                pad,
                ties,
                ramp,
                chunk,
                tile,
                seed,
                ..base.clone()
            });
        }
    }
    // other layouts: lanes per slot 1..32, several warps, K up to 128, d up to 256, long T,
    // a fully padded row, the bench shape
    for (b, h, t, k, d, chunk, tile, pad) in [
        (
            1usize, 2usize, 70usize, 32usize, 64usize, 16usize, 16usize, 2usize,
        ),
        (1, 2, 40, 9, 33, 40, 8, 2),
        (1, 2, 37, 40, 8, 3, 64, 2),
        (1, 2, 5, 3, 3, 2, 2, 0),
        (1, 1, 4, 1, 1, 1, 1, 0),
        (2, 1, 23, 5, 12, 5, 4, 23),
        (2, 1, 9, 128, 8, 4, 4, 2),
        (2, 1, 7, 100, 30, 3, 64, 0),
        (2, 1, 6, 3, 256, 4, 2, 1),
        (2, 1, 300, 4, 16, 128, 16, 40),
        (2, 1, 200, 4, 16, 1, 64, 7),
        (1, 4, 1000, 32, 64, 128, 64, 0),
        (1, 4, 1000, 32, 64, 1000, 16, 0),
    ] {
        seed += 1;
        cases.push(FusedCase {
            b,
            h,
            t,
            k,
            d,
            chunk,
            tile,
            pad,
            mask: Some((false, ReadMask::Read)),
            ties: true,
            ramp: 0.05,
            seed,
            ..base.clone()
        });
    }
    cases
}

/// Cases of the forward on tensor cores (every tile inside one write chunk): tiles of one chunk,
/// sub-tiles of a chunk, one chunk in all; content read off, read masks, padding, ties, K and d
/// not multiples of 16 (up to 128 slots and 256 dims), several tiles per chunk with carries.
pub fn fused_cases_tc() -> Vec<FusedCase> {
    let base = FusedCase {
        tensor_cores: true,
        ..fused_cases()[0].clone()
    };
    let mut cases = vec![];
    for (i, (b, h, t, k, d, chunk, tile, content, mask, pad, ties, ramp)) in [
        (
            2usize, 2usize, 23usize, 5usize, 12usize, 5usize, 5usize, true, None, 4usize, false,
            0.0f32,
        ),
        (2, 2, 23, 5, 12, 16, 8, true, None, 4, false, 0.0),
        (2, 2, 23, 5, 12, 23, 64, true, None, 4, false, 0.0),
        (2, 2, 23, 5, 12, 7, 7, false, None, 0, false, 0.0),
        (
            2,
            2,
            23,
            5,
            12,
            1,
            1,
            true,
            Some((false, ReadMask::Read)),
            3,
            false,
            0.0,
        ),
        (
            2,
            2,
            23,
            5,
            12,
            8,
            4,
            true,
            Some((true, ReadMask::Read)),
            0,
            true,
            0.0,
        ),
        (
            2,
            2,
            23,
            5,
            12,
            12,
            6,
            true,
            Some((false, ReadMask::ContentOnly)),
            5,
            true,
            0.3,
        ),
        (
            1,
            2,
            70,
            32,
            64,
            64,
            16,
            true,
            Some((false, ReadMask::Read)),
            2,
            true,
            0.05,
        ),
        (1, 2, 40, 9, 33, 40, 40, true, None, 2, false, 0.05),
        (2, 1, 9, 128, 8, 4, 4, true, None, 2, true, 0.05),
        (2, 1, 6, 3, 256, 4, 2, true, None, 1, false, 0.0),
        (2, 1, 200, 4, 16, 128, 64, true, None, 7, true, 0.05),
    ]
    .into_iter()
    .enumerate()
    {
        cases.push(FusedCase {
            b,
            h,
            t,
            k,
            d,
            chunk,
            tile,
            content,
            mask,
            pad,
            ties,
            ramp,
            seed: 900 + i as u64,
            ..base.clone()
        });
    }
    cases
}
