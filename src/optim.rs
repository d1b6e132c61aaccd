//! AdamW with `torch.optim.AdamW` semantics (single-tensor, `foreach=False` path) and
//! `torch.nn.utils.clip_grad_norm_`-style global-norm clipping.
//!
//! Moments are `ParamStore`s with the parameters' layout (`zeros_like`), so parameter `i` of the
//! model, the gradients and both moments line up. Element updates are done in f32 in PyTorch's
//! operation order; the scalars (bias corrections, step size) are computed in f64 and cast to f32
//! as PyTorch does with Python floats. Every element update is independent, so the parallel
//! update is deterministic; the global norm sums fixed chunks in a fixed order.

use rayon::prelude::*;

use crate::backend::cpu::simd_kernel;
use crate::vocab::params::ParamStore;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

pub use crate::config::AdamWConfig;

/// AdamW state: the step count and the first (`m`, PyTorch `exp_avg`) and second (`v`,
/// `exp_avg_sq`) moments.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub m: ParamStore,
    pub v: ParamStore,
    /// `frozen[i]`: parameter `i` is kept fixed (fine-tuning's `--freeze`): no update, no weight
    /// decay, its moments stay zero. Empty: every parameter trains.
    pub frozen: Vec<bool>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &ParamStore) -> Self {
        AdamW {
            cfg,
            step: 0,
            m: params.zeros_like(),
            v: params.zeros_like(),
            frozen: Vec::new(),
        }
    }

    /// Whether parameter `k` is frozen.
    pub fn is_frozen(&self, k: usize) -> bool {
        self.frozen.get(k).copied().unwrap_or(false)
    }

    /// Zeroes the gradients of the frozen parameters (before the global norm: a frozen
    /// parameter has no gradient, as with `requires_grad = False`).
    pub fn drop_frozen_grads(&self, grads: &mut ParamStore) {
        for (k, g) in grads.data.iter_mut().enumerate() {
            if self.is_frozen(k) {
                g.iter_mut().for_each(|x| *x = 0.0);
            }
        }
    }

    /// One AdamW update with learning rate `lr` (a schedule passes its current rate). Weight
    /// decay applies to every parameter that is not frozen; frozen ones are skipped whole. Per element, in f32, as PyTorch's `_single_tensor_adamw`:
    /// ```text
    /// p *= 1 - lr*wd
    /// m  = lerp(m, g, 1-b1)                 // m + (1-b1)*(g-m), fused multiply-add
    /// v  = v*b2 + ((1-b2)*g)*g
    /// denom = sqrt(v) / sqrt(1-b2^step) + eps
    /// p += (-(lr / (1-b1^step)) * m) / denom
    /// ```
    pub fn step(&mut self, params: &mut ParamStore, grads: &ParamStore, lr: f64) {
        assert_eq!(
            params.len(),
            grads.len(),
            "AdamW::step: params/grads count mismatch"
        );
        assert_eq!(
            params.len(),
            self.m.len(),
            "AdamW::step: params/state count mismatch"
        );
        assert_eq!(
            params.len(),
            self.v.len(),
            "AdamW::step: params/state count mismatch"
        );
        self.step += 1;
        let cfg = self.cfg;
        let step = self.step as f64;

        // Python-float scalars, cast to the tensor dtype where they meet a tensor
        let decay = (1.0 - lr * cfg.weight_decay) as f32;
        let lerp_w = (1.0 - cfg.beta1) as f32;
        let beta2 = cfg.beta2 as f32;
        let one_minus_beta2 = (1.0 - cfg.beta2) as f32;
        let bias_correction1 = 1.0 - cfg.beta1.powf(step);
        let bias_correction2 = 1.0 - cfg.beta2.powf(step);
        let neg_step_size = (-(lr / bias_correction1)) as f32;
        let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
        let eps = cfg.eps as f32;

        for k in 0..params.len() {
            if self.is_frozen(k) {
                continue;
            }
            let p = &mut params.data[k];
            let g = &grads.data[k];
            let m = &mut self.m.data[k];
            let v = &mut self.v.data[k];
            assert_eq!(
                p.len(),
                g.len(),
                "AdamW::step: gradient size mismatch for {}",
                params.names[k]
            );
            assert_eq!(
                p.len(),
                m.len(),
                "AdamW::step: state size mismatch for {}",
                params.names[k]
            );
            assert_eq!(
                p.len(),
                v.len(),
                "AdamW::step: state size mismatch for {}",
                params.names[k]
            );
            let k = AdamWScalars {
                decay,
                lerp_w,
                beta2,
                one_minus_beta2,
                neg_step_size,
                bias_correction2_sqrt,
                eps,
            };
            p.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, &k));
        }
    }
}

