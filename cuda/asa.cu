// ASA ops, one kernel per op and direction, each the twin of the function of the same name in
// `src/backend/cpu/asa.rs` (a few ops have a second-phase kernel, `<op>_<part>`, where a
// deterministic reduction needs one).
//
// Layouts (row-major): per-head activations [B,H,T,d]; write logits and scan statistics
// [B,H,K,T]; read logits and weights [B,H,T,K]; slot state history [B,H,T,K,d].
// Where the CPU twin accumulates in f64 these kernels do too (dot products, the write scan and
// its backward, softmaxes, linear attention), so results agree with it to f32 rounding.
#include "common.cuh"

// ------------------------------------------------------------------------------------------------
// RoPE (the reference's layout: interleaved pairs, half-split angles). cos, sin: [T,D].

// out, inp: [N,T,D]. One thread per pair.
extern "C" __global__ void rope_forward(float* out, const float* inp, const float* cos_t,
                                        const float* sin_t, int n, int t, int d) {
    int half = d / 2;
    ASA_GRID_LOOP(i, (i64)n * t * half) {
        int p = (int)(i % half);
        i64 row = i / half;  // n*t + ti
        int ti = (int)(row % t);
        i64 o = row * d + 2 * p;
        const float* c = cos_t + (i64)ti * d;
        const float* s = sin_t + (i64)ti * d;
        float a = inp[o], b = inp[o + 1];
        out[o] = a * c[2 * p] - b * s[2 * p];
        out[o + 1] = b * c[2 * p + 1] + a * s[2 * p + 1];
    }
}

// dinp += J^T dout. dinp, dout: [N,T,D].
extern "C" __global__ void rope_backward(float* dinp, const float* dout, const float* cos_t,
                                         const float* sin_t, int n, int t, int d) {
    int half = d / 2;
    ASA_GRID_LOOP(i, (i64)n * t * half) {
        int p = (int)(i % half);
        i64 row = i / half;
        int ti = (int)(row % t);
        i64 o = row * d + 2 * p;
        const float* c = cos_t + (i64)ti * d;
        const float* s = sin_t + (i64)ti * d;
        float ga = dout[o], gb = dout[o + 1];
        dinp[o] = dinp[o] + (ga * c[2 * p] + gb * s[2 * p + 1]);
        dinp[o + 1] = dinp[o + 1] + (gb * c[2 * p + 1] - ga * s[2 * p]);
    }
}

// ------------------------------------------------------------------------------------------------
// head layout

// out: [B,H,T,d] <- inp: [B,T,H*d]
extern "C" __global__ void split_heads(float* out, const float* inp, int b, int t, int h, int d) {
    const int hd = h * d;
    // a block per row (b, t) of inp, threads along it: both sides move in runs of d floats
    for (i64 row = blockIdx.x; row < (i64)b * t; row += gridDim.x) {
        const i64 bi = row / t;
        const int ti = (int)(row - bi * t);
        for (int j = threadIdx.x; j < hd; j += blockDim.x) {
            const int hi = j / d, jj = j - hi * d;
            out[((bi * h + hi) * t + ti) * d + jj] = inp[row * hd + j];
        }
    }
}

// out: [B,T,H*d] += inp: [B,H,T,d] (merge_heads_acc of the CPU; merge when out is 0). A block
// per row (b, t) of out.
extern "C" __global__ void merge_heads(float* out, const float* inp, int b, int t, int h, int d) {
    const int hd = h * d;
    for (i64 row = blockIdx.x; row < (i64)b * t; row += gridDim.x) {
        const i64 bi = row / t;
        const int ti = (int)(row - bi * t);
        for (int j = threadIdx.x; j < hd; j += blockDim.x) {
            const int hi = j / d, jj = j - hi * d;
            const i64 o = row * hd + j;
            out[o] = out[o] + inp[((bi * h + hi) * t + ti) * d + jj];
        }
    }
}

// ------------------------------------------------------------------------------------------------
// F.normalize(x, dim=-1, eps=1e-8). out, inp: [rows,d]; norm: [rows]. One warp per row.

extern "C" __global__ void l2normalize_forward(float* out, float* norm, const float* inp, int rows, int d) {
    int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* x = inp + (i64)row * d;
    double s = 0.0;
    for (int j = lane; j < d; j += 32) s += (double)x[j] * (double)x[j];
    double nn = sqrt(warp_sum_d(s));
    double den = fmax(nn, 1e-8);
    for (int j = lane; j < d; j += 32) out[(i64)row * d + j] = (float)((double)x[j] / den);
    if (lane == 0) norm[row] = (float)nn;
}

// dinp += (g - y (y.g)) / |x| when |x| > 1e-8, else g / 1e-8.
extern "C" __global__ void l2normalize_backward(float* dinp, const float* dout, const float* out,
                                                const float* norm, int rows, int d) {
    int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* g = dout + (i64)row * d;
    const float* y = out + (i64)row * d;
    float* dx = dinp + (i64)row * d;
    double n = (double)norm[row];
    if (n > 1e-8) {
        double yg = 0.0;
        for (int j = lane; j < d; j += 32) yg += (double)y[j] * (double)g[j];
        yg = warp_sum_d(yg);
        for (int j = lane; j < d; j += 32) dx[j] = dx[j] + (float)(((double)g[j] - (double)y[j] * yg) / n);
    } else {
        for (int j = lane; j < d; j += 32) dx[j] = dx[j] + (float)((double)g[j] / 1e-8);
    }
}

// ------------------------------------------------------------------------------------------------
// write logits

// raw = slot_keys . k / sqrt(d) (f64 dot); wl = raw / wtemp + bias_h[h] * t, -inf where the
// token is masked. raw, wl: [B,H,K,T]; keys: [H,K,d]; k: [B,H,T,d]; bias_h: nullable [H];
// valid: nullable [B,T] u8. One block per (b, h, tile of `tile` positions): the tile's key rows
// are staged in shared memory (row stride d + 1, so a warp's threads, one position each, read
// different banks), then one thread per (slot, position) output, positions fastest (the slot
// key is a broadcast read, the stores coalesce). Dynamic shared memory: tile * (d + 1) floats.
extern "C" __global__ void write_logits_forward(float* raw, float* wl, const float* __restrict__ keys,
                                                const float* __restrict__ k, float wtemp,
                                                const float* __restrict__ bias_h,
                                                const unsigned char* __restrict__ valid, int b, int h, int t,
                                                int nk, int d, int tile) {
    ASA_DYN_SHARED(float, wl_smem);
    const int ntile = (t + tile - 1) / tile;
    const i64 bh = blockIdx.x / ntile;
    const int t0 = (int)(blockIdx.x % ntile) * tile, tn = min(tile, t - t0);
    const int hi = (int)(bh % h);
    const i64 bi = bh / h;
    const int ld = d + 1;
    for (int i = threadIdx.x; i < tn * d; i += blockDim.x) {
        int r = i / d, j = i - r * d;
        wl_smem[r * ld + j] = k[(bh * t + t0 + r) * d + j];
    }
    __syncthreads();
    const double scale = 1.0 / sqrt((double)d);
    for (int o = threadIdx.x; o < nk * tile; o += blockDim.x) {
        const int s = o / tile, r = o - s * tile;
        if (r >= tn) continue;
        const float* key = keys + ((i64)hi * nk + s) * d;
        const float* x = wl_smem + r * ld;
        double dot = 0.0;
        for (int j = 0; j < d; ++j) dot += (double)key[j] * (double)x[j];
        const int ti = t0 + r;
        const i64 i = (bh * nk + s) * t + ti;
        float rv = (float)(dot * scale);
        raw[i] = rv;
        float v = rv / wtemp;
        if (bias_h) v = v + bias_h[hi] * (float)ti;
        if (valid && !valid[bi * t + ti]) v = ASA_NEG_INF;
        wl[i] = v;
    }
}

// dk [B,H,T,d] += sum_s dwl/wtemp/sqrt(d) * key[s,:] over unmasked positions (terms added in f32
// in slot order, as the CPU twin). One thread per (b,h,t,j).
extern "C" __global__ void write_logits_backward(float* dk, const float* dwl, const float* keys,
                                                 float wtemp, const unsigned char* valid,
                                                 int b, int h, int t, int nk, int d) {
    double scale = 1.0 / sqrt((double)d);
    double gscale = scale / (double)wtemp;  // d(raw) = d(wl) / wtemp / sqrt(d)
    ASA_GRID_LOOP(i, (i64)b * h * t * d) {
        int j = (int)(i % d);
        i64 r = i / d;
        int ti = (int)(r % t);
        i64 bh = r / t;
        int hi = (int)(bh % h);
        i64 bi = bh / h;
        if (valid && !valid[bi * t + ti]) continue;
        float acc = dk[i];
        for (int s = 0; s < nk; ++s) {
            double gw = (double)dwl[(bh * nk + s) * t + ti];
            if (gw == 0.0) continue;
            double graw = gw * gscale;
            acc = acc + (float)(graw * (double)keys[((i64)hi * nk + s) * d + j]);
        }
        dk[i] = acc;
    }
}

// Per-(b,h) partial gradients of the slot keys and of the ALiBi bias:
// pkeys[b,h,s,j] = sum_t dwl/wtemp/sqrt(d) * k[t,j]; pbias[b,h,s] = sum_t dwl * t (both f64,
// unmasked positions, time order). One thread per (b,h,s,j); pbias nullable.
// Finished by `sum_batch_add` (keys) and `alibi_grad` (bias).
extern "C" __global__ void write_logits_backward_keys(double* pkeys, double* pbias, const float* dwl,
                                                      const float* k, float wtemp, const unsigned char* valid,
                                                      int b, int h, int t, int nk, int d) {
    double scale = 1.0 / sqrt((double)d);
    double gscale = scale / (double)wtemp;
    ASA_GRID_LOOP(i, (i64)b * h * nk * d) {
        int j = (int)(i % d);
        i64 r = i / d;  // bh*nk + s
        i64 bh = r / nk;
        i64 bi = bh / h;
        const float* g = dwl + r * t;
        const float* kj = k + bh * t * d + j;
        double acc = 0.0, accb = 0.0;
        // four positions at a time: their loads first (independent, in flight together), then
        // the sums in time order
        for (int t0 = 0; t0 < t; t0 += 4) {
            float gv[4], kv[4];
            bool live[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int ti = t0 + q;
                live[q] = ti < t && (!valid || valid[bi * t + ti]);
                gv[q] = live[q] ? g[ti] : 0.0f;
                kv[q] = live[q] ? kj[(i64)ti * d] : 0.0f;
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                double gw = (double)gv[q];
                if (!live[q] || gw == 0.0) continue;
                accb += gw * (double)(t0 + q);
                acc += gw * gscale * (double)kv[q];
            }
        }
        pkeys[i] = acc;
        if (pbias && j == 0) pbias[r] = accb;
    }
}

