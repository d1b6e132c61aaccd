// Shared helpers of the asa kernels. Textually included (by the Rust loader) into every
// `cuda/*.cu` that says `#include "common.cuh"`, so the kernels need no CUDA headers at all.
//
// Conventions of every kernel:
// - row-major f32 tensors, shapes in the comments (`[B,H,T,d]`), sizes passed as `int`
//   (the host checks that every size and element count fits), element offsets in `long long`;
// - nullable inputs are plain pointers that may be 0 (the host passes a null device pointer);
// - backward kernels ACCUMULATE (`+=`) like their CPU twins unless documented otherwise;
// - no float atomics anywhere: every reduction runs in a fixed order, so results are bitwise
//   reproducible run to run;
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
