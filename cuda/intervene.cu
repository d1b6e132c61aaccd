// Intervene variant of the ASA layer (`AddressedStateAttentionIntervene`): per position the refine
// delta (gate * delta) is split against the base read out1 into a parallel and an orthogonal
// part and recombined per `_intv_mode`, with per-write-chunk percentile thresholds for
// `orth_gate`.
//
// CPU twin: `AsaLayer::intervene_forward` / `AsaLayer::intervene_backward` and `PosGeom::{new,
// apply, vjp}` in src/model/layer.rs, mirrored step by step in f64. The kernels are named
// `slot_mix_{forward,backward}_intv_*` because the intervention acts on the outputs of the two
// slot mixes (out1 = sum_k rw * state, delta = sum_k sw * state) and the twin table of
// tests/cuda_compile.rs only knows the ops of backend::cpu.
//
// Shapes: rows R = B*H*T in [B,H,T] order (row = (b*H + h)*T + t); out1, delta, dout: [R,d];
// z: [R,K] (the slotspace logits); score: [R] f64; stats: [R,INTV_NSTAT] f64; thr: [nchunks,3]
// f64 = (tau, smax, has_smax); head_mask: null or [H] f32.
// Codes: mode 0 off, 1 delta_par, 2 delta_orth, 3 delta_par_plus_orth, 4 orth_gate;
// score kind 0 orth_ratio, 1 orth_frac, 2 alpha_abs, 3 slot_peaked.
// Deterministic: warp reductions in a fixed shuffle order, block sums in a fixed tree, a bitonic
// sort per chunk; no atomics.

#include "common.cuh"

#define INTV_EPS 1e-8
#define INTV_NSTAT 8 /* alpha, on, dn, p_norm, r_norm, score, mask, |gate*delta| (f32 product) */
#define INTV_NLOG 7  /* per (chunk, slice) sums, see slot_mix_forward_intv_logs */

__device__ __forceinline__ double intv_neg_inf() { return __longlong_as_double(0xfff0000000000000LL); }
__device__ __forceinline__ double intv_pos_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

__device__ __forceinline__ double intv_warp_max_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(ASA_FULL_MASK, v, o));
    return __shfl_sync(ASA_FULL_MASK, v, 0);
}

// Geometry of one position (`PosGeom::new` without the score): lane-local o[i], dl[i] for
// j = lane + 32*i (0 beyond d), and the warp-uniform scalars.
struct IntvGeo {
    double alpha, n2, oo, dd, on, dn, pn, rn;
};

__device__ __forceinline__ IntvGeo intv_geom(double* o, double* dl, const float* orow, const float* drow,
                                             double gate, int d, int lane) {
    IntvGeo g;
    double oo = 0.0, dot = 0.0, dd = 0.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXJ; ++i) {
        int j = lane + 32 * i;
        if (j < d) {
            o[i] = (double)orow[j];
            dl[i] = gate * (double)drow[j];
            oo += o[i] * o[i];
            dot += o[i] * dl[i];
            dd += dl[i] * dl[i];
        } else {
            o[i] = 0.0;
            dl[i] = 0.0;
        }
    }
    warp_sum3_d(oo, dot, dd);
    g.oo = oo;
    g.dd = dd;
    g.n2 = fmax(oo, INTV_EPS);
    g.alpha = dot / g.n2;
    double pp = 0.0, rr = 0.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXJ; ++i) {
        int j = lane + 32 * i;
        if (j < d) {
            double p = g.alpha * o[i];
            double r = dl[i] - p;
            pp += p * p;
            rr += r * r;
        }
    }
    warp_sum2_d(pp, rr);
    g.on = fmax(sqrt(oo), INTV_EPS);
    g.dn = fmax(sqrt(dd), INTV_EPS);
    g.pn = sqrt(pp);
    g.rn = sqrt(rr);
    return g;
}

// Softmax statistics of a z row (`softmax64`): max and sum of exp(z - max), warp-uniform.
__device__ __forceinline__ void intv_softmax_stats(const float* z, int nk, int lane, double* mx, double* se) {
    double m = intv_neg_inf();
    for (int s = lane; s < nk; s += 32) m = fmax(m, (double)z[s]);
    m = intv_warp_max_d(m);
    double e = 0.0;
    for (int s = lane; s < nk; s += 32) e += exp((double)z[s] - m);
    *mx = m;
    *se = warp_sum_d(e);
}