// dst [H*X] += sum over b of (f32) part[b, H*X], b in order (the CPU's per-(b,h) partials).
extern "C" __global__ void sum_batch_add(float* dst, const double* part, int b, i64 hx) {
    ASA_GRID_LOOP(i, hx) {
        float acc = dst[i];
        for (int bb = 0; bb < b; ++bb) acc = acc + (float)part[(i64)bb * hx + i];
        dst[i] = acc;
    }
}

// d(alibi strength param) += (f32)(factor * sum_h slope[h] * sum_{b,s} pbias[b,h,s]);
// factor = sigmoid(raw) (the softplus chain). pbias: [B,H,K]. One thread.
// The write logits' ALiBi bias per head (CPU twin: `alibi_bias`): bias[h] = slopes[h] * strength,
// strength = (float)(softplus(raw[0]) + min_strength) for a learned strength (raw on the device,
// so that no upload follows an optimizer step), else (float)init. One thread per head.
extern "C" __global__ void alibi_bias(float* bias, const float* slopes, const float* raw, double init,
                                      double min_strength, int h) {
    int hi = blockIdx.x * blockDim.x + threadIdx.x;
    if (hi >= h) return;
    float strength;
    if (raw) {
        double x = (double)raw[0];
        strength = (float)((x > 20.0 ? x : log1p(exp(x))) + min_strength);
    } else {
        strength = (float)init;
    }
    bias[hi] = slopes[hi] * strength;
}

extern "C" __global__ void alibi_grad(float* dst, const double* pbias, const float* slopes, double factor,
                                      int b, int h, int nk) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double ds = 0.0;
    for (int hi = 0; hi < h; ++hi) {
        double acc = 0.0;
        for (int bi = 0; bi < b; ++bi)
            for (int s = 0; s < nk; ++s) acc += pbias[((i64)bi * h + hi) * nk + s];
        ds += acc * (double)slopes[hi];
    }
    dst[0] = dst[0] + (float)(ds * factor);
}

// ------------------------------------------------------------------------------------------------
// the write scan (the reference's chunked running-max softmax; see slot_scan_forward in
// src/backend/cpu/asa.rs for the math). One warp per (b,h,s), lanes over d, f64 accumulators.

// state: [B,H,T,K,d]; den, rmax: [B,H,K,T]; wl: [B,H,K,T]; v: [B,H,T,d].
extern "C" __global__ void slot_scan_forward(float* state, float* den, float* rmax, const float* wl,
                                             const float* v, int chunk, int nbh, int t, int nk, int d) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= nbh * nk) return;
    int bh = warp / nk, s = warp % nk;
    const float* ws = wl + ((i64)bh * nk + s) * t;
    const float* vv = v + (i64)bh * t * d;
    float* st = state + (i64)bh * t * nk * d;
    float* dn = den + ((i64)bh * nk + s) * t;
    float* rm = rmax + ((i64)bh * nk + s) * t;
    double num[ASA_MAXJ], num_prev[ASA_MAXJ], add_num[ASA_MAXJ];
#pragma unroll
    for (int q = 0; q < ASA_MAXJ; ++q) num[q] = 0.0;
    double dsum = 0.0;
    float m_prev = ASA_NEG_INF;
    for (int c0 = 0; c0 < t; c0 += chunk) {
        int c1 = min(c0 + chunk, t);
        double den_prev = dsum;
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) {
            num_prev[q] = num[q];
            add_num[q] = 0.0;
        }
        double add_den = 0.0;
        float cm = ASA_NEG_INF, r = ASA_NEG_INF;
        // loads of step ti+1 are issued while step ti computes
        float w_next = ws[c0];
        float v_next[ASA_MAXJ];
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) {
            int j = lane + 32 * q;
            v_next[q] = j < d ? vv[(i64)c0 * d + j] : 0.0f;
        }
        for (int ti = c0; ti < c1; ++ti) {
            float w = w_next;
            float vt[ASA_MAXJ];
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) vt[q] = v_next[q];
            if (ti + 1 < c1) {
                w_next = ws[ti + 1];
#pragma unroll
                for (int q = 0; q < ASA_MAXJ; ++q) {
                    int j = lane + 32 * q;
                    if (j < d) v_next[q] = vv[(i64)(ti + 1) * d + j];
                }
            }
            cm = (w >= cm) ? w : cm;
            r = (m_prev >= cm) ? m_prev : cm;
            double scale = asa_finite(m_prev) ? exp((double)(m_prev - r)) : 0.0;
            double e = asa_finite(r) ? exp((double)(w - r)) : 0.0;
            add_den += e;
            dsum = den_prev * scale + add_den;
            double inv = 1.0 / fmax(dsum, (double)ASA_DEN_EPS);
            float* o = st + ((i64)ti * nk + s) * d;
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) {
                int j = lane + 32 * q;
                if (j < d) {
                    add_num[q] += e * (double)vt[q];
                    num[q] = num_prev[q] * scale + add_num[q];
                    o[j] = (float)(num[q] * inv);
                }
            }
            if (lane == 0) {
                rm[ti] = r;
                dn[ti] = (float)dsum;
            }
        }
        m_prev = r;  // rmax at the chunk's last position
    }
}

// Backward of the write scan, first phase: dwl [B,H,K,T] += ..., including the gradient
// through the running max (cummax routes to the last position holding the max; `maximum`
// splits exact ties in half). dstate [B,H,T,K,d] is CONSUMED: on return it holds, per (t,s),
// the gradient with respect to the scan's numerator at t (a_t of the CPU twin), which
// `slot_scan_backward_dv` turns into dv. cm, cidx: scratch [B,H,K,T]. One warp per (b,h,s).
extern "C" __global__ void slot_scan_backward(float* dwl, float* dstate, float* cm_buf, int* cidx_buf,
                                              const float* state, const float* den, const float* rmax,
                                              const float* wl, const float* v, int chunk, int nbh, int t,
                                              int nk, int d) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= nbh * nk) return;
    int bh = warp / nk, s = warp % nk;
    i64 row = (i64)bh * nk + s;
    const float* ws = wl + row * t;
    const float* dns = den + row * t;
    const float* rms = rmax + row * t;
    float* gws = dwl + row * t;
    float* cmr = cm_buf + row * t;
    int* cir = cidx_buf + row * t;
    const float* vv = v + (i64)bh * t * d;
    const float* st = state + (i64)bh * t * nk * d;
    float* gs = dstate + (i64)bh * t * nk * d;

    double dnum_c[ASA_MAXJ], num_prev[ASA_MAXJ], a[ASA_MAXJ], gn[ASA_MAXJ], dnum_prev[ASA_MAXJ];
