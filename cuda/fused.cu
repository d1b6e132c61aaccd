// Fused slot write scan + read (forward and backward) without the [B,H,T,K,d] state history.
//
// The math is the CPU twins' (src/backend/cpu/slot_ops.rs): `slot_scan_forward` (the reference's
// chunked running-max softmax, exact `write_chunk_size` semantics), `read_logits_forward`,
// `read_weights_forward` (softmax routing + read slot mask), `slot_mix_forward`, and their
// backwards (`slot_scan_backward` with the gradient through the running max). Host side:
// src/backend/cuda/fused.rs, which documents the launch sequence.
//
// Why this parallelises over time: the running max R_t of the reference equals the global
// prefix max M_t = max_{u<=t} w_u whatever the chunking (the carried max of a chunk is the max
// of everything before it), so a token's in-chunk weight e_u = exp(w_u - M_u) depends on u alone
// and every scan quantity is a linear recurrence with known coefficients:
//   den_t = Cd_W * sc_t + sum_{u=c0..t} e_u,  num_t = Cn_W * sc_t + sum_{u=c0..t} e_u v_u,
//   sc_t = exp(M_{c0-1} - M_t),  (Cn, Cd)_{W+1} = (num, den) at the chunk's last position.
// Time is cut into tiles (whole chunks, or equal sub-tiles of one chunk); per-tile sums (one
// parallel pass), a short sequential pass over tiles for the carries, then one block per
// (b, h, tile) walks its positions with every slot's state in registers. The backward is the
// same three-level scheme run in reverse for the suffix sums of the scan gradient; the
// running-max gradient is a scalar affine recurrence finished by one warp per (b, h, slot).
//
// Thread layout of the per-tile kernels: a lane group of G lanes (G a power of two, 8 * G >= d)
// owns one slot, lanes over the slot's dims (j = jl + G*q, q < FU_E); a warp holds 32/G slots,
// a block ceil(K / (32/G)) warps. Per-slot dot products are reductions inside the group,
// cross-slot sums (read output, dq, dv) go through shared memory in warp order. f64
// accumulation everywhere the CPU twins accumulate in f64; no float atomics; every reduction
// has a fixed order, so results are bitwise reproducible.
#include "common.cuh"

#define FU_E 8        /* state elements (dims of the lane's slot) per lane */
#define FU_MAXNW 16   /* warps per block */
#define FU_MAXK 128   /* slots: softmax rows are spread 4 per lane */

// ------------------------------------------------------------------------------------------------
// helpers

// Tile i: positions [t0, t1). nsub == 0: tiles of L positions holding whole chunks (L is a
// multiple of the chunk); nsub > 0: every chunk is cut into nsub sub-tiles of L positions.
__device__ __forceinline__ void fu_tile(int i, int T, int c, int L, int nsub, int& t0, int& t1) {
    if (nsub == 0) {
        t0 = i * L;
        t1 = min(t0 + L, T);
    } else {
        int ci = i / nsub, k = i - ci * nsub;
        int cs = ci * c;
        t0 = cs + k * L;
        t1 = min(min(t0 + L, cs + c), T);
    }
}

__device__ __forceinline__ int fu_c0(int t, int c) { return (t / c) * c; }
__device__ __forceinline__ int fu_c1(int t, int c, int T) { return min(fu_c0(t, c) + c, T); }

// exp(a - b) with the f32 difference of the CPU twin, 0 while a (the carried max) is -inf
__device__ __forceinline__ double fu_scale(float a, float b) {
    return isfinite(a) ? exp((double)(a - b)) : 0.0;
}
// e = exp(w - M), 0 while the running max M is -inf
__device__ __forceinline__ double fu_e(float w, float m) {
    return isfinite(m) ? exp((double)(w - m)) : 0.0;
}

// sums inside a lane group of G lanes (every lane of the group gets the same bits: the xor
// butterfly adds the same pairs in every lane)
__device__ __forceinline__ double fu_gsum(double a, int G) {
    for (int o = G >> 1; o > 0; o >>= 1) a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
    return a;
}
__device__ __forceinline__ void fu_gsum2(double& a, double& b, int G) {
    for (int o = G >> 1; o > 0; o >>= 1) {
        a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
        b += __shfl_xor_sync(ASA_FULL_MASK, b, o);
    }
}
__device__ __forceinline__ void fu_gsum3(double& a, double& b, double& c, int G) {
    for (int o = G >> 1; o > 0; o >>= 1) {
        a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
        b += __shfl_xor_sync(ASA_FULL_MASK, b, o);
        c += __shfl_xor_sync(ASA_FULL_MASK, c, o);
    }
}
// sum over the lane groups of a warp (lanes with the same jl): every group gets the total
__device__ __forceinline__ double fu_xsum(double a, int G) {
    for (int o = G; o < 32; o <<= 1) a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
    return a;
}
__device__ __forceinline__ double fu_wmax(double a) {
    for (int o = 16; o > 0; o >>= 1) a = fmax(a, __shfl_xor_sync(ASA_FULL_MASK, a, o));
    return a;
}
__device__ __forceinline__ double fu_wsum(double a) {
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
    return a;
}

// Is slot s masked at time ti? keep: nullable [K] (0 = masked). (asa_masked of slot_ops.cu)
__device__ __forceinline__ bool fu_masked(const int* keep, int last_pos_only, int ti, int t, int s) {
    if (!keep) return false;
    if (last_pos_only && ti + 1 != t) return false;
    return keep[s] == 0;
}

// The read logit of slot s at position ti from its key part vk and content part vc (both
// scaled by 1/sqrt(d)): the read slot mask (mask_mode 0, `read`: both -inf; 1,
// `content_read_only`: the content part 0), then vk + gamma vc (vk without content read).
__device__ __forceinline__ float fu_read_logit(float& vk, float& vc, const int* keep, int last_pos_only,
                                               int mask_mode, int content, float gamma, int ti, int t, int s) {
    if (fu_masked(keep, last_pos_only, ti, t, s)) {
        if (mask_mode == 0) {
            vk = ASA_NEG_INF;
            vc = ASA_NEG_INF;
        } else {
            vc = 0.0f;
        }
    }
    return content ? __fadd_rn(vk, __fmul_rn(gamma, vc)) : vk;
}

// The softmax over slots of one position, a warp with lanes over slots: xs[i] = logit / rtemp
// of slot lane + 32 i (anything past K is ignored). Every lane gets the max, the sum and, with
// a `read` slot mask on this row (mrow), the kept slots' total for the renormalisation.
struct FuSoft {
    double mx, sum, msum;
    bool live, mrow;
};
__device__ __forceinline__ FuSoft fu_softmax_row(const double (&xs)[4], const int* keep, int last_pos_only,
                                                 int mask_mode, int ti, int t, int nk, int lane) {
    FuSoft r;
    r.mx = (double)ASA_NEG_INF;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        if (lane + 32 * i < nk) r.mx = fmax(r.mx, xs[i]);
    r.mx = fu_wmax(r.mx);
    r.live = isfinite(r.mx);
    r.sum = 0.0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        if (r.live && lane + 32 * i < nk) r.sum += exp(xs[i] - r.mx);
    r.sum = fu_wsum(r.sum);
    r.mrow = keep != 0 && mask_mode == 0 && (!last_pos_only || ti + 1 == t);
    r.msum = 0.0;
    if (r.mrow) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            if (s < nk && keep[s] != 0) r.msum += (double)(r.live ? (float)(exp(xs[i] - r.mx) / r.sum) : 0.0f);
        }
        r.msum = fu_wsum(r.msum);
    }
    return r;
}
// The read weight of slot s with logit / rtemp xv.
__device__ __forceinline__ float fu_softmax_p(const FuSoft& r, double xv, const int* keep, int s) {
    float ps = r.live ? (float)(exp(xv - r.mx) / r.sum) : 0.0f;
    if (r.mrow) ps = keep[s] != 0 ? (float)((double)ps / fmax(r.msum, (double)ASA_DEN_EPS)) : 0.0f;
    return ps;
}

// read_weights_backward of one position (softmax routing, the `read` mask's renormalisation),
// a warp with lanes over slots: xs(i) = logit / rtemp, g0(i) = the gradient of the read
// weights, y = the read weights (of slot lane + 32 i; xs and g0 are read only on masked rows). With a mask on the row it recomputes the
// softmax before the mask (p), the kept mass sk and dt = sum g0 y; fu_softmax_back_p then gives
// slot s's p and gy (the gradient after undoing the renormalisation), and
// dl = p (gy - sum_s p gy) / rtemp.
struct FuSoftB {
    double mx, esum, den, sk, dt;
    bool live, mrow;
};
template <class X, class G>
__device__ __forceinline__ FuSoftB fu_softmax_back_row(X xs, G g0, const float* yrow, const int* keep,
                                                       int last_pos_only, int mask_mode, int ti, int t, int nk,
                                                       int lane) {
    FuSoftB r;
    r.mrow = keep != 0 && mask_mode == 0 && (!last_pos_only || ti + 1 == t);
    r.mx = 0.0;
    r.esum = 1.0;
    r.den = 1.0;
    r.sk = 0.0;
    r.dt = 0.0;
    r.live = false;
    if (r.mrow) {
        r.mx = (double)ASA_NEG_INF;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (lane + 32 * i < nk) r.mx = fmax(r.mx, xs(i));
        r.mx = fu_wmax(r.mx);
        r.live = isfinite(r.mx);
        r.esum = 0.0;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (r.live && lane + 32 * i < nk) r.esum += exp(xs(i) - r.mx);
        r.esum = fu_wsum(r.esum);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            if (s < nk) {
                const double pre = r.live ? (double)(float)(exp(xs(i) - r.mx) / r.esum) : 0.0;
                if (keep[s] != 0) r.sk += pre;
                r.dt += g0(i) * (double)yrow[s];
            }
        }
        r.sk = fu_wsum(r.sk);
        r.dt = fu_wsum(r.dt);
        r.den = fmax(r.sk, (double)ASA_DEN_EPS);
    }
    return r;
}
__device__ __forceinline__ void fu_softmax_back_p(const FuSoftB& r, double xv, double g0, double y, const int* keep,
                                                  int s, double& p, double& gy) {
    if (r.mrow) {
        p = r.live ? (double)(float)(exp(xv - r.mx) / r.esum) : 0.0;
        gy = keep[s] != 0 ? (r.sk >= (double)ASA_DEN_EPS ? (g0 - r.dt) / r.den : g0 / r.den) : 0.0;
    } else {
        p = y;
        gy = g0;
    }
}

// The lane's place: warp, lane, lane group (slot) and the lane's first dim.
struct FuCtx {
    int warp, lane, nw, G, gi, jl, s;
    bool sv;  // the lane's slot exists
};
__device__ __forceinline__ FuCtx fu_ctx(int G, int K) {
    FuCtx x;
    x.warp = threadIdx.x >> 5;
    x.lane = threadIdx.x & 31;
    x.nw = blockDim.x >> 5;
    x.G = G;
    x.gi = x.lane / G;
    x.jl = x.lane & (G - 1);
    x.s = x.warp * (32 / G) + x.gi;
    x.sv = x.s < K;
    return x;
}

// dst[j] (=, or += when acc) <- sum over warps of part[w*d + j], warps in order (f64, one f32
// rounding). Every thread of the block calls it.
__device__ __forceinline__ void fu_rows_out(float* dst, const double* part, int nw, int d, bool acc) {
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double a = 0.0;
        for (int w = 0; w < nw; ++w) a += part[w * d + j];
        dst[j] = acc ? dst[j] + (float)a : (float)a;
    }
}

// Per-lane partials xo[q] of a cross-slot sum -> the warp's row in part (d values).
__device__ __forceinline__ void fu_part_store(double* part, const double* xo, const FuCtx& x, int d) {
#pragma unroll
    for (int q = 0; q < FU_E; ++q) {
        double v = fu_xsum(xo[q], x.G);
        int j = x.jl + x.G * q;
        if (x.gi == 0 && j < d) part[x.warp * d + j] = v;
    }
}

// ------------------------------------------------------------------------------------------------
// the forward walk: one slot's scan state in a lane group, position by position through a tile

struct FuWalk {
    double cn[FU_E], p[FU_E];  // carried num of the chunk (at c0-1); in-chunk sum of e*v
    double cd, pd;             // the same for den
    double sc;                 // scale of the last step (closes a chunk inside the tile)
    double den;                // den of the last step
    float mp;                  // rmax at c0-1 (-inf for the first chunk)
    float st[FU_E];            // state of the last step, rounded to f32 like the CPU's history
};

// Starts a walk at tile t0 from the carries (cn, cd: chunk carry; cp, cpd: partial in-chunk
// sums before t0). crow = (bh*ntiles + tile)*K + s; rm: rmax row of the slot.
__device__ __forceinline__ void fu_walk_init(FuWalk& W, const double* cn, const double* cd, const double* cp,
                                             const double* cpd, i64 crow, const float* rm, int t0, int c,
                                             int d, const FuCtx& x) {
#pragma unroll
    for (int q = 0; q < FU_E; ++q) {
        int j = x.jl + x.G * q;
        bool in = x.sv && j < d;
        W.cn[q] = in ? cn[crow * d + j] : 0.0;
        W.p[q] = in ? cp[crow * d + j] : 0.0;
        W.st[q] = 0.0f;
    }
    W.cd = x.sv ? cd[crow] : 0.0;
    W.pd = x.sv ? cpd[crow] : 0.0;
    int c0 = fu_c0(t0, c);
    W.mp = (x.sv && c0 > 0) ? rm[c0 - 1] : ASA_NEG_INF;
    W.sc = 0.0;
    W.den = 0.0;
}

