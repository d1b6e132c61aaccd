//! Factual-recall probe: the Paris margin and the routing-versus-residual intervention test
//! (the reference's canonical experiments 4 and 5), with a JSON summary and PNG plots.
//!
//! # Measures
//! - **Paris margin** ([`run_probe`]): at the last real (non-pad) token of a prompt,
//!   `logit(" Paris") - logit(rival)` from the final logits (equal to the reference's
//!   `log_softmax` difference). The research set is scored against `" the"`, the canonical set
//!   against `" London"`. `paris_margin_mean`, the number the release check reads, is the mean
//!   over the research set against `" the"`.
//! - **Routing versus residual** ([`LayerProbe`]): per probed layer `l`, principal components of
//!   the late-window read logits (head-mean, K-dim) and of the late-window residual stream
//!   entering block `l` (C-dim); finite-difference sweeps along each component, measured as the
//!   change of the mean research-set margin; least-squares slopes and their ratio.
//! - **Residual with routing frozen**: the residual sweep again, with every layer `m >= l` forced
//!   to read with its baseline read weights (`RoutingMode::Override`).
//!
//! # Matched magnitudes
//! A step `eps` moves `eps` standard deviations of the swept component (measured over the
//! late-window points) in either space, so routing and residual steps are equally typical of
//! their own space; `Sweep::slope` is per such step. `Sweep::slope_native = slope / pc_std` is
//! per unit L2 norm of the native displacement (read-logit units or residual units), which is how
//! the reference matches magnitudes (equal steps in orthonormal PCA coordinates); both ratios are
//! reported.
//!
//! # Ported from the reference (and where we differ)
//! The reference (`ASAResearch.ipynb`, "Residual-vs-Routing Intervention Parity Test" and
//! "Residual controllability with ROUTING FROZEN") fits 3-component PCAs on late-window points
//! (last 5 real positions, position 0 skipped), estimates a control direction by central finite
//! differences in PCA coordinates and sweeps a step size along it. We keep the point sets and the
//! PCA (head-mean read logits, as the reference), and differ as follows:
//! - each head-mean read-logit row is centred over its K slots before the PCA: softmax ignores a
//!   shift shared by all slots, and an uncentred PCA (the reference's) can spend its first
//!   component on that null direction;
//! - we sweep each principal component separately on a symmetric grid in units of that
//!   component's standard deviation; the reference's finite-difference direction corresponds to
//!   the gradient `(slope_1, .., slope_n)`, whose norm we report (`*_slope_norm`);
//! - the routing perturbation shifts every head's read logits by the same K-vector at every
//!   late-window position and applies the layer's softmax (with `read_temperature`); the
//!   reference replaces all heads at the last position by one weight vector decoded from the
//!   prompt centroid, so its "zero" step is not the unperturbed model; ours is (to float
//!   rounding: the forced weights are recomputed from the logits);
//! - the residual perturbation is added to the stream entering block `l` (so that layer `l`'s
//!   routing can react to it) at the same late-window positions; the reference adds it to block
//!   `l`'s output at the last position only;
//! - the frozen sweep forces baseline read weights in layer `l` and every later layer. The
//!   reference froze layer `l` while injecting after layer `l`, so its freeze had no effect on the
//!   perturbed computation.

use serde::{Deserialize, Serialize};

mod geometry;
mod plots;
mod timescales;

pub(crate) use plots::ensure_font as ensure_plot_font;
pub use plots::write_outputs;

pub use geometry::{
    DepthRow, DepthSweep, SimplexSphere, SphereCluster, SphereEndpoint, TrajectoryBasin,
    BASIN_PROMPTS,
};
pub use timescales::{
    half_life, tail_half_life_and_ess, timepoints, InertiaLayer, TimescaleConfig, Timescales,
    WriteLayer,
};

use crate::config::{ModelConfig, Variant};
use crate::error::{AsaError, Result};
use crate::model::layer::{AsaOptions, Info, RoutingMode};
use crate::model::lm::{Lm, LmCache, LmHooks};
use crate::model::params::ParamStore;

/// What the probe needs from a tokenizer (implemented for the crate's tokenizer by its module).
pub trait ProbeTokenizer {
    /// Token ids of `s`, without special tokens.
    fn encode(&self, s: &str) -> Result<Vec<u32>>;
    /// The id of `s` when it is exactly one token.
    fn single_token(&self, s: &str) -> Option<u32>;
    /// A name for the summary.
    fn name(&self) -> &str {
        "unnamed"
    }
}

impl ProbeTokenizer for crate::data::tokenizer::Tokenizer {
    fn encode(&self, s: &str) -> Result<Vec<u32>> {
        crate::data::tokenizer::Tokenizer::encode(self, s)
    }
    fn single_token(&self, s: &str) -> Option<u32> {
        crate::data::tokenizer::Tokenizer::single_token(self, s)
    }
    fn name(&self) -> &str {
        crate::data::tokenizer::Tokenizer::name(self)
    }
}

/// One probe prompt and the recall route it takes (the reference's grouping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePrompt {
    pub route: &'static str,
    pub text: &'static str,
}

const fn pp(route: &'static str, text: &'static str) -> ProbePrompt {
    ProbePrompt { route, text }
}

/// The research prompt set (17 prompts over five routes), scored against `" the"`: the set of
/// the reference's `building_blocks/ASAResearch.ipynb` analysis cells (12-21).
pub const RESEARCH_PROMPTS: [ProbePrompt; 17] = [
    pp("direct_capital", "The capital of France is"),
    pp("direct_capital", "France's capital city is"),
    pp("direct_capital", "In France, the capital is"),
    pp("direct_capital", "The seat of government of France is"),
    pp("direct_capital", "The city that is France's capital is"),
    pp("landmark", "The Eiffel Tower is located in"),
    pp("landmark", "The Louvre is in"),
    pp("landmark", "The Seine river flows through"),
    pp("history", "During the French Revolution, the city of"),
    pp("history", "Napoleon crowned himself in"),
    pp("history", "In World War II, the liberation of"),
    pp("geography", "The largest city in France is"),
    pp("geography", "A major European city in France is"),
    pp("geography", "A famous city on the Seine is"),
    pp("contrast", "The capital of Germany is"),
    pp("contrast", "The capital of England is"),
    pp("contrast", "The capital of Italy is"),
];

/// The canonical Paris prompt set, scored against `" London"`: the six prompts of the
/// reference's "Canon Probes" (`notebooks/ASA_HF_Checkpoint_CanonProbes_and_MiniFinetune.ipynb`,
/// cell 6, 0-based), in its order. Two of them ask for London, so their margin is expected to be
/// negative on a model that knows the answer; the notebook averages all six, and so do we. (The
/// reference's `scripts/probe_paris_margin.py` uses four other prompts with a character
/// tokenizer; its margin is not comparable.)
pub const CANONICAL_PROMPTS: [ProbePrompt; 6] = [
    pp("capital", "The capital of France is"),
    pp("capital", "France's capital city is"),
    pp("capital_reverse", "Paris is the capital of"),
    pp("contrast_uk", "The capital of the UK is"),
    pp("contrast_uk_reverse", "London is the capital of"),
    pp("city", "A major city in France is"),
];

/// The target token text.
pub const TARGET: &str = " Paris";
/// The rival of the research set.
pub const RESEARCH_RIVAL: &str = " the";
/// The rival of the canonical set.
pub const CANONICAL_RIVAL: &str = " London";

/// The canonical experiments a probe runs by default.
pub const ALL_EXPERIMENTS: [u8; 6] = [1, 2, 3, 4, 5, 6];