// score_raw of `PosGeom::new` (warp-uniform).
__device__ __forceinline__ double intv_score_raw(const IntvGeo& g, const float* z, int nk, int sk, int lane) {
    if (sk == 0) return g.rn / g.on;
    if (sk == 1) return g.rn / g.dn;
    if (sk == 2) return fabs(g.alpha);
    double mx, se;
    intv_softmax_stats(z, nk, lane, &mx, &se);
    double hq = 0.0;
    for (int s = lane; s < nk; s += 32) {
        double q = fmax(exp((double)z[s] - mx) / se, 1e-8);
        hq += q * log(q);
    }
    double hh = -warp_sum_d(hq);
    return 1.0 - hh / fmax(log((double)nk), 1e-8);
}

// `PosGeom::gate_mask`: the clipped score and the (soft or hard) mask.
__device__ __forceinline__ void intv_gate_mask(double score_raw, const double* thr, int soft, double temp,
                                               double* score, double* mask) {
    double tau = thr[0];
    double s = thr[2] != 0.0 ? fmin(score_raw, thr[1]) : score_raw;
    *score = s;
    *mask = soft ? 1.0 / (1.0 + exp(-((s - tau) / temp))) : (s > tau ? 1.0 : 0.0);
}

// score_raw [R] of every position (orth_gate's threshold input). One warp per row.
// twin: model::layer::AsaLayer::intervene_forward
extern "C" __global__ void slot_mix_forward_intv_score(double* score, const float* out1, const float* delta,
                                                       const float* z, double gate, i64 rows, int nk, int d,
                                                       int sk) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    double o[ASA_MAXJ], dl[ASA_MAXJ];
    IntvGeo g = intv_geom(o, dl, out1 + row * d, delta + row * d, gate, d, lane);
    double s = intv_score_raw(g, z + row * nk, nk, sk, lane);
    if (lane == 0) score[row] = s;
}

// torch.quantile (linear interpolation) of the ascending `v[0..n)`, optionally of min(v, smax)
// (clipping is monotone, so the clipped values stay sorted).
__device__ double intv_quantile(const double* v, i64 n, double q, int clip, double smax) {
    if (n <= 0) return 0.0;
    double qq = fmin(fmax(q, 0.0), 1.0);
    double pos = qq * (double)(n - 1);
    i64 lo = (i64)floor(pos);
    if (lo < 0) lo = 0;
    if (lo > n - 1) lo = n - 1;
    i64 hi = lo + 1 < n - 1 ? lo + 1 : n - 1;
    double a = v[lo], b = v[hi];
    if (clip) {
        a = fmin(a, smax);
        b = fmin(b, smax);
    }
    return a + (b - a) * (pos - (double)lo);
}