// One position t: w = wl[s,t], m = rmax[s,t], mprev = rmax[s,t-1] (used when a chunk starts at
// t inside the tile), vt = v row t. Leaves den and the f32 state in W.
__device__ __forceinline__ void fu_walk_step(FuWalk& W, int t, int t0, int c, float w, float m, float mprev,
                                             const float* vt, int d, const FuCtx& x) {
    if (t != t0 && t % c == 0) {
        // a chunk starts here: its carry is num/den of the previous position
#pragma unroll
        for (int q = 0; q < FU_E; ++q) {
            W.cn[q] = fma(W.cn[q], W.sc, W.p[q]);
            W.p[q] = 0.0;
        }
        W.cd = fma(W.cd, W.sc, W.pd);
        W.pd = 0.0;
        W.mp = mprev;
    }
    double e = fu_e(w, m);
    double sc = fu_scale(W.mp, m);
    W.pd += e;
    W.den = fma(W.cd, sc, W.pd);
    double inv = 1.0 / fmax(W.den, (double)ASA_DEN_EPS);  // one division per step
#pragma unroll
    for (int q = 0; q < FU_E; ++q) {
        int j = x.jl + x.G * q;
        if (x.sv && j < d) {
            W.p[q] = fma(e, (double)vt[j], W.p[q]);
            W.st[q] = (float)(fma(W.cn[q], sc, W.p[q]) * inv);
        }
    }
    W.sc = sc;
}

// ------------------------------------------------------------------------------------------------
// forward, level 0: the running max. rmax [B,H,K,T] = prefix max of wl over time (the reference's
// R_t for every chunk size). One warp per (b,h,s), 32 positions per step.

// twin: cpu::slot_ops::slot_scan_forward
extern "C" __global__ void slot_scan_read_forward_rmax(float* rmax, const float* wl, int nbh, int t, int nk) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= nbh * nk) return;
    const float* ws = wl + (i64)warp * t;
    float* rm = rmax + (i64)warp * t;
    float carry = ASA_NEG_INF;
    for (int base = 0; base < t; base += 32) {
        int ti = base + lane;
        float x = ti < t ? ws[ti] : ASA_NEG_INF;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float y = __shfl_up_sync(ASA_FULL_MASK, x, o);
            if (lane >= o) x = fmaxf(x, y);
        }
        x = fmaxf(x, carry);
        if (ti < t) rm[ti] = x;
        carry = __shfl_sync(ASA_FULL_MASK, x, 31);
    }
}

// ------------------------------------------------------------------------------------------------
// forward, level 1: per tile and slot, the tile's contribution to the carries.
// nsub == 0 (whole chunks): the chain over the tile's chunks, started from zero:
//   comp = sum_W S_W * prod_{W' after W} sc_last(W'),  prod = prod_W sc_last(W),
// so that the carry after the tile is Cn * prod + comp (S_W = sum_{u in W} e_u v_u).
// nsub > 0: comp = the tile's sum of e_u v_u, prod = 1.
// sum_n: [B*H, ntiles, K, d]; sum_d, prod: [B*H, ntiles, K] (f64). Grid: B*H*ntiles blocks.

// twin: cpu::slot_ops::slot_scan_forward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_forward_sums(double* sum_n, double* sum_d, double* prod, const float* __restrict__ wl,
                                const float* __restrict__ rmax, const float* __restrict__ v, int nbh, int h,
                                int t, int nk, int d, int chunk, int tile, int nsub, int ntiles, int nchunks,
                                int group) {
    FuCtx x = fu_ctx(group, nk);
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    double acc[FU_E], comp[FU_E];
#pragma unroll
    for (int q = 0; q < FU_E; ++q) acc[q] = comp[q] = 0.0;
    double accd = 0.0, compd = 0.0, pr = 1.0, sc_last = 0.0;
    int c00 = fu_c0(t0, chunk);
    float mp = (x.sv && c00 > 0) ? rm[c00 - 1] : ASA_NEG_INF;
    float mprev = ASA_NEG_INF;
    for (int ti = t0; ti < t1; ++ti) {
        float w = x.sv ? ws[ti] : ASA_NEG_INF;
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        if (ti != t0 && ti % chunk == 0) {
            // the chunk ending at ti-1 is complete (only with nsub == 0)
#pragma unroll
            for (int q = 0; q < FU_E; ++q) {
                comp[q] = fma(comp[q], sc_last, acc[q]);
                acc[q] = 0.0;
            }
            compd = fma(compd, sc_last, accd);
            accd = 0.0;
            pr *= sc_last;
            mp = mprev;
        }
        double e = fu_e(w, m);
        sc_last = fu_scale(mp, m);
        accd += e;
        const float* vt = v + (bh * t + ti) * d;
#pragma unroll
        for (int q = 0; q < FU_E; ++q) {
            int j = x.jl + x.G * q;
            if (x.sv && j < d) acc[q] = fma(e, (double)vt[j], acc[q]);
        }
        mprev = m;
    }
    if (nsub == 0) {
#pragma unroll
        for (int q = 0; q < FU_E; ++q) comp[q] = fma(comp[q], sc_last, acc[q]);
        compd = fma(compd, sc_last, accd);
        pr *= sc_last;
    } else {
#pragma unroll
        for (int q = 0; q < FU_E; ++q) comp[q] = acc[q];
        compd = accd;
        pr = 1.0;
    }
    if (!x.sv) return;
    i64 row = (i64)blockIdx.x * nk + x.s;
#pragma unroll
    for (int q = 0; q < FU_E; ++q) {
        int j = x.jl + x.G * q;
        if (j < d) sum_n[row * d + j] = comp[q];
    }
    if (x.jl == 0) {
        sum_d[row] = compd;
        prod[row] = pr;
    }
}

// ------------------------------------------------------------------------------------------------
// forward, level 2: the carries at every tile start, in time order. One warp per (b,h,s), lanes
// over d. cn, cd: the chunk carry (num/den at c0-1 of the chunk holding the tile's first
// position); cp, cpd: the in-chunk sums from c0 to the tile start (0 when tiles hold whole
// chunks). cn, cp: [B*H, ntiles, K, d]; cd, cpd: [B*H, ntiles, K] (f64).

// twin: cpu::slot_ops::slot_scan_forward
extern "C" __global__ void slot_scan_read_forward_carry(double* cn, double* cd, double* cp, double* cpd,
                                                        const double* __restrict__ sum_n,
                                                        const double* __restrict__ sum_d,
                                                        const double* __restrict__ prod,
                                                        const float* __restrict__ rmax, int nbh, int h, int t,
                                                        int nk, int d, int chunk, int tile, int nsub, int ntiles,
                                                        int nchunks, int group) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= nbh * nk) return;
    int bh = warp / nk, s = warp % nk;
    const float* rm = rmax + (i64)warp * t;
    double Cn[ASA_MAXJ], P[ASA_MAXJ];
#pragma unroll
    for (int q = 0; q < ASA_MAXJ; ++q) Cn[q] = P[q] = 0.0;
    double Cd = 0.0, Pd = 0.0;
    // the tile sums are loaded one tile ahead
    double nsn[ASA_MAXJ], nsd, npr;
#define FU_F2_LOAD(ii)                                                          \
    {                                                                           \
        i64 r_ = ((i64)bh * ntiles + (ii)) * nk + s;                            \
        _Pragma("unroll") for (int q = 0; q < ASA_MAXJ; ++q) {                  \
            int j = lane + 32 * q;                                              \
            nsn[q] = j < d ? sum_n[r_ * d + j] : 0.0;                           \
        }                                                                       \
        nsd = sum_d[r_];                                                        \
        npr = nsub == 0 ? prod[r_] : 1.0;                                       \
    }
    FU_F2_LOAD(0);
    for (int i = 0; i < ntiles; ++i) {
        i64 row = ((i64)bh * ntiles + i) * nk + s;
        double sn[ASA_MAXJ];
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) sn[q] = nsn[q];
        double sd = nsd, pr = npr;
        if (i + 1 < ntiles) FU_F2_LOAD(i + 1);
#pragma unroll
        for (int q = 0; q < ASA_MAXJ; ++q) {
            int j = lane + 32 * q;
            if (j < d) {
                cn[row * d + j] = Cn[q];
                cp[row * d + j] = P[q];
            }
        }
        if (lane == 0) {
            cd[row] = Cd;
            cpd[row] = Pd;
        }
        if (nsub == 0) {
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) Cn[q] = fma(Cn[q], pr, sn[q]);
            Cd = fma(Cd, pr, sd);
        } else {
#pragma unroll
            for (int q = 0; q < ASA_MAXJ; ++q) P[q] += sn[q];
            Pd += sd;
            int t0, t1;
            fu_tile(i, t, chunk, tile, nsub, t0, t1);
            int c0 = fu_c0(t0, chunk);
            if (t1 == min(c0 + chunk, t)) {
                // the tile closes its chunk
                double sc = fu_scale(c0 > 0 ? rm[c0 - 1] : ASA_NEG_INF, rm[t1 - 1]);
#pragma unroll
                for (int q = 0; q < ASA_MAXJ; ++q) {
                    Cn[q] = fma(Cn[q], sc, P[q]);
                    P[q] = 0.0;
                }
                Cd = fma(Cd, sc, Pd);
                Pd = 0.0;
            }
        }
    }
#undef FU_F2_LOAD
}

// ------------------------------------------------------------------------------------------------
// forward, level 3: the read. One block per (b,h,tile) walks the tile; per position every slot's
// state (registers), den (-> den [B,H,K,T]), read logits lkey = q.key/sqrt(d), lcont =
// q.state/sqrt(d) (content read), the slot mask (mask_mode 0: read -> both -inf, 1: content only
// -> lcont 0), softmax(logits / rtemp), the read mask with renormalisation (mode 0), rw
// [B,H,T,K], and out1 [B,H,T,d] = sum_s rw * state. The chunk carries are saved to cn_chunk
// [B*H, nchunks, K, d] (f32) for the backward. lkey, lcont, logits [B,H,T,K]: nullable outputs.
// Dynamic shared memory: 16*NW*d + 16*K bytes.

// twin: cpu::slot_ops::slot_scan_forward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_forward(float* out1, float* rw, float* lkey, float* lcont, float* logits, float* den,
                           float* cn_chunk, const float* __restrict__ wl, const float* __restrict__ rmax,
                           const float* __restrict__ v, const float* __restrict__ q,
                           const float* __restrict__ keys, const double* __restrict__ cn,
                           const double* __restrict__ cd, const double* __restrict__ cp,
                           const double* __restrict__ cpd,
                           float gamma_value, const double* gamma_at, float rtemp, const int* keep,
                           int last_pos_only, int mask_mode, int content, int nbh, int h, int t, int nk, int d,
                           int chunk, int tile, int nsub, int ntiles, int nchunks, int group,
                           unsigned short* rw16) {
    const float gamma = asa_step_value(gamma_value, gamma_at);  // `Learned`
    ASA_DYN_SHARED(double, fu_smem);
    FuCtx x = fu_ctx(group, nk);
    double* part = fu_smem;                          // [2][NW][d]
    float* lg_sh = (float*)(fu_smem + 2 * x.nw * d);  // [2][K]
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int hi = (int)(bh % h);
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    float* dn = den + srow;
    double scale_d = 1.0 / sqrt((double)d);
    float key[FU_E];
#pragma unroll
    for (int qq = 0; qq < FU_E; ++qq) {
        int j = x.jl + x.G * qq;
        key[qq] = (x.sv && j < d) ? keys[((i64)hi * nk + x.s) * d + j] : 0.0f;
    }
    FuWalk W;
    fu_walk_init(W, cn, cd, cp, cpd, (i64)blockIdx.x * nk + x.s, rm, t0, chunk, d, x);
    float mprev = ASA_NEG_INF;
    for (int ti = t0; ti < t1; ++ti) {
        int it = ti - t0, buf = it & 1;
        i64 row = bh * t + ti;  // (b,h,t)
        const float* vt = v + row * d;
        const float* qt = q + row * d;
        float w = x.sv ? ws[ti] : ASA_NEG_INF;
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        fu_walk_step(W, ti, t0, chunk, w, m, mprev, vt, d, x);
        mprev = m;
        if (x.sv && ti % chunk == 0) {
            float* o = cn_chunk + ((bh * nchunks + ti / chunk) * nk + x.s) * d;
#pragma unroll
            for (int qq = 0; qq < FU_E; ++qq) {
                int j = x.jl + x.G * qq;
                if (j < d) o[j] = (float)W.cn[qq];
            }
        }
        if (x.sv && x.jl == 0) dn[ti] = (float)W.den;
        // read logits
        double ak = 0.0, ac = 0.0;
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            if (x.sv && j < d) {
                double qj = (double)qt[j];
                ak += (double)key[qq] * qj;
                ac += (double)W.st[qq] * qj;
            }
        }
        fu_gsum2(ak, ac, x.G);
        if (x.sv) {
            float vk = (float)(ak * scale_d);
            float vc = content ? (float)(ac * scale_d) : 0.0f;
            float lgv = fu_read_logit(vk, vc, keep, last_pos_only, mask_mode, content, gamma, ti, t, x.s);
            if (x.jl == 0) {
                lg_sh[buf * nk + x.s] = lgv;
                i64 o = row * nk + x.s;
                if (lkey) lkey[o] = vk;
                if (lcont && content) lcont[o] = vc;
                if (logits) logits[o] = lgv;
            }
        }
        __syncthreads();
        // out1 of the previous position (its partials are complete)
        if (it > 0) fu_rows_out(out1 + (row - 1) * d, part + (buf ^ 1) * x.nw * d, x.nw, d, false);
        // softmax of the row (every warp, lanes over slots)
        double xs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int s = x.lane + 32 * i;
            xs[i] = s < nk ? (double)lg_sh[buf * nk + s] / (double)rtemp : (double)ASA_NEG_INF;
        }
        const FuSoft sm = fu_softmax_row(xs, keep, last_pos_only, mask_mode, ti, t, nk, x.lane);
        float rws = 0.0f;
        if (x.sv) {
            rws = fu_softmax_p(sm, (double)lg_sh[buf * nk + x.s] / (double)rtemp, keep, x.s);
            if (x.jl == 0) {
                rw[row * nk + x.s] = rws;
                if (rw16) rw16[row * nk + x.s] = asa_f32_to_bf16(rws);
            }
        }
        // this position's out1 partials
        double xo[FU_E];
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            xo[qq] = (x.sv && j < d) ? (double)rws * (double)W.st[qq] : 0.0;
        }
        fu_part_store(part + buf * x.nw * d, xo, x, d);
    }
    __syncthreads();
    fu_rows_out(out1 + (bh * t + t1 - 1) * d, part + ((t1 - 1 - t0) & 1) * x.nw * d, x.nw, d, false);
}

