//! Checkpoints: safetensors load/save with the reference's PyTorch key names, legacy key names,
//! and import of the training notebooks' `torch.save` `.pt` files.
//!
//! - [`st`]: safetensors reading (any common dtype) and atomic writing;
//! - [`torch_pt`]: a data-only pickle VM and `torch.save` zip reader;
//! - [`legacy`]: legacy key-name mapping;
//! - here: strict loading into a [`ParamStore`], saving, format detection and `asa convert`.

pub mod legacy;
pub mod st;
pub mod torch_pt;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

pub use legacy::{normalize_key, normalize_keys};
pub use st::{
    read_safetensors, read_safetensors_with_metadata, write_atomic, write_bytes_atomic,
    write_safetensors, AnyTensor, TensorData,
};
pub use torch_pt::{load_pickle, read_pt, PtCheckpoint, PyValue};

use crate::config::ModelConfig;
use crate::error::{AsaError, Result};
use crate::model::params::{LmIds, ParamStore};

/// A checkpoint error (the readers' shorthand).
pub(crate) fn ck(msg: String) -> AsaError {
    AsaError::Checkpoint(msg)
}

/// Keys of non-persistent buffers (recomputed from the config); ignored when found in a file.
fn is_non_persistent_buffer(key: &str) -> bool {
    key.ends_with("_alibi_slopes")
        || key.ends_with("rope.inv_freq")
        || key.ends_with("rope_slotspace.inv_freq")
}

/// Scalars: PyTorch stores `[]`; `[1]` is accepted for a scalar too (and vice versa).
fn shapes_compatible(want: &[usize], found: &[usize]) -> bool {
    if want == found {
        return true;
    }
    let scalarish = |s: &[usize]| s.is_empty() || s == [1];
    scalarish(want) && scalarish(found)
}

fn list_keys(keys: &[&str]) -> String {
    const SHOW: usize = 10;
    let mut s = keys
        .iter()
        .take(SHOW)
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOW {
        s.push_str(&format!(" (and {} more)", keys.len() - SHOW));
    }
    s
}

/// Refuses weights holding NaN or infinity. A single non-finite weight makes every loss, margin
/// and gradient downstream NaN, so a corrupt or diverged checkpoint would otherwise "work" and
/// print NaN results with exit 0. `name` says which tensor (and file) in the message.
pub fn ensure_finite(name: &str, data: &[f32]) -> Result<()> {
    let Some(first) = data.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    let bad = data[first..].iter().filter(|x| !x.is_finite()).count();
    Err(ck(format!(
        "{name}: {bad} of {} values are not finite (NaN or infinity; the first, at index {first}, \
         is {}): refusing a corrupt or diverged checkpoint",
        data.len(),
        data[first]
    )))
}

/// A lower bound on the parameter values a model of `cfg` has (embeddings and MLPs only),
/// computed without allocating: u128 so that no config overflows it.
pub fn min_param_values(cfg: &ModelConfig) -> u128 {
    let (v, c, t, l) = (
        cfg.vocab_size as u128,
        cfg.embed_dim as u128,
        cfg.max_seq_len as u128,
        cfg.num_layers as u128,
    );
    let hid = (cfg.embed_dim as f64 * cfg.mlp_ratio).clamp(0.0, 1e30) as u128;
    let pos = if cfg.use_abs_pos { t * c } else { 0 };
    v * c + pos + l * (2 * hid * c + 4 * c)
}

/// Refuses a config (read from a file's metadata or a `.pt`'s `cfg`) that needs more
/// parameter values than `tensors` hold in all, before a model of it is allocated: a corrupt
/// or mismatched config (`embed_dim = 1048576`) must be an error, not a multi-terabyte
/// allocation. `source` names the file.
pub fn ensure_config_fits(
    cfg: &ModelConfig,
    tensors: &BTreeMap<String, AnyTensor>,
    source: &str,
) -> Result<()> {
    let held: u128 = tensors.values().map(|t| t.len() as u128).sum();
    let need = min_param_values(cfg);
    if need > held {
        return Err(ck(format!(
            "{source}: the model config (vocab_size {}, embed_dim {}, num_layers {}, max_seq_len {}) \
             needs at least {need} parameter values but the file holds {held}: config and weights \
             do not match (corrupt metadata or the wrong config)",
            cfg.vocab_size, cfg.embed_dim, cfg.num_layers, cfg.max_seq_len
        )));
    }
    Ok(())
}

