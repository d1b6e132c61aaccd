//! Left padding: a slot with no valid token yet has an empty state (never NaN), and with RoPE off
//! (write keys and slotspace) the logits at the valid positions of a left-padded row equal those
//! of the same tokens unpadded. ALiBi shifts every valid write logit of a slot by the same amount,
//! which the softmax over time ignores; the write chunk must cover T (or be 1) so that padding
//! does not move chunk boundaries, which the reference's chunked scan depends on.

use asa::config::{ModelConfig, Variant};
use asa::model::layer::AsaOptions;
use asa::model::lm::{Lm, LmCache};

fn cfg(chunk: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 29,
        max_seq_len: 32,
        embed_dim: 16,
        num_layers: 2,
        num_heads: 2,
        num_slots: 4,
        slotspace_dim: 4,
        dropout: 0.0,
        slot_dropout: 0.0,
        slotspace_dropout: 0.0,
        use_rope_keys: false,
        use_rope_slotspace: false,
        content_read_init: 0.0,
        slotspace_gate_init: 0.5,
        write_chunk_size: chunk,
        variant: Variant::Baseline,
        seed: 17,
        ..Default::default()
    }
}

fn logits(
    lm: &mut Lm,
    store: &asa::model::params::ParamStore,
    ids: &[u32],
    t: usize,
    mask: Option<Vec<bool>>,
) -> Vec<f32> {
    let opts = AsaOptions {
        attention_mask: mask,
        ..Default::default()
    };
    let mut cache = LmCache::default();
    lm.forward(store, ids, 1, t, &opts, &mut cache).unwrap();
    cache.logits.clone()
}

#[test]
fn left_padded_row_matches_unpadded() {
    for chunk in [1, 64] {
        let (mut lm, store) = Lm::new(&cfg(chunk)).unwrap();
        let tokens: Vec<u32> = vec![3, 14, 15, 9, 2, 6, 5, 3, 5, 8];
        let pad = 5;
        let v = lm.cfg.vocab_size;
        let plain = logits(&mut lm, &store, &tokens, tokens.len(), None);
        let mut padded_ids = vec![0u32; pad];
        padded_ids.extend(&tokens);
        let mut mask = vec![false; pad];
        mask.extend(vec![true; tokens.len()]);
        let padded = logits(&mut lm, &store, &padded_ids, padded_ids.len(), Some(mask));
        assert!(
            padded.iter().all(|x| x.is_finite()),
            "left padding produced non-finite logits"
        );
        let mut worst = 0.0f32;
        for t in 0..tokens.len() {
            for j in 0..v {
                worst = worst.max((plain[t * v + j] - padded[(t + pad) * v + j]).abs());
            }
        }
        assert!(
            worst < 2e-5,
            "chunk {chunk}: padded vs unpadded logits differ by {worst}"
        );
    }
}

#[test]
fn left_padding_backward_is_finite() {
    let (mut lm, store) = Lm::new(&ModelConfig {
        use_rope_keys: true,
        use_rope_slotspace: true,
        ..cfg(4)
    })
    .unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 29) as u32).collect();
    let mut mask = vec![true; 24];
    for m in mask.iter_mut().take(9) {
        *m = false; // more than two whole write chunks of padding on row 0
    }
    let opts = AsaOptions {
        attention_mask: Some(mask.clone()),
        ..Default::default()
    };
    let mut cache = LmCache::default();
    lm.forward(&store, &ids, 2, 12, &opts, &mut cache).unwrap();
    let targets: Vec<i64> = ids.iter().map(|&x| ((x + 1) % 29) as i64).collect();
    let loss = lm.loss(&mut cache, &targets, Some(&mask)).unwrap();
    assert!(loss.is_finite());
    let mut grads = store.zeros_like();
    lm.backward(&store, &mut cache, &opts, &mut grads);
    for (name, g) in grads.names.iter().zip(&grads.data) {
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{name} has non-finite gradients"
        );
    }
}
