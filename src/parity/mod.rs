//! Runs reference fixture folders (the `shared/fixtures` format) and reports, per case, the worst
//! error against the tolerance table of the fixtures README.
//!
//! A case folder holds `config.json`, `io.safetensors` and the weights (`model.safetensors`, or a
//! `torch.save` file such as `checkpoint.pt`). Everything is read from the case's own config and
//! tensor shapes; nothing about a particular fixture is hard-coded. [`gpu`] runs the same cases
//! on the CUDA backend.

pub mod gpu;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::cuda::Backend;
use crate::checkpoint::{self, AnyTensor};
use crate::config::{ModelConfig, Variant};
use crate::engine::{Engine, StepBatch};
use crate::error::{AsaError, Result};
use crate::model::layer::{
    AsaCache, AsaLayer, AsaOptions, Intervention, RoutingMode, RoutingNoise, ScanForm, SlotMask,
};
use crate::model::lm::{Lm, LmCache};
use crate::model::params::{AsaIds, Init, ParamStore};
use crate::optim::{AdamW, AdamWConfig};

/// Error of a tensor: max|x - ref| / max(floor, max|ref|), or absolute when `floor` is None.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub floor: Option<f64>,
    pub tol: f64,
}

pub const TOL_OUT: Tol = Tol {
    floor: Some(1.0),
    tol: 1e-5,
};
pub const TOL_LOSS: Tol = Tol {
    floor: None,
    tol: 1e-5,
};
pub const TOL_GRAD: Tol = Tol {
    floor: Some(1e-3),
    tol: 5e-4,
};
pub const TOL_FINAL: Tol = Tol {
    floor: Some(1e-3),
    tol: 2e-3,
};

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub err: f64,
    pub tol: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.err <= self.tol
    }
}

/// The result of one case folder.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: String,
    pub checks: Vec<Check>,
    pub error: Option<String>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(Check::ok)
    }
    /// The check with the largest err/tol ratio.
    pub fn worst(&self) -> Option<&Check> {
        self.checks
            .iter()
            .max_by(|a, b| (a.err / a.tol).total_cmp(&(b.err / b.tol)))
    }
    /// One line: status, case, worst tensor with its error and tolerance.
    pub fn line(&self) -> String {
        let status = if self.passed() { "PASS" } else { "FAIL" };
        if let Some(e) = &self.error {
            return format!("{status} {:<28} error: {e}", self.name);
        }
        match self.worst() {
            Some(w) => {
                let failed: Vec<&str> = self
                    .checks
                    .iter()
                    .filter(|c| !c.ok())
                    .map(|c| c.name.as_str())
                    .collect();
                let extra = if failed.is_empty() {
                    String::new()
                } else {
                    format!("  failing: {}", failed.join(", "))
                };
                format!(
                    "{status} {:<28} {:>3} tensors, worst {} {:.3e} (tol {:e}){extra}",
                    self.name,
                    self.checks.len(),
                    w.name,
                    w.err,
                    w.tol
                )
            }
            None => format!("{status} {:<28} nothing to compare", self.name),
        }
    }
}

/// Error of `x` against `r` (NaN anywhere, or -inf/inf at different places, is infinite error).
pub fn tensor_error(x: &[f32], r: &[f64], tol: Tol) -> f64 {
    if x.len() != r.len() {
        return f64::INFINITY;
    }
    let mut maxdiff = 0.0f64;
    let mut maxref = 0.0f64;
    for (&a, &b) in x.iter().zip(r) {
        let a = a as f64;
        if a.is_nan() || b.is_nan() {
            return f64::INFINITY;
        }
        if a.is_infinite() || b.is_infinite() {
            if a != b {
                return f64::INFINITY;
            }
            continue;
        }
        maxdiff = maxdiff.max((a - b).abs());
        maxref = maxref.max(b.abs());
    }
    match tol.floor {
        Some(f) => maxdiff / maxref.max(f),
        None => maxdiff,
    }
}

/// Expands the given paths to case folders: a folder with a `config.json` is a case; otherwise its
/// subfolders that have one are (sorted by name).
pub fn find_cases(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            return Err(AsaError::Input(format!(
                "{} is not a fixture folder",
                p.display()
            )));
        }
        if p.join("config.json").is_file() {
            out.push(p.clone());
            continue;
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| AsaError::io(p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|q| q.join("config.json").is_file())
            .collect();
        subs.sort();
        if subs.is_empty() {
            return Err(AsaError::Input(format!(
                "{} holds no fixture case (no config.json)",
                p.display()
            )));
        }
        out.extend(subs);
    }
    Ok(out)
}