/// Probe settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeConfig {
    /// reseeds the model's generator before the probe (the probe itself draws no randomness)
    pub seed: u64,
    /// late window: the last `window` real positions of each prompt (position 0 excluded)
    pub window: usize,
    /// principal components swept per space and layer
    pub num_pcs: usize,
    /// step sizes, in standard deviations of the swept component (needs two distinct values)
    pub eps_grid: Vec<f64>,
    /// layers of the routing/residual sweeps, experiments 4 and 5 (`None`: all)
    pub layers: Option<Vec<usize>>,
    /// the canonical experiments to run (1-6; the margins are always measured)
    pub experiments: Vec<u8>,
    /// experiment 1: layer of the trajectory PCA (`None`: min(10, num_layers - 1), the
    /// reference's automatic choice)
    pub basin_layer: Option<usize>,
    /// experiment 1: layers whose routing is forced (`None`: the PCA layer)
    pub basin_intervene: Option<Vec<usize>>,
    /// experiment 1: grid points per axis of the energy basin (>= 2)
    pub basin_grid: usize,
    /// experiment 1: padding of the grid around the trajectories, as a share of their extent
    pub basin_pad: f64,
    /// experiment 2: layer of the simplex sphere (`None`: min(10, num_layers - 1))
    pub sphere_layer: Option<usize>,
    /// experiment 6 settings
    pub timescales: TimescaleConfig,
}

impl ProbeConfig {
    /// Whether experiment `e` is selected.
    pub fn runs(&self, e: u8) -> bool {
        self.experiments.contains(&e)
    }

    /// Checks the settings against a model of `num_layers` layers and `num_slots` slots.
    pub fn check(&self, num_layers: usize) -> Result<()> {
        if self.window == 0 || self.num_pcs == 0 {
            return Err(AsaError::Input(
                "probe window and num_pcs must be at least 1".into(),
            ));
        }
        if let Some(&e) = self.experiments.iter().find(|e| !(1..=6).contains(*e)) {
            return Err(AsaError::Input(format!(
                "unknown experiment {e}: the canonical experiments are 1 to 6"
            )));
        }
        if self.experiments.is_empty() {
            return Err(AsaError::Input(
                "no experiment selected (choose among 1 to 6)".into(),
            ));
        }
        if self.basin_grid < 2 {
            return Err(AsaError::Input(format!(
                "the basin grid needs at least 2 points per axis, got {}",
                self.basin_grid
            )));
        }
        if !(self.basin_pad.is_finite() && self.basin_pad >= 0.0) {
            return Err(AsaError::Input(format!(
                "the basin padding must be finite and >= 0, got {}",
                self.basin_pad
            )));
        }
        let layer_ok = |what: &str, l: usize| {
            if l < num_layers {
                Ok(())
            } else {
                Err(AsaError::Input(format!(
                    "{what}: layer {l} does not exist (the model has {num_layers} layers: 0 to {})",
                    num_layers - 1
                )))
            }
        };
        for &l in self.layers.iter().flatten() {
            layer_ok("probe layers", l)?;
        }
        if let Some(l) = self.basin_layer {
            layer_ok("basin layer", l)?;
        }
        for &l in self.basin_intervene.iter().flatten() {
            layer_ok("basin intervene layers", l)?;
        }
        if let Some(l) = self.sphere_layer {
            layer_ok("sphere layer", l)?;
        }
        let ts = &self.timescales;
        if ts.batch == 0 || ts.seq_len < 2 || ts.max_lag == 0 || ts.write_timepoints == 0 {
            return Err(AsaError::Input(
                "timescales need batch >= 1, seq_len >= 2, max_lag >= 1 and write_timepoints >= 1"
                    .into(),
            ));
        }
        if !(ts.write_threshold > 0.0 && ts.write_threshold <= 1.0) {
            return Err(AsaError::Input(format!(
                "the write threshold must be in (0, 1], got {}",
                ts.write_threshold
            )));
        }
        Ok(())
    }

    /// The reference's automatic analysis layer: min(10, num_layers - 1).
    pub fn auto_layer(num_layers: usize) -> usize {
        10.min(num_layers.saturating_sub(1))
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            seed: 1337,
            window: 5,
            num_pcs: 3,
            eps_grid: vec![-2.0, -1.0, 0.0, 1.0, 2.0],
            layers: None,
            experiments: ALL_EXPERIMENTS.to_vec(),
            basin_layer: None,
            basin_intervene: None,
            basin_grid: 24,
            basin_pad: 0.35,
            sphere_layer: None,
            timescales: TimescaleConfig::default(),
        }
    }
}

/// A token: its text and id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRef {
    pub text: String,
    pub id: u32,
}

/// One prompt's margin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptResult {
    pub route: String,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// index of the last real token
    pub last_pos: usize,
    /// late-window positions (used by the sweeps; research set)
    pub window: Vec<usize>,
    pub target_logit: f64,
    pub rival_logit: f64,
    /// `target_logit - rival_logit`
    pub margin: f64,
}

/// A prompt set's margins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSetResult {
    pub name: String,
    pub rival: TokenRef,
    pub prompts: Vec<PromptResult>,
    pub mean_margin: f64,
}

/// A PCA fit of late-window points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PcaSummary {
    /// dimension of a point (K for routing, C for residual)
    pub dim: usize,
    pub num_points: usize,
    /// total variance (sum over dimensions, sample variance with N-1)
    pub total_variance: f64,
    /// fraction of the total variance of each kept component
    pub explained_variance_ratio: Vec<f64>,
    /// standard deviation of the points along each kept component
    pub std: Vec<f64>,
}

/// One finite-difference sweep along one principal component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// component index (0 = largest variance)
    pub pc: usize,
    /// the component's standard deviation: a step `eps` moves by `eps * pc_std` in native units
    pub pc_std: f64,
    /// mean research-set margin at each `eps_grid` value
    pub margins: Vec<f64>,
    /// least-squares slope of margin against eps (per standard deviation)
    pub slope: f64,
    /// `slope / pc_std`: per unit L2 norm of the native displacement (the reference's PCA-coordinate
    /// units); `None` when the component has no variance
    pub slope_native: Option<f64>,
    /// central difference at the smallest step that the grid has on both sides of 0
    pub local_slope: Option<f64>,
}

/// Routing versus residual controllability of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProbe {
    pub layer: usize,
    /// mean research-set margin of the unperturbed model
    pub baseline_margin: f64,
    /// PCA of the head-mean read logits [K] at late-window positions, each row centred over K
    pub routing_pca: PcaSummary,
    /// PCA of the residual stream [C] entering the block at late-window positions
    pub residual_pca: PcaSummary,
    /// read logits shifted along each routing PC (all heads alike), softmaxed, forced in this layer
    pub routing: Vec<Sweep>,
    /// residual stream entering this block shifted along each residual PC, routing free
    pub residual: Vec<Sweep>,
    /// as `residual`, with baseline read weights forced in this layer and every later layer
    pub residual_frozen: Vec<Sweep>,
    /// `sqrt(sum_j slope_j^2)`: the slope along the steepest direction in the swept PC subspace
    pub routing_slope_norm: f64,
    pub residual_slope_norm: f64,
    pub frozen_slope_norm: f64,
    /// `routing_slope_norm / residual_slope_norm` (steps in standard deviations of each space)
    pub routing_residual_ratio: Option<f64>,
    /// the same ratio with slopes per unit native L2 norm (the reference's matching)
    pub routing_residual_ratio_native: Option<f64>,
    /// `frozen_slope_norm / residual_slope_norm`: residual control left once routing is frozen
    pub frozen_residual_ratio: Option<f64>,
}

/// Everything the probe measured, as written to `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// free text for the caller (e.g. the checkpoint path); empty unless set
    pub model_name: String,
    pub tokenizer: String,
    pub seed: u64,
    pub probe_config: ProbeConfig,
    pub model_config: ModelConfig,
    pub num_params: usize,
    pub target: TokenRef,
    pub research: PromptSetResult,
    pub canonical: PromptSetResult,
    /// research set against `" the"`
    pub paris_margin_research_mean: f64,
    /// canonical set against `" London"`
    pub paris_margin_canonical_mean: f64,
    /// the release-check margin: equal to `paris_margin_research_mean`
    pub paris_margin_mean: f64,
    /// experiments 4 and 5, per swept layer
    pub layers: Vec<LayerProbe>,
    /// experiment 1
    pub trajectory_basin: Option<TrajectoryBasin>,
    /// experiment 2
    pub simplex_sphere: Option<SimplexSphere>,
    /// experiment 3
    pub depth_sweep: Option<DepthSweep>,
    /// experiment 6
    pub timescales: Option<Timescales>,
    pub notes: Vec<String>,
}

