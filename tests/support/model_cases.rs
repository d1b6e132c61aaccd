//! The model-level CUDA tests (the GPU layer and language model against the CPU model:
//! forward, backward, training steps, the fused path, the intervene variant), written for any
//! [`Backend`] so that they run on a GPU (tests/cuda_ops.rs) and in the SIMT emulator
//! (tests/cuda_emu.rs). `mk` makes a fresh backend for each model.

#![allow(dead_code, clippy::too_many_arguments, clippy::needless_range_loop)]

use rand::Rng;

use asa::backend::cuda::layer::GpuLayerRunner;
use asa::backend::cuda::{Backend, GpuLm, Precision};
use asa::config::{ModelConfig, Variant};
use asa::model::layer::{AsaCache, AsaLayer, AsaOptions, RoutingMode, SlotMask};
use asa::model::lm::{Lm, LmCache};
use asa::model::params::{AsaIds, Init, ParamStore};
use asa::optim::{clip_grad_norm, AdamW, AdamWConfig};

use crate::check::{close, close_params, rng, rv};

/// Tolerance of f32 results against the CPU model.
pub const TOL: f64 = 1e-4;

pub fn small_cfg(variant: Variant) -> ModelConfig {
    ModelConfig {
        vocab_size: 61,
        max_seq_len: 64,
        embed_dim: 48,
        num_layers: 2,
        num_heads: 4,
        num_slots: 6,
        mlp_ratio: 2.0,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        write_chunk_size: 5,
        slotspace_dim: 8,
        content_read_init: 0.3,
        slotspace_gate_init: 0.2,
        alibi_strength_init: 0.5,
        variant,
        ..Default::default()
    }
}

pub fn cpu_train(
    cfg: &ModelConfig,
    store: &mut ParamStore,
    inputs: &[u32],
    targets: &[i64],
    b: usize,
    t: usize,
    acfg: &AdamWConfig,
    steps: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut lm, _) = Lm::new(cfg).unwrap();
    let mut adam = AdamW::new(*acfg, store);
    let mut cache = LmCache::default();
    let opts = AsaOptions::default();
    let (mut losses, mut norms) = (vec![], vec![]);
    for _ in 0..steps {
        lm.forward(store, inputs, b, t, &opts, &mut cache).unwrap();
        losses.push(lm.loss(&mut cache, targets, None).unwrap());
        let mut grads = store.zeros_like();
        lm.backward(store, &mut cache, &opts, &mut grads);
        norms.push(clip_grad_norm(&mut grads, 0.5));
        adam.step(store, &grads, acfg.lr);
    }
    (losses, norms)
}

/// The intervention settings the intervene tests sweep: every mode, every score kind, tau abs
/// and percentile, soft and hard masks, with and without score clipping, head masks, geometry
/// logs.
pub fn intervention_sweep(h: usize) -> Vec<asa::model::layer::Intervention> {
    use asa::model::layer::{Intervention, IntvMode, ScoreKind, TauKind};
    let hm: Vec<f32> = (0..h).map(|i| [1.0, 0.0, 0.5, 1.0][i % 4]).collect();
    let mut v = Vec::new();
    for mode in [
        IntvMode::Off,
        IntvMode::DeltaPar,
        IntvMode::DeltaOrth,
        IntvMode::DeltaParPlusOrth,
    ] {
        v.push(Intervention {
            mode,
            log_refine_geom: true,
            ..Default::default()
        });
        v.push(Intervention {
            mode,
            head_mask: Some(hm.clone()),
            ..Default::default()
        });
    }
    for sk in [
        ScoreKind::OrthRatio,
        ScoreKind::OrthFrac,
        ScoreKind::AlphaAbs,
        ScoreKind::SlotPeaked,
    ] {
        // abs thresholds near the median score of the test data (mixed masks)
        let tau_abs = match sk {
            ScoreKind::OrthRatio => 3e-3,
            ScoreKind::OrthFrac => 0.04,
            ScoreKind::AlphaAbs => 0.0767,
            ScoreKind::SlotPeaked => 9.1e-4,
        };
        for (tk, tau) in [(TauKind::Pctl, 0.15), (TauKind::Abs, tau_abs)] {
            for soft in [true, false] {
                v.push(Intervention {
                    mode: IntvMode::OrthGate,
                    beta: 0.5,
                    par_beta: 0.8,
                    score_kind: sk,
                    tau_kind: tk,
                    tau,
                    tau_pctl: 60.0,
                    soft_mask: soft,
                    soft_temp: 0.2,
                    // (no clip for slot_peaked: its clip boundary is within 3e-6 of a score)
                    score_clip_pctl: if soft && sk != ScoreKind::SlotPeaked {
                        Some(81.0)
                    } else {
                        None
                    },
                    log_refine_geom: sk == ScoreKind::OrthFrac,
                    ..Default::default()
                });
            }
        }
        v.push(Intervention {
            mode: IntvMode::OrthGate,
            score_kind: sk,
            head_mask: Some(hm.clone()),
            ..Default::default()
        });
    }
    v
}

