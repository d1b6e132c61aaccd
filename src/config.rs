//! Model configuration.
//!
//! `ModelConfig` carries the reference `ASMTrainConfig` field names (so the `model` object of any
//! fixture `config.json`, or the `cfg` dict of a reference checkpoint, deserialises into it), plus
//! two fields the reference keeps elsewhere: `mlp_bias` and `variant`.

use serde::{Deserialize, Serialize};

use crate::error::{AsaError, Result};
use crate::host::{host_available, human};

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

    /// Parses the `model` object of a fixture / checkpoint config, or a bare config object.
    ///
    /// Keys must be model fields or fields the reference's `ASMTrainConfig` has (a reference
    /// `asdict(cfg)` carries its training fields too); the reference's aliases (`n_layer`, ...)
    /// are mapped as its loader maps them. Anything else is a typo that would silently give
    /// another model: it is rejected, naming the closest known key.
    pub fn from_json_value(v: &serde_json::Value) -> Result<Self> {
        Self::from_json_value_known(v, &[])
    }

    /// [`Self::from_json_value`] that also accepts the keys in `extra` (a run config's own
    /// training keys), and no reference aliases (a run config is ours: one name per field).
    pub fn from_json_value_known(v: &serde_json::Value, extra: &[&str]) -> Result<Self> {
        let obj = v.get("model").unwrap_or(v);
        let map = obj.as_object().ok_or_else(|| {
            AsaError::Config(format!(
                "a model config must be a JSON object, got {}",
                json_kind(obj)
            ))
        })?;
        let mut map = map.clone();
        if extra.is_empty() {
            for (alias, name) in REFERENCE_ALIASES {
                if let Some(x) = map.remove(*alias) {
                    map.entry(name.to_string()).or_insert(x);
                }
            }
        }
        let known: Vec<&str> = MODEL_FIELDS
            .iter()
            .map(|(k, _)| *k)
            .chain(REFERENCE_TRAIN_FIELDS.iter().map(|(k, _)| *k))
            .chain(REFERENCE_IGNORED_FIELDS.iter().copied())
            .chain(extra.iter().copied())
            .collect();
        check_known_keys(&map, &known)?;
        check_kinds(&map, MODEL_FIELDS)?;
        let mut cfg: ModelConfig = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| AsaError::Config(format!("invalid model config: {e}")))?;
        if let Some(var) = v.get("variant").and_then(|x| x.as_str()) {
            cfg.variant = var.parse()?;
        }
        Ok(cfg)
    }

    /// Checks one step of recurrent decoding: `token` below `vocab_size`, and the position `pos`
    /// within `max_seq_len` where positions are learned (RoPE and ALiBi have no bound).
    pub fn check_decode_step(&self, token: u32, pos: usize) -> Result<()> {
        if token as usize >= self.vocab_size {
            return Err(AsaError::Input(format!(
                "token id {token} is not below the model's vocab_size {}",
                self.vocab_size
            )));
        }
        if self.use_abs_pos && pos >= self.max_seq_len {
            return Err(AsaError::Input(format!(
                "position {pos} is past max_seq_len {} (the model learned absolute positions)",
                self.max_seq_len
            )));
        }
        Ok(())
    }

    /// Checks every constraint the model relies on; each violation is one clear message naming
    /// the field. Ends with the size guard: a parameter count that overflows, or whose f32 bytes
    /// exceed the memory this machine has available, is refused before anything is allocated.
    /// Checks a batch of `b` sequences of `t` token ids against the model: the count, every id
    /// below `vocab_size`, and `t` within `max_seq_len` where positions are learned.
    pub fn check_ids(&self, ids: &[u32], b: usize, t: usize) -> Result<()> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(AsaError::Input(format!(
                "expected {b}x{t} token ids, got {}",
                ids.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(AsaError::Input(format!(
                "token id {bad} is out of range for vocab_size {}",
                self.vocab_size
            )));
        }
        if self.use_abs_pos && t > self.max_seq_len {
            return Err(AsaError::Input(format!(
                "sequence length {t} exceeds max_seq_len {} (learned absolute positions)",
                self.max_seq_len
            )));
        }
        Ok(())
    }

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
                return err(format!("{name} must be >= 1, got 0"));
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
                    "slotspace_dim must be >= 1 when use_slotspace_refine is on, got 0".into(),
                );
            }
            if self.slotspace_chunk_size == 0 {
                return err(
                    "slotspace_chunk_size must be >= 1 when use_slotspace_refine is on, got 0"
                        .into(),
                );
            }
            if self.use_rope_slotspace && !self.slotspace_dim.is_multiple_of(2) {
                return err(format!(
                    "use_rope_slotspace needs an even slotspace_dim, got {}",
                    self.slotspace_dim
                ));
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.hidden_dim() == 0 {
            return err(format!(
                "mlp_ratio must be finite and give a hidden size >= 1 (embed_dim * mlp_ratio), got {}",
                self.mlp_ratio
            ));
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
        // the scores are divided by the temperatures
        for (name, t) in [
            ("read_temperature", self.read_temperature),
            ("write_temperature", self.write_temperature),
            ("rope_base", self.rope_base),
            ("rope_base_slotspace", self.rope_base_slotspace),
        ] {
            if !(t.is_finite() && t > 0.0) {
                return err(format!("{name} must be finite and > 0, got {t}"));
            }
        }
        for (name, x) in [
            ("alibi_strength_init", self.alibi_strength_init),
            ("min_strength", self.min_strength),
            ("content_read_init", self.content_read_init),
            ("content_read_max_gamma", self.content_read_max_gamma),
            ("slotspace_gate_init", self.slotspace_gate_init),
        ] {
            if !x.is_finite() {
                return err(format!("{name} must be a finite number, got {x}"));
            }
        }
        if self.min_strength < 0.0 {
            return err(format!(
                "min_strength (the ALiBi strength floor) must be >= 0, got {}",
                self.min_strength
            ));
        }
        if self.content_read_max_gamma < 0.0 {
            return err(format!(
                "content_read_max_gamma must be >= 0, got {}",
                self.content_read_max_gamma
            ));
        }
        check_params_fit(self)
    }
}

