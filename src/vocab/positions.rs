//! The positions' tables that the CPU ops and the GPU kernels both read: the ALiBi slopes per
//! head and the reference RoPE's cos/sin tables (host computations, f32 as the reference's).

/// ALiBi slopes for `h` heads (the standard geometric sequence; for a head count that is not a
/// power of two, the closest power's slopes plus every other slope of twice that power).
/// Rounded to f32 as the reference's buffer is.
pub fn alibi_slopes(h: usize) -> Vec<f32> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    fn get(n: usize) -> Vec<f64> {
        if (n as f64).log2().fract() == 0.0 {
            return pow2(n);
        }
        let closest = 1usize << (n as f64).log2().floor() as u32;
        let mut s = pow2(closest);
        s.extend(get(2 * closest).into_iter().step_by(2).take(n - closest));
        s
    }
    if h == 0 {
        return vec![];
    }
    get(h).into_iter().map(|x| x as f32).collect()
}

/// Cos/sin tables of the reference RoPE, `[T, D]` each. The reference pairs interleaved elements
/// `(x[2i], x[2i+1])` but lays the angles out half-split (`cat([freqs, freqs])`), so element `j`
/// turns by angle `t * inv_freq[j mod D/2]`. `inv_freq` is computed in f32 as PyTorch does.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub t: usize,
    pub dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

pub fn rope_table(t: usize, dim: usize, base: f64) -> RopeTable {
    let inv = rope_inv_freq(dim, base);
    let mut cos = vec![0.0; t * dim];
    let mut sin = vec![0.0; t * dim];
    for ti in 0..t {
        let row = ti * dim..(ti + 1) * dim;
        rope_row(&mut cos[row.clone()], &mut sin[row], ti, &inv);
    }
    RopeTable { t, dim, cos, sin }
}

/// `inv_freq = 1 / (base ** (arange(0, dim, 2).float() / dim))`, all in f32 as PyTorch does: [dim/2]
pub fn rope_inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0f32 / (base as f32).powf(e)
        })
        .collect()
}

/// One position's row of the cos/sin tables (`rope_table` is these rows stacked; recurrent
/// decoding computes the row of its current position alone). cos, sin: [dim]; inv: [dim/2]
pub fn rope_row(cos: &mut [f32], sin: &mut [f32], pos: usize, inv: &[f32]) {
    let half = inv.len();
    for (j, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let ang = pos as f64 * inv[j % half] as f64;
        *c = ang.cos() as f32;
        *s = ang.sin() as f32;
    }
}

/// The RoPE inverse frequencies of a model's write keys [d/2] and of its slotspace q/k [M/2],
/// each empty where that RoPE is off (the decoders compute one position's rows from them).
pub fn rope_inv_freqs(cfg: &crate::config::ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let keys = if cfg.use_rope_keys {
        rope_inv_freq(cfg.head_dim(), cfg.rope_base)
    } else {
        Vec::new()
    };
    let ss = if cfg.use_slotspace_refine && cfg.use_rope_slotspace {
        rope_inv_freq(cfg.slotspace_dim, cfg.rope_base_slotspace)
    } else {
        Vec::new()
    };
    (keys, ss)
}
