// ASA ops, one kernel per op and direction, each the twin of the function of the same name in
// `src/backend/cpu/slot_ops.rs` (a few ops have a second-phase kernel, `<op>_<part>`, where a
// deterministic reduction needs one).
//
// Layouts (row-major): per-head activations [B,H,T,d]; write logits and scan statistics
// [B,H,K,T]; read logits and weights [B,H,T,K]; slot state history [B,H,T,K,d].
// Where the CPU twin accumulates in f64 these kernels do too (dot products, the write scan and
// its backward, softmaxes, linear attention), so results agree with it to f32 rounding.
#include "common.cuh"

// ------------------------------------------------------------------------------------------------
// RoPE (the reference's layout: interleaved pairs, half-split angles). cos, sin: [T,D].

// Both walk (position, pair) with `rope_walk` (cuda/common.cuh).

// out, inp: [N,T,D]. One thread per pair.
// twin: cpu::slot_ops::rope_forward
extern "C" __global__ void rope_forward(float* out, const float* inp, const float* cos_t,
                                        const float* sin_t, int n, int t, int d) {
    rope_walk(n, t, d, [&](i64 o, i64 tab, int p, i64, int) {
        const float* c = cos_t + tab;
        const float* s = sin_t + tab;
        float a = inp[o], b = inp[o + 1];
        out[o] = a * c[2 * p] - b * s[2 * p];
        out[o + 1] = b * c[2 * p + 1] + a * s[2 * p + 1];
    });
}

// dinp += J^T dout. dinp, dout: [N,T,D]. The traversal of rope_forward.
// twin: cpu::slot_ops::rope_backward
extern "C" __global__ void rope_backward(float* dinp, const float* dout, const float* cos_t,
                                         const float* sin_t, int n, int t, int d) {
    rope_walk(n, t, d, [&](i64 o, i64 tab, int p, i64, int) {
        const float* c = cos_t + tab;
        const float* s = sin_t + tab;
        float ga = dout[o], gb = dout[o + 1];
        dinp[o] = dinp[o] + (ga * c[2 * p] + gb * s[2 * p + 1]);
        dinp[o + 1] = dinp[o + 1] + (gb * c[2 * p + 1] - ga * s[2 * p]);
    });
}

// ------------------------------------------------------------------------------------------------
// head layout

// out: [B,H,T,d] <- inp: [B,T,H*d]
// twin: cpu::slot_ops::split_heads
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

// out: [B,T,H*d] = inp: [B,H,T,d] (a store: merge_heads_acc of the CPU into zeros, no memset
// before). A block per row (b, t) of out. out16: nullable, the bf16 twin of out.
// twin: cpu::slot_ops::merge_heads
extern "C" __global__ void merge_heads(float* out, const float* inp, int b, int t, int h, int d,
                                       unsigned short* out16) {
    const int hd = h * d;
    for (i64 row = blockIdx.x; row < (i64)b * t; row += gridDim.x) {
        const i64 bi = row / t;
        const int ti = (int)(row - bi * t);
        for (int j = threadIdx.x; j < hd; j += blockDim.x) {
            const int hi = j / d, jj = j - hi * d;
            const i64 o = row * hd + j;
            const float y = inp[((bi * h + hi) * t + ti) * d + jj];
            out[o] = y;
            if (out16) out16[o] = asa_f32_to_bf16(y);
        }
    }
}

// The traversal of split_heads3 and merge_heads3: a block per row (b, t) of the [B,T,3*H*d]
// side (grid-stride), threads along it; f(w, wide, head) for the element at offset `wide`
// there, which is element `head` of [B,H,T,d] third w.
template <class F>
__device__ __forceinline__ void heads3_walk(int b, int t, int h, int d, F f) {
    const int hd = h * d;
    for (i64 row = blockIdx.x; row < (i64)b * t; row += gridDim.x) {
        const i64 bi = row / t;
        const int ti = (int)(row - bi * t);
        for (int j = threadIdx.x; j < 3 * hd; j += blockDim.x) {
            const int w = j / hd, jw = j - w * hd, hi = jw / d, jj = jw - hi * d;
            f(w, row * 3 * hd + j, ((bi * h + hi) * t + ti) * d + jj);
        }
    }
}

