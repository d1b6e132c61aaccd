//! Read-logit geometry: the routing trajectory bundle and its energy basin (canonical experiment
//! 1), the Paris basin on a simplex sphere (experiment 2) and the layer sweep of where the
//! Paris attractor emerges (experiment 3).
//!
//! All three work on the head-mean read logits `z_t = mean_h read_logits[b,h,t,:]` [K] of a
//! layer, each row centred over its K slots (softmax ignores a shift shared by all slots; the
//! reference does not centre, see docs/ASSUMPTIONS.md), and on Paris margins at each prompt's last
//! real token.
//!
//! # Experiment 1: trajectory bundle + energy basin
//! Reference: `building_blocks/ASAResearch.ipynb`, cell "ASA / ASM: Trajectory Bundle + Energy
//! Basin (B + D combined)". A 2-component PCA of the basin prompts' read-logit rows (real
//! positions, position 0 excluded) gives each prompt a trajectory in the plane. On a grid over
//! the trajectories' 1%-99% quantile box (padded by `pad` of its size), each point `xy` maps back
//! to logits `z = mean + W xy`, to the distribution `r = softmax(z / read_temperature)`, which is
//! forced on every head at each prompt's last real position in the intervened layers; the
//! energy is the prompts' mean `-log P(" Paris")` there.
//!
//! # Experiment 2: Paris basin on a simplex sphere
//! Reference: cell "COMPLETE REPLACEMENT: Paris Basin on a Simplex Sphere (A++)". A 3-component
//! PCA of the research prompts' rows (position 0 excluded); each point's 3-vector is normalised
//! onto the unit sphere. Endpoints (last real positions) carry the prompt's margin against
//! `" the"` and are clustered (k-means, k = 3). `basin_alignment` is the correlation, over
//! prompts, between an endpoint's cosine to the margin-weighted mean endpoint direction
//! (weights `sigmoid(margin)`) and its margin: positive when high-margin prompts end together.
//!
//! # Experiment 3: attractor emergence across depth
//! Reference: cell "Layer Sweep: Where does the Paris-attractor geometry emerge?". Per layer, on
//! the research prompts' late windows: the mean entropy of `softmax(z)` (the reference's
//! measure), the mean entropy of the heads' own read weights, the explained variance of a
//! 3-component PCA, and the attractor sharpness `corr(-|e_b - c|, margin_b)` with `e_b` the
//! endpoints in the 2-PC plane and `c` their `sigmoid(margin)`-weighted centroid.

use serde::{Deserialize, Serialize};

use super::{info_tensor, late_window, mean, pca, Batch, PcaSummary, ProbePrompt};
use crate::error::{AsaError, Result};
use crate::model::layer::{AsaOptions, Info, RoutingMode};
use crate::model::lm::{Lm, LmCache, LmHooks};
use crate::model::params::ParamStore;

/// The five prompts of the reference's trajectory-bundle cell.
pub const BASIN_PROMPTS: [ProbePrompt; 5] = [
    super::pp("capital", "The capital of France is"),
    super::pp(
        "capital",
        "In Europe, the city that serves as France's capital is",
    ),
    super::pp(
        "landmark",
        "France's capital city, known for the Eiffel Tower, is",
    ),
    super::pp(
        "geography",
        "A major European capital located on the Seine is",
    ),
    super::pp("capital", "The French capital is"),
];

/// Experiment 1: trajectories of the basin prompts in the read-logit PCA plane of `pca_layer`,
/// over the energy landscape of forced routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrajectoryBasin {
    pub pca_layer: usize,
    /// layers whose routing is forced at each prompt's last real position
    pub intervene_layers: Vec<usize>,
    pub prompts: Vec<String>,
    pub pca: PcaSummary,
    /// per prompt: (PC1, PC2) at positions 1..=last
    pub trajectories: Vec<Vec<[f64; 2]>>,
    pub grid_x: Vec<f64>,
    pub grid_y: Vec<f64>,
    /// `energy[iy][ix]`: mean `-log P(target)` with routing forced at `(grid_x[ix], grid_y[iy])`
    pub energy: Vec<Vec<f64>>,
    /// mean `-log P(target)` of the unperturbed model
    pub baseline_energy: f64,
    /// mean `-log P(target)` with each prompt's routing forced at its own endpoint
    pub endpoint_energy: f64,
    pub grid_energy_mean: f64,
    pub grid_energy_min: f64,
    /// where the grid's energy is lowest
    pub grid_min_at: [f64; 2],
    /// share of grid points whose energy is above `endpoint_energy` (1: the endpoints sit at the
    /// bottom of the basin)
    pub endpoint_depth: f64,
}

