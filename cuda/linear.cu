// The slotspace refine's causal linear attention, forward and backward: the kernels of
// `src/backend/cuda/linear.rs` (launch sequences), twins of `linear_attn_forward` /
// `linear_attn_backward` in `src/backend/cpu/slot_ops.rs`. Two algorithms: chunked walks (a warp per
// state row or column) and tiles (a block per chunk, every term a small matrix product), the
// tiles in two arithmetic modes: f64 on CUDA cores (exact, the f32 path) and bf16 operands with
// f32 accumulation on tensor cores (`_bf16`, the bf16 path).
#include "common.cuh"

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
// twin: cpu::slot_ops::linear_attn_forward
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
#define LA_CARRY_UNROLL 8  // CARRY_UNROLL of src/backend/cuda/linear.rs (the cost model's steps)
__device__ __forceinline__ void la_carry(double* x, int n, int nch, int width, bool reverse) {
    ASA_GRID_LOOP(i, (i64)n * width) {
        i64 nn = i / width;
        int e = (int)(i % width);
        double* col = x + nn * nch * width + e;  // chunk ch at col[ch * width]
        double run = 0.0;
        for (int k0 = 0; k0 < nch; k0 += LA_CARRY_UNROLL) {
            double val[LA_CARRY_UNROLL];
#pragma unroll
            for (int j = 0; j < LA_CARRY_UNROLL; ++j) {
                int k = k0 + j, ch = reverse ? nch - 1 - k : k;
                val[j] = k < nch ? col[(i64)ch * width] : 0.0;
            }
#pragma unroll
            for (int j = 0; j < LA_CARRY_UNROLL; ++j) {
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
// twin: cpu::slot_ops::linear_attn_forward
extern "C" __global__ void linear_attn_forward_carry(double* cs, double* cz, int n, int nch, int m) {
    la_carry(cs, n, nch, m * m, false);
    la_carry(cz, n, nch, m, false);
}

// out: [N,T,M]; den: [N,T]; qf, kf, v: [N,T,M]; cs, cz: the carries (null: one chunk). One warp
// per (n, chunk, column c). The loads of step t+1 are issued while step t computes.
// twin: cpu::slot_ops::linear_attn_forward
extern "C" __global__ void linear_attn_forward(float* out, float* den, const float* __restrict__ qf,
                                               const float* __restrict__ kf, const float* __restrict__ v,
                                               const double* __restrict__ cs, const double* __restrict__ cz,
                                               int n, int t, int m, int chunk, unsigned short* out16) {
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
            const float y = (float)(acc / fmax(ds, (double)ASA_DEN_EPS));
            out[o + c] = y;
            if (out16) out16[o + c] = asa_f32_to_bf16(y);
            if (c == 0) den[nn * t + ti] = (float)ds;
        }
    }
}

// gden of the position at row offset o (a whole warp, lanes over features; every lane gets
// it): -(dout . out) / den where den >= eps, else 0.
__device__ __forceinline__ double la_gden(const float* __restrict__ dout, const float* __restrict__ out, float dt,
                                          i64 o, int m, int lane) {
    double go = 0.0;
#pragma unroll
    for (int i = 0; i < ASA_MAXA; ++i) {
        int c = lane + 32 * i;
        if (c < m) go += (double)dout[o + c] * (double)out[o + c];
    }
    go = warp_sum_d(go);
    return dt >= ASA_DEN_EPS ? -go / fmax((double)dt, (double)ASA_DEN_EPS) : 0.0;
}

// gden: [N,T] (see above). One warp per (n, t).
// twin: cpu::slot_ops::linear_attn_backward
extern "C" __global__ void linear_attn_backward_gden(double* gden, const float* __restrict__ dout,
                                                     const float* __restrict__ out, const float* __restrict__ den,
                                                     int n, int t, int m) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (i64)n * t) return;
    const double g = la_gden(dout, out, den[warp], warp * m, m, lane);
    if (lane == 0) gden[warp] = g;
}