// heads3_walk by pairs (d even): f(w, wide, head, ti, jj) for the pair at elements jj, jj + 1
// (jj even) of a head row at position ti.
template <class F>
__device__ __forceinline__ void heads3_pairs_walk(int b, int t, int h, int d, F f) {
    const int hd = h * d, hp = hd / 2;
    for (i64 row = blockIdx.x; row < (i64)b * t; row += gridDim.x) {
        const i64 bi = row / t;
        const int ti = (int)(row - bi * t);
        for (int q = threadIdx.x; q < 3 * hp; q += blockDim.x) {
            const int w = q / hp, jw = 2 * (q - w * hp), hi = jw / d, jj = jw - hi * d;
            f(w, row * 3 * hd + w * hd + jw, ((bi * h + hi) * t + ti) * d + jj, ti, jj);
        }
    }
}

// The three projections of a fused QKV GEMM: inp [B,T,3*H*d] (rows of k | v | q) -> o0, o1, o2
// [B,H,T,d] (split_heads of each third). cos, sin (nullable, [T,d], d even): the first third
// leaves with RoPE (the expressions of rope_forward), for the keys.
// twin: cpu::slot_ops::split_heads
extern "C" __global__ void split_heads3(float* o0, float* o1, float* o2, const float* inp, int b, int t, int h,
                                        int d, const float* cos_t, const float* sin_t) {
    if (cos_t) {
        heads3_pairs_walk(b, t, h, d, [&](int w, i64 wide, i64 head, int ti, int jj) {
            float* o = w == 0 ? o0 : w == 1 ? o1 : o2;
            const float a = inp[wide], bb = inp[wide + 1];
            if (w == 0) {
                const float* c = cos_t + (i64)ti * d;
                const float* s = sin_t + (i64)ti * d;
                o[head] = a * c[jj] - bb * s[jj];
                o[head + 1] = bb * c[jj + 1] + a * s[jj + 1];
            } else {
                o[head] = a;
                o[head + 1] = bb;
            }
        });
        return;
    }
    heads3_walk(b, t, h, d, [&](int w, i64 wide, i64 head) {
        float* o = w == 0 ? o0 : w == 1 ? o1 : o2;
        o[head] = inp[wide];
    });
}

// The gradient of a fused QKV GEMM's output: out [B,T,3*H*d] (=) <- the merges of i0, i1, i2
// [B,H,T,d] side by side (merge_heads of each into a zero third); out16: nullable, the bf16
// twin of out. cos, sin (nullable): i0 is the gradient of split_heads3's roped third, taken
// back through RoPE (the expressions of rope_backward, into zeros).
// twin: cpu::slot_ops::merge_heads_acc
extern "C" __global__ void merge_heads3(float* out, const float* i0, const float* i1, const float* i2, int b, int t,
                                        int h, int d, unsigned short* out16, const float* cos_t,
                                        const float* sin_t) {
    if (cos_t) {
        heads3_pairs_walk(b, t, h, d, [&](int w, i64 wide, i64 head, int ti, int jj) {
            const float* x = w == 0 ? i0 : w == 1 ? i1 : i2;
            float ya = x[head], yb = x[head + 1];
            if (w == 0) {
                const float* c = cos_t + (i64)ti * d;
                const float* s = sin_t + (i64)ti * d;
                const float ga = ya, gb = yb;
                ya = 0.0f + (ga * c[jj] + gb * s[jj + 1]);
                yb = 0.0f + (gb * c[jj + 1] - ga * s[jj]);
            }
            out[wide] = ya;
            out[wide + 1] = yb;
            if (out16) {
                out16[wide] = asa_f32_to_bf16(ya);
                out16[wide + 1] = asa_f32_to_bf16(yb);
            }
        });
        return;
    }
    heads3_walk(b, t, h, d, [&](int w, i64 wide, i64 head) {
        const float* x = w == 0 ? i0 : w == 1 ? i1 : i2;
        const float y = x[head];
        out[wide] = y;
        if (out16) out16[wide] = asa_f32_to_bf16(y);
    });
}

// ------------------------------------------------------------------------------------------------
// F.normalize(x, dim=-1, eps=1e-8). out, inp: [rows,d]; norm: [rows]. One warp per row.

// twin: cpu::slot_ops::l2normalize_forward
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
// twin: cpu::slot_ops::l2normalize_backward
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

// The ALiBi strength (the twin of `alibi_bias`): (float)(softplus(raw[0]) + min_strength) for a
// learned strength (raw non-null), else (float)init.
__device__ __forceinline__ float alibi_strength(const float* raw, double init, double min_strength) {
    if (!raw) return (float)init;
    return (float)(asa_softplus((double)raw[0]) + min_strength);
}

