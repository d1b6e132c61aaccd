//! The reference fixtures (the `tests/fixtures` format, see `crate::parity`) run on the GPU:
//! `run_case_cuda` mirrors `parity::run_case` with the GPU layer / model and the same
//! tolerance table. Compared on the GPU: layer `out` and `grad.*`; LM `logits` (and named
//! `logits.<run>` routing runs), `loss`, `grad.*`, and the `lm_train3` losses, gradient norms
//! and final weights. Of the info tensors, layer cases compare those the GPU path produces (the
//! intervene variant's: the intervention logs, `slotspace_gate`, `slotspace_delta_norm`,
//! `out1`); the others (`info.*` of the read/write path, `layerN.*`) are left to the CPU run.
//! Cases the GPU path does not support (routing noise) report that as their error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::model::{GpuLayerRunner, GpuLm, Precision};
use crate::checkpoint::{self, AnyTensor};
use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::model::asa::{AsaOptions, Intervention, RoutingMode, RoutingNoise, SlotMask};
use crate::model::params::{AsaIds, Init, ParamStore};
use crate::optim::AdamWConfig;
use crate::parity::{tensor_error, CaseReport, Check, Tol, TOL_FINAL, TOL_GRAD, TOL_LOSS, TOL_OUT};

/// Runs one case folder on the GPU; every failure becomes the report's error.
pub fn run_case_cuda(dir: &Path, precision: Precision) -> CaseReport {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    match run_inner(dir, precision) {
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

struct Io {
    t: BTreeMap<String, AnyTensor>,
    path: PathBuf,
}

impl Io {
    fn get(&self, k: &str) -> Result<&AnyTensor> {
        self.t.get(k).ok_or_else(|| {
            AsaError::Input(format!("{}: missing tensor '{k}'", self.path.display()))
        })
    }
    fn f32(&self, k: &str) -> Result<Vec<f32>> {
        self.get(k)?
            .to_f32()
            .ok_or_else(|| AsaError::Input(format!("'{k}' is not a float tensor")))
    }
    fn f64(&self, k: &str) -> Result<Vec<f64>> {
        self.get(k)?
            .to_f64()
            .ok_or_else(|| AsaError::Input(format!("'{k}' is not a float tensor")))
    }
    fn ids(&self, k: &str) -> Result<(Vec<u32>, usize, usize)> {
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
                u32::try_from(x).map_err(|_| AsaError::Input(format!("'{k}' holds a bad id {x}")))
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok((ids, t.shape[0], t.shape[1]))
    }
    fn mask(&self, k: &str) -> Result<Option<Vec<bool>>> {
        match self.t.get(k) {
            None => Ok(None),
            Some(t) => {
                let v = t
                    .to_f64()
                    .or_else(|| {
                        t.to_i64()
                            .map(|v| v.into_iter().map(|x| x as f64).collect())
                    })
                    .ok_or_else(|| AsaError::Input(format!("'{k}' must be numeric")))?;
                Ok(Some(v.into_iter().map(|x| x != 0.0).collect()))
            }
        }
    }
    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.t.keys().filter(move |k| k.starts_with(prefix))
    }
}

fn check(checks: &mut Vec<Check>, name: &str, x: &[f32], r: &[f64], tol: Tol) {
    checks.push(Check {
        name: name.to_string(),
        err: tensor_error(x, r, tol),
        tol: tol.tol,
    });
}

fn run_inner(dir: &Path, precision: Precision) -> Result<Vec<Check>> {
    let text = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|e| AsaError::io(dir.join("config.json"), e))?;
    let conf: Value =
        serde_json::from_str(&text).map_err(|e| AsaError::Input(format!("config.json: {e}")))?;
    let io_path = dir.join("io.safetensors");
    let io = Io {
        t: checkpoint::read_safetensors(&io_path)?,
        path: io_path,
    };
    if conf.get("layer").is_some() {
        run_layer(dir, &conf, &io, precision)
    } else if conf.get("model").is_some() {
        run_lm(dir, &conf, &io, precision)
    } else {
        Err(AsaError::Input(format!(
            "{}: config.json has neither 'model' nor 'layer'",
            dir.display()
        )))
    }
}

