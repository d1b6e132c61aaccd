//! The probe's outputs: `summary.json` and one PNG per measure (see [`write_outputs`]).

use std::path::Path;
use std::sync::OnceLock;

use super::{
    DepthSweep, LayerProbe, ProbeSummary, SimplexSphere, Sweep, Timescales, TrajectoryBasin,
};
use crate::error::{AsaError, Result};

/// The embedded plot font (no system font or fontconfig needed).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

pub(crate) fn ensure_font() -> Result<()> {
    static REG: OnceLock<bool> = OnceLock::new();
    let ok = *REG.get_or_init(|| {
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(AsaError::Other(
            "the embedded plot font failed to load".into(),
        ))
    }
}

const C_ROUTING: plotters::style::RGBColor = plotters::style::RGBColor(31, 119, 180);
const C_RESIDUAL: plotters::style::RGBColor = plotters::style::RGBColor(255, 127, 14);
const C_FROZEN: plotters::style::RGBColor = plotters::style::RGBColor(44, 160, 44);
const PC_COLORS: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(140, 86, 75),
];

fn plot_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> AsaError + '_ {
    move |e| AsaError::Other(format!("plotting {}: {e}", path.display()))
}

/// y range covering `vals` (finite ones) and 0, with a margin.
fn y_range(vals: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    for x in vals.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let pad = ((hi - lo) * 0.1).max(1e-6);
    (lo - pad)..(hi + pad)
}

fn x_range(vals: &[f64]) -> std::ops::Range<f64> {
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return -1.0..1.0;
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad)..(hi + pad)
}

fn plot_margins(s: &ProbeSummary, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let root = BitMapBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let panels = root.split_evenly((2, 1));
    for (area, set) in panels.iter().zip([&s.research, &s.canonical]) {
        let n = set.prompts.len();
        let yr = y_range(set.prompts.iter().map(|p| p.margin));
        let mut ch = ChartBuilder::on(area)
            .caption(
                format!(
                    "Paris margin, {} set: logit({:?}) - logit({:?}), mean {:.4}",
                    set.name, s.target.text, set.rival.text, set.mean_margin
                ),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), yr)
            .map_err(&err)?;
        ch.configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|x| format!("{:.0}", x))
            .x_desc("prompt index (texts in summary.json)")
            .y_desc("margin")
            .draw()
            .map_err(&err)?;
        ch.draw_series(set.prompts.iter().enumerate().map(|(i, p)| {
            let col = if p.margin >= 0.0 {
                C_ROUTING
            } else {
                C_RESIDUAL
            };
            Rectangle::new(
                [(i as f64 - 0.35, 0.0), (i as f64 + 0.35, p.margin)],
                col.filled(),
            )
        }))
        .map_err(&err)?;
        ch.draw_series(LineSeries::new(
            [(-0.5, set.mean_margin), (n as f64 - 0.5, set.mean_margin)],
            BLACK.stroke_width(1),
        ))
        .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

fn plot_sweeps(s: &ProbeSummary, lp: &LayerProbe, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let eps = &s.probe_config.eps_grid;
    let npc = lp.routing.len().max(lp.residual.len()).max(1);
    let root = BitMapBackend::new(path, (420 * npc as u32, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let panels = root.split_evenly((1, npc));
    let base = lp.baseline_margin;
    for (j, area) in panels.iter().enumerate() {
        let kinds: [(&str, Option<&Sweep>, RGBColor); 3] = [
            ("routing", lp.routing.get(j), C_ROUTING),
            ("residual", lp.residual.get(j), C_RESIDUAL),
            (
                "residual, routing frozen",
                lp.residual_frozen.get(j),
                C_FROZEN,
            ),
        ];
        let yr = y_range(
            kinds
                .iter()
                .filter_map(|k| k.1)
                .flat_map(|sw| sw.margins.iter().map(move |m| m - base)),
        );
        let mut ch = ChartBuilder::on(area)
            .caption(
                format!("layer {} PC{}", lp.layer, j + 1),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range(eps), yr)
            .map_err(&err)?;
        ch.configure_mesh()
            .x_desc("eps (PC std units)")
            .y_desc("margin change")
            .draw()
            .map_err(&err)?;
        for (name, sw, col) in kinds {
            let Some(sw) = sw else { continue };
            let pts: Vec<(f64, f64)> = eps
                .iter()
                .zip(&sw.margins)
                .map(|(&e, &m)| (e, m - base))
                .collect();
            ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(&err)?
                .label(format!("{name} (slope {:+.2e})", sw.slope))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], col.stroke_width(2)));
            ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))
                .map_err(&err)?;
        }
        ch.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

