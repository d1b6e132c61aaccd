//! `asa bench-decode`: what one generated token costs as the sequence grows. Recurrent decoding
//! should cost the same at every position (its state has a fixed size); the baseline, re-running
//! the full forward over the sequence for every token (the reference's `asa_generate` loop),
//! grows linearly with the position. Both run in the same process on the same model, so the
//! ratios are like for like.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::bench::median;
use crate::config::{Place, Precision};
use crate::engine::Engine;
use crate::error::{AsaError, Result};
use crate::generate::{CpuFullForward, CpuRecurrent, GpuRecurrent, NextLogits};
use crate::model::lm::Lm;
use crate::model::params::ParamStore;

/// One measured position.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    /// index of the measured token (0-based: that many tokens came before it)
    pub position: usize,
    /// median seconds of one recurrent step over the steps just before `position`
    pub recurrent_s: f64,
    /// bytes of the recurrent state at this position
    pub state_bytes: usize,
    /// the process's resident memory (VmRSS) at this position, when the OS reports it
    pub rss_bytes: Option<u64>,
    /// seconds of one full forward over `position + 1` tokens (only at `--full-at` positions)
    pub full_forward_s: Option<f64>,
    /// resident memory right after that forward
    pub full_forward_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    pub model: String,
    pub device: String,
    pub threads: usize,
    pub max_len: usize,
    pub rows: Vec<DecodeRow>,
}

/// The measured positions: powers of two up to `max_len`, and `max_len` itself.
pub fn positions(max_len: usize) -> Vec<usize> {
    let mut p = Vec::new();
    let mut x = 1;
    while x < max_len {
        p.push(x);
        x *= 2;
    }
    p.push(max_len);
    p
}