#pragma unroll
    for (int q = 0; q < ASA_MAXJ; ++q) dnum_c[q] = 0.0;
    double dden_c = 0.0, dm_c = 0.0;
    int nchunks = (t + chunk - 1) / chunk;
    for (int ci = nchunks - 1; ci >= 0; --ci) {
        int c0 = ci * chunk;
        int c1 = min(c0 + chunk, t);
        float m_prev = ASA_NEG_INF;
        double den_prev = 0.0;
        if (c0 > 0) {
            m_prev = rms[c0 - 1];
            den_prev = (double)dns[c0 - 1];
            double dd = (double)fmaxf(dns[c0 - 1], ASA_DEN_EPS);
            const float* sp = st + ((i64)(c0 - 1) * nk + s) * d;
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) {
                int j = lane + 32 * q;
                num_prev[q] = j < d ? (double)sp[j] * dd : 0.0;
            }
        } else {
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) num_prev[q] = 0.0;
        }
        // chunk-local cummax and the index it routes to (the last position holding the max):
        // a warp scan over tiles of 32 positions, "later wins on >=" (the CPU's `w >= c` rule)
        float carry_v = ASA_NEG_INF;
        int carry_i = c0;
        for (int t0 = c0; t0 < c1; t0 += 32) {
            int ti = t0 + lane;
            float val = ti < c1 ? ws[ti] : ASA_NEG_INF;
            int idx = ti;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                float ov = __shfl_up_sync(ASA_FULL_MASK, val, o);
                int oi = __shfl_up_sync(ASA_FULL_MASK, idx, o);
                if (lane >= o && !(val >= ov)) {
                    val = ov;
                    idx = oi;
                }
            }
            if (!(val >= carry_v)) {
                val = carry_v;
                idx = carry_i;
            }
            if (ti < c1) {
                cmr[ti] = val;
                cir[ti] = idx;
            }
            int last = min(31, c1 - 1 - t0);
            carry_v = __shfl_sync(ASA_FULL_MASK, val, last);
            carry_i = __shfl_sync(ASA_FULL_MASK, idx, last);
        }
        __syncwarp();
        double bsum = 0.0, dden_prev = 0.0, dm_prev = 0.0;
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) {
            a[q] = 0.0;
            dnum_prev[q] = 0.0;
        }
        // the running-max gradient routed to position pend_pos (<= ti), added when the reverse
        // walk reaches it (the CPU adds each term to dwl[idx] at once; same sum)
        double pend = 0.0;
        int pend_pos = -1;
        // loads of step ti-1 are issued while step ti computes
        float n_den = dns[c1 - 1], n_r = rms[c1 - 1], n_w = ws[c1 - 1], n_cm = cmr[c1 - 1];
        int n_ci = cir[c1 - 1];
        float n_gw = gws[c1 - 1];
        float n_g[ASA_MAXJ], n_sv[ASA_MAXJ], n_v[ASA_MAXJ];
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) {
            int j = lane + 32 * q;
            bool in = j < d;
            n_g[q] = in ? gs[((i64)(c1 - 1) * nk + s) * d + j] : 0.0f;
            n_sv[q] = in ? st[((i64)(c1 - 1) * nk + s) * d + j] : 0.0f;
            n_v[q] = in ? vv[(i64)(c1 - 1) * d + j] : 0.0f;
        }
        for (int ti = c1 - 1; ti >= c0; --ti) {
            float den_t = n_den, r = n_r, wt = n_w, cmt = n_cm, gw = n_gw;
            int idx = n_ci;
            float cg[ASA_MAXJ], csv[ASA_MAXJ], cv[ASA_MAXJ];
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) {
                cg[q] = n_g[q];
                csv[q] = n_sv[q];
                cv[q] = n_v[q];
            }
            if (ti - 1 >= c0) {
                int tn = ti - 1;
                n_den = dns[tn];
                n_r = rms[tn];
                n_w = ws[tn];
                n_cm = cmr[tn];
                n_ci = cir[tn];
                n_gw = gws[tn];
#pragma unroll
                for (int q = 0; q < ASA_MAXJ; ++q) {
                    int j = lane + 32 * q;
                    if (j < d) {
                        n_g[q] = gs[((i64)tn * nk + s) * d + j];
                        n_sv[q] = st[((i64)tn * nk + s) * d + j];
                        n_v[q] = vv[(i64)tn * d + j];
                    }
                }
            }
            double dd = (double)fmaxf(den_t, ASA_DEN_EPS);
            double inv = 1.0 / dd;  // g / dd as a product (one division per step)
            float* g = gs + ((i64)ti * nk + s) * d;
            bool last = ti == c1 - 1;
            // per-lane partials of the three dot products of this step, reduced together
            double gsum = 0.0, dvp = 0.0, dsp = 0.0;
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) {
                int j = lane + 32 * q;
                gn[q] = j < d ? (double)cg[q] * inv : 0.0;
                gsum += (double)cg[q] * (double)csv[q];  // zero beyond d
                if (last) gn[q] += dnum_c[q];
                a[q] += gn[q];
                dvp += (double)cv[q] * a[q];
                if (j < d) g[j] = (float)a[q];  // a_t replaces dL/dstate_t (phase 2 forms dv)
                dsp += num_prev[q] * gn[q];     // zero beyond d
            }
            warp_sum3_d(gsum, dvp, dsp);
            double gd = den_t >= ASA_DEN_EPS ? -gsum / dd : 0.0;
            double dr = 0.0;
            if (last) {
                gd += dden_c;
                dr += dm_c;
            }
            bsum += gd;
            if (asa_finite(r)) {
                double e = exp((double)(wt - r));
                double de = bsum + dvp;
                if (asa_finite(wt)) gw = gw + (float)(e * de);
                dr -= e * de;
            }
            if (asa_finite(m_prev)) {
                double scale = exp((double)(m_prev - r));
#pragma unroll
                for (int q = 0; q < ASA_MAXJ; ++q) dnum_prev[q] += scale * gn[q];
                double dscale = den_prev * gd + dsp;
                dden_prev += scale * gd;
                dm_prev += scale * dscale;
                dr -= scale * dscale;
            }
            double to_cm;
            if (m_prev > cmt) {
                dm_prev += dr;
                to_cm = 0.0;
            } else if (cmt > m_prev) {
                to_cm = dr;
            } else {
                dm_prev += 0.5 * dr;
                to_cm = 0.5 * dr;
            }
            // ws[idx] == cmt (idx holds the chunk's running max)
            if (idx != pend_pos) {
                pend_pos = idx;
                pend = 0.0;
            }
            if (to_cm != 0.0 && asa_finite(cmt)) pend += to_cm;
            if (ti == pend_pos) {
                gw = gw + (float)pend;
                pend = 0.0;
            }
            if (lane == 0) gws[ti] = gw;
        }
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) dnum_c[q] = dnum_prev[q];
        dden_c = dden_prev;
        dm_c = dm_prev;
    }
}

// Backward of the write scan, second phase: dv [B,H,T,d] += sum_s e(s,t) * a(s,t) in slot order,
// e = exp(wl - rmax) (0 where rmax is -inf); a from `slot_scan_backward`. One thread per (b,h,t,j).
extern "C" __global__ void slot_scan_backward_dv(float* dv, const float* a, const float* wl,
                                                 const float* rmax, int nbh, int t, int nk, int d) {
    ASA_GRID_LOOP(i, (i64)nbh * t * d) {
        int j = (int)(i % d);
        i64 r = i / d;
        int ti = (int)(r % t);
        i64 bh = r / t;
        float acc = dv[i];
        for (int s = 0; s < nk; ++s) {
            i64 si = (bh * nk + s) * t + ti;
            float rm = rmax[si];
            if (!asa_finite(rm)) continue;
            double e = exp((double)(wl[si] - rm));
            acc = acc + (float)(e * (double)a[((bh * t + ti) * nk + s) * d + j]);
        }
        dv[i] = acc;
    }
}

// ------------------------------------------------------------------------------------------------
// read logits

// Is slot s masked at time ti? keep: nullable [K] (0 = masked).
__device__ __forceinline__ bool asa_masked(const int* keep, int last_pos_only, int ti, int t, int s) {
    if (!keep) return false;
    if (last_pos_only && ti + 1 != t) return false;
    return keep[s] == 0;
}

// lkey = q.keys/sqrt(d); lcont = q.state/sqrt(d) (when lcont is non-null); logits = lkey +
// gamma*lcont (lkey alone without content), with the slot mask: mask_mode 0 (read) -> both
// -inf, 1 (content only) -> lcont 0. lkey, lcont, logits: [B,H,T,K]; q: [B,H,T,d];
// keys: [H,K,d]; state: [B,H,T,K,d]. One warp per (b,h,t,s).
extern "C" __global__ void read_logits_forward(float* lkey, float* lcont, float* logits, const float* q,
                                               const float* keys, const float* state, float gamma,
                                               const int* keep, int last_pos_only, int mask_mode,
                                               int nbh, int h, int t, int nk, int d) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (i64)nbh * t * nk) return;
    int s = (int)(warp % nk);
    i64 row = warp / nk;  // bh*t + ti
    int ti = (int)(row % t);
    i64 bh = row / t;
    int hi = (int)(bh % h);
    double scale = 1.0 / sqrt((double)d);
    const float* qt = q + row * d;
    const float* key = keys + ((i64)hi * nk + s) * d;
    const float* sv = state + (row * nk + s) * d;
    double ak = 0.0, ac = 0.0;
    for (int j = lane; j < d; j += 32) {
        double qj = (double)qt[j];
        ak += (double)key[j] * qj;
        if (lcont) ac += (double)sv[j] * qj;
    }
    ak = warp_sum_d(ak);
    ac = warp_sum_d(ac);
    if (lane != 0) return;
    float vk = (float)(ak * scale);
    float vc = lcont ? (float)(ac * scale) : 0.0f;
    if (asa_masked(keep, last_pos_only, ti, t, s)) {
        if (mask_mode == 0) {
            vk = ASA_NEG_INF;
            vc = ASA_NEG_INF;
        } else {
            vc = 0.0f;
        }
    }
    lkey[warp] = vk;
    if (lcont) lcont[warp] = vc;
    logits[warp] = lcont ? vk + gamma * vc : vk;
}

// Backward of read_logits_forward to q and the state, plus the per-(b,h,t) partial of
// d(gamma) = sum dlogits * lcont. dq: [B,H,T,d]; dstate: nullable [B,H,T,K,d] (content read);
// pgamma: nullable [B*H*T] f64. One warp per (b,h,t), lanes over d; terms added in f32 in slot
// order as the CPU twin. The slot-key gradient is `read_logits_backward_keys`.
extern "C" __global__ void read_logits_backward(float* dq, float* dstate, double* pgamma, const float* dlogits,
                                                const float* lcont, const float* q, const float* keys,
                                                const float* state, float gamma, const int* keep,
                                                int last_pos_only, int mask_mode, int nbh, int h, int t,
                                                int nk, int d) {
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // bh*t + ti
    int lane = threadIdx.x & 31;
    if (row >= (i64)nbh * t) return;
    int ti = (int)(row % t);
    i64 bh = row / t;
    int hi = (int)(bh % h);
    double scale = 1.0 / sqrt((double)d);
    bool has_content = dstate != 0 && lcont != 0;
    const float* qt = q + row * d;
    float gq[ASA_MAXJ];
#pragma unroll
    for (int qq = 0; qq < ASA_MAXJ; ++qq) {
        int j = lane + 32 * qq;
        gq[qq] = j < d ? dq[row * d + j] : 0.0f;
    }
    double dgamma = 0.0;
    for (int s = 0; s < nk; ++s) {
        i64 i = row * nk + s;
        double g = (double)dlogits[i];
        if (g == 0.0) continue;
        bool masked = asa_masked(keep, last_pos_only, ti, t, s);
        bool key_live = !(masked && mask_mode == 0);
        bool cont_live = !masked;
        if (key_live) {
            const float* key = keys + ((i64)hi * nk + s) * d;
#pragma unroll
            for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                int j = lane + 32 * qq;
                if (j < d) gq[qq] = gq[qq] + (float)(g * scale * (double)key[j]);
            }
        }
        if (has_content && cont_live) {
            double lc = (double)lcont[i];
            dgamma += g * lc;
            double gc = g * (double)gamma * scale;
            const float* sv = state + i * d;
            float* gst = dstate + i * d;
#pragma unroll
            for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                int j = lane + 32 * qq;
                if (j < d) {
                    gq[qq] = gq[qq] + (float)(gc * (double)sv[j]);
                    gst[j] = gst[j] + (float)(gc * (double)qt[j]);
                }
            }
        }
    }
#pragma unroll
    for (int qq = 0; qq < ASA_MAXJ; ++qq) {
        int j = lane + 32 * qq;
        if (j < d) dq[row * d + j] = gq[qq];
    }
    if (pgamma && lane == 0) pgamma[row] = dgamma;
}

// Per-(b,h) partial slot-key gradient of the read logits: pkeys[b,h,s,j] = sum_t dlogits *
// q[t,j] / sqrt(d) where the key logit is live (f64, time order). One thread per (b,h,s,j).
// Finished by `sum_batch_add`.
extern "C" __global__ void read_logits_backward_keys(double* pkeys, const float* dlogits, const float* q,
                                                     const int* keep, int last_pos_only, int mask_mode,
                                                     int nbh, int t, int nk, int d) {
    double scale = 1.0 / sqrt((double)d);
    ASA_GRID_LOOP(i, (i64)nbh * nk * d) {
        int j = (int)(i % d);
        i64 r = i / d;
        int s = (int)(r % nk);
        i64 bh = r / nk;
        double acc = 0.0;
        for (int ti = 0; ti < t; ++ti) {
            double g = (double)dlogits[(bh * t + ti) * nk + s];
            if (g == 0.0) continue;
            if (mask_mode == 0 && asa_masked(keep, last_pos_only, ti, t, s)) continue;
            acc += g * scale * (double)q[(bh * t + ti) * d + j];
        }
        pkeys[i] = acc;
    }
}