/// One prompt on the simplex sphere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SphereEndpoint {
    pub route: String,
    pub text: String,
    /// margin against the research rival
    pub margin: f64,
    /// endpoint on the unit sphere (PC1..3 normalised)
    pub sphere: [f64; 3],
    /// endpoint in the PC1/PC2 plane (not normalised)
    pub plane: [f64; 2],
    pub cluster: usize,
}

/// A k-means cluster of endpoints on the sphere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SphereCluster {
    pub center: [f64; 3],
    pub members: Vec<usize>,
    pub mean_margin: f64,
}

/// Experiment 2: the research prompts' read-logit trajectories on the PCA sphere of `layer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimplexSphere {
    pub layer: usize,
    pub pca: PcaSummary,
    pub endpoints: Vec<SphereEndpoint>,
    /// per prompt: points on the sphere at positions 1..=last
    pub trajectories: Vec<Vec<[f64; 3]>>,
    pub clusters: Vec<SphereCluster>,
    /// corr(cos(endpoint, margin-weighted mean direction), margin); None without spread
    pub basin_alignment: Option<f64>,
}

/// Experiment 3: one layer of the depth sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthRow {
    pub layer: usize,
    /// mean entropy (nats) of softmax(head-mean read logits) over late-window points (the
    /// reference's measure)
    pub entropy_late: f64,
    /// mean entropy of each head's own read weights over late-window points
    pub read_entropy_late: f64,
    /// explained variance ratio of PC1..3 of the late-window rows
    pub evr: Vec<f64>,
    /// corr(-distance to the margin-weighted endpoint centroid, margin) in the PC1/PC2 plane
    pub attractor_sharpness: Option<f64>,
}

/// Experiment 3: the sweep over all layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthSweep {
    pub rows: Vec<DepthRow>,
    pub margin_mean: f64,
    pub margin_median: f64,
    pub margin_min: f64,
    pub margin_max: f64,
    pub best_sharpness_layer: Option<usize>,
    pub best_evr_layer: Option<usize>,
    pub lowest_entropy_layer: Option<usize>,
    /// ln K: the entropy of uniform routing
    pub max_entropy: f64,
}

/// Head-mean read-logit rows of layer `l` [B*T, K], each centred over K.
pub(super) fn head_mean_rows(
    infos: &[Info],
    l: usize,
    b: usize,
    t: usize,
    h: usize,
    k: usize,
) -> Result<Vec<f64>> {
    let rl = info_tensor(infos, l, "read_logits")?; // [B,H,T,K]
    let mut z = vec![0.0f64; b * t * k];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let row = &rl[((bi * h + hi) * t + ti) * k..][..k];
                let dst = &mut z[(bi * t + ti) * k..][..k];
                for s in 0..k {
                    dst[s] += row[s] as f64 / h as f64;
                }
            }
        }
    }
    for row in z.chunks_mut(k) {
        let m = row.iter().sum::<f64>() / k as f64;
        if m.is_finite() {
            row.iter_mut().for_each(|x| *x -= m);
        }
    }
    Ok(z)
}

/// Gathers rows at `points` (b, t) from `z` [B*T, K].
fn gather(z: &[f64], points: &[(usize, usize)], t: usize, k: usize) -> Vec<f64> {
    points
        .iter()
        .flat_map(|&(bi, ti)| z[(bi * t + ti) * k..][..k].iter().copied())
        .collect()
}

