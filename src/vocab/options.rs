//! The options of an ASA layer call, shared by the CPU and CUDA layers: where a slot mask acts
//! and which slots it keeps, the routing mode and noise, the intervene variant's settings, the
//! info tensors' type, and the check of a call's options against the config and batch shape.

use std::collections::BTreeMap;

use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};

/// Where a slot mask acts (`slot_mask_where`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotMaskWhere {
    Read,
    ContentReadOnly,
    SlotspaceOnly,
}

impl std::str::FromStr for SlotMaskWhere {
    type Err = AsaError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "read" => Ok(Self::Read),
            "content_read_only" => Ok(Self::ContentReadOnly),
            "slotspace_only" => Ok(Self::SlotspaceOnly),
            o => Err(AsaError::Input(format!(
                "unknown slot_mask_where '{o}' (expected read, content_read_only or slotspace_only)"
            ))),
        }
    }
}

/// A slot mask: `keep` [K] (false = masked), where it acts, and whether only at the final position.
#[derive(Debug, Clone)]
pub struct SlotMask {
    pub keep: SlotKeep,
    pub where_: SlotMaskWhere,
}

impl SlotMask {
    /// From the reference's float mask [K] (0 = masked), `slot_mask_where` and `slot_mask_scope`.
    pub fn new(mask: &[f32], where_: &str, scope: &str) -> Result<Self> {
        let keep: Vec<bool> = mask.iter().map(|&m| m > 0.0).collect();
        if !keep.iter().any(|&x| x) {
            return Err(AsaError::Input(
                "slot_mask masks every slot; at least one slot must stay unmasked".into(),
            ));
        }
        let last_pos_only = match scope {
            "all" => false,
            "last_pos_only" => true,
            o => {
                return Err(AsaError::Input(format!(
                    "unknown slot_mask_scope '{o}' (expected all or last_pos_only)"
                )))
            }
        };
        Ok(SlotMask {
            keep: SlotKeep {
                keep,
                last_pos_only,
            },
            where_: where_.parse()?,
        })
    }
}

/// Routing noise added to the read logits before routing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingNoise {
    Gumbel(f32),
    Gaussian(f32),
}

impl RoutingNoise {
    /// The `n` values a layer adds to its read logits [B,H,T,K], in memory order, drawn from
    /// `rng` (the CPU layer and the CUDA backend both add these: the GPU's noise is the CPU
    /// twin's, draw for draw). Gumbel: `scale * -ln(max(-ln max(u, 1e-8), 1e-8))`, u uniform
    /// in [0, 1); Gaussian: `scale * z`, z standard normal.
    pub fn draw(self, rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
        use rand_distr::{Distribution, StandardNormal};
        match self {
            RoutingNoise::Gumbel(sc) => (0..n)
                .map(|_| {
                    let u = rng.gen::<f64>().max(1e-8);
                    sc * (-(-u.ln()).max(1e-8).ln()) as f32
                })
                .collect(),
            RoutingNoise::Gaussian(sc) => (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    sc * z as f32
                })
                .collect(),
        }
    }
}

/// Routing mode of the read (`routing_mode` plus its tensors).
#[derive(Debug, Clone, Default)]
pub enum RoutingMode {
    #[default]
    Softmax,
    Top1,
    TopK(usize),
    /// `read_weights_override` [B,H,T,K], renormalised over K
    External(Vec<f32>),
    /// the module's `routing_override` tensor [B,H,T,K] (cleaned, clamped, renormalised)
    Override(Vec<f32>),
}

impl RoutingMode {
    pub fn parse(mode: &str, topk: usize, weights: Option<Vec<f32>>) -> Result<Self> {
        match mode {
            "softmax" => Ok(Self::Softmax),
            "top1" => Ok(Self::Top1),
            "topk" => Ok(Self::TopK(topk)),
            "external" => weights.map(Self::External).ok_or_else(|| {
                AsaError::Input("routing_mode 'external' needs read_weights_override".into())
            }),
            o => Err(AsaError::Input(format!(
                "unknown routing_mode '{o}' (expected softmax, top1, topk or external)"
            ))),
        }
    }
}

/// Per-call options of the layer forward (the reference's keyword arguments).
#[derive(Debug, Clone, Default)]
pub struct AsaOptions {
    /// [B,T]: true = real token
    pub attention_mask: Option<Vec<bool>>,
    pub routing: RoutingMode,
    pub noise: Option<RoutingNoise>,
    pub slot_mask: Option<SlotMask>,
    pub return_info: bool,
    /// dropouts on (training mode)
    pub training: bool,
}