/// Loads `tensors` into an already-built store, strictly: every store parameter must be present
/// with the same shape (a scalar may be stored as `[]` or `[1]`) and a floating dtype; extra keys
/// are an error, except `lm_head.weight` when the store has none (tied head: it must have
/// `token_emb.weight`'s shape; its values are ignored) and non-persistent buffers
/// (`*_alibi_slopes`, `rope.inv_freq`, `rope_slotspace.inv_freq`). `source` names the file in
/// messages. On error the store is left unchanged.
pub fn load_into(
    store: &mut ParamStore,
    tensors: &BTreeMap<String, AnyTensor>,
    source: &str,
) -> Result<()> {
    let mut missing = Vec::new();
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(store.len());
    for (name, shape) in store.names.iter().zip(&store.shapes) {
        let Some(t) = tensors.get(name) else {
            missing.push(name.as_str());
            continue;
        };
        if !shapes_compatible(shape, &t.shape) {
            return Err(ck(format!(
                "{source}: parameter '{name}' has shape {:?}, expected {shape:?}",
                t.shape
            )));
        }
        let data = t.to_f32().ok_or_else(|| {
            ck(format!(
                "{source}: parameter '{name}' has dtype {}, expected a floating type (F32, F64, F16, BF16)",
                t.dtype_name()
            ))
        })?;
        if data.len() != crate::vocab::params::numel(shape) {
            return Err(ck(format!(
                "{source}: parameter '{name}' holds {} values, expected {}",
                data.len(),
                crate::vocab::params::numel(shape)
            )));
        }
        ensure_finite(&format!("{source}: parameter '{name}'"), &data)?;
        values.push(data);
    }
    if !missing.is_empty() {
        return Err(ck(format!(
            "{source}: missing {} parameter(s): {}",
            missing.len(),
            list_keys(&missing)
        )));
    }
    let mut unexpected = Vec::new();
    for (key, t) in tensors {
        if store.id(key).is_some() || is_non_persistent_buffer(key) {
            continue;
        }
        if key == "lm_head.weight" {
            if let Some(emb) = store.id("token_emb.weight") {
                let want = &store.shapes[emb];
                if &t.shape != want {
                    return Err(ck(format!(
                        "{source}: tied 'lm_head.weight' has shape {:?}, expected token_emb.weight's {want:?}",
                        t.shape
                    )));
                }
                continue;
            }
        }
        unexpected.push(key.as_str());
    }
    if !unexpected.is_empty() {
        return Err(ck(format!(
            "{source}: unexpected key(s) not in the model: {} (wrong config, e.g. mlp_bias / use_abs_pos / \
             tie_weights / num_layers?)",
            list_keys(&unexpected)
        )));
    }
    for (dst, src) in store.data.iter_mut().zip(values) {
        *dst = src;
    }
    Ok(())
}

/// Saves a store to safetensors with its names, adding `lm_head.weight` (a copy of
/// `token_emb.weight`) when `tied`, as the reference's `state_dict` does. Atomic. Metadata:
/// `format: pt`, `asa_version`, and `asa_config` (the config as JSON) when given.
pub fn save_params(
    path: &Path,
    store: &ParamStore,
    tied: bool,
    config: Option<&ModelConfig>,
) -> Result<()> {
    let what = path.display();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = store
        .names
        .iter()
        .zip(&store.shapes)
        .zip(&store.data)
        .map(|((n, s), d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    if tied {
        if store.id("lm_head.weight").is_some() {
            return Err(ck(format!(
                "{what}: cannot save a tied head: the store already has its own 'lm_head.weight'"
            )));
        }
        let emb = store.id("token_emb.weight").ok_or_else(|| {
            ck(format!(
                "{what}: cannot save a tied head: no 'token_emb.weight'"
            ))
        })?;
        tensors.push((
            "lm_head.weight".to_string(),
            store.shapes[emb].clone(),
            store.data[emb].as_slice(),
        ));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "asa_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    if let Some(cfg) = config {
        let json = serde_json::to_string(cfg)
            .map_err(|e| ck(format!("{what}: cannot encode config: {e}")))?;
        meta.insert("asa_config".to_string(), json);
    }
    write_safetensors(path, &tensors, Some(meta))
}

/// A checkpoint read by [`read_checkpoint`].
#[derive(Debug, Clone)]
pub struct LoadedCheckpoint {
    /// Tensors with the library's key names.
    pub tensors: BTreeMap<String, AnyTensor>,
    /// The model config, if the file (or a `config.json` next to it) has one.
    pub config: Option<ModelConfig>,
    /// Whether any key was renamed from a legacy name.
    pub legacy: bool,
}

/// Whether any `blocks.N.mlp.0.bias` key exists.
pub fn keys_have_mlp_bias<'a>(mut keys: impl Iterator<Item = &'a String>) -> bool {
    keys.any(|k| {
        k.strip_prefix("blocks.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(n, tail)| {
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && tail == "mlp.0.bias"
            })
    })
}

