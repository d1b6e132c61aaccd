//! Forward controls of the analysis commands (`probe`, `infos`, `generate`, `eval`): the
//! reference's forward keyword arguments (`routing_mode`, `routing_topk`, `routing_noise`,
//! `routing_noise_scale`, `slot_mask`, `slot_mask_where`, `slot_mask_scope`) and the intervene
//! variant's settings (its `_intv_*` attributes), as one value that the command line fills and
//! [`ForwardControls::apply`] turns into a model and the options of its forwards.
//!
//! Checked in two steps, so that a bad combination fails before a checkpoint loads:
//! [`ForwardControls::check`] alone, then [`ForwardControls::apply`] against the model (slot
//! indices and top-k against K, what each variant allows).

use serde::Serialize;

use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::model::lm::Lm;
use crate::model::params::ParamStore;
use crate::vocab::options::{
    check_options, AsaOptions, Intervention, RoutingMode, RoutingNoise, SlotMask,
};

/// An error's message without its kind ("input error: ..."), to be wrapped in another.
pub fn plain(e: &AsaError) -> String {
    match e {
        AsaError::Config(m) | AsaError::Input(m) => m.clone(),
        o => o.to_string(),
    }
}

/// What the user asked of every forward (`None`: the model's own behaviour).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ForwardControls {
    /// softmax (default), top1 or topk
    pub routing_mode: Option<String>,
    /// slots kept by topk
    pub routing_topk: Option<usize>,
    /// gumbel or gaussian
    pub noise: Option<String>,
    pub noise_scale: Option<f64>,
    /// reseeds the model's generator (the noise's) before the command
    pub noise_seed: Option<u64>,
    /// slots to mask (0-based)
    pub slot_mask: Option<Vec<usize>>,
    /// read, content_read_only or slotspace_only
    pub slot_mask_where: Option<String>,
    /// all or last_pos_only
    pub slot_mask_scope: Option<String>,
    /// run the checkpoint as this variant (baseline and intervene share their parameters)
    pub variant: Option<Variant>,
    /// the intervene variant's settings: the reference's attribute dict
    /// (`{"_intv_mode": "orth_gate", "_intv_beta": 0.5, ...}`)
    pub intervention: Option<serde_json::Value>,
}

impl ForwardControls {
    /// True when nothing is set: the model runs as it was trained.
    pub fn is_default(&self) -> bool {
        *self == ForwardControls::default()
    }

