//! `asa infos`: the per-layer analysis tensors of a checkpoint on given text, written to one
//! safetensors file for analysis elsewhere (Python, Julia, ...). Each prompt runs alone (batch 1,
//! eval mode, no padding) through the CPU model, or its GPU twin (`GpuLm::forward_infos`, the
//! same assembly of the same tensors), with `return_info`, the reference's
//! `return_info=True`; its tensors are stored as `prompt{P}.layer{L}.{key}` (f32, the shapes of
//! the info dict with B = 1), beside `prompt{P}.input_ids` (the token ids as f32, exact below
//! 2^24) and, with `--logits`, `prompt{P}.logits` [1,T,V]. The file's metadata holds the prompts,
//! their tokens as text, the model config and a description of every key (`describe`).

use std::collections::HashMap;
use std::path::Path;

use crate::data::tokenizer::Tokenizer;
use crate::error::{AsaError, Result};
use crate::model::lm::{Lm, LmCache};
use crate::model::params::ParamStore;
use crate::vocab::options::AsaOptions;

/// What each info key holds (B = 1 here; H heads, K slots, T positions, d = head_dim). Keys not
/// listed are described as "see docs/METHOD.md".
pub const KEYS: &[(&str, &str)] = &[
    (
        "attn_out",
        "[B,T,C] the attention layer's output (after out_proj)",
    ),
    (
        "write_logits_raw",
        "[B,H,K,T] slot_keys . k / sqrt(d) before temperature and ALiBi",
    ),
    (
        "write_logits",
        "[B,H,K,T] the write logits the scan uses (temperature, ALiBi; -inf at padding)",
    ),
    (
        "read_logits",
        "[B,H,T,K] the read logits (key part + gamma x content part)",
    ),
    ("read_logits_key", "[B,H,T,K] q . slot_keys / sqrt(d)"),
    (
        "read_logits_content",
        "[B,H,T,K] q . S_t / sqrt(d) (content read on)",
    ),
    (
        "read_weights",
        "[B,H,T,K] the read weights (softmax over slots, or the routing mode's)",
    ),
    (
        "slot_state_norm",
        "[B,H,K,T] |S_t| per slot: the slot states' norms over time",
    ),
    (
        "alibi_bias_applied",
        "[1,H,1,T] the ALiBi bias added to the write logits",
    ),
    (
        "alibi_strength",
        "[] the ALiBi strength (softplus of the learned parameter + min)",
    ),
    (
        "alibi_strength_mean",
        "[] the same, as the reference's summary",
    ),
    ("content_read_gamma", "[] the content-read gamma"),
    (
        "content_read_gamma_mean",
        "[] the same, as the reference's summary",
    ),
    ("entropy_mean", "[] mean entropy of the read weights"),
    ("top1freq_mean", "[] mean share of the most read slot"),
    (
        "slotspace_gate",
        "[] the refine gate softplus(_slotspace_gate_raw)",
    ),
    (
        "slotspace_gate_mean",
        "[] the same, as the reference's summary",
    ),
    (
        "slotspace_delta_norm",
        "[] mean norm of the refine's gated delta",
    ),
    (
        "slotspace_delta",
        "[B,H,T,d] the refine's gated contribution g sum_k w_k S_k to the heads' output",
    ),
    (
        "slotspace_weights",
        "[B,H,T,K] the refine's slot weights w (tanh or softmax of its slot logits)",
    ),
    (
        "slot_w",
        "[B,H,T,K] intervene variant: the refine's slot logits before tanh / softmax",
    ),
    (
        "delta",
        "[B,H,T,d] intervene variant: the refine's gated delta g sum_k w_k S_k",
    ),
    (
        "out1",
        "[B,H,T,d] intervene variant: the base read sum_k rw S_k (before the refine)",
    ),
];

/// The description of an info key.
pub fn describe(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, d)| *d)
        .unwrap_or("see docs/METHOD.md")
}

/// What `run` collected.
pub struct InfosReport {
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub metadata: HashMap<String, String>,
}