/// `(row - mean) . comps[j]` for each kept component.
fn project(row: &[f64], mu: &[f64], comps: &[Vec<f64>]) -> Vec<f64> {
    comps
        .iter()
        .map(|c| {
            row.iter()
                .zip(mu)
                .zip(c)
                .map(|((x, m), w)| (x - m) * w)
                .sum()
        })
        .collect()
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|a| (a - mx).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn entropy(p: &[f64]) -> f64 {
    -p.iter().map(|&x| x * x.max(1e-9).ln()).sum::<f64>()
}

/// Pearson correlation; None when either side has (almost) no spread.
pub(super) fn corr(x: &[f64], y: &[f64]) -> Option<f64> {
    let (mx, my) = (mean(x), mean(y));
    let sx = x.iter().map(|a| (a - mx) * (a - mx)).sum::<f64>();
    let sy = y.iter().map(|a| (a - my) * (a - my)).sum::<f64>();
    let n = x.len() as f64;
    if x.len() < 2 || (sx / n).sqrt() < 1e-9 || (sy / n).sqrt() < 1e-9 {
        return None;
    }
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    Some(sxy / (sx * sy).sqrt())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Linear-interpolated quantile of `v` (numpy's default).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// Mean `-log P(target)` at each prompt's last real position (log-softmax over the vocabulary).
fn energy_of(cache: &LmCache, batch: &Batch, v: usize, target: u32) -> f64 {
    mean(&energies(cache, batch, v, target))
}

/// `-log P(target)` at each prompt's last real position.
fn energies(cache: &LmCache, batch: &Batch, v: usize, target: u32) -> Vec<f64> {
    (0..batch.b)
        .map(|bi| {
            let row = &cache.logits[(bi * batch.t + batch.last[bi]) * v..][..v];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            lse - row[target as usize] as f64
        })
        .collect()
}

/// Baseline read weights of `layer` with `forced[b]` [K] put on every head at each prompt's last
/// real position: the override of experiment 1.
fn forced_at_last(
    base: &[f32],
    batch: &Batch,
    h: usize,
    k: usize,
    forced: &[Vec<f64>],
) -> Vec<f32> {
    let mut w = base.to_vec();
    for bi in 0..batch.b {
        for hi in 0..h {
            let o = ((bi * h + hi) * batch.t + batch.last[bi]) * k;
            for s in 0..k {
                w[o + s] = forced[bi][s] as f32;
            }
        }
    }
    w
}

/// What experiment 1 needs besides the model.
pub(super) struct BasinInputs<'a> {
    pub batch: &'a Batch,
    pub base_opts: &'a AsaOptions,
    pub pca_layer: usize,
    pub intervene: Vec<usize>,
    pub grid: usize,
    pub pad: f64,
    pub target: u32,
}

/// Experiment 1 (see the module doc).
pub(super) fn trajectory_basin(
    lm: &mut Lm,
    params: &ParamStore,
    inp: &BasinInputs,
    prompts: &[ProbePrompt],
    cache: &mut LmCache,
) -> Result<TrajectoryBasin> {
    let cfg = lm.cfg.clone();
    let (h, k, nl, v) = (cfg.num_heads, cfg.num_slots, cfg.num_layers, cfg.vocab_size);
    let batch = inp.batch;
    let (b, t) = (batch.b, batch.t);
    let rtemp = cfg.read_temperature.max(1e-6);
    let opts = AsaOptions {
        return_info: true,
        ..inp.base_opts.clone()
    };
    let infos = lm
        .forward_hooked(params, &batch.ids, b, t, &opts, &LmHooks::default(), cache)?
        .ok_or_else(|| AsaError::Other("the forward returned no infos".into()))?;
    let baseline_energy = energy_of(cache, batch, v, inp.target);
    let z = head_mean_rows(&infos, inp.pca_layer, b, t, h, k)?;
    let points: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (1..=batch.last[bi]).map(move |ti| (bi, ti)))
        .collect();
    let fit = pca(&gather(&z, &points, t, k), points.len(), k, 2)?;
    if fit.comps.len() < 2 {
        return Err(AsaError::Input(format!(
            "layer {}'s read logits span fewer than 2 directions over the basin prompts: no plane to draw",
            inp.pca_layer
        )));
    }
    let trajectories: Vec<Vec<[f64; 2]>> = (0..b)
        .map(|bi| {
            (1..=batch.last[bi])
                .map(|ti| {
                    let p = project(&z[(bi * t + ti) * k..][..k], &fit.mean, &fit.comps);
                    [p[0], p[1]]
                })
                .collect()
        })
        .collect();
    let xs: Vec<f64> = trajectories.iter().flatten().map(|p| p[0]).collect();
    let ys: Vec<f64> = trajectories.iter().flatten().map(|p| p[1]).collect();
    let axis = |v: &[f64]| -> Vec<f64> {
        let (lo, hi) = (quantile(v, 0.01), quantile(v, 0.99));
        let d = (hi - lo).max(1e-6) * inp.pad;
        let n = inp.grid.max(2);
        (0..n)
            .map(|i| lo - d + (hi - lo + 2.0 * d) * i as f64 / (n - 1) as f64)
            .collect()
    };
    let (grid_x, grid_y) = (axis(&xs), axis(&ys));
    // the logits of a plane point: mean + W xy
    let unproject = |x: f64, y: f64| -> Vec<f64> {
        (0..k)
            .map(|s| (fit.mean[s] + fit.comps[0][s] * x + fit.comps[1][s] * y) / rtemp)
            .collect()
    };
    let base_w: Vec<Vec<f32>> = inp
        .intervene
        .iter()
        .map(|&l| info_tensor(&infos, l, "read_weights").map(<[f32]>::to_vec))
        .collect::<Result<_>>()?;
    // one forward per group of forcings: the batch tiled once per group, each copy with its
    // own forced distributions [b][K]; the mean energy of each group
    let mut forward_forced = |groups: &[Vec<Vec<f64>>], cache: &mut LmCache| -> Result<Vec<f64>> {
        let g = groups.len();
        let tb = batch.tile(g);
        let forced: Vec<Vec<f64>> = groups.iter().flatten().cloned().collect();
        let mut hooks = LmHooks::new(nl);
        for (i, &l) in inp.intervene.iter().enumerate() {
            let base = base_w[i].repeat(g);
            hooks.layer_routing[l] = Some(RoutingMode::Override(forced_at_last(
                &base, &tb, h, k, &forced,
            )));
        }
        let opts = AsaOptions {
            attention_mask: Some(tb.mask.clone()),
            ..inp.base_opts.clone()
        };
        lm.forward_hooked(params, &tb.ids, tb.b, t, &opts, &hooks, cache)?;
        let e = energies(cache, &tb, v, inp.target);
        Ok(e.chunks(b).map(mean).collect())
    };
    // up to 8 grid points per forward (the logits of 8 copies of the batch stay small)
    let mut energy = Vec::with_capacity(grid_y.len());
    for &gy in &grid_y {
        let mut row = Vec::with_capacity(grid_x.len());
        for xs in grid_x.chunks(8) {
            let groups: Vec<Vec<Vec<f64>>> = xs
                .iter()
                .map(|&gx| vec![softmax(&unproject(gx, gy)); b])
                .collect();
            row.extend(forward_forced(&groups, cache)?);
        }
        energy.push(row);
    }
    let own: Vec<Vec<f64>> = trajectories
        .iter()
        .map(|tr| {
            let e = tr.last().copied().unwrap_or([0.0, 0.0]);
            softmax(&unproject(e[0], e[1]))
        })
        .collect();
    let endpoint_energy = forward_forced(&[own], cache)?[0];
    let flat: Vec<f64> = energy.iter().flatten().copied().collect();
    let (mut gmin, mut at) = (f64::INFINITY, [0.0, 0.0]);
    for (iy, row) in energy.iter().enumerate() {
        for (ix, &e) in row.iter().enumerate() {
            if e < gmin {
                gmin = e;
                at = [grid_x[ix], grid_y[iy]];
            }
        }
    }
    let above = flat.iter().filter(|&&e| e > endpoint_energy).count();
    Ok(TrajectoryBasin {
        pca_layer: inp.pca_layer,
        intervene_layers: inp.intervene.clone(),
        prompts: prompts.iter().map(|p| p.text.to_string()).collect(),
        pca: fit.summary,
        trajectories,
        grid_x,
        grid_y,
        baseline_energy,
        endpoint_energy,
        grid_energy_mean: mean(&flat),
        grid_energy_min: gmin,
        grid_min_at: at,
        endpoint_depth: above as f64 / flat.len().max(1) as f64,
        energy,
    })
}

/// Deterministic k-means on unit 3-vectors: the first centre is the highest-margin point, each
/// next one the point farthest from the centres so far; then Lloyd iterations to a fixed point.
fn kmeans(pts: &[[f64; 3]], margins: &[f64], k: usize) -> (Vec<usize>, Vec<[f64; 3]>) {
    let d2 = |a: &[f64; 3], b: &[f64; 3]| (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f64>();
    let first = (0..pts.len())
        .max_by(|&a, &b| margins[a].total_cmp(&margins[b]).then(b.cmp(&a)))
        .unwrap_or(0);
    let mut centers = vec![pts[first]];
    while centers.len() < k {
        let far = (0..pts.len())
            .max_by(|&a, &b| {
                let da = centers
                    .iter()
                    .map(|c| d2(&pts[a], c))
                    .fold(f64::INFINITY, f64::min);
                let db = centers
                    .iter()
                    .map(|c| d2(&pts[b], c))
                    .fold(f64::INFINITY, f64::min);
                da.total_cmp(&db).then(b.cmp(&a))
            })
            .unwrap_or(0);
        centers.push(pts[far]);
    }
    let mut assign = vec![usize::MAX; pts.len()];
    for _ in 0..100 {
        let next: Vec<usize> = pts
            .iter()
            .map(|p| {
                (0..centers.len())
                    .min_by(|&a, &b| {
                        d2(p, &centers[a])
                            .total_cmp(&d2(p, &centers[b]))
                            .then(a.cmp(&b))
                    })
                    .unwrap_or(0)
            })
            .collect();
        if next == assign {
            break;
        }
        assign = next;
        for (c, center) in centers.iter_mut().enumerate() {
            let members: Vec<&[f64; 3]> = pts
                .iter()
                .zip(&assign)
                .filter(|(_, &a)| a == c)
                .map(|(p, _)| p)
                .collect();
            if !members.is_empty() {
                for i in 0..3 {
                    center[i] = members.iter().map(|p| p[i]).sum::<f64>() / members.len() as f64;
                }
            }
        }
    }
    (assign, centers)
}

fn unit3(p: &[f64]) -> [f64; 3] {
    let n = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt().max(1e-9);
    [p[0] / n, p[1] / n, p[2] / n]
}

/// Experiment 2 (see the module doc), from the research batch's baseline infos and margins.
pub(super) fn simplex_sphere(
    infos: &[Info],
    batch: &Batch,
    prompts: &[ProbePrompt],
    margins: &[f64],
    layer: usize,
    h: usize,
    k: usize,
) -> Result<SimplexSphere> {
    let (b, t) = (batch.b, batch.t);
    let z = head_mean_rows(infos, layer, b, t, h, k)?;
    let points: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (1..=batch.last[bi]).map(move |ti| (bi, ti)))
        .filter(|&(bi, ti)| z[(bi * t + ti) * k..][..k].iter().all(|x| x.is_finite()))
        .collect();
    let fit = pca(&gather(&z, &points, t, k), points.len(), k, 3)?;
    if fit.comps.len() < 3 {
        return Err(AsaError::Input(format!(
            "layer {layer}'s read logits span fewer than 3 directions over the research prompts: no sphere to draw (K = {k})"
        )));
    }
    let proj = |bi: usize, ti: usize| project(&z[(bi * t + ti) * k..][..k], &fit.mean, &fit.comps);
    let trajectories: Vec<Vec<[f64; 3]>> = (0..b)
        .map(|bi| {
            (1..=batch.last[bi])
                .map(|ti| unit3(&proj(bi, ti)))
                .collect()
        })
        .collect();
    let ends: Vec<[f64; 3]> = (0..b).map(|bi| unit3(&proj(bi, batch.last[bi]))).collect();
    let nclust = 3.min(b);
    let (assign, centers) = kmeans(&ends, margins, nclust);
    // margin-weighted mean endpoint direction
    let wsum: f64 = margins.iter().map(|&m| sigmoid(m)).sum();
    let mut c = [0.0; 3];
    for (e, &m) in ends.iter().zip(margins) {
        for i in 0..3 {
            c[i] += e[i] * sigmoid(m) / wsum;
        }
    }
    let c = unit3(&c);
    let cos: Vec<f64> = ends
        .iter()
        .map(|e| (0..3).map(|i| e[i] * c[i]).sum())
        .collect();
    let endpoints = (0..b)
        .map(|bi| {
            let p = proj(bi, batch.last[bi]);
            SphereEndpoint {
                route: prompts[bi].route.to_string(),
                text: prompts[bi].text.to_string(),
                margin: margins[bi],
                sphere: ends[bi],
                plane: [p[0], p[1]],
                cluster: assign[bi],
            }
        })
        .collect();
    let clusters = centers
        .iter()
        .enumerate()
        .map(|(ci, &center)| {
            let members: Vec<usize> = (0..b).filter(|&i| assign[i] == ci).collect();
            let mean_margin = mean(&members.iter().map(|&i| margins[i]).collect::<Vec<_>>());
            SphereCluster {
                center,
                members,
                mean_margin,
            }
        })
        .collect();
    Ok(SimplexSphere {
        layer,
        pca: fit.summary,
        endpoints,
        trajectories,
        clusters,
        basin_alignment: corr(&cos, margins),
    })
}

/// Experiment 3 (see the module doc), from the research batch's baseline infos and margins.
pub(super) fn depth_sweep(
    infos: &[Info],
    batch: &Batch,
    margins: &[f64],
    window: usize,
    h: usize,
    k: usize,
) -> Result<DepthSweep> {
    let (b, t) = (batch.b, batch.t);
    let points: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| {
            late_window(batch.last[bi], window)
                .into_iter()
                .map(move |ti| (bi, ti))
        })
        .collect();
    let mut rows = Vec::with_capacity(infos.len());
    for l in 0..infos.len() {
        let z = head_mean_rows(infos, l, b, t, h, k)?;
        let rw = info_tensor(infos, l, "read_weights")?; // [B,H,T,K]
        let mut ent = Vec::with_capacity(points.len());
        let mut rent = Vec::with_capacity(points.len() * h);
        for &(bi, ti) in &points {
            ent.push(entropy(&softmax(&z[(bi * t + ti) * k..][..k])));
            for hi in 0..h {
                let row: Vec<f64> = rw[((bi * h + hi) * t + ti) * k..][..k]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                rent.push(entropy(&row));
            }
        }
        let fit = pca(&gather(&z, &points, t, k), points.len(), k, 3)?;
        let sharp = if fit.comps.len() >= 2 {
            let ends: Vec<Vec<f64>> = (0..b)
                .map(|bi| {
                    project(
                        &z[(bi * t + batch.last[bi]) * k..][..k],
                        &fit.mean,
                        &fit.comps[..2],
                    )
                })
                .collect();
            let wsum: f64 = margins.iter().map(|&m| sigmoid(m)).sum::<f64>() + 1e-9;
            let mut c = [0.0; 2];
            for (e, &m) in ends.iter().zip(margins) {
                c[0] += e[0] * sigmoid(m) / wsum;
                c[1] += e[1] * sigmoid(m) / wsum;
            }
            let negd: Vec<f64> = ends
                .iter()
                .map(|e| -((e[0] - c[0]).powi(2) + (e[1] - c[1]).powi(2)).sqrt())
                .collect();
            corr(&negd, margins)
        } else {
            None
        };
        rows.push(DepthRow {
            layer: l,
            entropy_late: mean(&ent),
            read_entropy_late: mean(&rent),
            evr: fit.summary.explained_variance_ratio.clone(),
            attractor_sharpness: sharp,
        });
    }
    let pick = |f: &dyn Fn(&DepthRow) -> Option<f64>, max: bool| {
        rows.iter()
            .filter_map(|r| f(r).filter(|x| x.is_finite()).map(|x| (x, r.layer)))
            .max_by(|a, b| {
                if max {
                    a.0.total_cmp(&b.0)
                } else {
                    b.0.total_cmp(&a.0)
                }
            })
            .map(|(_, l)| l)
    };
    let mut sorted = margins.to_vec();
    sorted.sort_by(f64::total_cmp);
    Ok(DepthSweep {
        best_sharpness_layer: pick(&|r| r.attractor_sharpness, true),
        best_evr_layer: pick(&|r| r.evr.first().copied(), true),
        lowest_entropy_layer: pick(&|r| Some(r.entropy_late), false),
        rows,
        margin_mean: mean(margins),
        margin_median: quantile(&sorted, 0.5),
        margin_min: sorted.first().copied().unwrap_or(f64::NAN),
        margin_max: sorted.last().copied().unwrap_or(f64::NAN),
        max_entropy: (k as f64).ln(),
    })
}