/// Runs one case folder; every failure becomes the report's error.
pub fn run_case(dir: &Path) -> CaseReport {
    case_report(dir, run_case_inner(dir))
}

/// The report of a case folder from its checks or its error (shared with the CUDA runner).
pub(crate) fn case_report(dir: &Path, result: Result<Vec<Check>>) -> CaseReport {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    match result {
        Ok(checks) => CaseReport {
            name,
            checks,
            error: None,
        },
        Err(e) => CaseReport {
            name,
            checks: vec![],
            error: Some(e.to_string()),
        },
    }
}

/// A case's `config.json` and its `io.safetensors` tensors.
pub(crate) fn open_case(dir: &Path) -> Result<(Value, Io)> {
    let conf = read_json(&dir.join("config.json"))?;
    let io_path = dir.join("io.safetensors");
    let io = Io {
        t: checkpoint::read_safetensors(&io_path)?,
        path: io_path,
    };
    Ok((conf, io))
}

/// The tensors of a case's `io.safetensors`, read by name.
pub(crate) struct Io {
    t: BTreeMap<String, AnyTensor>,
    path: PathBuf,
}

impl Io {
    /// Whether the case holds tensor `k`.
    pub(crate) fn has(&self, k: &str) -> bool {
        self.t.contains_key(k)
    }

    pub(crate) fn get(&self, k: &str) -> Result<&AnyTensor> {
        self.t.get(k).ok_or_else(|| {
            AsaError::Input(format!("{}: missing tensor '{k}'", self.path.display()))
        })
    }
    pub(crate) fn f32(&self, k: &str) -> Result<Vec<f32>> {
        self.get(k)?.to_f32().ok_or_else(|| {
            AsaError::Input(format!(
                "{}: '{k}' is not a float tensor",
                self.path.display()
            ))
        })
    }
    pub(crate) fn f64(&self, k: &str) -> Result<Vec<f64>> {
        self.get(k)?.to_f64().ok_or_else(|| {
            AsaError::Input(format!(
                "{}: '{k}' is not a float tensor",
                self.path.display()
            ))
        })
    }
    pub(crate) fn ids(&self, k: &str) -> Result<(Vec<u32>, usize, usize)> {
        let t = self.get(k)?;
        if t.shape.len() != 2 {
            return Err(AsaError::Input(format!(
                "'{k}' must be [B,T], got {:?}",
                t.shape
            )));
        }
        let v = t
            .to_i64()
            .ok_or_else(|| AsaError::Input(format!("'{k}' must be an integer tensor")))?;
        let ids = v
            .iter()
            .map(|&x| {
                u32::try_from(x)
                    .map_err(|_| AsaError::Input(format!("'{k}' holds a negative or huge id {x}")))
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok((ids, t.shape[0], t.shape[1]))
    }
    pub(crate) fn mask(&self, k: &str) -> Result<Option<Vec<bool>>> {
        match self.t.get(k) {
            None => Ok(None),
            Some(t) => {
                let v = t.to_f64().or_else(|| {
                    t.to_i64()
                        .map(|v| v.into_iter().map(|x| x as f64).collect())
                });
                let v = v.ok_or_else(|| AsaError::Input(format!("'{k}' must be numeric")))?;
                Ok(Some(v.into_iter().map(|x| x != 0.0).collect()))
            }
        }
    }
    pub(crate) fn keys_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a String> + 'a {
        self.t.keys().filter(move |k| k.starts_with(prefix))
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| AsaError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| AsaError::Input(format!("{} is not valid JSON: {e}", path.display())))
}

pub(crate) fn check(checks: &mut Vec<Check>, name: &str, x: &[f32], r: &[f64], tol: Tol) {
    checks.push(Check {
        name: name.to_string(),
        err: tensor_error(x, r, tol),
        tol: tol.tol,
    });
}

fn run_case_inner(dir: &Path) -> Result<Vec<Check>> {
    let (conf, io) = open_case(dir)?;
    if conf.get("layer").is_some() {
        run_layer_case(dir, &conf, &io)
    } else if conf.get("model").is_some() {
        run_lm_case(dir, &conf, &io)
    } else {
        Err(AsaError::Input(format!(
            "{}: config.json has neither 'model' nor 'layer'",
            dir.display()
        )))
    }
}

/// The weights of a case: `model.safetensors`, else the first `*.pt` file.
pub(crate) fn case_weights(dir: &Path) -> Result<BTreeMap<String, AnyTensor>> {
    let st = dir.join("model.safetensors");
    if st.is_file() {
        return checkpoint::read_safetensors(&st);
    }
    let mut pts: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| AsaError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .map(|x| x == "pt" || x == "pth")
                .unwrap_or(false)
        })
        .collect();
    pts.sort();
    match pts.first() {
        Some(p) => Ok(checkpoint::read_checkpoint(p)?.tensors),
        None => Err(AsaError::Input(format!(
            "{}: no model.safetensors or .pt weights",
            dir.display()
        ))),
    }
}