// ------------------------------------------------------------------------------------------------
// The tiles on tensor cores (Precision::Bf16): the forward's level 3, the state mix and the state
// dot computed for every position of a tile at once from the same carries, as small matrix
// products (the chunk form of docs/METHOD.md; mma.sync m16n8k16, bf16 operands, f32
// accumulation). A tile [t0, t0 + L) lies inside one write chunk (the host's plan guarantees
// it). Per slot k and position l:
//   alpha[l,k] = exp(w - M)  (M = rmax),  E[l,k] = exp(M_{c0-1} - M)  (0 in the first chunk)
//   den[l,k]   = E cd + cpd + sum_{l' <= l} alpha[l',k]                  (f64, a walk per slot)
//   state_l[k] = (E C_k + P_k + sum_{l' <= l} alpha[l',k] v_l') / den    (never formed)
// with C, P the chunk carry and the in-chunk prefix at t0 (cn, cp of the carries pass). Then
//   x . state  = (E (X C^T) + X P^T + (mask (X V^T)) alpha) / den         (content logits, dot)
//   sum_k rho state = (rho E) C + rho P + (mask (rho alpha^T)) V          (read output, mix)
// with rho = weights / den and mask the lower triangle l' <= l. Sizes padded to 16 (Lp, Kp, dp);
// 256 threads; dynamic shared memory (f32 unless noted), its size `FusedPlan::smem_tc`:
//   f64 cd, cpd [Kp]; X, V [Lp][dp+1]; C, P, keys [Kp][dp+1]; QV [Lp][Lp+1];
//   A, E, DN, LK, LC, R [Lp][Kp+1]; G [Lp][Kp+1] (in the keys' room where it fits); mp [Kp].

#define FT_THREADS 256

__device__ __forceinline__ int ft_pad(int x) { return (x + 15) & ~15; }

// A tile's place, padded sizes, row strides and shared arrays.
struct FtTile {
    i64 bh, crow;  // (b,h); the carries' row of slot 0
    int hi, t0, L, c0, Lp, Kp, dp, ld, lk, ll;
    double *cd, *cpd;
    float *X, *V, *C, *P, *KY, *QV, *A, *E, *DN, *LK, *LC, *R, *G, *mp;
};

__device__ __forceinline__ FtTile ft_tile(double* smem, int h, int t, int nk, int d, int chunk, int tile, int nsub,
                                          int ntiles) {
    FtTile f;
    const int ti_ = blockIdx.x % ntiles;
    f.bh = blockIdx.x / ntiles;
    f.crow = (i64)blockIdx.x * nk;
    f.hi = (int)(f.bh % h);
    int t1;
    fu_tile(ti_, t, chunk, tile, nsub, f.t0, t1);
    f.L = t1 - f.t0;
    f.c0 = fu_c0(f.t0, chunk);
    f.Lp = ft_pad(f.L);
    f.Kp = ft_pad(nk);
    f.dp = ft_pad(d);
    f.ld = f.dp + 1;
    f.lk = f.Kp + 1;
    f.ll = f.Lp + 1;
    f.cd = smem;
    f.cpd = f.cd + f.Kp;
    f.X = (float*)(f.cpd + f.Kp);
    f.V = f.X + f.Lp * f.ld;
    f.C = f.V + f.Lp * f.ld;
    f.P = f.C + f.Kp * f.ld;
    f.KY = f.P + f.Kp * f.ld;
    f.QV = f.KY + f.Kp * f.ld;
    f.A = f.QV + f.Lp * f.ll;
    f.E = f.A + f.Lp * f.lk;
    f.DN = f.E + f.Lp * f.lk;
    f.LK = f.DN + f.Lp * f.lk;
    f.LC = f.LK + f.Lp * f.lk;
    f.R = f.LC + f.Lp * f.lk;
    // G (the scan backward's) shares the keys' room where it fits: no kernel uses both
    const bool shared_g = f.Kp * f.ld >= f.Lp * f.lk;
    f.G = shared_g ? f.KY : f.R + f.Lp * f.lk;
    f.mp = f.R + f.Lp * f.lk + (shared_g ? 0 : f.Lp * f.lk);
    return f;
}

// dst [Lp][dp+1] = the tile's rows of src [B,H,T,d] (0 on the padding).
__device__ __forceinline__ void ft_stage_rows(float* dst, const float* __restrict__ src, const FtTile& f, int t,
                                              int d) {
    for (int i = threadIdx.x; i < f.Lp * f.dp; i += blockDim.x) {
        const int l = i / f.dp, j = i - l * f.dp;
        dst[l * f.ld + j] = (l < f.L && j < d) ? src[(f.bh * t + f.t0 + l) * d + j] : 0.0f;
    }
}

// KY = the head's slot keys [Kp][dp+1] (0 on the padding).
__device__ __forceinline__ void ft_stage_keys(const FtTile& f, const float* __restrict__ keys, int nk, int d) {
    for (int i = threadIdx.x; i < f.Kp * f.dp; i += blockDim.x) {
        const int s = i / f.dp, j = i - s * f.dp;
        f.KY[s * f.ld + j] = (s < nk && j < d) ? keys[((i64)f.hi * nk + s) * d + j] : 0.0f;
    }
}

// mp = the carried max (rmax at c0 - 1), then alpha (A; 0 when wl is null) and E. Ends with a
// barrier.
__device__ __forceinline__ void ft_stage_ae(const FtTile& f, const float* __restrict__ wl,
                                            const float* __restrict__ rmax, int t, int nk) {
    for (int s = threadIdx.x; s < f.Kp; s += blockDim.x)
        f.mp[s] = (s < nk && f.c0 > 0) ? rmax[(f.bh * nk + s) * t + f.c0 - 1] : ASA_NEG_INF;
    __syncthreads();
    for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x) {
        const int l = i / f.Kp, s = i - l * f.Kp;
        float a = 0.0f, e = 0.0f;
        if (l < f.L && s < nk) {
            const i64 o = (f.bh * nk + s) * t + f.t0 + l;
            const float m = rmax[o];
            if (wl) a = (float)fu_e(wl[o], m);
            e = (float)fu_scale(f.mp[s], m);
        }
        f.A[l * f.lk + s] = a;
        f.E[l * f.lk + s] = e;
    }
    __syncthreads();
}

// The state gradient's j-th rank-1 term per position, g = rw dout1 + sw ddelta + gc q: X = the
// tile's rows of dout1 (j 0), ddelta (1) or q (2), LK = W = its coefficient / max(den, eps)
// ([Lp][Kp], 0 on the padding); so gn = sum_j W_j x_j. False (nothing staged) for an absent
// term (no refine).
__device__ __forceinline__ bool ft_stage_grad(const FtTile& f, int j, const float* __restrict__ rw,
                                              const float* __restrict__ sw, const double* __restrict__ gc,
                                              const float* __restrict__ dout1, const float* __restrict__ ddelta,
                                              const float* __restrict__ q, int t, int nk, int d) {
    if (j == 1 && !(sw && ddelta)) return false;
    ft_stage_rows(f.X, j == 0 ? dout1 : j == 1 ? ddelta : q, f, t, d);
    for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x) {
        const int l = i / f.Kp, s = i - l * f.Kp;
        float w = 0.0f;
        if (l < f.L && s < nk) {
            const i64 o = (f.bh * t + f.t0 + l) * nk + s;
            const double c = j == 0 ? (double)rw[o] : j == 1 ? (double)sw[o] : gc[o];
            w = (float)(c / (double)fmaxf(f.DN[l * f.lk + s], ASA_DEN_EPS));
        }
        f.LK[l * f.lk + s] = w;
    }
    return true;
}

// G = gd = -gsum / max(den, eps) (0 where den < eps, and on the padding).
__device__ __forceinline__ void ft_stage_gd(const FtTile& f, const double* __restrict__ gsum, int t, int nk) {
    for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x) {
        const int l = i / f.Kp, s = i - l * f.Kp;
        float g = 0.0f;
        if (l < f.L && s < nk) {
            const float dn = f.DN[l * f.lk + s];
            if (dn >= ASA_DEN_EPS) g = (float)(-gsum[(f.bh * t + f.t0 + l) * nk + s] / (double)dn);
        }
        f.G[l * f.lk + s] = g;
    }
}

// V rows, the carries C, P (f32), cd, cpd and the carried max mp; then alpha and E. When
// cn_chunk is not null and the tile opens its chunk, the chunk carry is saved there.
__device__ __forceinline__ void ft_stage_scan(const FtTile& f, float* cn_chunk, const float* __restrict__ wl,
                                              const float* __restrict__ rmax, const float* __restrict__ v,
                                              const double* __restrict__ cn, const double* __restrict__ cd,
                                              const double* __restrict__ cp, const double* __restrict__ cpd,
                                              int t, int nk, int d, int chunk, int nchunks) {
    ft_stage_rows(f.V, v, f, t, d);
    const bool save = cn_chunk && f.t0 == f.c0;
    for (int i = threadIdx.x; i < f.Kp * f.dp; i += blockDim.x) {
        const int s = i / f.dp, j = i - s * f.dp;
        const bool in = s < nk && j < d;
        const float cv = in ? (float)cn[(f.crow + s) * d + j] : 0.0f;
        f.C[s * f.ld + j] = cv;
        f.P[s * f.ld + j] = in ? (float)cp[(f.crow + s) * d + j] : 0.0f;
        if (in && save) cn_chunk[((f.bh * nchunks + f.c0 / chunk) * nk + s) * d + j] = cv;
    }
    for (int s = threadIdx.x; s < f.Kp; s += blockDim.x) {
        f.cd[s] = s < nk ? cd[f.crow + s] : 0.0;
        f.cpd[s] = s < nk ? cpd[f.crow + s] : 0.0;
    }
    ft_stage_ae(f, wl, rmax, t, nk);
}

// DN = den (a walk per slot over the tile in f64, written to den [B,H,K,T] when den_out is not
// null), or read from den_in (the forward's); 1 on the padding.
__device__ __forceinline__ void ft_den(const FtTile& f, float* den_out, const float* __restrict__ den_in, int t,
                                       int nk) {
    if (den_in) {
        for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x) {
            const int l = i / f.Kp, s = i - l * f.Kp;
            f.DN[l * f.lk + s] = (l < f.L && s < nk) ? den_in[(f.bh * nk + s) * t + f.t0 + l] : 1.0f;
        }
        return;
    }
    for (int s = threadIdx.x; s < f.Kp; s += blockDim.x) {
        double acc = f.cpd[s];
        for (int l = 0; l < f.Lp; ++l) {
            float dv = 1.0f;
            if (l < f.L && s < nk) {
                acc += (double)f.A[l * f.lk + s];
                dv = (float)fma((double)f.E[l * f.lk + s], f.cd[s], acc);
                den_out[(f.bh * nk + s) * t + f.t0 + l] = dv;
            }
            f.DN[l * f.lk + s] = dv;
        }
    }
}

// LC = E (X C^T) + X P^T + (mask (X V^T)) alpha: the rows of X dotted with the (unnormalised)
// states, [Lp][Kp]. Uses QV. Ends with a barrier.
__device__ __forceinline__ void ft_dot_states(const FtTile& f, int d) {
    const int ld = f.ld, lk = f.lk, ll = f.ll;
    asa_mma_tiles(f.Lp, f.Kp, [&](int r0, int n0) {
        float ac[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ap[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        auto lx = [&](int r, int x) { return f.X[r * ld + x]; };
        asa_mma_acc(ac, r0, n0, d, lx, [&](int x, int c) { return f.C[c * ld + x]; });
        asa_mma_acc(ap, r0, n0, d, lx, [&](int x, int c) { return f.P[c * ld + x]; });
        asa_mma_store(ac, r0, n0, [&](int r, int c, float x) { f.LC[r * lk + c] = x * f.E[r * lk + c]; });
        asa_mma_store(ap, r0, n0, [&](int r, int c, float x) { f.LC[r * lk + c] += x; });
    });
    asa_mma_tiles(f.Lp, f.Lp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, d, [&](int r, int x) { return f.X[r * ld + x]; },
                    [&](int x, int c) { return f.V[c * ld + x]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.QV[r * ll + c] = c <= r ? x : 0.0f; });
    });
    __syncthreads();
    asa_mma_tiles(f.Lp, f.Kp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, f.Lp, [&](int r, int x) { return f.QV[r * ll + x]; },
                    [&](int x, int c) { return f.A[x * lk + c]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.LC[r * lk + c] += x; });
    });
    __syncthreads();
}