// Per write chunk c (one block each): gathers score[(bh, t)] for t in [c*chunk, min(T, (c+1)*chunk))
// into sort[c*npad ..], pads to a power of two with +inf, sorts ascending (bitonic, in place,
// block-synchronised) and writes thr[c] = (tau, smax, has_smax):
// smax = quantile(scores, clip_q) when has_clip, tau = tau_abs (tau_pctl == 0) or
// quantile(min(scores, smax), tau_q). `intervene_forward`'s threshold step.
// twin: model::layer::AsaLayer::intervene_forward
extern "C" __global__ void slot_mix_forward_intv_thresholds(double* thr, double* sort, const double* score,
                                                            i64 bh, int t, int chunk, i64 npad, int has_clip,
                                                            double clip_q, int tau_pctl, double tau_abs,
                                                            double tau_q) {
    int c = blockIdx.x;
    int c0 = c * chunk;
    if (c0 >= t) return;
    int c1 = c0 + chunk < t ? c0 + chunk : t;
    i64 len = c1 - c0;
    i64 n = bh * len;
    i64 np = 1;
    while (np < n) np <<= 1;
    if (np > npad) return;  // the host sizes npad for the largest chunk
    double* v = sort + (i64)c * npad;
    for (i64 i = threadIdx.x; i < np; i += blockDim.x) {
        if (i < n) {
            i64 r = i / len, ti = c0 + i % len;
            v[i] = score[r * t + ti];
        } else {
            v[i] = intv_pos_inf();
        }
    }
    __syncthreads();
    for (i64 k = 2; k <= np; k <<= 1) {
        for (i64 j = k >> 1; j > 0; j >>= 1) {
            for (i64 i = threadIdx.x; i < np; i += blockDim.x) {
                i64 l = i ^ j;
                if (l > i) {
                    double a = v[i], b = v[l];
                    bool asc = (i & k) == 0;
                    if (asc ? (a > b) : (a < b)) {
                        v[i] = b;
                        v[l] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) {
        double smax = 0.0;
        if (has_clip) smax = intv_quantile(v, n, clip_q, 0, 0.0);
        double tau = tau_pctl ? intv_quantile(v, n, tau_q, has_clip, smax) : tau_abs;
        thr[(i64)c * 3 + 0] = tau;
        thr[(i64)c * 3 + 1] = smax;
        thr[(i64)c * 3 + 2] = has_clip ? 1.0 : 0.0;
    }
}

// out_h [R,d] = out1 + delta_mod (f32 add of the f64 result, `PosGeom::apply`); stats [R,8] for
// the logs. score: the raw scores of slot_mix_forward_intv_score (read for mode 4 only); thr:
// per chunk (mode 4 only). One warp per row. out_h must not alias out1.
// twin: model::layer::AsaLayer::intervene_forward
extern "C" __global__ void slot_mix_forward_intv_apply(float* out_h, double* stats, const float* out1,
                                                       const float* delta, const double* score,
                                                       const double* thr, const float* head_mask, double gate,
                                                       float gate_f, i64 rows, int h, int t, int chunk, int d,
                                                       int mode, int soft, double temp, double beta,
                                                       double par_beta) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int ti = (int)(row % t);
    int hi = (int)((row / t) % h);
    const float* orow = out1 + row * d;
    const float* drow = delta + row * d;
    double o[ASA_MAXJ], dl[ASA_MAXJ];
    IntvGeo g = intv_geom(o, dl, orow, drow, gate, d, lane);
    double sc = 0.0, mk = 0.0;
    if (mode == 4) intv_gate_mask(score[row], thr + (i64)(ti / chunk) * 3, soft, temp, &sc, &mk);
    bool hm_on = mode != 0 && head_mask != 0;
    double m = hm_on ? (double)head_mask[hi] : 1.0;
    double dg = 0.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXJ; ++i) {
        int j = lane + 32 * i;
        if (j < d) {
            double p = g.alpha * o[i];
            double r = dl[i] - p;
            double dlt = p + r;
            double y;
            switch (mode) {
                case 1: y = p; break;
                case 2: y = r; break;
                case 4: y = par_beta * p + beta * mk * r; break;
                default: y = dlt; break;
            }
            if (hm_on) y = m * y + (1.0 - m) * dlt;
            out_h[row * d + j] = orow[j] + (float)y;
            double xs = (double)(drow[j] * gate_f);
            dg += xs * xs;
        }
    }
    dg = warp_sum_d(dg);
    if (lane == 0) {
        double* st = stats + row * INTV_NSTAT;
        st[0] = g.alpha;
        st[1] = g.on;
        st[2] = g.dn;
        st[3] = g.pn;
        st[4] = g.rn;
        st[5] = sc;
        st[6] = mk;
        st[7] = sqrt(dg);
    }
}

// Log sums per (chunk c = blockIdx.x, slice y = blockIdx.y) into logs[(c*(H+1) + y)*7 + q],
// fixed-order block sums. y = 0: over every position of the chunk: alpha, score, mask, on,
// p_norm, r_norm, |gate*delta|. y = 1 + head: over that head's positions: alpha, |alpha|,
// alpha > 0, r_norm/dn, dn/on, p_norm/dn, 0 (the geometry logs). The host divides and averages
// over chunks as `intervene_forward` does.
// twin: model::layer::AsaLayer::intervene_forward
extern "C" __global__ void slot_mix_forward_intv_logs(double* logs, const double* stats, int b, int h, int t,
                                                      int chunk) {
    __shared__ double sh[32];
    int c = blockIdx.x, y = blockIdx.y;
    int c0 = c * chunk;
    if (c0 >= t || y > h) return;
    int c1 = c0 + chunk < t ? c0 + chunk : t;
    i64 len = c1 - c0;
    i64 n = y == 0 ? (i64)b * h * len : (i64)b * len;
    double a[INTV_NLOG];
#pragma unroll
    for (int q = 0; q < INTV_NLOG; ++q) a[q] = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        i64 r = i / len, ti = c0 + i % len;
        i64 row = y == 0 ? r * t + ti : (r * h + (y - 1)) * t + ti;
        const double* st = stats + row * INTV_NSTAT;
        double al = st[0], on = st[1], dn = st[2], pn = st[3], rn = st[4];
        if (y == 0) {
            a[0] += al;
            a[1] += st[5];
            a[2] += st[6];
            a[3] += on;
            a[4] += pn;
            a[5] += rn;
            a[6] += st[7];
        } else {
            a[0] += al;
            a[1] += fabs(al);
            a[2] += al > 0.0 ? 1.0 : 0.0;
            a[3] += rn / dn;
            a[4] += dn / on;
            a[5] += pn / dn;
        }
    }
    double* out = logs + ((i64)c * (h + 1) + y) * INTV_NLOG;
#pragma unroll
    for (int q = 0; q < INTV_NLOG; ++q) {
        double s = block_sum_d(a[q], sh);
        if (threadIdx.x == 0) out[q] = s;
    }
}

// Backward of the intervention (`PosGeom::vjp`), one warp per row, with the forward's raw scores
// and chunk thresholds: dout1 [R,d] += d out1 (beyond the identity path), ddelta [R,d] +=
// gate * d(gate*delta), dz [R,K] += d z (slot_peaked), dgate_part [R] = sum_j d(gate*delta)_j *
// delta_j (written; `sum_f64` finishes d gate). gy is d out_h; dout1 may alias gy (each warp
// reads its row of gy before writing it).
// twin: model::layer::AsaLayer::intervene_backward
extern "C" __global__ void slot_mix_backward_intv(float* dout1, float* ddelta, float* dz, double* dgate_part,
                                                  const float* gy_in, const float* out1, const float* delta,
                                                  const float* z, const double* score, const double* thr,
                                                  const float* head_mask, double gate, i64 rows, int h, int t,
                                                  int chunk, int nk, int d, int mode, int sk, int soft,
                                                  double temp, double beta, double par_beta) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int ti = (int)(row % t);
    int hi = (int)((row / t) % h);
    const float* drow = delta + row * d;
    double o[ASA_MAXJ], dl[ASA_MAXJ], gy[ASA_MAXJ], go[ASA_MAXJ], gdl[ASA_MAXJ], gp[ASA_MAXJ], gr[ASA_MAXJ];
    IntvGeo g = intv_geom(o, dl, out1 + row * d, drow, gate, d, lane);
    bool hm_on = mode != 0 && head_mask != 0;
    double hmv = hm_on ? (double)head_mask[hi] : 1.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXJ; ++i) {
        int j = lane + 32 * i;
        double gf = j < d ? (double)gy_in[row * d + j] : 0.0;
        gdl[i] = hm_on ? (1.0 - hmv) * gf : 0.0;
        gy[i] = hmv * gf;
        go[i] = 0.0;
        gp[i] = 0.0;
        gr[i] = 0.0;
    }
    __syncwarp();
    if (mode == 0 || mode == 3) {
        // y = p + r = delta: the identity on delta
#pragma unroll
        for (int i = 0; i < ASA_MAXJ; ++i) gdl[i] += gy[i];
    } else {
        double galpha = 0.0;
        if (mode == 1) {
#pragma unroll
            for (int i = 0; i < ASA_MAXJ; ++i) gp[i] = gy[i];
        } else if (mode == 2) {
#pragma unroll
            for (int i = 0; i < ASA_MAXJ; ++i) gr[i] = gy[i];
        } else {
            const double* th = thr + (i64)(ti / chunk) * 3;
            double sraw = score[row];
            double sc, mk;
            intv_gate_mask(sraw, th, soft, temp, &sc, &mk);
            double gm = 0.0;
#pragma unroll
            for (int i = 0; i < ASA_MAXJ; ++i) {
                gp[i] = par_beta * gy[i];
                gr[i] = beta * mk * gy[i];
                int j = lane + 32 * i;
                if (j < d) gm += gy[i] * (dl[i] - g.alpha * o[i]);
            }
            double gmask = beta * warp_sum_d(gm);
            bool clipped = th[2] != 0.0 && sraw > th[1];
            double gs = (soft && !clipped) ? gmask * mk * (1.0 - mk) / temp : 0.0;
            if (gs != 0.0) {
                double onraw = sqrt(g.oo);
                double dnraw = sqrt(g.dd);
                if (sk == 0 || sk == 1) {
                    double gn = sk == 0 ? gs / g.on : gs / g.dn;
                    if (g.rn > 0.0) {
#pragma unroll
                        for (int i = 0; i < ASA_MAXJ; ++i) {
                            int j = lane + 32 * i;
                            if (j < d) gr[i] += gn * (dl[i] - g.alpha * o[i]) / g.rn;
                        }
                    }
                    if (sk == 0 && onraw > INTV_EPS) {
                        double gon = -gs * g.rn / (g.on * g.on);
#pragma unroll
                        for (int i = 0; i < ASA_MAXJ; ++i) go[i] += gon * o[i] / onraw;
                    }
                    if (sk == 1 && dnraw > INTV_EPS) {
                        double gdn = -gs * g.rn / (g.dn * g.dn);
#pragma unroll
                        for (int i = 0; i < ASA_MAXJ; ++i) gdl[i] += gdn * dl[i] / dnraw;
                    }
                } else if (sk == 2) {
                    double al = g.alpha;
                    double sg = al != al ? al : (al > 0.0 ? 1.0 : (al < 0.0 ? -1.0 : 0.0));
                    galpha += gs * sg;
                } else {
                    const float* zr = z + row * nk;
                    double mx, se;
                    intv_softmax_stats(zr, nk, lane, &mx, &se);
                    double logk = fmax(log((double)nk), 1e-8);
                    double dot = 0.0;
                    for (int s = lane; s < nk; s += 32) {
                        double q = exp((double)zr[s] - mx) / se;
                        double gq = q >= 1e-8 ? gs / logk * (log(q) + 1.0) : 0.0;
                        dot += q * gq;
                    }
                    dot = warp_sum_d(dot);
                    for (int s = lane; s < nk; s += 32) {
                        double q = exp((double)zr[s] - mx) / se;
                        double gq = q >= 1e-8 ? gs / logk * (log(q) + 1.0) : 0.0;
                        dz[row * nk + s] = dz[row * nk + s] + (float)(q * (gq - dot));
                    }
                }
            }
        }
        // r = delta - p; p = alpha * o; alpha = (delta . o) / max(|o|^2, eps)
        double ga = 0.0;
#pragma unroll
        for (int i = 0; i < ASA_MAXJ; ++i) {
            gdl[i] += gr[i];
            gp[i] -= gr[i];
            ga += gp[i] * o[i];
        }
        galpha += warp_sum_d(ga);
#pragma unroll
        for (int i = 0; i < ASA_MAXJ; ++i) {
            go[i] += g.alpha * gp[i];
            gdl[i] += galpha * o[i] / g.n2;
            go[i] += galpha * dl[i] / g.n2;
            if (g.oo > INTV_EPS) go[i] -= 2.0 * galpha * g.alpha * o[i] / g.n2;
        }
    }
    double pg = 0.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXJ; ++i) {
        int j = lane + 32 * i;
        if (j < d) {
            dout1[row * d + j] = dout1[row * d + j] + (float)go[i];
            ddelta[row * d + j] = ddelta[row * d + j] + (float)(gate * gdl[i]);
            pg += gdl[i] * (double)drow[j];
        }
    }
    pg = warp_sum_d(pg);
    if (lane == 0) dgate_part[row] = pg;
}
