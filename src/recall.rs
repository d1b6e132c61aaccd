//! `asa recall`: the synthetic fine-tune notebooks' fact-recall analysis of a checkpoint,
//! optionally against a base checkpoint (before and after a fine-tune).
//!
//! Reference: `notebooks/ASA_HF_Checkpoint_CanonProbes_and_MiniFinetune.ipynb` (the mini
//! alignment cell: `next_token_stats`, `greedy_suffix`, `eval_exact_match`) on the pairs of
//! `building_blocks/ASAResearch.ipynb`'s "synthetic fine tune data" cell. For every
//! prompt/completion pair with a single-token completion:
//! - from the logits after the prompt: the completion token's probability `p_target`, its rank
//!   among all tokens (1 = most likely) and the top-1 token;
//! - a greedy continuation of `max_new_tokens` tokens (first most likely token each step, no
//!   penalties); exact match when the continuation, newlines as spaces and trimmed, starts with
//!   the completion, trimmed (the notebook's test).
//!
//! The summary per checkpoint: exact-match accuracy, top-1 accuracy, mean and median rank, mean
//! probability, accuracy at rank k (share of pairs whose rank is at most k), and each per task
//! (the tag's part before ':'). With a base, the same for it and the changes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::data::corpus::FactPair;
use crate::data::tokenizer::Tokenizer;
use crate::error::{AsaError, Result};
use crate::generate::{argmax, NextLogits};

/// Ranks at which `accuracy_at` is reported.
pub const RANKS: [usize; 7] = [1, 2, 5, 10, 50, 100, 1000];

/// One pair's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairResult {
    pub prompt: String,
    pub completion: String,
    pub tag: String,
    pub target_id: u32,
    /// probability of the completion token after the prompt
    pub p_target: f64,
    /// its rank (1 = the most likely; ties: tokens with a strictly larger logit, plus one)
    pub rank: usize,
    pub top1_id: u32,
    pub top1: String,
    /// the greedy continuation (newlines as spaces, trimmed)
    pub continuation: String,
    pub exact_match: bool,
}

/// Aggregates over a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub exact_match: f64,
    pub top1_accuracy: f64,
    pub mean_rank: f64,
    pub median_rank: f64,
    pub mean_p_target: f64,
    /// (k, share of pairs with rank <= k) for k in [`RANKS`]
    pub accuracy_at: Vec<(usize, f64)>,
}

/// One checkpoint's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Side {
    pub checkpoint: String,
    pub overall: Stats,
    /// per task (the tag before ':')
    pub by_task: BTreeMap<String, Stats>,
    pub pairs: Vec<PairResult>,
}

/// What `asa recall` writes to `recall.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecallReport {
    pub pairs_source: String,
    pub tokenizer: String,
    pub max_new_tokens: usize,
    /// pairs left out: their completion is not one token under the tokenizer
    pub dropped: Vec<FactPair>,
    pub model: Side,
    pub base: Option<Side>,
    /// model minus base, overall and per task (exact match, top-1, median rank, mean p)
    pub change: Option<BTreeMap<String, Change>>,
}

/// The change of a task's figures from the base to the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub exact_match: f64,
    pub top1_accuracy: f64,
    pub median_rank: f64,
    pub mean_p_target: f64,
}

/// Pairs with the id of their one-token completion.
pub type Scored = Vec<(FactPair, u32)>;

/// Splits `pairs` into those whose completion is one token under `tok` (with its id) and the rest.
pub fn single_token_pairs(pairs: &[FactPair], tok: &Tokenizer) -> Result<(Scored, Vec<FactPair>)> {
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for p in pairs {
        let ids = tok.encode(&p.completion)?;
        if ids.len() == 1 && !tok.encode(&p.prompt)?.is_empty() {
            kept.push((p.clone(), ids[0]));
        } else {
            dropped.push(p.clone());
        }
    }
    Ok((kept, dropped))
}

/// Reads pairs from a JSON Lines file: one `{"prompt": ..., "completion": ..., "tag": ...}` per
/// line (`tag` optional).
pub fn read_pairs(path: &Path) -> Result<Vec<FactPair>> {
    let text = std::fs::read_to_string(path).map_err(|e| AsaError::io(path, e))?;
    #[derive(serde::Deserialize)]
    struct Line {
        prompt: String,
        completion: String,
        #[serde(default)]
        tag: String,
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| {
            AsaError::Input(format!(
                "{} line {}: not a {{\"prompt\", \"completion\"}} object ({e})",
                path.display(),
                i + 1
            ))
        })?;
        out.push(FactPair {
            prompt: l.prompt,
            completion: l.completion,
            tag: if l.tag.is_empty() {
                "pairs".into()
            } else {
                l.tag
            },
        });
    }
    if out.is_empty() {
        return Err(AsaError::Input(format!(
            "{} holds no pairs",
            path.display()
        )));
    }
    Ok(out)
}

