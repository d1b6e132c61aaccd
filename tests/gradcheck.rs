//! Finite-difference gradient checks of the ASA layer and the whole LM on tiny configs, across
//! the feature toggles and variants. Loss = sum(out * r) for a fixed random r.

use asa::config::{ModelConfig, Variant};
use asa::model::layer::{
    AsaCache, AsaLayer, AsaOptions, Intervention, IntvMode, RoutingMode, ScoreKind, SlotMask,
    TauKind,
};
use asa::model::lm::{Lm, LmCache};
use asa::model::params::{AsaIds, Init, ParamStore};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny(variant: Variant) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        max_seq_len: 16,
        embed_dim: 8,
        num_layers: 2,
        num_heads: 2,
        num_slots: 3,
        mlp_ratio: 2.0,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        slotspace_dim: 4,
        write_chunk_size: 3,
        slotspace_chunk_size: 3,
        content_read_init: 0.5,
        slotspace_gate_init: 0.3,
        alibi_strength_init: 0.4,
        variant,
        seed: 3,
        ..Default::default()
    }
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

struct LayerCase {
    layer: AsaLayer,
    store: ParamStore,
    x: Vec<f32>,
    r: Vec<f32>,
    b: usize,
    t: usize,
}

impl LayerCase {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        let mut store = ParamStore::new();
        let ids = AsaIds::register(&mut store, "", cfg, &mut Init::new(11));
        // larger weights than the 0.02 init so every path carries signal
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (i, d) in store.data.iter_mut().enumerate() {
            if d.len() > 1 {
                *d = rand_vec(&mut rng, d.len(), 0.6);
            }
            let _ = i;
        }
        let c = cfg.embed_dim;
        let x = rand_vec(&mut rng, b * t * c, 1.0);
        let r = rand_vec(&mut rng, b * t * c, 1.0);
        LayerCase {
            layer: AsaLayer::new(cfg, ids),
            store,
            x,
            r,
            b,
            t,
        }
    }

    fn loss(&mut self, opts: &AsaOptions) -> f64 {
        let mut cache = AsaCache::default();
        let mut out = vec![0.0; self.x.len()];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        self.layer
            .forward(
                &self.store,
                &self.x,
                self.b,
                self.t,
                opts,
                &mut cache,
                &mut rng,
                &mut out,
            )
            .unwrap();
        out.iter()
            .zip(&self.r)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    }

    /// Max relative error of analytic vs numeric gradients over every parameter and x.
    fn check(&mut self, opts: &AsaOptions) -> f64 {
        let mut cache = AsaCache::default();
        let mut out = vec![0.0; self.x.len()];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        self.layer
            .forward(
                &self.store,
                &self.x,
                self.b,
                self.t,
                opts,
                &mut cache,
                &mut rng,
                &mut out,
            )
            .unwrap();
        let mut dx = vec![0.0; self.x.len()];
        let g = self
            .layer
            .backward(&self.store, &cache, opts, &self.r, &mut dx);
        let mut grads = self.store.zeros_like();
        g.accumulate_into(&mut grads, &self.layer.ids);
        let mut fd = FdStats::default();
        for pi in 0..self.store.len() {
            let n = self.store.data[pi].len();
            for j in (0..n).step_by((n / 7).max(1)) {
                let orig = self.store.data[pi][j];
                let num = central_diff(|e| {
                    self.store.data[pi][j] = orig + e;
                    let l = self.loss(opts);
                    self.store.data[pi][j] = orig;
                    l
                });
                let name = format!("{}[{j}]", self.store.names[pi]);
                fd.compare(&name, grads.data[pi][j] as f64, num);
            }
        }
        for j in (0..self.x.len()).step_by(5) {
            let orig = self.x[j];
            let num = central_diff(|e| {
                self.x[j] = orig + e;
                let l = self.loss(opts);
                self.x[j] = orig;
                l
            });
            fd.compare(&format!("x[{j}]"), dx[j] as f64, num);
        }
        fd.finish()
    }
}

const TOL: f64 = 2e-2;

/// Central differences at two step sizes; `None` when they disagree (a kink such as a top-k
/// switch or a running-max tie lies within the step), so the point says nothing about the
/// derivative.
fn central_diff(mut f: impl FnMut(f32) -> f64) -> Option<f64> {
    let d = |f: &mut dyn FnMut(f32) -> f64, e: f32| (f(e) - f(-e)) / (2.0 * e as f64);
    let n1 = d(&mut f, 4e-3);
    let n2 = d(&mut f, 2e-3);
    let scale = n1.abs().max(n2.abs()).max(0.05);
    ((n1 - n2).abs() <= 0.05 * scale).then_some(n1)
}

