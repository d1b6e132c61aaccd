//! The intervene variant on the GPU (`cuda/intervene.cu`): the per-position intervention of the
//! refine delta, its per-write-chunk thresholds, its logs and its backward. Mirrors
//! `AsaLayer::intervene_forward` / `intervene_backward` (`PosGeom::{new, apply, vjp}`,
//! `quantile`) of `model::layer`.
//!
//! Forward, per layer call (all on the device, no host round trip):
//! 1. out1 (the base read, held in `out_h` on entry) is saved;
//! 2. `orth_gate` only: the raw score of every position (`slot_mix_forward_intv_score`), then per
//!    write chunk a block-wide bitonic sort of the chunk's (B, H, chunk) scores and the
//!    `torch.quantile` linear interpolations (score clip percentile, then the tau percentile
//!    over the clipped scores) (`slot_mix_forward_intv_thresholds`);
//! 3. out_h = out1 + f(out1, gate * delta) per position (`slot_mix_forward_intv_apply`), with
//!    per-position statistics;
//! 4. per (chunk, head) sums of those statistics (`slot_mix_forward_intv_logs`); `info` turns
//!    them into the CPU's info tensors (downloads, on demand only).
//!
//! Backward: `slot_mix_backward_intv` (the VJP with the forward's scores and thresholds, which are
//! detached as in the reference), then `sum_f64` for the refine gate's share.

use cudarc::driver::LaunchConfig;

use super::{i32_of, kern, AsDv, Backend, Dv, Temp};
use crate::error::{AsaError, Result};
use crate::vocab::dims::SlotDims;
use crate::vocab::options::{Info, Intervention, IntvMode, ScoreKind, TauKind};

/// Per-row statistics of the apply kernel (`INTV_NSTAT` of the kernels).
const NSTAT: usize = 8;
/// Sums per (chunk, slice) of the log kernel (`INTV_NLOG`).
const NLOG: usize = 7;
/// head_dim limit of the per-lane vectors (32 * ASA_MAXJ).
const MAX_D: usize = 256;

use super::DevBuf as Buf;

fn mode_code(m: IntvMode) -> i32 {
    match m {
        IntvMode::Off => 0,
        IntvMode::DeltaPar => 1,
        IntvMode::DeltaOrth => 2,
        IntvMode::DeltaParPlusOrth => 3,
        IntvMode::OrthGate => 4,
    }
}

fn score_code(s: ScoreKind) -> i32 {
    match s {
        ScoreKind::OrthRatio => 0,
        ScoreKind::OrthFrac => 1,
        ScoreKind::AlphaAbs => 2,
        ScoreKind::SlotPeaked => 3,
    }
}

/// Saved state of one intervene forward (per layer; reused across calls of the same shape).
#[derive(Default)]
pub struct GpuIntvCache {
    /// settings, dims, effective chunk, gate of the last forward (None before the first)
    last: Option<(Intervention, SlotDims, usize, f32)>,
    out1: Buf<f32>,  // [R,d] the base read
    score: Buf<f64>, // [R] raw scores (orth_gate)
    stats: Buf<f64>, // [R,NSTAT]
    thr: Buf<f64>,   // [nchunks,3] (tau, smax, has_smax)
    sort: Buf<f64>,  // [nchunks,npad] sort scratch
    logs: Buf<f64>,  // [nchunks,H+1,NLOG]
    hmask: Option<(Vec<f32>, Temp<f32>)>,
}

impl GpuIntvCache {
    fn head_mask<B: Backend>(&mut self, be: &B, it: &Intervention, h: usize) -> Result<Dv<f32>> {
        let hm = match (&it.head_mask, it.mode) {
            (Some(hm), m) if m != IntvMode::Off => hm,
            _ => return Ok(Dv::null()),
        };
        if hm.len() < h {
            return Err(AsaError::Input(format!(
                "intervention head_mask has {} entries, expected num_heads = {h}",
                hm.len()
            )));
        }
        if self.hmask.as_ref().map(|(v, _)| v != hm).unwrap_or(true) {
            self.hmask = Some((hm.clone(), be.temp_from(hm)?));
        }
        Ok(self.hmask.as_ref().unwrap().1.dv().sub(0, hm.len()))
    }

