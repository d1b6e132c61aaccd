//! Tolerance checks and random inputs shared by the GPU and emulator tests.

#![allow(dead_code)]

use asa::model::params::ParamStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// n values uniform in [-scale, scale].
pub fn rv(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-scale..=scale)).collect()
}

/// max |got - want| / max(1, max |want|); -inf/inf must match exactly, NaN fails.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let mut md = 0.0f64;
    let mut mr = 0.0f64;
    for (&a, &b) in got.iter().zip(want) {
        if a.is_nan() != b.is_nan() {
            return f64::INFINITY;
        }
        if a.is_nan() {
            continue;
        }
        if a.is_infinite() || b.is_infinite() {
            if a != b {
                return f64::INFINITY;
            }
            continue;
        }
        md = md.max((a as f64 - b as f64).abs());
        mr = mr.max((b as f64).abs());
    }
    md / mr.max(1.0)
}

#[track_caller]
pub fn close(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{name}: relative error {e:e} > {tol:e}");
}

/// Every parameter of `got` within `tol` of the same-named one of `want` (as `close`).
#[track_caller]
pub fn close_params(what: &str, got: &ParamStore, want: &ParamStore, tol: f64) {
    for (i, name) in want.names.iter().enumerate() {
        close(&format!("{what} {name}"), &got.data[i], &want.data[i], tol);
    }
}
