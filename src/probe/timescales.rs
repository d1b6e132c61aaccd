//! Routing timescales (canonical experiment 6): policy inertia and its half-life per layer, and
//! the slot-write half-life and effective sample size (ESS) per layer, head and slot (the
//! paper's timescale plot and half-life / ESS heatmaps).
//!
//! # Policy inertia
//! Reference: `building_blocks/ASAResearch.ipynb`, cell "Policy Inertia: curves + uncertainty +
//! half-life summary". For the read weights `p_t` [K] of each (sequence, head), the inertia at
//! lag `d` is the mean over anchors `t` (the first `T - L` positions, `L = min(max_lag, T - 1)`)
//! of `cos(p_t, p_{t+d})`; the curve is averaged over sequences and heads, with the standard
//! error over (sequence, head) curves. Its half-life at threshold `q` is the first lag where the
//! curve falls to `q` or below, interpolated linearly between lags (1 when it starts below,
//! `L + 1` when it never falls). We add what the paper's claim compares it with: the same curve
//! for the residual stream entering the block (`cos(x_t, x_{t+d})`), and each curve's chance
//! level, the mean cosine between different sequences at the same position.
//!
//! # Slot-write half-life and ESS
//! Reference: cell "Slot Write Half-Life: capture + timescales + ESS + plots". At each of up to
//! `timepoints` positions `t` spread evenly over `[min_t, T - 1]`, the write distribution of a
//! (sequence, head, slot) is the prefix softmax `p_i = softmax_{i <= t}(write_logits[.., i])`
//! (the write logits with temperature and ALiBi, the exact write weights of chunk size 1). Its
//! tail half-life is the fewest most recent tokens holding at least `threshold` of the mass; its
//! ESS is `1 / sum_i p_i^2`. Both are averaged per head and slot (over sequences and positions).

use serde::{Deserialize, Serialize};

use super::{info_tensor, mean};
use crate::error::{AsaError, Result};
use crate::model::layer::{AsaOptions, Info};
use crate::model::lm::{Lm, LmCache, LmHooks};
use crate::model::params::ParamStore;

/// Experiment 6 settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimescaleConfig {
    /// sequences (windows of the text)
    pub batch: usize,
    /// tokens per sequence (capped at the model's max_seq_len)
    pub seq_len: usize,
    /// largest lag of the inertia curves
    pub max_lag: usize,
    /// mass the write tail must hold
    pub write_threshold: f64,
    /// positions at which the write distributions are measured
    pub write_timepoints: usize,
    /// first such position
    pub write_min_t: usize,
}

impl Default for TimescaleConfig {
    fn default() -> Self {
        TimescaleConfig {
            batch: 8,
            seq_len: 256,
            max_lag: 64,
            write_threshold: 0.5,
            write_timepoints: 32,
            write_min_t: 32,
        }
    }
}

/// Policy inertia of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InertiaLayer {
    pub layer: usize,
    /// mean cos(p_t, p_{t+d}) of the read weights at lags d = 1..=L
    pub curve: Vec<f64>,
    /// standard error of `curve` over (sequence, head) curves
    pub sem: Vec<f64>,
    pub half_life_090: f64,
    pub half_life_080: f64,
    /// mean cosine of read weights of different sequences at the same position
    pub chance: Option<f64>,
    /// mean cos(x_t, x_{t+d}) of the residual stream entering the block
    pub residual_curve: Vec<f64>,
    pub residual_half_life_090: f64,
    pub residual_half_life_080: f64,
    pub residual_chance: Option<f64>,
}

/// Slot-write timescales of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteLayer {
    pub layer: usize,
    pub mean_half_life: f64,
    pub median_half_life: f64,
    pub mean_ess: f64,
    pub median_ess: f64,
    /// [H] mean tail half-life of each head
    pub head_half_life: Vec<f64>,
    /// [H] mean ESS of each head
    pub head_ess: Vec<f64>,
    /// [H][K] mean tail half-life of each head and slot
    pub head_slot_half_life: Vec<Vec<f64>>,
    /// [H][K] mean ESS of each head and slot
    pub head_slot_ess: Vec<Vec<f64>>,
}

/// Experiment 6.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timescales {
    /// where the token windows came from
    pub source: String,
    pub config: TimescaleConfig,
    /// tokens per sequence actually used
    pub seq_len: usize,
    /// inertia lags measured (L)
    pub lags: usize,
    /// positions of the write measurements
    pub write_t_points: Vec<usize>,
    pub inertia: Vec<InertiaLayer>,
    pub write: Vec<WriteLayer>,
}