// Backward to qf: dqf_t[a] += gden_t * max(Z_t[a], eps) + sum_c S_t[a,c] gnum_t[c], rebuilding
// row a of S_t and Z_t[a] from the forward carries; zlive[t,a] = (Z_t[a] >= eps) for the dk
// sweep. zlive: [N,T,M] u8. One warp per (n, chunk, row a), lanes over c; loads run one step
// ahead.
// twin: cpu::slot_ops::linear_attn_backward
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
// twin: cpu::slot_ops::linear_attn_backward
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
// twin: cpu::slot_ops::linear_attn_backward
extern "C" __global__ void linear_attn_backward_carry(double* ds, double* dz, int n, int nch, int m) {
    la_carry(ds, n, nch, m * m, true);
    la_carry(dz, n, nch, m, true);
}

// Backward to kf: dkf_t[a] += dZ_t[a] + sum_c dS_t[a,c] v_t[c], dS_t = sum_{s>=t} qf_s gnum_s^T,
// dZ_t[a] = sum_{s>=t, zlive[s,a]} gden_s qf_s[a], from the backward carries. One warp per
// (n, chunk, row a), lanes over c; reverse time, loads one step ahead.
// twin: cpu::slot_ops::linear_attn_backward
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
// twin: cpu::slot_ops::linear_attn_backward
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
// short walks over the chunk, one thread per feature. Inputs are staged as f32 (exact); every
// shared matrix has an odd row stride so that row and column reads are both free of bank
// conflicts. The host picks the chunk so that the shared memory fits (src/backend/cuda/linear.rs).
//
// Two arithmetic modes of one body (template parameter TC):
// - exact (`linear_attn_*_tiled*`, the f32 path): products and sums in f64 on CUDA cores, each
//   thread a 4x4 tile of the output; sizes padded to multiples of 4;
// - tensor cores (`..._bf16`, the bf16 path): every product with bf16 operands and f32
//   accumulation (asa_mma_bf16), a warp per 16x8 output tile; sizes padded to multiples of 16.
//   The walks (Z, dZ, den, the key sums) stay f64. Agreement with the CPU twin is that of bf16
//   operands (about 3 significant digits), like the bf16 GEMMs.

#define LT_THREADS 256

// Padding of the tile sizes: 4 (exact), 16 (tensor cores: the m16n8k16 fragments).
template <bool TC>
__device__ __forceinline__ int lt_pad(int x) {
    return TC ? (x + 15) & ~15 : (x + 3) & ~3;
}

