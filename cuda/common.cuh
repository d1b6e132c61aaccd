// Shared helpers of the asa kernels. Textually included (by the Rust loader) into every
// `cuda/*.cu` that says `#include "common.cuh"`, so the kernels need no CUDA headers at all.
//
// Conventions of every kernel:
// - row-major f32 tensors, shapes in the comments (`[B,H,T,d]`), sizes passed as `int`
//   (the host checks that every size and element count fits), element offsets in `long long`;
// - nullable inputs are plain pointers that may be 0 (the host passes a null device pointer);
// - backward kernels ACCUMULATE (`+=`) like their CPU twins unless documented otherwise;
// - no float atomics anywhere: every reduction runs in a fixed order, so results are bitwise
//   reproducible run to run (the one atomic is the integer arrival ticket of `asa_last_block`);
// - warp reductions broadcast lane 0's result, so every lane of a warp sees the same bits.

#define ASA_FULL_MASK 0xffffffffu
#define ASA_DEN_EPS 1e-8f           /* DEN_EPS of the CPU twin (f32 1e-8) */
#define ASA_NEG_INF (__int_as_float(0xff800000))
#define ASA_MAXJ 8                  /* head_dim <= 32 * ASA_MAXJ = 256 for per-lane vectors */
#define ASA_MAXK 128                /* num_slots <= 128 for per-thread slot rows */
#define ASA_MAXA 4                  /* slotspace_dim <= 32 * ASA_MAXA = 128 (linear attention) */

// Dynamic shared memory of a block (its size is set at launch; the SIMT test harness defines
// its own).
#ifndef ASA_DYN_SHARED
#define ASA_DYN_SHARED(T, name) extern __shared__ T name[]
#endif

typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ bool asa_finite(float x) { return isfinite(x); }

// Sum over the 32 lanes of a warp; every lane gets lane 0's result (bitwise identical).
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ASA_FULL_MASK, v, o);
    return __shfl_sync(ASA_FULL_MASK, v, 0);
}

// Two / three independent warp sums at once (interleaved shuffles overlap their latency);
// every lane gets lane 0's results.
__device__ __forceinline__ void warp_sum2_d(double& a, double& b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
        b += __shfl_xor_sync(ASA_FULL_MASK, b, o);
    }
    a = __shfl_sync(ASA_FULL_MASK, a, 0);
    b = __shfl_sync(ASA_FULL_MASK, b, 0);
}

__device__ __forceinline__ void warp_sum3_d(double& a, double& b, double& c) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(ASA_FULL_MASK, a, o);
        b += __shfl_xor_sync(ASA_FULL_MASK, b, o);
        c += __shfl_xor_sync(ASA_FULL_MASK, c, o);
    }
    a = __shfl_sync(ASA_FULL_MASK, a, 0);
    b = __shfl_sync(ASA_FULL_MASK, b, 0);
    c = __shfl_sync(ASA_FULL_MASK, c, 0);
}

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ASA_FULL_MASK, v, o));
    return __shfl_sync(ASA_FULL_MASK, v, 0);
}

// Block-wide sum in a fixed tree order (deterministic). `sh` holds blockDim.x/32 doubles.
// Every thread of the block must call it; every thread gets the total.
__device__ __forceinline__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    double t = 0.0;
    if (w == 0) {
        t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    t = sh[0];
    __syncthreads();
    return t;
}