/// `cuda_layer_matches_cpu` of tests/cuda_ops.rs, on any backend (`mk` makes a fresh one).
pub fn layer_matches_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    let mut r = rng(4);
    let (b, t) = (2, 23);
    // the last case: C = 18 and M = 6, so neither a [C,C] projection nor a refine's [M,M] one
    // is a multiple of the device layout's alignment: the three projections of each are three
    // GEMMs (not one fused GEMM)
    for (variant, normalize_k, signed, embed) in [
        (Variant::Baseline, false, true, 48),
        (Variant::Baseline, true, false, 48),
        (Variant::Online, false, true, 48),
        (Variant::Baseline, false, true, 18),
    ] {
        let mut cfg = small_cfg(variant);
        cfg.normalize_k = normalize_k;
        cfg.slotspace_signed_weights = signed;
        if embed != cfg.embed_dim {
            (cfg.embed_dim, cfg.num_heads, cfg.slotspace_dim) = (embed, 3, 6);
        }
        let mut store = ParamStore::new();
        let ids = AsaIds::register(&mut store, "", &cfg, &mut Init::new(9));
        // a refine that matters: at its initial scale (0.02) its share of the output is too
        // small for the tolerance to tell its projections apart
        for (name, data) in store.names.iter().zip(store.data.iter_mut()) {
            if name.starts_with("slot_") && name != "slot_keys" {
                data.iter_mut().for_each(|w| *w *= 12.0);
            } else if name == "_slotspace_gate_raw" {
                data[0] = 1.0;
            }
        }
        let c = cfg.embed_dim;
        let x = rv(&mut r, b * t * c, 1.0);
        let dout = rv(&mut r, b * t * c, 1.0);
        let mut opt_sets = vec![
            AsaOptions::default(),
            AsaOptions {
                attention_mask: Some((0..b * t).map(|i| !(i >= t && i < t + 3)).collect()),
                ..Default::default()
            },
        ];
        if variant == Variant::Baseline {
            let keep = [1.0f32, 0.0, 1.0, 1.0, 1.0, 0.0];
            opt_sets.push(AsaOptions {
                routing: RoutingMode::TopK(2),
                ..Default::default()
            });
            opt_sets.push(AsaOptions {
                slot_mask: Some(SlotMask::new(&keep, "read", "all").unwrap()),
                ..Default::default()
            });
            opt_sets.push(AsaOptions {
                slot_mask: Some(
                    SlotMask::new(&keep, "content_read_only", "last_pos_only").unwrap(),
                ),
                ..Default::default()
            });
            opt_sets.push(AsaOptions {
                slot_mask: Some(SlotMask::new(&keep, "slotspace_only", "all").unwrap()),
                ..Default::default()
            });
        }
        for (oi, opts) in opt_sets.iter().enumerate() {
            let mut layer = AsaLayer::new(&cfg, ids.clone());
            let mut cache = AsaCache::default();
            let mut out = vec![0.0; b * t * c];
            layer
                .forward(&store, &x, b, t, opts, &mut cache, &mut rng(0), &mut out)
                .unwrap();
            let mut dx = vec![0.0; b * t * c];
            let gcpu = layer.backward(&store, &cache, opts, &dout, &mut dx);
            let mut grads = store.zeros_like();
            gcpu.accumulate_into(&mut grads, &ids);

            let mut run =
                GpuLayerRunner::with_backend(mk(), &cfg, ids.clone(), &store, Precision::F32)
                    .unwrap();
            let gout = run.forward(&x, b, t, opts).unwrap();
            let tag = format!("{variant:?} nk{normalize_k} s{signed} C{embed} opts{oi}");
            close(&format!("layer out {tag}"), &gout, &out, TOL);
            let (gdx, ggrads) = run.backward(&dout).unwrap();
            close(&format!("layer dx {tag}"), &gdx, &dx, TOL);
            close_params(&format!("layer grad {tag}"), &ggrads, &grads, TOL);
        }
    }
}