fn plot_pca(s: &ProbeSummary, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let root = BitMapBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let panels = root.split_evenly((1, 2));
    let xs: Vec<f64> = s.layers.iter().map(|l| l.layer as f64).collect();
    let xr = {
        let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (lo - 0.5)..(hi + 0.5)
    };
    let npc = s.probe_config.num_pcs;
    for (pi, area) in panels.iter().enumerate() {
        let name = if pi == 0 {
            "routing (head-mean read logits)"
        } else {
            "residual (block input)"
        };
        let get = |l: &LayerProbe| -> Vec<f64> {
            if pi == 0 {
                l.routing_pca.explained_variance_ratio.clone()
            } else {
                l.residual_pca.explained_variance_ratio.clone()
            }
        };
        let mut ch = ChartBuilder::on(area)
            .caption(format!("explained variance: {name}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(xr.clone(), 0.0f64..1.0)
            .map_err(&err)?;
        ch.configure_mesh()
            .x_labels(xs.len().clamp(1, 24))
            .x_label_formatter(&|x| format!("{:.0}", x))
            .x_desc("layer")
            .y_desc("fraction of variance")
            .draw()
            .map_err(&err)?;
        for j in 0..npc {
            let col = PC_COLORS[j % PC_COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .layers
                .iter()
                .filter_map(|l| get(l).get(j).map(|&v| (l.layer as f64, v)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(&err)?
                .label(format!("PC{}", j + 1))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], col.stroke_width(2)));
            ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))
                .map_err(&err)?;
        }
        ch.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// Viridis, interpolated between five anchors; `x` in [0, 1].
fn viridis(x: f64) -> plotters::style::RGBColor {
    const A: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        0.0
    } * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    plotters::style::RGBColor(
        mix(A[i].0, A[i + 1].0),
        mix(A[i].1, A[i + 1].1),
        mix(A[i].2, A[i + 1].2),
    )
}

/// (min, max) of the finite values, widened when they coincide.
fn finite_span(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

/// A vertical colour bar for `(lo, hi)` in `area`.
fn color_bar<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    lo: f64,
    hi: f64,
    label: &str,
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let mut ch = ChartBuilder::on(area)
        .margin_top(40)
        .margin_bottom(40)
        .margin_right(10)
        .y_label_area_size(60)
        .caption(label, ("sans-serif", 13))
        .build_cartesian_2d(0.0f64..1.0, lo..hi)
        .map_err(|e| e.to_string())?;
    ch.configure_mesh()
        .disable_x_mesh()
        .disable_y_mesh()
        .x_labels(0)
        .y_label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    let n = 64;
    ch.draw_series((0..n).map(|i| {
        let a = lo + (hi - lo) * i as f64 / n as f64;
        let b = lo + (hi - lo) * (i + 1) as f64 / n as f64;
        Rectangle::new(
            [(0.0, a), (1.0, b)],
            viridis((i as f64 + 0.5) / n as f64).filled(),
        )
    }))
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Experiment 1: the energy basin as a heat map with the prompts' trajectories over it.
fn plot_basin(tb: &TrajectoryBasin, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let root = BitMapBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let (main, bar) = root.split_horizontally(880);
    let (lo, hi) = finite_span(tb.energy.iter().flatten().copied());
    let (gx, gy) = (&tb.grid_x, &tb.grid_y);
    let half = |v: &[f64]| {
        if v.len() > 1 {
            (v[1] - v[0]) / 2.0
        } else {
            0.5
        }
    };
    let (hx, hy) = (half(gx), half(gy));
    let xr = (gx[0] - hx)..(gx[gx.len() - 1] + hx);
    let yr = (gy[0] - hy)..(gy[gy.len() - 1] + hy);
    let mut ch = ChartBuilder::on(&main)
        .caption(
            format!(
                "Energy basin (forced routing, layers {:?}) + trajectories (PCA layer {})",
                tb.intervene_layers, tb.pca_layer
            ),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xr.clone(), yr.clone())
        .map_err(&err)?;
    ch.configure_mesh()
        .disable_mesh()
        .x_desc("PC1 of head-mean read logits")
        .y_desc("PC2")
        .draw()
        .map_err(&err)?;
    ch.draw_series(tb.energy.iter().enumerate().flat_map(|(iy, row)| {
        row.iter().enumerate().map(move |(ix, &e)| {
            Rectangle::new(
                [(gx[ix] - hx, gy[iy] - hy), (gx[ix] + hx, gy[iy] + hy)],
                viridis((e - lo) / (hi - lo)).filled(),
            )
        })
    }))
    .map_err(&err)?;
    for (i, tr) in tb.trajectories.iter().enumerate() {
        let col = PC_COLORS[i % PC_COLORS.len()];
        let pts: Vec<(f64, f64)> = tr
            .iter()
            .map(|p| (p[0].clamp(xr.start, xr.end), p[1].clamp(yr.start, yr.end)))
            .collect();
        ch.draw_series(LineSeries::new(pts.clone(), WHITE.stroke_width(4)))
            .map_err(&err)?;
        ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
            .map_err(&err)?
            .label(format!("{i}: {}", tb.prompts[i]))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], col.stroke_width(2)));
        if let Some(&end) = pts.last() {
            ch.draw_series([
                Circle::new(end, 6, col.filled()),
                Circle::new(end, 6, BLACK),
            ])
            .map_err(&err)?;
        }
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 11))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    color_bar(&bar, lo, hi, "-log P(target)").map_err(|e| plot_err(path)(e))?;
    root.present().map_err(&err)?;
    Ok(())
}