/// Worst relative error over the compared points (floor 0.05 absorbs f32 noise of the loss),
/// and how many points sat on a kink.
#[derive(Default)]
struct FdStats {
    worst: f64,
    points: usize,
    kinks: usize,
}

impl FdStats {
    fn compare(&mut self, name: &str, ana: f64, num: Option<f64>) {
        self.points += 1;
        let Some(num) = num else {
            self.kinks += 1;
            return;
        };
        let err = (ana - num).abs() / ana.abs().max(num.abs()).max(0.05);
        if err > TOL {
            eprintln!("{name}: analytic {ana:.6} numeric {num:.6}");
        }
        self.worst = self.worst.max(err);
    }

    fn finish(&self) -> f64 {
        assert!(
            self.kinks * 10 <= self.points,
            "{} of {} points on kinks",
            self.kinks,
            self.points
        );
        self.worst
    }
}

#[test]
fn layer_all_features_baseline() {
    let mut c = LayerCase::new(&tiny(Variant::Baseline), 2, 7);
    let w = c.check(&AsaOptions::default());
    assert!(w < TOL, "worst relative error {w}");
}

/// Training mode with every dropout on: each forward draws the same masks (the case reseeds its
/// rng), so the masks are constants of the loss and the gradients must match through them.
#[test]
fn layer_with_dropouts_in_training() {
    let mut cfg = tiny(Variant::Baseline);
    cfg.dropout = 0.3;
    cfg.slotspace_dropout = 0.3;
    cfg.slot_dropout = 0.3;
    let mut c = LayerCase::new(&cfg, 2, 7);
    let opts = AsaOptions {
        training: true,
        ..Default::default()
    };
    let w = c.check(&opts);
    assert!(w < TOL, "worst relative error {w}");
}

#[test]
fn layer_variants_normalize_temps_softmax_slotspace() {
    let mut cfg = tiny(Variant::Baseline);
    cfg.normalize_k = true;
    cfg.read_temperature = 0.7;
    cfg.write_temperature = 1.3;
    cfg.slotspace_signed_weights = false;
    cfg.use_rope_slotspace = false;
    cfg.learn_alibi_strength = false;
    cfg.write_chunk_size = 2;
    let mut c = LayerCase::new(&cfg, 2, 7);
    let w = c.check(&AsaOptions::default());
    assert!(w < TOL, "worst relative error {w}");
}

#[test]
fn layer_minimal_core_loop() {
    let mut cfg = tiny(Variant::Baseline);
    cfg.use_content_read = false;
    cfg.use_slotspace_refine = false;
    cfg.use_rope_keys = false;
    cfg.use_alibi_write = false;
    cfg.write_chunk_size = 16;
    let mut c = LayerCase::new(&cfg, 1, 6);
    let w = c.check(&AsaOptions::default());
    assert!(w < TOL, "worst relative error {w}");
}

#[test]
fn layer_online_with_padding_mask() {
    let mut c = LayerCase::new(&tiny(Variant::Online), 2, 7);
    let mut mask = vec![true; 14];
    mask[5] = false;
    mask[6] = false;
    mask[7] = false; // left pad of the second row
    let opts = AsaOptions {
        attention_mask: Some(mask),
        ..Default::default()
    };
    let w = c.check(&opts);
    assert!(w < TOL, "worst relative error {w}");
}

#[test]
fn layer_baseline_with_padding_mask() {
    let mut c = LayerCase::new(&tiny(Variant::Baseline), 2, 7);
    let mut mask = vec![true; 14];
    mask[6] = false;
    mask[7] = false;
    mask[8] = false;
    let opts = AsaOptions {
        attention_mask: Some(mask),
        ..Default::default()
    };
    let w = c.check(&opts);
    assert!(w < TOL, "worst relative error {w}");
}