/// `cuda_lm_train_step_matches_cpu` of tests/cuda_ops.rs, on any backend (`mk` makes a fresh one).
pub fn lm_train_step_matches_cpu<B: Backend>(mk: &dyn Fn() -> B, bf16: bool) {
    let mut r = rng(5);
    let (b, t) = (3, 19);
    for (variant, tie, abs_pos) in [
        (Variant::Baseline, true, false),
        (Variant::Baseline, false, true),
        (Variant::Online, true, false),
    ] {
        let mut cfg = small_cfg(variant);
        cfg.tie_weights = tie;
        cfg.use_abs_pos = abs_pos;
        let (_lm, store0) = Lm::new(&cfg).unwrap();
        let inputs: Vec<u32> = (0..b * t)
            .map(|_| r.gen_range(0..cfg.vocab_size as u32))
            .collect();
        let mut targets: Vec<i64> = (0..b * t)
            .map(|_| r.gen_range(0..cfg.vocab_size as i64))
            .collect();
        targets[4] = -100;
        let acfg = crate::train_cases::adam_cfg();
        let mut cpu_store = store0.clone();
        let (losses, norms) = cpu_train(&cfg, &mut cpu_store, &inputs, &targets, b, t, &acfg, 3);

        // logits and loss/grads of the first step
        let mut gl = GpuLm::with_backend(mk(), &cfg, &store0, Precision::F32).unwrap();
        let (mut lm, _) = Lm::new(&cfg).unwrap();
        let mut cache = LmCache::default();
        let mask: Vec<bool> = (0..b * t).map(|i| i % 11 != 5).collect();
        let opts = AsaOptions {
            attention_mask: Some(mask.clone()),
            ..Default::default()
        };
        lm.forward(&store0, &inputs, b, t, &opts, &mut cache)
            .unwrap();
        let glog = gl.forward_logits(&inputs, b, t, Some(&mask)).unwrap();
        close(&format!("lm logits {variant:?}"), &glog, &cache.logits, TOL);
        let loss = lm.loss(&mut cache, &targets, Some(&mask)).unwrap();
        let mut grads = store0.zeros_like();
        lm.backward(&store0, &mut cache, &opts, &mut grads);
        let (gloss, ggrads) = gl
            .loss_and_grads(&inputs, &targets, Some(&mask), b, t)
            .unwrap();
        assert!((gloss - loss).abs() < 1e-5, "loss {gloss} vs {loss}");
        close_params(&format!("lm grad {variant:?}"), &ggrads, &grads, TOL);

        // three training steps (eval-mode forward, clip 0.5)
        let mut gl = GpuLm::with_backend(mk(), &cfg, &store0, Precision::F32).unwrap();
        for s in 0..3 {
            let (l, nrm) = gl
                .train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(0.5), false)
                .unwrap();
            assert!(
                (l - losses[s]).abs() < 1e-5,
                "step {s} loss {l} vs {}",
                losses[s]
            );
            assert!(
                (nrm - norms[s]).abs() < 1e-4 * norms[s].max(1.0),
                "step {s} norm {nrm} vs {}",
                norms[s]
            );
        }
        let gp = gl.download_params().unwrap();
        close_params(&format!("trained {variant:?}"), &gp, &cpu_store, 1e-3);

        if bf16 {
            // bf16 GEMM inputs: within the documented looser tolerance of the f32 CPU path
            let mut g16 = GpuLm::with_backend(mk(), &cfg, &store0, Precision::Bf16).unwrap();
            let (l16, _) = g16.loss_and_grads(&inputs, &targets, None, b, t).unwrap();
            assert!(
                (l16 - losses[0]).abs() < 5e-2 * losses[0].abs(),
                "bf16 loss {l16} vs {}",
                losses[0]
            );
            for s in 0..3 {
                let (l, _) = g16
                    .train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(0.5), false)
                    .unwrap();
                assert!(
                    (l - losses[s]).abs() < 5e-2 * losses[s].abs(),
                    "bf16 step {s} loss {l} vs {}",
                    losses[s]
                );
            }
            let gp16 = g16.download_params().unwrap();
            close_params(
                &format!("bf16 trained {variant:?}"),
                &gp16,
                &cpu_store,
                5e-2,
            );
        }
    }
}

/// `cuda_fused_layer_matches_unfused_and_cpu` of tests/cuda_ops.rs, on any backend (`mk` makes a fresh one).
pub fn fused_layer_matches_unfused_and_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    let mut r = rng(12);
    let (b, t) = (2, 23);
    for (variant, chunk, content, refine, signed) in [
        (Variant::Baseline, 1usize, true, true, false),
        (Variant::Baseline, 7, true, true, true),
        (Variant::Baseline, t, true, true, false),
        (Variant::Baseline, 7, false, true, false),
        (Variant::Baseline, 5, true, false, false),
        (Variant::Baseline, t, false, false, false),
        (Variant::Online, 7, true, true, true),
        (Variant::Online, 1, true, true, false),
    ] {
        let mut cfg = small_cfg(variant);
        cfg.write_chunk_size = chunk;
        cfg.use_content_read = content;
        cfg.use_slotspace_refine = refine;
        cfg.slotspace_signed_weights = signed;
        let mut store = ParamStore::new();
        let ids = AsaIds::register(&mut store, "", &cfg, &mut Init::new(21));
        let c = cfg.embed_dim;
        let x = rv(&mut r, b * t * c, 1.0);
        let dout = rv(&mut r, b * t * c, 1.0);
        let pad: Vec<bool> = (0..b * t).map(|i| !(i >= t && i < t + 4)).collect();
        let mut opt_sets = vec![
            AsaOptions::default(),
            AsaOptions {
                attention_mask: Some(pad.clone()),
                ..Default::default()
            },
        ];
        if variant == Variant::Baseline {
            let keep = [1.0f32, 0.0, 1.0, 1.0, 1.0, 0.0];
            opt_sets.push(AsaOptions {
                attention_mask: Some(pad.clone()),
                slot_mask: Some(SlotMask::new(&keep, "read", "all").unwrap()),
                ..Default::default()
            });
            opt_sets.push(AsaOptions {
                slot_mask: Some(SlotMask::new(&keep, "read", "last_pos_only").unwrap()),
                ..Default::default()
            });
            opt_sets.push(AsaOptions {
                slot_mask: Some(SlotMask::new(&keep, "content_read_only", "all").unwrap()),
                ..Default::default()
            });
            opt_sets.push(AsaOptions {
                slot_mask: Some(SlotMask::new(&keep, "slotspace_only", "all").unwrap()),
                ..Default::default()
            });
        }
        for (oi, opts) in opt_sets.iter().enumerate() {
            let tag = format!("{variant:?} c{chunk} content{content} refine{refine} opts{oi}");
            let mut layer = AsaLayer::new(&cfg, ids.clone());
            let mut cache = AsaCache::default();
            let mut out = vec![0.0; b * t * c];
            layer
                .forward(&store, &x, b, t, opts, &mut cache, &mut rng(0), &mut out)
                .unwrap();
            let mut dx = vec![0.0; b * t * c];
            let gcpu = layer.backward(&store, &cache, opts, &dout, &mut dx);
            let mut grads = store.zeros_like();
            gcpu.accumulate_into(&mut grads, &ids);

            let mut run =
                GpuLayerRunner::with_backend(mk(), &cfg, ids.clone(), &store, Precision::F32)
                    .unwrap();
            let mut res = vec![];
            for fused in [true, false] {
                run.set_fused(fused);
                let o = run.forward(&x, b, t, opts).unwrap();
                assert_eq!(run.fused_active(), fused, "fused path {fused} {tag}");
                let (gdx, gg) = run.backward(&dout).unwrap();
                res.push((o, gdx, gg));
            }
            let (fo, fdx, fg) = &res[0];
            let (uo, udx, ug) = &res[1];
            close(&format!("fused layer out vs cpu {tag}"), fo, &out, TOL);
            close(&format!("fused layer out vs unfused {tag}"), fo, uo, 1e-5);
            close(&format!("fused layer dx vs cpu {tag}"), fdx, &dx, TOL);
            close(&format!("fused layer dx vs unfused {tag}"), fdx, udx, 1e-5);
            close_params(&format!("fused layer grad vs cpu {tag}"), fg, &grads, TOL);
            close_params(&format!("fused layer grad vs unfused {tag}"), fg, ug, 1e-5);
        }
    }
}