/// The f32 scalars of one AdamW step (see `AdamW::step`).
struct AdamWScalars {
    decay: f32,
    lerp_w: f32,
    beta2: f32,
    one_minus_beta2: f32,
    neg_step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
}

simd_kernel! {
    /// One chunk of the element update (compiled for AVX2+FMA where the CPU has them: vectorised,
    /// hardware FMA; the FMA is a single rounding either way, so the bits are the same).
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamWScalars) {
        adamw_chunk_generic(p, m, v, g, k)
    }
}

#[inline(always)]
fn adamw_chunk_generic(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &AdamWScalars) {
    // the lerp branch depends only on the weight: choose the loop once
    if k.lerp_w.abs() < 0.5 {
        adamw_loop::<true>(p, m, v, g, k)
    } else {
        adamw_loop::<false>(p, m, v, g, k)
    }
}

#[inline(always)]
fn adamw_loop<const SMALL_W: bool>(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    k: &AdamWScalars,
) {
    let n = p.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        let gi = g[i];
        // param.mul_(1 - lr * weight_decay)
        let mut pi = p[i] * k.decay;
        // exp_avg.lerp_(grad, 1 - beta1): ATen's lerp is `start + w*(end-start)` for |w| < 0.5,
        // else `end - (end-start)*(1-w)`, each one fused multiply-add
        let diff = gi - m[i];
        let mi = if SMALL_W {
            k.lerp_w.mul_add(diff, m[i])
        } else {
            (k.lerp_w - 1.0).mul_add(diff, gi)
        };
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let vi = v[i] * k.beta2 + k.one_minus_beta2 * gi * gi;
        // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        let denom = vi.sqrt() / k.bias_correction2_sqrt + k.eps;
        // param.addcdiv_(exp_avg, denom, value=-step_size)
        pi += k.neg_step_size * mi / denom;
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

/// sqrt(sum of squares of every gradient element), accumulated in f64 over fixed chunks summed
/// in order (deterministic). `torch.nn.utils.clip_grad_norm_`'s `total_norm` (norm_type 2).
pub fn global_norm(grads: &ParamStore) -> f64 {
    let mut total = 0f64;
    for g in &grads.data {
        let partial: Vec<f64> = g
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .collect();
        total += partial.iter().sum::<f64>();
    }
    total.sqrt()
}

/// `clip_grad_norm_`: coef = max_norm / (total_norm + 1e-6); when coef < 1 every gradient is
/// multiplied by coef (as f32). Returns total_norm before clipping.
pub fn clip_grad_norm(grads: &mut ParamStore, max_norm: f64) -> f64 {
    let total = global_norm(grads);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        let c = coef as f32;
        for g in &mut grads.data {
            g.par_chunks_mut(CHUNK)
                .for_each(|ch| ch.iter_mut().for_each(|x| *x *= c));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(params: &[(&str, Vec<f32>)]) -> ParamStore {
        let mut s = ParamStore::new();
        for (name, data) in params {
            s.push(*name, &[data.len()], data.clone());
        }
        s
    }

    #[test]
    fn adamw_three_steps_match_f64() {
        let cfg = AdamWConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let p0 = vec![1.0f32, -0.5, 0.25, 2.0];
        let mut params = store(&[("w", p0.clone()), ("b", vec![0.3])]);
        let mut opt = AdamW::new(cfg, &params);
        let grads_per_step = [
            (vec![0.1f32, -0.2, 0.0, 1.5], 0.5f32),
            (vec![-0.3f32, 0.05, 0.0, 1.0], -0.25),
            (vec![0.2f32, 0.2, 0.01, -2.0], 0.125),
        ];
        let lrs = [1e-2, 2e-2, 5e-3];

        // f64 reference of the documented formula
        let mut rp: Vec<f64> = p0
            .iter()
            .map(|&x| x as f64)
            .chain([0.3f32 as f64])
            .collect();
        let mut rm = [0f64; 5];
        let mut rv = [0f64; 5];
        for (s, ((gw, gb), lr)) in grads_per_step.iter().zip(lrs).enumerate() {
            let grads = store(&[("w", gw.clone()), ("b", vec![*gb])]);
            opt.step(&mut params, &grads, lr);

            let step = (s + 1) as f64;
            let g: Vec<f64> = gw.iter().map(|&x| x as f64).chain([*gb as f64]).collect();
            for k in 0..5 {
                rp[k] *= 1.0 - lr * cfg.weight_decay;
                rm[k] = cfg.beta1 * rm[k] + (1.0 - cfg.beta1) * g[k];
                rv[k] = cfg.beta2 * rv[k] + (1.0 - cfg.beta2) * g[k] * g[k];
                let bc1 = 1.0 - cfg.beta1.powi(step as i32);
                let bc2 = 1.0 - cfg.beta2.powi(step as i32);
                let denom = rv[k].sqrt() / bc2.sqrt() + cfg.eps;
                rp[k] -= (lr / bc1) * rm[k] / denom;
            }
            let got: Vec<f32> = params.data.concat();
            for k in 0..5 {
                assert!(
                    (got[k] as f64 - rp[k]).abs() < 1e-6,
                    "step {} param {k}: {} vs {}",
                    s + 1,
                    got[k],
                    rp[k]
                );
            }
            let (gm, gv) = (opt.m.data.concat(), opt.v.data.concat());
            for k in 0..5 {
                assert!((gm[k] as f64 - rm[k]).abs() < 1e-7, "m[{k}]");
                assert!((gv[k] as f64 - rv[k]).abs() < 1e-7, "v[{k}]");
            }
        }
        assert_eq!(opt.step, 3);
        // the parameters actually moved
        assert!((params.data[0][3] - 2.0).abs() > 1e-2);
    }

    #[test]
    fn global_norm_is_f64_sum() {
        let n = 3 * CHUNK + 17;
        let a: Vec<f32> = (0..n).map(|k| ((k % 13) as f32 - 6.0) * 0.01).collect();
        let grads = store(&[("a", a.clone()), ("b", vec![3.0, 4.0])]);
        let want = (a.iter().map(|&x| x as f64 * x as f64).sum::<f64>() + 25.0).sqrt();
        assert!((global_norm(&grads) - want).abs() < 1e-12 * want);
    }

    #[test]
    fn clip_grad_norm_scales_to_max() {
        let mut grads = store(&[("a", vec![3.0, 0.0]), ("b", vec![4.0])]);
        let total = clip_grad_norm(&mut grads, 1.0);
        assert!((total - 5.0).abs() < 1e-12, "returns the pre-clip norm");
        let after = global_norm(&grads);
        assert!((after - 1.0).abs() < 1e-6, "clipped norm {after}");
        assert!((grads.data[0][0] - 0.6).abs() < 1e-6);
        assert!((grads.data[1][0] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn clip_grad_norm_below_max_is_noop() {
        let mut grads = store(&[("a", vec![3.0, 0.0]), ("b", vec![4.0])]);
        let before = grads.data.clone();
        let total = clip_grad_norm(&mut grads, 10.0);
        assert!((total - 5.0).abs() < 1e-12);
        assert_eq!(grads.data, before);
    }
}