/// Intervention settings of the intervene variant (the reference's `_intv_*` attributes).
#[derive(Debug, Clone, PartialEq)]
pub struct Intervention {
    pub mode: IntvMode,
    pub beta: f64,
    pub score_kind: ScoreKind,
    pub tau_kind: TauKind,
    pub tau: f64,
    pub tau_pctl: f64,
    pub soft_mask: bool,
    pub soft_temp: f64,
    pub par_beta: f64,
    pub head_mask: Option<Vec<f32>>,
    pub score_clip_pctl: Option<f64>,
    pub log_refine_geom: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntvMode {
    Off,
    DeltaPar,
    DeltaOrth,
    DeltaParPlusOrth,
    OrthGate,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    OrthRatio,
    OrthFrac,
    AlphaAbs,
    SlotPeaked,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TauKind {
    Abs,
    Pctl,
}

impl Default for Intervention {
    fn default() -> Self {
        Intervention {
            mode: IntvMode::Off,
            beta: 1.0,
            score_kind: ScoreKind::OrthFrac,
            tau_kind: TauKind::Pctl,
            tau: 0.15,
            tau_pctl: 75.0,
            soft_mask: true,
            soft_temp: 0.05,
            par_beta: 1.0,
            head_mask: None,
            score_clip_pctl: Some(99.0),
            log_refine_geom: false,
        }
    }
}

impl Intervention {
    /// Reads the reference's attribute dict (`{"_intv_mode": "orth_gate", "_intv_beta": 0.5, ...}`).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let mut it = Intervention::default();
        let Some(obj) = v.as_object() else {
            return Ok(it);
        };
        let bad = |k: &str, v: &serde_json::Value| {
            AsaError::Config(format!("intervention {k}: unsupported value {v}"))
        };
        for (key, val) in obj {
            let f = || val.as_f64().ok_or_else(|| bad(key, val));
            let s = || val.as_str().ok_or_else(|| bad(key, val));
            match key.as_str() {
                "_intv_mode" => {
                    it.mode = match val.as_str() {
                        None | Some("off") => IntvMode::Off,
                        Some("delta_par") => IntvMode::DeltaPar,
                        Some("delta_orth") => IntvMode::DeltaOrth,
                        Some("delta_par_plus_orth") => IntvMode::DeltaParPlusOrth,
                        Some("orth_gate") => IntvMode::OrthGate,
                        _ => return Err(bad(key, val)),
                    }
                }
                "_intv_beta" => it.beta = f()?,
                "_intv_score_kind" => {
                    it.score_kind = match s()? {
                        "orth_ratio" => ScoreKind::OrthRatio,
                        "orth_frac" => ScoreKind::OrthFrac,
                        "alpha_abs" => ScoreKind::AlphaAbs,
                        "slot_peaked" => ScoreKind::SlotPeaked,
                        _ => return Err(bad(key, val)),
                    }
                }
                "_intv_tau_kind" => {
                    it.tau_kind = match s()? {
                        "abs" => TauKind::Abs,
                        "pctl" => TauKind::Pctl,
                        _ => return Err(bad(key, val)),
                    }
                }
                "_intv_tau" => it.tau = f()?,
                "_intv_tau_pctl" => it.tau_pctl = f()?,
                "_intv_mask_mode" => {
                    it.soft_mask = match s()? {
                        "soft" => true,
                        "hard" => false,
                        _ => return Err(bad(key, val)),
                    }
                }
                "_intv_soft_temp" => it.soft_temp = f()?,
                "_intv_par_beta" => it.par_beta = f()?,
                "_intv_head_mask" => {
                    it.head_mask = match val {
                        serde_json::Value::Null => None,
                        serde_json::Value::Array(a) => Some(
                            a.iter()
                                .map(|x| x.as_f64().map(|v| v as f32).ok_or_else(|| bad(key, val)))
                                .collect::<Result<_>>()?,
                        ),
                        _ => return Err(bad(key, val)),
                    }
                }
                "_intv_score_clip_pctl" => it.score_clip_pctl = val.as_f64(),
                "_log_refine_geom" => {
                    it.log_refine_geom = val.as_bool().ok_or_else(|| bad(key, val))?
                }
                other => {
                    return Err(AsaError::Config(format!(
                        "unknown intervention setting '{other}'"
                    )))
                }
            }
        }
        Ok(it)
    }
}

/// Info tensors of one layer call, keyed by the reference's names: `(shape, data)`.
pub type Info = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Which slots a slot mask keeps, and where in time it applies.
#[derive(Debug, Clone)]
pub struct SlotKeep {
    /// [K]: true = keep
    pub keep: Vec<bool>,
    /// apply only at the final position (`slot_mask_scope = last_pos_only`)
    pub last_pos_only: bool,
}

impl SlotKeep {
    /// The keep row in force at time `ti` of a length-`t` sequence, if any.
    #[inline]
    pub fn at(&self, ti: usize, t: usize) -> Option<&[bool]> {
        if !self.last_pos_only || ti + 1 == t {
            Some(&self.keep)
        } else {
            None
        }
    }
}

/// Checks a forward's options against the config and the batch shape (the CPU layer and the CUDA
/// backend share it): mask and routing-override sizes, slot-mask length, what the online and
/// intervene variants allow.
pub fn check_options(cfg: &ModelConfig, opts: &AsaOptions, b: usize, t: usize) -> Result<()> {
    let (h, nk) = (cfg.num_heads, cfg.num_slots);
    if let Some(m) = &opts.attention_mask {
        if m.len() != b * t {
            return Err(AsaError::Input(format!(
                "attention_mask has {} entries, expected B*T = {}",
                m.len(),
                b * t
            )));
        }
    }
    if let RoutingMode::External(w) | RoutingMode::Override(w) = &opts.routing {
        if w.len() != b * h * t * nk {
            return Err(AsaError::Input(format!(
                "read weights override must be [B,H,T,K] = [{b},{h},{t},{nk}], got {} values",
                w.len()
            )));
        }
    }
    if let Some(sm) = &opts.slot_mask {
        if sm.keep.keep.len() != nk {
            return Err(AsaError::Input(format!(
                "slot_mask must have K = {nk} entries, got {}",
                sm.keep.keep.len()
            )));
        }
    }
    if cfg.variant == Variant::Online
        && (!matches!(opts.routing, RoutingMode::Softmax)
            || opts.slot_mask.is_some()
            || opts.noise.is_some())
    {
        return Err(AsaError::Input(
            "the online variant reads with plain softmax routing only (no routing modes, noise or slot masks)".into(),
        ));
    }
    if cfg.variant == Variant::Intervene && opts.slot_mask.is_some() {
        return Err(AsaError::Input(
            "the intervene variant has no slot masks".into(),
        ));
    }
    Ok(())
}

/// How a slot mask changes the content logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMask {
    /// masked slots get -inf key and content logits
    Read,
    /// masked slots get content logit 0
    ContentOnly,
}
