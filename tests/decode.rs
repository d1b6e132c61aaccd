//! Recurrent decoding against the full forward: at every position the logits of the decoder,
//! fed one token at a time, equal the full forward's logits at that position (f32, 1e-5), over
//! write-chunk sizes (1, one the text crosses, one longer than the text), with and without the
//! slotspace refine and the content read, baseline and online; and greedy generation by the
//! decoder equals greedy generation by repeated full forwards.

#[path = "support/check.rs"]
mod check;

use rand::Rng;

use asa::config::{ModelConfig, Variant};
use asa::generate::{generate, CpuFullForward, CpuRecurrent, NextLogits, SampleOptions};
use asa::model::decode::{decode_logits, Decoder};
use asa::model::lm::{Lm, LmCache};
use asa::model::params::ParamStore;
use asa::vocab::options::AsaOptions;

use check::{rel_err, rng};

const T: usize = 23;

fn cfg(variant: Variant, chunk: usize, refine: bool, content: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 53,
        max_seq_len: 64,
        embed_dim: 24,
        num_layers: 2,
        num_heads: 3,
        num_slots: 5,
        mlp_ratio: 2.0,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        write_chunk_size: chunk,
        slotspace_chunk_size: 4,
        slotspace_dim: 6,
        use_slotspace_refine: refine,
        use_content_read: content,
        content_read_init: 0.4,
        slotspace_gate_init: 0.3,
        alibi_strength_init: 0.5,
        variant,
        seed: 11 + chunk as u64,
        ..Default::default()
    }
}

/// A model whose weights are moved off their small initial values, so that the write logits
/// spread (the running max moves inside chunks) and the refine and content read matter.
fn model(c: &ModelConfig) -> (Lm, ParamStore) {
    let (lm, mut p) = Lm::new(c).unwrap();
    let mut r = rng(c.seed);
    for w in p.data.iter_mut() {
        for x in w.iter_mut() {
            *x += r.gen_range(-0.25f32..0.25);
        }
    }
    (lm, p)
}

fn tokens(v: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.gen_range(0..v as u32)).collect()
}

fn full_logits(lm: &mut Lm, p: &ParamStore, ids: &[u32], b: usize, t: usize) -> Vec<f32> {
    let mut cache = LmCache::default();
    lm.forward(p, ids, b, t, &AsaOptions::default(), &mut cache)
        .unwrap();
    cache.logits.clone()
}

#[test]
fn recurrent_logits_equal_the_full_forward_at_every_position() {
    let mut worst = 0.0f64;
    for variant in [Variant::Baseline, Variant::Online] {
        // 1: exact prefix softmax; 5: T crosses four chunk boundaries; 64: one chunk holds all
        for chunk in [1, 5, 64] {
            for refine in [false, true] {
                for content in [false, true] {
                    let c = cfg(variant, chunk, refine, content);
                    let (mut lm, p) = model(&c);
                    let b = 2;
                    let ids = tokens(c.vocab_size, b * T, chunk as u64);
                    let want = full_logits(&mut lm, &p, &ids, b, T);
                    let got = decode_logits(&lm, &p, &ids, b, T).unwrap();
                    let v = c.vocab_size;
                    for i in 0..b * T {
                        let row = i * v..(i + 1) * v;
                        let e = rel_err(&got[row.clone()], &want[row]);
                        assert!(
                            e <= 1e-5,
                            "{variant:?} chunk {chunk} refine {refine} content {content}: position {} of row {}: {e:.3e}",
                            i % T,
                            i / T
                        );
                        worst = worst.max(e);
                    }
                }
            }
        }
    }
    eprintln!("worst relative logit error over every position: {worst:.3e}");
}

#[test]
fn the_other_features_decode_too() {
    // normalize_k, temperatures, unsigned slotspace weights, no RoPE anywhere, fixed ALiBi,
    // learned absolute positions, untied head, MLP biases
    for (i, c) in [
        ModelConfig {
            normalize_k: true,
            write_temperature: 0.7,
            read_temperature: 1.3,
            slotspace_signed_weights: false,
            use_rope_slotspace: false,
            learn_alibi_strength: false,
            ..cfg(Variant::Baseline, 4, true, true)
        },
        ModelConfig {
            use_rope_keys: false,
            use_alibi_write: false,
            use_abs_pos: true,
            tie_weights: false,
            mlp_bias: Some(true),
            ..cfg(Variant::Online, 3, true, false)
        },
        // odd head_dim and slotspace_dim (no RoPE)
        ModelConfig {
            embed_dim: 15,
            num_heads: 3,
            slotspace_dim: 5,
            use_rope_keys: false,
            use_rope_slotspace: false,
            ..cfg(Variant::Baseline, 4, true, true)
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (mut lm, p) = model(&c);
        let ids = tokens(c.vocab_size, T, 40 + i as u64);
        let want = full_logits(&mut lm, &p, &ids, 1, T);
        let got = decode_logits(&lm, &p, &ids, 1, T).unwrap();
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "case {i}: {e:.3e}");
    }
}