// ------------------------------------------------------------------------------------------------
// read weights (routing). One thread per row (b,h,t) of K.

// Rank rule of topk: slot s is selected iff fewer than kk slots come before it in a stable
// descending sort (larger value, or equal value and lower index).
__device__ __forceinline__ bool asa_topk_sel(const float* lg, int nk, int kk, int s) {
    int before = 0;
    for (int u = 0; u < nk; ++u)
        if (lg[u] > lg[s] || (lg[u] == lg[s] && u < s)) ++before;
    return before < kk;
}

// softmax(x / temp) over one row (restricted to the topk selection when kk > 0), f64; an
// all -inf row gives zeros.
__device__ void asa_softmax_row(float* out, const float* x, float temp, int nk, int kk) {
    double mx = (double)ASA_NEG_INF;
    for (int s = 0; s < nk; ++s)
        if (kk <= 0 || asa_topk_sel(x, nk, kk, s)) mx = fmax(mx, (double)x[s] / (double)temp);
    if (!isfinite(mx)) {
        for (int s = 0; s < nk; ++s) out[s] = 0.0f;
        return;
    }
    double sum = 0.0;
    for (int s = 0; s < nk; ++s)
        if (kk <= 0 || asa_topk_sel(x, nk, kk, s)) sum += exp((double)x[s] / (double)temp - mx);
    for (int s = 0; s < nk; ++s) {
        double e = (kk <= 0 || asa_topk_sel(x, nk, kk, s)) ? exp((double)x[s] / (double)temp - mx) : 0.0;
        out[s] = (float)(e / sum);
    }
}

// rw = routing(logits), then the hard read mask with renormalisation. rw, logits: [B,H,T,K].
// routing: 0 softmax, 1 top1, 2 topk (topk = k), 3 external, 4 override (ext: [B,H,T,K]).
extern "C" __global__ void read_weights_forward(float* rw, const float* logits, const float* ext, int routing,
                                                int topk, float rtemp, const int* keep, int last_pos_only,
                                                int rows, int t, int nk) {
    ASA_GRID_LOOP(row, rows) {
        int ti = (int)(row % t);
        const float* lg = logits + row * nk;
        float* w = rw + row * nk;
        if (routing == 0) {
            asa_softmax_row(w, lg, rtemp, nk, 0);
        } else if (routing == 1) {
            int best = 0;
            for (int s = 1; s < nk; ++s)
                if (lg[s] > lg[best]) best = s;
            for (int s = 0; s < nk; ++s) w[s] = s == best ? 1.0f : 0.0f;
        } else if (routing == 2) {
            asa_softmax_row(w, lg, rtemp, nk, max(1, min(topk, nk)));
        } else {
            const float* src = ext + row * nk;
            double sum = 0.0;
            for (int s = 0; s < nk; ++s) {
                float x = src[s];
                if (routing == 4) x = isfinite(x) ? fmaxf(x, 0.0f) : 0.0f;
                w[s] = x;
                sum += (double)x;
            }
            double den = fmax(sum, (double)ASA_DEN_EPS);
            for (int s = 0; s < nk; ++s) w[s] = (float)((double)w[s] / den);
        }
        if (keep && (!last_pos_only || ti + 1 == t)) {
            double sum = 0.0;
            for (int s = 0; s < nk; ++s) {
                if (!keep[s]) w[s] = 0.0f;
                sum += (double)w[s];
            }
            double den = fmax(sum, (double)ASA_DEN_EPS);
            for (int s = 0; s < nk; ++s) w[s] = (float)((double)w[s] / den);
        }
    }
}

// Backward of read_weights_forward to the logits (softmax and topk only; the caller skips the
// other routings). dlogits, drw, rw, logits: [B,H,T,K]. Needs K <= ASA_MAXK.
extern "C" __global__ void read_weights_backward(float* dlogits, const float* drw, const float* rw,
                                                 const float* logits, int routing, int topk, float rtemp,
                                                 const int* keep, int last_pos_only, int rows, int t, int nk) {
    ASA_GRID_LOOP(row, rows) {
        int ti = (int)(row % t);
        const float* y = rw + row * nk;
        const float* lg = logits + row * nk;
        double gy[ASA_MAXK], p[ASA_MAXK];
        for (int s = 0; s < nk; ++s) {
            gy[s] = (double)drw[row * nk + s];
            p[s] = (double)y[s];
        }
        if (keep && (!last_pos_only || ti + 1 == t)) {
            float pre[ASA_MAXK];
            asa_softmax_row(pre, lg, rtemp, nk, routing == 2 ? max(1, min(topk, nk)) : 0);
            double sum = 0.0, dot = 0.0;
            for (int s = 0; s < nk; ++s) {
                if (keep[s]) sum += (double)pre[s];
                dot += gy[s] * (double)y[s];
            }
            double den = fmax(sum, (double)ASA_DEN_EPS);
            for (int s = 0; s < nk; ++s) {
                if (keep[s] && sum >= (double)ASA_DEN_EPS) gy[s] = (gy[s] - dot) / den;
                else if (keep[s]) gy[s] = gy[s] / den;
                else gy[s] = 0.0;
                p[s] = (double)pre[s];
            }
        }
        double dot = 0.0;
        for (int s = 0; s < nk; ++s) dot += p[s] * gy[s];
        float* gl = dlogits + row * nk;
        for (int s = 0; s < nk; ++s)
            if (p[s] > 0.0) gl[s] = gl[s] + (float)(p[s] * (gy[s] - dot) / (double)rtemp);
    }
}

// ------------------------------------------------------------------------------------------------
// slot mix: out_t = sum_k w_tk state_tk

// out: [R,d]; w: [R,K]; state: [R,K,d] (R = B*H*T). One thread per (row, j), f64 sum.
extern "C" __global__ void slot_mix_forward(float* out, const float* w, const float* state, i64 rows,
                                            int nk, int d) {
    ASA_GRID_LOOP(i, rows * d) {
        int j = (int)(i % d);
        i64 row = i / d;
        double acc = 0.0;
        for (int s = 0; s < nk; ++s)
            acc += (double)w[row * nk + s] * (double)state[(row * nk + s) * d + j];
        out[i] = (float)acc;
    }
}

// dw [R,K] += dout . state (f64 warp sum); dstate [R,K,d] += w * dout (f32). One warp per (row, s).
extern "C" __global__ void slot_mix_backward(float* dw, float* dstate, const float* dout, const float* w,
                                             const float* state, i64 rows, int nk, int d) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows * nk) return;
    i64 row = warp / nk;
    const float* g = dout + row * d;
    const float* sv = state + warp * d;
    float* gs = dstate + warp * d;
    float ws = w[warp];
    double acc = 0.0;
    for (int j = lane; j < d; j += 32) {
        acc += (double)g[j] * (double)sv[j];
        gs[j] = gs[j] + ws * g[j];
    }
    acc = warp_sum_d(acc);
    if (lane == 0) dw[warp] = dw[warp] + (float)acc;
}

// ------------------------------------------------------------------------------------------------
// slotspace refine: elementwise maps

// phi(x) = elu(x) + 1
extern "C" __global__ void phi_forward(float* out, const float* inp, i64 n) {
    ASA_GRID_LOOP(i, n) {
        float x = inp[i];
        out[i] = x > 0.0f ? x + 1.0f : expf(x);
    }
}

// dinp += dout * phi'(x)
extern "C" __global__ void phi_backward(float* dinp, const float* inp, const float* dout, i64 n) {
    ASA_GRID_LOOP(i, n) {
        float x = inp[i];
        dinp[i] = dinp[i] + (x > 0.0f ? dout[i] : dout[i] * expf(x));
    }
}

// out = tanh(x) (f64)
extern "C" __global__ void tanh_forward(float* out, const float* inp, i64 n) {
    ASA_GRID_LOOP(i, n) { out[i] = (float)tanh((double)inp[i]); }
}

// dinp += dout * (1 - y^2)
extern "C" __global__ void tanh_backward(float* dinp, const float* out, const float* dout, i64 n) {
    ASA_GRID_LOOP(i, n) {
        float y = out[i];
        dinp[i] = dinp[i] + dout[i] * (1.0f - y * y);
    }
}

// x [N,T,M] *= valid[b,t] (N = B*H rows of T steps); valid: [B,T] u8.
extern "C" __global__ void mask_rows(float* x, const unsigned char* valid, int h, int t, int m, i64 n) {
    ASA_GRID_LOOP(i, n) {
        i64 r = i / m;  // n*t + ti
        int ti = (int)(r % t);
        i64 bi = (r / t) / h;
        if (!valid[bi * t + ti]) x[i] = 0.0f;
    }
}

// softmax over rows of K (f64). out, inp: [R,K]. One thread per row.
extern "C" __global__ void softmax_slots_forward(float* out, const float* inp, i64 rows, int nk) {
    ASA_GRID_LOOP(row, rows) { asa_softmax_row(out + row * nk, inp + row * nk, 1.0f, nk, 0); }
}

// dinp += y * (dy - sum(dy*y)) per row (f64 dot).
extern "C" __global__ void softmax_slots_backward(float* dinp, const float* out, const float* dout, i64 rows,
                                                  int nk) {
    ASA_GRID_LOOP(row, rows) {
        const float* y = out + row * nk;
        const float* gy = dout + row * nk;
        double dot = 0.0;
        for (int s = 0; s < nk; ++s) dot += (double)y[s] * (double)gy[s];
        for (int s = 0; s < nk; ++s)
            dinp[row * nk + s] = dinp[row * nk + s] + (float)((double)y[s] * ((double)gy[s] - dot));
    }
}

// Slot mask on the slotspace weights, in place: w *= keep (renormalised by max(sum, 1e-8)
// when `renorm`); pre receives the weights before masking. w, pre: [R,K]; keep: [K].
extern "C" __global__ void slot_mask_weights_forward(float* w, float* pre, const int* keep, int last_pos_only,
                                                     int renorm, i64 rows, int t, int nk) {
    ASA_GRID_LOOP(row, rows) {
        int ti = (int)(row % t);
        float* wr = w + row * nk;
        for (int s = 0; s < nk; ++s) pre[row * nk + s] = wr[s];
        if (last_pos_only && ti + 1 != t) continue;
        for (int s = 0; s < nk; ++s)
            if (!keep[s]) wr[s] = 0.0f;
        if (renorm) {
            double sum = 0.0;
            for (int s = 0; s < nk; ++s) sum += (double)wr[s];
            double den = fmax(sum, (double)ASA_DEN_EPS);
            for (int s = 0; s < nk; ++s) wr[s] = (float)((double)wr[s] / den);
        }
    }
}