/// `cuda_fused_lm_matches_unfused_and_cpu` of tests/cuda_ops.rs, on any backend (`mk` makes a fresh one).
pub fn fused_lm_matches_unfused_and_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    let mut r = rng(13);
    let (b, t) = (3, 19);
    for (variant, chunk) in [
        (Variant::Baseline, 1usize),
        (Variant::Baseline, 7),
        (Variant::Online, t),
    ] {
        let mut cfg = small_cfg(variant);
        cfg.write_chunk_size = chunk;
        let (_lm, store) = Lm::new(&cfg).unwrap();
        let inputs: Vec<u32> = (0..b * t)
            .map(|_| r.gen_range(0..cfg.vocab_size as u32))
            .collect();
        let targets: Vec<i64> = (0..b * t)
            .map(|_| r.gen_range(0..cfg.vocab_size as i64))
            .collect();
        let mask: Vec<bool> = (0..b * t).map(|i| !(i >= t && i < t + 5)).collect();
        let opts = AsaOptions {
            attention_mask: Some(mask.clone()),
            ..Default::default()
        };
        let (mut lm, _) = Lm::new(&cfg).unwrap();
        let mut cache = LmCache::default();
        lm.forward(&store, &inputs, b, t, &opts, &mut cache)
            .unwrap();
        let loss = lm.loss(&mut cache, &targets, Some(&mask)).unwrap();
        let mut grads = store.zeros_like();
        lm.backward(&store, &mut cache, &opts, &mut grads);
        let mut res = vec![];
        for fused in [true, false] {
            let mut gl = GpuLm::with_backend(mk(), &cfg, &store, Precision::F32).unwrap();
            gl.set_fused(fused);
            res.push(
                gl.loss_and_grads(&inputs, &targets, Some(&mask), b, t)
                    .unwrap(),
            );
        }
        let tag = format!("{variant:?} c{chunk}");
        let ((fl, fg), (ul, ug)) = (&res[0], &res[1]);
        assert!(
            (fl - loss).abs() < 1e-5,
            "fused loss {fl} vs cpu {loss} {tag}"
        );
        assert!(
            (fl - ul).abs() < 1e-6,
            "fused loss {fl} vs unfused {ul} {tag}"
        );
        close_params(&format!("fused lm grad vs cpu {tag}"), fg, &grads, TOL);
        close_params(&format!("fused lm grad vs unfused {tag}"), fg, ug, 1e-5);
    }
}

/// `cuda_intervene_layer_matches_cpu` of tests/cuda_ops.rs, on any backend (`mk` makes a fresh one).
pub fn intervene_layer_matches_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    let mut r = rng(21);
    let (b, t) = (2, 23); // write chunks of 5: four full chunks and one of 3
    let mut cfg = small_cfg(Variant::Intervene);
    cfg.slotspace_gate_init = 1.0; // a refine delta comparable to the base read
    let mut store = ParamStore::new();
    let ids = AsaIds::register(&mut store, "", &cfg, &mut Init::new(11));
    // slotspace logits of order 1, so that slot_peaked scores are not tiny differences of
    // entropies (whose rounding could reorder near-equal scores at a hard-mask threshold)
    let so = store
        .names
        .iter()
        .position(|n| n == "slot_out.weight")
        .unwrap();
    store.data[so].iter_mut().for_each(|w| *w *= 2000.0);
    let c = cfg.embed_dim;
    let x = rv(&mut r, b * t * c, 1.0);
    let dout = rv(&mut r, b * t * c, 1.0);
    let mask: Vec<bool> = (0..b * t).map(|i| !(i >= t && i < t + 3)).collect();
    for (ii, it) in intervention_sweep(cfg.num_heads).into_iter().enumerate() {
        for masked in [false, true] {
            // (masked runs: a third of the settings; not the hard slot_peaked percentile
            // threshold, whose nearest score lies only 3e-6 (relative) from tau on that data)
            let hard_peaked = it.score_kind == asa::model::layer::ScoreKind::SlotPeaked
                && it.mode == asa::model::layer::IntvMode::OrthGate
                && !it.soft_mask;
            if masked && (ii % 3 != 0 || hard_peaked) {
                continue;
            }
            let opts = AsaOptions {
                attention_mask: masked.then(|| mask.clone()),
                return_info: true,
                ..Default::default()
            };
            let tag = format!("intervention {ii} {it:?} masked {masked}");
            let mut layer = AsaLayer::new(&cfg, ids.clone());
            layer.intervention = it.clone();
            let mut cache = AsaCache::default();
            let mut out = vec![0.0; b * t * c];
            let info = layer
                .forward(&store, &x, b, t, &opts, &mut cache, &mut rng(0), &mut out)
                .unwrap()
                .unwrap();
            let mut dx = vec![0.0; b * t * c];
            let gcpu = layer.backward(&store, &cache, &opts, &dout, &mut dx);
            let mut grads = store.zeros_like();
            gcpu.accumulate_into(&mut grads, &ids);

            let mut run =
                GpuLayerRunner::with_backend(mk(), &cfg, ids.clone(), &store, Precision::F32)
                    .unwrap();
            run.set_intervention(&it);
            let gout = run.forward(&x, b, t, &opts).unwrap();
            close(&format!("out {tag}"), &gout, &out, TOL);
            let ginfo = run.intervention_info().unwrap();
            // every intervention key the CPU logs is produced, and every produced key matches
            for key in info.keys() {
                let intv_key = key.starts_with("geom_")
                    || key.starts_with("intv_")
                    || [
                        "alpha",
                        "score",
                        "mask",
                        "tau",
                        "out1_norm",
                        "dpar_norm",
                        "dorth_norm",
                        "head_mask",
                    ]
                    .contains(&key.as_str());
                if intv_key {
                    assert!(ginfo.contains_key(key), "GPU info lacks {key} ({tag})");
                }
            }
            assert!(ginfo.contains_key("alpha") == (it.mode != asa::model::layer::IntvMode::Off));
            for (key, (shape, data)) in &ginfo {
                let (cshape, cdata) = info
                    .get(key)
                    .unwrap_or_else(|| panic!("GPU info {key} not in the CPU info ({tag})"));
                assert_eq!(shape, cshape, "info {key} shape ({tag})");
                close(&format!("info {key} {tag}"), data, cdata, TOL);
            }
            let (gdx, ggrads) = run.backward(&dout).unwrap();
            close(&format!("dx {tag}"), &gdx, &dx, TOL);
            close_params(&format!("grad {tag}"), &ggrads, &grads, TOL);
        }
    }
}