/// The points of `tr` (on the unit sphere) joined by arcs: 8 normalised steps per segment.
fn arcs(tr: &[[f64; 3]]) -> Vec<[f64; 3]> {
    let mut out = Vec::with_capacity(tr.len() * 8);
    for w in tr.windows(2) {
        for i in 0..8 {
            let f = i as f64 / 8.0;
            let p: Vec<f64> = (0..3).map(|j| w[0][j] + (w[1][j] - w[0][j]) * f).collect();
            let n = p.iter().map(|x| x * x).sum::<f64>().sqrt();
            if n > 1e-6 {
                out.push([p[0] / n, p[1] / n, p[2] / n]);
            }
        }
    }
    out.extend(tr.last().copied());
    out
}

/// Experiment 2: trajectories on the PCA sphere, endpoints coloured by margin.
fn plot_sphere(sp: &SimplexSphere, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let root = BitMapBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let (main, bar) = root.split_horizontally(880);
    let evr = &sp.pca.explained_variance_ratio;
    let mut ch = ChartBuilder::on(&main)
        .caption(
            format!(
                "Paris basin on a simplex sphere: layer {}, read-logit PCA -> S2 (EVR {:.2} {:.2} {:.2}; x PC1, z PC2, up PC3)",
                sp.layer,
                evr.first().copied().unwrap_or(0.0),
                evr.get(1).copied().unwrap_or(0.0),
                evr.get(2).copied().unwrap_or(0.0)
            ),
            ("sans-serif", 15),
        )
        .margin(10)
        .build_cartesian_3d(-1.1f64..1.1, -1.1f64..1.1, -1.1f64..1.1)
        .map_err(&err)?;
    ch.with_projection(|mut pb| {
        pb.yaw = 0.6;
        pb.pitch = 0.35;
        pb.scale = 0.85;
        pb.into_matrix()
    });
    ch.configure_axes()
        .light_grid_style(BLACK.mix(0.05))
        .max_light_lines(2)
        .draw()
        .map_err(&err)?;
    // wire frame: meridians and parallels
    let grey = BLACK.mix(0.12);
    for m in 0..12 {
        let phi = std::f64::consts::PI * m as f64 / 6.0;
        ch.draw_series(LineSeries::new(
            (0..=36).map(|i| {
                let th = std::f64::consts::PI * i as f64 / 36.0;
                (th.sin() * phi.cos(), th.cos(), th.sin() * phi.sin())
            }),
            grey,
        ))
        .map_err(&err)?;
    }
    for p in 1..6 {
        let th = std::f64::consts::PI * p as f64 / 6.0;
        ch.draw_series(LineSeries::new(
            (0..=48).map(|i| {
                let phi = 2.0 * std::f64::consts::PI * i as f64 / 48.0;
                (th.sin() * phi.cos(), th.cos(), th.sin() * phi.sin())
            }),
            grey,
        ))
        .map_err(&err)?;
    }
    let (lo, hi) = finite_span(sp.endpoints.iter().map(|e| e.margin));
    for (i, tr) in sp.trajectories.iter().enumerate() {
        let col = viridis((sp.endpoints[i].margin - lo) / (hi - lo));
        // x = PC1, y = PC3 (up), z = PC2; consecutive points joined along the sphere
        ch.draw_series(LineSeries::new(
            arcs(tr).into_iter().map(|p| (p[0], p[2], p[1])),
            col.mix(0.8).stroke_width(2),
        ))
        .map_err(&err)?;
        if let Some(s) = tr.first() {
            ch.draw_series([Circle::new((s[0], s[2], s[1]), 3, BLACK.mix(0.5).filled())])
                .map_err(&err)?;
        }
        let e = sp.endpoints[i].sphere;
        ch.draw_series([
            Circle::new((e[0], e[2], e[1]), 7, col.filled()),
            Circle::new((e[0], e[2], e[1]), 7, BLACK.stroke_width(1)),
        ])
        .map_err(&err)?;
        ch.draw_series([Text::new(
            format!("{i}"),
            (e[0] * 1.06, e[2] * 1.06, e[1] * 1.06),
            ("sans-serif", 12),
        )])
        .map_err(&err)?;
    }
    for c in &sp.clusters {
        let u = c.center;
        ch.draw_series([Cross::new((u[0], u[2], u[1]), 8, RED.stroke_width(3))])
            .map_err(&err)?;
    }
    color_bar(&bar, lo, hi, "margin vs \" the\"").map_err(|e| plot_err(path)(e))?;
    root.present().map_err(&err)?;
    Ok(())
}