/// First lag (1-based, linearly interpolated) where `curve` falls to `q` or below; 1 when it
/// starts there, `len + 1` when it never does; NaN for an empty curve.
pub fn half_life(curve: &[f64], q: f64) -> f64 {
    if curve.is_empty() {
        return f64::NAN;
    }
    match curve.iter().position(|&y| y <= q) {
        None => (curve.len() + 1) as f64,
        Some(0) => 1.0,
        Some(i) => {
            let (y0, y1) = (curve[i - 1], curve[i]);
            if (y1 - y0).abs() < 1e-12 {
                (i + 1) as f64
            } else {
                i as f64 + (q - y0) / (y1 - y0)
            }
        }
    }
}

/// Tail half-life (fewest most recent entries holding `>= q` of the mass) and ESS of one prefix
/// softmax over `logits` (finite ones; -inf entries carry no mass).
pub fn tail_half_life_and_ess(logits: &[f64], q: f64) -> (usize, f64) {
    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !mx.is_finite() {
        return (logits.len(), f64::NAN);
    }
    let e: Vec<f64> = logits.iter().map(|&x| (x - mx).exp()).collect();
    let z: f64 = e.iter().sum::<f64>().max(1e-12);
    let ess = 1.0 / e.iter().map(|x| (x / z) * (x / z)).sum::<f64>().max(1e-12);
    let mut tail = 0.0;
    for (n, x) in e.iter().rev().enumerate() {
        tail += x / z;
        if tail >= q {
            return (n + 1, ess);
        }
    }
    (logits.len(), ess)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt().max(1e-8) * bb.sqrt().max(1e-8))
}

/// Inertia curves of `seqs` [S][T][D] at lags 1..=lags: one curve per sequence (mean over the
/// first `T - lags` anchors).
fn inertia_curves(seqs: &[Vec<Vec<f64>>], lags: usize) -> Vec<Vec<f64>> {
    seqs.iter()
        .map(|s| {
            let anchors = s.len() - lags;
            (1..=lags)
                .map(|d| {
                    (0..anchors).map(|t| cosine(&s[t], &s[t + d])).sum::<f64>() / anchors as f64
                })
                .collect()
        })
        .collect()
}

/// Mean cosine between different sequences' vectors at the same position; None for fewer than
/// two sequences.
fn chance<'a>(seqs: impl Iterator<Item = &'a Vec<Vec<f64>>> + Clone) -> Option<f64> {
    let all: Vec<&Vec<Vec<f64>>> = seqs.collect();
    if all.len() < 2 {
        return None;
    }
    let mut acc = Vec::new();
    for a in 0..all.len() {
        for b in a + 1..all.len() {
            let t = all[a].len();
            acc.push(
                (0..t)
                    .map(|ti| cosine(&all[a][ti], &all[b][ti]))
                    .sum::<f64>()
                    / t as f64,
            );
        }
    }
    Some(mean(&acc))
}

/// Median of the finite values (NaN when there are none).
fn median(v: &[f64]) -> f64 {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    crate::bench::median(&finite)
}

/// `n` positions spread evenly over `[lo, hi]`, rounded and deduplicated.
pub fn timepoints(lo: usize, hi: usize, n: usize) -> Vec<usize> {
    let lo = lo.min(hi);
    let mut v: Vec<usize> = (0..n.max(1))
        .map(|i| {
            if n <= 1 {
                lo
            } else {
                (lo as f64 + (hi - lo) as f64 * i as f64 / (n - 1) as f64).round() as usize
            }
        })
        .collect();
    v.dedup();
    v
}