/// Text for the timescale experiment (6): its name (for the summary) and contents.
pub struct ProbeText<'a> {
    pub name: String,
    pub text: &'a str,
}

/// A right-padded batch of prompts.
struct Batch {
    b: usize,
    t: usize,
    ids: Vec<u32>,   // [B,T]
    mask: Vec<bool>, // [B,T]
    tokens: Vec<Vec<u32>>,
    last: Vec<usize>,
}

impl Batch {
    /// The batch repeated `g` times along B (copy j holds rows j*b..(j+1)*b).
    fn tile(&self, g: usize) -> Batch {
        Batch {
            b: self.b * g,
            t: self.t,
            ids: self.ids.repeat(g),
            mask: self.mask.repeat(g),
            tokens: (0..g).flat_map(|_| self.tokens.iter().cloned()).collect(),
            last: self.last.repeat(g),
        }
    }
}

fn make_batch(tok: &dyn ProbeTokenizer, prompts: &[ProbePrompt]) -> Result<Batch> {
    let mut tokens = Vec::with_capacity(prompts.len());
    for p in prompts {
        let ids = tok.encode(p.text)?;
        if ids.is_empty() {
            return Err(AsaError::Input(format!(
                "prompt {:?} encodes to no tokens",
                p.text
            )));
        }
        tokens.push(ids);
    }
    let b = tokens.len();
    let t = tokens.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![false; b * t];
    for (bi, tk) in tokens.iter().enumerate() {
        ids[bi * t..bi * t + tk.len()].copy_from_slice(tk);
        mask[bi * t..bi * t + tk.len()]
            .iter_mut()
            .for_each(|m| *m = true);
    }
    let last = tokens.iter().map(|x| x.len() - 1).collect();
    Ok(Batch {
        b,
        t,
        ids,
        mask,
        tokens,
        last,
    })
}

/// Late-window positions: the last `w` real positions ending at `last`, position 0 excluded.
fn late_window(last: usize, w: usize) -> Vec<usize> {
    let start = (last + 1).saturating_sub(w);
    (start..=last).filter(|&t| t != 0).collect()
}

fn single(tok: &dyn ProbeTokenizer, s: &str, vocab: usize) -> Result<TokenRef> {
    let id = tok.single_token(s).ok_or_else(|| {
        AsaError::Input(format!(
            "the probe needs {s:?} to be a single token under tokenizer '{}'",
            tok.name()
        ))
    })?;
    if id as usize >= vocab {
        return Err(AsaError::Input(format!(
            "token {s:?} has id {id}, outside the model's vocab_size {vocab}"
        )));
    }
    Ok(TokenRef {
        text: s.to_string(),
        id,
    })
}

/// (target logit, rival logit) per prompt.
type TargetRival = Vec<(f64, f64)>;

/// Forward of a batch; returns the per-prompt margins (and the infos when asked).
fn forward_margins(
    lm: &mut Lm,
    params: &ParamStore,
    batch: &Batch,
    controls: &AsaOptions,
    hooks: &LmHooks,
    return_info: bool,
    target: u32,
    rival: u32,
    cache: &mut LmCache,
) -> Result<(TargetRival, Option<Vec<Info>>)> {
    let opts = AsaOptions {
        attention_mask: Some(batch.mask.clone()),
        return_info,
        ..controls.clone()
    };
    let infos = lm.forward_hooked(params, &batch.ids, batch.b, batch.t, &opts, hooks, cache)?;
    let v = lm.cfg.vocab_size;
    // logits: [B,T,V]
    let out = (0..batch.b)
        .map(|bi| {
            let row = &cache.logits[(bi * batch.t + batch.last[bi]) * v..][..v];
            (row[target as usize] as f64, row[rival as usize] as f64)
        })
        .collect();
    Ok((out, infos))
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

fn mean_margin(tr: &[(f64, f64)]) -> f64 {
    mean(&tr.iter().map(|(a, b)| a - b).collect::<Vec<_>>())
}

/// Least-squares slope of `y` against `x` (with intercept).
fn ls_slope(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let mut sxy = 0.0;
    let mut sxx = 0.0;
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
    }
    if sxx > 0.0 {
        sxy / sxx
    } else {
        0.0
    }
}

/// Central difference at the smallest positive step `e` with both `+e` and `-e` in the grid.
fn local_slope(x: &[f64], y: &[f64]) -> Option<f64> {
    let mut best: Option<(f64, f64)> = None;
    for (i, &e) in x.iter().enumerate() {
        if e <= 0.0 {
            continue;
        }
        if let Some(j) = x.iter().position(|&m| m == -e) {
            let d = (y[i] - y[j]) / (2.0 * e);
            if best.is_none_or(|(be, _)| e < be) {
                best = Some((e, d));
            }
        }
    }
    best.map(|(_, d)| d)
}

