//! Token streams for training: train/validation split, random training windows, fixed
//! validation windows, and reading user text files.

use std::path::PathBuf;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::shards::ShardSet;
use crate::error::{AsaError, Result};

/// A token stream split into train and validation parts (the last `val_frac` of the stream).
#[derive(Debug, Clone)]
pub struct TokenData {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// inputs [rows,T] = window[..T], targets [rows,T] = window[1..] for windows of T+1 tokens
/// starting at `starts`.
fn windows(tokens: &[u32], starts: &[usize], t: usize) -> (Vec<u32>, Vec<i64>) {
    let mut inputs = Vec::with_capacity(starts.len() * t);
    let mut targets = Vec::with_capacity(starts.len() * t);
    for &s in starts {
        let w = &tokens[s..s + t + 1];
        inputs.extend_from_slice(&w[..t]);
        targets.extend(w[1..].iter().map(|&x| x as i64));
    }
    (inputs, targets)
}

impl TokenData {
    /// Splits `tokens`: the last `val_frac` (in (0, 1)) go to validation. Both parts must hold at
    /// least `seq_len + 1` tokens (one full window).
    pub fn new(tokens: Vec<u32>, val_frac: f64, seq_len: usize) -> Result<Self> {
        if !(val_frac.is_finite() && val_frac > 0.0 && val_frac < 1.0) {
            return Err(AsaError::Input(format!(
                "validation fraction must be in (0, 1), got {val_frac}"
            )));
        }
        if seq_len == 0 {
            return Err(AsaError::Input("sequence length must be at least 1".into()));
        }
        let n = tokens.len();
        let n_val = ((n as f64) * val_frac).round() as usize;
        let n_train = n - n_val.min(n);
        let need = seq_len + 1;
        if n_train < need || n_val < need {
            return Err(AsaError::Input(format!(
                "not enough data: {n} tokens split into {n_train} train and {n_val} validation \
                 tokens, but each part needs at least seq_len + 1 = {need}"
            )));
        }
        let mut train = tokens;
        let val = train.split_off(n_train);
        Ok(TokenData { train, val })
    }

    /// `b` random windows of `t + 1` tokens from `train`: inputs [B,T] (row-major) and the
    /// next-token targets [B,T]. `t` must not exceed the `seq_len` given to [`TokenData::new`].
    pub fn sample_train(&self, rng: &mut impl Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
        assert!(
            t < self.train.len(),
            "sample_train: T={t} needs {} tokens, train has {}",
            t + 1,
            self.train.len()
        );
        let max_start = self.train.len() - (t + 1);
        let starts: Vec<usize> = (0..b).map(|_| rng.gen_range(0..=max_start)).collect();
        windows(&self.train, &starts, t)
    }

    /// Fixed validation windows of `t + 1` tokens starting at 0, `stride`, 2·`stride`, ... (at
    /// most `max_windows`), grouped into batches of up to `b` rows: (inputs [rows,T],
    /// targets [rows,T], rows). `stride` 0 means `t`; empty if `val` is shorter than `t + 1`.
    pub fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max_windows: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)> {
        let stride = if stride == 0 { t.max(1) } else { stride };
        let b = b.max(1);
        if self.val.len() < t + 1 {
            return Vec::new();
        }
        let last = self.val.len() - (t + 1);
        let starts: Vec<usize> = (0..=last).step_by(stride).take(max_windows).collect();
        starts
            .chunks(b)
            .map(|chunk| {
                let (x, y) = windows(&self.val, chunk, t);
                (x, y, chunk.len())
            })
            .collect()
    }
}

