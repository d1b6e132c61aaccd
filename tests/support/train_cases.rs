//! Training-step tests of the GPU model (tests/cuda_train.rs), for any [`Backend`] so that they
//! also run in the SIMT emulator (tests/cuda_emu.rs).

#![allow(dead_code)]

use asa::backend::cuda::{Backend, GpuLm, Precision};
use asa::config::ModelConfig;
use asa::model::layer::AsaOptions;
use asa::model::lm::{Lm, LmCache};
use asa::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 512,
        max_seq_len: 64,
        embed_dim: 64,
        num_layers: 2,
        num_heads: 4,
        num_slots: 8,
        slotspace_dim: 8,
        write_chunk_size: 16,
        slotspace_chunk_size: 16,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        seed: 21,
        ..Default::default()
    }
}

/// The optimizer of both runs.
pub fn adam_cfg() -> AdamWConfig {
    AdamWConfig {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

/// Batches of a learnable toy stream (a repeating pattern with noise), shared by both runs.
pub fn batches(n: usize, b: usize, t: usize, v: usize) -> Vec<(Vec<u32>, Vec<i64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    (0..n)
        .map(|_| {
            let mut inp = Vec::with_capacity(b * t);
            let mut tgt = Vec::with_capacity(b * t);
            for _ in 0..b {
                let start = rng.gen_range(0..v as u32);
                let row: Vec<u32> = (0..=t as u32)
                    .map(|i| (start + 7 * i + if rng.gen_bool(0.1) { 3 } else { 0 }) % v as u32)
                    .collect();
                inp.extend_from_slice(&row[..t]);
                tgt.extend(row[1..].iter().map(|&x| x as i64));
            }
            (inp, tgt)
        })
        .collect()
}

/// Gradient accumulation on the GPU: a batch of 4 rows run as 2 micro-batches of 2 takes the
/// same optimizer steps as the batch run whole (equal target counts, no dropout), and as the
/// CPU trainer's accumulation.
pub fn accumulation_matches_whole_batch_and_cpu<B: Backend>(mk: &dyn Fn() -> B) {
    let c = cfg();
    let (b, t, micro) = (4, 32, 2);
    let data = batches(5, b, t, c.vocab_size);
    let adam_cfg = adam_cfg();
    let (mut lm, params0) = Lm::new(&c).unwrap();
    let mut whole = GpuLm::with_backend(mk(), &c, &params0, Precision::F32).unwrap();
    let mut accum = GpuLm::with_backend(mk(), &c, &params0, Precision::F32).unwrap();
    // CPU accumulation, as the trainer runs it
    let mut params = params0.clone();
    let mut adam = AdamW::new(adam_cfg, &params);
    let mut cache = LmCache::default();
    let opts = AsaOptions::default();
    for (inp, tgt) in &data {
        let mut grads = params.zeros_like();
        let mut cpu_loss = 0.0;
        for k in 0..b / micro {
            let rows = k * micro * t..(k + 1) * micro * t;
            lm.forward(&params, &inp[rows.clone()], micro, t, &opts, &mut cache)
                .unwrap();
            cpu_loss += lm.loss(&mut cache, &tgt[rows], None).unwrap() / (b / micro) as f64;
            lm.backward(&params, &mut cache, &opts, &mut grads);
        }
        let inv = 1.0 / (b / micro) as f32;
        grads.data.iter_mut().flatten().for_each(|g| *g *= inv);
        clip_grad_norm(&mut grads, 1.0);
        adam.step(&mut params, &grads, adam_cfg.lr);

        let (lw, nw) = whole
            .train_step(inp, tgt, b, t, b, adam_cfg.lr, &adam_cfg, Some(1.0), false)
            .unwrap();
        let (la, na) = accum
            .train_step(
                inp,
                tgt,
                b,
                t,
                micro,
                adam_cfg.lr,
                &adam_cfg,
                Some(1.0),
                false,
            )
            .unwrap();
        assert!(
            (lw - la).abs() < 1e-5 * lw.abs(),
            "loss whole {lw} vs accumulated {la}"
        );
        assert!(
            (nw - na).abs() < 1e-4 * nw.abs(),
            "norm whole {nw} vs accumulated {na}"
        );
        assert!(
            (cpu_loss - la).abs() < 1e-5 * la.abs(),
            "loss cpu {cpu_loss} vs gpu {la}"
        );
    }
    let (pw, pa) = (
        whole.download_params().unwrap(),
        accum.download_params().unwrap(),
    );
    let worst = |x: &asa::model::params::ParamStore, y: &asa::model::params::ParamStore| {
        x.data
            .iter()
            .flatten()
            .zip(y.data.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let (d_whole, d_cpu) = (worst(&pw, &pa), worst(&params, &pa));
    println!("accumulation: max |whole - accumulated| {d_whole:.2e}, max |cpu - gpu| {d_cpu:.2e}");
    assert!(
        d_whole < 1e-4,
        "accumulated weights leave the whole-batch ones: {d_whole}"
    );
    assert!(d_cpu < 1e-4, "GPU accumulation leaves the CPU's: {d_cpu}");
    // a batch that does not split is an error, not a panic
    assert!(accum
        .train_step(&data[0].0, &data[0].1, b, t, 3, 1e-3, &adam_cfg, None, false)
        .is_err());
}

/// A step whose loss is not finite changes nothing (as the CPU trainer): AdamW sees the loss
/// and the gradient norm on the device and skips itself, and the step count is taken back, so
/// the next finite step is AdamW's first.
pub fn non_finite_step_changes_nothing<B: Backend>(mk: &dyn Fn() -> B) {
    let c = cfg();
    let (b, t) = (2, 16);
    let data = batches(2, b, t, c.vocab_size);
    let adam = adam_cfg();
    let (_, params0) = Lm::new(&c).unwrap();
    // a NaN in the final LayerNorm's bias: every logit, so the loss, is NaN
    let mut bad = params0.clone();
    let i = bad.names.iter().position(|n| n == "ln_f.bias").unwrap();
    bad.data[i][0] = f32::NAN;
    let mut gpu = GpuLm::with_backend(mk(), &c, &bad, Precision::F32).unwrap();
    let (loss, _) = gpu
        .train_step(
            &data[0].0,
            &data[0].1,
            b,
            t,
            b,
            adam.lr,
            &adam,
            Some(1.0),
            false,
        )
        .unwrap();
    assert!(!loss.is_finite(), "loss {loss}");
    let after = gpu.download_params().unwrap();
    let bits = |p: &asa::model::params::ParamStore| -> Vec<u32> {
        p.data.iter().flatten().map(|x| x.to_bits()).collect()
    };
    assert_eq!(bits(&after), bits(&bad), "a NaN step changed the weights");
    if let Some((_, _, step)) = gpu.adam_state().unwrap() {
        assert_eq!(step, 0, "a skipped step was counted");
    }
    // the same after a finite step: one AdamW step from the start
    let mut good = GpuLm::with_backend(mk(), &c, &params0, Precision::F32).unwrap();
    good.train_step(
        &data[1].0,
        &data[1].1,
        b,
        t,
        b,
        adam.lr,
        &adam,
        Some(1.0),
        false,
    )
    .unwrap();
    let (_, _, step) = good
        .adam_state()
        .unwrap()
        .expect("AdamW state after a step");
    assert_eq!(step, 1);
}

/// CUDA graphs: a model that captures its training step and replays it takes bit for bit the
/// steps of one that runs every step eagerly, with the dropouts and slot dropout on, the
/// learning rate moving and the learned scalars moving (each step's draws and scalars are read
/// from its own upload). A step with another target count (the loss scale is an argument) or
/// another shape differs from the graph: it runs eagerly, the graph is dropped and the next
/// step captures again.
pub fn graph_replay_matches_eager<B: Backend>(mk: &dyn Fn() -> B) {
    let c = ModelConfig {
        dropout: 0.1,
        slot_dropout: 0.2,
        slotspace_dropout: 0.1,
        ..cfg()
    };
    let (b, t) = (2, 16);
    let data = batches(9, b, t, c.vocab_size);
    let short = batches(1, b, 8, c.vocab_size);
    let adam = adam_cfg();
    let (_, params0) = Lm::new(&c).unwrap();
    let mut eager = GpuLm::with_backend(mk(), &c, &params0, Precision::F32).unwrap();
    eager.set_graphs(false);
    let mut graphed = GpuLm::with_backend(mk(), &c, &params0, Precision::F32).unwrap();
    graphed.set_graphs(true);
    let bits = |p: &asa::model::params::ParamStore| -> Vec<u32> {
        p.data.iter().flatten().map(|x| x.to_bits()).collect()
    };
    let step = |lm: &mut GpuLm<B>, inp: &[u32], tgt: &[i64], t: usize, lr: f64| {
        lm.train_step(inp, tgt, b, t, b, lr, &adam, Some(1.0), true)
            .unwrap()
    };
    for (i, (inp, tgt)) in data.iter().enumerate() {
        let mut tgt = tgt.clone();
        if i == 4 {
            tgt[3] = -100; // one target fewer: another loss scale
        }
        let lr = adam.lr * (1.0 + 0.25 * i as f64);
        let want = step(&mut eager, inp, &tgt, t, lr);
        let got = step(&mut graphed, inp, &tgt, t, lr);
        assert_eq!(
            (got.0.to_bits(), got.1.to_bits()),
            (want.0.to_bits(), want.1.to_bits()),
            "step {i}: (loss, norm) {got:?} vs {want:?}"
        );
    }
    // another shape, then this one again
    for (inp, tgt, t) in [(&short[0].0, &short[0].1, 8), (&data[0].0, &data[0].1, t)] {
        let want = step(&mut eager, inp, tgt, t, adam.lr);
        let got = step(&mut graphed, inp, tgt, t, adam.lr);
        assert_eq!(
            (got.0.to_bits(), got.1.to_bits()),
            (want.0.to_bits(), want.1.to_bits())
        );
    }
    let (pe, pg) = (
        eager.download_params().unwrap(),
        graphed.download_params().unwrap(),
    );
    assert!(
        bits(&pe) == bits(&pg),
        "the parameters differ after the steps"
    );
    let (se, sg) = (eager.graph_stats(), graphed.graph_stats());
    assert_eq!((se.captures, se.replays), (0, 0), "graphs off: {se:?}");
    assert_eq!(se.eager, 11);
    // steps 0 eager, 1 captured, 2-3 replayed, 4 differs (eager), 5 captured, 6-8 replayed,
    // the short step differs (eager); the last one captures or (a buffer of its shape to
    // allocate again) runs eagerly
    assert!(sg.captures == 2 || sg.captures == 3, "{sg:?}");
    assert_eq!(sg.replays, 5, "{sg:?}");
    assert!(sg.dropped == 2 || sg.dropped == 3, "{sg:?}");
    assert_eq!(sg.eager + sg.captures + sg.replays, 11, "{sg:?}");
    assert!(sg.nodes > 100, "{sg:?}");
}