    /// out_h [B,H,T,d]: out1 on entry, out1 + f(out1, gate*delta) on return. delta [B,H,T,d] is
    /// the refine delta without the gate, z [B,H,T,K] the slotspace logits.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &mut self,
        be: &B,
        it: &Intervention,
        out_h: Dv<f32>,
        delta: Dv<f32>,
        z: Dv<f32>,
        gate: f32,
        write_chunk_size: usize,
        dm: SlotDims,
    ) -> Result<()> {
        let (b, h, t, nk, d) = (dm.b, dm.h, dm.t, dm.k, dm.d);
        let rows = b * h * t;
        assert_eq!(out_h.len, rows * d, "intervene forward: out_h shape");
        assert_eq!(delta.len, rows * d, "intervene forward: delta shape");
        assert_eq!(z.len, rows * nk, "intervene forward: z shape");
        if d > MAX_D {
            return Err(AsaError::Device(format!(
                "the intervene kernels support head_dim <= {MAX_D}, got {d}"
            )));
        }
        self.last = None;
        if rows == 0 {
            return Ok(());
        }
        let chunk = write_chunk_size.max(1).min(t);
        let nchunks = t.div_ceil(chunk);
        let (hi, ti, ci, nki, di) = (
            i32_of("H", h)?,
            i32_of("T", t)?,
            i32_of("write chunk", chunk)?,
            i32_of("K", nk)?,
            i32_of("d", d)?,
        );
        i32_of("B", b)?;
        let hmask = self.head_mask(be, it, h)?;
        let out1 = self.out1.ensure(be, rows * d)?;
        be.copy(out1, out_h)?;
        let score = self.score.ensure(be, rows)?;
        let thr = self.thr.ensure(be, nchunks * 3)?;
        let stats = self.stats.ensure(be, rows * NSTAT)?;
        let logs = self.logs.ensure(be, nchunks * (h + 1) * NLOG)?;
        let mode = mode_code(it.mode);
        let sk = score_code(it.score_kind);
        let temp = it.soft_temp.max(1e-6);
        let gate64 = gate as f64;
        if it.mode == IntvMode::OrthGate {
            kern::slot_mix_forward_intv_score(
                score,
                out1,
                delta,
                z,
                gate64,
                rows as i64,
                nki,
                di,
                sk,
            )
            .on(be, be.cfg_warps(rows)?)?;
            let npad = (b * h * chunk).next_power_of_two();
            let sort = self.sort.ensure(be, nchunks * npad)?;
            let clip = it.score_clip_pctl.filter(|c| *c > 0.0 && *c < 100.0);
            kern::slot_mix_forward_intv_thresholds(
                thr,
                sort,
                score,
                (b * h) as i64,
                ti,
                ci,
                npad as i64,
                clip.is_some() as i32,
                clip.unwrap_or(0.0) / 100.0,
                (it.tau_kind == TauKind::Pctl) as i32,
                it.tau,
                it.tau_pctl / 100.0,
            )
            .on(
                be,
                LaunchConfig {
                    grid_dim: (nchunks as u32, 1, 1),
                    block_dim: (512, 1, 1),
                    shared_mem_bytes: 0,
                },
            )?;
        }
        kern::slot_mix_forward_intv_apply(
            out_h,
            stats,
            out1,
            delta,
            score,
            thr,
            hmask,
            gate64,
            gate,
            rows as i64,
            hi,
            ti,
            ci,
            di,
            mode,
            it.soft_mask as i32,
            temp,
            it.beta,
            it.par_beta,
        )
        .on(be, be.cfg_warps(rows)?)?;
        kern::slot_mix_forward_intv_logs(logs, stats, i32_of("B", b)?, hi, ti, ci).on(
            be,
            LaunchConfig {
                grid_dim: (nchunks as u32, (h + 1) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;
        self.last = Some((it.clone(), dm, chunk, gate));
        Ok(())
    }

    /// Backward of the last forward: dout1 [B,H,T,d] += d out1 beyond the identity path (it may
    /// be `dout_h` itself, updated in place), ddelta += d delta (without gate), dz += d z,
    /// dgate[0] = d loss / d gate (the softplus'd gate, f64, written). `dout_h` is d out_h.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        dout_h: Dv<f32>,
        dout1: Dv<f32>,
        ddelta: Dv<f32>,
        dz: Dv<f32>,
        dgate: Dv<f64>,
        delta: Dv<f32>,
        z: Dv<f32>,
    ) -> Result<()> {
        let (it, dm, chunk, gate) = self
            .last
            .as_ref()
            .ok_or_else(|| AsaError::Other("intervene backward before its forward".into()))?;
        let (b, h, t, nk, d) = (dm.b, dm.h, dm.t, dm.k, dm.d);
        let rows = b * h * t;
        for (name, x, n) in [
            ("dout_h", dout_h, rows * d),
            ("dout1", dout1, rows * d),
            ("ddelta", ddelta, rows * d),
            ("dz", dz, rows * nk),
            ("delta", delta, rows * d),
            ("z", z, rows * nk),
        ] {
            assert_eq!(x.len, n, "intervene backward: {name} shape");
        }
        assert_eq!(dgate.len, 1, "intervene backward: dgate shape");
        let hmask = match &self.hmask {
            Some((v, s)) if it.mode != IntvMode::Off && it.head_mask.is_some() => {
                s.dv().sub(0, v.len())
            }
            _ => Dv::null(),
        };
        let part = be.temp::<f64>(rows)?;
        kern::slot_mix_backward_intv(
            dout1,
            ddelta,
            dz,
            part.dv(),
            dout_h,
            self.out1.dv(),
            delta,
            z,
            self.score.dv(),
            self.thr.dv(),
            hmask,
            *gate as f64,
            rows as i64,
            h as i32,
            t as i32,
            *chunk as i32,
            nk as i32,
            d as i32,
            mode_code(it.mode),
            score_code(it.score_kind),
            it.soft_mask as i32,
            it.soft_temp.max(1e-6),
            it.beta,
            it.par_beta,
        )
        .on(be, be.cfg_warps(rows)?)?;
        be.sum_f64(dgate, part.dv().sub(0, rows.max(1)), false)
    }

    /// The info tensors of the last forward that the GPU path produces (`AsaLayer::info` keys):
    /// the intervention logs (`alpha`, `score`, `mask`, `tau`, `out1_norm`, `dpar_norm`,
    /// `dorth_norm`, `head_mask`, `geom_*`, and the `intv_*` copies), `slotspace_gate`,
    /// `slotspace_delta_norm` (with the gate, as the intervene variant logs it) and `out1`.
    /// Empty before a forward. Downloads (synchronises).
    pub fn info<B: Backend>(&self, be: &B) -> Result<Info> {
        let Some((it, dm, chunk, gate)) = &self.last else {
            return Ok(Info::new());
        };
        let logs = be.download(self.logs.dv())?;
        let thr = be.download(self.thr.dv())?;
        let mut info = build_info(it, *dm, *chunk, *gate, &logs, &thr);
        info.insert(
            "out1".into(),
            (vec![dm.b, dm.h, dm.t, dm.d], be.download(self.out1.dv())?),
        );
        Ok(info)
    }
}

/// The info tensors from the log sums `logs` [nchunks,H+1,NLOG] and thresholds `thr`
/// [nchunks,3] of one forward, as `AsaLayer::intervene_forward` and `AsaLayer::info` build
/// them: per chunk means, averaged over the chunks.
fn build_info(
    it: &Intervention,
    dm: SlotDims,
    chunk: usize,
    gate: f32,
    logs: &[f64],
    thr: &[f64],
) -> Info {
    let mut info = Info::new();
    let (b, h, t) = (dm.b, dm.h, dm.t);
    let nchunks = t.div_ceil(chunk.max(1));
    let at = |c: usize, y: usize, q: usize| logs[(c * (h + 1) + y) * NLOG + q];
    let mut acc: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut count = 0usize;
    let mut dnorm = 0.0f64;
    for c in 0..nchunks {
        let c0 = c * chunk;
        let c1 = (c0 + chunk).min(t);
        let npos = (b * h * (c1 - c0)) as f64;
        let per_head = (b * (c1 - c0)) as f64;
        dnorm += at(c, 0, 6);
        let mut logs_c: Vec<(&str, Vec<f64>)> = Vec::new();
        if it.log_refine_geom {
            for (q, name) in [
                "geom_alpha_mean",
                "geom_alpha_abs",
                "geom_sign_pos",
                "geom_orth_frac",
                "geom_d_ratio",
                "geom_dpar_ratio",
            ]
            .into_iter()
            .enumerate()
            {
                logs_c.push((name, (0..h).map(|hi| at(c, hi + 1, q) / per_head).collect()));
            }
        }
        if it.mode != IntvMode::Off {
            logs_c.push(("alpha", vec![at(c, 0, 0) / npos]));
        }
        if it.mode == IntvMode::OrthGate {
            for (q, name) in [
                (1, "score"),
                (2, "mask"),
                (3, "out1_norm"),
                (4, "dpar_norm"),
                (5, "dorth_norm"),
            ] {
                logs_c.push((name, vec![at(c, 0, q) / npos]));
            }
            logs_c.push(("tau", vec![thr[c * 3]]));
        }
        if it.mode != IntvMode::Off {
            if let Some(hm) = &it.head_mask {
                logs_c.push(("head_mask", hm.iter().map(|&x| x as f64).collect()));
            }
        }
        if !logs_c.is_empty() {
            for (name, v) in logs_c {
                let e = acc
                    .entry(name.to_string())
                    .or_insert_with(|| vec![0.0; v.len()]);
                e.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
            }
            count += 1;
        }
    }
    if count > 0 {
        for (name, v) in acc {
            let shape = if v.len() == 1 && !name.starts_with("geom_") && name != "head_mask" {
                vec![]
            } else {
                vec![v.len()]
            };
            let data: Vec<f32> = v.iter().map(|x| (x / count as f64) as f32).collect();
            info.insert(name, (shape, data));
        }
        for (src, dst) in [
            ("score", "intv_score_mean"),
            ("mask", "intv_mask_mean"),
            ("tau", "intv_tau"),
            ("alpha", "intv_alpha_mean"),
            ("out1_norm", "intv_out1_norm_mean"),
            ("dpar_norm", "intv_dpar_norm_mean"),
            ("dorth_norm", "intv_dorth_norm_mean"),
        ] {
            if let Some(v) = info.get(src).cloned() {
                info.insert(dst.to_string(), v);
            }
        }
    }
    let rows = (b * h * t).max(1);
    info.insert("slotspace_gate".into(), (vec![], vec![gate]));
    info.insert(
        "slotspace_delta_norm".into(),
        (vec![], vec![(dnorm / rows as f64) as f32]),
    );
    info
}