// A block's place: row nn, carry row nc = blockIdx.x (= nn * nch + chunk), positions
// [t0, t0 + tc); padded sizes Cp (chunk) and Mp (features); row strides lc = Cp + 1, lm = Mp + 1.
struct LtBlock {
    i64 nn, nc, base;
    int t0, tc, Cp, Mp, lc, lm;
};
template <bool TC>
__device__ __forceinline__ LtBlock lt_block(int t, int m, int chunk) {
    LtBlock b;
    int nch = la_nch(t, chunk);
    b.nc = blockIdx.x;
    b.nn = b.nc / nch;
    b.t0 = (int)(b.nc % nch) * chunk;
    b.tc = min(chunk, t - b.t0);
    b.base = b.nn * t * m;
    b.Cp = lt_pad<TC>(chunk);
    b.Mp = lt_pad<TC>(m);
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
// g[r][c] = gnum = dout[t0 + r][c] / max(den, eps) (stride lm), gd[r] = gden[t0 + r]. The
// tensor-core tiles (TC) divide in f32: their gnum is an mma operand, rounded to bf16 anyway.
// With out (the forward's output, nullable; tensor-core tiles only: the f64 tiles would spill)
// gden is made here instead, as linear_attn_backward_gden makes it (a warp per position, the
// same order), and stored into gden_out for the kernels after.
template <bool TC>
__device__ __forceinline__ void lt_stage_gnum(double* g, double* gd, const float* __restrict__ dout,
                                              const float* __restrict__ den, const double* __restrict__ gden,
                                              double* gden_out, const float* __restrict__ out, const LtBlock& b,
                                              int t, int m) {
    for (int i = threadIdx.x; i < b.Cp * b.Mp; i += blockDim.x) {
        int r = i / b.Mp, c = i - r * b.Mp;
        double x = 0.0;
        if (r < b.tc && c < m) {
            const float dn = den[b.nn * t + b.t0 + r], go = dout[b.base + (i64)(b.t0 + r) * m + c];
            if (TC)
                x = (double)(go / fmaxf(dn, ASA_DEN_EPS));
            else
                x = (double)go * (1.0 / fmax((double)dn, (double)ASA_DEN_EPS));
        }
        g[r * b.lm + c] = x;
    }
    if (!(TC && out)) {
        for (int r = threadIdx.x; r < b.Cp; r += blockDim.x) gd[r] = r < b.tc ? gden[b.nn * t + b.t0 + r] : 0.0;
        return;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int r = warp; r < b.Cp; r += nw) {
        double gv = 0.0;
        if (r < b.tc) {
            const i64 o = b.base + (i64)(b.t0 + r) * m;
            gv = la_gden(dout, out, den[b.nn * t + b.t0 + r], o, m, lane);
            if (lane == 0) gden_out[b.nn * t + b.t0 + r] = gv;
        }
        if (lane == 0) gd[r] = gv;
    }
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
__device__ __forceinline__ void lt_mm2_f64(int rows, int cols, int in1, L1 l1, R1 r1, int in2, L2 l2, R2 r2, W w) {
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

// lt_mm2_f64's product on tensor cores: rows a multiple of 16, cols of 8; a warp per 16x8
// output tile (warps take tiles in turn), w called once per output element.
template <class L1, class R1, class L2, class R2, class W>
__device__ __forceinline__ void lt_mm2_tc(int rows, int cols, int in1, L1 l1, R1 r1, int in2, L2 l2, R2 r2, W w) {
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, tn = cols >> 3;
    for (int tile = warp; tile < (rows >> 4) * tn; tile += nw) {
        const int r0 = (tile / tn) << 4, c0 = (tile % tn) << 3;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        asa_mma_acc(acc, r0, c0, in1, l1, r1);
        if (in2 > 0) asa_mma_acc(acc, r0, c0, in2, l2, r2);
        const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
        w(r0 + g, c0 + 2 * q, acc[0]);
        w(r0 + g, c0 + 2 * q + 1, acc[1]);
        w(r0 + g + 8, c0 + 2 * q, acc[2]);
        w(r0 + g + 8, c0 + 2 * q + 1, acc[3]);
    }
}

// The tiles' product in the block's mode.
template <bool TC, class L1, class R1, class L2, class R2, class W>
__device__ __forceinline__ void lt_mm2(int rows, int cols, int in1, L1 l1, R1 r1, int in2, L2 l2, R2 r2, W w) {
    if (TC)
        lt_mm2_tc(rows, cols, in1, l1, r1, in2, l2, r2, w);
    else
        lt_mm2_f64(rows, cols, in1, l1, r1, in2, l2, r2, w);
}

// One product: out(r, c) = sum_{x < inner} l(r, x) rr(x, c).
template <bool TC, class L, class R, class W>
__device__ __forceinline__ void lt_mm(int rows, int cols, int inner, L l, R rr, W w) {
    lt_mm2<TC>(rows, cols, inner, l, rr, 0, l, rr, w);
}

// The forward carries' chunk sums (as linear_attn_forward_sums): cs[n,ch] = sum over the chunk
// of kf_s^T v_s [M,M], cz[n,ch] = sum kf_s [M]. Block per (n, chunk); shared: K, V f32 [Cp][lm].
template <bool TC>
__device__ __forceinline__ void lt_forward_sums(double* cs, double* cz, const float* __restrict__ kf, const float* __restrict__ v,
                               int n, int t, int m, int chunk) {
    const LtBlock b = lt_block<TC>(t, m, chunk);
    const int lm = b.lm;
    ASA_DYN_SHARED(double, lt_smem);
    float* K = (float*)lt_smem;
    float* V = K + b.Cp * lm;
    lt_stage(K, kf, b, m);
    lt_stage(V, v, b, m);
    __syncthreads();
    lt_mm<TC>(
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
// twin: cpu::slot_ops::linear_attn_forward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_forward_tiled_sums(double* cs, double* cz, const float* __restrict__ kf, const float* __restrict__ v,
                               int n, int t, int m, int chunk) {
    lt_forward_sums<false>(cs, cz, kf, v, n, t, m, chunk);
}
// twin: cpu::slot_ops::linear_attn_forward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_forward_tiled_sums_bf16(double* cs, double* cz, const float* __restrict__ kf, const float* __restrict__ v,
                               int n, int t, int m, int chunk) {
    lt_forward_sums<true>(cs, cz, kf, v, n, t, m, chunk);
}

// out [N,T,M], den [N,T] (=) as linear_attn_forward, from the carries cs, cz (null: one chunk);
// out16: nullable, out's bf16 twin. Block per (n, chunk); shared (LtSmem): S = sq, A = cc,
// Zc = ct, dn = vec, Q, K, V.
template <bool TC>
__device__ __forceinline__ void lt_forward(float* out, float* den, const float* __restrict__ qf, const float* __restrict__ kf,
                          const float* __restrict__ v, const double* __restrict__ cs, const double* __restrict__ cz,
                          int n, int t, int m, int chunk, unsigned short* out16) {
    const LtBlock b = lt_block<TC>(t, m, chunk);
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
    lt_mm<TC>(
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
    lt_mm2<TC>(
        b.Cp, Mp, Mp, [&](int r, int x) { return (double)Q[r * lm + x]; },
        [&](int x, int c) { return S[x * lm + c]; }, b.Cp, [&](int r, int s) { return A[r * lc + s]; },
        [&](int s, int c) { return (double)V[s * lm + c]; },
        [&](int r, int c, double x) {
            if (r < b.tc && c < m) {
                const i64 o = b.base + (i64)(b.t0 + r) * m + c;
                const float y = (float)(x / fmax(dn[r], (double)ASA_DEN_EPS));
                out[o] = y;
                if (out16) out16[o] = asa_f32_to_bf16(y);
            }
        });
}
// twin: cpu::slot_ops::linear_attn_forward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_forward_tiled(float* out, float* den, const float* __restrict__ qf, const float* __restrict__ kf,
                          const float* __restrict__ v, const double* __restrict__ cs, const double* __restrict__ cz,
                          int n, int t, int m, int chunk, unsigned short* out16) {
    lt_forward<false>(out, den, qf, kf, v, cs, cz, n, t, m, chunk, out16);
}
// twin: cpu::slot_ops::linear_attn_forward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_forward_tiled_bf16(float* out, float* den, const float* __restrict__ qf, const float* __restrict__ kf,
                          const float* __restrict__ v, const double* __restrict__ cs, const double* __restrict__ cz,
                          int n, int t, int m, int chunk, unsigned short* out16) {
    lt_forward<true>(out, den, qf, kf, v, cs, cz, n, t, m, chunk, out16);
}

// Backward to qf (dqf +=) and zlive as linear_attn_backward, from the forward carries cs, cz,
// and the backward carries' chunk sums (as linear_attn_backward_sums; skipped when ds is null):
// ds[n,ch] = sum over the chunk of qf_s^T gnum_s, dz[n,ch] = sum of gden_s qf_s over the chunk's
// s with zlive. gden [N,T] is made here from out (the forward's output) and stored for the
// dk/dv kernel (`lt_stage_gnum`). Block per (n, chunk); shared (LtSmem): S = sq, G = g,
// Bm = cc, Zg = ct, gd = vec, Q, K, V.
template <bool TC>
__device__ __forceinline__ void lt_backward_dq(float* __restrict__ dqf, unsigned char* __restrict__ zlive, double* ds, double* dz,
                              const float* __restrict__ dout, const float* __restrict__ den,
                              const double* __restrict__ gden, double* gden_out, const float* __restrict__ out,
                              const float* __restrict__ qf,
                              const float* __restrict__ kf, const float* __restrict__ v,
                              const double* __restrict__ cs, const double* __restrict__ cz, int n, int t, int m,
                              int chunk) {
    const LtBlock b = lt_block<TC>(t, m, chunk);
    const int lm = b.lm, lc = b.lc, Mp = b.Mp;
    ASA_DYN_SHARED(double, lt_smem);
    const LtSmem x = lt_carve(lt_smem, b);
    double *S = x.sq, *G = x.g, *Bm = x.cc, *Zg = x.ct, *gd = x.vec;
    const float *Q = x.Q, *K = x.K, *V = x.V;
    lt_stage_qkv(x, qf, kf, v, b, m);
    lt_stage_carry(S, cs, b, m);
    lt_stage_gnum<TC>(G, gd, dout, den, gden, gden_out, out, b, t, m);
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
    lt_mm<TC>(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return G[r * lm + x]; },
        [&](int x, int s) { return (double)V[s * lm + x]; },
        [&](int r, int s, double x) { Bm[r * lc + s] = s <= r ? x : 0.0; });
    // ds[a][c] = sum_s q_s[a] gnum_s[c]
    if (ds)
        lt_mm<TC>(
            Mp, Mp, b.tc, [&](int a, int s) { return (double)Q[s * lm + a]; },
            [&](int s, int c) { return G[s * lm + c]; },
            [&](int a, int c, double x) {
                if (a < m && c < m) ds[(b.nc * m + a) * m + c] = x;
            });
    __syncthreads();
    // dq_t[a] += Zg + sum_c gnum_t[c] S0[a][c] + sum_s Bm[t][s] k_s[a]
    lt_mm2<TC>(
        b.Cp, Mp, Mp, [&](int r, int c) { return G[r * lm + c]; }, [&](int c, int a) { return S[a * lm + c]; },
        b.Cp, [&](int r, int s) { return Bm[r * lc + s]; }, [&](int s, int a) { return (double)K[s * lm + a]; },
        [&](int r, int a, double x) {
            if (r < b.tc && a < m) {
                i64 o = b.base + (i64)(b.t0 + r) * m + a;
                dqf[o] = dqf[o] + (float)(Zg[r * lm + a] + x);
            }
        });
}
// twin: cpu::slot_ops::linear_attn_backward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_backward_tiled_dq(float* __restrict__ dqf, unsigned char* __restrict__ zlive, double* ds, double* dz,
                              const float* __restrict__ dout, const float* __restrict__ den,
                              const double* __restrict__ gden, const float* __restrict__ qf,
                              const float* __restrict__ kf, const float* __restrict__ v,
                              const double* __restrict__ cs, const double* __restrict__ cz, int n, int t, int m,
                              int chunk) {
    lt_backward_dq<false>(dqf, zlive, ds, dz, dout, den, gden, nullptr, nullptr, qf, kf, v, cs, cz, n, t, m, chunk);
}
// twin: cpu::slot_ops::linear_attn_backward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_backward_tiled_dq_bf16(float* __restrict__ dqf, unsigned char* __restrict__ zlive, double* ds, double* dz,
                              const float* __restrict__ dout, const float* __restrict__ den,
                              double* gden, const float* __restrict__ qf,
                              const float* __restrict__ kf, const float* __restrict__ v,
                              const double* __restrict__ cs, const double* __restrict__ cz, int n, int t, int m,
                              int chunk, const float* __restrict__ out) {
    // gden is made here from out (and stored), not read
    lt_backward_dq<true>(dqf, zlive, ds, dz, dout, den, nullptr, gden, out, qf, kf, v, cs, cz, n, t, m, chunk);
}