__device__ __forceinline__ float block_max_f(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max_f(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = ASA_NEG_INF;
    if (w == 0) {
        t = lane < nw ? sh[lane] : ASA_NEG_INF;
        t = warp_max_f(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    t = sh[0];
    __syncthreads();
    return t;
}

// Single-launch two-stage reductions (the threadFenceReduction pattern): every block of a
// group writes its partial results, then calls this; it returns true in the one block of the
// group that arrives last, which then reads every partial of the group in a fixed order (with
// `asa_ld_cg`), so the result never depends on which block that is. `ticket` counts the
// group's arrivals (a `Device::tickets` counter, 0 before the launch) and is returned to 0 by
// the last block for the next launch. Every thread of the block must call it.
__device__ __forceinline__ bool asa_last_block(unsigned* ticket, unsigned blocks_in_group) {
    __shared__ int last;
    __threadfence();  // this block's partials are visible before its arrival counts
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        const unsigned before = atomicAdd(ticket, 1u);
        last = before == blocks_in_group - 1u;
        if (last) *ticket = 0u;
    }
    __syncthreads();
    if (last) __threadfence();
    return last != 0;
}

// A load that bypasses the (non-coherent) L1 cache: partials written by other blocks.
__device__ __forceinline__ double asa_ld_cg(const double* p) { return *(const volatile double*)p; }

// softplus in f64 (the CPU's `softplus`: x above 20 as is).
__device__ __forceinline__ double asa_softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

// A scalar that the host computes each step from a learned parameter (`Learned` in
// src/backend/cuda/ops.rs: the content-read gamma, the refine gate, the ALiBi strength's
// gradient factor): read from the step's scalar block on the device when `at` is given (at[0]
// the value, at[1] d value / d raw; uploaded with the step's batch), so that a replayed CUDA
// graph reads this step's; else the value passed by argument.
__device__ __forceinline__ float asa_step_value(float value, const double* at) { return at ? (float)at[0] : value; }
__device__ __forceinline__ double asa_step_factor(double factor, const double* at) { return at ? at[1] : factor; }

// The traversal of the RoPE kernels and the refine's qkv stages (launch shape: `pair_cfg` in
// src/backend/cuda/refine.rs): blocks of threads over (position, pair) of `rows` positions at
// a time, grid x over position groups, grid y over the N sequences (grid-stride on both);
// f(o, tab, p, nn, ti) for pair p at element offset o of [N,T,D], tab = ti * D the offset of
// the position's cos and sin rows, sequence nn, position ti. No 64-bit division: the index
// math of an element-wise RoPE would otherwise cost more issue slots than its loads.
template <class F>
__device__ __forceinline__ void rope_walk(int n, int t, int d, F f) {
    const int half = d / 2, pstep = min(half, (int)blockDim.x);
    const int rows = half >= (int)blockDim.x ? 1 : (int)blockDim.x / half;
    const int r = (int)threadIdx.x / pstep;
    if (r >= rows) return;
    const int p0 = (int)threadIdx.x - r * pstep;
    for (i64 nn = blockIdx.y; nn < n; nn += gridDim.y)
        for (int ti = (int)blockIdx.x * rows + r; ti < t; ti += (int)gridDim.x * rows) {
            const i64 row = (nn * t + ti) * d, tab = (i64)ti * d;
            for (int p = p0; p < half; p += pstep) f(row + 2 * p, tab, p, nn, ti);
        }
}

// Grid-stride loop over [0, n).
#define ASA_GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)gridDim.x * blockDim.x)

// Counter-based RNG for dropout: a SplitMix64 finaliser of (seed, index). Each element's draw
// depends only on the call's seed and the element's index, never on the launch shape.
__device__ __forceinline__ u64 asa_mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
// Uniform in [0, 1) with 24 random bits.
__device__ __forceinline__ float asa_uniform(u64 seed, u64 idx) {
    u64 h = asa_mix64(seed ^ asa_mix64(idx));
    return (float)(unsigned int)(h >> 40) * (1.0f / 16777216.0f);
}

// f32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN).
__device__ __forceinline__ unsigned short asa_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// bf16 bits -> f32 (exact).
__device__ __forceinline__ float asa_bf16_to_f32(unsigned short h) { return __uint_as_float((unsigned int)h << 16); }

// Two f32 -> one register of two bf16 (round to nearest even): lo in the low half.
__device__ __forceinline__ unsigned int asa_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(ASA_SIMT)
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned int)asa_f32_to_bf16(lo) | ((unsigned int)asa_f32_to_bf16(hi) << 16);
#endif
}