/// `cuda_resume_and_eval_match` of tests/cuda_ops.rs, on any backend.
pub fn resume_and_eval_match<B: Backend>(mk: &dyn Fn() -> B) {
    let cfg = small_cfg(Variant::Baseline);
    let (_lm, store) = Lm::new(&cfg).unwrap();
    let (b, t) = (2, 12);
    let inputs: Vec<u32> = (0..b * t)
        .map(|i| ((i * 5) % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i64> = inputs
        .iter()
        .map(|&x| ((x as usize + 3) % cfg.vocab_size) as i64)
        .collect();
    let acfg = AdamWConfig {
        lr: 2e-3,
        ..Default::default()
    };
    let mut a = GpuLm::with_backend(mk(), &cfg, &store, Precision::F32).unwrap();
    assert!(a.adam_state().unwrap().is_none());
    let (l0, _) = a.loss_and_grads(&inputs, &targets, None, b, t).unwrap();
    let e0 = a.eval_loss(&inputs, &targets, b, t).unwrap();
    assert!((l0 - e0).abs() < 1e-6, "eval_loss {e0} vs {l0}");
    for _ in 0..2 {
        a.train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(1.0), false)
            .unwrap();
    }
    let (m, v, step) = a.adam_state().unwrap().unwrap();
    assert_eq!(step, 2);
    let mut r =
        GpuLm::with_backend(mk(), &cfg, &a.download_params().unwrap(), Precision::F32).unwrap();
    r.set_adam_state(&m, &v, step).unwrap();
    let la = a
        .train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(1.0), false)
        .unwrap();
    let lr_ = r
        .train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(1.0), false)
        .unwrap();
    assert_eq!(la, lr_, "resumed step differs");
    assert_eq!(
        a.download_params().unwrap().data,
        r.download_params().unwrap().data
    );
    let _ = r.rng_mut();
}

/// `cuda_training_with_dropout_runs_and_learns` of tests/cuda_ops.rs, on any backend.
pub fn training_with_dropout_runs_and_learns<B: Backend>(mk: &dyn Fn() -> B) {
    let mut cfg = small_cfg(Variant::Baseline);
    cfg.dropout = 0.1;
    cfg.slot_dropout = 0.1;
    cfg.slotspace_dropout = 0.1;
    let (_lm, store) = Lm::new(&cfg).unwrap();
    let (b, t) = (4, 16);
    // a learnable pattern: next token = (token + 1) mod V
    let inputs: Vec<u32> = (0..b * t).map(|i| (i % cfg.vocab_size) as u32).collect();
    let targets: Vec<i64> = inputs
        .iter()
        .map(|&x| ((x + 1) as usize % cfg.vocab_size) as i64)
        .collect();
    let acfg = AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut gl = GpuLm::with_backend(mk(), &cfg, &store, Precision::F32).unwrap();
    let mut first = 0.0;
    let mut last = 0.0;
    for s in 0..60 {
        let (l, n) = gl
            .train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(1.0), true)
            .unwrap();
        assert!(
            l.is_finite() && n.is_finite(),
            "step {s}: loss {l} norm {n}"
        );
        if s == 0 {
            first = l;
        }
        last = l;
    }
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert_eq!(gl.step(), 60);
}