/// What a config key holds: type errors then name the key (serde's messages for a struct
/// field do not), and `-1` for a size says which size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// a whole number >= 0
    UInt,
    /// a number
    Float,
    Bool,
    Str,
    /// `[a, b]` (the betas)
    FloatPair,
    /// a string or null
    OptStr,
    /// true, false or null
    OptBool,
    /// `["a", "b"]` (parameter-name globs)
    StrList,
    /// baseline | online | intervene
    Variant,
}

/// Every `ModelConfig` field (the serialised names) and its kind.
pub const MODEL_FIELDS: &[(&str, Kind)] = &[
    ("vocab_size", Kind::UInt),
    ("max_seq_len", Kind::UInt),
    ("embed_dim", Kind::UInt),
    ("num_layers", Kind::UInt),
    ("num_heads", Kind::UInt),
    ("num_slots", Kind::UInt),
    ("mlp_ratio", Kind::Float),
    ("dropout", Kind::Float),
    ("tie_weights", Kind::Bool),
    ("read_temperature", Kind::Float),
    ("write_temperature", Kind::Float),
    ("slot_dropout", Kind::Float),
    ("state_fp32", Kind::Bool),
    ("normalize_k", Kind::Bool),
    ("use_abs_pos", Kind::Bool),
    ("use_rope_keys", Kind::Bool),
    ("rope_base", Kind::Float),
    ("use_alibi_write", Kind::Bool),
    ("alibi_strength_init", Kind::Float),
    ("learn_alibi_strength", Kind::Bool),
    ("min_strength", Kind::Float),
    ("use_content_read", Kind::Bool),
    ("content_read_init", Kind::Float),
    ("content_read_max_gamma", Kind::Float),
    ("write_chunk_size", Kind::UInt),
    ("slotspace_dim", Kind::UInt),
    ("slotspace_chunk_size", Kind::UInt),
    ("use_slotspace_refine", Kind::Bool),
    ("slotspace_gate_init", Kind::Float),
    ("slotspace_dropout", Kind::Float),
    ("slotspace_signed_weights", Kind::Bool),
    ("use_rope_slotspace", Kind::Bool),
    ("rope_base_slotspace", Kind::Float),
    ("mlp_bias", Kind::OptBool),
    ("variant", Kind::Variant),
    ("seed", Kind::UInt),
];