// The read logits' numerators of the staged rows X: LK = X keys^T (key part) and, with the
// content read, LC = X . states (ft_dot_states). Ends with a barrier.
__device__ __forceinline__ void ft_read_logits(const FtTile& f, int d, int content) {
    const int ld = f.ld, lk = f.lk;
    asa_mma_tiles(f.Lp, f.Kp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, d, [&](int r, int x) { return f.X[r * ld + x]; },
                    [&](int x, int c) { return f.KY[c * ld + x]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.LK[r * lk + c] = x; });
    });
    if (content)
        ft_dot_states(f, d);
    else
        __syncthreads();
}

// The refine's merged output of the mix kernels (both null-safe: merged null = none):
// merged[b,t,hi*d+j] = base[bh,t,j] + gate * x for the delta x at (bh, ti, j) (the refine's
// out_h = out1 + gate * delta, merged for out_proj), with its bf16 twin merged16 (nullable).
__device__ __forceinline__ void mix_merge(float* merged, unsigned short* merged16, const float* base, float gate,
                                          i64 bh, int ti, int j, float x, int h, int t, int d) {
    const i64 bi = bh / h, hi = bh - bi * h;
    const float y = base[(bh * t + ti) * d + j] + gate * x;
    const i64 o = ((bi * t + ti) * h + hi) * d + j;
    merged[o] = y;
    if (merged16) merged16[o] = asa_f32_to_bf16(y);
}

// out [B,H,T,d] (=, or += when add) = sum_k rho state = (rho E) C + rho P + (mask (rho alpha^T)) V
// for R = rho, LK = rho E ([Lp][Kp], 0 on the padding), plus LC keys when keyed (LC: [Lp][Kp],
// keys: the staged KY). Uses QV. f(r, c, x) after each stored element (r < L, c < d).
template <class F>
__device__ __forceinline__ void ft_mix_out_f(const FtTile& f, float* out, int t, int d, bool add, bool keyed,
                                             F after) {
    const int ld = f.ld, lk = f.lk, ll = f.ll;
    asa_mma_tiles(f.Lp, f.Lp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, f.Kp, [&](int r, int x) { return f.R[r * lk + x]; },
                    [&](int x, int c) { return f.A[c * lk + x]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.QV[r * ll + c] = c <= r ? x : 0.0f; });
    });
    __syncthreads();
    asa_mma_tiles(f.Lp, f.dp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, f.Kp, [&](int r, int x) { return f.LK[r * lk + x]; },
                    [&](int x, int c) { return f.C[x * ld + c]; });
        asa_mma_acc(acc, r0, n0, f.Kp, [&](int r, int x) { return f.R[r * lk + x]; },
                    [&](int x, int c) { return f.P[x * ld + c]; });
        asa_mma_acc(acc, r0, n0, f.Lp, [&](int r, int x) { return f.QV[r * ll + x]; },
                    [&](int x, int c) { return f.V[x * ld + c]; });
        if (keyed)
            asa_mma_acc(acc, r0, n0, f.Kp, [&](int r, int x) { return f.LC[r * lk + x]; },
                        [&](int x, int c) { return f.KY[x * ld + c]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) {
            if (r < f.L && c < d) {
                float* o = out + (f.bh * t + f.t0 + r) * d + c;
                *o = add ? *o + x : x;
                after(r, c, x);
            }
        });
    });
}

__device__ __forceinline__ void ft_mix_out(const FtTile& f, float* out, int t, int d, bool add = false,
                                           bool keyed = false) {
    ft_mix_out_f(f, out, t, d, add, keyed, [](int, int, float) {});
}

// slot_scan_read_forward_sums on tensor cores (tiles inside one chunk): the same outputs, sum_n =
// alpha^T V (a [K][d] product over the tile), sum_d = the column sums of alpha (f64), prod = E
// at the tile's last position when the tile is its chunk (nsub == 0), else 1.
// twin: cpu::slot_ops::slot_scan_forward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_forward_sums_bf16(double* sum_n, double* sum_d, double* prod, const float* __restrict__ wl,
                                     const float* __restrict__ rmax, const float* __restrict__ v, int nbh, int h,
                                     int t, int nk, int d, int chunk, int tile, int nsub, int ntiles, int nchunks,
                                     int group) {
    ASA_DYN_SHARED(double, ft_smem);
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    const int ld = f.ld, lk = f.lk;
    ft_stage_rows(f.V, v, f, t, d);
    ft_stage_ae(f, wl, rmax, t, nk);
    asa_mma_tiles(f.Kp, f.dp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, f.Lp, [&](int r, int x) { return f.A[x * lk + r]; },
                    [&](int x, int c) { return f.V[x * ld + c]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) {
            if (r < nk && c < d) sum_n[(f.crow + r) * d + c] = (double)x;
        });
    });
    for (int s = threadIdx.x; s < nk; s += blockDim.x) {
        double a = 0.0;
        for (int l = 0; l < f.L; ++l) a += (double)f.A[l * lk + s];
        sum_d[f.crow + s] = a;
        prod[f.crow + s] = nsub == 0 ? (double)f.E[(f.L - 1) * lk + s] : 1.0;
    }
}

// slot_scan_read_forward on tensor cores: the same arguments and outputs.
// twin: cpu::slot_ops::slot_scan_forward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_forward_bf16(float* out1, float* rw, float* lkey, float* lcont, float* logits, float* den,
                                float* cn_chunk, const float* __restrict__ wl, const float* __restrict__ rmax,
                                const float* __restrict__ v, const float* __restrict__ q,
                                const float* __restrict__ keys, const double* __restrict__ cn,
                                const double* __restrict__ cd, const double* __restrict__ cp,
                                const double* __restrict__ cpd,
                                float gamma_value, const double* gamma_at, float rtemp, const int* keep,
                                int last_pos_only, int mask_mode, int content, int nbh, int h, int t, int nk, int d,
                                int chunk, int tile, int nsub, int ntiles, int nchunks, int group,
                                unsigned short* rw16) {
    const float gamma = asa_step_value(gamma_value, gamma_at);  // `Learned`
    ASA_DYN_SHARED(double, ft_smem);
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    const int ld = f.ld, lk = f.lk, L = f.L, t0 = f.t0;
    const i64 bh = f.bh;
    ft_stage_rows(f.X, q, f, t, d);
    ft_stage_keys(f, keys, nk, d);
    ft_stage_scan(f, cn_chunk, wl, rmax, v, cn, cd, cp, cpd, t, nk, d, chunk, nchunks);
    ft_den(f, den, nullptr, t, nk);
    ft_read_logits(f, d, content);
    // the read: logits, slot mask, softmax over slots (a warp per position, as the walk), then
    // rho = rw / den into R and rho E into LK
    const double scale_d = 1.0 / sqrt((double)d);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int l = warp; l < L; l += nw) {
        const int ti = t0 + l;
        const i64 row = bh * t + ti;
        double xs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            xs[i] = (double)ASA_NEG_INF;
            if (s < nk) {
                const double dnv = fmax((double)f.DN[l * lk + s], (double)ASA_DEN_EPS);
                float vk = (float)((double)f.LK[l * lk + s] * scale_d);
                float vc = content ? (float)((double)f.LC[l * lk + s] / dnv * scale_d) : 0.0f;
                const float lgv = fu_read_logit(vk, vc, keep, last_pos_only, mask_mode, content, gamma, ti, t, s);
                const i64 o = row * nk + s;
                if (lkey) lkey[o] = vk;
                if (lcont && content) lcont[o] = vc;
                if (logits) logits[o] = lgv;
                xs[i] = (double)lgv / (double)rtemp;
            }
        }
        const FuSoft sm = fu_softmax_row(xs, keep, last_pos_only, mask_mode, ti, t, nk, lane);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            if (s >= f.Kp) continue;
            float ps = 0.0f;
            if (s < nk) {
                ps = fu_softmax_p(sm, xs[i], keep, s);
                rw[row * nk + s] = ps;
                if (rw16) rw16[row * nk + s] = asa_f32_to_bf16(ps);
            }
            const float rho = ps / fmaxf(f.DN[l * lk + s], ASA_DEN_EPS);
            f.R[l * lk + s] = rho;
            f.LK[l * lk + s] = rho * f.E[l * lk + s];
        }
    }
    for (int i = threadIdx.x; i < (f.Lp - L) * f.Kp; i += blockDim.x) {
        const int l = L + i / f.Kp, s = i % f.Kp;
        f.R[l * lk + s] = 0.0f;
        f.LK[l * lk + s] = 0.0f;
    }
    __syncthreads();
    ft_mix_out(f, out1, t, d);
}

// slot_scan_read_backward_read on tensor cores: the same outputs (dq +=, gc, gsum, the key and
// gamma partials) from the same inputs plus den (the forward's, [B,H,K,T]). Per tile: the
// states dotted with dout1 and q (ft_dot_states twice), the key logits, then per position (a warp,
// as the walk) drw, the softmax backward with the read mask, dl; then dq += dl_key keys / sqrt(d)
// + sum_s gc state (ft_mix_out with rho = gc / den), dkeys_part = dl_key^T q / sqrt(d).
// twin: cpu::slot_ops::read_logits_backward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_backward_read_bf16(float* dq, double* gc_out, double* gsum_out, double* dkeys_part,
                                      double* dgamma_part, const float* __restrict__ drw_in,
                                      const float* __restrict__ dout1, const float* __restrict__ rw,
                                      const float* __restrict__ sw, const float* __restrict__ dsw,
                                      const float* __restrict__ q, const float* __restrict__ keys,
                                      const float* __restrict__ wl, const float* __restrict__ rmax,
                                      const float* __restrict__ v, const float* __restrict__ den,
                                      const double* __restrict__ cn, const double* __restrict__ cd,
                                      const double* __restrict__ cp, const double* __restrict__ cpd,
                                      float gamma_value, const double* gamma_at,
                                      float rtemp, const int* keep, int last_pos_only, int mask_mode, int content,
                                      int nbh, int h, int t, int nk, int d, int chunk, int tile, int nsub,
                                      int ntiles, int nchunks, int group) {
    const float gamma = asa_step_value(gamma_value, gamma_at);  // `Learned`
    ASA_DYN_SHARED(double, ft_smem);
    __shared__ double ft_red[FT_THREADS / 32];
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    const int ld = f.ld, lk = f.lk, L = f.L, t0 = f.t0;
    const i64 bh = f.bh;
    ft_stage_keys(f, keys, nk, d);
    ft_stage_rows(f.X, dout1, f, t, d);
    ft_stage_scan(f, nullptr, wl, rmax, v, cn, cd, cp, cpd, t, nk, d, chunk, nchunks);
    ft_den(f, nullptr, den, t, nk);
    // R = dout1 . state
    ft_dot_states(f, d);
    for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x)
        f.R[i / f.Kp * lk + i % f.Kp] = f.LC[i / f.Kp * lk + i % f.Kp] / fmaxf(f.DN[i / f.Kp * lk + i % f.Kp], ASA_DEN_EPS);
    __syncthreads();
    // X = q: LK = q . keys, LC = q . state (times den)
    ft_stage_rows(f.X, q, f, t, d);
    __syncthreads();
    ft_read_logits(f, d, content);
    // per position: drw, the read backward; leaves R = gc / den, LK = R E, LC = dl_key (/ sqrt d)
    const double scale_d = 1.0 / sqrt((double)d);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    double dgam = 0.0;
    for (int l = warp; l < L; l += nw) {
        const int ti = t0 + l;
        const i64 row = bh * t + ti;
        const float* yrow = rw + row * nk;
        // per slot s: a1 = dout1 . state (R), a2 = q . state (LC / den), drw, the logit (few
        // registers: everything but the logits is re-read from shared memory when needed)
        auto a1_of = [&](int s) { return (double)f.R[l * lk + s]; };
        auto a2_of = [&](int s) {
            return content ? (double)f.LC[l * lk + s] / fmax((double)f.DN[l * lk + s], (double)ASA_DEN_EPS) : 0.0;
        };
        auto gy0_of = [&](int s) { return (double)((drw_in ? drw_in[row * nk + s] : 0.0f) + (float)a1_of(s)); };
        double xs[4], g0s[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            xs[i] = (double)ASA_NEG_INF;
            g0s[i] = 0.0;
            if (s < nk) {
                float vk = (float)((double)f.LK[l * lk + s] * scale_d);
                float vc = content ? (float)(a2_of(s) * scale_d) : 0.0f;
                const float lgv = fu_read_logit(vk, vc, keep, last_pos_only, mask_mode, content, gamma, ti, t, s);
                xs[i] = (double)lgv / (double)rtemp;
                g0s[i] = gy0_of(s);
            }
        }
        const FuSoftB sb = fu_softmax_back_row([&](int i) { return xs[i]; }, [&](int i) { return g0s[i]; }, yrow,
                                               keep, last_pos_only, mask_mode, ti, t, nk, lane);
        double dot2 = 0.0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            if (s < nk) {
                double p, gy;
                fu_softmax_back_p(sb, xs[i], g0s[i], (double)yrow[s], keep, s, p, gy);
                dot2 += p * gy;
            }
        }
        dot2 = fu_wsum(dot2);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = lane + 32 * i;
            if (s >= f.Kp) continue;
            float dlk = 0.0f, rg = 0.0f;
            if (s < nk) {
                const i64 o = row * nk + s;
                double p, gy;
                fu_softmax_back_p(sb, xs[i], g0s[i], (double)yrow[s], keep, s, p, gy);
                const double a1 = a1_of(s), a2 = a2_of(s);
                const float dl = p > 0.0 ? (float)(p * (gy - dot2) / (double)rtemp) : 0.0f;
                const double g = (double)dl;
                double gcs = 0.0;
                if (g != 0.0) {
                    const bool masked = fu_masked(keep, last_pos_only, ti, t, s);
                    if (!(masked && mask_mode == 0)) dlk = (float)(g * scale_d);
                    if (content && !masked) {
                        dgam += g * (double)(float)(a2 * scale_d);
                        gcs = g * (double)gamma * scale_d;
                    }
                }
                double gs = (double)yrow[s] * a1 + gcs * a2;
                if (sw && dsw) gs += (double)sw[o] * (double)dsw[o];
                gc_out[o] = gcs;
                gsum_out[o] = gs;
                rg = (float)(gcs / fmax((double)f.DN[l * lk + s], (double)ASA_DEN_EPS));
            }
            f.R[l * lk + s] = rg;
            f.LK[l * lk + s] = rg * f.E[l * lk + s];
            f.LC[l * lk + s] = dlk;
        }
    }
    for (int i = threadIdx.x; i < (f.Lp - L) * f.Kp; i += blockDim.x) {
        const int l = L + i / f.Kp, s = i % f.Kp;
        f.R[l * lk + s] = 0.0f;
        f.LK[l * lk + s] = 0.0f;
        f.LC[l * lk + s] = 0.0f;
    }
    // d(gamma) of the block: warps in order
    dgam = fu_wsum(dgam);
    if (lane == 0) ft_red[warp] = dgam;
    __syncthreads();
    if (threadIdx.x == 0) {
        double a = 0.0;
        for (int w = 0; w < nw; ++w) a += ft_red[w];
        dgamma_part[blockIdx.x] = a;
    }
    // dkeys_part = dl_key^T q (f64 out, =)
    asa_mma_tiles(f.Kp, f.dp, [&](int r0, int n0) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, n0, f.Lp, [&](int r, int x) { return f.LC[x * lk + r]; },
                    [&](int x, int c) { return f.X[x * ld + c]; });
        asa_mma_store(acc, r0, n0, [&](int r, int c, float x) {
            if (r < nk && c < d) dkeys_part[(f.crow + r) * d + c] = (double)x;
        });
    });
    // dq += dl_key keys + sum_s gc state
    ft_mix_out(f, dq, t, d, true, true);
}