/// One panel of a per-layer figure: its title, y label and range, and its series (label,
/// one value per layer, colour; non-finite values are skipped).
struct LayerPanel {
    title: String,
    ydesc: &'static str,
    yr: std::ops::Range<f64>,
    series: Vec<(&'static str, Vec<f64>, plotters::style::RGBColor)>,
}

/// Panels side by side, each a line with points per series against the layer index.
fn plot_layer_panels(
    panels: &[LayerPanel],
    layers: usize,
    legend: plotters::chart::SeriesLabelPosition,
    path: &Path,
) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let root = BitMapBackend::new(path, (500 * panels.len() as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        let mut ch = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5f64..(layers as f64 - 0.5), panel.yr.clone())
            .map_err(&err)?;
        ch.configure_mesh()
            .x_labels(layers.clamp(1, 24))
            .x_label_formatter(&|x| format!("{:.0}", x))
            .x_desc("layer")
            .y_desc(panel.ydesc)
            .draw()
            .map_err(&err)?;
        for (name, ys, col) in &panel.series {
            let col = *col;
            let pts: Vec<(f64, f64)> = ys
                .iter()
                .enumerate()
                .filter(|(_, y)| y.is_finite())
                .map(|(x, &y)| (x as f64, y))
                .collect();
            ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(&err)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], col.stroke_width(2)));
            ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))
                .map_err(&err)?;
        }
        ch.configure_series_labels()
            .position(legend.clone())
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// Experiment 3: entropy, PC1 share and attractor sharpness against depth (rows are layers
/// 0..L in order).
fn plot_depth(ds: &DepthSweep, path: &Path) -> Result<()> {
    let col = |f: &dyn Fn(&super::DepthRow) -> f64| ds.rows.iter().map(f).collect::<Vec<f64>>();
    let panels = [
        LayerPanel {
            title: format!(
                "late-window routing entropy (uniform: {:.2})",
                ds.max_entropy
            ),
            ydesc: "entropy (nats)",
            yr: 0.0..(ds.max_entropy * 1.05).max(1e-3),
            series: vec![
                (
                    "softmax(head-mean logits)",
                    col(&|r| r.entropy_late),
                    C_ROUTING,
                ),
                (
                    "heads' read weights",
                    col(&|r| r.read_entropy_late),
                    C_RESIDUAL,
                ),
            ],
        },
        LayerPanel {
            title: "late-window PCA: explained variance of PC1".into(),
            ydesc: "EVR(PC1)",
            yr: 0.0..1.05,
            series: vec![(
                "PC1",
                col(&|r| r.evr.first().copied().unwrap_or(f64::NAN)),
                C_ROUTING,
            )],
        },
        LayerPanel {
            title: "attractor sharpness corr(-dist, margin)".into(),
            ydesc: "correlation",
            yr: -1.05..1.05,
            series: vec![(
                "sharpness",
                col(&|r| r.attractor_sharpness.unwrap_or(f64::NAN)),
                C_FROZEN,
            )],
        },
    ];
    use plotters::chart::SeriesLabelPosition;
    plot_layer_panels(&panels, ds.rows.len(), SeriesLabelPosition::LowerLeft, path)
}