// raw = slot_keys . k / sqrt(d) (f64 dot); wl = raw / wtemp + bias[h] * t, -inf where the
// token is masked. raw, wl: [B,H,K,T]; keys: [H,K,d]; k: [B,H,T,d]; valid: nullable [B,T] u8.
// The layer's prologue rides along (each nullable):
// - kparam [H,K,d], keep [H*K]: the slot keys are kparam * keep (the slot dropout, the twin of
//   `scale_rows`), computed where read and stored into keys by the blocks of batch 0, tile 0
//   (for the kernels after this one); without kparam, keys is read;
// - slopes [H]: bias[h] = slopes[h] * alibi_strength(alibi_raw, init, min_strength) (the twin
//   of `alibi_bias`); without slopes, bias_h [H] (nullable: no bias).
// One block per (b, h, tile of `tile` positions): the tile's key rows are staged in shared
// memory (row stride d + 1, so a warp's threads, one position each, read different banks),
// then one thread per (slot, position) output, positions fastest (the slot key is a broadcast
// read, the stores coalesce). Dynamic shared memory: tile * (d + 1) floats.
// twin: cpu::slot_ops::write_logits_forward
extern "C" __global__ void write_logits_forward(float* raw, float* wl, float* keys, const float* __restrict__ k,
                                                float wtemp, const float* __restrict__ bias_h,
                                                const unsigned char* __restrict__ valid, int b, int h, int t,
                                                int nk, int d, int tile, const float* __restrict__ kparam,
                                                const float* __restrict__ keep, const float* __restrict__ slopes,
                                                const float* __restrict__ alibi_raw, double init,
                                                double min_strength) {
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
    if (kparam && bi == 0 && t0 == 0)
        for (int i = threadIdx.x; i < nk * d; i += blockDim.x) {
            const i64 o = (i64)hi * nk * d + i;
            keys[o] = kparam[o] * keep[o / d];
        }
    __shared__ float bias_sh;
    if (threadIdx.x == 0)
        bias_sh = slopes ? slopes[hi] * alibi_strength(alibi_raw, init, min_strength) : (bias_h ? bias_h[hi] : 0.0f);
    const bool biased = slopes || bias_h;
    __syncthreads();
    const float bias = bias_sh;
    const double scale = 1.0 / sqrt((double)d);
    for (int o = threadIdx.x; o < nk * tile; o += blockDim.x) {
        const int s = o / tile, r = o - s * tile;
        if (r >= tn) continue;
        const i64 krow = ((i64)hi * nk + s) * d;
        const float* x = wl_smem + r * ld;
        double dot = 0.0;
        if (kparam) {
            const float f = keep[hi * nk + s];
            for (int j = 0; j < d; ++j) dot += (double)(kparam[krow + j] * f) * (double)x[j];
        } else {
            for (int j = 0; j < d; ++j) dot += (double)keys[krow + j] * (double)x[j];
        }
        const int ti = t0 + r;
        const i64 i = (bh * nk + s) * t + ti;
        float rv = (float)(dot * scale);
        raw[i] = rv;
        float v = rv / wtemp;
        if (biased) v = v + bias * (float)ti;
        if (valid && !valid[bi * t + ti]) v = ASA_NEG_INF;
        wl[i] = v;
    }
}

// dk [B,H,T,d] += sum_s dwl/wtemp/sqrt(d) * key[s,:] over unmasked positions (terms added in f32
// in slot order, as the CPU twin). One thread per (b,h,t,j).
// twin: cpu::slot_ops::write_logits_backward
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

// The finish of both keys kernels, in their last block (`asa_last_block`, one ticket):
// dkeys [H,K,d] += sum over b (in order) of (f32) pkeys[b] (the CPU's per-(b,h) partials);
// then, each nullable: dparam[i] += dkeys[i] * keep[i / d] (the slot keys parameter's gradient
// through the slot dropout, keep [H*K]) and dalibi[0] += (f32)(factor * sum_h slopes[h] *
// sum_{b,s} pbias[b,h,s]) (the learned ALiBi strength's; factor = sigmoid(raw), by value or
// from the step's scalar block: `asa_step_factor`).
__device__ __forceinline__ void wl_keys_finish(unsigned* ticket, float* dkeys, const double* pkeys, float* dparam,
                                               const float* keep, float* dalibi, const double* pbias,
                                               const float* slopes, double factor, int b, int h, int nk,
                                               int d) {
    if (!asa_last_block(ticket, gridDim.x)) return;
    const i64 hx = (i64)h * nk * d;
    for (i64 i = threadIdx.x; i < hx; i += blockDim.x) {
        float acc = dkeys[i];
        for (int bb = 0; bb < b; ++bb) acc = acc + (float)asa_ld_cg(pkeys + (i64)bb * hx + i);
        dkeys[i] = acc;
        if (dparam) dparam[i] = dparam[i] + acc * keep[i / d];
    }
    if (dalibi && threadIdx.x == 0) {
        double ds = 0.0;
        for (int hi = 0; hi < h; ++hi) {
            double acc = 0.0;
            for (int bi = 0; bi < b; ++bi)
                for (int s = 0; s < nk; ++s) acc += asa_ld_cg(pbias + ((i64)bi * h + hi) * nk + s);
            ds += acc * (double)slopes[hi];
        }
        dalibi[0] = dalibi[0] + (float)(ds * factor);
    }
}