/// Probability (softmax in f64) and rank of `id` in `logits`.
fn p_and_rank(logits: &[f32], id: usize) -> (f64, usize) {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - mx).exp()).sum();
    let p = (logits[id] as f64 - mx).exp() / z;
    let rank = 1 + logits.iter().filter(|&&x| x > logits[id]).count();
    (p, rank)
}

fn stats(rs: &[&PairResult]) -> Stats {
    let n = rs.len();
    let nf = n.max(1) as f64;
    let ranks: Vec<f64> = rs.iter().map(|r| r.rank as f64).collect();
    let median_rank = crate::bench::median(&ranks);
    Stats {
        n,
        exact_match: rs.iter().filter(|r| r.exact_match).count() as f64 / nf,
        top1_accuracy: rs.iter().filter(|r| r.rank == 1).count() as f64 / nf,
        mean_rank: rs.iter().map(|r| r.rank as f64).sum::<f64>() / nf,
        median_rank,
        mean_p_target: rs.iter().map(|r| r.p_target).sum::<f64>() / nf,
        accuracy_at: RANKS
            .iter()
            .map(|&k| (k, rs.iter().filter(|r| r.rank <= k).count() as f64 / nf))
            .collect(),
    }
}

/// The task of a tag: its part before ':'.
fn task(tag: &str) -> &str {
    tag.split(':').next().unwrap_or(tag)
}

/// Evaluates `model` (reset before each pair) on `pairs` (single-token completions with their
/// ids).
pub fn evaluate(
    model: &mut dyn NextLogits,
    name: &str,
    tok: &Tokenizer,
    pairs: &[(FactPair, u32)],
    max_new_tokens: usize,
) -> Result<Side> {
    let mut out = Vec::with_capacity(pairs.len());
    for (pair, target) in pairs {
        model.reset()?;
        let ids = tok.encode(&pair.prompt)?;
        let mut logits: Vec<f32> = Vec::new();
        for &id in &ids {
            logits.clear();
            logits.extend_from_slice(model.feed(id)?);
        }
        let (p_target, rank) = p_and_rank(&logits, *target as usize);
        let top1_id = argmax(&logits) as u32;
        let mut gen = Vec::with_capacity(max_new_tokens);
        for i in 0..max_new_tokens {
            let next = argmax(&logits) as u32;
            gen.push(next);
            if i + 1 < max_new_tokens {
                logits.clear();
                logits.extend_from_slice(model.feed(next)?);
            }
        }
        let continuation = tok.decode(&gen)?.replace('\n', " ").trim().to_string();
        let exact_match = continuation.starts_with(pair.completion.replace('\n', " ").trim());
        out.push(PairResult {
            prompt: pair.prompt.clone(),
            completion: pair.completion.clone(),
            tag: pair.tag.clone(),
            target_id: *target,
            p_target,
            rank,
            top1_id,
            top1: tok.decode(&[top1_id])?,
            continuation,
            exact_match,
        });
    }
    let all: Vec<&PairResult> = out.iter().collect();
    let mut tasks: BTreeMap<String, Vec<&PairResult>> = BTreeMap::new();
    for r in &out {
        tasks.entry(task(&r.tag).to_string()).or_default().push(r);
    }
    let by_task = tasks.iter().map(|(k, v)| (k.clone(), stats(v))).collect();
    Ok(Side {
        checkpoint: name.to_string(),
        overall: stats(&all),
        by_task,
        pairs: out,
    })
}

/// Model minus base, overall (key "all") and per task.
pub fn change(model: &Side, base: &Side) -> BTreeMap<String, Change> {
    let d = |a: &Stats, b: &Stats| Change {
        exact_match: a.exact_match - b.exact_match,
        top1_accuracy: a.top1_accuracy - b.top1_accuracy,
        median_rank: a.median_rank - b.median_rank,
        mean_p_target: a.mean_p_target - b.mean_p_target,
    };
    let mut out = BTreeMap::new();
    out.insert("all".to_string(), d(&model.overall, &base.overall));
    for (k, s) in &model.by_task {
        if let Some(b) = base.by_task.get(k) {
            out.insert(k.clone(), d(s, b));
        }
    }
    out
}

/// Writes `recall.json` and `recall.png` into `outdir` (created if missing).
pub fn write_outputs(r: &RecallReport, outdir: &Path) -> Result<()> {
    crate::error::ensure_dir(outdir)?;
    let json = serde_json::to_string_pretty(r)
        .map_err(|e| AsaError::Other(format!("serialising the recall report: {e}")))?;
    crate::checkpoint::write_bytes_atomic(&outdir.join("recall.json"), (json + "\n").as_bytes())?;
    plot(r, &outdir.join("recall.png"))
}

