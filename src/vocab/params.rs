//! Named parameter store with the exact PyTorch keys, and the seeded initialisation the training
//! notebooks use.
//!
//! Every parameter is its own `Vec<f32>` (row-major, PyTorch shape). Gradients and optimizer
//! moments are `ParamStore`s of the same layout (`zeros_like`), so parameter `i` of one store
//! matches parameter `i` of the others.

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;

/// `softplus(x) = log(1 + exp(x))`, computed stably (PyTorch's threshold of 20 included).
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The ALiBi write strength of a layer: `softplus(raw) + min_strength` when learned (`raw`, the
/// `_alibi_strength_param` value), else the fixed `alibi_strength_init`.
pub fn alibi_strength(raw: Option<f32>, cfg: &ModelConfig) -> f32 {
    match raw {
        Some(r) => (softplus(r as f64) + cfg.min_strength) as f32,
        None => cfg.alibi_strength_init as f32,
    }
}

/// The content-read gamma: `softplus(raw)` clamped at `content_read_max_gamma` (when > 0); 0
/// without a content read (`raw` None).
pub fn content_gamma(raw: Option<f32>, cfg: &ModelConfig) -> f32 {
    match raw {
        Some(r) => {
            let g = softplus(r as f64);
            let mx = cfg.content_read_max_gamma;
            (if mx > 0.0 { g.min(mx) } else { g }) as f32
        }
        None => 0.0,
    }
}

/// Number of elements of a shape (1 for a scalar `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Index of a parameter inside a `ParamStore`.
pub type ParamId = usize;

#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Vec<f32>>,
    index: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter; panics on a duplicate name (a programming error, never user input).
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> ParamId {
        let name = name.into();
        assert_eq!(
            numel(shape),
            data.len(),
            "parameter {name}: shape/data mismatch"
        );
        assert!(
            !self.index.contains_key(&name),
            "duplicate parameter {name}"
        );
        let id = self.names.len();
        self.index.insert(name.clone(), id);
        self.names.push(name);
        self.shapes.push(shape.to_vec());
        self.data.push(data);
        id
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.id(name).map(|i| self.data[i].as_slice())
    }
    pub fn num_elements(&self) -> usize {
        self.data.iter().map(|d| d.len()).sum()
    }

    /// A store with the same names and shapes, all zeros (gradients, Adam moments).
    pub fn zeros_like(&self) -> Self {
        ParamStore {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            data: self.data.iter().map(|d| vec![0.0; d.len()]).collect(),
            index: self.index.clone(),
        }
    }

    pub fn zero(&mut self) {
        for d in &mut self.data {
            d.iter_mut().for_each(|x| *x = 0.0);
        }
    }

    /// Adds `src` into parameter `id` (used to accumulate a layer's gradients).
    pub fn accumulate(&mut self, id: ParamId, src: &[f32]) {
        let dst = &mut self.data[id];
        assert_eq!(
            dst.len(),
            src.len(),
            "accumulate into {}: length mismatch",
            self.names[id]
        );
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
}

/// Seeded initialiser mirroring the training notebooks: N(0, 0.02) for Linear and Embedding
/// weights, zeros for biases, LayerNorm 1/0, slot keys N(0,1)/sqrt(head_dim).
pub struct Init {
    rng: ChaCha8Rng,
}

impl Init {
    pub fn new(seed: u64) -> Self {
        Init {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
    pub fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        let dist = Normal::new(0.0f64, std).expect("valid std");
        (0..n).map(|_| dist.sample(&mut self.rng) as f32).collect()
    }
    pub fn constant(n: usize, v: f32) -> Vec<f32> {
        vec![v; n]
    }
}

/// `log(expm1(y))`, the reference's `_inv_softplus`.
pub fn inv_softplus(y: f64) -> f64 {
    y.exp_m1().ln()
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Ids of one ASA layer's parameters (`<prefix>slot_keys`, `<prefix>Wk_write.weight`, ...).
#[derive(Debug, Clone)]
pub struct AsaIds {
    pub slot_keys: ParamId,
    pub wk_write: ParamId,
    pub wv_write: ParamId,
    pub wq_read: ParamId,
    pub out_proj: ParamId,
    pub alibi_strength: Option<ParamId>,
    pub content_read_gamma: Option<ParamId>,
    pub slotspace: Option<SlotspaceIds>,
}

#[derive(Debug, Clone)]
pub struct SlotspaceIds {
    pub slot_in: ParamId,
    pub slot_q: ParamId,
    pub slot_k: ParamId,
    pub slot_v: ParamId,
    pub slot_out: ParamId,
    pub gate: ParamId,
}

impl AsaIds {
    /// Registers one attention layer's parameters under `prefix` (e.g. `blocks.0.attn.` or `""`),
    /// in the reference's `state_dict` order.
    pub fn register(
        store: &mut ParamStore,
        prefix: &str,
        cfg: &ModelConfig,
        init: &mut Init,
    ) -> Self {
        let (c, h, k) = (cfg.embed_dim, cfg.num_heads, cfg.num_slots);
        let d = cfg.head_dim();
        let m = cfg.slotspace_dim;
        let p = |s: &str| format!("{prefix}{s}");
        let slot_keys_data: Vec<f32> = init
            .normal(h * k * d, 1.0)
            .into_iter()
            .map(|x| x / (d as f32).sqrt())
            .collect();
        let slot_keys = store.push(p("slot_keys"), &[h, k, d], slot_keys_data);
        let wk_write = store.push(p("Wk_write.weight"), &[c, c], init.normal(c * c, 0.02));
        let wv_write = store.push(p("Wv_write.weight"), &[c, c], init.normal(c * c, 0.02));
        let wq_read = store.push(p("Wq_read.weight"), &[c, c], init.normal(c * c, 0.02));
        let out_proj = store.push(p("out_proj.weight"), &[c, c], init.normal(c * c, 0.02));
        let alibi_strength = (cfg.use_alibi_write && cfg.learn_alibi_strength).then(|| {
            let init_v = (cfg.alibi_strength_init - cfg.min_strength).max(1e-8);
            store.push(
                p("_alibi_strength_param"),
                &[],
                vec![inv_softplus(init_v) as f32],
            )
        });
        let content_read_gamma = cfg.use_content_read.then(|| {
            store.push(
                p("_content_read_gamma_raw"),
                &[],
                vec![cfg.content_read_init as f32],
            )
        });
        let slotspace = cfg.use_slotspace_refine.then(|| SlotspaceIds {
            slot_in: store.push(p("slot_in.weight"), &[m, k], init.normal(m * k, 0.02)),
            slot_q: store.push(p("slot_q.weight"), &[m, m], init.normal(m * m, 0.02)),
            slot_k: store.push(p("slot_k.weight"), &[m, m], init.normal(m * m, 0.02)),
            slot_v: store.push(p("slot_v.weight"), &[m, m], init.normal(m * m, 0.02)),
            slot_out: store.push(p("slot_out.weight"), &[k, m], init.normal(k * m, 0.02)),
            gate: store.push(
                p("_slotspace_gate_raw"),
                &[],
                vec![cfg.slotspace_gate_init as f32],
            ),
        });
        AsaIds {
            slot_keys,
            wk_write,
            wv_write,
            wq_read,
            out_proj,
            alibi_strength,
            content_read_gamma,
            slotspace,
        }
    }
}

/// Ids of one block: pre-LN attention and MLP (`mlp.0` Linear, GELU, dropout, `mlp.3` Linear).
#[derive(Debug, Clone)]
pub struct BlockIds {
    pub ln_1_w: ParamId,
    pub ln_1_b: ParamId,
    pub attn: AsaIds,
    pub ln_2_w: ParamId,
    pub ln_2_b: ParamId,
    pub mlp_0_w: ParamId,
    pub mlp_0_b: Option<ParamId>,
    pub mlp_3_w: ParamId,
    pub mlp_3_b: Option<ParamId>,
}

/// Ids of the whole language model.
#[derive(Debug, Clone)]
pub struct LmIds {
    pub token_emb: ParamId,
    pub pos_emb: Option<ParamId>,
    pub blocks: Vec<BlockIds>,
    pub ln_f_w: ParamId,
    pub ln_f_b: ParamId,
    /// `None` when tied: the head reads `token_emb.weight`.
    pub lm_head: Option<ParamId>,
}

impl LmIds {
    /// Builds the full parameter store for `cfg`, initialised from `cfg.seed`.
    pub fn build(cfg: &ModelConfig) -> (ParamStore, LmIds) {
        let mut store = ParamStore::new();
        let mut init = Init::new(cfg.seed);
        let (c, v) = (cfg.embed_dim, cfg.vocab_size);
        let hid = cfg.hidden_dim();
        let token_emb = store.push("token_emb.weight", &[v, c], init.normal(v * c, 0.02));
        let pos_emb = cfg.use_abs_pos.then(|| {
            store.push(
                "pos_emb.weight",
                &[cfg.max_seq_len, c],
                init.normal(cfg.max_seq_len * c, 0.02),
            )
        });
        let bias = cfg.has_mlp_bias();
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = |s: &str| format!("blocks.{l}.{s}");
            let ln_1_w = store.push(p("ln_1.weight"), &[c], Init::constant(c, 1.0));
            let ln_1_b = store.push(p("ln_1.bias"), &[c], Init::constant(c, 0.0));
            let attn = AsaIds::register(&mut store, &p("attn."), cfg, &mut init);
            let ln_2_w = store.push(p("ln_2.weight"), &[c], Init::constant(c, 1.0));
            let ln_2_b = store.push(p("ln_2.bias"), &[c], Init::constant(c, 0.0));
            let mlp_0_w = store.push(p("mlp.0.weight"), &[hid, c], init.normal(hid * c, 0.02));
            let mlp_0_b =
                bias.then(|| store.push(p("mlp.0.bias"), &[hid], Init::constant(hid, 0.0)));
            let mlp_3_w = store.push(p("mlp.3.weight"), &[c, hid], init.normal(c * hid, 0.02));
            let mlp_3_b = bias.then(|| store.push(p("mlp.3.bias"), &[c], Init::constant(c, 0.0)));
            blocks.push(BlockIds {
                ln_1_w,
                ln_1_b,
                attn,
                ln_2_w,
                ln_2_b,
                mlp_0_w,
                mlp_0_b,
                mlp_3_w,
                mlp_3_b,
            });
        }
        let ln_f_w = store.push("ln_f.weight", &[c], Init::constant(c, 1.0));
        let ln_f_b = store.push("ln_f.bias", &[c], Init::constant(c, 0.0));
        let lm_head = (!cfg.tie_weights)
            .then(|| store.push("lm_head.weight", &[v, c], init.normal(v * c, 0.02)));
        (
            store,
            LmIds {
                token_emb,
                pos_emb,
                blocks,
                ln_f_w,
                ln_f_b,
                lm_head,
            },
        )
    }

    /// The weight the LM head multiplies by: `lm_head.weight`, or `token_emb.weight` when tied.
    pub fn head(&self) -> ParamId {
        self.lm_head.unwrap_or(self.token_emb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_reference_keys() {
        let cfg = ModelConfig {
            vocab_size: 11,
            embed_dim: 8,
            num_layers: 1,
            num_heads: 2,
            num_slots: 3,
            slotspace_dim: 4,
            ..Default::default()
        };
        let (store, ids) = LmIds::build(&cfg);
        for k in [
            "token_emb.weight",
            "blocks.0.attn.slot_keys",
            "blocks.0.attn._alibi_strength_param",
            "blocks.0.attn._content_read_gamma_raw",
            "blocks.0.attn.slot_in.weight",
            "blocks.0.attn._slotspace_gate_raw",
            "blocks.0.mlp.0.bias",
            "ln_f.weight",
        ] {
            assert!(store.id(k).is_some(), "missing {k}");
        }
        assert!(
            store.id("lm_head.weight").is_none(),
            "tied head is not a separate parameter"
        );
        assert_eq!(ids.head(), ids.token_emb);
        // alibi init: softplus(raw) + min_strength == alibi_strength_init
        let raw = store.get("blocks.0.attn._alibi_strength_param").unwrap()[0] as f64;
        assert!((softplus(raw) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn init_is_seeded() {
        let cfg = ModelConfig {
            vocab_size: 11,
            embed_dim: 8,
            num_layers: 1,
            num_heads: 2,
            ..Default::default()
        };
        let (a, _) = LmIds::build(&cfg);
        let (b, _) = LmIds::build(&cfg);
        assert_eq!(a.data, b.data);
        let (c, _) = LmIds::build(&ModelConfig { seed: 7, ..cfg });
        assert_ne!(a.data[0], c.data[0]);
    }
}