/// A layer's constructor kwargs -> ModelConfig, with the attention class's own defaults.
pub(crate) fn layer_config(conf: &Value) -> Result<ModelConfig> {
    let mut obj = serde_json::json!({
        "num_heads": 8, "num_slots": 8, "dropout": 0.1, "slot_dropout": 0.0, "slotspace_dim": 32,
        "slotspace_dropout": 0.05, "write_chunk_size": 128, "slotspace_chunk_size": 128,
        "vocab_size": 1, "num_layers": 1
    });
    if let (Some(dst), Some(src)) = (
        obj.as_object_mut(),
        conf.get("layer").and_then(|l| l.as_object()),
    ) {
        for (k, v) in src {
            dst.insert(k.clone(), v.clone());
        }
    }
    let mut cfg = ModelConfig::from_json_value(&obj)?;
    cfg.variant = match conf
        .get("class_")
        .and_then(|c| c.as_str())
        .unwrap_or("AddressedStateAttention")
    {
        "AddressedStateAttention" => Variant::Baseline,
        "AddressedStateAttentionOnline" => Variant::Online,
        "AddressedStateAttentionIntervene" => Variant::Intervene,
        o => return Err(AsaError::Config(format!("unknown attention class '{o}'"))),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Forward options from a `forward` (or run) object; tensors are named `"<tensor NAME>"`.
pub(crate) fn forward_options(obj: Option<&Value>, io: &Io) -> Result<AsaOptions> {
    let mut o = AsaOptions::default();
    let Some(obj) = obj.and_then(|v| v.as_object()) else {
        return Ok(o);
    };
    let tensor = |v: &Value| -> Result<Vec<f32>> {
        let s = v.as_str().unwrap_or("");
        let name = s
            .strip_prefix("<tensor ")
            .and_then(|x| x.strip_suffix('>'))
            .unwrap_or(s);
        io.f32(name)
    };
    let mut mode = "softmax".to_string();
    let mut topk = 2usize;
    let mut override_w = None;
    let (mut sm, mut sm_where, mut sm_scope) = (None, "read".to_string(), "all".to_string());
    let mut noise: Option<(String, f32)> = None;
    for (k, v) in obj {
        match k.as_str() {
            "routing_mode" => mode = v.as_str().unwrap_or("softmax").to_string(),
            "routing_topk" => topk = v.as_u64().unwrap_or(2) as usize,
            "read_weights_override" => override_w = Some(tensor(v)?),
            "slot_mask" => sm = Some(tensor(v)?),
            "slot_mask_where" => sm_where = v.as_str().unwrap_or("read").to_string(),
            "slot_mask_scope" => sm_scope = v.as_str().unwrap_or("all").to_string(),
            "routing_noise" => {
                if let Some(s) = v.as_str() {
                    noise = Some((s.to_string(), noise.map(|n| n.1).unwrap_or(1.0)));
                }
            }
            "routing_noise_scale" => {
                let sc = v.as_f64().unwrap_or(1.0) as f32;
                noise = Some((noise.map(|n| n.0).unwrap_or_default(), sc));
            }
            _ => {} // descriptive keys ("loss", "runs", ...)
        }
    }
    o.routing = RoutingMode::parse(&mode, topk, override_w)?;
    if let Some(m) = sm {
        o.slot_mask = Some(SlotMask::new(&m, &sm_where, &sm_scope)?);
    }
    if let Some((kind, sc)) = noise.filter(|n| !n.0.is_empty()) {
        o.noise = Some(match kind.as_str() {
            "gumbel" => RoutingNoise::Gumbel(sc),
            "gaussian" => RoutingNoise::Gaussian(sc),
            k => return Err(AsaError::Input(format!("unknown routing_noise '{k}'"))),
        });
    }
    Ok(o)
}

fn run_layer_case(dir: &Path, conf: &Value, io: &Io) -> Result<Vec<Check>> {
    let cfg = layer_config(conf)?;
    let mut store = ParamStore::new();
    let ids = AsaIds::register(&mut store, "", &cfg, &mut Init::new(0));
    checkpoint::load_into(&mut store, &case_weights(dir)?, &dir.display().to_string())?;
    let mut layer = AsaLayer::new(&cfg, ids);
    if let Some(iv) = conf.get("intervention") {
        layer.intervention = Intervention::from_json(iv)?;
    }
    let xt = io.get("x")?;
    if xt.shape.len() != 3 || xt.shape[2] != cfg.embed_dim {
        return Err(AsaError::Input(format!(
            "x must be [B,T,{}], got {:?}",
            cfg.embed_dim, xt.shape
        )));
    }
    let (b, t, c) = (xt.shape[0], xt.shape[1], xt.shape[2]);
    let x = io.f32("x")?;
    let mut checks = Vec::new();
    // twice: in the default form (the chunk form wherever the options allow it, so without info
    // tensors) and in the serial form, which also gives the info tensors
    for form in [ScanForm::Chunked, ScanForm::Serial] {
        layer.scan_form = form;
        let tag = form_tag(form);
        let mut opts = forward_options(conf.get("forward"), io)?;
        opts.attention_mask = io.mask("attention_mask")?;
        opts.return_info = form == ScanForm::Serial;
        let mut cache = AsaCache::default();
        let mut out = vec![0.0; b * t * c];
        let mut rng = rand::SeedableRng::seed_from_u64(0);
        let info = layer
            .forward(&store, &x, b, t, &opts, &mut cache, &mut rng, &mut out)?
            .unwrap_or_default();
        check(
            &mut checks,
            &format!("out{tag}"),
            &out,
            &io.f64("out")?,
            TOL_OUT,
        );
        if opts.return_info {
            for key in io.keys_with_prefix("info.") {
                let k = &key["info.".len()..];
                let got = info
                    .get(k)
                    .ok_or_else(|| AsaError::Other(format!("the layer produced no info '{k}'")))?;
                check(&mut checks, key, &got.1, &io.f64(key)?, TOL_OUT);
            }
        }
        if io.keys_with_prefix("grad.").next().is_some() {
            let r = io.f32("r")?;
            let mut dx = vec![0.0; b * t * c];
            let g = layer.backward(&store, &cache, &opts, &r, &mut dx);
            let mut grads = store.zeros_like();
            g.accumulate_into(&mut grads, &layer.ids);
            for key in io.keys_with_prefix("grad.") {
                let k = &key["grad.".len()..];
                let got = if k == "x" {
                    &dx
                } else {
                    grads
                        .get(k)
                        .ok_or_else(|| AsaError::Other(format!("no parameter '{k}' to compare")))?
                };
                check(
                    &mut checks,
                    &format!("{key}{tag}"),
                    got,
                    &io.f64(key)?,
                    TOL_GRAD,
                );
            }
        }
    }
    Ok(checks)
}

/// Suffix of a check run in the serial form of the scan (the default form's checks carry the
/// io tensor's own name).
fn form_tag(form: ScanForm) -> &'static str {
    match form {
        ScanForm::Chunked => "",
        ScanForm::Serial => " [serial]",
    }
}

/// Builds the model of an LM case with its weights loaded; `mlp_bias` follows the weights when
/// the config leaves it open.
fn load_lm(dir: &Path, conf: &Value) -> Result<(Lm, ParamStore)> {
    let mut cfg = ModelConfig::from_json_value(conf)?;
    let weights = case_weights(dir)?;
    let (weights, _legacy) = checkpoint::normalize_keys(weights);
    if cfg.mlp_bias.is_none() {
        cfg.mlp_bias = Some(weights.keys().any(|k| k.ends_with("mlp.0.bias")));
    }
    let (mut lm, mut store) = Lm::new(&cfg)?;
    checkpoint::load_into(&mut store, &weights, &dir.display().to_string())?;
    if let Some(iv) = conf.get("intervention") {
        lm.set_intervention(&Intervention::from_json(iv)?);
    }
    Ok((lm, store))
}

fn run_lm_case(dir: &Path, conf: &Value, io: &Io) -> Result<Vec<Check>> {
    let (mut lm, store) = load_lm(dir, conf)?;
    let mut checks = Vec::new();
    let mut cache = LmCache::default();
    if io.has("tokens") && io.has("losses") {
        return run_train_case(conf, io, lm, store);
    }
    let (ids, b, t) = io.ids("input_ids")?;
    let mask = io.mask("attention_mask")?;
    let fwd = conf.get("forward");

    // named runs: logits.<run> under each run's options
    if let Some(runs) = fwd.and_then(|f| f.get("runs")).and_then(|r| r.as_object()) {
        for (run, ropts) in runs {
            let mut opts = forward_options(Some(ropts), io)?;
            opts.attention_mask = mask.clone();
            lm.forward(&store, &ids, b, t, &opts, &mut cache)?;
            let key = format!("logits.{run}");
            check(&mut checks, &key, &cache.logits, &io.f64(&key)?, TOL_OUT);
        }
        if !io.has("logits") {
            return Ok(checks);
        }
    }

    // twice, as the layer cases: the default form, then the serial form with the info tensors
    for form in [ScanForm::Chunked, ScanForm::Serial] {
        lm.set_scan_form(form);
        lm_case_checks(&mut lm, &store, io, fwd, form, &mut checks)?;
    }
    Ok(checks)
}

/// One forward (and backward where the io holds gradients) of an LM case in one scan form.
fn lm_case_checks(
    lm: &mut Lm,
    store: &ParamStore,
    io: &Io,
    fwd: Option<&Value>,
    form: ScanForm,
    checks: &mut Vec<Check>,
) -> Result<()> {
    let (ids, b, t) = io.ids("input_ids")?;
    let mask = io.mask("attention_mask")?;
    let mut cache = LmCache::default();
    let tag = form_tag(form);
    let mut opts = forward_options(fwd, io)?;
    opts.attention_mask = mask.clone();
    opts.return_info = form == ScanForm::Serial && io.t.keys().any(|k| k.starts_with("layer"));
    let infos = lm.forward(store, &ids, b, t, &opts, &mut cache)?;
    check(
        checks,
        &format!("logits{tag}"),
        &cache.logits,
        &io.f64("logits")?,
        TOL_OUT,
    );
    // the same logits by recurrent decoding, token by token, wherever the forward is a plain one
    // (no mask, softmax routing, no slot mask or noise; the intervene variant cannot decode)
    let plain = mask.is_none()
        && matches!(opts.routing, RoutingMode::Softmax)
        && opts.slot_mask.is_none()
        && opts.noise.is_none()
        && lm.cfg.variant != Variant::Intervene;
    if form == ScanForm::Chunked && plain {
        let dec = crate::model::decode::decode_logits(lm, store, &ids, b, t)?;
        check(
            checks,
            "logits [recurrent decode]",
            &dec,
            &io.f64("logits")?,
            TOL_OUT,
        );
    }
    if let Some(infos) = infos {
        for key in io.keys_with_prefix("layer") {
            let (li, k) = key["layer".len()..]
                .split_once('.')
                .ok_or_else(|| AsaError::Input(format!("unexpected io key '{key}'")))?;
            let li: usize = li
                .parse()
                .map_err(|_| AsaError::Input(format!("unexpected io key '{key}'")))?;
            let got = infos
                .get(li)
                .and_then(|i| i.get(k))
                .ok_or_else(|| AsaError::Other(format!("layer {li} produced no '{k}'")))?;
            check(checks, key, &got.1, &io.f64(key)?, TOL_OUT);
        }
    }
    if io.has("targets") {
        let targets = io
            .get("targets")?
            .to_i64()
            .ok_or_else(|| AsaError::Input("targets must be integers".into()))?;
        let loss = lm.loss(&mut cache, &targets, mask.as_deref())?;
        if io.has("loss") {
            check(
                checks,
                &format!("loss{tag}"),
                &[loss as f32],
                &io.f64("loss")?,
                TOL_LOSS,
            );
        }
        if io.keys_with_prefix("grad.").next().is_some() {
            let mut grads = store.zeros_like();
            lm.backward(store, &mut cache, &opts, &mut grads);
            for key in io.keys_with_prefix("grad.") {
                let k = &key["grad.".len()..];
                let got = grad_of(lm, &grads, k)?;
                check(checks, &format!("{key}{tag}"), got, &io.f64(key)?, TOL_GRAD);
            }
        }
    }
    Ok(())
}

/// A parameter's gradient by PyTorch name (`lm_head.weight` of a tied model is `token_emb.weight`).
fn grad_of<'a>(lm: &Lm, grads: &'a ParamStore, k: &str) -> Result<&'a [f32]> {
    if let Some(g) = grads.get(k) {
        return Ok(g);
    }
    if k == "lm_head.weight" && lm.cfg.tie_weights {
        return Ok(&grads.data[lm.ids.token_emb]);
    }
    Err(AsaError::Other(format!("no parameter '{k}' to compare")))
}