/// Runs every prompt through `lm` (or `gpu`, the same model on the GPU) and gathers the info
/// tensors of `layers` (all when None).
#[allow(clippy::too_many_arguments)]
pub fn run(
    lm: &mut Lm,
    mut gpu: Option<&mut crate::backend::cuda::GpuLm>,
    params: &ParamStore,
    tok: &Tokenizer,
    prompts: &[String],
    layers: Option<&[usize]>,
    logits: bool,
    controls: &AsaOptions,
) -> Result<InfosReport> {
    let nl = lm.cfg.num_layers;
    if let Some(bad) = layers.and_then(|l| l.iter().find(|&&x| x >= nl)) {
        return Err(AsaError::Input(format!(
            "--layers: layer {bad} does not exist (the model has {nl} layers, 0..{})",
            nl - 1
        )));
    }
    if prompts.is_empty() {
        return Err(AsaError::Input(
            "no prompts: give --prompt TEXT... or --text FILE".into(),
        ));
    }
    let opts = AsaOptions {
        return_info: true,
        attention_mask: None,
        ..controls.clone()
    };
    let mut tensors = Vec::new();
    let mut token_text = Vec::new();
    let mut cache = LmCache::default();
    for (pi, prompt) in prompts.iter().enumerate() {
        let ids = tok.encode(prompt)?;
        if ids.is_empty() {
            return Err(AsaError::Input(format!("prompt {pi} has no tokens")));
        }
        let t = ids.len();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= lm.cfg.vocab_size) {
            return Err(AsaError::Input(format!(
                "prompt {pi} gives token id {bad}, outside the model's vocab_size {}",
                lm.cfg.vocab_size
            )));
        }
        let infos = match gpu.as_deref_mut() {
            Some(g) => {
                let (l, infos) = g.forward_infos(&ids, 1, t, &opts)?;
                cache.logits = l;
                infos
            }
            None => lm
                .forward(params, &ids, 1, t, &opts, &mut cache)?
                .unwrap_or_default(),
        };
        tensors.push((
            format!("prompt{pi}.input_ids"),
            vec![1, t],
            ids.iter().map(|&x| x as f32).collect(),
        ));
        for (li, info) in infos.into_iter().enumerate() {
            if layers.is_some_and(|l| !l.contains(&li)) {
                continue;
            }
            for (key, (shape, data)) in info {
                tensors.push((format!("prompt{pi}.layer{li}.{key}"), shape, data));
            }
        }
        if logits {
            tensors.push((
                format!("prompt{pi}.logits"),
                vec![1, t, lm.cfg.vocab_size],
                cache.logits.clone(),
            ));
        }
        let pieces: Result<Vec<String>> = ids.iter().map(|&i| tok.decode(&[i])).collect();
        token_text.push(pieces?);
    }
    let mut keys: Vec<&str> = tensors
        .iter()
        .filter_map(|(n, _, _)| n.split_once(".layer").and_then(|(_, r)| r.split_once('.')))
        .map(|(_, k)| k)
        .collect();
    keys.sort();
    keys.dedup();
    let described: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| (k.to_string(), describe(k).into()))
        .collect();
    let mut metadata = HashMap::new();
    let js = |v: serde_json::Value| v.to_string();
    metadata.insert("prompts".into(), js(serde_json::json!(prompts)));
    metadata.insert("tokens".into(), js(serde_json::json!(token_text)));
    metadata.insert("keys".into(), js(serde_json::Value::Object(described)));
    metadata.insert(
        "config".into(),
        serde_json::to_string(&lm.cfg).map_err(|e| AsaError::Other(e.to_string()))?,
    );
    Ok(InfosReport { tensors, metadata })
}

/// Writes the report (temporary file, then renamed).
pub fn write(r: &InfosReport, path: &Path) -> Result<()> {
    let views: Vec<(String, Vec<usize>, &[f32])> = r
        .tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    crate::checkpoint::write_safetensors(path, &views, Some(r.metadata.clone()))
}