/// Training fields of the reference's `ASMTrainConfig` that `asa train` reads (same meaning).
pub const REFERENCE_TRAIN_FIELDS: &[(&str, Kind)] = &[
    ("stride_frac_val", Kind::Float),
    ("batch_size", Kind::UInt),
    ("learning_rate", Kind::Float),
    ("weight_decay", Kind::Float),
    ("betas", Kind::FloatPair),
    ("grad_clip", Kind::Float),
    ("warmup_steps", Kind::UInt),
    ("total_steps", Kind::UInt),
    ("eval_interval", Kind::UInt),
    ("tag", Kind::Str),
    ("micro_batch_size", Kind::UInt),
    ("grad_accum_steps", Kind::UInt),
];

/// Fields of the reference's `ASMTrainConfig` (`src/asa/config.py` and the training notebooks'
/// versions) that this implementation has no use for: data sources, caches, logging, compile
/// switches. A reference config carries them (`asdict(cfg)`), so they are accepted, and ignored.
pub const REFERENCE_IGNORED_FIELDS: &[&str] = &[
    "dataset_name",
    "dataset_config",
    "tokenizer_name",
    "train_samples_target",
    "val_samples_target",
    "log_interval",
    "enable_compiled",
    "cache_dir",
    "val_windows_cache",
    "resume_path",
    "eval_max_batches",
    "analytics_last_k",
    "output_dir",
];

/// The aliases the reference's loader (`load_pretrained._normalize_cfg`) maps onto field names,
/// applied the same way (the field's own name wins when both are present).
pub const REFERENCE_ALIASES: &[(&str, &str)] = &[
    ("n_layer", "num_layers"),
    ("n_head", "num_heads"),
    ("n_embd", "embed_dim"),
    ("n_ctx", "max_seq_len"),
    ("n_positions", "max_seq_len"),
    ("n_slots", "num_slots"),
    ("slotspace_size", "slotspace_dim"),
    ("slotspace", "slotspace_dim"),
];

/// Edit distance (insertions, deletions, substitutions) between two keys.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Common other names of config keys, tried before the edit distance.
const KEY_ALIASES: &[(&str, &str)] = &[
    ("lr", "learning_rate"),
    ("wd", "weight_decay"),
    ("steps", "total_steps"),
    ("max_steps", "total_steps"),
    ("max_iters", "total_steps"),
    ("n_layer", "num_layers"),
    ("n_head", "num_heads"),
    ("n_embd", "embed_dim"),
    ("block_size", "max_seq_len"),
    ("seq_len", "max_seq_len"),
    ("clip", "grad_clip"),
];

/// The known key closest to `key`, when it is close enough to be the intended one: a small
/// edit distance (`embedd_dim` -> `embed_dim`), else a known key that contains it (`warmup` ->
/// `warmup_steps`).
pub fn closest_key<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = key.to_ascii_lowercase();
    // the usual short names (nanoGPT's, our train-mini flags'): `lr` is 3 edits from `tag`
    // but means `learning_rate`
    if let Some((_, to)) = KEY_ALIASES.iter().find(|(from, _)| *from == lower) {
        if let Some(k) = known.iter().find(|k| *k == to) {
            return Some(k);
        }
    }
    let near = known
        .iter()
        .map(|k| (edit_distance(&lower, k), *k))
        .min()
        .filter(|(d, k)| *d <= 3.max(k.len() / 4));
    if let Some((_, k)) = near {
        return Some(k);
    }
    known
        .iter()
        .filter(|k| lower.len() >= 4 && k.contains(lower.as_str()))
        .min_by_key(|k| k.len())
        .copied()
}