/// Reads user text files (`--data FILE...`) and joins them with blank lines. A file that is not
/// UTF-8 or holds only whitespace is an input error naming the file.
pub fn read_text_files(paths: &[PathBuf]) -> Result<String> {
    if paths.is_empty() {
        return Err(AsaError::Input("no data files given".into()));
    }
    let mut parts = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| AsaError::io(p, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            AsaError::Input(format!(
                "{} is not UTF-8 text (invalid byte at offset {})",
                p.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        if text.trim().is_empty() {
            return Err(AsaError::Input(format!("{} is empty", p.display())));
        }
        parts.push(text.to_string());
    }
    Ok(parts.join("\n\n"))
}

// ---------------------------------------------------------------------------------------------
// training batches

/// A source of training windows and fixed validation windows.
pub trait Batches {
    /// `b` random windows: inputs [B,T] and next-token targets [B,T]
    fn sample_train(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>);
    /// fixed validation windows at `stride`, at most `max` of them, in batches of up to `b` rows
    fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)>;
    /// (train tokens, validation tokens)
    fn sizes(&self) -> (usize, usize);
}

impl Batches for TokenData {
    fn sample_train(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
        TokenData::sample_train(self, rng, b, t)
    }
    fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)> {
        TokenData::val_batches(self, b, t, stride, max)
    }
    fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }
}

/// Prepared shards as training windows: a random shard (weighted by its length), a random
/// offset; validation windows at a fixed stride over the validation shard.
pub struct ShardBatches {
    set: ShardSet,
    /// cumulative window counts of the train shards
    cum: Vec<u64>,
    t: usize,
}

impl ShardBatches {
    pub fn new(set: ShardSet, t: usize) -> Result<Self> {
        let mut cum = Vec::new();
        let mut acc = 0u64;
        for s in &set.train {
            acc += s.tokens.len().saturating_sub(t) as u64;
            cum.push(acc);
        }
        if acc == 0 {
            return Err(AsaError::Input(format!(
                "the training shards hold no window of {} tokens (max_seq_len + 1)",
                t + 1
            )));
        }
        if set.val.tokens.len() <= t {
            return Err(AsaError::Input(format!(
                "the validation shard ({} tokens) is shorter than one window of {} tokens",
                set.val.tokens.len(),
                t + 1
            )));
        }
        Ok(ShardBatches { set, cum, t })
    }
}

impl Batches for ShardBatches {
    fn sample_train(&self, rng: &mut ChaCha8Rng, b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
        use rand::Rng;
        debug_assert_eq!(t, self.t);
        let total = *self.cum.last().expect("at least one shard");
        let (mut inp, mut tgt) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for _ in 0..b {
            let w = rng.gen_range(0..total);
            let si = self.cum.partition_point(|&c| c <= w);
            let start = (w - if si == 0 { 0 } else { self.cum[si - 1] }) as usize;
            let toks = self.set.train[si].tokens.window(start, t + 1);
            inp.extend_from_slice(&toks[..t]);
            tgt.extend(toks[1..].iter().map(|&x| x as i64));
        }
        (inp, tgt)
    }

    fn val_batches(
        &self,
        b: usize,
        t: usize,
        stride: usize,
        max: usize,
    ) -> Vec<(Vec<u32>, Vec<i64>, usize)> {
        let v = &self.set.val.tokens;
        let starts: Vec<usize> = (0..v.len().saturating_sub(t))
            .step_by(stride.max(1))
            .take(max)
            .collect();
        starts
            .chunks(b.max(1))
            .map(|ch| {
                let (mut inp, mut tgt) = (Vec::new(), Vec::new());
                for &s in ch {
                    let w = v.window(s, t + 1);
                    inp.extend_from_slice(&w[..t]);
                    tgt.extend(w[1..].iter().map(|&x| x as i64));
                }
                (inp, tgt, ch.len())
            })
            .collect()
    }