/// What a `lm_train3`-style case asks for: AdamW steps on tokens[:, :-1] -> tokens[:, 1:].
pub(crate) struct TrainCase {
    pub acfg: AdamWConfig,
    pub clip: Option<f64>,
    pub steps: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<i64>,
    pub b: usize,
    pub t: usize,
}

/// Reads a train case's optimizer, step count and shifted tokens.
pub(crate) fn train_case(conf: &Value, io: &Io) -> Result<TrainCase> {
    let opt = conf.get("optimizer").cloned().unwrap_or(Value::Null);
    let getf = |k: &str, d: f64| opt.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let betas = opt
        .get("betas")
        .and_then(|b| b.as_array())
        .cloned()
        .unwrap_or_default();
    let acfg = AdamWConfig {
        lr: getf("lr", 1e-3),
        beta1: betas.first().and_then(|v| v.as_f64()).unwrap_or(0.9),
        beta2: betas.get(1).and_then(|v| v.as_f64()).unwrap_or(0.999),
        eps: getf("eps", 1e-8),
        weight_decay: getf("weight_decay", 0.01),
    };
    let clip = opt.get("grad_clip_global_norm").and_then(|v| v.as_f64());
    let steps = match opt.get("steps").and_then(|v| v.as_u64()) {
        Some(s) => s as usize,
        None => io.f64("losses")?.len(),
    };
    let (tok, b, tp1) = io.ids("tokens")?;
    if tp1 < 2 {
        return Err(AsaError::Input(
            "tokens must have at least 2 positions".into(),
        ));
    }
    let t = tp1 - 1;
    let mut inputs = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for bi in 0..b {
        inputs.extend_from_slice(&tok[bi * tp1..bi * tp1 + t]);
        targets.extend(tok[bi * tp1 + 1..(bi + 1) * tp1].iter().map(|&x| x as i64));
    }
    Ok(TrainCase {
        acfg,
        clip,
        steps,
        inputs,
        targets,
        b,
        t,
    })
}