fn config_from_json(v: &serde_json::Value, source: &str) -> Result<ModelConfig> {
    ModelConfig::from_json_value(v).map_err(|e| ck(format!("{source}: {e}")))
}

/// A `config.json` next to `path`, if it exists and looks like a model config (has the
/// model's `vocab_size` or `embed_dim`, at top level or under `model`).
fn sidecar_config(path: &Path) -> Result<Option<ModelConfig>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let cpath = dir.join("config.json");
    if !cpath.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cpath)
        .map_err(|e| ck(format!("cannot read {}: {e}", cpath.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ck(format!("{} is not valid JSON: {e}", cpath.display())))?;
    let obj = v.get("model").unwrap_or(&v);
    if obj.get("vocab_size").is_none() && obj.get("embed_dim").is_none() {
        return Ok(None);
    }
    config_from_json(&v, &cpath.display().to_string()).map(Some)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Torch,
    Safetensors,
}

fn detect_format(path: &Path) -> Result<Format> {
    let what = path.display();
    let mut f = std::fs::File::open(path).map_err(|e| ck(format!("cannot open {what}: {e}")))?;
    let file_len = f
        .metadata()
        .map_err(|e| ck(format!("cannot read {what}: {e}")))?
        .len();
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(ck(format!("cannot read {what}: {e}"))),
        }
    }
    // safetensors: 8-byte header length that fits the file, then the JSON header's '{'
    if got == 9 {
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&head[..8]);
        let n = u64::from_le_bytes(n8);
        if head[8] == b'{' && n.checked_add(8).is_some_and(|end| end <= file_len) {
            return Ok(Format::Safetensors);
        }
    }
    // torch.save: a zip archive, or a pre-1.6 raw pickle (rejected with a clear message)
    if (got >= 2 && &head[..2] == b"PK") || (got >= 1 && head[0] == 0x80) {
        return Ok(Format::Torch);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(match ext.as_str() {
        "pt" | "pth" | "ckpt" | "bin" => Format::Torch,
        _ => Format::Safetensors,
    })
}

/// Reads a checkpoint of either format (safetensors, or a `torch.save` zip; detected from the
/// file's first bytes, then its extension), normalises legacy key names, and finds the config:
/// the `.pt` file's `cfg`, the safetensors metadata `asa_config`, or a `config.json` next to the
/// file. A config without `mlp_bias` gets it from the keys (`blocks.N.mlp.0.bias` present).
/// Loaders that build a model from the config call [`ensure_config_fits`] first.
pub fn read_checkpoint(path: &Path) -> Result<LoadedCheckpoint> {
    let source = path.display().to_string();
    let (tensors, mut config) = match detect_format(path)? {
        Format::Torch => {
            let pt = read_pt(path)?;
            let cfg = match &pt.cfg {
                Some(v) => Some(config_from_json(v, &format!("{source}: cfg"))?),
                None => None,
            };
            (pt.state_dict, cfg)
        }
        Format::Safetensors => {
            let (t, meta) = read_safetensors_with_metadata(path)?;
            let cfg = match meta.get("asa_config") {
                Some(s) => {
                    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| {
                        ck(format!(
                            "{source}: metadata asa_config is not valid JSON: {e}"
                        ))
                    })?;
                    Some(config_from_json(
                        &v,
                        &format!("{source}: metadata asa_config"),
                    )?)
                }
                None => None,
            };
            (t, cfg)
        }
    };
    if config.is_none() {
        config = sidecar_config(path)?;
    }
    let (tensors, legacy) = normalize_keys(tensors);
    if let Some(c) = config.as_mut() {
        if c.mlp_bias.is_none() {
            c.mlp_bias = Some(keys_have_mlp_bias(tensors.keys()));
        }
    }
    Ok(LoadedCheckpoint {
        tensors,
        config,
        legacy,
    })
}