// slot_scan_read_mix on tensor cores: out [B,H,T,d] (=) = sum_s w * state, with den the
// forward's ([B,H,K,T]); with merged (nullable) also `mix_merge`'s output. z (nullable): the
// refine's slot_out output [B,H,T,K]; then the weights are its tanh (`tanh_forward`'s f64
// tanh), stored into wts for the backward (each element is one block's, read once).
// twin: cpu::slot_ops::slot_mix_forward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_mix_bf16(float* out, float* wts, const float* __restrict__ z, const float* __restrict__ wl,
                            const float* __restrict__ rmax, const float* __restrict__ v,
                            const float* __restrict__ den, const double* __restrict__ cn,
                            const double* __restrict__ cd, const double* __restrict__ cp,
                            const double* __restrict__ cpd, int nbh, int h, int t, int nk, int d, int chunk,
                            int tile, int nsub, int ntiles, int nchunks, int group, float* merged,
                            unsigned short* merged16, const float* __restrict__ base, float gate_value,
                            const double* gate_at) {
    const float gate = asa_step_value(gate_value, gate_at);  // `Learned`
    ASA_DYN_SHARED(double, ft_smem);
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    ft_stage_scan(f, nullptr, wl, rmax, v, cn, cd, cp, cpd, t, nk, d, chunk, nchunks);
    ft_den(f, nullptr, den, t, nk);
    __syncthreads();
    for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x) {
        const int l = i / f.Kp, s = i - l * f.Kp;
        float rho = 0.0f;
        if (l < f.L && s < nk) {
            const i64 o = (f.bh * t + f.t0 + l) * nk + s;
            float w;
            if (z) {
                w = (float)tanh((double)z[o]);
                wts[o] = w;
            } else {
                w = wts[o];
            }
            rho = w / fmaxf(f.DN[l * f.lk + s], ASA_DEN_EPS);
        }
        f.R[l * f.lk + s] = rho;
        f.LK[l * f.lk + s] = rho * f.E[l * f.lk + s];
    }
    __syncthreads();
    ft_mix_out_f(f, out, t, d, false, false, [&](int r, int c, float x) {
        if (merged) mix_merge(merged, merged16, base, gate, f.bh, f.t0 + r, c, x, h, t, d);
    });
}

// slot_scan_read_dot on tensor cores: out [B,H,T,K] += xv . state, with den the forward's.
// dz (nullable): also `tanh_backward` of the refine's signed weights sw [B,H,T,K] on the
// updated out: dz += out * (1 - sw^2), dz16 (nullable) its bf16 twin.
// twin: cpu::slot_ops::slot_mix_backward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_dot_bf16(float* out, const float* __restrict__ xv, const float* __restrict__ wl,
                            const float* __restrict__ rmax, const float* __restrict__ v,
                            const float* __restrict__ den, const double* __restrict__ cn,
                            const double* __restrict__ cd, const double* __restrict__ cp,
                            const double* __restrict__ cpd, int nbh, int h, int t, int nk, int d, int chunk,
                            int tile, int nsub, int ntiles, int nchunks, int group, float* dz,
                            unsigned short* dz16, const float* __restrict__ sw) {
    ASA_DYN_SHARED(double, ft_smem);
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    ft_stage_rows(f.X, xv, f, t, d);
    ft_stage_scan(f, nullptr, wl, rmax, v, cn, cd, cp, cpd, t, nk, d, chunk, nchunks);
    ft_den(f, nullptr, den, t, nk);
    ft_dot_states(f, d);
    for (int i = threadIdx.x; i < f.L * nk; i += blockDim.x) {
        const int l = i / nk, s = i - l * nk;
        const i64 o = (f.bh * t + f.t0 + l) * nk + s;
        const float y = out[o] + f.LC[l * f.lk + s] / fmaxf(f.DN[l * f.lk + s], ASA_DEN_EPS);
        out[o] = y;
        if (dz) {
            const float sv = sw[o];
            const float g = dz[o] + y * (1.0f - sv * sv);
            dz[o] = g;
            if (dz16) dz16[o] = asa_f32_to_bf16(g);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// state mix (slot_mix_forward over the state history without the history): out [B,H,T,d] =
// sum_s w[b,h,t,s] * state[b,h,t,s,:]. The slotspace refine's delta. Dynamic shared memory:
// 16*NW*d bytes.

// twin: cpu::slot_ops::slot_mix_forward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_mix(float* out, const float* __restrict__ wts, const float* __restrict__ wl,
                       const float* __restrict__ rmax, const float* __restrict__ v, const double* __restrict__ cn,
                       const double* __restrict__ cd, const double* __restrict__ cp,
                       const double* __restrict__ cpd, int nbh, int h, int t, int nk, int d, int chunk, int tile,
                       int nsub, int ntiles, int nchunks, int group, float* merged, unsigned short* merged16,
                       const float* __restrict__ base, float gate_value, const double* gate_at) {
    const float gate = asa_step_value(gate_value, gate_at);  // `Learned`
    ASA_DYN_SHARED(double, fu_smem);
    FuCtx x = fu_ctx(group, nk);
    double* part = fu_smem;  // [2][NW][d]
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    FuWalk W;
    fu_walk_init(W, cn, cd, cp, cpd, (i64)blockIdx.x * nk + x.s, rm, t0, chunk, d, x);
    float mprev = ASA_NEG_INF;
    for (int ti = t0; ti < t1; ++ti) {
        int buf = (ti - t0) & 1;
        i64 row = bh * t + ti;
        float w = x.sv ? ws[ti] : ASA_NEG_INF;
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        fu_walk_step(W, ti, t0, chunk, w, m, mprev, v + row * d, d, x);
        mprev = m;
        double ww = x.sv ? (double)wts[row * nk + x.s] : 0.0;
        double xo[FU_E];
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            xo[qq] = (x.sv && j < d) ? ww * (double)W.st[qq] : 0.0;
        }
        fu_part_store(part + buf * x.nw * d, xo, x, d);
        __syncthreads();
        const double* pb = part + buf * x.nw * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {  // fu_rows_out, then the merge
            double a = 0.0;
            for (int w = 0; w < x.nw; ++w) a += pb[w * d + j];
            const float y = (float)a;
            out[row * d + j] = y;
            if (merged) mix_merge(merged, merged16, base, gate, bh, ti, j, y, h, t, d);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// state dot (the weight gradient of slot_mix_backward without the history): out [B,H,T,K] +=
// (f32) sum_j xv[b,h,t,j] * state[b,h,t,s,j]. The refine backward's d(slotspace weights).

// twin: cpu::slot_ops::slot_mix_backward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_dot(float* out, const float* __restrict__ xv, const float* __restrict__ wl,
                       const float* __restrict__ rmax, const float* __restrict__ v, const double* __restrict__ cn,
                       const double* __restrict__ cd, const double* __restrict__ cp,
                       const double* __restrict__ cpd, int nbh, int h, int t, int nk, int d, int chunk, int tile,
                       int nsub, int ntiles, int nchunks, int group) {
    FuCtx x = fu_ctx(group, nk);
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    FuWalk W;
    fu_walk_init(W, cn, cd, cp, cpd, (i64)blockIdx.x * nk + x.s, rm, t0, chunk, d, x);
    float mprev = ASA_NEG_INF;
    for (int ti = t0; ti < t1; ++ti) {
        i64 row = bh * t + ti;
        float w = x.sv ? ws[ti] : ASA_NEG_INF;
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        fu_walk_step(W, ti, t0, chunk, w, m, mprev, v + row * d, d, x);
        mprev = m;
        const float* xt = xv + row * d;
        double a = 0.0;
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            if (x.sv && j < d) a += (double)xt[j] * (double)W.st[qq];
        }
        a = fu_gsum(a, x.G);
        if (x.sv && x.jl == 0) out[row * nk + x.s] = out[row * nk + x.s] + (float)a;
    }
}

// ------------------------------------------------------------------------------------------------
// backward, read part. One block per (b,h,tile) walks the tile recomputing the state, and per
// position: drw = drw_in + dout1.state (slot_mix_backward), dlogits (read_weights_backward:
// softmax routing, read mask), then read_logits_backward: dq [B,H,T,d] +=, per-tile partial
// slot-key gradients dkeys_part [B*H, ntiles, K, d] (f64, =) and d(gamma) partials
// dgamma_part [B*H*ntiles] (f64, =). For the scan backward it leaves, per (b,h,t,s) (f64):
//   gc   = the coefficient of q in dL/dstate (content read: dlogit * gamma / sqrt(d), else 0),
//   gsum = dL/dstate . state, with dL/dstate = rw*dout1 + sw*ddelta + gc*q.
// drw_in (the refine path's gradient into rw), sw, dsw (= ddelta.state): nullable [B,H,T,K].
// Dynamic shared memory: 16*NW*d + 16*K bytes.

// twin: cpu::slot_ops::read_logits_backward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_backward_read(float* dq, double* gc_out, double* gsum_out, double* dkeys_part,
                                 double* dgamma_part, const float* __restrict__ drw_in,
                                 const float* __restrict__ dout1, const float* __restrict__ rw,
                                 const float* __restrict__ sw, const float* __restrict__ dsw,
                                 const float* __restrict__ q, const float* __restrict__ keys,
                                 const float* __restrict__ wl, const float* __restrict__ rmax,
                                 const float* __restrict__ v, const double* __restrict__ cn,
                                 const double* __restrict__ cd, const double* __restrict__ cp,
                                 const double* __restrict__ cpd,
                                 float gamma_value, const double* gamma_at, float rtemp, const int* keep,
                                 int last_pos_only, int mask_mode, int content, int nbh, int h, int t, int nk,
                                 int d, int chunk, int tile, int nsub, int ntiles, int nchunks, int group) {
    const float gamma = asa_step_value(gamma_value, gamma_at);  // `Learned`
    ASA_DYN_SHARED(double, fu_smem);
    __shared__ double fu_red[FU_MAXNW];
    FuCtx x = fu_ctx(group, nk);
    double* part = fu_smem;                          // [2][NW][d]
    float* lg_sh = (float*)(fu_smem + 2 * x.nw * d);  // [2][K]
    float* gy_sh = lg_sh + 2 * nk;                    // [2][K]
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int hi = (int)(bh % h);
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    double scale_d = 1.0 / sqrt((double)d);
    float key[FU_E];
    double dka[FU_E];
#pragma unroll
    for (int qq = 0; qq < FU_E; ++qq) {
        int j = x.jl + x.G * qq;
        key[qq] = (x.sv && j < d) ? keys[((i64)hi * nk + x.s) * d + j] : 0.0f;
        dka[qq] = 0.0;
    }
    double dgam = 0.0;
    FuWalk W;
    fu_walk_init(W, cn, cd, cp, cpd, (i64)blockIdx.x * nk + x.s, rm, t0, chunk, d, x);
    float mprev = ASA_NEG_INF;
    for (int ti = t0; ti < t1; ++ti) {
        int it = ti - t0, buf = it & 1;
        i64 row = bh * t + ti;
        const float* vt = v + row * d;
        const float* qt = q + row * d;
        const float* gt = dout1 + row * d;
        float w = x.sv ? ws[ti] : ASA_NEG_INF;
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        fu_walk_step(W, ti, t0, chunk, w, m, mprev, vt, d, x);
        mprev = m;
        double a1 = 0.0, a2 = 0.0, a3 = 0.0;  // dout1.state, q.state, q.key
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            if (x.sv && j < d) {
                double st = (double)W.st[qq], qj = (double)qt[j];
                a1 += (double)gt[j] * st;
                a2 += qj * st;
                a3 += qj * (double)key[qq];
            }
        }
        fu_gsum3(a1, a2, a3, x.G);
        i64 o = row * nk + x.s;
        float vc = 0.0f;
        if (x.sv) {
            float drw_s = (drw_in ? drw_in[o] : 0.0f) + (float)a1;
            float vk = (float)(a3 * scale_d);
            vc = content ? (float)(a2 * scale_d) : 0.0f;
            if (fu_masked(keep, last_pos_only, ti, t, x.s)) {
                if (mask_mode == 0) {
                    vk = ASA_NEG_INF;
                    vc = ASA_NEG_INF;
                } else {
                    vc = 0.0f;
                }
            }
            float lgv = content ? __fadd_rn(vk, __fmul_rn(gamma, vc)) : vk;
            if (x.jl == 0) {
                lg_sh[buf * nk + x.s] = lgv;
                gy_sh[buf * nk + x.s] = drw_s;
            }
        }
        __syncthreads();
        if (it > 0) fu_rows_out(dq + (row - 1) * d, part + (buf ^ 1) * x.nw * d, x.nw, d, true);
        // read_weights_backward of the row (softmax routing), every warp, lanes over slots
        bool mrow = keep != 0 && mask_mode == 0 && (!last_pos_only || ti + 1 == t);
        const float* yrow = rw + row * nk;
        double mx = 0.0, esum = 1.0, den_ = 1.0, sk = 0.0, dt = 0.0;
        bool live = false;
        if (mrow) {
            double xs[4];
            mx = (double)ASA_NEG_INF;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int s = x.lane + 32 * i;
                xs[i] = s < nk ? (double)lg_sh[buf * nk + s] / (double)rtemp : (double)ASA_NEG_INF;
                mx = fmax(mx, xs[i]);
            }
            mx = fu_wmax(mx);
            live = isfinite(mx);
            esum = 0.0;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int s = x.lane + 32 * i;
                if (live && s < nk) esum += exp(xs[i] - mx);
            }
            esum = fu_wsum(esum);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int s = x.lane + 32 * i;
                if (s < nk) {
                    double pre = live ? (double)(float)(exp(xs[i] - mx) / esum) : 0.0;
                    if (keep[s] != 0) sk += pre;
                    dt += (double)gy_sh[buf * nk + s] * (double)yrow[s];
                }
            }
            sk = fu_wsum(sk);
            dt = fu_wsum(dt);
            den_ = fmax(sk, (double)ASA_DEN_EPS);
        }
        // p (the softmax before the mask) and gy (after undoing the renormalisation) of slot s