// Per-(b,h) partial gradients of the slot keys and of the ALiBi bias:
// pkeys[b,h,s,j] = sum_t dwl/wtemp/sqrt(d) * k[t,j]; pbias[b,h,s] = sum_t dwl * t (both f64,
// unmasked positions, time order). One thread per (b,h,s,j); pbias nullable. Finished in the
// last block by `wl_keys_finish` (dkeys, dparam, dalibi; ticket: one counter).
// twin: cpu::slot_ops::write_logits_backward
extern "C" __global__ void write_logits_backward_keys(double* pkeys, double* pbias, const float* dwl,
                                                      const float* k, float wtemp, const unsigned char* valid,
                                                      int b, int h, int t, int nk, int d, unsigned* ticket,
                                                      float* dkeys, float* dparam, const float* keep,
                                                      float* dalibi, const float* slopes, double factor,
                                                      const double* alibi_at) {
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
    wl_keys_finish(ticket, dkeys, pkeys, dparam, keep, dalibi, pbias, slopes, asa_step_factor(factor, alibi_at),
                   b, h, nk, d);
}

// write_logits_backward_keys on tensor cores (Precision::Bf16): the same partials, pkeys[b,h] =
// gscale * dwl[b,h]^T k[b,h] as a [K][d] product over time (bf16 operands, f32 accumulation),
// pbias as the f64 walk. One block of 256 threads per (b,h) walks T in chunks of WK_CHUNK
// positions; each warp keeps its output tiles' accumulators (at most WK_TILES per warp: the
// host sends larger K x d to the f64 kernel). Dynamic shared memory: (Kp (WK_CHUNK + 1) +
// WK_CHUNK (dp + 1)) floats, Kp and dp the sizes padded to 16. Finished as
// write_logits_backward_keys.
#define WK_CHUNK 64
#define WK_TILES 4