/// The bf16 path's training curve against f32's (issue 11: within 2e-3 relative over 50 steps
/// on the practice run): `steps` AdamW steps of the small config on a learnable sequence (a
/// repeating pattern, so the loss falls), fused scan and linear attention on tensor cores in
/// bf16. Returns the largest relative difference of the two loss curves, and asserts it is
/// within `tol` and that the loss fell.
pub fn bf16_curve_follows_f32<B: Backend>(mk: &dyn Fn() -> B, steps: usize, tol: f64) -> f64 {
    let (b, t) = (2, 32);
    let mut cfg = small_cfg(Variant::Baseline);
    cfg.max_seq_len = t;
    cfg.write_chunk_size = 16;
    let (_lm, store0) = Lm::new(&cfg).unwrap();
    let seq: Vec<u32> = (0..b * (t + 1)).map(|i| ((i * 7) % 13) as u32).collect();
    let mut inputs = vec![];
    let mut targets = vec![];
    for bi in 0..b {
        let row = &seq[bi * (t + 1)..(bi + 1) * (t + 1)];
        inputs.extend_from_slice(&row[..t]);
        targets.extend(row[1..].iter().map(|&x| x as i64));
    }
    let acfg = crate::train_cases::adam_cfg();
    let curve = |p: Precision| -> Vec<f64> {
        let mut g = GpuLm::with_backend(mk(), &cfg, &store0, p).unwrap();
        (0..steps)
            .map(|_| {
                g.train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(1.0), false)
                    .unwrap()
                    .0
            })
            .collect()
    };
    let (c32, c16) = (curve(Precision::F32), curve(Precision::Bf16));
    assert!(
        c32[steps - 1] < 0.8 * c32[0],
        "the loss should fall: {} -> {}",
        c32[0],
        c32[steps - 1]
    );
    let worst = c32
        .iter()
        .zip(&c16)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0f64, f64::max);
    assert!(
        worst <= tol,
        "bf16 loss curve off f32 by {worst:e} relative (> {tol:e}): {c16:?} vs {c32:?}"
    );
    worst
}

/// The activations' bf16 twins change no bit (issue 11): their producers write the
/// round-to-nearest-even bf16 of exactly what the GEMMs would have converted, so two bf16
/// training steps give the same losses, norms and weights with the twins as with every operand
/// converted where a GEMM reads it. A twin that is stale (its f32 tensor written again after
/// it) or rounded otherwise shows here.
pub fn bf16_twins_change_nothing<B: Backend>(mk: &dyn Fn() -> B) {
    let (b, t) = (2, 24);
    for variant in [Variant::Baseline, Variant::Online] {
        let mut cfg = small_cfg(variant);
        cfg.max_seq_len = t;
        cfg.write_chunk_size = 8;
        let (_lm, store0) = Lm::new(&cfg).unwrap();
        let mut r = rng(41);
        let inputs: Vec<u32> = (0..b * t).map(|_| r.gen_range(0..61)).collect();
        let targets: Vec<i64> = (0..b * t).map(|_| r.gen_range(0..61)).collect();
        let acfg = crate::train_cases::adam_cfg();
        let run = |twins: bool| {
            let dev = mk();
            dev.set_bf16_twins(twins);
            let mut g = GpuLm::with_backend(dev, &cfg, &store0, Precision::Bf16).unwrap();
            let steps: Vec<(u64, u64)> = (0..2)
                .map(|_| {
                    let (l, n) = g
                        .train_step(&inputs, &targets, b, t, b, acfg.lr, &acfg, Some(1.0), true)
                        .unwrap();
                    (l.to_bits(), n.to_bits())
                })
                .collect();
            (steps, g.download_params().unwrap())
        };
        let ((s_on, p_on), (s_off, p_off)) = (run(true), run(false));
        assert_eq!(
            s_on, s_off,
            "{variant:?}: losses and norms with and without twins"
        );
        for (i, name) in p_on.names.iter().enumerate() {
            let bits = |p: &ParamStore| p.data[i].iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&p_on) == bits(&p_off),
                "{variant:?}: {name} differs with twins"
            );
        }
    }
}