#define FU_PGY(s_, p_, gy_)                                                                        \
    {                                                                                              \
        double g0_ = (double)gy_sh[buf * nk + (s_)];                                               \
        if (mrow) {                                                                                \
            double xv_ = (double)lg_sh[buf * nk + (s_)] / (double)rtemp;                           \
            p_ = live ? (double)(float)(exp(xv_ - mx) / esum) : 0.0;                               \
            if (keep[(s_)] != 0)                                                                   \
                gy_ = sk >= (double)ASA_DEN_EPS ? (g0_ - dt) / den_ : g0_ / den_;                  \
            else                                                                                   \
                gy_ = 0.0;                                                                         \
        } else {                                                                                   \
            p_ = (double)yrow[(s_)];                                                               \
            gy_ = g0_;                                                                             \
        }                                                                                          \
    }
        double dot2 = 0.0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int s = x.lane + 32 * i;
            if (s < nk) {
                double p_, gy_;
                FU_PGY(s, p_, gy_);
                dot2 += p_ * gy_;
            }
        }
        dot2 = fu_wsum(dot2);
        // read_logits_backward of the lane's slot
        double dqp[FU_E];
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) dqp[qq] = 0.0;
        double gcs = 0.0;
        if (x.sv) {
            double p_, gy_;
            FU_PGY(x.s, p_, gy_);
            float dl = p_ > 0.0 ? (float)(p_ * (gy_ - dot2) / (double)rtemp) : 0.0f;
            double g = (double)dl;
            if (g != 0.0) {
                bool masked = fu_masked(keep, last_pos_only, ti, t, x.s);
                bool key_live = !(masked && mask_mode == 0);
                bool cont_live = !masked;
                if (key_live) {
#pragma unroll
                    for (int qq = 0; qq < FU_E; ++qq) {
                        int j = x.jl + x.G * qq;
                        if (j < d) {
                            dqp[qq] += g * scale_d * (double)key[qq];
                            dka[qq] += g * scale_d * (double)qt[j];
                        }
                    }
                }
                if (content && cont_live) {
                    dgam += g * (double)vc;
                    gcs = g * (double)gamma * scale_d;
#pragma unroll
                    for (int qq = 0; qq < FU_E; ++qq) dqp[qq] += gcs * (double)W.st[qq];
                }
            }
            if (x.jl == 0) {
                double gs = (double)yrow[x.s] * a1 + gcs * a2;
                if (sw && dsw) gs += (double)sw[o] * (double)dsw[o];
                gc_out[o] = gcs;
                gsum_out[o] = gs;
            }
        }
#undef FU_PGY
        fu_part_store(part + buf * x.nw * d, dqp, x, d);
    }
    __syncthreads();
    fu_rows_out(dq + (bh * t + t1 - 1) * d, part + ((t1 - 1 - t0) & 1) * x.nw * d, x.nw, d, true);
    if (x.sv) {
        double* o = dkeys_part + ((i64)blockIdx.x * nk + x.s) * d;
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            if (j < d) o[j] = dka[qq];
        }
    }
    // d(gamma) of the block: the groups' leaders, warps in order
    double gw = fu_wsum((x.sv && x.jl == 0) ? dgam : 0.0);
    if (x.lane == 0) fu_red[x.warp] = gw;
    __syncthreads();
    if (threadIdx.x == 0) {
        double a = 0.0;
        for (int w = 0; w < x.nw; ++w) a += fu_red[w];
        dgamma_part[blockIdx.x] = a;
    }
}

// ------------------------------------------------------------------------------------------------
// backward of the scan: per (b,h,t,s) the state gradient g = rw*dout1 + sw*ddelta + gc*q, and
//   gn = g / max(den, eps),  gd = -gsum / max(den, eps) (0 where den < eps)
// (the gradients of num and den). sw, ddelta: nullable (no refine).

__device__ __forceinline__ void fu_gn(double* gn, double& gd, double rwv, double swv, double gcv, double gsv,
                                      float den_t, const float* gt, const float* dt, const float* qt, int d,
                                      const FuCtx& x) {
    double dd = (double)fmaxf(den_t, ASA_DEN_EPS);
    double inv = 1.0 / dd;  // one division per step
#pragma unroll
    for (int qq = 0; qq < FU_E; ++qq) {
        int j = x.jl + x.G * qq;
        if (x.sv && j < d) {
            double g = rwv * (double)gt[j] + gcv * (double)qt[j];
            if (dt) g += swv * (double)dt[j];
            gn[qq] = g * inv;
        } else {
            gn[qq] = 0.0;
        }
    }
    gd = (x.sv && den_t >= ASA_DEN_EPS) ? -gsv / dd : 0.0;
}

// backward, level 1 (reverse): per tile and slot.
// nsub == 0 (whole chunks): the chain over the tile's chunks in reverse, started from zero:
//   bs_n = sum_W (sum_{t in W} sc_t gn_t) * prod_{W' before W} sc_last(W'),  bs_prod = prod_W sc_last(W),
// so that the gradient of the carry into the tile's first chunk is bs_n + bs_prod * (that of the
// carry after the tile) (same for den: bs_d).
// nsub > 0: bs_n = sum_t gn_t, bs_d = sum_t gd_t (suffix sums), bs2_n = sum_t sc_t gn_t,
// bs2_d = sum_t sc_t gd_t (the chunk's carry gradients).
// bs_n, bs2_n: [B*H, ntiles, K, d]; bs_d, bs2_d, bs_prod: [B*H, ntiles, K] (f64).

// twin: cpu::slot_ops::slot_scan_backward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_backward_sums(double* bs_n, double* bs_d, double* bs2_n, double* bs2_d, double* bs_prod,
                                 const float* __restrict__ rw, const float* __restrict__ sw,
                                 const double* __restrict__ gc, const double* __restrict__ gsum,
                                 const float* __restrict__ dout1, const float* __restrict__ ddelta,
                                 const float* __restrict__ q, const float* __restrict__ den,
                                 const float* __restrict__ rmax, int nbh, int h, int t, int nk, int d, int chunk,
                                 int tile, int nsub, int ntiles, int nchunks, int group) {
    FuCtx x = fu_ctx(group, nk);
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* rm = rmax + srow;
    const float* dn = den + srow;
    double sa[FU_E], ssc[FU_E], comp[FU_E], gn[FU_E];
#pragma unroll
    for (int qq = 0; qq < FU_E; ++qq) sa[qq] = ssc[qq] = comp[qq] = 0.0;
    double sad = 0.0, sscd = 0.0, compd = 0.0, pr = 1.0, sl = 0.0;
    for (int ti = t1 - 1; ti >= t0; --ti) {
        i64 row = bh * t + ti;
        i64 o = row * nk + x.s;
        int c0 = fu_c0(ti, chunk);
        float mp = (x.sv && c0 > 0) ? rm[c0 - 1] : ASA_NEG_INF;
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        double gd;
        fu_gn(gn, gd, x.sv ? (double)rw[o] : 0.0, (x.sv && sw) ? (double)sw[o] : 0.0, x.sv ? gc[o] : 0.0,
              x.sv ? gsum[o] : 0.0, x.sv ? dn[ti] : 0.0f, dout1 + row * d, ddelta ? ddelta + row * d : 0,
              q + row * d, d, x);
        double sc = fu_scale(mp, m);
        if (ti == fu_c1(ti, chunk, t) - 1) sl = sc;  // the chunk's last position
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            sa[qq] += gn[qq];
            ssc[qq] = fma(sc, gn[qq], ssc[qq]);
        }
        sad += gd;
        sscd = fma(sc, gd, sscd);
        if (nsub == 0 && ti == c0) {
            // the chunk [c0, c1) is complete
#pragma unroll
            for (int qq = 0; qq < FU_E; ++qq) {
                comp[qq] = fma(sl, comp[qq], ssc[qq]);
                ssc[qq] = 0.0;
            }
            compd = fma(sl, compd, sscd);
            sscd = 0.0;
            pr *= sl;
        }
    }
    if (!x.sv) return;
    i64 r = (i64)blockIdx.x * nk + x.s;
#pragma unroll
    for (int qq = 0; qq < FU_E; ++qq) {
        int j = x.jl + x.G * qq;
        if (j < d) {
            bs_n[r * d + j] = nsub == 0 ? comp[qq] : sa[qq];
            bs2_n[r * d + j] = nsub == 0 ? 0.0 : ssc[qq];
        }
    }
    if (x.jl == 0) {
        bs_d[r] = nsub == 0 ? compd : sad;
        bs2_d[r] = nsub == 0 ? 0.0 : sscd;
        bs_prod[r] = nsub == 0 ? pr : 1.0;
    }
}

// backward, level 2 (reverse over tiles): the carries at every tile end. One warp per (b,h,s).
// bc_n, bc_d [B*H, ntiles, K, (d)] (f64): when the tile's last position closes its chunk, the
// gradients of that chunk's carry-out (num, den) from the next chunk (dnum_c, dden_c of the CPU
// twin); otherwise the suffix sums of gn, gd from the tile end to the chunk end (dnum_c included).

// twin: cpu::slot_ops::slot_scan_backward
extern "C" __global__ void slot_scan_read_backward_carry(double* bc_n, double* bc_d, const double* __restrict__ bs_n,
                                                         const double* __restrict__ bs_d,
                                                         const double* __restrict__ bs2_n,
                                                         const double* __restrict__ bs2_d,
                                                         const double* __restrict__ bs_prod,
                                                         const float* __restrict__ rmax, int nbh, int h, int t,
                                                         int nk, int d, int chunk, int tile, int nsub, int ntiles,
                                                         int nchunks, int group) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= nbh * nk) return;
    int bh = warp / nk, s = warp % nk;
    const float* rm = rmax + (i64)warp * t;
    double G[ASA_MAXJ], A[ASA_MAXJ], Ga[ASA_MAXJ];
#pragma unroll
    for (int qq = 0; qq < ASA_MAXJ; ++qq) G[qq] = A[qq] = Ga[qq] = 0.0;
    double Gd = 0.0, Ad = 0.0, Gad = 0.0;
    // the tile sums are loaded one tile ahead (in reverse)
    double nb1[ASA_MAXJ], nb2[ASA_MAXJ], nb1d, nb2d, npr;