/// VmRSS of this process in bytes (Linux), else None.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Decodes `max_len` random tokens recurrently at `place`, timing every step, then times the
/// full forward at the `full_at` positions (those up to `max_len`) at the same place: on the
/// CPU the forward to logits, on the GPU the forward and its loss (no logits download).
pub fn run(
    lm: Lm,
    params: ParamStore,
    model_name: &str,
    place: Place,
    max_len: usize,
    full_at: &[usize],
    quiet: bool,
) -> Result<DecodeReport> {
    if max_len == 0 {
        return Err(AsaError::Input("--max-len must be >= 1, got 0".into()));
    }
    if lm.cfg.use_abs_pos && max_len > lm.cfg.max_seq_len {
        return Err(AsaError::Input(format!(
            "--max-len {max_len} is past the model's max_seq_len {} (learned absolute positions)",
            lm.cfg.max_seq_len
        )));
    }
    let v = lm.cfg.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..max_len).map(|_| rng.gen_range(0..v)).collect();
    let marks = positions(max_len);
    let mut rows = Vec::new();
    let mut rec: Box<dyn NextLogits> = if place.is_cuda() {
        Box::new(GpuRecurrent::new(&lm, &params)?)
    } else {
        Box::new(CpuRecurrent::new(lm.clone(), params.clone())?)
    };
    let device = rec.name();
    let mut times = Vec::with_capacity(max_len);
    let mut next_mark = 0;
    for (i, &id) in ids.iter().enumerate() {
        let t0 = Instant::now();
        rec.feed(id)?;
        times.push(t0.elapsed().as_secs_f64());
        if marks.get(next_mark) == Some(&(i + 1)) {
            // the median of the (up to) 64 steps ending here
            let lo = times.len().saturating_sub(64);
            rows.push(DecodeRow {
                position: i,
                recurrent_s: median(&times[lo..]),
                state_bytes: rec.state_bytes(),
                rss_bytes: rss_bytes(),
                full_forward_s: None,
                full_forward_rss_bytes: None,
            });
            if !quiet {
                eprintln!(
                    "recurrent: position {:>6}  {:>9.1} us/token",
                    i,
                    rows.last().map(|r| r.recurrent_s * 1e6).unwrap_or(0.0)
                );
            }
            next_mark += 1;
        }
    }
    drop(rec);
    let mut gpu_engine = if place.is_cuda() {
        Some(Engine::for_eval(
            lm.clone(),
            params.clone(),
            place,
            Precision::F32,
        )?)
    } else {
        None
    };
    // next-token targets of the GPU's loss (wrapping at the end)
    let targets: Vec<i64> = (0..max_len)
        .map(|i| ids[(i + 1) % max_len] as i64)
        .collect();
    for &p in full_at.iter().filter(|&&p| p >= 1 && p <= max_len) {
        // feeding the p-th token re-runs the forward over all p tokens; 1 to 3 repeats
        let reps = if p >= 4096 { 1 } else { 3 };
        let mut ts = Vec::new();
        let mut rss = None;
        match gpu_engine.as_mut() {
            Some(e) => {
                // one untimed call at this length first (buffers, graph, kernels)
                e.eval_loss(&ids[..p], &targets[..p], 1, p)?;
                for _ in 0..reps {
                    let t0 = Instant::now();
                    e.eval_loss(&ids[..p], &targets[..p], 1, p)?;
                    ts.push(t0.elapsed().as_secs_f64());
                }
            }
            None => {
                for _ in 0..reps {
                    let mut full = CpuFullForward::new(lm.clone(), params.clone());
                    full.prime(&ids[..p - 1]);
                    let t0 = Instant::now();
                    full.feed(ids[p - 1])?;
                    ts.push(t0.elapsed().as_secs_f64());
                    rss = rss_bytes();
                }
            }
        }
        let s = median(&ts);
        if !quiet {
            eprintln!(
                "full forward: position {:>6}  {:>9.1} us/token",
                p - 1,
                s * 1e6
            );
        }
        match rows.iter_mut().find(|r| r.position == p - 1) {
            Some(r) => {
                r.full_forward_s = Some(s);
                r.full_forward_rss_bytes = rss;
            }
            None => rows.push(DecodeRow {
                position: p - 1,
                recurrent_s: f64::NAN,
                state_bytes: 0,
                rss_bytes: None,
                full_forward_s: Some(s),
                full_forward_rss_bytes: rss,
            }),
        }
    }
    rows.sort_by_key(|r| r.position);
    Ok(DecodeReport {
        model: model_name.to_string(),
        device,
        threads: rayon::current_num_threads(),
        max_len,
        rows,
    })
}

/// The report as a table.
pub fn table(r: &DecodeReport) -> String {
    let mut s = format!(
        "{} on {} ({} threads)\n{:>8} {:>14} {:>12} {:>10} {:>16} {:>10}\n",
        r.model,
        r.device,
        r.threads,
        "position",
        "recurrent us",
        "state KiB",
        "RSS MiB",
        "full fwd us",
        "full/rec"
    );
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.0}", b as f64 / 1048576.0))
            .unwrap_or_else(|| "-".into())
    };
    for row in &r.rows {
        let rec = if row.recurrent_s.is_finite() {
            format!("{:.1}", row.recurrent_s * 1e6)
        } else {
            "-".into()
        };
        let full = row
            .full_forward_s
            .map(|f| format!("{:.1}", f * 1e6))
            .unwrap_or_else(|| "-".into());
        let ratio = match row.full_forward_s {
            Some(f) if row.recurrent_s.is_finite() => format!("{:.1}x", f / row.recurrent_s),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "{:>8} {:>14} {:>12.1} {:>10} {:>16} {:>10}\n",
            row.position,
            rec,
            row.state_bytes as f64 / 1024.0,
            mib(row.rss_bytes.or(row.full_forward_rss_bytes)),
            full,
            ratio
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_powers_of_two_and_the_end() {
        assert_eq!(positions(1), vec![1]);
        assert_eq!(positions(8), vec![1, 2, 4, 8]);
        assert_eq!(positions(10), vec![1, 2, 4, 8, 10]);
    }
}