/// Accuracy at rank k (log k) for the model and the base; exact match per task, side by side.
fn plot(r: &RecallReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::probe::ensure_plot_font()?;
    let err =
        |e: &dyn std::fmt::Display| AsaError::Other(format!("plotting {}: {e}", path.display()));
    let root = BitMapBackend::new(path, (1300, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);
    let sides: Vec<(&Side, RGBColor, &str)> =
        std::iter::once((&r.model, RGBColor(31, 119, 180), "model"))
            .chain(r.base.iter().map(|b| (b, RGBColor(255, 127, 14), "base")))
            .collect();
    let vmax = r
        .model
        .pairs
        .iter()
        .chain(r.base.iter().flat_map(|b| &b.pairs))
        .map(|p| p.rank)
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let mut ch = ChartBuilder::on(&left)
        .caption(
            "share of pairs with the completion at rank <= k",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((1.0f64..vmax).log_scale(), 0.0f64..1.02)
        .map_err(|e| err(&e))?;
    ch.configure_mesh()
        .x_desc("k (log)")
        .y_desc("share of pairs")
        .draw()
        .map_err(|e| err(&e))?;
    for (side, col, label) in &sides {
        let mut ranks: Vec<usize> = side.pairs.iter().map(|p| p.rank).collect();
        ranks.sort_unstable();
        let n = ranks.len().max(1) as f64;
        let pts: Vec<(f64, f64)> = ranks
            .iter()
            .enumerate()
            .map(|(i, &k)| (k as f64, (i + 1) as f64 / n))
            .collect();
        let col = *col;
        ch.draw_series(LineSeries::new(pts, col.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!(
                "{label}: top-1 {:.2}, exact match {:.2}",
                side.overall.top1_accuracy, side.overall.exact_match
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], col.stroke_width(2)));
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    let tasks: Vec<&String> = r.model.by_task.keys().collect();
    let nt = tasks.len().max(1);
    let mut ch = ChartBuilder::on(&right)
        .caption("exact match per task", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..(nt as f64 - 0.5), 0.0f64..1.02)
        .map_err(|e| err(&e))?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(nt)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            tasks.get(i).map(|s| s.to_string()).unwrap_or_default()
        })
        .y_desc("exact match")
        .draw()
        .map_err(|e| err(&e))?;
    let w = 0.8 / sides.len() as f64;
    for (si, (side, col, _)) in sides.iter().enumerate() {
        ch.draw_series(tasks.iter().enumerate().filter_map(|(i, t)| {
            let s = side.by_task.get(*t)?;
            let x0 = i as f64 - 0.4 + si as f64 * w;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + w, s.exact_match)],
                col.filled(),
            ))
        }))
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(rank: usize, exact: bool, tag: &str) -> PairResult {
        PairResult {
            prompt: String::new(),
            completion: " x".into(),
            tag: tag.into(),
            target_id: 0,
            p_target: 1.0 / rank as f64,
            rank,
            top1_id: 0,
            top1: String::new(),
            continuation: String::new(),
            exact_match: exact,
        }
    }

    #[test]
    fn stats_of_known_ranks() {
        let rs = [
            pr(1, true, "a:1"),
            pr(3, false, "a:2"),
            pr(10, false, "b"),
            pr(2000, false, "b"),
        ];
        let refs: Vec<&PairResult> = rs.iter().collect();
        let s = stats(&refs);
        assert_eq!(s.n, 4);
        assert_eq!(s.exact_match, 0.25);
        assert_eq!(s.top1_accuracy, 0.25);
        assert_eq!(s.median_rank, 6.5);
        assert_eq!(s.accuracy_at[0], (1, 0.25));
        assert_eq!(s.accuracy_at[2], (5, 0.5));
        assert_eq!(s.accuracy_at[3], (10, 0.75));
        assert_eq!(s.accuracy_at[6], (1000, 0.75));
        assert_eq!(task("capital:France"), "capital");
    }

    #[test]
    fn rank_counts_strictly_larger_logits() {
        let l = [0.5f32, 2.0, 2.0, -1.0];
        assert_eq!(p_and_rank(&l, 1).1, 1);
        assert_eq!(p_and_rank(&l, 2).1, 1);
        assert_eq!(p_and_rank(&l, 0).1, 3);
        assert_eq!(p_and_rank(&l, 3).1, 4);
        let p: f64 = (0..4).map(|i| p_and_rank(&l, i).0).sum();
        assert!((p - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&l), 1);
    }

    #[test]
    fn builtin_pairs_are_the_notebook_templates_and_mostly_single_token() {
        let pairs = crate::data::corpus::fact_pairs();
        assert!(pairs
            .iter()
            .any(|p| p.prompt == "The capital of France is" && p.completion == " Paris"));
        assert!(pairs.iter().any(|p| p.prompt == "France's capital city is"));
        assert!(pairs
            .iter()
            .any(|p| p.prompt == "France has its capital in"));
        assert!(pairs
            .iter()
            .any(|p| p.prompt == "France is located in" && p.completion == " Europe"));
        assert!(pairs
            .iter()
            .any(|p| p.prompt == "The Eiffel Tower is located in" && p.completion == " Paris"));
        assert!(pairs.iter().all(|p| p.completion.starts_with(' ')));
        let tok = Tokenizer::gpt2().unwrap();
        let (kept, dropped) = single_token_pairs(&pairs, &tok).unwrap();
        assert!(
            kept.len() > 300 && kept.len() > 2 * dropped.len(),
            "{} kept, {} dropped",
            kept.len(),
            dropped.len()
        );
    }
}