/// Runs experiment 6 on `ids` [B,T] (whole windows of text, no padding).
pub(super) fn timescales(
    lm: &mut Lm,
    params: &ParamStore,
    ids: &[u32],
    b: usize,
    t: usize,
    cfg: &TimescaleConfig,
    base_opts: &AsaOptions,
    source: String,
) -> Result<Timescales> {
    if t < 2 {
        return Err(AsaError::Input(format!(
            "the timescale windows hold {t} token(s); at least 2 are needed"
        )));
    }
    let mcfg = lm.cfg.clone();
    let (h, k, c) = (mcfg.num_heads, mcfg.num_slots, mcfg.embed_dim);
    let opts = AsaOptions {
        return_info: true,
        attention_mask: None,
        ..base_opts.clone()
    };
    let mut cache = LmCache::default();
    let infos: Vec<Info> = lm
        .forward_hooked(params, ids, b, t, &opts, &LmHooks::default(), &mut cache)?
        .ok_or_else(|| AsaError::Other("the forward returned no infos".into()))?;
    let lags = cfg.max_lag.min(t - 1).max(1);
    let tp = timepoints(cfg.write_min_t, t - 1, cfg.write_timepoints);
    let mut inertia = Vec::with_capacity(infos.len());
    let mut write = Vec::with_capacity(infos.len());
    for l in 0..infos.len() {
        // read weights [B,H,T,K] -> per (b,h) sequences
        let rw = info_tensor(&infos, l, "read_weights")?;
        let seqs: Vec<Vec<Vec<f64>>> = (0..b * h)
            .map(|bh| {
                (0..t)
                    .map(|ti| {
                        rw[(bh * t + ti) * k..][..k]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let curves = inertia_curves(&seqs, lags);
        let n = curves.len() as f64;
        let curve: Vec<f64> = (0..lags)
            .map(|d| curves.iter().map(|c| c[d]).sum::<f64>() / n)
            .collect();
        let sem: Vec<f64> = (0..lags)
            .map(|d| {
                if curves.len() < 2 {
                    return 0.0;
                }
                let var = curves
                    .iter()
                    .map(|c| (c[d] - curve[d]).powi(2))
                    .sum::<f64>()
                    / (n - 1.0);
                var.sqrt() / n.sqrt()
            })
            .collect();
        // chance: different sequences of the same head, averaged over heads
        let per_head: Vec<f64> = (0..h)
            .filter_map(|hi| chance((0..b).map(|bi| &seqs[bi * h + hi])))
            .collect();
        let chance_r = (!per_head.is_empty()).then(|| mean(&per_head));
        let x = cache.block_input(l);
        let xs: Vec<Vec<Vec<f64>>> = (0..b)
            .map(|bi| {
                (0..t)
                    .map(|ti| {
                        x[(bi * t + ti) * c..][..c]
                            .iter()
                            .map(|&v| v as f64)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let rcurves = inertia_curves(&xs, lags);
        let residual_curve: Vec<f64> = (0..lags)
            .map(|d| rcurves.iter().map(|c| c[d]).sum::<f64>() / b as f64)
            .collect();
        inertia.push(InertiaLayer {
            layer: l,
            half_life_090: half_life(&curve, 0.9),
            half_life_080: half_life(&curve, 0.8),
            curve,
            sem,
            chance: chance_r,
            residual_half_life_090: half_life(&residual_curve, 0.9),
            residual_half_life_080: half_life(&residual_curve, 0.8),
            residual_curve,
            residual_chance: chance(xs.iter()),
        });

        // write timescales from write_logits [B,H,K,T]
        let wl = info_tensor(&infos, l, "write_logits")?;
        let mut hs = vec![vec![0.0f64; k]; h];
        let mut es = vec![vec![0.0f64; k]; h];
        let mut all_h = Vec::with_capacity(b * h * k * tp.len());
        let mut all_e = Vec::with_capacity(b * h * k * tp.len());
        for bi in 0..b {
            for hi in 0..h {
                for s in 0..k {
                    let row: Vec<f64> = wl[((bi * h + hi) * k + s) * t..][..t]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    for &ti in &tp {
                        let (hl, ess) = tail_half_life_and_ess(&row[..=ti], cfg.write_threshold);
                        hs[hi][s] += hl as f64;
                        es[hi][s] += ess;
                        all_h.push(hl as f64);
                        all_e.push(ess);
                    }
                }
            }
        }
        let per = (b * tp.len()) as f64;
        hs.iter_mut().flatten().for_each(|v| *v /= per);
        es.iter_mut().flatten().for_each(|v| *v /= per);
        write.push(WriteLayer {
            layer: l,
            mean_half_life: mean(&all_h),
            median_half_life: median(&all_h),
            mean_ess: mean(&all_e),
            median_ess: median(&all_e),
            head_half_life: hs.iter().map(|r| mean(r)).collect(),
            head_ess: es.iter().map(|r| mean(r)).collect(),
            head_slot_half_life: hs,
            head_slot_ess: es,
        });
    }
    Ok(Timescales {
        source,
        config: cfg.clone(),
        seq_len: t,
        lags,
        write_t_points: tp,
        inertia,
        write,
    })
}

/// `b` windows of `t` tokens from `text`: slices starting at `b` evenly spaced line starts,
/// each tokenized alone. Errors when the text cannot give `b` windows of `t` tokens.
pub(super) fn windows_from_text(
    text: &str,
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    b: usize,
    t: usize,
) -> Result<Vec<u32>> {
    let starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .filter(|&i| i < text.len())
        .collect();
    if starts.is_empty() {
        return Err(AsaError::Input("the timescale text is empty".into()));
    }
    let mut out = Vec::with_capacity(b * t);
    for i in 0..b {
        let s0 = starts[starts.len() * i / b];
        let mut chars = 16 * t;
        loop {
            let mut end = (s0 + chars).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            // end the slice at a whitespace, so that no word is cut
            if end < text.len() {
                if let Some(ws) = text[s0..end].rfind(char::is_whitespace) {
                    end = s0 + ws;
                }
            }
            let ids = encode(&text[s0..end])?;
            if ids.len() >= t {
                out.extend_from_slice(&ids[..t]);
                break;
            }
            if s0 + chars >= text.len() {
                return Err(AsaError::Input(format!(
                    "the timescale text is too short for {b} windows of {t} tokens (window {} has {} tokens); give a longer text or a smaller --timescale-len",
                    i + 1,
                    ids.len()
                )));
            }
            chars *= 2;
        }
    }
    Ok(out)
}