    fn sizes(&self) -> (usize, usize) {
        (
            self.set.train.iter().map(|s| s.tokens.len()).sum(),
            self.set.val.tokens.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn split_sizes_and_too_short() {
        let d = TokenData::new((0..100).collect(), 0.1, 8).unwrap();
        assert_eq!(d.train, (0..90).collect::<Vec<u32>>());
        assert_eq!(d.val, (90..100).collect::<Vec<u32>>());
        // val part has 10 tokens < seq_len + 1 = 11
        assert!(matches!(
            TokenData::new((0..100).collect(), 0.1, 10),
            Err(AsaError::Input(_))
        ));
        assert!(TokenData::new(vec![1, 2, 3], 0.5, 4).is_err());
        assert!(TokenData::new(vec![], 0.5, 1).is_err());
        assert!(TokenData::new((0..100).collect(), 0.0, 4).is_err());
        assert!(TokenData::new((0..100).collect(), f64::NAN, 4).is_err());
    }

    #[test]
    fn train_targets_are_inputs_shifted_by_one() {
        // tokens 1000.. so that every window's position in the stream is visible
        let d = TokenData::new((1000..3000).collect(), 0.25, 16).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (b, t) = (4, 16);
        let (x, y) = d.sample_train(&mut rng, b, t);
        assert_eq!(x.len(), b * t);
        assert_eq!(y.len(), b * t);
        for r in 0..b {
            let row = &x[r * t..(r + 1) * t];
            let start = d.train.iter().position(|&v| v == row[0]).unwrap();
            assert_eq!(row, &d.train[start..start + t]);
            for i in 0..t {
                assert_eq!(y[r * t + i], d.train[start + i + 1] as i64);
                if i + 1 < t {
                    assert_eq!(y[r * t + i], x[r * t + i + 1] as i64);
                }
            }
            assert!(row.iter().all(|&v| v < 2500), "window reaches into val");
        }
        // same seed, same batch
        let mut rng2 = ChaCha8Rng::seed_from_u64(5);
        assert_eq!(d.sample_train(&mut rng2, b, t), (x, y));
    }

    #[test]
    fn val_windows_are_fixed() {
        let d = TokenData::new((0..200).collect(), 0.5, 10).unwrap();
        let v = d.val_batches(3, 10, 5, 100);
        assert_eq!(v, d.val_batches(3, 10, 5, 100));
        // val = 100..200: starts 0, 5, ..., 85 -> 18 windows, batches of 3
        let rows: usize = v.iter().map(|(_, _, r)| r).sum();
        assert_eq!(rows, 18);
        assert_eq!(v.len(), 6);
        let (x, y, r) = &v[1];
        assert_eq!(*r, 3);
        assert_eq!(&x[..10], &(115..125).collect::<Vec<u32>>()[..]);
        assert_eq!(
            &y[..10],
            &(116..126).map(i64::from).collect::<Vec<i64>>()[..]
        );
        // max_windows caps, last batch may be partial
        let v = d.val_batches(4, 10, 5, 6);
        assert_eq!(v.iter().map(|b| b.2).collect::<Vec<_>>(), vec![4, 2]);
        assert!(d.val_batches(4, 200, 5, 6).is_empty());
    }

    #[test]
    fn read_text_files_checks() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "first file\n").unwrap();
        std::fs::write(&b, "\u{feff}second").unwrap();
        let s = read_text_files(&[a.clone(), b]).unwrap();
        assert_eq!(s, "first file\n\n\nsecond");
        let bad = dir.path().join("latin1.txt");
        std::fs::write(&bad, [b'o', b'k', 0xE9, b'!']).unwrap();
        let e = read_text_files(&[a.clone(), bad]).unwrap_err();
        assert!(
            matches!(e, AsaError::Input(_)) && e.to_string().contains("latin1.txt"),
            "{e}"
        );
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, " \n").unwrap();
        let e = read_text_files(&[empty]).unwrap_err();
        assert!(e.to_string().contains("empty.txt"), "{e}");
        let e = read_text_files(&[dir.path().join("nope.txt")]).unwrap_err();
        assert!(e.to_string().contains("nope.txt"), "{e}");
        assert!(read_text_files(&[]).is_err());
    }
}