/// Fine-tuning with frozen parameters: three steps on the GPU engine equal three on the CPU
/// engine; the frozen parameters do not move by a bit on either (no update, no weight decay),
/// the others do, and the global norm counts only the trained parameters' gradients.
pub fn frozen_training_matches_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    use asa::engine::{Engine, StepBatch};
    let mut r = rng(8);
    let (b, t) = (2, 13);
    let cfg = small_cfg(Variant::Baseline);
    let (_lm, store0) = Lm::new(&cfg).unwrap();
    let inputs: Vec<u32> = (0..b * t)
        .map(|_| r.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let targets: Vec<i64> = (0..b * t)
        .map(|_| r.gen_range(0..cfg.vocab_size as i64))
        .collect();
    let mut acfg = crate::train_cases::adam_cfg();
    acfg.weight_decay = 0.1;
    // train the slotspace refine and the final norm only (the notebooks' slotspace fine-tune)
    let frozen: Vec<bool> = store0
        .names
        .iter()
        .map(|n| {
            !(n.contains(".slot_") || n.ends_with("_slotspace_gate_raw") || n.starts_with("ln_f"))
        })
        .collect();
    assert!(frozen.iter().any(|&f| f) && frozen.iter().any(|&f| !f));
    let mk_adam = || {
        let mut a = AdamW::new(acfg, &store0);
        a.frozen = frozen.clone();
        a
    };
    let mut cpu = Engine::on_cpu(Lm::new(&cfg).unwrap().0, store0.clone(), mk_adam());
    let gl = GpuLm::with_backend(mk(), &cfg, &store0, Precision::F32).unwrap();
    let mut gpu = Engine::on_gpu(gl, store0.clone(), mk_adam()).unwrap();
    cpu.set_dropout(false);
    gpu.set_dropout(false);
    let batch = StepBatch::whole(&inputs, &targets, b, t);
    // the norm of the trained parameters' gradients alone
    let (mut lm, _) = Lm::new(&cfg).unwrap();
    let mut cache = LmCache::default();
    lm.forward(&store0, &inputs, b, t, &AsaOptions::default(), &mut cache)
        .unwrap();
    lm.loss(&mut cache, &targets, None).unwrap();
    let mut grads = store0.zeros_like();
    lm.backward(&store0, &mut cache, &AsaOptions::default(), &mut grads);
    let want_norm: f64 = grads
        .data
        .iter()
        .zip(&frozen)
        .filter(|(_, &f)| !f)
        .flat_map(|(g, _)| g.iter())
        .map(|&x| x as f64 * x as f64)
        .sum::<f64>()
        .sqrt();
    for s in 0..3 {
        let (lc, nc) = cpu.step(batch, acfg.lr, Some(0.5)).unwrap();
        let (lg, ng) = gpu.step(batch, acfg.lr, Some(0.5)).unwrap();
        assert!((lc - lg).abs() < 1e-5, "step {s} loss {lg} vs {lc}");
        assert!(
            (nc - ng).abs() < 1e-4 * nc.max(1.0),
            "step {s} norm {ng} vs {nc}"
        );
        if s == 0 {
            assert!(
                (nc - want_norm).abs() < 1e-6 * want_norm.max(1.0),
                "{nc} vs {want_norm}"
            );
        }
    }
    let pc = cpu.params().unwrap().clone();
    let pg = gpu.params().unwrap().clone();
    close_params("frozen fine-tune", &pg, &pc, 1e-3);
    for (i, name) in store0.names.iter().enumerate() {
        if frozen[i] {
            assert_eq!(pc.data[i], store0.data[i], "cpu moved frozen {name}");
            assert_eq!(pg.data[i], store0.data[i], "gpu moved frozen {name}");
        } else {
            assert_ne!(pc.data[i], store0.data[i], "cpu left {name} untrained");
        }
    }
}

/// Recurrent decoding on the GPU backend equals the CPU decoder at every position (and so the
/// full forward): write chunks of 1, one the text crosses and one longer than it, refine and
/// content read on and off, baseline and online, the other features in two more models.
pub fn gpu_decoding_matches_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    use asa::backend::cuda::decode::GpuDecoder;
    use asa::model::decode::Decoder;
    let t = 13;
    let mut cases = Vec::new();
    for (variant, chunk, refine, content) in [
        (Variant::Baseline, 1, true, true),
        (Variant::Baseline, 4, true, false),
        (Variant::Online, 4, false, true),
        (Variant::Baseline, 64, true, true),
    ] {
        let mut c = small_cfg(variant);
        c.write_chunk_size = chunk;
        c.use_slotspace_refine = refine;
        c.use_content_read = content;
        cases.push(c);
    }
    let mut c = small_cfg(Variant::Baseline);
    c.normalize_k = true;
    c.slotspace_signed_weights = false;
    c.use_rope_slotspace = false;
    c.write_temperature = 0.7;
    c.read_temperature = 1.4;
    cases.push(c);
    let mut c = small_cfg(Variant::Online);
    c.use_rope_keys = false;
    c.use_alibi_write = false;
    c.use_abs_pos = true;
    c.tie_weights = false;
    c.write_chunk_size = 3;
    cases.push(c);
    // odd head_dim and slotspace_dim (no RoPE anywhere)
    let mut c = small_cfg(Variant::Baseline);
    c.use_rope_keys = false;
    c.use_rope_slotspace = false;
    c.embed_dim = 45;
    c.num_heads = 3;
    c.slotspace_dim = 5;
    cases.push(c);
    for (ci, cfg) in cases.iter().enumerate() {
        let (lm, mut p) = Lm::new(cfg).unwrap();
        let mut r = rng(30 + ci as u64);
        for w in p.data.iter_mut() {
            for x in w.iter_mut() {
                *x += r.gen_range(-0.25f32..0.25);
            }
        }
        let ids: Vec<u32> = (0..t)
            .map(|_| r.gen_range(0..cfg.vocab_size as u32))
            .collect();
        let mut cpu = Decoder::new(&lm).unwrap();
        let mut gpu = GpuDecoder::with_backend(mk(), cfg, &p).unwrap();
        assert_eq!(gpu.state_len(), cpu.state_len());
        let mut want = vec![0.0; cfg.vocab_size];
        for (i, &id) in ids.iter().enumerate() {
            cpu.step(&lm, &p, id, &mut want).unwrap();
            let got = gpu.step(id).unwrap().to_vec();
            close(&format!("case {ci} position {i}"), &got, &want, TOL);
        }
        // reset starts over
        gpu.reset().unwrap();
        let first = gpu.step(ids[0]).unwrap().to_vec();
        let mut cpu = Decoder::new(&lm).unwrap();
        cpu.step(&lm, &p, ids[0], &mut want).unwrap();
        close(&format!("case {ci} after reset"), &first, &want, TOL);
        assert!(gpu.step(cfg.vocab_size as u32).is_err());
    }
}