// ------------------------------------------------------------------------------------------------
// Tensor cores: d (16x8, f32) += A (16x16, bf16, row-major) B (16x8, bf16), one warp, with the
// PTX fragment layout of mma.sync.m16n8k16.row.col. Lane = 4 g + q (g = lane / 4, q = lane % 4):
//   a[0] = A[g][2q, 2q+1]   a[1] = A[g+8][2q, 2q+1]   a[2] = A[g][2q+8, 2q+9]   a[3] = A[g+8][2q+8, 2q+9]
//   b[0] = B[2q, 2q+1][g]   b[1] = B[2q+8, 2q+9][g]
//   d[0], d[1] = D[g][2q, 2q+1]                       d[2], d[3] = D[g+8][2q, 2q+1]
// (pairs packed by asa_bf16x2, the lower index in the low half). Every lane of the warp must
// call it. On sm_80 and later it is one tensor-core instruction; in the SIMT emulator (and on
// older devices) the same fragments are gathered with warp shuffles and multiplied on CUDA
// cores in f32 (the bf16 products are exact in f32; the sum's order is the hardware's business,
// so callers never rely on it).
__device__ __forceinline__ void asa_mma_bf16(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(ASA_SIMT)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // lane 4 g + j holds A's rows g, g+8 at k = 2j, 2j+1, 2j+8, 2j+9; lanes 4 (2q) + j and
    // 4 (2q+1) + j hold B's columns 2q and 2q+1 at the same k
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned int ar[4], bc[2][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) ar[i] = __shfl_sync(ASA_FULL_MASK, a[i], 4 * g + j);
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int i = 0; i < 2; ++i) bc[c][i] = __shfl_sync(ASA_FULL_MASK, b[i], 4 * (2 * q + c) + j);
        // ar[0]: row g, k 2j..; ar[1]: row g+8, k 2j..; ar[2]: row g, k 2j+8..; ar[3]: row g+8, k 2j+8..
#pragma unroll
        for (int half = 0; half < 2; ++half)      // k = 2j + 8 half + e
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int sh = 16 * e;
                float a0 = asa_bf16_to_f32((unsigned short)(ar[2 * half] >> sh));
                float a1 = asa_bf16_to_f32((unsigned short)(ar[2 * half + 1] >> sh));
                float b0 = asa_bf16_to_f32((unsigned short)(bc[0][half] >> sh));
                float b1 = asa_bf16_to_f32((unsigned short)(bc[1][half] >> sh));
                acc[0] += a0 * b0;
                acc[1] += a0 * b1;
                acc[2] += a1 * b0;
                acc[3] += a1 * b1;
            }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] += acc[i];
#endif
}

// acc (the 16x8 output fragment at rows r0.., columns c0..) += sum_{x < inner} l(r, x) rr(x, c)
// on tensor cores, for operands in any layout (l, rr: element reads, usually of shared memory):
// rounded to bf16, the inner dimension in steps of 16, reads at x >= inner are zero. Every lane
// of the warp must call it.
template <class L, class R>
__device__ __forceinline__ void asa_mma_acc(float (&acc)[4], int r0, int c0, int inner, L l, R rr) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int ra = r0 + g, rb = r0 + g + 8, c = c0 + g;
#pragma unroll 1
    for (int k0 = 0; k0 < inner; k0 += 16) {
        float lv[2][4], rv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int x = k0 + 2 * q + (e & 1) + 8 * (e >> 1);  // 2q, 2q+1, 2q+8, 2q+9
            const bool in = x < inner;
            lv[0][e] = in ? (float)l(ra, x) : 0.0f;
            lv[1][e] = in ? (float)l(rb, x) : 0.0f;
            rv[e] = in ? (float)rr(x, c) : 0.0f;
        }
        const unsigned int a[4] = {asa_bf16x2(lv[0][0], lv[0][1]), asa_bf16x2(lv[1][0], lv[1][1]),
                                   asa_bf16x2(lv[0][2], lv[0][3]), asa_bf16x2(lv[1][2], lv[1][3])};
        const unsigned int b[2] = {asa_bf16x2(rv[0], rv[1]), asa_bf16x2(rv[2], rv[3])};
        asa_mma_bf16(acc, a, b);
    }
}

// w(r, c, value) for the four elements of a 16x8 output fragment at rows r0.., columns c0.. .
template <class W>
__device__ __forceinline__ void asa_mma_store(const float (&acc)[4], int r0, int c0, W w) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    w(r0 + g, c0 + 2 * q, acc[0]);
    w(r0 + g, c0 + 2 * q + 1, acc[1]);
    w(r0 + g + 8, c0 + 2 * q, acc[2]);
    w(r0 + g + 8, c0 + 2 * q + 1, acc[3]);
}

// f(r0, c0) for every 16x8 tile of a rows x cols output (rows a multiple of 16, cols of 8), the
// block's warps taking the tiles in turn (a warp's calls are uniform across its lanes).
template <class F>
__device__ __forceinline__ void asa_mma_tiles(int rows, int cols, F f) {
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, tn = cols >> 3;
    __syncwarp();  // mma.sync wants the warp converged (callers may arrive from divergent code)
    for (int tile = warp; tile < (rows >> 4) * tn; tile += nw) f((tile / tn) << 4, (tile % tn) << 3);
}