/// Eigen-decomposition of a symmetric n×n matrix `a` (row-major, destroyed) by cyclic Jacobi
/// rotations. Returns the eigenvalues and the eigenvectors as columns of `v` [n,n].
fn sym_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..64 {
        let mut off = 0.0;
        for p in 0..n {
            for q in p + 1..n {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let sgn = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sgn / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// Principal components of N points of dimension D.
struct Pca {
    /// the points' mean [D]
    mean: Vec<f64>,
    /// unit directions [D] of the kept components, largest variance first
    comps: Vec<Vec<f64>>,
    summary: PcaSummary,
}

/// PCA of `x` [N,D] (centred on the mean), keeping at most `k` components of nonzero variance.
/// Each direction's sign is fixed so that its largest-magnitude entry is positive.
fn pca(x: &[f64], n: usize, d: usize, k: usize) -> Result<Pca> {
    if n < 2 {
        return Err(AsaError::Input(format!(
            "the late window gives {n} point(s); PCA needs at least 2 (longer prompts or a wider window)"
        )));
    }
    let mut mu = vec![0.0; d];
    for r in 0..n {
        for j in 0..d {
            mu[j] += x[r * d + j];
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let xc: Vec<f64> = (0..n * d).map(|i| x[i] - mu[i % d]).collect();
    // eigenvalues are sums of squares along each direction
    let (vals, vecs): (Vec<f64>, Vec<Vec<f64>>) = if d <= n {
        // covariance-like D×D: Xc^T Xc
        let mut c = vec![0.0; d * d];
        for r in 0..n {
            let row = &xc[r * d..(r + 1) * d];
            for i in 0..d {
                for j in 0..d {
                    c[i * d + j] += row[i] * row[j];
                }
            }
        }
        let (ev, v) = sym_eigen(&mut c, d);
        let vecs = (0..d)
            .map(|kk| (0..d).map(|i| v[i * d + kk]).collect())
            .collect();
        (ev, vecs)
    } else {
        // Gram N×N: Xc Xc^T, directions Xc^T u / |Xc^T u|
        let mut g = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (0..d).map(|q| xc[i * d + q] * xc[j * d + q]).sum();
            }
        }
        let (ev, u) = sym_eigen(&mut g, n);
        let vecs = (0..n)
            .map(|kk| {
                let mut w = vec![0.0; d];
                for r in 0..n {
                    let ur = u[r * n + kk];
                    for q in 0..d {
                        w[q] += ur * xc[r * d + q];
                    }
                }
                let nrm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
                if nrm > 0.0 {
                    w.iter_mut().for_each(|a| *a /= nrm);
                }
                w
            })
            .collect();
        (ev, vecs)
    };
    let trace: f64 = xc.iter().map(|a| a * a).sum();
    let mut order: Vec<usize> = (0..vals.len()).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
    let mut comps = Vec::new();
    let mut evr = Vec::new();
    let mut std = Vec::new();
    for &i in order.iter().take(k) {
        let lam = vals[i].max(0.0);
        if trace <= 0.0 || lam <= 1e-12 * trace {
            break;
        }
        let mut w = vecs[i].clone();
        let mut big = 0;
        for q in 1..d {
            if w[q].abs() > w[big].abs() {
                big = q;
            }
        }
        if w[big] < 0.0 {
            w.iter_mut().for_each(|a| *a = -*a);
        }
        comps.push(w);
        evr.push(lam / trace);
        std.push((lam / (n - 1) as f64).sqrt());
    }
    Ok(Pca {
        mean: mu,
        comps,
        summary: PcaSummary {
            dim: d,
            num_points: n,
            total_variance: trace / (n - 1) as f64,
            explained_variance_ratio: evr,
            std,
        },
    })
}

fn info_tensor<'a>(infos: &'a [Info], l: usize, key: &str) -> Result<&'a [f32]> {
    infos
        .get(l)
        .and_then(|i| i.get(key))
        .map(|(_, d)| d.as_slice())
        .ok_or_else(|| AsaError::Other(format!("layer {l} returned no '{key}' info")))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

fn norm(sweeps: &[Sweep]) -> f64 {
    sweeps.iter().map(|s| s.slope * s.slope).sum::<f64>().sqrt()
}

fn native_norm(sweeps: &[Sweep]) -> f64 {
    sweeps
        .iter()
        .filter_map(|s| s.slope_native)
        .map(|s| s * s)
        .sum::<f64>()
        .sqrt()
}

fn make_sweep(pc: usize, pc_std: f64, eps: &[f64], margins: Vec<f64>) -> Sweep {
    let slope = ls_slope(eps, &margins);
    Sweep {
        pc,
        pc_std,
        slope,
        slope_native: (pc_std > 0.0).then(|| slope / pc_std),
        local_slope: local_slope(eps, &margins),
        margins,
    }
}

/// Runs the probe: margins of both prompt sets, then the selected canonical experiments (see
/// the module doc): 1-3 and 6 observe (and force) the routing geometry and timescales, 4 and 5
/// sweep every probed layer on the research set. The model runs in eval mode (no dropout) with
/// the forward controls of `controls` (routing mode, noise, slot mask; its attention mask and
/// info flag are set per forward). Experiment 6 reads `text`.
pub fn run_probe(
    lm: &mut Lm,
    params: &ParamStore,
    tok: &dyn ProbeTokenizer,
    cfg: &ProbeConfig,
    controls: &AsaOptions,
    text: Option<ProbeText>,
) -> Result<ProbeSummary> {
    let mcfg = lm.cfg.clone();
    let nl = mcfg.num_layers;
    cfg.check(nl)?;
    if controls.training {
        return Err(AsaError::Input(
            "the probe runs in eval mode (no dropout)".into(),
        ));
    }
    if cfg.runs(6) && text.is_none() {
        return Err(AsaError::Input(
            "experiment 6 (timescales) needs a text to read".into(),
        ));
    }
    if cfg.eps_grid.iter().any(|e| !e.is_finite()) {
        return Err(AsaError::Input("eps_grid values must be finite".into()));
    }
    let distinct = cfg
        .eps_grid
        .iter()
        .any(|&e| cfg.eps_grid.first().is_some_and(|&f| f != e));
    if !distinct {
        return Err(AsaError::Input(
            "eps_grid needs at least two distinct values for a slope".into(),
        ));
    }
    let mut layers: Vec<usize> = cfg.layers.clone().unwrap_or_else(|| (0..nl).collect());
    layers.sort_unstable();
    layers.dedup();
    if let Some(&bad) = layers.iter().find(|&&l| l >= nl) {
        return Err(AsaError::Input(format!(
            "probe layer {bad} does not exist (the model has {nl} layers)"
        )));
    }
    let v = mcfg.vocab_size;
    let target = single(tok, TARGET, v)?;
    let rival_r = single(tok, RESEARCH_RIVAL, v)?;
    let rival_c = single(tok, CANONICAL_RIVAL, v)?;
    lm.reseed(cfg.seed);
    let mut cache = LmCache::default();
    let mut notes = Vec::new();

    // ---- canonical set: margins only
    let cb = make_batch(tok, &CANONICAL_PROMPTS)?;
    let (ctr, _) = forward_margins(
        lm,
        params,
        &cb,
        controls,
        &LmHooks::default(),
        false,
        target.id,
        rival_c.id,
        &mut cache,
    )?;

    // ---- research set: baseline with infos
    let rb = make_batch(tok, &RESEARCH_PROMPTS)?;
    let online = mcfg.variant == Variant::Online;
    let sweeps = cfg.runs(4) || cfg.runs(5);
    let with_info = !online && (sweeps || cfg.runs(2) || cfg.runs(3));
    let (rtr, infos) = forward_margins(
        lm,
        params,
        &rb,
        controls,
        &LmHooks::default(),
        with_info,
        target.id,
        rival_r.id,
        &mut cache,
    )?;
    let windows: Vec<Vec<usize>> = rb
        .last
        .iter()
        .map(|&l| late_window(l, cfg.window))
        .collect();
    let base_mean = mean_margin(&rtr);

    let prompt_results = |set: &[ProbePrompt], batch: &Batch, tr: &[(f64, f64)], win: bool| {
        set.iter()
            .enumerate()
            .map(|(i, p)| PromptResult {
                route: p.route.to_string(),
                text: p.text.to_string(),
                token_ids: batch.tokens[i].clone(),
                last_pos: batch.last[i],
                window: if win { windows[i].clone() } else { Vec::new() },
                target_logit: tr[i].0,
                rival_logit: tr[i].1,
                margin: tr[i].0 - tr[i].1,
            })
            .collect::<Vec<_>>()
    };
    let research = PromptSetResult {
        name: "research".into(),
        rival: rival_r.clone(),
        prompts: prompt_results(&RESEARCH_PROMPTS, &rb, &rtr, true),
        mean_margin: base_mean,
    };
    let canonical = PromptSetResult {
        name: "canonical".into(),
        rival: rival_c.clone(),
        prompts: prompt_results(&CANONICAL_PROMPTS, &cb, &ctr, false),
        mean_margin: mean_margin(&ctr),
    };

    let (h, k) = (mcfg.num_heads, mcfg.num_slots);
    let margins: Vec<f64> = rtr.iter().map(|(a, b)| a - b).collect();
    let mut simplex_sphere = None;
    let mut depth_sweep = None;
    let mut trajectory_basin = None;
    let mut timescales = None;
    if online {
        notes.push(
            "online variant: it returns no read logits and takes no routing overrides, so only the margins are measured"
                .into(),
        );
    }
    if let (Some(infos), false) = (&infos, online) {
        if cfg.runs(2) {
            let l = cfg.sphere_layer.unwrap_or(ProbeConfig::auto_layer(nl));
            match geometry::simplex_sphere(infos, &rb, &RESEARCH_PROMPTS, &margins, l, h, k) {
                Ok(r) => simplex_sphere = Some(r),
                Err(AsaError::Input(m)) => notes.push(format!("experiment 2 skipped: {m}")),
                Err(e) => return Err(e),
            }
        }
        if cfg.runs(3) {
            depth_sweep = Some(geometry::depth_sweep(
                infos, &rb, &margins, cfg.window, h, k,
            )?);
        }
    }
    if cfg.runs(1) && !online {
        let bb = make_batch(tok, &BASIN_PROMPTS)?;
        let pca_layer = cfg.basin_layer.unwrap_or(ProbeConfig::auto_layer(nl));
        let inp = geometry::BasinInputs {
            batch: &bb,
            base_opts: &AsaOptions {
                attention_mask: Some(bb.mask.clone()),
                return_info: false,
                ..controls.clone()
            },
            pca_layer,
            intervene: cfg
                .basin_intervene
                .clone()
                .unwrap_or_else(|| vec![pca_layer]),
            grid: cfg.basin_grid,
            pad: cfg.basin_pad,
            target: target.id,
        };
        // its own cache: the sweeps below read the research batch's block inputs from `cache`
        let mut bcache = LmCache::default();
        match geometry::trajectory_basin(lm, params, &inp, &BASIN_PROMPTS, &mut bcache) {
            Ok(r) => trajectory_basin = Some(r),
            Err(AsaError::Input(m)) => notes.push(format!("experiment 1 skipped: {m}")),
            Err(e) => return Err(e),
        }
    }
    if let (true, false, Some(text)) = (cfg.runs(6), online, &text) {
        let ts = &cfg.timescales;
        let t = ts.seq_len.min(mcfg.max_seq_len);
        let ids = timescales::windows_from_text(text.text, &|s| tok.encode(s), ts.batch, t)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(AsaError::Input(format!(
                "the timescale text gives token id {bad}, outside the model's vocab_size {v}"
            )));
        }
        let source = format!("{}: {} windows of {t} tokens", text.name, ts.batch);
        timescales = Some(timescales::timescales(
            lm, params, &ids, ts.batch, t, ts, controls, source,
        )?);
    }

    let mut layer_results = Vec::new();
    if let (Some(infos), true) = (infos.as_ref(), sweeps) {
        let (b, t, c) = (rb.b, rb.t, mcfg.embed_dim);
        let rtemp = mcfg.read_temperature.max(1e-6);
        // baseline read weights of every layer: [B,H,T,K]
        let rw_base: Vec<Vec<f32>> = (0..nl)
            .map(|m| info_tensor(infos, m, "read_weights").map(<[f32]>::to_vec))
            .collect::<Result<_>>()?;
        // residual stream entering each probed block: [B,T,C]
        let x_in: Vec<Vec<f32>> = layers
            .iter()
            .map(|&l| cache.block_input(l).to_vec())
            .collect();
        let points: Vec<(usize, usize)> = windows
            .iter()
            .enumerate()
            .flat_map(|(bi, w)| w.iter().map(move |&ti| (bi, ti)))
            .collect();
        let np = points.len();
        let eps = &cfg.eps_grid;
        for (li, &l) in layers.iter().enumerate() {
            // read logits [B,H,T,K]; routing points: head-mean rows [N,K], centred over K
            let rl = info_tensor(infos, l, "read_logits")?;
            let mut rpts = vec![0.0f64; np * k];
            for (pi, &(bi, ti)) in points.iter().enumerate() {
                for hi in 0..h {
                    let row = &rl[((bi * h + hi) * t + ti) * k..][..k];
                    for s in 0..k {
                        rpts[pi * k + s] += row[s] as f64 / h as f64;
                    }
                }
            }
            // centre each row over K: softmax ignores a shift shared by all slots
            for row in rpts.chunks_mut(k) {
                let m = row.iter().sum::<f64>() / k as f64;
                row.iter_mut().for_each(|x| *x -= m);
            }
            let rpca = pca(&rpts, np, k, cfg.num_pcs)?;
            // residual points [N,C]
            let xl = &x_in[li];
            let mut hpts = vec![0.0f64; np * c];
            for (pi, &(bi, ti)) in points.iter().enumerate() {
                for q in 0..c {
                    hpts[pi * c + q] = xl[(bi * t + ti) * c + q] as f64;
                }
            }
            let hpca = pca(&hpts, np, c, cfg.num_pcs)?;

            // routing sweeps (the eps = 0 forward is the same for every component: run it once)
            let mut routing = Vec::new();
            let mut zero_r = None;
            let routing_comps = if cfg.runs(4) { &rpca.comps[..] } else { &[] };
            for (j, dir) in routing_comps.iter().enumerate() {
                let sd = rpca.summary.std[j];
                let mut ms = Vec::with_capacity(eps.len());
                for &e in eps {
                    if let (true, Some(z)) = (e == 0.0, zero_r) {
                        ms.push(z);
                        continue;
                    }
                    let mut w = rw_base[l].clone();
                    for &(bi, ti) in &points {
                        for hi in 0..h {
                            let o = ((bi * h + hi) * t + ti) * k;
                            let z: Vec<f64> = (0..k)
                                .map(|s| (rl[o + s] as f64 + e * sd * dir[s]) / rtemp)
                                .collect();
                            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let ex: Vec<f64> = z.iter().map(|a| (a - mx).exp()).collect();
                            let sum: f64 = ex.iter().sum();
                            for s in 0..k {
                                w[o + s] = (ex[s] / sum) as f32;
                            }
                        }
                    }
                    let mut hooks = LmHooks::new(nl);
                    hooks.layer_routing[l] = Some(RoutingMode::Override(w));
                    let (tr, _) = forward_margins(
                        lm, params, &rb, controls, &hooks, false, target.id, rival_r.id, &mut cache,
                    )?;
                    ms.push(mean_margin(&tr));
                    if e == 0.0 {
                        zero_r = ms.last().copied();
                    }
                }
                routing.push(make_sweep(j, sd, eps, ms));
            }

            // residual sweeps, routing free and frozen
            let mut residual = Vec::new();
            let mut frozen = Vec::new();
            let mut zero_h = None;
            for (j, dir) in hpca.comps.iter().enumerate() {
                let sd = hpca.summary.std[j];
                let mut ms = Vec::with_capacity(eps.len());
                let mut fs = Vec::with_capacity(eps.len());
                for &e in eps {
                    if let (true, Some((zm, zf))) = (e == 0.0, zero_h) {
                        ms.push(zm);
                        fs.push(zf);
                        continue;
                    }
                    // delta: [B,T,C], nonzero at late-window positions
                    let mut delta = vec![0.0f32; b * t * c];
                    for &(bi, ti) in &points {
                        for q in 0..c {
                            delta[(bi * t + ti) * c + q] = (e * sd * dir[q]) as f32;
                        }
                    }
                    let mut hooks = LmHooks::new(nl);
                    hooks.residual_add[l] = Some(delta);
                    let (tr, _) = forward_margins(
                        lm, params, &rb, controls, &hooks, false, target.id, rival_r.id, &mut cache,
                    )?;
                    ms.push(mean_margin(&tr));
                    if cfg.runs(5) {
                        for m in l..nl {
                            hooks.layer_routing[m] =
                                Some(RoutingMode::Override(rw_base[m].clone()));
                        }
                        let (tr, _) = forward_margins(
                            lm, params, &rb, controls, &hooks, false, target.id, rival_r.id,
                            &mut cache,
                        )?;
                        fs.push(mean_margin(&tr));
                    } else {
                        fs.push(f64::NAN);
                    }
                    if e == 0.0 {
                        zero_h = Some((ms[ms.len() - 1], fs[fs.len() - 1]));
                    }
                }
                residual.push(make_sweep(j, sd, eps, ms));
                if cfg.runs(5) {
                    frozen.push(make_sweep(j, sd, eps, fs));
                }
            }
            let (rn, hn, fnn) = (norm(&routing), norm(&residual), norm(&frozen));
            layer_results.push(LayerProbe {
                layer: l,
                baseline_margin: base_mean,
                routing_pca: rpca.summary,
                residual_pca: hpca.summary,
                routing_slope_norm: rn,
                residual_slope_norm: hn,
                frozen_slope_norm: fnn,
                routing_residual_ratio: (!routing.is_empty()).then(|| ratio(rn, hn)).flatten(),
                routing_residual_ratio_native: (!routing.is_empty())
                    .then(|| ratio(native_norm(&routing), native_norm(&residual)))
                    .flatten(),
                frozen_residual_ratio: (!frozen.is_empty()).then(|| ratio(fnn, hn)).flatten(),
                routing,
                residual,
                residual_frozen: frozen,
            });
        }
    }

    Ok(ProbeSummary {
        model_name: String::new(),
        tokenizer: tok.name().to_string(),
        seed: cfg.seed,
        probe_config: cfg.clone(),
        model_config: mcfg,
        num_params: params.num_elements(),
        target,
        paris_margin_research_mean: research.mean_margin,
        paris_margin_canonical_mean: canonical.mean_margin,
        paris_margin_mean: research.mean_margin,
        research,
        canonical,
        layers: layer_results,
        trajectory_basin,
        simplex_sphere,
        depth_sweep,
        timescales,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeMap;

    /// Word-level toy tokenizer: " Paris", " the", " London" get ids 1, 2, 3; other words
    /// (split on spaces) get ids in order of first appearance, modulo the vocabulary.
    struct ToyTok {
        map: BTreeMap<String, u32>,
    }

    impl ToyTok {
        fn new(vocab: u32) -> Self {
            let mut map = BTreeMap::new();
            for (i, w) in ["Paris", "the", "London"].iter().enumerate() {
                map.insert(w.to_string(), i as u32 + 1);
            }
            let mut next = 4;
            let words = RESEARCH_PROMPTS
                .iter()
                .chain(&CANONICAL_PROMPTS)
                .chain(&BASIN_PROMPTS)
                .flat_map(|p| p.text.split_whitespace())
                .chain(TOY_TEXT.split_whitespace());
            {
                for w in words {
                    if !map.contains_key(w) {
                        map.insert(w.to_string(), next % vocab);
                        next += 1;
                    }
                }
            }
            ToyTok { map }
        }
    }

    impl ProbeTokenizer for ToyTok {
        fn encode(&self, s: &str) -> Result<Vec<u32>> {
            s.split_whitespace()
                .map(|w| {
                    self.map
                        .get(w)
                        .copied()
                        .ok_or_else(|| AsaError::Input(format!("unknown word {w}")))
                })
                .collect()
        }
        fn single_token(&self, s: &str) -> Option<u32> {
            let w = s.strip_prefix(' ')?;
            (!w.contains(' '))
                .then(|| self.map.get(w).copied())
                .flatten()
        }
        fn name(&self) -> &str {
            "toy"
        }
    }

    fn tiny_model() -> (Lm, ParamStore) {
        let cfg = ModelConfig {
            vocab_size: 64,
            max_seq_len: 16,
            embed_dim: 16,
            num_layers: 2,
            num_heads: 2,
            num_slots: 4,
            mlp_ratio: 2.0,
            dropout: 0.0,
            slot_dropout: 0.0,
            slotspace_dropout: 0.0,
            slotspace_dim: 4,
            write_chunk_size: 4,
            slotspace_chunk_size: 4,
            content_read_init: 0.5,
            slotspace_gate_init: 0.3,
            alibi_strength_init: 0.4,
            seed: 7,
            ..Default::default()
        };
        let (lm, mut store) = Lm::new(&cfg).unwrap();
        // larger weights than the 0.02 init, so routing and residual carry signal
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for d in store.data.iter_mut() {
            if d.len() > 1 {
                d.iter_mut()
                    .for_each(|x| *x = (rng.gen::<f32>() * 2.0 - 1.0) * 0.5);
            }
        }
        (lm, store)
    }

    /// The timescale text of the tests: words the toy tokenizer knows.
    const TOY_TEXT: &str = "the river flows through the old city and the tower stands\n\
        a major city on the river is known for the tower\n\
        the seat of government is in the largest city\n\
        during the revolution the city of the river was liberated\n";

    fn small_cfg() -> ProbeConfig {
        ProbeConfig {
            num_pcs: 2,
            eps_grid: vec![-1.0, 0.0, 1.0],
            basin_grid: 3,
            timescales: TimescaleConfig {
                batch: 3,
                seq_len: 16,
                max_lag: 4,
                write_timepoints: 4,
                write_min_t: 2,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn toy_text() -> Option<ProbeText<'static>> {
        Some(ProbeText {
            name: "toy".into(),
            text: TOY_TEXT,
        })
    }

    fn probe(
        lm: &mut Lm,
        store: &ParamStore,
        tok: &dyn ProbeTokenizer,
        cfg: &ProbeConfig,
    ) -> Result<ProbeSummary> {
        run_probe(lm, store, tok, cfg, &AsaOptions::default(), toy_text())
    }

    #[test]
    fn pca_recovers_known_axes() {
        // points along x with spread 3 and along y with spread 1, in 3-D and via the Gram path
        let pts: Vec<[f64; 3]> = vec![
            [3.0, 0.0, 0.0],
            [-3.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, -1.0, 0.0],
        ];
        let flat: Vec<f64> = pts.iter().flatten().cloned().collect();
        for (x, n, d) in [(flat.clone(), 4, 3), (flat[..6].to_vec(), 2, 3)] {
            let p = pca(&x, n, d, 3).unwrap();
            assert!((p.comps[0][0] - 1.0).abs() < 1e-12, "{:?}", p.comps);
            let total: f64 = p.summary.explained_variance_ratio.iter().sum();
            assert!((total - 1.0).abs() < 1e-12);
        }
        let p = pca(&flat, 4, 3, 3).unwrap();
        assert_eq!(p.comps.len(), 2, "zero-variance axis dropped");
        assert!((p.comps[1][1] - 1.0).abs() < 1e-12);
        assert!((p.summary.explained_variance_ratio[0] - 0.9).abs() < 1e-12);
        assert!((p.summary.std[0] - (18.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn late_window_skips_position_zero() {
        assert_eq!(late_window(6, 5), vec![2, 3, 4, 5, 6]);
        assert_eq!(late_window(2, 5), vec![1, 2]);
        assert!(late_window(0, 5).is_empty());
        assert_eq!(
            local_slope(&[-1.0, 0.0, 1.0, 2.0], &[1.0, 2.0, 5.0, 9.0]),
            Some(2.0)
        );
        assert!((ls_slope(&[0.0, 1.0, 2.0], &[1.0, 3.0, 5.0]) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn probe_summary_is_finite_and_deterministic() {
        let (mut lm, store) = tiny_model();
        let tok = ToyTok::new(64);
        let cfg = small_cfg();
        let s = probe(&mut lm, &store, &tok, &cfg).unwrap();
        assert_eq!(s.research.prompts.len(), RESEARCH_PROMPTS.len());
        assert_eq!(s.canonical.prompts.len(), CANONICAL_PROMPTS.len());
        assert_eq!(s.paris_margin_mean, s.paris_margin_research_mean);
        assert!(s.paris_margin_research_mean.is_finite());
        assert!(s.paris_margin_canonical_mean.is_finite());
        assert_eq!(s.layers.len(), 2);
        for lp in &s.layers {
            assert_eq!(lp.routing.len(), 2);
            assert_eq!(lp.residual.len(), 2);
            assert_eq!(lp.residual_frozen.len(), 2);
            for sw in lp
                .routing
                .iter()
                .chain(&lp.residual)
                .chain(&lp.residual_frozen)
            {
                assert!(sw.margins.iter().all(|m| m.is_finite()));
                assert!(sw.slope.is_finite() && sw.pc_std > 0.0);
            }
            assert!(lp.routing_slope_norm.is_finite() && lp.routing_slope_norm > 0.0);
            assert!(lp.residual_slope_norm > 0.0);
            assert!(lp.routing_residual_ratio.unwrap().is_finite());
        }
        // a manual margin agrees with the summary
        let p0 = &s.research.prompts[0];
        assert_eq!(p0.margin, p0.target_logit - p0.rival_logit);
        // same inputs, same numbers
        let s2 = probe(&mut lm, &store, &tok, &cfg).unwrap();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            serde_json::to_string(&s2).unwrap()
        );
    }

    #[test]
    fn routing_override_at_eps_zero_is_baseline() {
        let (mut lm, store) = tiny_model();
        let tok = ToyTok::new(64);
        // forcing every layer's baseline read weights through Override leaves the logits alone
        let rb = make_batch(&tok, &RESEARCH_PROMPTS).unwrap();
        let opts = AsaOptions {
            attention_mask: Some(rb.mask.clone()),
            return_info: true,
            ..Default::default()
        };
        let mut cache = LmCache::default();
        let infos = lm
            .forward(&store, &rb.ids, rb.b, rb.t, &opts, &mut cache)
            .unwrap()
            .unwrap();
        let base = cache.logits.clone();
        let mut hooks = LmHooks::new(2);
        for l in 0..2 {
            let w = info_tensor(&infos, l, "read_weights").unwrap().to_vec();
            hooks.layer_routing[l] = Some(RoutingMode::Override(w));
        }
        let o2 = AsaOptions {
            return_info: false,
            ..opts
        };
        lm.forward_hooked(&store, &rb.ids, rb.b, rb.t, &o2, &hooks, &mut cache)
            .unwrap();
        let worst = base
            .iter()
            .zip(&cache.logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "override changed logits by {worst}");

        // in the probe, the eps = 0 point of every routing sweep is the baseline margin
        let s = probe(&mut lm, &store, &tok, &small_cfg()).unwrap();
        for lp in &s.layers {
            for sw in lp
                .routing
                .iter()
                .chain(&lp.residual)
                .chain(&lp.residual_frozen)
            {
                let d = (sw.margins[1] - lp.baseline_margin).abs();
                assert!(
                    d <= 1e-5,
                    "layer {} pc {}: eps=0 off by {d}",
                    lp.layer,
                    sw.pc
                );
            }
        }
    }

    #[test]
    fn frozen_routing_sweeps_differ_from_free_ones() {
        let (mut lm, store) = tiny_model();
        let tok = ToyTok::new(64);
        let s = probe(&mut lm, &store, &tok, &small_cfg()).unwrap();
        for lp in &s.layers {
            for (a, b) in lp.residual.iter().zip(&lp.residual_frozen) {
                // eps = -1 and +1 (index 1 is eps = 0, where both are the baseline)
                assert!((a.margins[0] - b.margins[0]).abs() > 1e-7);
                assert!((a.margins[2] - b.margins[2]).abs() > 1e-7);
            }
        }
    }

    #[test]
    fn write_outputs_makes_json_and_pngs() {
        let (mut lm, store) = tiny_model();
        let tok = ToyTok::new(64);
        let mut s = probe(&mut lm, &store, &tok, &small_cfg()).unwrap();
        s.model_name = "tiny".into();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("probe");
        write_outputs(&s, &out).unwrap();
        let names = [
            "summary.json",
            "paris_margin.png",
            "pca_explained_variance.png",
            "sweep_layer_00.png",
            "sweep_layer_01.png",
        ];
        for n in names {
            let len = std::fs::metadata(out.join(n)).unwrap().len();
            assert!(len > 0, "{n} is empty");
        }
        let back: ProbeSummary =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(back.model_name, "tiny");
        assert_eq!(back.research.prompts[3].text, RESEARCH_PROMPTS[3].text);
        let png = std::fs::read(out.join("paris_margin.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn multi_token_target_is_a_clear_error() {
        struct NoParis(ToyTok);
        impl ProbeTokenizer for NoParis {
            fn encode(&self, s: &str) -> Result<Vec<u32>> {
                self.0.encode(s)
            }
            fn single_token(&self, s: &str) -> Option<u32> {
                (s != TARGET).then(|| self.0.single_token(s)).flatten()
            }
        }
        let (mut lm, store) = tiny_model();
        let e = probe(&mut lm, &store, &NoParis(ToyTok::new(64)), &small_cfg()).unwrap_err();
        assert!(e.to_string().contains("\" Paris\""), "{e}");
    }

    #[test]
    fn gpt2_has_the_probe_tokens() {
        let tok = crate::data::tokenizer::Tokenizer::gpt2().unwrap();
        let t: &dyn ProbeTokenizer = &tok;
        for w in [TARGET, RESEARCH_RIVAL, CANONICAL_RIVAL] {
            assert!(t.single_token(w).is_some(), "{w:?}");
        }
        let b = make_batch(t, &RESEARCH_PROMPTS).unwrap();
        assert_eq!(b.b, RESEARCH_PROMPTS.len());
        assert!(b.last.iter().all(|&l| l >= 3));
        let e = single(&crate::data::tokenizer::Tokenizer::byte(), TARGET, 256).unwrap_err();
        assert!(e.to_string().contains("byte"), "{e}");
    }

    /// The canonical set is the reference notebook's Canon Probes set (cell 6 of
    /// `ASA_HF_Checkpoint_CanonProbes_and_MiniFinetune.ipynb`), verbatim and in order, so that
    /// `paris_margin_canonical_mean` is comparable with the notebook's `mean_margin`.
    #[test]
    fn canonical_set_is_the_reference_notebooks() {
        let notebook = [
            "The capital of France is",
            "France's capital city is",
            "Paris is the capital of",
            "The capital of the UK is",
            "London is the capital of",
            "A major city in France is",
        ];
        let ours: Vec<&str> = CANONICAL_PROMPTS.iter().map(|p| p.text).collect();
        assert_eq!(ours, notebook);
        assert_eq!(CANONICAL_RIVAL, " London");
        // every prompt encodes under GPT-2 as in the notebook (no special tokens added)
        let tok = crate::data::tokenizer::Tokenizer::gpt2().unwrap();
        let b = make_batch(&tok, &CANONICAL_PROMPTS).unwrap();
        assert_eq!(b.b, 6);
        assert!(b.last.iter().all(|&l| l >= 4), "{:?}", b.last);
    }

    #[test]
    fn online_variant_gets_margins_only() {
        let (lm0, store) = tiny_model();
        let cfg = ModelConfig {
            variant: Variant::Online,
            ..lm0.cfg.clone()
        };
        let (mut lm, store2) = Lm::new(&cfg).unwrap();
        assert_eq!(store2.num_elements(), store.num_elements());
        let s = probe(&mut lm, &store2, &ToyTok::new(64), &small_cfg()).unwrap();
        assert!(s.layers.is_empty() && !s.notes.is_empty());
        assert!(s.paris_margin_mean.is_finite());
    }

    /// A tiny model with other dimensions (same weight recipe as `tiny_model`).
    fn model_with(f: impl FnOnce(&mut ModelConfig)) -> (Lm, ParamStore) {
        let (lm0, _) = tiny_model();
        let mut cfg = lm0.cfg.clone();
        f(&mut cfg);
        let (lm, mut store) = Lm::new(&cfg).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for d in store.data.iter_mut() {
            if d.len() > 1 {
                d.iter_mut()
                    .for_each(|x| *x = (rng.gen::<f32>() * 2.0 - 1.0) * 0.5);
            }
        }
        (lm, store)
    }

    fn only(e: u8) -> ProbeConfig {
        ProbeConfig {
            experiments: vec![e],
            ..small_cfg()
        }
    }

    #[test]
    fn all_experiments_are_finite_and_shaped() {
        let (mut lm, store) = tiny_model();
        let s = probe(&mut lm, &store, &ToyTok::new(64), &small_cfg()).unwrap();
        let tb = s.trajectory_basin.as_ref().expect("experiment 1");
        assert_eq!(tb.energy.len(), 3);
        assert!(tb
            .energy
            .iter()
            .all(|r| r.len() == 3 && r.iter().all(|e| e.is_finite() && *e > 0.0)));
        assert_eq!(tb.trajectories.len(), BASIN_PROMPTS.len());
        assert!(tb.baseline_energy.is_finite() && tb.endpoint_energy.is_finite());
        assert!((0.0..=1.0).contains(&tb.endpoint_depth));
        let sp = s.simplex_sphere.as_ref().expect("experiment 2");
        assert_eq!(sp.endpoints.len(), RESEARCH_PROMPTS.len());
        for (e, p) in sp.endpoints.iter().zip(&s.research.prompts) {
            let n: f64 = e.sphere.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((n - 1.0).abs() < 1e-9, "endpoint off the sphere: {n}");
            // the sphere's endpoint scores are the research margins
            assert_eq!(e.margin, p.margin);
        }
        let members: usize = sp.clusters.iter().map(|c| c.members.len()).sum();
        assert_eq!(members, RESEARCH_PROMPTS.len());
        let ds = s.depth_sweep.as_ref().expect("experiment 3");
        assert_eq!(ds.rows.len(), 2);
        for r in &ds.rows {
            assert!(r.entropy_late >= 0.0 && r.entropy_late <= ds.max_entropy + 1e-9);
            assert!(r.read_entropy_late >= 0.0 && r.read_entropy_late <= ds.max_entropy + 1e-9);
            assert!(r.evr.iter().all(|v| (0.0..=1.0 + 1e-12).contains(v)));
            assert!(r.attractor_sharpness.is_none_or(|c| c.abs() <= 1.0 + 1e-12));
        }
        let ts = s.timescales.as_ref().expect("experiment 6");
        assert_eq!((ts.inertia.len(), ts.write.len()), (2, 2));
        assert_eq!(ts.lags, 4);
        for (il, wl) in ts.inertia.iter().zip(&ts.write) {
            assert_eq!(il.curve.len(), 4);
            assert!(il
                .curve
                .iter()
                .chain(&il.residual_curve)
                .all(|c| c.is_finite() && c.abs() <= 1.0 + 1e-9));
            assert!(il.half_life_090 >= 1.0 && il.half_life_090 <= 5.0);
            assert_eq!(wl.head_slot_half_life.len(), 2);
            assert_eq!(wl.head_slot_ess[0].len(), 4);
            assert!(wl.mean_ess >= 1.0 && wl.mean_half_life >= 1.0);
        }
        let dir = std::env::temp_dir().join(format!("asa_probe_all_{}", std::process::id()));
        write_outputs(&s, &dir).unwrap();
        for f in [
            "trajectory_basin.png",
            "simplex_sphere.png",
            "depth_sweep.png",
            "policy_inertia.png",
            "timescales_vs_layer.png",
            "half_life_heatmap.png",
            "ess_heatmap.png",
        ] {
            assert!(std::fs::metadata(dir.join(f)).unwrap().len() > 1000, "{f}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn experiments_select_what_runs() {
        let (mut lm, store) = tiny_model();
        let s = probe(&mut lm, &store, &ToyTok::new(64), &only(3)).unwrap();
        assert!(s.depth_sweep.is_some());
        assert!(s.trajectory_basin.is_none() && s.simplex_sphere.is_none());
        assert!(s.timescales.is_none() && s.layers.is_empty());
        // 4 without 5: routing and residual sweeps, no frozen ones
        let s = probe(&mut lm, &store, &ToyTok::new(64), &only(4)).unwrap();
        assert!(s
            .layers
            .iter()
            .all(|l| !l.routing.is_empty() && l.residual_frozen.is_empty()));
        assert!(s.layers.iter().all(|l| l.frozen_residual_ratio.is_none()));
        // 5 without 4: residual and frozen sweeps
        let s = probe(&mut lm, &store, &ToyTok::new(64), &only(5)).unwrap();
        assert!(s
            .layers
            .iter()
            .all(|l| l.routing.is_empty() && !l.residual_frozen.is_empty()));
        let bad = ProbeConfig {
            experiments: vec![7],
            ..small_cfg()
        };
        let e = probe(&mut lm, &store, &ToyTok::new(64), &bad).unwrap_err();
        assert!(e.to_string().contains("unknown experiment 7"), "{e}");
        let e = run_probe(
            &mut lm,
            &store,
            &ToyTok::new(64),
            &only(6),
            &AsaOptions::default(),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs a text"), "{e}");
    }

    #[test]
    fn basin_endpoint_forcing_is_the_baseline_when_the_plane_holds_the_routing() {
        // one head and three slots: the head-mean read logits are the head's own, and the
        // centred rows lie in a plane, so the PCA plane reconstructs them exactly and forcing
        // each prompt's own endpoint reproduces its free routing
        let (mut lm, store) = model_with(|c| {
            c.num_heads = 1;
            c.num_slots = 3;
        });
        let s = probe(&mut lm, &store, &ToyTok::new(64), &only(1)).unwrap();
        let tb = s.trajectory_basin.unwrap();
        assert!(
            (tb.endpoint_energy - tb.baseline_energy).abs() < 1e-4,
            "{} vs {}",
            tb.endpoint_energy,
            tb.baseline_energy
        );
        // and the basin is not flat: forced routing matters
        let flat: Vec<f64> = tb.energy.iter().flatten().copied().collect();
        let spread = flat.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - flat.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(spread > 1e-4, "flat basin: {spread}");
    }

    #[test]
    fn sharper_read_queries_lower_the_depth_sweep_entropy() {
        let (mut lm, store) = tiny_model();
        let s0 = probe(&mut lm, &store, &ToyTok::new(64), &only(3)).unwrap();
        let mut sharp = store.clone();
        let id = sharp.id("blocks.1.attn.Wq_read.weight").unwrap();
        sharp.data[id].iter_mut().for_each(|x| *x *= 8.0);
        let s1 = probe(&mut lm, &sharp, &ToyTok::new(64), &only(3)).unwrap();
        let (e0, e1) = (&s0.depth_sweep.unwrap().rows, &s1.depth_sweep.unwrap().rows);
        // layer 0 is upstream of the change: the same routing (its sharpness, correlated with
        // the final margins, moves)
        assert_eq!(e0[0].entropy_late, e1[0].entropy_late);
        assert_eq!(e0[0].evr, e1[0].evr);
        assert!(
            e1[1].entropy_late < e0[1].entropy_late,
            "{:?} vs {:?}",
            e1[1],
            e0[1]
        );
        assert!(e1[1].read_entropy_late < e0[1].read_entropy_late);
    }

    #[test]
    fn uniform_routing_has_full_inertia() {
        // no content read and zero read queries: every read is uniform over the slots, so the
        // read weights never change and the inertia curve is 1 at every lag
        let (mut lm, mut store) = model_with(|c| c.use_content_read = false);
        for l in 0..2 {
            let id = store
                .id(&format!("blocks.{l}.attn.Wq_read.weight"))
                .unwrap();
            store.data[id].iter_mut().for_each(|x| *x = 0.0);
        }
        let s = probe(&mut lm, &store, &ToyTok::new(64), &only(6)).unwrap();
        let ts = s.timescales.unwrap();
        for il in &ts.inertia {
            assert!(
                il.curve.iter().all(|&c| (c - 1.0).abs() < 1e-9),
                "{:?}",
                il.curve
            );
            assert_eq!(il.half_life_090, (ts.lags + 1) as f64);
            assert!(il.sem.iter().all(|&v| v < 1e-9));
        }
    }

    #[test]
    fn half_life_and_ess_of_known_distributions() {
        // equal logits over n tokens: ESS n, half the mass in ceil(n / 2) tokens
        let (hl, ess) = tail_half_life_and_ess(&[0.0; 10], 0.5);
        assert_eq!(hl, 5);
        assert!((ess - 10.0).abs() < 1e-9);
        // one dominant most recent token
        let (hl, ess) = tail_half_life_and_ess(&[0.0, 0.0, 0.0, 50.0], 0.5);
        assert_eq!(hl, 1);
        assert!((ess - 1.0).abs() < 1e-9);
        // the oldest token dominant: the tail needs every token
        let (hl, _) = tail_half_life_and_ess(&[50.0, 0.0, 0.0, 0.0], 0.5);
        assert_eq!(hl, 4);
        // masked entries carry no mass
        let (hl, ess) = tail_half_life_and_ess(&[0.0, 0.0, f64::NEG_INFINITY], 0.5);
        assert_eq!(hl, 2);
        assert!((ess - 2.0).abs() < 1e-9);
        // inertia half-life: interpolated crossing, 1 when it starts below, len + 1 when never
        assert!((half_life(&[1.0, 0.95, 0.85], 0.9) - 2.5).abs() < 1e-12);
        assert_eq!(half_life(&[0.5, 0.4], 0.9), 1.0);
        assert_eq!(half_life(&[0.99, 0.98], 0.9), 3.0);
        assert_eq!(timepoints(32, 255, 4), vec![32, 106, 181, 255]);
        assert_eq!(timepoints(5, 6, 4), vec![5, 6]);
    }
}