// dpre [R,K] += backward of slot_mask_weights_forward; out: the masked weights.
extern "C" __global__ void slot_mask_weights_backward(float* dpre, const float* dw, const float* out,
                                                      const float* pre, const int* keep, int last_pos_only,
                                                      int renorm, i64 rows, int t, int nk) {
    ASA_GRID_LOOP(row, rows) {
        int ti = (int)(row % t);
        const float* g = dw + row * nk;
        float* gp = dpre + row * nk;
        if (last_pos_only && ti + 1 != t) {
            for (int s = 0; s < nk; ++s) gp[s] = gp[s] + g[s];
            continue;
        }
        if (renorm) {
            double sum = 0.0, dot = 0.0;
            for (int s = 0; s < nk; ++s) {
                if (keep[s]) sum += (double)pre[row * nk + s];
                dot += (double)g[s] * (double)out[row * nk + s];
            }
            double den = fmax(sum, (double)ASA_DEN_EPS);
            for (int s = 0; s < nk; ++s) {
                if (!keep[s]) continue;
                double v = sum >= (double)ASA_DEN_EPS ? ((double)g[s] - dot) / den : (double)g[s] / den;
                gp[s] = gp[s] + (float)v;
            }
        } else {
            for (int s = 0; s < nk; ++s)
                if (keep[s]) gp[s] = gp[s] + g[s];
        }
    }
}

// ------------------------------------------------------------------------------------------------
// causal linear attention: S_t = sum_{s<=t} kf_s v_s^T, Z_t = sum_{s<=t} kf_s (f64),
// out_t = (qf_t S_t) / max(qf_t . max(Z_t, eps), eps). Columns of S evolve independently, so
// one warp owns one column (forward, dv) or one row (dq, dk) of S and walks time; lanes split
// the other index (M <= 32 * ASA_MAXA). No shared memory, no block barriers.
//
// Time is cut into chunks of `chunk` positions (the launcher picks it; chunk >= T is one chunk,
// the plain serial walk) and every warp walks one chunk from the state at its start:
// - forward (and the backward's dq sweep): S and Z before the chunk = the earlier chunks' sums,
//   `linear_attn_forward_sums` then `linear_attn_forward_carry` (exclusive prefix over chunks);
// - backward (dk, dv sweeps): dS_t = sum_{s>=t} qf_s gnum_s^T and dZ after the chunk = the later
//   chunks' sums, `linear_attn_backward_sums` then `linear_attn_backward_carry` (exclusive
//   suffix over chunks).
// The sequential depth is one chunk (plus the chunk count in the carry pass) instead of T.
// Sums associate per chunk rather than strictly in time order, so results agree with the serial
// CPU twin to f64 rounding (f32 outputs within an ulp or so) and stay bitwise reproducible.
// Carry layout: cs, ds [N, nch, M, M] (row a, column c), cz, dz [N, nch, M], f64; a null carry
// means one chunk. gden [N,T] (f64) = -(dout_t . out_t) / max(den_t, eps) where den_t >= eps,
// else 0 (`linear_attn_backward_gden`); gnum_t = dout_t / max(den_t, eps).

__device__ __forceinline__ int la_nch(int t, int chunk) { return (t + chunk - 1) / chunk; }

// A warp's place in a chunked walk: warp -> (row nn, chunk, feature idx) with idx fastest;
// nc = nn * nch + chunk (the carry row), [t0, t1) the chunk's positions, base = nn * T * M.
struct LaWalk {
    i64 nn, nc, base;
    int idx, t0, t1, lane;
};
// False for the warps past the work (whole warps leave together).
__device__ __forceinline__ bool la_walk(LaWalk& w, int n, int t, int m, int chunk) {
    int nch = la_nch(t, chunk);
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    w.lane = threadIdx.x & 31;
    if (warp >= (i64)n * nch * m) return false;
    w.idx = (int)(warp % m);
    w.nc = warp / m;
    int ch = (int)(w.nc % nch);
    w.nn = w.nc / nch;
    w.t0 = ch * chunk;
    w.t1 = min(w.t0 + chunk, t);
    w.base = w.nn * t * m;
    return true;
}

// cs[n,ch,a,c] = sum_{s in chunk ch} kf[s,a] v[s,c]; cz[n,ch,a] = sum kf[s,a]. One thread per
// (n, ch, a, c), c fastest (coalesced v rows).
extern "C" __global__ void linear_attn_forward_sums(double* cs, double* cz, const float* __restrict__ kf,
                                                    const float* __restrict__ v, int n, int t, int m,
                                                    int chunk) {
    int nch = la_nch(t, chunk);
    ASA_GRID_LOOP(i, (i64)n * nch * m * m) {
        int c = (int)(i % m);
        int a = (int)((i / m) % m);
        i64 nc = i / ((i64)m * m);  // n * nch + ch
        int ch = (int)(nc % nch);
        i64 base = (nc / nch) * t * m;
        int t0 = ch * chunk, t1 = min(t0 + chunk, t);
        double s = 0.0, z = 0.0;
        for (int ti = t0; ti < t1; ++ti) {
            double ka = (double)kf[base + (i64)ti * m + a];
            s += ka * (double)v[base + (i64)ti * m + c];
            z += ka;
        }
        cs[i] = s;
        if (c == 0) cz[nc * m + a] = z;
    }
}

// x[n,ch,e] <- the sum of x[n,ch',e] over the chunks before ch (after ch when `reverse`), in
// place, chunks in walk order; e < width. One thread per (n, e). Eight chunks at a time: their
// loads are independent and in flight together (in place, a load after a store to the same
// array would wait for it), then the running sums are written back in walk order.
__device__ __forceinline__ void la_carry(double* x, int n, int nch, int width, bool reverse) {
    ASA_GRID_LOOP(i, (i64)n * width) {
        i64 nn = i / width;
        int e = (int)(i % width);
        double* col = x + nn * nch * width + e;  // chunk ch at col[ch * width]
        double run = 0.0;
        for (int k0 = 0; k0 < nch; k0 += 8) {
            double val[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int k = k0 + j, ch = reverse ? nch - 1 - k : k;
                val[j] = k < nch ? col[(i64)ch * width] : 0.0;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int k = k0 + j, ch = reverse ? nch - 1 - k : k;
                if (k < nch) {
                    col[(i64)ch * width] = run;
                    run += val[j];
                }
            }
        }
    }
}

// cs, cz: chunk sums -> the state before each chunk.
extern "C" __global__ void linear_attn_forward_carry(double* cs, double* cz, int n, int nch, int m) {
    la_carry(cs, n, nch, m * m, false);
    la_carry(cz, n, nch, m, false);
}

// out: [N,T,M]; den: [N,T]; qf, kf, v: [N,T,M]; cs, cz: the carries (null: one chunk). One warp
// per (n, chunk, column c). The loads of step t+1 are issued while step t computes.
extern "C" __global__ void linear_attn_forward(float* out, float* den, const float* __restrict__ qf,
                                               const float* __restrict__ kf, const float* __restrict__ v,
                                               const double* __restrict__ cs, const double* __restrict__ cz,
                                               int n, int t, int m, int chunk) {
    LaWalk w;
    if (!la_walk(w, n, t, m, chunk)) return;
    const int c = w.idx, lane = w.lane, t0 = w.t0, t1 = w.t1;
    const i64 nc = w.nc, nn = w.nn, base = w.base;
    double S[ASA_MAXA], z[ASA_MAXA];
    float nq[ASA_MAXA], nk_[ASA_MAXA];
#pragma unroll
    for (int i = 0; i < ASA_MAXA; ++i) {
        int a = lane + 32 * i;
        S[i] = (cs && a < m) ? cs[(nc * m + a) * m + c] : 0.0;
        z[i] = (cz && a < m) ? cz[nc * m + a] : 0.0;
        nq[i] = a < m ? qf[base + (i64)t0 * m + a] : 0.0f;
        nk_[i] = a < m ? kf[base + (i64)t0 * m + a] : 0.0f;
    }
    float nv = v[base + (i64)t0 * m + c];
    for (int ti = t0; ti < t1; ++ti) {
        i64 o = base + (i64)ti * m;
        double vc = (double)nv;
        float cq[ASA_MAXA], ck[ASA_MAXA];
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            cq[i] = nq[i];
            ck[i] = nk_[i];
        }
        if (ti + 1 < t1) {
            i64 on = o + m;
            nv = v[on + c];
#pragma unroll
            for (int i = 0; i < ASA_MAXA; ++i) {
                int a = lane + 32 * i;
                if (a < m) {
                    nq[i] = qf[on + a];
                    nk_[i] = kf[on + a];
                }
            }
        }
        double ds = 0.0, acc = 0.0;
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            int a = lane + 32 * i;
            if (a < m) {
                double ka = (double)ck[i], qa = (double)cq[i];
                z[i] += ka;
                S[i] += ka * vc;
                ds += qa * fmax(z[i], (double)ASA_DEN_EPS);
                acc += qa * S[i];
            }
        }
        warp_sum2_d(ds, acc);
        if (lane == 0) {
            out[o + c] = (float)(acc / fmax(ds, (double)ASA_DEN_EPS));
            if (c == 0) den[nn * t + ti] = (float)ds;
        }
    }
}

// gden: [N,T] (see above). One warp per (n, t).
extern "C" __global__ void linear_attn_backward_gden(double* gden, const float* __restrict__ dout,
                                                     const float* __restrict__ out, const float* __restrict__ den,
                                                     int n, int t, int m) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (i64)n * t) return;
    i64 o = warp * m;
    double go = 0.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXA; ++i) {
        int c = lane + 32 * i;
        if (c < m) go += (double)dout[o + c] * (double)out[o + c];
    }
    go = warp_sum_d(go);
    if (lane == 0) {
        float dt = den[warp];
        gden[warp] = dt >= ASA_DEN_EPS ? -go / fmax((double)dt, (double)ASA_DEN_EPS) : 0.0;
    }
}