// twin: cpu::slot_ops::write_logits_backward
extern "C" __global__ void __launch_bounds__(256)
    write_logits_backward_keys_bf16(double* pkeys, double* pbias, const float* dwl, const float* k, float wtemp,
                                    const unsigned char* valid, int b, int h, int t, int nk, int d,
                                    unsigned* ticket, float* dkeys, float* dparam, const float* keep,
                                    float* dalibi, const float* slopes, double factor, const double* alibi_at) {
    ASA_DYN_SHARED(float, wk_smem);
    const i64 bh = blockIdx.x, bi = bh / h;
    const int Kp = (nk + 15) & ~15, dp = (d + 15) & ~15, lg = WK_CHUNK + 1, lx = dp + 1;
    float* G = wk_smem;          // [Kp][WK_CHUNK + 1]: dwl of live positions
    float* X = G + Kp * lg;      // [WK_CHUNK][dp + 1]: the keys k
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, tn8 = dp >> 3;
    const int ntile = (Kp >> 4) * tn8;
    float acc[WK_TILES][4];
#pragma unroll
    for (int i = 0; i < WK_TILES; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
    double pb = 0.0;
    for (int t0 = 0; t0 < t; t0 += WK_CHUNK) {
        const int tn = min(WK_CHUNK, t - t0);
        for (int i = threadIdx.x; i < Kp * WK_CHUNK; i += blockDim.x) {
            const int s = i / WK_CHUNK, l = i - s * WK_CHUNK;
            const int ti = t0 + l;
            const bool live = s < nk && l < tn && (!valid || valid[bi * t + ti]);
            G[s * lg + l] = live ? dwl[(bh * nk + s) * t + ti] : 0.0f;
        }
        for (int i = threadIdx.x; i < WK_CHUNK * dp; i += blockDim.x) {
            const int l = i / dp, j = i - l * dp;
            X[l * lx + j] = (l < tn && j < d) ? k[(bh * t + t0 + l) * d + j] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < WK_TILES; ++i) {
            const int tile = warp + i * nw;
            if (tile < ntile)
                asa_mma_acc(acc[i], (tile / tn8) << 4, (tile % tn8) << 3, WK_CHUNK,
                            [&](int r, int x) { return G[r * lg + x]; }, [&](int x, int c) { return X[x * lx + c]; });
        }
        // the ALiBi bias partial: time order, f64
        for (int s = threadIdx.x; s < nk; s += blockDim.x)
            for (int l = 0; l < tn; ++l) {
                const double gw = (double)G[s * lg + l];
                if (gw != 0.0) pb += gw * (double)(t0 + l);
            }
        __syncthreads();
    }
    const double gscale = 1.0 / sqrt((double)d) / (double)wtemp;
#pragma unroll
    for (int i = 0; i < WK_TILES; ++i) {
        const int tile = warp + i * nw;
        if (tile < ntile)
            asa_mma_store(acc[i], (tile / tn8) << 4, (tile % tn8) << 3, [&](int r, int c, float x) {
                if (r < nk && c < d) pkeys[(bh * nk + r) * d + c] = gscale * (double)x;
            });
    }
    if (pbias)
        for (int s = threadIdx.x; s < nk; s += blockDim.x) pbias[bh * nk + s] = pb;
    wl_keys_finish(ticket, dkeys, pkeys, dparam, keep, dalibi, pbias, slopes, asa_step_factor(factor, alibi_at),
                   b, h, nk, d);
}

// dst [H*X] += sum over b of (f32) part[b, H*X], b in order (the CPU's per-(b,h) partials).
// twin: cpu::slot_ops::write_logits_backward
extern "C" __global__ void sum_batch_add(float* dst, const double* part, int b, i64 hx) {
    ASA_GRID_LOOP(i, hx) {
        float acc = dst[i];
        for (int bb = 0; bb < b; ++bb) acc = acc + (float)part[(i64)bb * hx + i];
        dst[i] = acc;
    }
}

// ------------------------------------------------------------------------------------------------
// the write scan (the reference's chunked running-max softmax; see slot_scan_forward in
// src/backend/cpu/slot_ops.rs for the math). One warp per (b,h,s), lanes over d, f64 accumulators.

// state: [B,H,T,K,d]; den, rmax: [B,H,K,T]; wl: [B,H,K,T]; v: [B,H,T,d].
// twin: cpu::slot_ops::slot_scan_forward
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
// twin: cpu::slot_ops::slot_scan_backward
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
// twin: cpu::slot_ops::slot_scan_backward
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
// twin: cpu::slot_ops::read_logits_forward
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
// twin: cpu::slot_ops::read_logits_backward
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
// twin: cpu::slot_ops::read_logits_backward
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
// twin: cpu::slot_ops::read_weights_forward
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
// twin: cpu::slot_ops::read_weights_backward
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
// twin: cpu::slot_ops::slot_mix_forward
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
// twin: cpu::slot_ops::slot_mix_backward
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
// slotspace refine: elementwise maps (RoPE, masks and phi of its q, k, v: cuda/refine.cu)

// out = tanh(x) (f64)
// twin: cpu::slot_ops::tanh_forward
extern "C" __global__ void tanh_forward(float* out, const float* inp, i64 n) {
    ASA_GRID_LOOP(i, n) { out[i] = (float)tanh((double)inp[i]); }
}

// dinp += dout * (1 - y^2)
// dinp16: nullable, the bf16 twin of the updated dinp.
// twin: cpu::slot_ops::tanh_backward
extern "C" __global__ void tanh_backward(float* dinp, const float* out, const float* dout, i64 n,
                                         unsigned short* dinp16) {
    ASA_GRID_LOOP(i, n) {
        float y = out[i];
        const float g = dinp[i] + dout[i] * (1.0f - y * y);
        dinp[i] = g;
        if (dinp16) dinp16[i] = asa_f32_to_bf16(g);
    }
}


// softmax over rows of K (f64). out, inp: [R,K]. One thread per row.
// twin: cpu::slot_ops::softmax_slots_forward
extern "C" __global__ void softmax_slots_forward(float* out, const float* inp, i64 rows, int nk) {
    ASA_GRID_LOOP(row, rows) { asa_softmax_row(out + row * nk, inp + row * nk, 1.0f, nk, 0); }
}

// dinp += y * (dy - sum(dy*y)) per row (f64 dot).
// twin: cpu::slot_ops::softmax_slots_backward
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
// twin: cpu::slot_ops::slot_mask_weights_forward
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
// twin: cpu::slot_ops::slot_mask_weights_backward
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