#[test]
fn the_state_stays_the_same_size_and_reset_starts_over() {
    let c = cfg(Variant::Baseline, 5, true, true);
    let (lm, p) = model(&c);
    let mut dec = Decoder::new(&lm).unwrap();
    let (h, k, d, m) = (c.num_heads, c.num_slots, c.head_dim(), c.slotspace_dim);
    let per_layer = h * (k * (2 * d + 4) + m * (m + 1));
    assert_eq!(dec.state_len(), c.num_layers * per_layer);
    let mut first = vec![0.0; c.vocab_size];
    let mut logits = vec![0.0; c.vocab_size];
    let ids = tokens(c.vocab_size, 40, 3);
    for (i, &id) in ids.iter().enumerate() {
        dec.step(&lm, &p, id, &mut logits).unwrap();
        if i == 0 {
            first.clone_from(&logits);
        }
        assert_eq!(dec.state_len(), c.num_layers * per_layer);
    }
    assert_eq!(dec.position(), 40);
    dec.reset();
    dec.step(&lm, &p, ids[0], &mut logits).unwrap();
    assert_eq!(logits, first);
    // a token out of range is an error, not a panic
    assert!(dec.step(&lm, &p, c.vocab_size as u32, &mut logits).is_err());
}

#[test]
fn learned_positions_stop_at_max_seq_len_and_intervene_refuses() {
    let c = ModelConfig {
        use_abs_pos: true,
        max_seq_len: 4,
        ..cfg(Variant::Baseline, 2, false, false)
    };
    let (lm, p) = model(&c);
    let mut dec = Decoder::new(&lm).unwrap();
    let mut logits = vec![0.0; c.vocab_size];
    for _ in 0..4 {
        dec.step(&lm, &p, 1, &mut logits).unwrap();
    }
    let e = dec.step(&lm, &p, 1, &mut logits).unwrap_err().to_string();
    assert!(e.contains("max_seq_len 4"), "{e}");
    let c = cfg(Variant::Intervene, 2, true, false);
    let (lm, _) = Lm::new(&c).unwrap();
    let e = Decoder::new(&lm).unwrap_err().to_string();
    assert!(e.contains("intervene"), "{e}");
}

#[test]
fn greedy_generation_equals_greedy_by_repeated_full_forwards() {
    for (chunk, refine) in [(1, true), (5, true), (64, false)] {
        let c = cfg(Variant::Baseline, chunk, refine, true);
        let (lm, p) = model(&c);
        let prompt = tokens(c.vocab_size, 7, 9);
        for o in [
            SampleOptions::greedy(20),
            // the repetition controls act on the same logits in both
            SampleOptions {
                repetition_penalty: 1.3,
                no_repeat_ngram: 2,
                ..SampleOptions::greedy(20)
            },
        ] {
            let mut rec = CpuRecurrent::new(lm.clone(), p.clone()).unwrap();
            let mut full = CpuFullForward::new(lm.clone(), p.clone());
            let a = generate(&mut rec, &prompt, &o, |_| Ok(())).unwrap();
            let b = generate(&mut full, &prompt, &o, |_| Ok(())).unwrap();
            assert_eq!(a.generated_ids.len(), 20);
            assert_eq!(
                a.generated_ids, b.generated_ids,
                "chunk {chunk} refine {refine}"
            );
            assert_eq!(rec.position(), prompt.len() + 19);
        }
        // seeded sampling is the same on both too (identical choices from near-identical logits)
        let o = SampleOptions {
            seed: 5,
            max_new_tokens: 12,
            ..Default::default()
        };
        let mut rec = CpuRecurrent::new(lm.clone(), p.clone()).unwrap();
        let mut again = CpuRecurrent::new(lm.clone(), p.clone()).unwrap();
        let a = generate(&mut rec, &prompt, &o, |_| Ok(())).unwrap();
        let b = generate(&mut again, &prompt, &o, |_| Ok(())).unwrap();
        assert_eq!(a.generated_ids, b.generated_ids);
    }
}

#[test]
fn generation_stops_at_eos_and_streams_every_token() {
    let c = cfg(Variant::Baseline, 5, true, true);
    let (lm, p) = model(&c);
    let prompt = tokens(c.vocab_size, 5, 2);
    let mut rec = CpuRecurrent::new(lm.clone(), p.clone()).unwrap();
    let free = generate(&mut rec, &prompt, &SampleOptions::greedy(10), |_| Ok(())).unwrap();
    // make the third generated token the end of text: generation stops right after it
    let eos = free.generated_ids[2];
    let first = free.generated_ids.iter().position(|&x| x == eos).unwrap();
    let mut seen = Vec::new();
    let mut rec = CpuRecurrent::new(lm, p).unwrap();
    let o = SampleOptions {
        eos: Some(eos),
        ..SampleOptions::greedy(10)
    };
    let g = generate(&mut rec, &prompt, &o, |id| {
        seen.push(id);
        Ok(())
    })
    .unwrap();
    assert_eq!(g.generated_ids, free.generated_ids[..=first].to_vec());
    assert_eq!(seen, g.generated_ids);
    assert_eq!(g.token_seconds.len(), g.generated_ids.len());
}