// Backward to qf: dqf_t[a] += gden_t * max(Z_t[a], eps) + sum_c S_t[a,c] gnum_t[c], rebuilding
// row a of S_t and Z_t[a] from the forward carries; zlive[t,a] = (Z_t[a] >= eps) for the dk
// sweep. zlive: [N,T,M] u8. One warp per (n, chunk, row a), lanes over c; loads run one step
// ahead.
extern "C" __global__ void linear_attn_backward(float* __restrict__ dqf, unsigned char* __restrict__ zlive,
                                                const float* __restrict__ dout, const float* __restrict__ den,
                                                const double* __restrict__ gden, const float* __restrict__ kf,
                                                const float* __restrict__ v, const double* __restrict__ cs,
                                                const double* __restrict__ cz, int n, int t, int m, int chunk) {
    LaWalk w;
    if (!la_walk(w, n, t, m, chunk)) return;
    const int a = w.idx, lane = w.lane, t0 = w.t0, t1 = w.t1;
    const i64 nc = w.nc, nn = w.nn, base = w.base;
    double S[ASA_MAXA];
    float ng[ASA_MAXA], nv[ASA_MAXA];
#pragma unroll
    for (int i = 0; i < ASA_MAXA; ++i) {
        int c = lane + 32 * i;
        S[i] = (cs && c < m) ? cs[(nc * m + a) * m + c] : 0.0;
        ng[i] = nv[i] = 0.0f;
    }
    double za = cz ? cz[nc * m + a] : 0.0;
#define ASA_LA_LOAD(tt)                                                  \
    {                                                                     \
        i64 o_ = base + (i64)(tt) * m;                                    \
        nden = den[nn * t + (tt)];                                        \
        ngd = gden[nn * t + (tt)];                                        \
        nx = kf[o_ + a];                                                  \
        nacc = dqf[o_ + a];                                               \
        _Pragma("unroll") for (int i = 0; i < ASA_MAXA; ++i) {            \
            int c = lane + 32 * i;                                        \
            if (c < m) {                                                  \
                ng[i] = dout[o_ + c];                                     \
                nv[i] = v[o_ + c];                                        \
            }                                                             \
        }                                                                 \
    }
    float nden, nx, nacc;
    double ngd;
    ASA_LA_LOAD(t0);
    for (int ti = t0; ti < t1; ++ti) {
        i64 o = base + (i64)ti * m;
        float dt = nden, kx = nx, qacc = nacc;
        double gd = ngd;
        float cg[ASA_MAXA], cv[ASA_MAXA];
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            cg[i] = ng[i];
            cv[i] = nv[i];
        }
        if (ti + 1 < t1) ASA_LA_LOAD(ti + 1);
        double inv = 1.0 / fmax((double)dt, (double)ASA_DEN_EPS);  // gnum = dout * inv
        double ka = (double)kx;
        double acc = 0.0;
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            double g = (double)cg[i];  // zero beyond m
            S[i] += ka * (double)cv[i];
            acc += S[i] * (g * inv);
        }
        acc = warp_sum_d(acc);
        za += ka;
        if (lane == 0) {
            dqf[o + a] = qacc + (float)(gd * fmax(za, (double)ASA_DEN_EPS) + acc);
            zlive[o + a] = za >= (double)ASA_DEN_EPS ? 1 : 0;
        }
    }
#undef ASA_LA_LOAD
}

// ds[n,ch,a,c] = sum_{s in chunk ch} qf[s,a] gnum_s[c]; dz[n,ch,a] = sum over the chunk's s with
// zlive[s,a] of gden_s qf[s,a]. One thread per (n, ch, a, c), c fastest.
extern "C" __global__ void linear_attn_backward_sums(double* ds, double* dz, const float* __restrict__ dout,
                                                     const float* __restrict__ den, const double* __restrict__ gden,
                                                     const unsigned char* __restrict__ zlive,
                                                     const float* __restrict__ qf, int n, int t, int m, int chunk) {
    int nch = la_nch(t, chunk);
    ASA_GRID_LOOP(i, (i64)n * nch * m * m) {
        int c = (int)(i % m);
        int a = (int)((i / m) % m);
        i64 nc = i / ((i64)m * m);
        int ch = (int)(nc % nch);
        i64 nn = nc / nch;
        i64 base = nn * t * m;
        int t0 = ch * chunk, t1 = min(t0 + chunk, t);
        double s = 0.0, z = 0.0;
        for (int ti = t0; ti < t1; ++ti) {
            i64 o = base + (i64)ti * m;
            double inv = 1.0 / fmax((double)den[nn * t + ti], (double)ASA_DEN_EPS);
            double qa = (double)qf[o + a];
            s += qa * ((double)dout[o + c] * inv);
            if (c == 0 && zlive[o + a]) z += gden[nn * t + ti] * qa;
        }
        ds[i] = s;
        if (c == 0) dz[nc * m + a] = z;
    }
}

// ds, dz: chunk sums -> the sums over every later chunk.
extern "C" __global__ void linear_attn_backward_carry(double* ds, double* dz, int n, int nch, int m) {
    la_carry(ds, n, nch, m * m, true);
    la_carry(dz, n, nch, m, true);
}

// Backward to kf: dkf_t[a] += dZ_t[a] + sum_c dS_t[a,c] v_t[c], dS_t = sum_{s>=t} qf_s gnum_s^T,
// dZ_t[a] = sum_{s>=t, zlive[s,a]} gden_s qf_s[a], from the backward carries. One warp per
// (n, chunk, row a), lanes over c; reverse time, loads one step ahead.
extern "C" __global__ void linear_attn_backward_dk(float* __restrict__ dkf, const unsigned char* __restrict__ zlive,
                                                   const float* __restrict__ dout, const float* __restrict__ den,
                                                   const double* __restrict__ gden, const float* __restrict__ qf,
                                                   const float* __restrict__ v, const double* __restrict__ ds,
                                                   const double* __restrict__ dz, int n, int t, int m, int chunk) {
    LaWalk w;
    if (!la_walk(w, n, t, m, chunk)) return;
    const int a = w.idx, lane = w.lane, t0 = w.t0, t1 = w.t1;
    const i64 nc = w.nc, nn = w.nn, base = w.base;
    double S[ASA_MAXA];
    float ng[ASA_MAXA], nv[ASA_MAXA];
#pragma unroll
    for (int i = 0; i < ASA_MAXA; ++i) {
        int c = lane + 32 * i;
        S[i] = (ds && c < m) ? ds[(nc * m + a) * m + c] : 0.0;
        ng[i] = nv[i] = 0.0f;
    }
    double dza = dz ? dz[nc * m + a] : 0.0;
#define ASA_LA_LOAD(tt)                                                  \
    {                                                                     \
        i64 o_ = base + (i64)(tt) * m;                                    \
        nden = den[nn * t + (tt)];                                        \
        ngd = gden[nn * t + (tt)];                                        \
        nx = qf[o_ + a];                                                  \
        nacc = dkf[o_ + a];                                               \
        nz = zlive[o_ + a];                                               \
        _Pragma("unroll") for (int i = 0; i < ASA_MAXA; ++i) {            \
            int c = lane + 32 * i;                                        \
            if (c < m) {                                                  \
                ng[i] = dout[o_ + c];                                     \
                nv[i] = v[o_ + c];                                        \
            }                                                             \
        }                                                                 \
    }
    float nden, nx, nacc;
    double ngd;
    unsigned char nz;
    ASA_LA_LOAD(t1 - 1);
    for (int ti = t1 - 1; ti >= t0; --ti) {
        i64 o = base + (i64)ti * m;
        float dt = nden, qx = nx, kacc = nacc;
        double gd = ngd;
        unsigned char live = nz;
        float cg[ASA_MAXA], cv[ASA_MAXA];
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            cg[i] = ng[i];
            cv[i] = nv[i];
        }
        if (ti - 1 >= t0) ASA_LA_LOAD(ti - 1);
        double inv = 1.0 / fmax((double)dt, (double)ASA_DEN_EPS);
        double qa = (double)qx;
        double acc = 0.0;
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            double g = (double)cg[i];
            S[i] += qa * (g * inv);
            acc += S[i] * (double)cv[i];
        }
        acc = warp_sum_d(acc);
        if (live) dza += gd * qa;
        if (lane == 0) dkf[o + a] = kacc + (float)(dza + acc);
    }
#undef ASA_LA_LOAD
}

// Backward to v: dv_t[c] += sum_a dS_t[a,c] kf_t[a], column c of dS from the backward carries.
// One warp per (n, chunk, column c), lanes over a; reverse time, loads one step ahead.
extern "C" __global__ void linear_attn_backward_dv(float* __restrict__ dv, const float* __restrict__ dout,
                                                   const float* __restrict__ den, const float* __restrict__ qf,
                                                   const float* __restrict__ kf, const double* __restrict__ ds,
                                                   int n, int t, int m, int chunk) {
    LaWalk w;
    if (!la_walk(w, n, t, m, chunk)) return;
    const int c = w.idx, lane = w.lane, t0 = w.t0, t1 = w.t1;
    const i64 nc = w.nc, nn = w.nn, base = w.base;
    double dS[ASA_MAXA];
    float nq[ASA_MAXA], nkk[ASA_MAXA];
    i64 ol = base + (i64)(t1 - 1) * m;
#pragma unroll
    for (int i = 0; i < ASA_MAXA; ++i) {
        int a = lane + 32 * i;
        dS[i] = (ds && a < m) ? ds[(nc * m + a) * m + c] : 0.0;
        nq[i] = a < m ? qf[ol + a] : 0.0f;
        nkk[i] = a < m ? kf[ol + a] : 0.0f;
    }
    float nden = den[nn * t + t1 - 1], ng = dout[ol + c], nacc = dv[ol + c];
    for (int ti = t1 - 1; ti >= t0; --ti) {
        i64 o = base + (i64)ti * m;
        float dt = nden, gc = ng, vacc = nacc;
        float cq[ASA_MAXA], ck[ASA_MAXA];
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            cq[i] = nq[i];
            ck[i] = nkk[i];
        }
        if (ti - 1 >= t0) {
            i64 on = o - m;
            nden = den[nn * t + ti - 1];
            ng = dout[on + c];
            nacc = dv[on + c];
#pragma unroll
            for (int i = 0; i < ASA_MAXA; ++i) {
                int a = lane + 32 * i;
                if (a < m) {
                    nq[i] = qf[on + a];
                    nkk[i] = kf[on + a];
                }
            }
        }
        double gn = (double)gc * (1.0 / fmax((double)dt, (double)ASA_DEN_EPS));
        double acc = 0.0;
#pragma unroll
        for (int i = 0; i < ASA_MAXA; ++i) {
            dS[i] += (double)cq[i] * gn;  // zero beyond m
            acc += dS[i] * (double)ck[i];
        }
        acc = warp_sum_d(acc);
        if (lane == 0) dv[o + c] = vacc + (float)acc;
    }
}

