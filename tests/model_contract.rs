//! Contracts of the model surface: checkpoint key stability against
//! tests/golden_state_dict_keys.txt, shapes across the feature toggles, and the no-NaN smoke run.

use std::path::Path;

use asa::config::{ModelConfig, Variant};
use asa::model::layer::{AsaCache, AsaLayer, AsaOptions};
use asa::model::lm::{Lm, LmCache};
use asa::model::params::{AsaIds, Init, ParamStore};

/// The config of the reference's own key test (vocab 32, embed 32, 1 layer, 4 heads, 8 slots).
fn golden_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        embed_dim: 32,
        num_layers: 1,
        num_heads: 4,
        num_slots: 8,
        max_seq_len: 8,
        ..Default::default()
    }
}

#[test]
fn checkpoint_keys_match_golden() {
    let golden_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden_state_dict_keys.txt");
    let golden: Vec<String> = std::fs::read_to_string(&golden_path)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let (_, store) = Lm::new(&golden_config()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.safetensors");
    asa::checkpoint::save_params(&path, &store, true, None).unwrap();
    let saved: Vec<String> = asa::checkpoint::read_safetensors(&path)
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut sorted = saved.clone();
    sorted.sort();
    assert_eq!(
        sorted, golden,
        "saved checkpoint keys changed: update only with a deliberate, documented format change"
    );
}

fn layer_out(cfg: &ModelConfig, b: usize, t: usize) -> (Vec<f32>, asa::model::layer::Info) {
    let mut store = ParamStore::new();
    let ids = AsaIds::register(&mut store, "", cfg, &mut Init::new(1));
    let mut layer = AsaLayer::new(cfg, ids);
    let x: Vec<f32> = (0..b * t * cfg.embed_dim)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut out = vec![0.0; x.len()];
    let mut cache = AsaCache::default();
    let opts = AsaOptions {
        return_info: true,
        ..Default::default()
    };
    let mut rng = rand::SeedableRng::seed_from_u64(0);
    let info = layer
        .forward(&store, &x, b, t, &opts, &mut cache, &mut rng, &mut out)
        .unwrap()
        .unwrap();
    (out, info)
}

#[test]
fn shapes_are_invariant_across_toggles() {
    let (b, t) = (2, 5);
    for content in [true, false] {
        for refine in [true, false] {
            for variant in [Variant::Baseline, Variant::Intervene] {
                let cfg = ModelConfig {
                    embed_dim: 32,
                    num_heads: 4,
                    num_slots: 8,
                    slotspace_dim: 8,
                    use_content_read: content,
                    use_slotspace_refine: refine,
                    variant,
                    ..Default::default()
                };
                let (out, info) = layer_out(&cfg, b, t);
                assert_eq!(out.len(), b * t * 32);
                assert_eq!(info["read_weights"].0, vec![b, 4, t, 8]);
                assert_eq!(info["write_logits"].0, vec![b, 4, 8, t]);
                assert_eq!(info["slot_state_norm"].0, vec![b, 4, 8, t]);
                assert_eq!(info.contains_key("read_logits_content"), content);
                assert_eq!(info.contains_key("slotspace_gate"), refine);
                assert!(out.iter().all(|x| x.is_finite()));
            }
        }
    }
    // the LM: logits [B,T,V] whatever the toggles
    for (content, refine) in [(true, true), (false, false)] {
        let cfg = ModelConfig {
            use_content_read: content,
            use_slotspace_refine: refine,
            ..golden_config()
        };
        let (mut lm, store) = Lm::new(&cfg).unwrap();
        let mut cache = LmCache::default();
        lm.forward(
            &store,
            &[1, 2, 3, 4, 5, 6],
            1,
            6,
            &AsaOptions::default(),
            &mut cache,
        )
        .unwrap();
        assert_eq!(cache.logits.len(), 6 * 32);
    }
}

#[test]
fn smoke_run_is_finite_and_writes_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let s = asa::smoke::run_smoke(7, tmp.path(), "cpu").unwrap();
    assert!(
        s.ok,
        "{:#?}",
        s.cases.iter().filter(|c| !c.ok).collect::<Vec<_>>()
    );
    assert!(s.cases.len() >= 4);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("smoke.json")).unwrap())
            .unwrap();
    assert_eq!(json["ok"], serde_json::Value::Bool(true));
}

#[test]
fn token_ids_out_of_range_are_an_error() {
    let (mut lm, store) = Lm::new(&golden_config()).unwrap();
    let mut cache = LmCache::default();
    let e = lm
        .forward(&store, &[1, 99], 1, 2, &AsaOptions::default(), &mut cache)
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
}

/// A config from an untrusted file cannot make model construction abort on an allocation or
/// grow until the machine runs out of memory: the size guard refuses it first, with the count.
#[test]
fn huge_models_are_refused_before_allocating() {
    for cfg in [
        ModelConfig {
            embed_dim: 1 << 20,
            ..Default::default()
        },
        ModelConfig {
            num_layers: 100_000,
            ..Default::default()
        },
        ModelConfig {
            vocab_size: usize::MAX / 2,
            ..Default::default()
        },
    ] {
        let e = match Lm::new(&cfg) {
            Ok(_) => panic!(
                "built a model of {} layers x {}",
                cfg.num_layers, cfg.embed_dim
            ),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("parameter"), "{e}");
    }
}

/// A cache reused across steps (the trainer's case: buffers resized, not zeroed, when their
/// producer overwrites them) gives the same logits, loss and gradients, bit for bit, as a fresh
/// cache, with dropout on and off, after a step on other tokens.
#[test]
fn a_reused_cache_matches_a_fresh_one() {
    for dropout in [0.0, 0.2] {
        let cfg = ModelConfig {
            vocab_size: 29,
            embed_dim: 32,
            num_layers: 2,
            num_heads: 2,
            num_slots: 6,
            slotspace_dim: 8,
            write_chunk_size: 5,
            slotspace_chunk_size: 5,
            max_seq_len: 16,
            dropout,
            slotspace_dropout: dropout,
            ..Default::default()
        };
        let (mut lm, store) = Lm::new(&cfg).unwrap();
        let opts = AsaOptions {
            training: true,
            ..Default::default()
        };
        let (b, t) = (2, 16);
        let step = |lm: &mut Lm, cache: &mut LmCache, ids: &[u32]| {
            let targets: Vec<i64> = ids.iter().map(|&i| ((i + 3) % 29) as i64).collect();
            lm.reseed(5);
            lm.forward(&store, ids, b, t, &opts, cache).unwrap();
            let loss = lm.loss(cache, &targets, None).unwrap();
            let mut grads = store.zeros_like();
            lm.backward(&store, cache, &opts, &mut grads);
            (cache.logits.clone(), loss, grads.data)
        };
        let ids_a: Vec<u32> = (0..b * t).map(|i| (i * 7 % 29) as u32).collect();
        let ids_b: Vec<u32> = (0..b * t).map(|i| (i * 11 % 29) as u32).collect();
        let mut reused = LmCache::default();
        step(&mut lm, &mut reused, &ids_a);
        let again = step(&mut lm, &mut reused, &ids_b);
        let fresh = step(&mut lm, &mut LmCache::default(), &ids_b);
        assert_eq!(again.0, fresh.0, "logits, dropout {dropout}");
        assert_eq!(again.1, fresh.1, "loss, dropout {dropout}");
        assert_eq!(again.2, fresh.2, "gradients, dropout {dropout}");
    }
}