#define FU_B4_LOAD(ii)                                                                \
    {                                                                                 \
        i64 r_ = ((i64)bh * ntiles + (ii)) * nk + s;                                  \
        _Pragma("unroll") for (int qq = 0; qq < ASA_MAXJ; ++qq) {                     \
            int j = lane + 32 * qq;                                                   \
            nb1[qq] = j < d ? bs_n[r_ * d + j] : 0.0;                                 \
            nb2[qq] = (j < d && nsub != 0) ? bs2_n[r_ * d + j] : 0.0;                 \
        }                                                                             \
        nb1d = bs_d[r_];                                                              \
        nb2d = nsub != 0 ? bs2_d[r_] : 0.0;                                           \
        npr = nsub == 0 ? bs_prod[r_] : 1.0;                                          \
    }
    FU_B4_LOAD(ntiles - 1);
    for (int i = ntiles - 1; i >= 0; --i) {
        i64 row = ((i64)bh * ntiles + i) * nk + s;
        double b1[ASA_MAXJ], b2[ASA_MAXJ];
#pragma unroll
        for (int qq = 0; qq < ASA_MAXJ; ++qq) {
            b1[qq] = nb1[qq];
            b2[qq] = nb2[qq];
        }
        double b1d = nb1d, b2d = nb2d, pr = npr;
        if (i > 0) FU_B4_LOAD(i - 1);
        if (nsub == 0) {
#pragma unroll
            for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                int j = lane + 32 * qq;
                if (j < d) bc_n[row * d + j] = G[qq];
            }
            if (lane == 0) bc_d[row] = Gd;
#pragma unroll
            for (int qq = 0; qq < ASA_MAXJ; ++qq) G[qq] = fma(pr, G[qq], b1[qq]);
            Gd = fma(pr, Gd, b1d);
        } else {
            int t0, t1;
            fu_tile(i, t, chunk, tile, nsub, t0, t1);
            int c0 = fu_c0(t0, chunk);
            int c1 = min(c0 + chunk, t);
            if (t1 == c1) {
                // the chunk's last sub-tile: it receives the next chunk's carry gradients
#pragma unroll
                for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                    int j = lane + 32 * qq;
                    if (j < d) bc_n[row * d + j] = G[qq];
                }
                if (lane == 0) bc_d[row] = Gd;
                double sl = fu_scale(c0 > 0 ? rm[c0 - 1] : ASA_NEG_INF, rm[c1 - 1]);
#pragma unroll
                for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                    A[qq] = G[qq] + b1[qq];
                    Ga[qq] = fma(sl, G[qq], b2[qq]);
                }
                Ad = Gd + b1d;
                Gad = fma(sl, Gd, b2d);
            } else {
#pragma unroll
                for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                    int j = lane + 32 * qq;
                    if (j < d) bc_n[row * d + j] = A[qq];
                }
                if (lane == 0) bc_d[row] = Ad;
#pragma unroll
                for (int qq = 0; qq < ASA_MAXJ; ++qq) {
                    A[qq] += b1[qq];
                    Ga[qq] += b2[qq];
                }
                Ad += b1d;
                Gad += b2d;
            }
            if (t0 == c0) {
                // the chunk's first sub-tile: the gradients of the carry into this chunk
#pragma unroll
                for (int qq = 0; qq < ASA_MAXJ; ++qq) G[qq] = Ga[qq];
                Gd = Gad;
            }
        }
    }
#undef FU_B4_LOAD
}

// backward, level 3 (reverse walk of a tile): the CPU twin's per-position scan backward.
//   a = suffix sum of gn in the chunk (+ dnum_c), bsum = the same for gd (+ dden_c),
//   dv [B,H,T,d] += sum_s e * a (slots summed in shared memory, warps in order),
//   xo = e * (bsum + v.a)                       (the direct write-logit gradient, 0 where rmax = -inf)
//   yo = sc * (den_prev * gd + num_prev . gn)   (the carried-scale term, 0 for an empty carry)
// xo, yo: [B,H,K,T] (f64), finished by slot_scan_read_backward_route. num_prev: cn_chunk from
// the forward; den_prev: den at c0-1. Dynamic shared memory: 16*NW*d bytes.

// twin: cpu::slot_ops::slot_scan_backward
extern "C" __global__ void __launch_bounds__(512)
    slot_scan_read_backward(float* dv, double* xo, double* yo, const double* __restrict__ bc_n,
                            const double* __restrict__ bc_d, const float* __restrict__ cn_chunk,
                            const float* __restrict__ rw, const float* __restrict__ sw,
                            const double* __restrict__ gc, const double* __restrict__ gsum,
                            const float* __restrict__ dout1, const float* __restrict__ ddelta,
                            const float* __restrict__ q, const float* __restrict__ v,
                            const float* __restrict__ wl, const float* __restrict__ den,
                            const float* __restrict__ rmax, int nbh, int h, int t, int nk, int d, int chunk,
                            int tile, int nsub, int ntiles, int nchunks, int group) {
    ASA_DYN_SHARED(double, fu_smem);
    FuCtx x = fu_ctx(group, nk);
    double* part = fu_smem;  // [2][NW][d]
    int ti_ = blockIdx.x % ntiles;
    i64 bh = blockIdx.x / ntiles;
    int t0, t1;
    fu_tile(ti_, t, chunk, tile, nsub, t0, t1);
    i64 srow = (bh * nk + (x.sv ? x.s : 0)) * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    const float* dn = den + srow;
    double a[FU_E], dnc[FU_E], gp[FU_E], cnv[FU_E], gn[FU_E];
    double bsum, ddc, gpd = 0.0, cdv = 0.0;
    float mp = ASA_NEG_INF;
    bool ends = t1 == fu_c1(t1 - 1, chunk, t);  // the tile's last position closes its chunk
    i64 crow = (i64)blockIdx.x * nk + x.s;
#pragma unroll
    for (int qq = 0; qq < FU_E; ++qq) {
        int j = x.jl + x.G * qq;
        double b = (x.sv && j < d) ? bc_n[crow * d + j] : 0.0;
        a[qq] = ends ? 0.0 : b;
        dnc[qq] = ends ? b : 0.0;
        gp[qq] = 0.0;
        cnv[qq] = 0.0;
    }
    {
        double b = x.sv ? bc_d[crow] : 0.0;
        bsum = ends ? 0.0 : b;
        ddc = ends ? b : 0.0;
    }
    // the chunk's carry-in (num_prev, den_prev, m_prev) for the chunk holding position tt
#define FU_LOAD_CHUNK(tt)                                                                         \
    {                                                                                             \
        int c0_ = fu_c0((tt), chunk);                                                             \
        const float* cr_ = cn_chunk + ((bh * nchunks + (tt) / chunk) * nk + (x.sv ? x.s : 0)) * d; \
        _Pragma("unroll") for (int qq = 0; qq < FU_E; ++qq) {                                     \
            int j = x.jl + x.G * qq;                                                              \
            cnv[qq] = (x.sv && j < d && c0_ > 0) ? (double)cr_[j] : 0.0;                          \
        }                                                                                         \
        cdv = (x.sv && c0_ > 0) ? (double)dn[c0_ - 1] : 0.0;                                      \
        mp = (x.sv && c0_ > 0) ? rm[c0_ - 1] : ASA_NEG_INF;                                       \
    }
    FU_LOAD_CHUNK(t1 - 1);
    for (int ti = t1 - 1; ti >= t0; --ti) {
        int buf = (t1 - 1 - ti) & 1;
        i64 row = bh * t + ti;
        i64 o = row * nk + x.s;
        bool last = ti == fu_c1(ti, chunk, t) - 1;
        if (last && ti != t1 - 1) {
            // entering (in reverse) a chunk that ends inside the tile: its carried-out gradients
            // are what the chunk after it accumulated
#pragma unroll
            for (int qq = 0; qq < FU_E; ++qq) {
                dnc[qq] = gp[qq];
                gp[qq] = 0.0;
                a[qq] = 0.0;
            }
            ddc = gpd;
            gpd = 0.0;
            bsum = 0.0;
            FU_LOAD_CHUNK(ti);
        }
        double gd;
        fu_gn(gn, gd, x.sv ? (double)rw[o] : 0.0, (x.sv && sw) ? (double)sw[o] : 0.0, x.sv ? gc[o] : 0.0,
              x.sv ? gsum[o] : 0.0, x.sv ? dn[ti] : 0.0f, dout1 + row * d, ddelta ? ddelta + row * d : 0,
              q + row * d, d, x);
        if (last) {
#pragma unroll
            for (int qq = 0; qq < FU_E; ++qq) gn[qq] += dnc[qq];
            gd += ddc;
        }
        const float* vt = v + row * d;
        double p1 = 0.0, p2 = 0.0;  // v.a, num_prev.gn
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) {
            int j = x.jl + x.G * qq;
            a[qq] += gn[qq];
            if (x.sv && j < d) p1 += (double)vt[j] * a[qq];
            p2 += cnv[qq] * gn[qq];
        }
        bsum += gd;
        fu_gsum2(p1, p2, x.G);
        float m = x.sv ? rm[ti] : ASA_NEG_INF;
        float w = x.sv ? ws[ti] : ASA_NEG_INF;
        bool rf = isfinite(m);
        double e = rf ? exp((double)(w - m)) : 0.0;
        double xv = rf ? e * (bsum + p1) : 0.0;
        double yv = 0.0;
        if (isfinite(mp)) {
            double sc = exp((double)(mp - m));
            double dscale = cdv * gd + p2;
            yv = sc * dscale;
#pragma unroll
            for (int qq = 0; qq < FU_E; ++qq) gp[qq] = fma(sc, gn[qq], gp[qq]);
            gpd = fma(sc, gd, gpd);
        }
        if (x.sv && x.jl == 0) {
            xo[srow + ti] = xv;
            yo[srow + ti] = yv;
        }
        double xp[FU_E];
#pragma unroll
        for (int qq = 0; qq < FU_E; ++qq) xp[qq] = rf ? e * a[qq] : 0.0;
        fu_part_store(part + buf * x.nw * d, xp, x, d);
        __syncthreads();
        fu_rows_out(dv + row * d, part + buf * x.nw * d, x.nw, d, true);
    }
#undef FU_LOAD_CHUNK
}

// slot_scan_read_backward_sums on tensor cores (tiles inside one chunk): the same outputs.
//   nsub > 0:  bs_n = sum_t gn_t = sum_j W_j^T x_j,  bs2_n = sum_t sc_t gn_t,  bs_d, bs2_d the same
//              for gd, bs_prod = 1;
//   nsub == 0 (the tile is its chunk): bs_n = sum_t sc_t gn_t, bs_d = sum_t sc_t gd_t, bs2 = 0,
//              bs_prod = sc at the chunk's last position.
// C, P accumulate the two [K][d] sums over the terms j.
// twin: cpu::slot_ops::slot_scan_backward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_backward_sums_bf16(double* bs_n, double* bs_d, double* bs2_n, double* bs2_d, double* bs_prod,
                                      const float* __restrict__ rw, const float* __restrict__ sw,
                                      const double* __restrict__ gc, const double* __restrict__ gsum,
                                      const float* __restrict__ dout1, const float* __restrict__ ddelta,
                                      const float* __restrict__ q, const float* __restrict__ den,
                                      const float* __restrict__ rmax, int nbh, int h, int t, int nk, int d,
                                      int chunk, int tile, int nsub, int ntiles, int nchunks, int group) {
    ASA_DYN_SHARED(double, ft_smem);
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    const int ld = f.ld, lk = f.lk;
    ft_stage_ae(f, nullptr, rmax, t, nk);
    ft_den(f, nullptr, den, t, nk);
    for (int i = threadIdx.x; i < f.Kp * ld; i += blockDim.x) f.C[i] = f.P[i] = 0.0f;
    __syncthreads();
    ft_stage_gd(f, gsum, t, nk);
    for (int j = 0; j < 3; ++j) {
        if (!ft_stage_grad(f, j, rw, sw, gc, dout1, ddelta, q, t, nk, d)) continue;
        __syncthreads();
        asa_mma_tiles(f.Kp, f.dp, [&](int r0, int n0) {
            float a1[4] = {0.0f, 0.0f, 0.0f, 0.0f}, a2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            auto rx = [&](int x, int c) { return f.X[x * ld + c]; };
            asa_mma_acc(a1, r0, n0, f.Lp, [&](int r, int x) { return f.LK[x * lk + r]; }, rx);
            asa_mma_acc(a2, r0, n0, f.Lp, [&](int r, int x) { return f.LK[x * lk + r] * f.E[x * lk + r]; }, rx);
            asa_mma_store(a1, r0, n0, [&](int r, int c, float x) { f.C[r * ld + c] += x; });
            asa_mma_store(a2, r0, n0, [&](int r, int c, float x) { f.P[r * ld + c] += x; });
        });
        __syncthreads();
    }
    const bool whole = nsub == 0;
    for (int i = threadIdx.x; i < nk * d; i += blockDim.x) {
        const int s = i / d, c = i - s * d;
        const i64 r = (f.crow + s) * d + c;
        bs_n[r] = whole ? (double)f.P[s * ld + c] : (double)f.C[s * ld + c];
        bs2_n[r] = whole ? 0.0 : (double)f.P[s * ld + c];
    }
    for (int s = threadIdx.x; s < nk; s += blockDim.x) {
        double sad = 0.0, sscd = 0.0;
        for (int l = f.L - 1; l >= 0; --l) {
            const double g = (double)f.G[l * lk + s];
            sad += g;
            sscd = fma((double)f.E[l * lk + s], g, sscd);
        }
        bs_d[f.crow + s] = whole ? sscd : sad;
        bs2_d[f.crow + s] = whole ? 0.0 : sscd;
        bs_prod[f.crow + s] = whole ? (double)f.E[(f.L - 1) * lk + s] : 1.0;
    }
}