/// Layers shown in the inertia plot: the reference's picks (0, 1, 2, last), deduplicated.
fn shown_layers(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [0usize, 1, 2, n.saturating_sub(1)]
        .into_iter()
        .filter(|&l| l < n)
        .collect();
    v.dedup();
    v.sort_unstable();
    v.dedup();
    v
}

/// Experiment 6: policy inertia curves (mean and standard error) with the residual stream's
/// curves dashed, and the half-life thresholds.
fn plot_inertia(ts: &Timescales, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let lags = ts.lags as f64;
    let lo = ts
        .inertia
        .iter()
        .flat_map(|l| l.curve.iter().chain(&l.residual_curve))
        .cloned()
        .filter(|x| x.is_finite())
        .fold(0.7f64, f64::min);
    let mut ch = ChartBuilder::on(&root)
        .caption(
            format!(
                "Policy inertia: cos(p_t, p_t+lag) of read weights (solid, +-SEM) vs residual stream (dashed), T = {}",
                ts.seq_len
            ),
            ("sans-serif", 14),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..(lags + 0.5), (lo - 0.02).max(-1.0)..1.01)
        .map_err(&err)?;
    ch.configure_mesh()
        .x_desc("lag (tokens)")
        .y_desc("mean cosine similarity")
        .draw()
        .map_err(&err)?;
    for q in [0.9, 0.8] {
        ch.draw_series(LineSeries::new(
            [(0.5, q), (lags + 0.5, q)],
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(&err)?;
    }
    for (ci, &l) in shown_layers(ts.inertia.len()).iter().enumerate() {
        let il = &ts.inertia[l];
        let col = PC_COLORS[ci % PC_COLORS.len()];
        let band: Vec<(f64, f64)> = il
            .curve
            .iter()
            .zip(&il.sem)
            .enumerate()
            .map(|(d, (m, s))| ((d + 1) as f64, m + s))
            .chain(
                il.curve
                    .iter()
                    .zip(&il.sem)
                    .enumerate()
                    .rev()
                    .map(|(d, (m, s))| ((d + 1) as f64, m - s)),
            )
            .collect();
        ch.draw_series([Polygon::new(band, col.mix(0.2).filled())])
            .map_err(&err)?;
        ch.draw_series(LineSeries::new(
            il.curve
                .iter()
                .enumerate()
                .map(|(d, &m)| ((d + 1) as f64, m)),
            col.stroke_width(2),
        ))
        .map_err(&err)?
        .label(format!(
            "layer {l}: half-life@0.9 {:.1}, residual {:.1}",
            il.half_life_090, il.residual_half_life_090
        ))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], col.stroke_width(2)));
        ch.draw_series(DashedLineSeries::new(
            il.residual_curve
                .iter()
                .enumerate()
                .map(|(d, &m)| ((d + 1) as f64, m)),
            6,
            4,
            col.stroke_width(1),
        ))
        .map_err(&err)?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// Experiment 6: routing half-life, write tail half-life and write ESS against depth.
fn plot_timescales_vs_layer(ts: &Timescales, path: &Path) -> Result<()> {
    let inert =
        |f: &dyn Fn(&super::InertiaLayer) -> f64| ts.inertia.iter().map(f).collect::<Vec<f64>>();
    let write =
        |f: &dyn Fn(&super::WriteLayer) -> f64| ts.write.iter().map(f).collect::<Vec<f64>>();
    let top = |series: &[(&str, Vec<f64>, plotters::style::RGBColor)]| {
        let (_, hi) = finite_span(series.iter().flat_map(|s| s.1.iter().copied()));
        0.0..hi * 1.1
    };
    let mut panels = [
        LayerPanel {
            title: "routing inertia half-life (threshold 0.9 / 0.8)".into(),
            ydesc: "lag (tokens)",
            yr: 0.0..1.0,
            series: vec![
                ("read weights 0.9", inert(&|l| l.half_life_090), C_ROUTING),
                (
                    "read weights 0.8",
                    inert(&|l| l.half_life_080),
                    PC_COLORS[4],
                ),
                (
                    "residual 0.9",
                    inert(&|l| l.residual_half_life_090),
                    C_RESIDUAL,
                ),
            ],
        },
        LayerPanel {
            title: "slot-write tail half-life".into(),
            ydesc: "tokens",
            yr: 0.0..1.0,
            series: vec![
                ("mean", write(&|l| l.mean_half_life), C_ROUTING),
                ("median", write(&|l| l.median_half_life), C_RESIDUAL),
            ],
        },
        LayerPanel {
            title: "slot-write ESS = 1 / sum p^2".into(),
            ydesc: "tokens",
            yr: 0.0..1.0,
            series: vec![
                ("mean", write(&|l| l.mean_ess), C_ROUTING),
                ("median", write(&|l| l.median_ess), C_RESIDUAL),
            ],
        },
    ];
    for p in panels.iter_mut() {
        p.yr = top(&p.series);
    }
    use plotters::chart::SeriesLabelPosition;
    plot_layer_panels(
        &panels,
        ts.inertia.len(),
        SeriesLabelPosition::LowerRight,
        path,
    )
}

/// A layers x heads heat map of `m[layer][head]`.
fn plot_layer_head_heatmap(m: &[Vec<f64>], title: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = plot_err(path);
    let nl = m.len();
    let nh = m.first().map_or(1, Vec::len).max(1);
    let root = BitMapBackend::new(path, (900, (140 + 26 * nl as u32).max(360))).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let (main, bar) = root.split_horizontally(780);
    let (lo, hi) = finite_span(m.iter().flatten().copied());
    let mut ch = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(nh as f64 - 0.5), (nl as f64 - 0.5)..-0.5f64)
        .map_err(&err)?;
    ch.configure_mesh()
        .disable_mesh()
        .x_labels(nh.clamp(1, 32))
        .y_labels(nl.clamp(1, 32))
        .x_label_formatter(&|x| format!("{:.0}", x))
        .y_label_formatter(&|y| format!("{:.0}", y))
        .x_desc("head")
        .y_desc("layer")
        .draw()
        .map_err(&err)?;
    ch.draw_series(m.iter().enumerate().flat_map(|(l, row)| {
        row.iter().enumerate().map(move |(hh, &v)| {
            Rectangle::new(
                [
                    (hh as f64 - 0.5, l as f64 - 0.5),
                    (hh as f64 + 0.5, l as f64 + 0.5),
                ],
                viridis((v - lo) / (hi - lo)).filled(),
            )
        })
    }))
    .map_err(&err)?;
    color_bar(&bar, lo, hi, "tokens").map_err(|e| plot_err(path)(e))?;
    root.present().map_err(&err)?;
    Ok(())
}