/// Rejects the first key of `map` that is not in `known`, with the closest known key.
pub fn check_known_keys(
    map: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
) -> Result<()> {
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            let hint = match closest_key(key, known) {
                Some(k) => format!("; did you mean `{k}`?"),
                None => "; it is neither an ASMTrainConfig field of the reference nor one of ours"
                    .to_string(),
            };
            return Err(AsaError::Config(format!("unknown key `{key}`{hint}")));
        }
    }
    Ok(())
}

pub(crate) fn json_kind(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => format!("\"{s}\""),
        serde_json::Value::Array(_) => "an array".into(),
        serde_json::Value::Object(_) => "a table".into(),
    }
}

/// Checks the type of each key of `map` that `fields` names, naming the key on a mismatch.
pub fn check_kinds(
    map: &serde_json::Map<String, serde_json::Value>,
    fields: &[(&str, Kind)],
) -> Result<()> {
    use serde_json::Value as V;
    for (key, kind) in fields {
        let Some(v) = map.get(*key) else { continue };
        let ok = match kind {
            Kind::UInt => v.as_u64().is_some_and(|x| usize::try_from(x).is_ok()),
            Kind::Float => v.is_number(),
            Kind::Bool => v.is_boolean(),
            Kind::Str => v.is_string(),
            Kind::OptStr => v.is_string() || v.is_null(),
            Kind::OptBool => v.is_boolean() || v.is_null(),
            Kind::FloatPair => {
                matches!(v, V::Array(a) if a.len() == 2 && a.iter().all(|x| x.is_number()))
            }
            Kind::Variant => v.as_str().is_some_and(|s| s.parse::<Variant>().is_ok()),
            Kind::StrList => matches!(v, V::Array(a) if a.iter().all(|x| x.is_string())),
        };
        if !ok {
            let want = match kind {
                Kind::UInt => "a whole number >= 0",
                Kind::Float => "a number",
                Kind::Bool => "true or false",
                Kind::Str => "a string",
                Kind::OptStr => "a string",
                Kind::OptBool => "true or false",
                Kind::FloatPair => "two numbers, [a, b]",
                Kind::Variant => "\"baseline\", \"online\" or \"intervene\"",
                Kind::StrList => "a list of strings, [\"a\", \"b\"]",
            };
            return Err(AsaError::Config(format!(
                "`{key}` must be {want}, got {}",
                json_kind(v)
            )));
        }
    }
    Ok(())
}

/// The error of a config whose sizes overflow a 64-bit count.
pub fn size_overflow(cfg: &ModelConfig) -> AsaError {
    AsaError::Config(format!(
        "the model sizes overflow a 64-bit parameter count (vocab_size {}, embed_dim {}, num_layers {}, num_heads {}, num_slots {}, slotspace_dim {}, mlp_ratio {}): no machine can hold this model",
        cfg.vocab_size,
        cfg.embed_dim,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_slots,
        cfg.slotspace_dim,
        cfg.mlp_ratio
    ))
}

/// Parameters of the model `LmIds::build(cfg)` builds (the tied head counted once), with
/// checked arithmetic: None when the count overflows u64.
pub fn param_count(cfg: &ModelConfig) -> Option<u64> {
    let u = |x: usize| x as u64;
    let (c, v, h, k, m) = (
        u(cfg.embed_dim),
        u(cfg.vocab_size),
        u(cfg.num_heads),
        u(cfg.num_slots),
        u(cfg.slotspace_dim),
    );
    let hid = u(cfg.hidden_dim());
    let d = c / h.max(1);
    let mut attn = h.checked_mul(k)?.checked_mul(d)?; // slot_keys
    attn = attn.checked_add(c.checked_mul(c)?.checked_mul(4)?)?; // Wk, Wv, Wq, out_proj
    attn += u64::from(cfg.use_alibi_write && cfg.learn_alibi_strength); // alibi strength
    attn += u64::from(cfg.use_content_read); // content-read gamma
    if cfg.use_slotspace_refine {
        let mk = m.checked_mul(k)?.checked_mul(2)?; // slot_in, slot_out
        let mm = m.checked_mul(m)?.checked_mul(3)?; // slot_q, slot_k, slot_v
        attn = attn.checked_add(mk)?.checked_add(mm)?.checked_add(1)?;
    }
    let mut block = attn.checked_add(c.checked_mul(4)?)?; // ln_1, ln_2
    block = block.checked_add(hid.checked_mul(c)?.checked_mul(2)?)?; // mlp.0, mlp.3
    if cfg.has_mlp_bias() {
        block = block.checked_add(hid)?.checked_add(c)?;
    }
    let mut total = v.checked_mul(c)?; // token_emb
    if cfg.use_abs_pos {
        total = total.checked_add(u(cfg.max_seq_len).checked_mul(c)?)?;
    }
    total = total.checked_add(block.checked_mul(u(cfg.num_layers))?)?;
    total = total.checked_add(c.checked_mul(2)?)?; // ln_f
    if !cfg.tie_weights {
        total = total.checked_add(v.checked_mul(c)?)?;
    }
    Some(total)
}

