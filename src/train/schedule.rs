//! The learning-rate schedule (warmup, then cosine decay) and the AdamW settings of a run.

use crate::optim::AdamWConfig;

use super::*;

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `total` steps (`step` counts from 0).
pub fn lr_at(step: usize, lr: f64, min_lr: f64, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

pub fn adam_config(s: &TrainSettings) -> AdamWConfig {
    AdamWConfig {
        lr: s.lr,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: 1e-8,
        weight_decay: s.weight_decay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((lr_at(0, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        let mid = lr_at(55, 1.0, 0.1, 10, 100);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
    }
}