/// Whether two paths name one existing file (through links and `..` too).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// What [`convert_pt`] did.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// Tensors written (parameters, plus `lm_head.weight` for a tied head).
    pub num_tensors: usize,
    /// Parameter elements (the tied head counted once).
    pub num_elements: usize,
    pub legacy: bool,
    pub step: Option<i64>,
    pub best_val: Option<f64>,
    pub config_path: PathBuf,
}

/// `asa convert IN.pt OUT.safetensors`: reads the `.pt` file, normalises key names, takes the
/// config from `config` (a JSON file, fixture-style or bare) or else the file's `cfg`, infers
/// `mlp_bias` from the keys when unset, validates it, loads every parameter strictly, and writes
/// OUT (safetensors) and the config JSON (`config_out`, default `<OUT dir>/config.json`), both
/// atomically.
pub fn convert_pt(
    input: &Path,
    output: &Path,
    config: Option<&Path>,
    config_out: Option<&Path>,
) -> Result<ConvertSummary> {
    let source = input.display().to_string();
    let config_path = match config_out {
        Some(p) => p.to_path_buf(),
        None => match output.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.join("config.json"),
            _ => PathBuf::from("config.json"),
        },
    };
    // `asa convert ckpt.pt ckpt.pt` would replace the only copy of the checkpoint
    for (flag, out) in [("OUTPUT", output), ("--config-out", config_path.as_path())] {
        if same_file(input, out) {
            return Err(AsaError::Input(format!(
                "{flag} {} is the input checkpoint itself; writing it would replace the checkpoint: choose another path",
                out.display()
            )));
        }
    }
    let pt = read_pt(input)?;
    let (tensors, legacy) = normalize_keys(pt.state_dict);
    let mut cfg = match (config, &pt.cfg) {
        (Some(cpath), _) => {
            let text = std::fs::read_to_string(cpath)
                .map_err(|e| ck(format!("cannot read config {}: {e}", cpath.display())))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ck(format!("config {} is not valid JSON: {e}", cpath.display())))?;
            config_from_json(&v, &format!("config {}", cpath.display()))?
        }
        (None, Some(v)) => config_from_json(v, &format!("{source}: cfg"))?,
        (None, None) => {
            return Err(ck(format!(
                "{source} holds no model config (cfg); pass one with --config CONFIG.json"
            )))
        }
    };
    if cfg.mlp_bias.is_none() {
        cfg.mlp_bias = Some(keys_have_mlp_bias(tensors.keys()));
    }
    cfg.validate().map_err(|e| ck(format!("{source}: {e}")))?;
    ensure_config_fits(&cfg, &tensors, &source)?;
    let (mut store, _ids) = LmIds::build(&cfg);
    load_into(&mut store, &tensors, &source)?;
    save_params(output, &store, cfg.tie_weights, Some(&cfg))?;
    let mut json =
        serde_json::to_string_pretty(&cfg).map_err(|e| ck(format!("cannot encode config: {e}")))?;
    json.push('\n');
    write_bytes_atomic(&config_path, json.as_bytes())?;
    Ok(ConvertSummary {
        num_tensors: store.len() + usize::from(cfg.tie_weights),
        num_elements: store.num_elements(),
        legacy,
        step: pt.step,
        best_val: pt.best_val,
        config_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_pt() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy_pt/checkpoint.pt")
    }

    #[test]
    fn convert_refuses_to_write_over_its_input() {
        let td = tempfile::tempdir().unwrap();
        let pt = td.path().join("ckpt.pt");
        std::fs::copy(legacy_pt(), &pt).unwrap();
        let before = std::fs::read(&pt).unwrap();
        // the output, or the config written beside it, is the input: refused, input intact
        let e = convert_pt(&pt, &pt, None, None).unwrap_err().to_string();
        assert!(e.contains("is the input checkpoint"), "{e}");
        let other = td.path().join("out.safetensors");
        let e = convert_pt(&pt, &other, None, Some(&td.path().join("./ckpt.pt")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--config-out"), "{e}");
        assert_eq!(std::fs::read(&pt).unwrap(), before);
        assert!(!other.exists());
    }

    fn small_cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 11,
            embed_dim: 8,
            num_layers: 1,
            num_heads: 2,
            num_slots: 3,
            slotspace_dim: 4,
            mlp_bias: Some(false),
            ..Default::default()
        }
    }

    fn as_tensors(store: &ParamStore) -> BTreeMap<String, AnyTensor> {
        store
            .names
            .iter()
            .zip(&store.shapes)
            .zip(&store.data)
            .map(|((n, s), d)| (n.clone(), AnyTensor::from_f32(s.clone(), d.clone())))
            .collect()
    }

    #[test]
    fn legacy_keys_normalise() {
        let pt = read_pt(&legacy_pt()).unwrap();
        assert_eq!(pt.state_dict["tok.weight"].shape, vec![97, 48]);
        let (t, legacy) = normalize_keys(pt.state_dict.clone());
        assert!(legacy);
        for k in [
            "token_emb.weight",
            "blocks.0.ln_1.weight",
            "blocks.0.attn.slot_keys",
            "ln_f.weight",
        ] {
            assert!(t.contains_key(k), "missing {k}");
        }
        assert!(!keys_have_mlp_bias(t.keys()));
        assert_eq!(
            t["blocks.0.attn.slot_keys"],
            pt.state_dict["blocks.0.asa.slot_keys"]
        );
    }

    #[test]
    fn convert_legacy_pt() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        let s = convert_pt(&legacy_pt(), &out, None, None).unwrap();
        assert!(s.legacy);
        assert_eq!(s.config_path, dir.path().join("config.json"));
        assert!(s.step.is_some() && s.best_val.is_some());
        let t = read_safetensors(&out).unwrap();
        assert_eq!(t.len(), s.num_tensors);
        for k in [
            "token_emb.weight",
            "lm_head.weight",
            "blocks.1.attn._slotspace_gate_raw",
        ] {
            assert!(t.contains_key(k), "missing {k}");
        }
        assert_eq!(t["lm_head.weight"], t["token_emb.weight"]);
        assert!(!t.keys().any(|k| k.contains("mlp.0.bias")));
        // values survive the conversion
        let pt = read_pt(&legacy_pt()).unwrap();
        assert_eq!(
            t["blocks.0.attn.slot_keys"],
            pt.state_dict["blocks.0.asa.slot_keys"]
        );
        assert_eq!(t["ln_f.bias"], pt.state_dict["norm.bias"]);
        // config.json
        let cj: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&s.config_path).unwrap()).unwrap();
        assert_eq!(cj["mlp_bias"], false);
        assert_eq!(cj["vocab_size"], 97);
        // read back: config from metadata, no legacy names
        let back = read_checkpoint(&out).unwrap();
        assert!(!back.legacy);
        let cfg = back.config.unwrap();
        assert_eq!(cfg.embed_dim, 48);
        assert_eq!(cfg.mlp_bias, Some(false));
        // loads strictly into a fresh model
        let (mut store, _) = LmIds::build(&cfg);
        load_into(&mut store, &back.tensors, "out").unwrap();
        assert_eq!(
            store.get("blocks.0.attn.slot_keys").unwrap(),
            t["blocks.0.attn.slot_keys"].to_f32().unwrap()
        );
        // no temporary files left
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["config.json".to_string(), "model.safetensors".to_string()]
        );
    }

    #[test]
    fn read_checkpoint_pt_and_sidecar() {
        let c = read_checkpoint(&legacy_pt()).unwrap();
        assert!(c.legacy);
        let cfg = c.config.unwrap();
        assert_eq!(cfg.vocab_size, 97);
        assert_eq!(cfg.mlp_bias, Some(false));
        // safetensors without metadata: config.json next to it (fixture style)
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let a = [0.5f32; 4];
        write_safetensors(&p, &[("blocks.0.mlp.0.bias".into(), vec![4], &a)], None).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model": {"vocab_size": 5, "embed_dim": 8}}"#,
        )
        .unwrap();
        let c = read_checkpoint(&p).unwrap();
        let cfg = c.config.unwrap();
        assert_eq!(cfg.vocab_size, 5);
        assert_eq!(cfg.mlp_bias, Some(true));
    }

    #[test]
    fn convert_with_explicit_config() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        let cfg_path = dir.path().join("given.json");
        let fixture_cfg = legacy_pt().with_file_name("config.json");
        std::fs::copy(&fixture_cfg, &cfg_path).unwrap();
        let s = convert_pt(
            &legacy_pt(),
            &out,
            Some(&cfg_path),
            Some(&dir.path().join("c2.json")),
        )
        .unwrap();
        assert!(s.config_path.ends_with("c2.json") && s.config_path.is_file());
        // a wrong config is a clear, key-naming error
        std::fs::write(&cfg_path, r#"{"vocab_size": 97, "embed_dim": 48, "num_heads": 4, "num_layers": 3, "num_slots": 6, "slotspace_dim": 8}"#).unwrap();
        let e = convert_pt(&legacy_pt(), &out, Some(&cfg_path), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.2."), "{e}");
    }

    #[test]
    fn convert_bare_state_dict_needs_config() {
        use torch_pt::test_support::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bare.pt");
        let mut body = b"}(".to_vec();
        body.extend(s("module.tok.weight"));
        body.extend(tensor("0", 4, 0, &[2, 2], &[2, 1]));
        body.push(b'u');
        write_pt(&path, &body, &[("0", &[1.0, 2.0, 3.0, 4.0])]);
        let out = dir.path().join("o.safetensors");
        let e = convert_pt(&path, &out, None, None).unwrap_err().to_string();
        assert!(
            e.contains("bare.pt") && e.contains("no model config") && e.contains("--config"),
            "{e}"
        );
        assert!(!out.exists());
        let c = read_checkpoint(&path).unwrap();
        assert!(c.legacy && c.config.is_none());
        assert_eq!(
            c.tensors["token_emb.weight"].to_f32().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn load_into_errors_name_the_key() {
        let cfg = small_cfg();
        let (mut store, _) = LmIds::build(&cfg);
        let good = as_tensors(&store);
        load_into(&mut store, &good, "f").unwrap();

        let mut t = good.clone();
        t.remove("blocks.0.attn.slot_keys");
        let e = load_into(&mut store, &t, "f.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing")
                && e.contains("blocks.0.attn.slot_keys")
                && e.contains("f.safetensors"),
            "{e}"
        );

        let mut t = good.clone();
        t.insert(
            "blocks.0.mlp.0.bias".into(),
            AnyTensor::from_f32(vec![32], vec![0.0; 32]),
        );
        let e = load_into(&mut store, &t, "f").unwrap_err().to_string();
        assert!(
            e.contains("unexpected") && e.contains("blocks.0.mlp.0.bias"),
            "{e}"
        );

        let mut t = good.clone();
        t.insert(
            "ln_f.weight".into(),
            AnyTensor::from_f32(vec![7], vec![0.0; 7]),
        );
        let e = load_into(&mut store, &t, "f").unwrap_err().to_string();
        assert!(
            e.contains("ln_f.weight") && e.contains("[7]") && e.contains("[8]"),
            "{e}"
        );

        let mut t = good.clone();
        t.insert(
            "ln_f.weight".into(),
            AnyTensor::new(vec![8], TensorData::I64(vec![0; 8])),
        );
        let e = load_into(&mut store, &t, "f").unwrap_err().to_string();
        assert!(e.contains("ln_f.weight") && e.contains("I64"), "{e}");
        // an I32 tensor is reported as I32 (it is held widened to I64)
        let mut t = good.clone();
        let mut i32s = AnyTensor::new(vec![8], TensorData::I64(vec![0; 8]));
        i32s.stored_dtype = "I32";
        t.insert("ln_f.weight".into(), i32s);
        let e = load_into(&mut store, &t, "f").unwrap_err().to_string();
        assert!(e.contains("dtype I32,"), "{e}");

        // tied head: allowed with the right shape, rejected with a wrong one
        let mut t = good.clone();
        t.insert("lm_head.weight".into(), good["token_emb.weight"].clone());
        t.insert(
            "blocks.0.attn._alibi_slopes".into(),
            AnyTensor::from_f32(vec![2], vec![0.0; 2]),
        );
        t.insert(
            "blocks.0.attn.rope.inv_freq".into(),
            AnyTensor::from_f32(vec![2], vec![0.0; 2]),
        );
        load_into(&mut store, &t, "f").unwrap();
        t.insert(
            "lm_head.weight".into(),
            AnyTensor::from_f32(vec![1], vec![0.0]),
        );
        let e = load_into(&mut store, &t, "f").unwrap_err().to_string();
        assert!(e.contains("lm_head.weight"), "{e}");

        // scalars: [1] accepted for [], f64 converted; the store is updated
        let mut t = good.clone();
        t.insert(
            "blocks.0.attn._slotspace_gate_raw".into(),
            AnyTensor::new(vec![1], TensorData::F64(vec![1.25])),
        );
        load_into(&mut store, &t, "f").unwrap();
        assert_eq!(
            store.get("blocks.0.attn._slotspace_gate_raw").unwrap(),
            &[1.25]
        );
        // failures leave the store untouched
        let mut t = good.clone();
        t.insert(
            "blocks.0.attn._slotspace_gate_raw".into(),
            AnyTensor::from_f32(vec![], vec![9.0]),
        );
        t.remove("ln_f.bias");
        assert!(load_into(&mut store, &t, "f").is_err());
        assert_eq!(
            store.get("blocks.0.attn._slotspace_gate_raw").unwrap(),
            &[1.25]
        );
    }

    #[test]
    fn save_params_round_trip() {
        let cfg = small_cfg();
        let (store, _) = LmIds::build(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        save_params(&p, &store, true, Some(&cfg)).unwrap();
        let (t, meta) = read_safetensors_with_metadata(&p).unwrap();
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta["asa_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(t.len(), store.len() + 1);
        assert_eq!(t["lm_head.weight"], t["token_emb.weight"]);
        let back = read_checkpoint(&p).unwrap();
        assert_eq!(back.config.as_ref(), Some(&cfg));
        let (mut s2, _) = LmIds::build(&ModelConfig {
            seed: 9,
            ..cfg.clone()
        });
        load_into(&mut s2, &back.tensors, "s").unwrap();
        assert_eq!(s2.data, store.data);
        // untied: lm_head.weight is a parameter of its own
        let cfg_u = ModelConfig {
            tie_weights: false,
            ..cfg
        };
        let (su, _) = LmIds::build(&cfg_u);
        assert!(save_params(&p, &su, true, None).is_err());
        save_params(&p, &su, false, None).unwrap();
        assert_eq!(read_safetensors(&p).unwrap().len(), su.len());
    }

    #[test]
    fn format_detection_is_by_content() {
        let dir = tempfile::tempdir().unwrap();
        // a safetensors header whose length's first byte is 0x80 (like a pickle's PROTO opcode)
        let mut meta = HashMap::new();
        let mut pad = String::new();
        for _ in 0..200 {
            meta.insert("pad".to_string(), pad.clone());
            let p = dir.path().join("x.bin");
            let a = [1.0f32];
            write_safetensors(&p, &[("a".into(), vec![1], &a)], Some(meta.clone())).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            if bytes[0] == 0x80 {
                let c = read_checkpoint(&p).unwrap();
                assert_eq!(c.tensors["a"].to_f32().unwrap(), vec![1.0]);
                // the legacy .pt also loads under any extension
                let q = dir.path().join("model.weights");
                std::fs::copy(legacy_pt(), &q).unwrap();
                assert!(read_checkpoint(&q).unwrap().legacy);
                return;
            }
            pad.push('x');
        }
        panic!("no 0x80 header length produced");
    }

    #[test]
    fn bad_paths_and_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_checkpoint(&dir.path().join("none.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
        let e = read_checkpoint(&dir.path().join("none.pt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.pt"), "{e}");
        let e = convert_pt(
            &dir.path().join("none.pt"),
            &dir.path().join("o.safetensors"),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("none.pt"), "{e}");

        let full = std::fs::read(legacy_pt()).unwrap();
        let p = dir.path().join("t.pt");
        std::fs::write(&p, &full[..1000]).unwrap();
        let e = read_checkpoint(&p).unwrap_err().to_string();
        assert!(e.contains("t.pt"), "{e}");
        let e = convert_pt(&p, &dir.path().join("o.safetensors"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.pt"), "{e}");
        assert!(!dir.path().join("o.safetensors").exists());

        let st_full = std::fs::read(legacy_pt().with_file_name("io.safetensors")).unwrap();
        let p = dir.path().join("t.safetensors");
        std::fs::write(&p, &st_full[..20]).unwrap();
        let e = read_checkpoint(&p).unwrap_err().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        assert!(ensure_finite("x", &[0.0, -1.0, f32::MAX]).is_ok());
        let e = ensure_finite("x", &[0.0, f32::NAN, f32::INFINITY, 1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("x: 2 of 4") && e.contains("index 1"), "{e}");

        let cfg = small_cfg();
        let (mut store, _) = LmIds::build(&cfg);
        let good = as_tensors(&store);
        // all-NaN checkpoint
        let all_nan: BTreeMap<String, AnyTensor> = good
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    AnyTensor::from_f32(t.shape.clone(), vec![f32::NAN; t.len()]),
                )
            })
            .collect();
        let e = load_into(&mut store, &all_nan, "nan.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nan.safetensors") && e.contains("not finite"),
            "{e}"
        );
        // one infinity in one tensor (F64, overflowing f32) is named with its count
        let mut t = good.clone();
        let n = t["ln_f.weight"].len();
        let mut v = vec![1.0f64; n];
        v[3] = 1e300;
        t.insert(
            "ln_f.weight".into(),
            AnyTensor::new(vec![n], TensorData::F64(v)),
        );
        let e = load_into(&mut store, &t, "f").unwrap_err().to_string();
        assert!(
            e.contains("'ln_f.weight'") && e.contains(&format!("1 of {n}")),
            "{e}"
        );
        assert_eq!(store.data, as_tensors_data(&good, &store));
        // through a file: safetensors (probe's path) and .pt (convert's path)
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        save_params(&p, &store, cfg.tie_weights, Some(&cfg)).unwrap();
        let mut bad = store.clone();
        let i = bad.id("blocks.0.attn.slot_keys").unwrap();
        bad.data[i][0] = f32::NAN;
        save_params(&p, &bad, cfg.tie_weights, Some(&cfg)).unwrap();
        let c = read_checkpoint(&p).unwrap();
        let e = load_into(&mut store, &c.tensors, "m")
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.0.attn.slot_keys"), "{e}");

        use torch_pt::test_support::*;
        let pt = dir.path().join("nan.pt");
        let mut body = b"}(".to_vec();
        let keys: Vec<String> = (0..bad.len()).map(|i| i.to_string()).collect();
        for (i, (name, shape)) in bad.names.iter().zip(&bad.shapes).enumerate() {
            let mut stride = vec![1usize; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * shape[d + 1];
            }
            body.extend(s(name));
            body.extend(tensor(&keys[i], bad.data[i].len(), 0, shape, &stride));
        }
        body.push(b'u');
        let storages: Vec<(&str, &[f32])> = keys
            .iter()
            .map(|k| k.as_str())
            .zip(bad.data.iter().map(|d| d.as_slice()))
            .collect();
        write_pt(&pt, &body, &storages);
        let cfg_path = dir.path().join("c.json");
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let out = dir.path().join("o.safetensors");
        let e = convert_pt(&pt, &out, Some(&cfg_path), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nan.pt") && e.contains("blocks.0.attn.slot_keys") && e.contains("1 of"),
            "{e}"
        );
        // the same file without the NaN converts
        let storages: Vec<(&str, &[f32])> = keys
            .iter()
            .map(|k| k.as_str())
            .zip(store.data.iter().map(|d| d.as_slice()))
            .collect();
        write_pt(&pt, &body, &storages);
        convert_pt(&pt, &out, Some(&cfg_path), None).unwrap();
    }

    fn as_tensors_data(t: &BTreeMap<String, AnyTensor>, store: &ParamStore) -> Vec<Vec<f32>> {
        store.names.iter().map(|n| t[n].to_f32().unwrap()).collect()
    }
    #[test]
    fn huge_config_beside_small_weights_is_refused_before_allocating() {
        let cfg = small_cfg();
        let (store, _) = LmIds::build(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let huge = ModelConfig {
            embed_dim: 1 << 20,
            num_heads: 1,
            ..cfg.clone()
        };
        // the small model's tensors, the huge model's config in the metadata
        let tensors: Vec<(String, Vec<usize>, &[f32])> = store
            .names
            .iter()
            .zip(&store.shapes)
            .zip(&store.data)
            .map(|((n, s), d)| (n.clone(), s.clone(), d.as_slice()))
            .collect();
        let mut meta = HashMap::new();
        meta.insert(
            "asa_config".to_string(),
            serde_json::to_string(&huge).unwrap(),
        );
        write_safetensors(&p, &tensors, Some(meta)).unwrap();
        let c = read_checkpoint(&p).unwrap();
        let e = ensure_config_fits(c.config.as_ref().unwrap(), &c.tensors, "m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("needs at least") && e.contains("1048576"),
            "{e}"
        );
        // the right config passes
        assert!(ensure_config_fits(&cfg, &as_tensors(&store), "x").is_ok());
        assert!(min_param_values(&cfg) <= store.num_elements() as u128);
    }
}