#[test]
fn layer_routing_topk_and_slot_masks() {
    let mut c = LayerCase::new(&tiny(Variant::Baseline), 2, 7);
    for (mode, mask) in [
        (RoutingMode::TopK(2), None),
        (
            RoutingMode::Softmax,
            Some(SlotMask::new(&[1.0, 0.0, 1.0], "read", "all").unwrap()),
        ),
        (
            RoutingMode::Softmax,
            Some(SlotMask::new(&[1.0, 0.0, 1.0], "read", "last_pos_only").unwrap()),
        ),
        (
            RoutingMode::Softmax,
            Some(SlotMask::new(&[0.0, 1.0, 1.0], "content_read_only", "all").unwrap()),
        ),
        (
            RoutingMode::Softmax,
            Some(SlotMask::new(&[1.0, 1.0, 0.0], "slotspace_only", "all").unwrap()),
        ),
    ] {
        let opts = AsaOptions {
            routing: mode.clone(),
            slot_mask: mask,
            ..Default::default()
        };
        let w = c.check(&opts);
        assert!(w < TOL, "{mode:?}: worst relative error {w}");
    }
}

#[test]
fn layer_intervene_modes() {
    for (mode, score) in [
        (IntvMode::DeltaPar, ScoreKind::OrthFrac),
        (IntvMode::DeltaOrth, ScoreKind::OrthFrac),
        (IntvMode::OrthGate, ScoreKind::OrthFrac),
        (IntvMode::OrthGate, ScoreKind::OrthRatio),
        (IntvMode::OrthGate, ScoreKind::AlphaAbs),
        (IntvMode::OrthGate, ScoreKind::SlotPeaked),
    ] {
        let mut c = LayerCase::new(&tiny(Variant::Intervene), 2, 7);
        c.layer.intervention = Intervention {
            mode,
            score_kind: score,
            tau_kind: TauKind::Abs,
            tau: 0.3,
            soft_temp: 0.5,
            beta: 0.7,
            par_beta: 0.8,
            score_clip_pctl: None,
            head_mask: Some(vec![1.0, 0.5]),
            ..Default::default()
        };
        let w = c.check(&AsaOptions::default());
        assert!(w < TOL, "{mode:?}/{score:?}: worst relative error {w}");
    }
}

#[test]
fn lm_gradients_match_finite_differences() {
    let cfg = ModelConfig {
        use_abs_pos: true,
        tie_weights: false,
        ..tiny(Variant::Baseline)
    };
    lm_gradcheck(cfg, AsaOptions::default());
}

/// The language model in training mode with embedding, residual, MLP and slotspace dropout:
/// the model's rng is reseeded before every forward, so the masks are the same in each.
#[test]
fn lm_gradients_with_dropouts_in_training() {
    let cfg = ModelConfig {
        use_abs_pos: true,
        tie_weights: false,
        dropout: 0.1,
        slotspace_dropout: 0.1,
        ..tiny(Variant::Baseline)
    };
    let opts = AsaOptions {
        training: true,
        ..Default::default()
    };
    lm_gradcheck(cfg, opts);
}

fn lm_gradcheck(cfg: ModelConfig, opts: AsaOptions) {
    let (mut lm, mut store) = Lm::new(&cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for d in store.data.iter_mut() {
        if d.len() > 1 {
            let scale = 0.3;
            for x in d.iter_mut() {
                *x += (rng.gen::<f32>() * 2.0 - 1.0) * scale;
            }
        }
    }
    let (b, t) = (2, 6);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 5 % 13) as u32).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 3 + 1) % 13) as i64).collect();
    let mut cache = LmCache::default();
    let loss_at = |lm: &mut Lm, store: &ParamStore| -> f64 {
        let mut c = LmCache::default();
        lm.reseed(17);
        lm.forward(store, &ids, b, t, &opts, &mut c).unwrap();
        lm.loss(&mut c, &targets, None).unwrap()
    };
    lm.reseed(17);
    lm.forward(&store, &ids, b, t, &opts, &mut cache).unwrap();
    lm.loss(&mut cache, &targets, None).unwrap();
    let mut grads = store.zeros_like();
    lm.backward(&store, &mut cache, &opts, &mut grads);
    let mut fd = FdStats::default();
    for pi in 0..store.len() {
        let n = store.data[pi].len();
        for j in (0..n).step_by((n / 5).max(1)) {
            let orig = store.data[pi][j];
            let num = central_diff(|e| {
                store.data[pi][j] = orig + e;
                let l = loss_at(&mut lm, &store);
                store.data[pi][j] = orig;
                l
            });
            fd.compare(
                &format!("{}[{j}]", store.names[pi]),
                grads.data[pi][j] as f64,
                num,
            );
        }
    }
    let worst = fd.finish();
    assert!(worst < TOL, "worst relative error {worst}");
}
