//! Model configuration.
//!
//! `ModelConfig` carries the reference `ASMTrainConfig` field names (so the `model` object of any
//! fixture `config.json`, or the `cfg` dict of a reference checkpoint, deserialises into it), plus
//! two fields the reference keeps elsewhere: `mlp_bias` and `variant`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{AsaError, Result};

/// Which attention class a model uses (the reference's `variant` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// `AddressedStateAttention`: write/read scan, then a separate slotspace pass.
    #[default]
    Baseline,
    /// `AddressedStateAttentionOnline`: write, read and refine in one pass over time.
    Online,
    /// `AddressedStateAttentionIntervene`: baseline plus refine-delta interventions and geometry logs.
    Intervene,
}

impl std::str::FromStr for Variant {
    type Err = AsaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "baseline" => Ok(Variant::Baseline),
            "online" => Ok(Variant::Online),
            "intervene" => Ok(Variant::Intervene),
            other => Err(AsaError::Config(format!(
                "unknown variant '{other}' (expected baseline, online or intervene)"
            ))),
        }
    }
}

fn d_max_seq_len() -> usize {
    256
}
fn d_vocab() -> usize {
    50257
}
fn d_embed() -> usize {
    384
}
fn d_layers() -> usize {
    23
}
fn d_heads() -> usize {
    8
}
fn d_slots() -> usize {
    32
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_dropout() -> f64 {
    0.1
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_slot_dropout() -> f64 {
    0.05
}
fn d_rope_base() -> f64 {
    10000.0
}
fn d_alibi_init() -> f64 {
    0.1
}
fn d_content_init() -> f64 {
    -4.0
}
fn d_content_max() -> f64 {
    3.0
}
fn d_chunk() -> usize {
    128
}
fn d_slotspace_dim() -> usize {
    64
}
fn d_gate_init() -> f64 {
    -4.0
}
fn d_rope_base_ss() -> f64 {
    100000.0
}
fn d_seed() -> u64 {
    1337
}

/// The model half of the reference `ASMTrainConfig` (same names, same defaults), plus
/// `mlp_bias` and `variant`. Training fields of `ASMTrainConfig` are accepted and ignored here;
/// the trainer reads them from its own config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default = "d_embed")]
    pub embed_dim: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    #[serde(default = "d_slots")]
    pub num_slots: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    /// One dropout probability for embeddings, attention output and MLP (as the notebooks do).
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    #[serde(default = "d_true")]
    pub tie_weights: bool,

    #[serde(default = "d_one")]
    pub read_temperature: f64,
    #[serde(default = "d_one")]
    pub write_temperature: f64,
    #[serde(default = "d_slot_dropout")]
    pub slot_dropout: f64,
    /// Kept for checkpoint compatibility; this implementation always keeps slot state and scan
    /// statistics in f32 (or wider).
    #[serde(default = "d_true")]
    pub state_fp32: bool,
    #[serde(default)]
    pub normalize_k: bool,

    #[serde(default)]
    pub use_abs_pos: bool,
    #[serde(default = "d_true")]
    pub use_rope_keys: bool,
    #[serde(default = "d_rope_base")]
    pub rope_base: f64,
    #[serde(default = "d_true")]
    pub use_alibi_write: bool,
    #[serde(default = "d_alibi_init")]
    pub alibi_strength_init: f64,
    #[serde(default = "d_true")]
    pub learn_alibi_strength: bool,
    #[serde(default)]
    pub min_strength: f64,

    #[serde(default = "d_true")]
    pub use_content_read: bool,
    #[serde(default = "d_content_init")]
    pub content_read_init: f64,
    #[serde(default = "d_content_max")]
    pub content_read_max_gamma: f64,
    #[serde(default = "d_chunk")]
    pub write_chunk_size: usize,
    #[serde(default = "d_slotspace_dim")]
    pub slotspace_dim: usize,
    #[serde(default = "d_chunk")]
    pub slotspace_chunk_size: usize,
    #[serde(default = "d_true")]
    pub use_slotspace_refine: bool,
    #[serde(default = "d_gate_init")]
    pub slotspace_gate_init: f64,
    #[serde(default = "d_slot_dropout")]
    pub slotspace_dropout: f64,
    #[serde(default = "d_true")]
    pub slotspace_signed_weights: bool,
    #[serde(default = "d_true")]
    pub use_rope_slotspace: bool,
    #[serde(default = "d_rope_base_ss")]
    pub rope_base_slotspace: f64,

    /// MLP biases: the library has them, the notebooks and the published checkpoint do not.
    /// `None` (absent from a file) means "decide from the checkpoint's keys", else `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub variant: Variant,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialise")
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads.max(1)
    }
    pub fn hidden_dim(&self) -> usize {
        // int(embed_dim * mlp_ratio), as the reference computes it
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
    pub fn has_mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(true)
    }

    /// Parses the `model` object of a fixture / run config, or a bare config object.
    pub fn from_json_value(v: &serde_json::Value) -> Result<Self> {
        let obj = v.get("model").unwrap_or(v);
        let mut cfg: ModelConfig = serde_json::from_value(obj.clone())
            .map_err(|e| AsaError::Config(format!("invalid model config: {e}")))?;
        if let Some(var) = v.get("variant").and_then(|x| x.as_str()) {
            cfg.variant = var.parse()?;
        }
        Ok(cfg)
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AsaError::Config(format!("cannot read config {}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| AsaError::Config(format!("{} is not valid JSON: {e}", path.display())))?;
        let cfg = Self::from_json_value(&v)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every constraint the model relies on; each violation is one clear message.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(AsaError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("embed_dim", self.embed_dim),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_slots", self.num_slots),
            ("max_seq_len", self.max_seq_len),
            ("write_chunk_size", self.write_chunk_size),
        ] {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return err(format!(
                "embed_dim ({}) must be divisible by num_heads ({})",
                self.embed_dim, self.num_heads
            ));
        }
        if self.use_rope_keys && !self.head_dim().is_multiple_of(2) {
            return err(format!(
                "use_rope_keys needs an even head_dim, got {} (embed_dim / num_heads)",
                self.head_dim()
            ));
        }
        if self.use_slotspace_refine {
            if self.slotspace_dim == 0 {
                return err(
                    "slotspace_dim must be positive when use_slotspace_refine is on".into(),
                );
            }
            if self.use_rope_slotspace && !self.slotspace_dim.is_multiple_of(2) {
                return err(format!(
                    "use_rope_slotspace needs an even slotspace_dim, got {}",
                    self.slotspace_dim
                ));
            }
        }
        if !(self.mlp_ratio > 0.0) || self.hidden_dim() == 0 {
            return err(format!("mlp_ratio ({}) gives an empty MLP", self.mlp_ratio));
        }
        for (name, p) in [
            ("dropout", self.dropout),
            ("slot_dropout", self.slot_dropout),
            ("slotspace_dropout", self.slotspace_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return err(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        for (name, t) in [
            ("read_temperature", self.read_temperature),
            ("write_temperature", self.write_temperature),
        ] {
            if !t.is_finite() {
                return err(format!("{name} must be finite, got {t}"));
            }
        }
        if self.use_alibi_write
            && self.learn_alibi_strength
            && !self.alibi_strength_init.is_finite()
        {
            return err("alibi_strength_init must be finite".into());
        }
        if self.rope_base <= 0.0 || self.rope_base_slotspace <= 0.0 {
            return err("rope_base and rope_base_slotspace must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_reference() {
        let c = ModelConfig::default();
        assert_eq!(c.vocab_size, 50257);
        assert_eq!(c.embed_dim, 384);
        assert_eq!(c.num_slots, 32);
        assert_eq!(c.write_chunk_size, 128);
        assert_eq!(c.variant, Variant::Baseline);
        c.validate().unwrap();
    }

    #[test]
    fn validation_messages() {
        let mut c = ModelConfig {
            embed_dim: 50,
            num_heads: 4,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("divisible"));
        c.embed_dim = 12;
        c.num_heads = 4; // head_dim 3: odd with RoPE
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("even head_dim"));
        c.use_rope_keys = false;
        c.slotspace_dim = 7;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("slotspace_dim"));
        c.slotspace_dim = 8;
        c.dropout = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("dropout"));
    }

    #[test]
    fn reads_fixture_style_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"model": {"vocab_size": 97, "embed_dim": 48, "num_heads": 4, "tag": "x",
                "betas": [0.9, 0.95]}, "variant": "online"}"#,
        )
        .unwrap();
        let c = ModelConfig::from_json_value(&v).unwrap();
        assert_eq!(c.vocab_size, 97);
        assert_eq!(c.variant, Variant::Online);
    }
}