/// The guard of every model construction (called by `ModelConfig::validate`): the parameter
/// count must not overflow, and the weights alone must fit in the available host memory. A
/// config read from an untrusted file then gives this error, not an allocation abort.
pub fn check_params_fit(cfg: &ModelConfig) -> Result<()> {
    let p = param_count(cfg).ok_or_else(|| size_overflow(cfg))?;
    let bytes = p.checked_mul(4).ok_or_else(|| size_overflow(cfg))?; // f32 weights
    if let Some(avail) = host_available() {
        if bytes > avail {
            return Err(AsaError::Config(format!(
                "the model has {p} parameters: {} for the weights alone, but {} of memory is available (MemAvailable); lower embed_dim, num_layers, vocab_size or mlp_ratio",
                human(bytes),
                human(avail)
            )));
        }
    }
    Ok(())
}

/// Arithmetic precision of the GPU path (`backend::cuda::layer`'s module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere (f64 accumulation where the CPU twin uses it)
    #[default]
    F32,
    /// GEMM inputs rounded to bf16, f32 accumulation; the scan, read and linear attention on
    /// tensor cores (bf16 operands, f32 sums); everything else f32
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = AsaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            o => Err(AsaError::Input(format!(
                "unknown precision '{o}' (expected f32 or bf16)"
            ))),
        }
    }
}

/// Where a run's steps execute (the resolved `--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Place {
    #[default]
    Cpu,
    Cuda,
}

impl Place {
    pub fn is_cuda(self) -> bool {
        self == Place::Cuda
    }
}

/// AdamW hyper-parameters (`lr` is the base rate; `AdamW::step` takes the scheduled rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW` defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
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
    fn model_fields_list_every_serialised_field() {
        let c = ModelConfig {
            mlp_bias: Some(true),
            ..Default::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        let mut got: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want: Vec<&str> = MODEL_FIELDS.iter().map(|(k, _)| *k).collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        // our own serialised config reads back
        assert_eq!(ModelConfig::from_json_value(&v).unwrap(), c);
    }

    #[test]
    fn unknown_keys_name_the_closest_known_key() {
        let v = serde_json::json!({"embedd_dim": 64});
        let e = ModelConfig::from_json_value(&v).unwrap_err().to_string();
        assert!(e.contains("did you mean `embed_dim`?"), "{e}");
        assert_eq!(
            closest_key("warmup", &["warmup_steps", "total_steps"]),
            Some("warmup_steps")
        );
        assert_eq!(
            closest_key("qqqqqqqq", &["warmup_steps", "total_steps"]),
            None
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let v = serde_json::json!({"num_slots": -1});
        let e = ModelConfig::from_json_value(&v).unwrap_err().to_string();
        assert!(e.contains("`num_slots`"), "{e}");
    }

    #[test]
    fn short_names_suggest_the_key_they_mean() {
        // `lr` is 3 edits from `tag`; the alias wins, and only names a key that exists
        assert_eq!(
            closest_key("lr", &["tag", "learning_rate"]),
            Some("learning_rate")
        );
        assert_eq!(
            closest_key("LR", &["tag", "learning_rate"]),
            Some("learning_rate")
        );
        assert_eq!(closest_key("n_embd", &["embed_dim"]), Some("embed_dim"));
        assert_eq!(closest_key("lr", &["tag"]), Some("tag"));
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
