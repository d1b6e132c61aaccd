//! Criterion benches: one ASA layer forward+backward and one full training step, CPU reference
//! vs CUDA, throughput in tokens (B*T per iteration). CPU at T = 256, 1024; CUDA at T = 256,
//! 1024, 4096 (the CUDA groups are skipped, with a note, when no GPU is usable).
//!
//! CUDA ids: `cuda` runs the fused write scan + read (`backend::cuda::fused`, the default),
//! `cuda_unfused` the op-by-op chain (`set_fused(false)`, as `ASA_CUDA_FUSED=0`), `cuda_bf16`
//! the fused path with bf16 GEMM inputs. `fused_scan_forward` times the scan + read kernels
//! alone (no layer around them) and prints a memory-bandwidth roofline next to the measured
//! time: the bytes the fused forward must move (read wl, v, q, slot keys; write out1, rw and
//! the small statistics) over the HBM bandwidth (H100 SXM HBM3 3.35e12 B/s; H200 4.8e12 B/s).
//! `linear_attn_fwd_bwd` times the slotspace linear attention alone: the serial walk over T
//! against the chunked walk.
//!
//! Criterion settings are short (10 samples, 0.5 s warm-up, 2 s measurement) so that the
//! whole run fits the GPU check's budget.
//!
//! `cargo bench --bench asa` runs everything; on a GPU machine without Rust the prebuilt bench
//! binary runs the same way (`scripts/gpu_check.sh`: `asa-bench --bench cuda`). The CUDA layer
//! numbers include uploading x/dout and downloading out/dx/grads each iteration (a few MB).
//!
//! Model: embed 256, 4 heads (d 64), 32 slots, slotspace 64, write chunk 128, vocab 8192,
//! 2 layers for the step; batch 1.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use asa::backend::cpu::slot_ops::{ReadMask, SlotDims};
use asa::backend::cuda::fused::{self, FusedPlan, FusedWs, FwdIo};
use asa::backend::cuda::linear::{tiled_smem, LinearAlgo};
use asa::backend::cuda::ops::{DevRouting, DevSlotMask, Learned};
use asa::backend::cuda::{
    self, layer::GpuLayerRunner, AsDv, CudaBackend, Device, Dv, GpuLm, Ops, Precision,
};
use asa::config::ModelConfig;
use asa::model::layer::{AsaCache, AsaLayer, AsaOptions};
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
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
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
        for (name, fused_on) in [("cuda", true), ("cuda_unfused", false)] {
            let mut run =
                GpuLayerRunner::new(&c, ids.clone(), &store, Precision::F32).expect("GPU layer");
            run.set_fused(fused_on);
            for t in [256usize, 1024, 4096] {
                let x = data(b * t * c.embed_dim, 2.0, 1);
                let dout = data(b * t * c.embed_dim, 1.0, 2);
                let opts = AsaOptions::default();
                g.throughput(Throughput::Elements((b * t) as u64));
                g.bench_with_input(BenchmarkId::new(name, t), &t, |bn, &t| {
                    bn.iter(|| {
                        run.forward(&x, b, t, &opts).unwrap();
                        run.backward(&dout).unwrap()
                    })
                });
            }
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
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
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
                lm.backward(&store, &mut cache, &opts, &mut grads);
                clip_grad_norm(&mut grads, 1.0);
                adam.step(&mut store, &grads, acfg.lr);
                loss
            })
        });
    }
    if cuda::cuda_available() {
        for (prec, name, fused_on) in [
            (Precision::F32, "cuda", true),
            (Precision::F32, "cuda_unfused", false),
            (Precision::Bf16, "cuda_bf16", true),
        ] {
            let mut gl = GpuLm::new(&c, &store0, prec).expect("GPU model");
            gl.set_fused(fused_on);
            for t in [256usize, 1024, 4096] {
                let (ids, tg) = tokens(b * t, c.vocab_size);
                g.throughput(Throughput::Elements((b * t) as u64));
                g.bench_with_input(BenchmarkId::new(name, t), &t, |bn, &t| {
                    bn.iter(|| {
                        gl.train_step(&ids, &tg, b, t, b, acfg.lr, &acfg, Some(1.0), true)
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

/// H100 SXM HBM3 and H200 HBM3e bandwidths (bytes/s) for the roofline estimate.
const HBM_H100: f64 = 3.35e12;
const HBM_H200: f64 = 4.8e12;

/// The write scan + read alone on the GPU (the bench model's layer shape: B 1, H 4, K 32, d 64,
/// write chunk 128, softmax routing, content read): `cuda` = the fused kernels, `cuda_unfused` =
/// slot_scan_forward + read_logits_forward + read_weights_forward + slot_mix_forward. Prints
/// the roofline lower bound of the fused forward next to its measured time.
fn bench_scan_forward(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("fused_scan_forward");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
    if !cuda::cuda_available() {
        println!("fused_scan_forward/cuda: skipped (no CUDA device)");
        g.finish();
        return;
    }
    let be = CudaBackend::new(0).expect("CUDA backend");
    let c = cfg();
    let (b, h, nk, d, chunk) = (
        1usize,
        c.num_heads,
        c.num_slots,
        c.head_dim(),
        c.write_chunk_size,
    );
    for t in [256usize, 1024, 4096] {
        let dm = SlotDims { b, h, t, k: nk, d };
        let nbh = b * h;
        let up = |x: &[f32]| be.upload(x).expect("upload");
        let wl = up(&data(nbh * nk * t, 4.0, 3));
        let v = up(&data(nbh * t * d, 2.0, 4));
        let q = up(&data(nbh * t * d, 2.0, 5));
        let keys = up(&data(h * nk * d, 1.0, 6));
        let out1 = be.zeros::<f32>(nbh * t * d).unwrap();
        let rw = be.zeros::<f32>(nbh * t * nk).unwrap();
        let keep = be.upload(&vec![1i32; nk]).unwrap();
        let mask = Some(DevSlotMask {
            keep: keep.dv(),
            last_pos_only: false,
            mode: ReadMask::Read,
        });
        let plan = FusedPlan::new(
            dm,
            chunk,
            FusedPlan::auto_tile(nbh, t, be.sm_count.max(1) as usize),
        )
        .expect("fused plan");
        let (n64, n32) = plan.ws_len();
        let b64 = be.zeros::<f64>(n64).unwrap();
        let b32 = be.zeros::<f32>(n32).unwrap();
        let ws = FusedWs::carve(&plan, b64.dv(), b32.dv());
        let io = FwdIo {
            out1: out1.dv(),
            rw: rw.dv(),
            rw16: Dv::null(),
            lkey: Dv::null(),
            lcont: Dv::null(),
            logits: Dv::null(),
            wl: wl.dv(),
            v: v.dv(),
            q: q.dv(),
            keys: keys.dv(),
            gamma: Learned::value(0.5),
            rtemp: 1.0,
            mask,
            content: true,
        };
        // roofline: measured time per call next to the bandwidth lower bound
        let run = || fused::forward(&be, &plan, &ws, &io).unwrap();
        run();
        be.sync().unwrap();
        let reps = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            run();
        }
        be.sync().unwrap();
        let measured = t0.elapsed().as_secs_f64() / reps as f64;
        let bytes = plan.forward_min_bytes() as f64;
        println!(
            "fused_scan_forward roofline T={t} (B{b} H{h} K{nk} d{d} chunk {chunk}, tile {} x {} tiles): \
             {:.2} MB must move -> >= {:.1} us on H100 ({:.2e} B/s), >= {:.1} us on H200 ({:.1e} B/s); \
             measured {:.1} us on {} ({:.0}% of the H100 bound)",
            plan.tile,
            plan.ntiles,
            bytes / 1e6,
            bytes / HBM_H100 * 1e6,
            HBM_H100,
            bytes / HBM_H200 * 1e6,
            HBM_H200,
            measured * 1e6,
            be.device_name,
            100.0 * (bytes / HBM_H100) / measured
        );
        g.throughput(Throughput::Elements((b * t) as u64));
        g.bench_with_input(BenchmarkId::new("cuda", t), &t, |bn, _| {
            bn.iter(|| {
                run();
                be.sync().unwrap()
            })
        });
        // the op-by-op chain (state history [B,H,T,K,d] in global memory)
        let state = be.zeros::<f32>(nbh * t * nk * d).unwrap();
        let den = be.zeros::<f32>(nbh * nk * t).unwrap();
        let rmax = be.zeros::<f32>(nbh * nk * t).unwrap();
        let lkey = be.zeros::<f32>(nbh * t * nk).unwrap();
        let lcont = be.zeros::<f32>(nbh * t * nk).unwrap();
        let logits = be.zeros::<f32>(nbh * t * nk).unwrap();
        g.bench_with_input(BenchmarkId::new("cuda_unfused", t), &t, |bn, _| {
            bn.iter(|| {
                be.slot_scan_forward(state.dv(), den.dv(), rmax.dv(), wl.dv(), v.dv(), chunk, dm)
                    .unwrap();
                be.read_logits_forward(
                    lkey.dv(),
                    lcont.dv(),
                    logits.dv(),
                    q.dv(),
                    keys.dv(),
                    state.dv(),
                    0.5,
                    mask,
                    dm,
                )
                .unwrap();
                be.read_weights_forward(
                    rw.dv(),
                    logits.dv(),
                    DevRouting::Softmax,
                    1.0,
                    Some((keep.dv(), false)),
                    dm,
                )
                .unwrap();
                be.slot_mix_forward(out1.dv(), rw.dv(), state.dv(), dm)
                    .unwrap();
                be.sync().unwrap()
            })
        });
    }
    g.finish();
}

/// The slotspace linear attention alone on the GPU, forward + backward: `walk_serial` = one
/// warp walk over T, `walk_chunked` = warps walking chunks of 64 positions, `tiled_<c>` = the
/// shared-memory tiles with chunks of c positions (64: the default where it fits). Shapes: the bench model's (B*H = 4 rows, M 64) at T = 1024,
/// 4096, and the practice run's (B*H = 64, M 64, T 1024).
fn bench_linear_attention(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("linear_attn_fwd_bwd");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
    if !cuda::cuda_available() {
        println!("linear_attn_fwd_bwd/cuda: skipped (no CUDA device)");
        g.finish();
        return;
    }
    let be = CudaBackend::new(0).expect("CUDA backend");
    for (n, t, m) in [(4usize, 1024usize, 64usize), (4, 4096, 64), (64, 1024, 64)] {
        let len = n * t * m;
        let up = |x: &[f32]| be.upload(x).expect("upload");
        // phi features are positive
        let pos: Vec<f32> = data(len, 1.0, 7).iter().map(|x| x.abs() + 0.05).collect();
        let (qf, kf) = (
            up(&pos),
            up(&pos[..].iter().rev().copied().collect::<Vec<_>>()),
        );
        let (v, dout) = (up(&data(len, 1.0, 8)), up(&data(len, 1.0, 9)));
        let out = be.zeros::<f32>(len).unwrap();
        let den = be.zeros::<f32>(n * t).unwrap();
        let (dq, dk, dv) = (
            be.zeros::<f32>(len).unwrap(),
            be.zeros::<f32>(len).unwrap(),
            be.zeros::<f32>(len).unwrap(),
        );
        g.throughput(Throughput::Elements((n * t) as u64));
        let mut algos = vec![
            ("cuda_walk_serial", LinearAlgo::Walk { chunk: t }),
            ("cuda_walk_chunked", LinearAlgo::Walk { chunk: 64 }),
        ];
        for (id, chunk) in [
            ("cuda_tiled_64", 64),
            ("cuda_tiled_32", 32),
            ("cuda_tiled_16", 16),
        ] {
            if tiled_smem(chunk, m, false) <= be.max_smem {
                algos.push((id, LinearAlgo::Tiled { chunk }));
            }
        }
        for (id, algo) in algos {
            let label = format!("n{n}_t{t}");
            // the forward keeps its carries for the backward, as the model does
            let nc = be.linear_attn_carries(n, t, m, Some(algo)).unwrap();
            let kept = Device::temp::<f64>(&be, nc).unwrap();
            g.bench_with_input(BenchmarkId::new(id, &label), &algo, |bn, &algo| {
                bn.iter(|| {
                    be.linear_attn_forward(
                        out.dv(),
                        den.dv(),
                        qf.dv(),
                        kf.dv(),
                        v.dv(),
                        t,
                        m,
                        Some(algo),
                        kept.dv(),
                        Dv::null(),
                    )
                    .unwrap();
                    be.linear_attn_backward(
                        dq.dv(),
                        dk.dv(),
                        dv.dv(),
                        dout.dv(),
                        out.dv(),
                        den.dv(),
                        qf.dv(),
                        kf.dv(),
                        v.dv(),
                        t,
                        m,
                        Some(algo),
                        kept.dv(),
                    )
                    .unwrap();
                    be.sync().unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_layer, bench_train_step, bench_scan_forward, bench_linear_attention
}
criterion_main!(benches);