// slot_scan_read_backward on tensor cores (tiles inside one chunk): the same outputs. With
// R0 = bc_n, B0 = bc_d (the gradients flowing in from after the tile, the chunk's carry-out
// ones included), gn_t = sum_j W_j x_j and gd_t = G:
//   a_t    = R0 + sum_{t' >= t} gn_t',   bsum_t = B0 + sum_{t' >= t} gd_t'
//   dv    += alpha a = alpha R0 + sum_j (mask^T (alpha W_j^T)) x_j
//   xo     = alpha (bsum + v . a),  v . a = v R0^T + sum_j (mask^T (V x_j^T)) W_j
//   yo     = E (den_prev gd + num_prev . gn)  (+ B0, num_prev . R0 at the chunk's last position),
//            num_prev . gn = sum_j W_j (x_j num_prev^T);  0 while the carried max is -inf
// Staged: V, C = num_prev (cn_chunk), P = R0, cd = B0, cpd = den_prev; LC accumulates v . a,
// R the num_prev . gn sums.
// twin: cpu::slot_ops::slot_scan_backward
extern "C" __global__ void __launch_bounds__(FT_THREADS)
    slot_scan_read_backward_bf16(float* dv, double* xo, double* yo, const double* __restrict__ bc_n,
                                 const double* __restrict__ bc_d, const float* __restrict__ cn_chunk,
                                 const float* __restrict__ rw, const float* __restrict__ sw,
                                 const double* __restrict__ gc, const double* __restrict__ gsum,
                                 const float* __restrict__ dout1, const float* __restrict__ ddelta,
                                 const float* __restrict__ q, const float* __restrict__ v,
                                 const float* __restrict__ wl, const float* __restrict__ den,
                                 const float* __restrict__ rmax, int nbh, int h, int t, int nk, int d, int chunk,
                                 int tile, int nsub, int ntiles, int nchunks, int group) {
    ASA_DYN_SHARED(double, ft_smem);
    const FtTile f = ft_tile(ft_smem, h, t, nk, d, chunk, tile, nsub, ntiles);
    const int ld = f.ld, lk = f.lk, ll = f.ll, L = f.L;
    ft_stage_rows(f.V, v, f, t, d);
    const float* cr = cn_chunk + (f.bh * nchunks + f.c0 / chunk) * nk * d;
    for (int i = threadIdx.x; i < f.Kp * f.dp; i += blockDim.x) {
        const int s = i / f.dp, j = i - s * f.dp;
        const bool in = s < nk && j < d;
        f.C[s * ld + j] = (in && f.c0 > 0) ? cr[s * d + j] : 0.0f;
        f.P[s * ld + j] = in ? (float)bc_n[(f.crow + s) * d + j] : 0.0f;
    }
    for (int s = threadIdx.x; s < f.Kp; s += blockDim.x) {
        f.cd[s] = s < nk ? bc_d[f.crow + s] : 0.0;
        f.cpd[s] = (s < nk && f.c0 > 0) ? (double)den[(f.bh * nk + s) * t + f.c0 - 1] : 0.0;
    }
    ft_stage_ae(f, wl, rmax, t, nk);
    ft_den(f, nullptr, den, t, nk);
    for (int i = threadIdx.x; i < f.Lp * f.Kp; i += blockDim.x) f.LC[i / f.Kp * lk + i % f.Kp] = f.R[i / f.Kp * lk + i % f.Kp] = 0.0f;
    __syncthreads();
    ft_stage_gd(f, gsum, t, nk);
    bool first = true;
    for (int j = 0; j < 3; ++j) {
        if (!ft_stage_grad(f, j, rw, sw, gc, dout1, ddelta, q, t, nk, d)) continue;
        __syncthreads();
        // QV = mask^T (alpha W^T); R += W (x num_prev^T)
        asa_mma_tiles(f.Lp, f.Lp, [&](int r0, int n0) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            asa_mma_acc(acc, r0, n0, f.Kp, [&](int r, int x) { return f.A[r * lk + x]; },
                        [&](int x, int c) { return f.LK[c * lk + x]; });
            asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.QV[r * ll + c] = c >= r ? x : 0.0f; });
        });
        asa_mma_tiles(f.Lp, f.Kp, [&](int r0, int n0) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            asa_mma_acc(acc, r0, n0, d, [&](int r, int x) { return f.X[r * ld + x]; },
                        [&](int x, int c) { return f.C[c * ld + x]; });
            asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.R[r * lk + c] += f.LK[r * lk + c] * x; });
        });
        __syncthreads();
        // dv += QV x (+ alpha R0 once)
        asa_mma_tiles(f.Lp, f.dp, [&](int r0, int n0) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            asa_mma_acc(acc, r0, n0, f.Lp, [&](int r, int x) { return f.QV[r * ll + x]; },
                        [&](int x, int c) { return f.X[x * ld + c]; });
            if (first)
                asa_mma_acc(acc, r0, n0, f.Kp, [&](int r, int x) { return f.A[r * lk + x]; },
                            [&](int x, int c) { return f.P[x * ld + c]; });
            asa_mma_store(acc, r0, n0, [&](int r, int c, float x) {
                if (r < L && c < d) {
                    float* o = dv + (f.bh * t + f.t0 + r) * d + c;
                    *o = *o + x;
                }
            });
        });
        __syncthreads();
        // QV = mask^T (V x^T); LC += QV W (+ V R0^T once)
        asa_mma_tiles(f.Lp, f.Lp, [&](int r0, int n0) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            asa_mma_acc(acc, r0, n0, d, [&](int r, int x) { return f.V[r * ld + x]; },
                        [&](int x, int c) { return f.X[c * ld + x]; });
            asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.QV[r * ll + c] = c >= r ? x : 0.0f; });
        });
        __syncthreads();
        asa_mma_tiles(f.Lp, f.Kp, [&](int r0, int n0) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            asa_mma_acc(acc, r0, n0, f.Lp, [&](int r, int x) { return f.QV[r * ll + x]; },
                        [&](int x, int c) { return f.LK[x * lk + c]; });
            if (first)
                asa_mma_acc(acc, r0, n0, d, [&](int r, int x) { return f.V[r * ld + x]; },
                            [&](int x, int c) { return f.P[c * ld + x]; });
            asa_mma_store(acc, r0, n0, [&](int r, int c, float x) { f.LC[r * lk + c] += x; });
        });
        __syncthreads();
        first = false;
    }
    // per slot, in reverse: bsum, xo, yo
    const bool ends = f.t0 + L == fu_c1(f.t0 + L - 1, chunk, t);
    for (int s = threadIdx.x; s < nk; s += blockDim.x) {
        double extra = 0.0;  // num_prev . R0 (the carry-out gradient at the chunk's last position)
        if (ends)
            for (int j = 0; j < d; ++j) extra += (double)f.C[s * ld + j] * (double)f.P[s * ld + j];
        const bool carried = isfinite(f.mp[s]);
        const i64 srow = (f.bh * nk + s) * t + f.t0;
        double bsum = f.cd[s];
        for (int l = L - 1; l >= 0; --l) {
            double gd = (double)f.G[l * lk + s], p2 = (double)f.R[l * lk + s];
            bsum += gd;
            if (ends && l == L - 1) {
                gd += f.cd[s];
                p2 += extra;
            }
            xo[srow + l] = (double)f.A[l * lk + s] * (bsum + (double)f.LC[l * lk + s]);
            yo[srow + l] = carried ? (double)f.E[l * lk + s] * (f.cpd[s] * gd + p2) : 0.0;
        }
    }
}

// Exclusive affine scan over the 32 lanes in lane order: lane l applies x -> al*x + be. Returns
// the value before lane l's map (carry for lane 0); carry becomes the value after lane 31.
__device__ __forceinline__ double fu_affine_scan(double al, double be, double& carry, int lane) {
    double A = al, B = be;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        double Ap = __shfl_up_sync(ASA_FULL_MASK, A, o);
        double Bp = __shfl_up_sync(ASA_FULL_MASK, B, o);
        if (lane >= o) {
            B = fma(A, Bp, B);
            A = A * Ap;
        }
    }
    double post = fma(A, carry, B);
    double pre = __shfl_up_sync(ASA_FULL_MASK, post, 1);
    if (lane == 0) pre = carry;
    carry = __shfl_sync(ASA_FULL_MASK, post, 31);
    return pre;
}

// backward, running max: dwl [B,H,K,T] += the direct terms xo (where wl is finite) and the
// gradient through R_t = maximum(m_prev, cummax of the chunk) of the CPU twin:
//   dr_t = [t closes its chunk] * dm_c - xo_t - yo_t,
//   rho_t = 1 (m_prev > cm_t), 0 (cm_t > m_prev), 1/2 (tie): rho*dr goes to m_prev (the previous
//   chunk's R at its end: dm_c there), (1-rho)*dr to the last position holding cm_t in the chunk
//   (dropped where that value is -inf), dm_prev = sum_t (yo_t + rho_t dr_t).
// Both recurrences are affine scans over positions in reverse time; cm: scratch [B,H,K,T] (the
// chunk-local cummax). One warp per (b,h,s).

// twin: cpu::slot_ops::slot_scan_backward
extern "C" __global__ void slot_scan_read_backward_route(float* dwl, float* cm, const double* __restrict__ xo,
                                                         const double* __restrict__ yo,
                                                         const float* __restrict__ wl,
                                                         const float* __restrict__ rmax, int nbh, int t, int nk,
                                                         int chunk) {
    int warp = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= nbh * nk) return;
    i64 srow = (i64)warp * t;
    const float* ws = wl + srow;
    const float* rm = rmax + srow;
    float* cmr = cm + srow;
    // chunk-local cummax: a segmented max scan, segments starting at chunk starts
    float carry = ASA_NEG_INF;
    for (int base = 0; base < t; base += 32) {
        int ti = base + lane;
        float xv = ti < t ? ws[ti] : ASA_NEG_INF;
        bool f = ti < t && ti % chunk == 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float y = __shfl_up_sync(ASA_FULL_MASK, xv, o);
            int g = __shfl_up_sync(ASA_FULL_MASK, (int)f, o);
            if (lane >= o) {
                if (!f) xv = fmaxf(y, xv);
                f = f || g != 0;
            }
        }
        if (!f) xv = fmaxf(carry, xv);
        if (ti < t) cmr[ti] = xv;
        carry = __shfl_sync(ASA_FULL_MASK, xv, 31);
    }
    __syncwarp();
    // reverse time: lane 0 takes the latest position of each group of 32
    double accg = 0.0, accr = 0.0;
    for (int top = t; top > 0; top -= 32) {
        int ti = top - 1 - lane;
        bool valid = ti >= 0;
        double X = 0.0, Y = 0.0, rho = 1.0;
        float w = ASA_NEG_INF, cmt = ASA_NEG_INF;
        bool last = false, rec = false;
        if (valid) {
            X = xo[srow + ti];
            Y = yo[srow + ti];
            w = ws[ti];
            cmt = cmr[ti];
            int c0 = fu_c0(ti, chunk);
            float mp = c0 > 0 ? rm[c0 - 1] : ASA_NEG_INF;
            float cprev = ti == c0 ? ASA_NEG_INF : cmr[ti - 1];
            last = ti + 1 == min(c0 + chunk, t);
            rec = w >= cprev;  // the CPU's `ws[ti] >= c`: ti becomes the routing target
            rho = mp > cmt ? 1.0 : (cmt > mp ? 0.0 : 0.5);
        }
        double bg = valid ? Y - rho * (X + Y) : 0.0;
        double pre_g = fu_affine_scan(valid && last ? rho : 1.0, bg, accg, lane);
        double dr = (last ? pre_g : 0.0) - X - Y;
        double z = (valid && isfinite(cmt)) ? (1.0 - rho) * dr : 0.0;
        double pre_r = fu_affine_scan(valid && rec ? 0.0 : 1.0, valid && !rec ? z : 0.0, accr, lane);
        if (valid) {
            double add = isfinite(w) ? X : 0.0;
            if (rec) add += pre_r + z;
            dwl[srow + ti] = dwl[srow + ti] + (float)add;
        }
    }
}

// dkeys [H,K,d] += sum over b (in order) of (f32) sum over tiles of part[b,h,tile,s,j] (f64).
// A block per (h, s) (grid-stride): blockDim.x / d groups of d threads (blockDim.x >= d), group
// g summing the tiles of batches g, g + groups, ... into shared memory [groups, d], one pass
// of `groups` batches at a time; group 0 adds each pass's rows in batch order.
// With dgamma (nullable): one more item, after the (h, s) ones, sums gpart[0..ngpart) (f64,
// fixed order: strided per thread, then `block_sum_d`) into dgamma[0] (=) and, with
// dgamma_grad (nullable), adds (f32)(sum * factor) to dgamma_grad[0] (the raw parameter's
// gradient; factor = asa_step_factor(gamma_factor, gamma_at)).
// twin: cpu::slot_ops::read_logits_backward
extern "C" __global__ void slot_scan_read_backward_keys(float* dkeys, const double* __restrict__ part, int b, int h,
                                                        int ntiles, int nk, int d, double* dgamma,
                                                        float* dgamma_grad, double gamma_factor,
                                                        const double* __restrict__ gpart, int ngpart,
                                                        const double* gamma_at) {
    ASA_DYN_SHARED(float, rows);  // [groups, d]
    const int groups = (int)blockDim.x / d, g = (int)threadIdx.x / d, j = (int)threadIdx.x - g * d;
    const int items = h * nk + (dgamma ? 1 : 0);
    for (int hk = blockIdx.x; hk < items; hk += gridDim.x) {  // hi*K + s
        if (hk == h * nk) {  // d gamma: the whole block, strided, then a tree
            __shared__ double sh[32];
            double a = 0.0;
            for (int i = threadIdx.x; i < ngpart; i += blockDim.x) a += gpart[i];
            a = block_sum_d(a, sh);
            if (threadIdx.x == 0) {
                dgamma[0] = a;
                const double f = asa_step_factor(gamma_factor, gamma_at);
                if (dgamma_grad) dgamma_grad[0] = dgamma_grad[0] + (float)(a * f);
            }
            continue;
        }
        const int hi = hk / nk, s = hk - hi * nk;
        float acc = g == 0 ? dkeys[(i64)hk * d + j] : 0.0f;
        for (int b0 = 0; b0 < b; b0 += groups) {
            const int bb = b0 + g;
            if (g < groups && bb < b) {
                double a = 0.0;
                for (int tl = 0; tl < ntiles; ++tl) a += part[((((i64)bb * h + hi) * ntiles + tl) * nk + s) * d + j];
                rows[g * d + j] = (float)a;
            }
            __syncthreads();
            if (g == 0)
                for (int r = 0; r < groups && b0 + r < b; ++r) acc = acc + rows[r * d + j];
            __syncthreads();
        }
        if (g == 0) dkeys[(i64)hk * d + j] = acc;
    }
}