/// The checks of a train case: per-step losses and gradient norms, and the final weights
/// (`lm_head.weight` of a tied model is `token_emb.weight`).
pub(crate) fn train_checks(
    io: &Io,
    losses: &[f32],
    norms: &[f32],
    store: &ParamStore,
    tied: bool,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    check(&mut checks, "losses", losses, &io.f64("losses")?, TOL_LOSS);
    if io.has("grad_norms_before_clip") {
        check(
            &mut checks,
            "grad_norms_before_clip",
            norms,
            &io.f64("grad_norms_before_clip")?,
            TOL_GRAD,
        );
    }
    for key in io.keys_with_prefix("final.") {
        let k = &key["final.".len()..];
        let got = match store.get(k) {
            Some(g) => g,
            None if k == "lm_head.weight" && tied => store
                .get("token_emb.weight")
                .ok_or_else(|| AsaError::Other("no token_emb.weight".into()))?,
            None => return Err(AsaError::Other(format!("no parameter '{k}' to compare"))),
        };
        check(&mut checks, key, got, &io.f64(key)?, TOL_FINAL);
    }
    Ok(checks)
}

/// `lm_train3`-style cases on the CPU (eval-mode forward, as the reference's fixture run),
/// through the training engine.
fn run_train_case(conf: &Value, io: &Io, lm: Lm, store: ParamStore) -> Result<Vec<Check>> {
    let tc = train_case(conf, io)?;
    let tied = lm.cfg.tie_weights;
    let adam = AdamW::new(tc.acfg, &store);
    let mut engine = Engine::on_cpu(lm, store, adam);
    let (losses, norms) = train_steps(&mut engine, &tc)?;
    train_checks(io, &losses, &norms, engine.params()?, tied)
}

/// The steps of a train case on `engine` (dropouts off): the losses and the gradient norms
/// before clipping.
pub(crate) fn train_steps<B: Backend>(
    engine: &mut Engine<B>,
    tc: &TrainCase,
) -> Result<(Vec<f32>, Vec<f32>)> {
    engine.set_dropout(false);
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..tc.steps {
        let batch = StepBatch::whole(&tc.inputs, &tc.targets, tc.b, tc.t);
        let (loss, norm) = engine.step(batch, tc.acfg.lr, tc.clip)?;
        losses.push(loss as f32);
        norms.push(norm as f32);
    }
    Ok((losses, norms))
}