/// Routing noise on the GPU: an eval-mode forward with Gumbel or Gaussian noise (with a slot mask
/// and a routing mode beside it) gives the CPU model's logits and loss when both generators have
/// the same seed: the noise is drawn on the host by the CPU twin's `RoutingNoise::draw`.
pub fn noisy_forward_matches_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    use asa::model::layer::RoutingNoise;
    let cfg = small_cfg(Variant::Baseline);
    let (_lm, store) = Lm::new(&cfg).unwrap();
    let (b, t) = (2, 11);
    let v = cfg.vocab_size;
    let inputs: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % v) as u32).collect();
    let targets: Vec<i64> = inputs
        .iter()
        .map(|&x| ((x as usize + 5) % v) as i64)
        .collect();
    let cases = [
        (RoutingNoise::Gumbel(0.7), RoutingMode::Softmax, None),
        (RoutingNoise::Gaussian(1.3), RoutingMode::TopK(2), None),
        (
            RoutingNoise::Gumbel(0.4),
            RoutingMode::Softmax,
            Some(SlotMask::new(&[1.0, 0.0, 1.0, 1.0, 0.0, 1.0], "read", "all").unwrap()),
        ),
    ];
    for (noise, routing, slot_mask) in cases {
        let tag = format!("{noise:?} {routing:?} mask {}", slot_mask.is_some());
        let opts = AsaOptions {
            noise: Some(noise),
            routing,
            slot_mask,
            ..Default::default()
        };
        let (mut lm, _) = Lm::new(&cfg).unwrap();
        lm.reseed(42);
        let mut cache = LmCache::default();
        lm.forward(&store, &inputs, b, t, &opts, &mut cache)
            .unwrap();
        let cpu_logits = cache.logits.clone();
        let cpu_loss = lm.loss(&mut cache, &targets, None).unwrap();
        let mut gl = GpuLm::with_backend(mk(), &cfg, &store, Precision::F32).unwrap();
        gl.reseed(42);
        let g = gl.forward_logits_opts(&inputs, b, t, &opts).unwrap();
        close(&format!("noisy logits {tag}"), &g, &cpu_logits, TOL);
        gl.reseed(42);
        let gloss = gl.eval_loss_opts(&inputs, &targets, b, t, &opts).unwrap();
        assert!(
            (gloss - cpu_loss).abs() < 1e-5,
            "noisy loss {gloss} vs {cpu_loss} {tag}"
        );
        // the noise matters: without it the logits differ
        let plain = gl
            .forward_logits_opts(
                &inputs,
                b,
                t,
                &AsaOptions {
                    noise: None,
                    ..opts.clone()
                },
            )
            .unwrap();
        let diff = plain
            .iter()
            .zip(&g)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff > 1e-3, "noise changed nothing ({diff}) {tag}");
    }
    // training forwards refuse it, clearly
    let mut gl = GpuLm::with_backend(mk(), &cfg, &store, Precision::F32).unwrap();
    let e = gl
        .forward_logits_opts(
            &inputs,
            b,
            t,
            &AsaOptions {
                noise: Some(RoutingNoise::Gumbel(1.0)),
                training: true,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("eval-mode"), "{e}");
}

/// The info tensors on the GPU (`GpuLm::forward_infos`): every layer's dict has the CPU model's
/// keys and shapes, and its values within f32 tolerance, for the baseline (with routing noise
/// and top-k routing too), intervene and online variants.
pub fn gpu_infos_match_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    use asa::model::layer::RoutingNoise;
    let (b, t) = (2, 13);
    let mut cases: Vec<(
        String,
        ModelConfig,
        AsaOptions,
        Option<asa::model::layer::Intervention>,
    )> = Vec::new();
    let base = small_cfg(Variant::Baseline);
    cases.push(("baseline".into(), base.clone(), AsaOptions::default(), None));
    cases.push((
        "baseline, noise + top-2".into(),
        base.clone(),
        AsaOptions {
            noise: Some(RoutingNoise::Gaussian(0.8)),
            routing: RoutingMode::TopK(2),
            ..Default::default()
        },
        None,
    ));
    let intv = intervention_sweep(base.num_heads)[3].clone();
    cases.push((
        "intervene".into(),
        small_cfg(Variant::Intervene),
        AsaOptions::default(),
        Some(intv),
    ));
    cases.push((
        "online".into(),
        small_cfg(Variant::Online),
        AsaOptions::default(),
        None,
    ));
    for (tag, cfg, opts, intv) in cases {
        let (mut lm, store) = Lm::new(&cfg).unwrap();
        let v = cfg.vocab_size;
        let inputs: Vec<u32> = (0..b * t).map(|i| ((i * 11 + 2) % v) as u32).collect();
        if let Some(it) = &intv {
            lm.set_intervention(it);
        }
        let opts = AsaOptions {
            return_info: true,
            ..opts
        };
        lm.reseed(9);
        let mut cache = LmCache::default();
        let cpu = lm
            .forward(&store, &inputs, b, t, &opts, &mut cache)
            .unwrap()
            .unwrap();
        let mut gl = GpuLm::with_backend(mk(), &cfg, &store, Precision::F32).unwrap();
        if let Some(it) = &intv {
            gl.set_intervention(it);
        }
        gl.reseed(9);
        let (logits, gpu) = gl.forward_infos(&inputs, b, t, &opts).unwrap();
        close(&format!("{tag}: logits"), &logits, &cache.logits, TOL);
        assert_eq!(gpu.len(), cpu.len(), "{tag}: layers");
        for (l, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let gk: Vec<&String> = g.keys().collect();
            let ck: Vec<&String> = c.keys().collect();
            assert_eq!(gk, ck, "{tag}: layer {l} keys");
            for (key, (shape, want)) in c {
                let (gshape, got) = &g[key];
                assert_eq!(gshape, shape, "{tag}: layer {l} {key} shape");
                close(&format!("{tag}: layer {l} {key}"), got, want, TOL);
            }
        }
    }
}