fn case_weights(dir: &Path) -> Result<BTreeMap<String, AnyTensor>> {
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

/// Forward options from a `forward` (or run) object (`parity::forward_options`).
fn forward_options(obj: Option<&Value>, io: &Io) -> Result<AsaOptions> {
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
            _ => {}
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

/// A layer's constructor kwargs with the attention class's own defaults (`parity::layer_config`).
fn layer_config(conf: &Value) -> Result<ModelConfig> {
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

fn run_layer(dir: &Path, conf: &Value, io: &Io, precision: Precision) -> Result<Vec<Check>> {
    let cfg = layer_config(conf)?;
    let mut store = ParamStore::new();
    let ids = AsaIds::register(&mut store, "", &cfg, &mut Init::new(0));
    checkpoint::load_into(&mut store, &case_weights(dir)?, &dir.display().to_string())?;
    let xt = io.get("x")?;
    if xt.shape.len() != 3 || xt.shape[2] != cfg.embed_dim {
        return Err(AsaError::Input(format!(
            "x must be [B,T,{}], got {:?}",
            cfg.embed_dim, xt.shape
        )));
    }
    let (b, t) = (xt.shape[0], xt.shape[1]);
    let x = io.f32("x")?;
    let mut opts = forward_options(conf.get("forward"), io)?;
    opts.attention_mask = io.mask("attention_mask")?;
    let mut run = GpuLayerRunner::new(&cfg, ids, &store, precision)?;
    if let Some(iv) = conf.get("intervention") {
        run.set_intervention(&Intervention::from_json(iv)?);
    }
    let out = run.forward(&x, b, t, &opts)?;
    let mut checks = Vec::new();
    check(&mut checks, "out", &out, &io.f64("out")?, TOL_OUT);
    let info = run.intervention_info()?;
    for key in io.keys_with_prefix("info.") {
        if let Some(got) = info.get(&key["info.".len()..]) {
            check(&mut checks, key, &got.1, &io.f64(key)?, TOL_OUT);
        }
    }
    if io.keys_with_prefix("grad.").next().is_some() {
        let r = io.f32("r")?;
        let (dx, grads) = run.backward(&r)?;
        for key in io.keys_with_prefix("grad.") {
            let k = &key["grad.".len()..];
            let got = if k == "x" {
                &dx
            } else {
                grads
                    .get(k)
                    .ok_or_else(|| AsaError::Other(format!("no parameter '{k}' to compare")))?
            };
            check(&mut checks, key, got, &io.f64(key)?, TOL_GRAD);
        }
    }
    Ok(checks)
}

fn load_lm(dir: &Path, conf: &Value) -> Result<(ModelConfig, ParamStore, Option<Intervention>)> {
    let mut cfg = ModelConfig::from_json_value(conf)?;
    let weights = case_weights(dir)?;
    let (weights, _legacy) = checkpoint::normalize_keys(weights);
    if cfg.mlp_bias.is_none() {
        cfg.mlp_bias = Some(weights.keys().any(|k| k.ends_with("mlp.0.bias")));
    }
    let (_lm, mut store) = crate::model::lm::Lm::new(&cfg)?;
    checkpoint::load_into(&mut store, &weights, &dir.display().to_string())?;
    let it = match conf.get("intervention") {
        Some(iv) => Some(Intervention::from_json(iv)?),
        None => None,
    };
    Ok((cfg, store, it))
}

fn grad_of<'a>(cfg: &ModelConfig, grads: &'a ParamStore, k: &str) -> Result<&'a [f32]> {
    if let Some(g) = grads.get(k) {
        return Ok(g);
    }
    if k == "lm_head.weight" && cfg.tie_weights {
        if let Some(g) = grads.get("token_emb.weight") {
            return Ok(g);
        }
    }
    Err(AsaError::Other(format!("no parameter '{k}' to compare")))
}

fn run_lm(dir: &Path, conf: &Value, io: &Io, precision: Precision) -> Result<Vec<Check>> {
    let (cfg, store, it) = load_lm(dir, conf)?;
    let mut lm = GpuLm::new(&cfg, &store, precision)?;
    if let Some(it) = &it {
        lm.set_intervention(it);
    }
    if io.t.contains_key("tokens") && io.t.contains_key("losses") {
        return run_train(conf, io, &cfg, &mut lm);
    }
    let mut checks = Vec::new();
    let (ids, b, t) = io.ids("input_ids")?;
    let mask = io.mask("attention_mask")?;
    let fwd = conf.get("forward");
    if let Some(runs) = fwd.and_then(|f| f.get("runs")).and_then(|r| r.as_object()) {
        for (run, ropts) in runs {
            let mut opts = forward_options(Some(ropts), io)?;
            opts.attention_mask = mask.clone();
            let logits = lm.forward_logits_opts(&ids, b, t, &opts)?;
            let key = format!("logits.{run}");
            check(&mut checks, &key, &logits, &io.f64(&key)?, TOL_OUT);
        }
        if !io.t.contains_key("logits") {
            return Ok(checks);
        }
    }
    let mut opts = forward_options(fwd, io)?;
    opts.attention_mask = mask.clone();
    let logits = lm.forward_logits_opts(&ids, b, t, &opts)?;
    check(&mut checks, "logits", &logits, &io.f64("logits")?, TOL_OUT);
    if io.t.contains_key("targets") {
        let targets = io
            .get("targets")?
            .to_i64()
            .ok_or_else(|| AsaError::Input("targets must be integers".into()))?;
        let (loss, grads) = lm.loss_and_grads_opts(&ids, &targets, b, t, &opts)?;
        if io.t.contains_key("loss") {
            check(
                &mut checks,
                "loss",
                &[loss as f32],
                &io.f64("loss")?,
                TOL_LOSS,
            );
        }
        for key in io.keys_with_prefix("grad.") {
            let k = &key["grad.".len()..];
            check(
                &mut checks,
                key,
                grad_of(&cfg, &grads, k)?,
                &io.f64(key)?,
                TOL_GRAD,
            );
        }
    }
    Ok(checks)
}

fn run_train(conf: &Value, io: &Io, cfg: &ModelConfig, lm: &mut GpuLm) -> Result<Vec<Check>> {
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
    let losses_ref = io.f64("losses")?;
    let steps = opt
        .get("steps")
        .and_then(|v| v.as_u64())
        .map(|s| s as usize)
        .unwrap_or(losses_ref.len());
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
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        // eval-mode forward, as the CPU fixture runner trains
        let (loss, norm) =
            lm.train_step_mode(&inputs, &targets, b, t, acfg.lr, &acfg, clip, false)?;
        losses.push(loss as f32);
        norms.push(norm as f32);
    }
    let mut checks = Vec::new();
    check(&mut checks, "losses", &losses, &losses_ref, TOL_LOSS);
    if io.t.contains_key("grad_norms_before_clip") {
        check(
            &mut checks,
            "grad_norms_before_clip",
            &norms,
            &io.f64("grad_norms_before_clip")?,
            TOL_GRAD,
        );
    }
    let store = lm.download_params()?;
    for key in io.keys_with_prefix("final.") {
        let k = &key["final.".len()..];
        let got = match store.get(k) {
            Some(g) => g,
            None if k == "lm_head.weight" && cfg.tie_weights => store
                .get("token_emb.weight")
                .ok_or_else(|| AsaError::Other("no token_emb.weight".into()))?,
            None => return Err(AsaError::Other(format!("no parameter '{k}' to compare"))),
        };
        check(&mut checks, key, got, &io.f64(key)?, TOL_FINAL);
    }
    Ok(checks)
}