    /// Checks the combination of settings on its own (no model needed).
    pub fn check(&self) -> Result<()> {
        let mode = self.routing_mode.as_deref().unwrap_or("softmax");
        match mode {
            "softmax" | "top1" | "topk" => {}
            "external" => {
                return Err(AsaError::Input(
                    "--routing-mode external reads a [B,H,T,K] read-weights tensor per forward: it is a library option (RoutingMode::External), not a command-line one; use softmax, top1 or topk".into(),
                ))
            }
            o => {
                return Err(AsaError::Input(format!(
                    "--routing-mode: unknown mode '{o}' (expected softmax, top1 or topk)"
                )))
            }
        }
        match (mode, self.routing_topk) {
            ("topk", Some(0)) => {
                return Err(AsaError::Input("--routing-topk must be >= 1, got 0".into()))
            }
            ("topk", _) | (_, None) => {}
            (m, Some(_)) => {
                return Err(AsaError::Input(format!(
                    "--routing-topk applies to --routing-mode topk only (the mode is {m})"
                )))
            }
        }
        match (&self.noise, self.noise_scale) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(AsaError::Input(
                    "--routing-noise-scale needs --routing-noise gumbel or gaussian".into(),
                ))
            }
            (Some(_), None) => {
                return Err(AsaError::Input(
                    "--routing-noise needs --routing-noise-scale (> 0)".into(),
                ))
            }
            (Some(kind), Some(s)) => {
                if !matches!(kind.as_str(), "gumbel" | "gaussian") {
                    return Err(AsaError::Input(format!(
                        "--routing-noise: unknown kind '{kind}' (expected gumbel or gaussian)"
                    )));
                }
                if !(s.is_finite() && s > 0.0) {
                    return Err(AsaError::Input(format!(
                        "--routing-noise-scale must be finite and > 0, got {s}"
                    )));
                }
            }
        }
        if self.noise_seed.is_some() && self.noise.is_none() {
            return Err(AsaError::Input(
                "--noise-seed seeds the routing noise: it needs --routing-noise".into(),
            ));
        }
        if self.slot_mask.is_none()
            && (self.slot_mask_where.is_some() || self.slot_mask_scope.is_some())
        {
            return Err(AsaError::Input(
                "--slot-mask-where and --slot-mask-scope need --slot-mask (the slots to mask)"
                    .into(),
            ));
        }
        if let Some(m) = &self.slot_mask {
            if m.is_empty() {
                return Err(AsaError::Input(
                    "--slot-mask needs at least one slot index".into(),
                ));
            }
            SlotMask::new(
                &[1.0, 1.0],
                self.slot_mask_where.as_deref().unwrap_or("read"),
                self.slot_mask_scope.as_deref().unwrap_or("all"),
            )
            .map_err(|e| {
                AsaError::Input(format!(
                    "--slot-mask-where/--slot-mask-scope: {}",
                    plain(&e)
                ))
            })?;
        }
        if let Some(v) = &self.intervention {
            Intervention::from_json(v)
                .map_err(|e| AsaError::Input(format!("--intervention: {}", plain(&e))))?;
        }
        if self.variant == Some(Variant::Online) {
            return Err(AsaError::Input(
                "--variant: a checkpoint can run as baseline or intervene (they share their parameters); the online variant is a checkpoint's own".into(),
            ));
        }
        Ok(())
    }

    /// The forward options of these controls for a model of `cfg` (variant already applied).
    pub fn options(&self, cfg: &ModelConfig) -> Result<AsaOptions> {
        self.check()?;
        let k = cfg.num_slots;
        let routing = match self.routing_mode.as_deref().unwrap_or("softmax") {
            "top1" => RoutingMode::Top1,
            "topk" => {
                let tk = self.routing_topk.unwrap_or(2);
                if tk > k {
                    return Err(AsaError::Input(format!(
                        "--routing-topk {tk} is more than the model's {k} slots"
                    )));
                }
                RoutingMode::TopK(tk)
            }
            _ => RoutingMode::Softmax,
        };
        let noise = match (self.noise.as_deref(), self.noise_scale) {
            (Some("gumbel"), Some(s)) => Some(RoutingNoise::Gumbel(s as f32)),
            (Some("gaussian"), Some(s)) => Some(RoutingNoise::Gaussian(s as f32)),
            _ => None,
        };
        let slot_mask = match &self.slot_mask {
            None => None,
            Some(slots) => {
                if let Some(&bad) = slots.iter().find(|&&s| s >= k) {
                    return Err(AsaError::Input(format!(
                        "--slot-mask: slot {bad} does not exist (the model has {k} slots: 0 to {})",
                        k - 1
                    )));
                }
                let mut keep = vec![1.0f32; k];
                slots.iter().for_each(|&s| keep[s] = 0.0);
                Some(
                    SlotMask::new(
                        &keep,
                        self.slot_mask_where.as_deref().unwrap_or("read"),
                        self.slot_mask_scope.as_deref().unwrap_or("all"),
                    )
                    .map_err(|e| AsaError::Input(format!("--slot-mask: {}", plain(&e))))?,
                )
            }
        };
        if self.intervention.is_some() && cfg.variant != Variant::Intervene {
            return Err(AsaError::Input(format!(
                "--intervention sets the intervene variant's refine interventions; this model runs as the {} variant (add --variant intervene)",
                format!("{:?}", cfg.variant).to_lowercase()
            )));
        }
        let opts = AsaOptions {
            routing,
            noise,
            slot_mask,
            ..Default::default()
        };
        check_options(cfg, &opts, 1, 1)
            .map_err(|e| AsaError::Input(format!("{} (from the forward controls)", plain(&e))))?;
        Ok(opts)
    }

    /// Applies the controls to a loaded model: runs it as `variant` when asked (rebuilt with the
    /// same parameters), sets the intervention and reseeds the noise. Returns the model and the
    /// options for its forwards (without an attention mask; `return_info` off).
    pub fn apply(&self, lm: Lm, params: &ParamStore) -> Result<(Lm, AsaOptions)> {
        self.check()?;
        let mut lm = match self.variant {
            Some(v) if v != lm.cfg.variant => {
                if lm.cfg.variant == Variant::Online {
                    return Err(AsaError::Input(
                        "--variant: this checkpoint is of the online variant, which runs only as itself".into(),
                    ));
                }
                let cfg = ModelConfig {
                    variant: v,
                    ..lm.cfg.clone()
                };
                let (mut new, layout) = Lm::new(&cfg)?;
                if layout.names != params.names || layout.shapes != params.shapes {
                    return Err(AsaError::Input(format!(
                        "--variant {}: the checkpoint's parameters do not fit that variant",
                        format!("{v:?}").to_lowercase()
                    )));
                }
                new.reseed(cfg.seed);
                new
            }
            _ => lm,
        };
        if let Some(v) = &self.intervention {
            if lm.cfg.variant != Variant::Intervene {
                return Err(AsaError::Input(format!(
                    "--intervention sets the intervene variant's refine interventions; this model runs as the {} variant (add --variant intervene)",
                    format!("{:?}", lm.cfg.variant).to_lowercase()
                )));
            }
            lm.set_intervention(
                &Intervention::from_json(v)
                    .map_err(|e| AsaError::Input(format!("--intervention: {}", plain(&e))))?,
            );
        }
        if let Some(s) = self.noise_seed {
            lm.reseed(s);
        }
        let opts = self.options(&lm.cfg)?;
        Ok((lm, opts))
    }
}
