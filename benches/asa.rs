//! Criterion benches: one ASA layer forward+backward and one full training step, CPU reference
//! vs CUDA, throughput in tokens (B*T per iteration). CPU at T = 256, 1024; CUDA at T = 256,
//! 1024, 4096 (the CUDA groups are skipped, with a note, when no GPU is usable).
//!
//! `cargo bench --bench asa` runs everything; on a GPU machine without Rust the prebuilt bench
//! binary runs the same way (`scripts/gpu_check.sh`: `asa-bench --bench cuda`). The CUDA layer
//! numbers include uploading x/dout and downloading out/dx/grads each iteration (a few MB).
//!
//! Model: embed 256, 4 heads (d 64), 32 slots, slotspace 64, write chunk 128, vocab 8192,
//! 2 layers for the step; batch 1.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use asa::backend::cuda::{self, model::GpuLayerRunner, GpuLm, Precision};
use asa::config::ModelConfig;
use asa::model::asa::{AsaCache, AsaLayer, AsaOptions};
use asa::model::lm::{Lm, LmCache};
use asa::model::params::{AsaIds, Init, ParamStore};
use asa::optim::{clip_grad_norm, AdamW, AdamWConfig};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 8192,
        max_seq_len: 4096,
        embed_dim: 256,
        num_layers: 2,
        num_heads: 4,
        num_slots: 32,
        slotspace_dim: 64,
        write_chunk_size: 128,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        ..Default::default()
    }
}

fn data(n: usize, scale: f32, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0
                - 0.5)
                * scale
        })
        .collect()
}

fn layer_store(c: &ModelConfig) -> (ParamStore, AsaIds) {
    let mut store = ParamStore::new();
    let ids = AsaIds::register(&mut store, "", c, &mut Init::new(1));
    (store, ids)
}

fn bench_layer(cr: &mut Criterion) {
    let c = cfg();
    let (store, ids) = layer_store(&c);
    let b = 1;
    let mut g = cr.benchmark_group("asa_layer_fwd_bwd");
    g.sample_size(10);
    for t in [256usize, 1024] {
        let x = data(b * t * c.embed_dim, 2.0, 1);
        let dout = data(b * t * c.embed_dim, 1.0, 2);
        let opts = AsaOptions::default();
        let mut layer = AsaLayer::new(&c, ids.clone());
        let mut cache = AsaCache::default();
        let mut out = vec![0.0; x.len()];
        let mut rng = rand::SeedableRng::seed_from_u64(0);
        g.throughput(Throughput::Elements((b * t) as u64));
        g.bench_with_input(BenchmarkId::new("cpu", t), &t, |bn, &t| {
            bn.iter(|| {
                layer
                    .forward(&store, &x, b, t, &opts, &mut cache, &mut rng, &mut out)
                    .unwrap();
                let mut dx = vec![0.0; x.len()];
                layer.backward(&store, &cache, &opts, &dout, &mut dx)
            })
        });
    }
    if cuda::cuda_available() {
        let mut run =
            GpuLayerRunner::new(&c, ids.clone(), &store, Precision::F32).expect("GPU layer");
        for t in [256usize, 1024, 4096] {
            let x = data(b * t * c.embed_dim, 2.0, 1);
            let dout = data(b * t * c.embed_dim, 1.0, 2);
            let opts = AsaOptions::default();
            g.throughput(Throughput::Elements((b * t) as u64));
            g.bench_with_input(BenchmarkId::new("cuda", t), &t, |bn, &t| {
                bn.iter(|| {
                    run.forward(&x, b, t, &opts).unwrap();
                    run.backward(&dout).unwrap()
                })
            });
        }
    } else {
        println!("asa_layer_fwd_bwd/cuda: skipped (no CUDA device)");
    }
    g.finish();
}

fn tokens(n: usize, v: usize) -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % v) as u32).collect();
    let tg: Vec<i64> = ids
        .iter()
        .map(|&x| ((x as usize * 31 + 7) % v) as i64)
        .collect();
    (ids, tg)
}

fn bench_train_step(cr: &mut Criterion) {
    let c = cfg();
    let (_lm, store0) = Lm::new(&c).unwrap();
    let acfg = AdamWConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let b = 1;
    let mut g = cr.benchmark_group("train_step");
    g.sample_size(10);
    for t in [256usize, 1024] {
        let (ids, tg) = tokens(b * t, c.vocab_size);
        let (mut lm, _) = Lm::new(&c).unwrap();
        let mut store = store0.clone();
        let mut adam = AdamW::new(acfg, &store);
        let mut cache = LmCache::default();
        let opts = AsaOptions {
            training: true,
            ..Default::default()
        };
        g.throughput(Throughput::Elements((b * t) as u64));
        g.bench_with_input(BenchmarkId::new("cpu", t), &t, |bn, &t| {
            bn.iter(|| {
                lm.forward(&store, &ids, b, t, &opts, &mut cache).unwrap();
                let loss = lm.loss(&mut cache, &tg, None).unwrap();
                let mut grads = store.zeros_like();
                lm.backward(&store, &cache, &opts, &mut grads);
                clip_grad_norm(&mut grads, 1.0);
                adam.step(&mut store, &grads, acfg.lr);
                loss
            })
        });
    }
    if cuda::cuda_available() {
        for (prec, name) in [(Precision::F32, "cuda"), (Precision::Bf16, "cuda_bf16")] {
            let mut gl = GpuLm::new(&c, &store0, prec).expect("GPU model");
            for t in [256usize, 1024, 4096] {
                let (ids, tg) = tokens(b * t, c.vocab_size);
                g.throughput(Throughput::Elements((b * t) as u64));
                g.bench_with_input(BenchmarkId::new(name, t), &t, |bn, &t| {
                    bn.iter(|| {
                        gl.train_step(&ids, &tg, b, t, acfg.lr, &acfg, Some(1.0))
                            .unwrap()
                    })
                });
            }
        }
    } else {
        println!("train_step/cuda: skipped (no CUDA device)");
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = bench_layer, bench_train_step
}
criterion_main!(benches);