// ------------------------------------------------------------------------------------------------
// Tiled causal linear attention: the quantities of the walks above, one block of LT_THREADS
// threads per (row n, chunk), the chunk's inputs staged in shared memory and every term a small
// matrix product over the chunk (the chunked form of linear-attention kernels such as
// flash-linear-attention's):
//   num_t = q_t S0 + sum_{s<=t} (q_t . k_s) v_s                               (forward)
//   dq_t  = gden_t max(Z_t, eps) + gnum_t S0^T + sum_{s<=t} (gnum_t . v_s) k_s
//   dk_t  = dZ_t + dS1 v_t + sum_{s>=t} (gnum_s . v_t) q_s
//   dv_t  = dS1^T k_t + sum_{s>=t} (q_s . k_t) gnum_s
// s and t run over the chunk; S0, Z0 are the forward carries (the state before the chunk) and
// dS1, dZ1 the backward ones (the sums after it), built as for the chunked walks
// (`linear_attn_forward_tiled_sums` or `linear_attn_backward_tiled_dq` for the per-chunk sums,
// then the `_carry` kernels). Z_t and dZ_t pass through elementwise clamps and masks, so they are
// short walks over the chunk, one thread per feature. Inputs are staged as f32 (exact), all
// products and sums are f64; every shared matrix has an odd row stride so that row and column
// reads are both free of bank conflicts. The host picks the chunk so that the shared memory
// fits (src/backend/cuda/linear.rs); sizes are padded to multiples of 4 with zeros.

#define LT_THREADS 256

__device__ __forceinline__ int lt_pad4(int x) { return (x + 3) & ~3; }

// A block's place: row nn, carry row nc = blockIdx.x (= nn * nch + chunk), positions
// [t0, t0 + tc); padded sizes Cp (chunk) and Mp (features); row strides lc = Cp + 1, lm = Mp + 1.
struct LtBlock {
    i64 nn, nc, base;
    int t0, tc, Cp, Mp, lc, lm;
};
__device__ __forceinline__ LtBlock lt_block(int t, int m, int chunk) {
    LtBlock b;
    int nch = la_nch(t, chunk);
    b.nc = blockIdx.x;
    b.nn = b.nc / nch;
    b.t0 = (int)(b.nc % nch) * chunk;
    b.tc = min(chunk, t - b.t0);
    b.base = b.nn * t * m;
    b.Cp = lt_pad4(chunk);
    b.Mp = lt_pad4(m);
    b.lc = b.Cp + 1;
    b.lm = b.Mp + 1;
    return b;
}

// s[r][c] (stride lm) = x[t0 + r][c] of an [N,T,M] tensor; 0 on the padding.
__device__ __forceinline__ void lt_stage(float* s, const float* __restrict__ x, const LtBlock& b, int m) {
    for (int i = threadIdx.x; i < b.Cp * b.Mp; i += blockDim.x) {
        int r = i / b.Mp, c = i - r * b.Mp;
        s[r * b.lm + c] = (r < b.tc && c < m) ? x[b.base + (i64)(b.t0 + r) * m + c] : 0.0f;
    }
}
// s[a][c] (stride lm) = the block's carry x[nc][a][c] ([N,nch,M,M]); 0 when x is null.
__device__ __forceinline__ void lt_stage_carry(double* s, const double* __restrict__ x, const LtBlock& b, int m) {
    for (int i = threadIdx.x; i < b.Mp * b.Mp; i += blockDim.x) {
        int a = i / b.Mp, c = i - a * b.Mp;
        s[a * b.lm + c] = (x && a < m && c < m) ? x[(b.nc * m + a) * m + c] : 0.0;
    }
}
// g[r][c] = gnum = dout[t0 + r][c] / max(den, eps) (stride lm), gd[r] = gden[t0 + r].
__device__ __forceinline__ void lt_stage_gnum(double* g, double* gd, const float* __restrict__ dout,
                                              const float* __restrict__ den, const double* __restrict__ gden,
                                              const LtBlock& b, int t, int m) {
    for (int i = threadIdx.x; i < b.Cp * b.Mp; i += blockDim.x) {
        int r = i / b.Mp, c = i - r * b.Mp;
        double x = 0.0;
        if (r < b.tc && c < m) {
            double inv = 1.0 / fmax((double)den[b.nn * t + b.t0 + r], (double)ASA_DEN_EPS);
            x = (double)dout[b.base + (i64)(b.t0 + r) * m + c] * inv;
        }
        g[r * b.lm + c] = x;
    }
    for (int r = threadIdx.x; r < b.Cp; r += blockDim.x) gd[r] = r < b.tc ? gden[b.nn * t + b.t0 + r] : 0.0;
}

// The tiled kernels' shared memory, one layout for all (its size: `tiled_smem` of
// src/backend/cuda/linear.rs): f64 sq [Mp][lm] (a carry), g [Cp][lm] (gnum), cc [Cp][lc] (the
// in-chunk products), ct [Cp][lm] (clamped Z or its gradient), vec [Cp]; f32 Q, K, V [Cp][lm];
// u8 zl [Cp][Mp]. A kernel uses the parts it needs.
struct LtSmem {
    double *sq, *g, *cc, *ct, *vec;
    float *Q, *K, *V;
    unsigned char* zl;
};
__device__ __forceinline__ LtSmem lt_carve(double* base, const LtBlock& b) {
    LtSmem x;
    x.sq = base;
    x.g = x.sq + b.Mp * b.lm;
    x.cc = x.g + b.Cp * b.lm;
    x.ct = x.cc + b.Cp * b.lc;
    x.vec = x.ct + b.Cp * b.lm;
    x.Q = (float*)(x.vec + b.Cp);
    x.K = x.Q + b.Cp * b.lm;
    x.V = x.K + b.Cp * b.lm;
    x.zl = (unsigned char*)(x.V + b.Cp * b.lm);
    return x;
}
// Stages the chunk's qf, kf, v rows into Q, K, V.
__device__ __forceinline__ void lt_stage_qkv(const LtSmem& x, const float* __restrict__ qf, const float* __restrict__ kf,
                                             const float* __restrict__ v, const LtBlock& b, int m) {
    lt_stage(x.Q, qf, b, m);
    lt_stage(x.K, kf, b, m);
    lt_stage(x.V, v, b, m);
}

// acc[i][j] += sum_{x < inner} l(ri + i * tr, x) * rr(x, cj + j * tcn), in x order (f64).
template <class L, class R>
__device__ __forceinline__ void lt_acc(double (&acc)[4][4], int ri, int cj, int tr, int tcn, int inner, L l, R rr) {
#pragma unroll 4
    for (int x = 0; x < inner; ++x) {
        double a[4], bb[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            a[i] = l(ri + i * tr, x);
            bb[i] = rr(x, cj + i * tcn);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bb[j];
    }
}

// out(r, c) for r < rows, c < cols (multiples of 4) = sum_{x < in1} l1(r, x) r1(x, c) +
// sum_{x < in2} l2(r, x) r2(x, c), f64 in that order. Each thread owns a 4x4 tile: rows
// ri + i * rows/4, columns cj + j * cols/4 (neighbouring threads take neighbouring columns).
// w(r, c, value) stores.
template <class L1, class R1, class L2, class R2, class W>
__device__ __forceinline__ void lt_mm2(int rows, int cols, int in1, L1 l1, R1 r1, int in2, L2 l2, R2 r2, W w) {
    const int tr = rows >> 2, tcn = cols >> 2;
    for (int tile = threadIdx.x; tile < tr * tcn; tile += blockDim.x) {
        const int ri = tile / tcn, cj = tile - ri * tcn;
        double acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
        lt_acc(acc, ri, cj, tr, tcn, in1, l1, r1);
        if (in2 > 0) lt_acc(acc, ri, cj, tr, tcn, in2, l2, r2);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) w(ri + i * tr, cj + j * tcn, acc[i][j]);
    }
}

// One product: out(r, c) = sum_{x < inner} l(r, x) rr(x, c).
template <class L, class R, class W>
__device__ __forceinline__ void lt_mm(int rows, int cols, int inner, L l, R rr, W w) {
    lt_mm2(rows, cols, inner, l, rr, 0, l, rr, w);
}

// The forward carries' chunk sums (as linear_attn_forward_sums): cs[n,ch] = sum over the chunk
// of kf_s^T v_s [M,M], cz[n,ch] = sum kf_s [M]. Block per (n, chunk); shared: K, V f32 [Cp][lm].
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_forward_tiled_sums(double* cs, double* cz, const float* __restrict__ kf, const float* __restrict__ v,
                               int n, int t, int m, int chunk) {
    const LtBlock b = lt_block(t, m, chunk);
    const int lm = b.lm;
    ASA_DYN_SHARED(double, lt_smem);
    float* K = (float*)lt_smem;
    float* V = K + b.Cp * lm;
    lt_stage(K, kf, b, m);
    lt_stage(V, v, b, m);
    __syncthreads();
    lt_mm(
        b.Mp, b.Mp, b.tc, [&](int a, int s) { return (double)K[s * lm + a]; },
        [&](int s, int c) { return (double)V[s * lm + c]; },
        [&](int a, int c, double x) {
            if (a < m && c < m) cs[(b.nc * m + a) * m + c] = x;
        });
    for (int a = threadIdx.x; a < m; a += blockDim.x) {
        double z = 0.0;
        for (int s = 0; s < b.tc; ++s) z += (double)K[s * lm + a];
        cz[b.nc * m + a] = z;
    }
}