// Backward to kf and v (dkf, dv +=) as linear_attn_backward, from the backward carries ds, dz
// (the sums after the chunk; null: one chunk) and zlive. Block per (n, chunk); shared (LtSmem):
// D = sq (dS1), G = g, P = cc, dZ = ct, gd = vec, Q, K, V, zlive = zl.
template <bool TC>
__device__ __forceinline__ void lt_backward_dkdv(float* __restrict__ dkf, float* __restrict__ dv,
                                const unsigned char* __restrict__ zlive, const double* __restrict__ ds,
                                const double* __restrict__ dz, const float* __restrict__ dout,
                                const float* __restrict__ den, const double* __restrict__ gden,
                                const float* __restrict__ qf, const float* __restrict__ kf,
                                const float* __restrict__ v, int n, int t, int m, int chunk) {
    const LtBlock b = lt_block<TC>(t, m, chunk);
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
    lt_stage_gnum<TC>(G, gd, dout, den, gden, nullptr, nullptr, b, t, m);
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
    lt_mm<TC>(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return (double)V[r * lm + x]; },
        [&](int x, int s) { return G[s * lm + x]; },
        [&](int r, int s, double x) { P[r * lc + s] = s >= r ? x : 0.0; });
    __syncthreads();
    // dk_t[a] += dZ_t[a] + sum_c v_t[c] dS1[a][c] + sum_s P[t][s] q_s[a]
    lt_mm2<TC>(
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
    lt_mm<TC>(
        b.Cp, b.Cp, Mp, [&](int r, int x) { return (double)K[r * lm + x]; },
        [&](int x, int s) { return (double)Q[s * lm + x]; },
        [&](int r, int s, double x) { P[r * lc + s] = s >= r ? x : 0.0; });
    __syncthreads();
    // dv_t[c] += sum_a k_t[a] dS1[a][c] + sum_s P[t][s] gnum_s[c]
    lt_mm2<TC>(
        b.Cp, Mp, Mp, [&](int r, int a) { return (double)K[r * lm + a]; }, [&](int a, int c) { return D[a * lm + c]; },
        b.Cp, [&](int r, int s) { return P[r * lc + s]; }, [&](int s, int c) { return G[s * lm + c]; },
        [&](int r, int c, double x) {
            if (r < b.tc && c < m) {
                i64 o = b.base + (i64)(b.t0 + r) * m + c;
                dv[o] = dv[o] + (float)x;
            }
        });
}
// twin: cpu::slot_ops::linear_attn_backward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_backward_tiled_dkdv(float* __restrict__ dkf, float* __restrict__ dv,
                                const unsigned char* __restrict__ zlive, const double* __restrict__ ds,
                                const double* __restrict__ dz, const float* __restrict__ dout,
                                const float* __restrict__ den, const double* __restrict__ gden,
                                const float* __restrict__ qf, const float* __restrict__ kf,
                                const float* __restrict__ v, int n, int t, int m, int chunk) {
    lt_backward_dkdv<false>(dkf, dv, zlive, ds, dz, dout, den, gden, qf, kf, v, n, t, m, chunk);
}
// twin: cpu::slot_ops::linear_attn_backward
extern "C" __global__ void __launch_bounds__(LT_THREADS)
linear_attn_backward_tiled_dkdv_bf16(float* __restrict__ dkf, float* __restrict__ dv,
                                const unsigned char* __restrict__ zlive, const double* __restrict__ ds,
                                const double* __restrict__ dz, const float* __restrict__ dout,
                                const float* __restrict__ den, const double* __restrict__ gden,
                                const float* __restrict__ qf, const float* __restrict__ kf,
                                const float* __restrict__ v, int n, int t, int m, int chunk) {
    lt_backward_dkdv<true>(dkf, dv, zlive, ds, dz, dout, den, gden, qf, kf, v, n, t, m, chunk);
}