/// Writes `summary.json` and the plots of what was measured into `outdir` (created if missing):
/// `paris_margin.png`; experiments 4/5: `pca_explained_variance.png` and one
/// `sweep_layer_LL.png` per swept layer; 1: `trajectory_basin.png`; 2: `simplex_sphere.png`;
/// 3: `depth_sweep.png`; 6: `policy_inertia.png`, `timescales_vs_layer.png`,
/// `half_life_heatmap.png`, `ess_heatmap.png`. Text in the plots uses an embedded font.
pub fn write_outputs(summary: &ProbeSummary, outdir: &Path) -> Result<()> {
    crate::error::ensure_dir(outdir)?;
    let json = serde_json::to_string_pretty(summary)
        .map_err(|e| AsaError::Other(format!("serialising the probe summary: {e}")))?;
    let sp = outdir.join("summary.json");
    crate::checkpoint::write_bytes_atomic(&sp, (json + "\n").as_bytes())?;
    ensure_font()?;
    plot_margins(summary, &outdir.join("paris_margin.png"))?;
    if !summary.layers.is_empty() {
        plot_pca(summary, &outdir.join("pca_explained_variance.png"))?;
        for lp in &summary.layers {
            plot_sweeps(
                summary,
                lp,
                &outdir.join(format!("sweep_layer_{:02}.png", lp.layer)),
            )?;
        }
    }
    if let Some(tb) = &summary.trajectory_basin {
        plot_basin(tb, &outdir.join("trajectory_basin.png"))?;
    }
    if let Some(s) = &summary.simplex_sphere {
        plot_sphere(s, &outdir.join("simplex_sphere.png"))?;
    }
    if let Some(d) = &summary.depth_sweep {
        plot_depth(d, &outdir.join("depth_sweep.png"))?;
    }
    if let Some(ts) = &summary.timescales {
        plot_inertia(ts, &outdir.join("policy_inertia.png"))?;
        plot_timescales_vs_layer(ts, &outdir.join("timescales_vs_layer.png"))?;
        let hl: Vec<Vec<f64>> = ts.write.iter().map(|l| l.head_half_life.clone()).collect();
        plot_layer_head_heatmap(
            &hl,
            &format!(
                "slot-write tail half-life (mass >= {}), layer x head",
                ts.config.write_threshold
            ),
            &outdir.join("half_life_heatmap.png"),
        )?;
        let ess: Vec<Vec<f64>> = ts.write.iter().map(|l| l.head_ess.clone()).collect();
        plot_layer_head_heatmap(
            &ess,
            "slot-write effective sample size, layer x head",
            &outdir.join("ess_heatmap.png"),
        )?;
    }
    Ok(())
}