// out [N,T,M], den [N,T] (=) as linear_attn_forward, from the carries cs, cz (null: one chunk).
// Block per (n, chunk); shared (LtSmem): S = sq, A = cc, Zc = ct, dn = vec, Q, K, V.
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_forward_tiled(float* out, float* den, const float* __restrict__ qf, const float* __restrict__ kf,
                          const float* __restrict__ v, const double* __restrict__ cs, const double* __restrict__ cz,
                          int n, int t, int m, int chunk) {
    const LtBlock b = lt_block(t, m, chunk);
    const int lm = b.lm, lc = b.lc, Mp = b.Mp;
    ASA_DYN_SHARED(double, lt_smem);
    const LtSmem x = lt_carve(lt_smem, b);
    double *S = x.sq, *A = x.cc, *Zc = x.ct, *dn = x.vec;
    const float *Q = x.Q, *K = x.K, *V = x.V;
    lt_stage_qkv(x, qf, kf, v, b, m);
    lt_stage_carry(S, cs, b, m);
    __syncthreads();
    // Zc_t = max(Z0 + the chunk's keys up to t, eps); 0 on the padding
    for (int a = threadIdx.x; a < Mp; a += blockDim.x) {
        double z = (cz && a < m) ? cz[b.nc * m + a] : 0.0;
        for (int r = 0; r < b.Cp; ++r) {
            z += (double)K[r * lm + a];
            Zc[r * lm + a] = (a < m && r < b.tc) ? fmax(z, (double)ASA_DEN_EPS) : 0.0;
        }
    }
    // A[t][s] = q_t . k_s for s <= t
    lt_mm(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return (double)Q[r * lm + x]; },
        [&](int x, int s) { return (double)K[s * lm + x]; },
        [&](int r, int s, double x) { A[r * lc + s] = s <= r ? x : 0.0; });
    __syncthreads();
    // den_t = q_t . Zc_t: a warp per position, lanes over features (the walk's order)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int r = warp; r < b.tc; r += nw) {
        double d = 0.0;
        for (int a = lane; a < m; a += 32) d += (double)Q[r * lm + a] * Zc[r * lm + a];
        d = warp_sum_d(d);
        if (lane == 0) {
            dn[r] = d;
            den[b.nn * t + b.t0 + r] = (float)d;
        }
    }
    __syncthreads();
    // num_t = q_t S0 + sum_s A[t][s] v_s
    lt_mm2(
        b.Cp, Mp, Mp, [&](int r, int x) { return (double)Q[r * lm + x]; },
        [&](int x, int c) { return S[x * lm + c]; }, b.Cp, [&](int r, int s) { return A[r * lc + s]; },
        [&](int s, int c) { return (double)V[s * lm + c]; },
        [&](int r, int c, double x) {
            if (r < b.tc && c < m)
                out[b.base + (i64)(b.t0 + r) * m + c] = (float)(x / fmax(dn[r], (double)ASA_DEN_EPS));
        });
}

// Backward to qf (dqf +=) and zlive as linear_attn_backward, from the forward carries cs, cz,
// and the backward carries' chunk sums (as linear_attn_backward_sums; skipped when ds is null):
// ds[n,ch] = sum over the chunk of qf_s^T gnum_s, dz[n,ch] = sum of gden_s qf_s over the chunk's
// s with zlive. Block per (n, chunk); shared (LtSmem): S = sq, G = g, Bm = cc, Zg = ct, gd = vec,
// Q, K, V.
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_backward_tiled_dq(float* __restrict__ dqf, unsigned char* __restrict__ zlive, double* ds, double* dz,
                              const float* __restrict__ dout, const float* __restrict__ den,
                              const double* __restrict__ gden, const float* __restrict__ qf,
                              const float* __restrict__ kf, const float* __restrict__ v,
                              const double* __restrict__ cs, const double* __restrict__ cz, int n, int t, int m,
                              int chunk) {
    const LtBlock b = lt_block(t, m, chunk);
    const int lm = b.lm, lc = b.lc, Mp = b.Mp;
    ASA_DYN_SHARED(double, lt_smem);
    const LtSmem x = lt_carve(lt_smem, b);
    double *S = x.sq, *G = x.g, *Bm = x.cc, *Zg = x.ct, *gd = x.vec;
    const float *Q = x.Q, *K = x.K, *V = x.V;
    lt_stage_qkv(x, qf, kf, v, b, m);
    lt_stage_carry(S, cs, b, m);
    lt_stage_gnum(G, gd, dout, den, gden, b, t, m);
    __syncthreads();
    // Z_t = Z0 + the chunk's keys up to t: zlive, Zg = gden_t max(Z_t, eps), the dz sum
    for (int a = threadIdx.x; a < Mp; a += blockDim.x) {
        double z = (cz && a < m) ? cz[b.nc * m + a] : 0.0, dzs = 0.0;
        for (int r = 0; r < b.Cp; ++r) {
            z += (double)K[r * lm + a];
            double zg = 0.0;
            if (a < m && r < b.tc) {
                bool live = z >= (double)ASA_DEN_EPS;
                zlive[b.base + (i64)(b.t0 + r) * m + a] = live ? 1 : 0;
                if (live) dzs += gd[r] * (double)Q[r * lm + a];
                zg = gd[r] * fmax(z, (double)ASA_DEN_EPS);
            }
            Zg[r * lm + a] = zg;
        }
        if (dz && a < m) dz[b.nc * m + a] = dzs;
    }
    // Bm[t][s] = gnum_t . v_s for s <= t
    lt_mm(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return G[r * lm + x]; },
        [&](int x, int s) { return (double)V[s * lm + x]; },
        [&](int r, int s, double x) { Bm[r * lc + s] = s <= r ? x : 0.0; });
    // ds[a][c] = sum_s q_s[a] gnum_s[c]
    if (ds)
        lt_mm(
            Mp, Mp, b.tc, [&](int a, int s) { return (double)Q[s * lm + a]; },
            [&](int s, int c) { return G[s * lm + c]; },
            [&](int a, int c, double x) {
                if (a < m && c < m) ds[(b.nc * m + a) * m + c] = x;
            });
    __syncthreads();
    // dq_t[a] += Zg + sum_c gnum_t[c] S0[a][c] + sum_s Bm[t][s] k_s[a]
    lt_mm2(
        b.Cp, Mp, Mp, [&](int r, int c) { return G[r * lm + c]; }, [&](int c, int a) { return S[a * lm + c]; },
        b.Cp, [&](int r, int s) { return Bm[r * lc + s]; }, [&](int s, int a) { return (double)K[s * lm + a]; },
        [&](int r, int a, double x) {
            if (r < b.tc && a < m) {
                i64 o = b.base + (i64)(b.t0 + r) * m + a;
                dqf[o] = dqf[o] + (float)(Zg[r * lm + a] + x);
            }
        });
}

// Backward to kf and v (dkf, dv +=) as linear_attn_backward, from the backward carries ds, dz
// (the sums after the chunk; null: one chunk) and zlive. Block per (n, chunk); shared (LtSmem):
// D = sq (dS1), G = g, P = cc, dZ = ct, gd = vec, Q, K, V, zlive = zl.
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_backward_tiled_dkdv(float* __restrict__ dkf, float* __restrict__ dv,
                                const unsigned char* __restrict__ zlive, const double* __restrict__ ds,
                                const double* __restrict__ dz, const float* __restrict__ dout,
                                const float* __restrict__ den, const double* __restrict__ gden,
                                const float* __restrict__ qf, const float* __restrict__ kf,
                                const float* __restrict__ v, int n, int t, int m, int chunk) {
    const LtBlock b = lt_block(t, m, chunk);
    const int lm = b.lm, lc = b.lc, Mp = b.Mp;
    ASA_DYN_SHARED(double, lt_smem);
    const LtSmem x = lt_carve(lt_smem, b);
    double *D = x.sq, *G = x.g, *P = x.cc, *dZ = x.ct, *gd = x.vec;
    const float *Q = x.Q, *K = x.K, *V = x.V;
    unsigned char* Zl = x.zl;
    lt_stage_qkv(x, qf, kf, v, b, m);
    for (int i = threadIdx.x; i < b.Cp * Mp; i += blockDim.x) {
        int r = i / Mp, a = i - r * Mp;
        Zl[i] = (r < b.tc && a < m) ? zlive[b.base + (i64)(b.t0 + r) * m + a] : 0;
    }
    lt_stage_carry(D, ds, b, m);
    lt_stage_gnum(G, gd, dout, den, gden, b, t, m);
    __syncthreads();
    // dZ_t = dZ1 + sum over s >= t in the chunk with zlive of gden_s q_s (reverse walk)
    for (int a = threadIdx.x; a < Mp; a += blockDim.x) {
        double z = (dz && a < m) ? dz[b.nc * m + a] : 0.0;
        for (int r = b.Cp - 1; r >= 0; --r) {
            double x = 0.0;
            if (a < m && r < b.tc) {
                if (Zl[r * Mp + a]) z += gd[r] * (double)Q[r * lm + a];
                x = z;
            }
            dZ[r * lm + a] = x;
        }
    }
    // P[t][s] = gnum_s . v_t for s >= t
    lt_mm(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return (double)V[r * lm + x]; },
        [&](int x, int s) { return G[s * lm + x]; },
        [&](int r, int s, double x) { P[r * lc + s] = s >= r ? x : 0.0; });
    __syncthreads();
    // dk_t[a] += dZ_t[a] + sum_c v_t[c] dS1[a][c] + sum_s P[t][s] q_s[a]
    lt_mm2(
        b.Cp, Mp, Mp, [&](int r, int c) { return (double)V[r * lm + c]; }, [&](int c, int a) { return D[a * lm + c]; },
        b.Cp, [&](int r, int s) { return P[r * lc + s]; }, [&](int s, int a) { return (double)Q[s * lm + a]; },
        [&](int r, int a, double x) {
            if (r < b.tc && a < m) {
                i64 o = b.base + (i64)(b.t0 + r) * m + a;
                dkf[o] = dkf[o] + (float)(dZ[r * lm + a] + x);
            }
        });
    __syncthreads();
    // P[t][s] = q_s . k_t for s >= t
    lt_mm(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return (double)K[r * lm + x]; },
        [&](int x, int s) { return (double)Q[s * lm + x]; },
        [&](int r, int s, double x) { P[r * lc + s] = s >= r ? x : 0.0; });
    __syncthreads();
    // dv_t[c] += sum_a k_t[a] dS1[a][c] + sum_s P[t][s] gnum_s[c]
    lt_mm2(
        b.Cp, Mp, Mp, [&](int r, int a) { return (double)K[r * lm + a]; }, [&](int a, int c) { return D[a * lm + c]; },
        b.Cp, [&](int r, int s) { return P[r * lc + s]; }, [&](int s, int c) { return G[s * lm + c]; },
        [&](int r, int c, double x) {
            if (r < b.tc && c < m) {
                i64 o = b.base + (i64)(b.t0 + r) * m + c;
                dv[o] = dv[o] + (float)x;
            }
        });
}
