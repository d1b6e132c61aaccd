// Generic ops, one kernel per op and direction, each the twin of the function of the same name
// in `src/backend/cpu/ops.rs` (matmul is cuBLAS; only its bias parts are kernels here).
#include "common.cuh"

// ------------------------------------------------------------------------------------------------
// encoder

// out: [N,C] (N = B*T); ids: [N]; wte: [V,C]; wpe: nullable [maxT,C].
// out[bt,:] = wte[ids[bt],:] (+ wpe[bt % T,:]). Ids are validated on the host; an id >= V
// writes zeros instead of reading out of bounds.
// twin: cpu::ops::encoder_forward
extern "C" __global__ void encoder_forward(float* out, const unsigned int* ids, const float* wte,
                                           const float* wpe, int n, int t, int c, int v) {
    ASA_GRID_LOOP(i, (i64)n * c) {
        int bt = (int)(i / c), j = (int)(i % c);
        unsigned int id = ids[bt];
        float x = 0.0f;
        if (id < (unsigned int)v) {
            x = wte[(i64)id * c + j];
            if (wpe) x = x + wpe[(i64)(bt % t) * c + j];
        }
        out[i] = x;
    }
}

// dwte: [V,C] += scatter of dout [N,C]. The host sorts the positions by token id (counting
// sort): uniq[u] is the u-th distinct id, its positions are order[start[u]..start[u+1]),
// ascending. Grid: x = distinct ids, y = column tiles. Sums in f64 in position order.
// twin: cpu::ops::encoder_backward
extern "C" __global__ void encoder_backward(float* dwte, const float* dout, const int* uniq,
                                            const int* start, const int* order, int nuniq, int c) {
    int u = blockIdx.x;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    // (an empty run is padding: the batch's ids padded to a fixed count, so that the launch
    // is the same for every batch)
    if (u >= nuniq || j >= c || start[u] == start[u + 1]) return;
    double acc = 0.0;
    for (int p = start[u]; p < start[u + 1]; ++p) acc += (double)dout[(i64)order[p] * c + j];
    i64 o = (i64)uniq[u] * c + j;
    dwte[o] = dwte[o] + (float)acc;
}

// dwpe: rows 0..T of [maxT,C] += sum over B of dout [B,T,C] (f64, batch order).
// twin: cpu::ops::encoder_backward
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const float* dout, int b, int t, int c) {
    ASA_GRID_LOOP(i, (i64)t * c) {
        int tt = (int)(i / c), j = (int)(i % c);
        double acc = 0.0;
        for (int bb = 0; bb < b; ++bb) acc += (double)dout[((i64)bb * t + tt) * c + j];
        dwpe[i] = dwpe[i] + (float)acc;
    }
}

// ------------------------------------------------------------------------------------------------
// layernorm (eps 1e-5, biased variance, statistics in f64). One warp per row.

// One row of a LayerNorm by one warp (lane = its lane): x [C] -> out [C] (and out16, nullable:
// its bf16 twin, round to nearest even as convert_f32_bf16, for the bf16 GEMMs that read out),
// statistics in f64, mean and rstd stored by lane 0. `x` may be what the same lanes just wrote.
__device__ __forceinline__ void ln_row(float* out, unsigned short* out16, float* mean, float* rstd, const float* x,
                                       const float* weight, const float* bias, int c, int lane) {
    double s = 0.0;
    for (int j = lane; j < c; j += 32) s += (double)x[j];
    double mu = warp_sum_d(s) / c;
    double v = 0.0;
    for (int j = lane; j < c; j += 32) {
        double d = (double)x[j] - mu;
        v += d * d;
    }
    double var = warp_sum_d(v) / c;
    double rs = 1.0 / sqrt(var + 1e-5);
    for (int j = lane; j < c; j += 32) {
        const float y = (float)(((double)x[j] - mu) * rs * (double)weight[j] + (double)bias[j]);
        out[j] = y;
        if (out16) out16[j] = asa_f32_to_bf16(y);
    }
    if (lane == 0) {
        *mean = (float)mu;
        *rstd = (float)rs;
    }
}

// out, inp: [N,C]; weight, bias: [C]; mean, rstd: [N]; out16: nullable [N,C], out's bf16 twin.
// twin: cpu::ops::layernorm_forward
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                             const float* weight, const float* bias, int n, int c,
                                             unsigned short* out16) {
    int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps leave together
    const i64 r0 = (i64)row * c;
    ln_row(out + r0, out16 ? out16 + r0 : nullptr, mean + row, rstd + row, inp + r0, weight, bias, c, lane);
}

// The residual stream's step and the next LayerNorm in one pass (`residual_forward` then
// `layernorm_forward` of the CPU): res = a + b (+ bias_b[col], nullable: the bias of the GEMM
// that made b, added here instead of by the GEMM), out = LayerNorm(res) with mean, rstd as
// layernorm_forward; out16: nullable, out's bf16 twin. res, out, a, b: [N,C]. One warp per row.
// twin: cpu::ops::layernorm_forward
extern "C" __global__ void residual_layernorm_forward(float* res, float* out, float* mean, float* rstd,
                                                      const float* a, const float* b, const float* bias_b,
                                                      const float* weight, const float* bias, int n, int c,
                                                      unsigned short* out16) {
    int row = (int)(((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps leave together
    const i64 r0 = (i64)row * c;
    for (int j = lane; j < c; j += 32) {
        const float bj = bias_b ? b[r0 + j] + bias_b[j] : b[r0 + j];
        res[r0 + j] = a[r0 + j] + bj;  // read back by the same lane in ln_row
    }
    ln_row(out + r0, out16 ? out16 + r0 : nullptr, mean + row, rstd + row, res + r0, weight, bias, c, lane);
}

// Column sums of an [N,C] quantity in row chunks, the part of one block: value(i) of element
// i = row * C + j for column j over chunk k of `rows_per_chunk` rows (f64, in row order) into
// part[k,C]; then the last block of the group (`asa_last_block`: `ticket`, `chunks` blocks)
// adds the chunks in order: dst[j] += (f32) sum. Every thread of the block calls it (j >= c
// idles).
template <class F>
__device__ void colsum_block(float* dst, double* part, unsigned* ticket, int n, int c, int rows_per_chunk, int j,
                             int k, int chunks, F value) {
    if (j < c) {
        int r0 = k * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
        double a = 0.0;
        for (int row = r0; row < r1; ++row) a += value((i64)row * c + j);
        part[(i64)k * c + j] = a;
    }
    if (!asa_last_block(ticket, chunks) || j >= c) return;
    double a = 0.0;
    for (int q = 0; q < chunks; ++q) a += asa_ld_cg(part + (i64)q * c + j);
    dst[j] = dst[j] + (float)a;
}

// The LayerNorm parameter gradients of one block: dweight[j] += sum_rows norm*dout,
// dbias[j] += sum_rows dout (f64), over chunk k of `rows_per_chunk` rows into pw, pb [nchunks,C];
// the last block of column tile j / blockDim.x (`asa_last_block`, `ticket`) adds the chunks in order.
__device__ void layernorm_params_block(float* dweight, float* dbias, double* pw, double* pb, unsigned* ticket,
                                       const float* dout, const float* inp, const float* mean,
                                       const float* rstd, int n, int c, int rows_per_chunk, int j, int k,
                                       int chunks) {
    if (j < c) {
        int r0 = k * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
        double aw = 0.0, ab = 0.0;
        for (int row = r0; row < r1; ++row) {
            double d = (double)dout[(i64)row * c + j];
            aw += ((double)inp[(i64)row * c + j] - (double)mean[row]) * (double)rstd[row] * d;
            ab += d;
        }
        pw[(i64)k * c + j] = aw;
        pb[(i64)k * c + j] = ab;
    }
    if (!asa_last_block(ticket, chunks) || j >= c) return;
    double a = 0.0, b = 0.0;
    for (int q = 0; q < chunks; ++q) {
        a += asa_ld_cg(pw + (i64)q * c + j);
        b += asa_ld_cg(pb + (i64)q * c + j);
    }
    dweight[j] = dweight[j] + (float)a;
    dbias[j] = dbias[j] + (float)b;
}

// LayerNorm backward in one launch of two independent parts (both read dout and inp only).
// The first `param_blocks` = tiles x chunks blocks are the parameter gradients
// (`layernorm_params_block`; column tile b % tiles, row chunk b / tiles, ticket
// tickets[b % tiles]): they run longest, so they are handed out first. Every later block is
// `blockDim.x / 32` rows of dinp, one warp a row:
// dinp [N,C] += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm*norm)), dnorm = w * dout;
// dinp16: nullable, the bf16 twin of the updated dinp.
// twin: cpu::ops::layernorm_backward
extern "C" __global__ void layernorm_backward(float* dinp, float* dweight, float* dbias, double* pw,
                                              double* pb, unsigned* tickets, const float* dout,
                                              const float* inp, const float* weight, const float* mean,
                                              const float* rstd, int n, int c, int rows_per_chunk,
                                              int tiles, unsigned short* dinp16) {
    const int chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
    const int param_blocks = tiles * chunks;
    if ((int)blockIdx.x < param_blocks) {
        const int tile = (int)blockIdx.x % tiles, k = (int)blockIdx.x / tiles;
        layernorm_params_block(dweight, dbias, pw, pb, tickets + tile, dout, inp, mean, rstd, n, c,
                               rows_per_chunk, tile * blockDim.x + threadIdx.x, k, chunks);
        return;
    }
    int row = (int)(((i64)(blockIdx.x - param_blocks) * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const float* x = inp + (i64)row * c;
    const float* dy = dout + (i64)row * c;
    double m = (double)mean[row], r = (double)rstd[row];
    double a = 0.0, b = 0.0;
    for (int j = lane; j < c; j += 32) {
        double norm = ((double)x[j] - m) * r;
        double dn = (double)weight[j] * (double)dy[j];
        a += dn;
        b += dn * norm;
    }
    a = warp_sum_d(a) / c;
    b = warp_sum_d(b) / c;
    float* dx = dinp + (i64)row * c;
    for (int j = lane; j < c; j += 32) {
        double norm = ((double)x[j] - m) * r;
        double dn = (double)weight[j] * (double)dy[j];
        const float y = dx[j] + (float)(r * (dn - a - norm * b));
        dx[j] = y;
        if (dinp16) dinp16[(i64)row * c + j] = asa_f32_to_bf16(y);
    }
}

// Column sums in one launch: dst[j] += (f32) sum_rows x[row,j] (`colsum_block`). The bias
// gradient of matmul_backward. Grid: x = column tiles of blockDim.x (ticket
// tickets[blockIdx.x]), y = chunks of `rows_per_chunk` rows; part [chunks,C].
// twin: cpu::ops::matmul_backward
extern "C" __global__ void colsum_add(float* dst, double* part, unsigned* tickets, const float* x, int n, int c,
                                      int rows_per_chunk) {
    colsum_block(dst, part, tickets + blockIdx.x, n, c, rows_per_chunk, blockIdx.x * blockDim.x + threadIdx.x,
                 blockIdx.y, gridDim.y, [&](i64 i) { return (double)x[i]; });
}

// ------------------------------------------------------------------------------------------------
// matmul: the GEMMs are cuBLAS; the forward bias is written first and the GEMM adds onto it
// (addmm order, as the CPU twin). out: [N,O]; bias: [O].
// twin: cpu::ops::matmul_forward
extern "C" __global__ void matmul_forward_bias(float* out, const float* bias, int n, int o) {
    ASA_GRID_LOOP(i, (i64)n * o) { out[i] = bias[i % o]; }
}

// f32 -> bf16 (round to nearest even) for the bf16 GEMM path. dst: [n] u16; src: [n]. Four
// elements per thread and step (one 16-byte load, one 8-byte store) where both ranges are
// aligned for it, then the rest one by one.
struct alignas(16) AsaF4 {
    float x, y, z, w;
};
// twin: none: a device utility (the bf16 operands of tensor-core GEMMs)
extern "C" __global__ void convert_f32_bf16(unsigned short* dst, const float* src, i64 n) {
    const bool vec = ((u64)src % 16 == 0) && ((u64)dst % 8 == 0);
    const i64 nv = vec ? n / 4 : 0;
    ASA_GRID_LOOP(i, nv) {
        AsaF4 f = reinterpret_cast<const AsaF4*>(src)[i];
        u64 v = (u64)asa_f32_to_bf16(f.x) | ((u64)asa_f32_to_bf16(f.y) << 16) |
                ((u64)asa_f32_to_bf16(f.z) << 32) | ((u64)asa_f32_to_bf16(f.w) << 48);
        reinterpret_cast<u64*>(dst)[i] = v;
    }
    ASA_GRID_LOOP(i, n - 4 * nv) { dst[4 * nv + i] = asa_f32_to_bf16(src[4 * nv + i]); }
}

// ------------------------------------------------------------------------------------------------
// GELU (exact, erf form), elementwise in f32 as the CPU twin (1 + erf(z) taken as erfc(-z)).

// The bias of the GEMM that made h and the GELU after it in one pass: h [rows,cols] += bias
// [cols] (in place: the backward reads it), out = gelu(h); out16: nullable, out's bf16 twin.
// A block per row (grid-stride).
// twin: cpu::ops::gelu_forward
extern "C" __global__ void bias_gelu_forward(float* out, float* h, const float* bias, int rows, int cols,
                                             unsigned short* out16) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 r0 = (i64)row * cols;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float x = h[r0 + j] + bias[j];
            h[r0 + j] = x;
            const float y = 0.5f * x * erfcf(-x * 0.70710678118654752f);
            out[r0 + j] = y;
            if (out16) out16[r0 + j] = asa_f32_to_bf16(y);
        }
    }
}

// out16: nullable, the bf16 twin of out.
// twin: cpu::ops::gelu_forward
extern "C" __global__ void gelu_forward(float* out, const float* inp, i64 n, unsigned short* out16) {
    ASA_GRID_LOOP(i, n) {
        float x = inp[i];
        const float y = 0.5f * x * erfcf(-x * 0.70710678118654752f);  // 1 + erf(z) = erfc(-z): no cancellation for x << 0
        out[i] = y;
        if (out16) out16[i] = asa_f32_to_bf16(y);
    }
}

// dinp = dout * (Phi(x) + x*phi(x)) (a store: the CPU twin's += into zeros, no memset before);
// dinp16: nullable, the bf16 twin of dinp.
// twin: cpu::ops::gelu_backward
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, i64 n,
                                         unsigned short* dinp16) {
    ASA_GRID_LOOP(i, n) {
        float x = inp[i];
        float cdf = 0.5f * erfcf(-x * 0.70710678118654752f);
        float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        const float y = dout[i] * (cdf + x * pdf);
        dinp[i] = y;
        if (dinp16) dinp16[i] = asa_f32_to_bf16(y);
    }
}

// gelu_backward with the bias gradient of the GEMM that made inp, in one launch: dinp [N,C]
// (stored; dinp16 nullable, its bf16 twin) as gelu_backward, and dbias[j] += the column sums of
// dinp (f64: each chunk of `rows_per_chunk` rows in row order, then the chunks in order).
// Grid, part and tickets as `colsum_add`, for the column tiles of dinp. Grid x may go on
// with the column tiles of x2 [N,C2] (nullable; the next GEMM's output gradient, an
// independent job in the same launch): dbias2 += the column sums of x2 (`colsum_block`,
// part2 [chunks,C2], the tickets after dinp's).
// twin: cpu::ops::gelu_backward
extern "C" __global__ void gelu_backward_colsum(float* dinp, float* dbias, double* part, unsigned* tickets,
                                                const float* inp, const float* dout, int n, int c,
                                                int rows_per_chunk, unsigned short* dinp16, float* dbias2,
                                                double* part2, const float* x2, int c2) {
    const int tiles = (c + (int)blockDim.x - 1) / (int)blockDim.x;
    const int k = blockIdx.y;
    if ((int)blockIdx.x >= tiles) {
        colsum_block(dbias2, part2, tickets + blockIdx.x, n, c2, rows_per_chunk,
                     ((int)blockIdx.x - tiles) * blockDim.x + threadIdx.x, k, gridDim.y,
                     [&](i64 i) { return (double)x2[i]; });
        return;
    }
    colsum_block(dbias, part, tickets + blockIdx.x, n, c, rows_per_chunk, blockIdx.x * blockDim.x + threadIdx.x,
                 k, gridDim.y, [&](i64 i) {
                     const float x = inp[i];
                     const float cdf = 0.5f * erfcf(-x * 0.70710678118654752f);
                     const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
                     const float y = dout[i] * (cdf + x * pdf);
                     dinp[i] = y;
                     if (dinp16) dinp16[i] = asa_f32_to_bf16(y);
                     return (double)y;
                 });
}

// ------------------------------------------------------------------------------------------------
// dropout: mask[i] = 0 with probability p, else scale = 1/(1-p); out = inp * mask.
// The draw of element i is asa_uniform(seed, i) (counter-based, see common.cuh): reproducible
// for a seed, independent of the launch shape; not the CPU twin's ChaCha8 stream.
// p <= 0: copy and mask 1; p >= 1: all dropped.
// The seed is `seed_at[0]` where given (the step's draws, uploaded with the batch: a replayed
// graph reads this step's), else `seed`.
// twin: cpu::ops::dropout_forward
extern "C" __global__ void dropout_forward(float* out, float* mask, const float* inp, float p,
                                           float scale, u64 seed, const u64* seed_at, i64 n) {
    if (seed_at) seed = seed_at[0];
    ASA_GRID_LOOP(i, n) {
        float m;
        if (p <= 0.0f) m = 1.0f;
        else if (p >= 1.0f) m = 0.0f;
        else m = asa_uniform(seed, (u64)i) < p ? 0.0f : scale;
        mask[i] = m;
        out[i] = p <= 0.0f ? inp[i] : inp[i] * m;
    }
}

// dinp += dout * mask.
// twin: cpu::ops::dropout_backward
extern "C" __global__ void dropout_backward(float* dinp, const float* dout, const float* mask, i64 n) {
    ASA_GRID_LOOP(i, n) { dinp[i] = dinp[i] + dout[i] * mask[i]; }
}

// ------------------------------------------------------------------------------------------------
// residual / small elementwise helpers

// out = a + b.
// twin: cpu::ops::residual_forward
extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, i64 n) {
    ASA_GRID_LOOP(i, n) { out[i] = a[i] + b[i]; }
}

// y += alpha * x (f32, as the CPU's `*o += g * dl`).
// twin: none: a device utility (y += alpha x; the CPU adds in place where it needs it)
extern "C" __global__ void axpy(float* y, const float* x, float alpha, i64 n) {
    ASA_GRID_LOOP(i, n) { y[i] = y[i] + alpha * x[i]; }
}

// y = (f32)(alpha * x) computed in f64 (the CPU's `(gate * dout_h[i] as f64) as f32`).
// twin: none: a device utility (y = alpha x in f64; the CPU scales in place)
extern "C" __global__ void scale_f64(float* y, const float* x, double alpha, i64 n) {
    ASA_GRID_LOOP(i, n) { y[i] = (float)(alpha * (double)x[i]); }
}

// x = value.
// twin: none: a device utility (x = value)
extern "C" __global__ void fill(float* x, float value, i64 n) {
    ASA_GRID_LOOP(i, n) { x[i] = value; }
}

// ------------------------------------------------------------------------------------------------
// deterministic reductions

// The gate gradient's finish: the block's partial a into part[blockIdx.x]; the last block adds
// the partials in order, dgrad[0] += (f32)(sum * factor).
__device__ void gate_finish(double a, float* dgrad, double* part, unsigned* ticket, double factor, double* sh) {
    a = block_sum_d(a, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = a;
    if (!asa_last_block(ticket, gridDim.x)) return;
    double t = 0.0;
    for (i64 i = threadIdx.x; i < (i64)gridDim.x; i += blockDim.x) t += asa_ld_cg(part + i);
    t = block_sum_d(t, sh);
    if (threadIdx.x == 0) dgrad[0] = dgrad[0] + (float)(t * factor);
}

// The backward of a gated sum y = x + gate * delta (the slotspace refine's out_h = out1 + gate
// * delta) in one launch: ddelta = (f32)(gate * dy) (stored, computed in f64) and
// dgrad[0] += (f32)(factor * sum(dy * delta)), the sum in f64: per block over its grid-stride
// elements, then the blocks in order by the last block (`asa_last_block`). factor: d gate /
// d(the gate's raw parameter). part: [gridDim.x] f64; ticket: one counter. Launch with a fixed
// grid (the host uses min(ceil(n/256), 1024) blocks of 256 threads).
// twin: model::layer::AsaLayer::backward
extern "C" __global__ void gate_backward(float* ddelta, float* dgrad, double* part, unsigned* ticket, const float* dy,
                                         const float* delta, double gate, double factor, i64 n) {
    __shared__ double sh[32];
    double a = 0.0;
    ASA_GRID_LOOP(i, n) {
        const double g = (double)dy[i];
        ddelta[i] = (float)(gate * g);
        a += g * (double)delta[i];
    }
    gate_finish(a, dgrad, part, ticket, factor, sh);
}

// split_heads of merged [B,T,H*d] into out_h [B,H,T,d] and gate_backward on it in one pass:
// a block per row (b, t) of merged (grid-stride), threads along it; ddelta [B,H,T,d] =
// gate * out_h, dgrad[0] += factor * sum(out_h * delta) (as gate_backward; part: [gridDim.x]).
// gate, factor: by value, or (gate_at non-null) from the step's scalar block (`asa_step_value`).
// twin: model::layer::AsaLayer::backward
extern "C" __global__ void gate_backward_split(float* ddelta, float* dgrad, double* part, unsigned* ticket,
                                               float* out_h, const float* merged, const float* delta,
                                               double gate_value, double factor_value, int b, int t, int h, int d,
                                               const double* gate_at) {
    __shared__ double sh[32];
    const double gate = gate_at ? (double)(float)gate_at[0] : gate_value;
    const double factor = asa_step_factor(factor_value, gate_at);
    const int hd = h * d;
    double a = 0.0;
    for (i64 row = blockIdx.x; row < (i64)b * t; row += gridDim.x) {
        const i64 bi = row / t;
        const int ti = (int)(row - bi * t);
        for (int j = threadIdx.x; j < hd; j += blockDim.x) {
            const int hi = j / d, jj = j - hi * d;
            const i64 o = ((bi * h + hi) * t + ti) * d + jj;
            const float g = merged[row * hd + j];
            out_h[o] = g;
            ddelta[o] = (float)(gate * (double)g);
            a += (double)g * (double)delta[o];
        }
    }
    gate_finish(a, dgrad, part, ticket, factor, sh);
}

// global_norm, first stage: part[block] = sum of x^2 over the block's grid-stride elements
// (f64); `sum_f64` with sqrt_result = 1 finishes it. Same fixed grid rule as `gate_backward`.
// twin: optim::global_norm
extern "C" __global__ void global_norm(double* part, const float* x, i64 n) {
    __shared__ double sh[32];
    double a = 0.0;
    ASA_GRID_LOOP(i, n) {
        double xv = (double)x[i];
        a += xv * xv;
    }
    a = block_sum_d(a, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = a;
}

// out[0] = sum of part[0..n) in a fixed order (one block; strided per thread, then a tree).
// With `sqrt_result` the square root is stored (global norm).
// twin: none: a device utility (the fixed-order f64 sum that finishes the two-stage reductions)
extern "C" __global__ void sum_f64(double* out, const double* part, i64 n, int sqrt_result) {
    __shared__ double sh[32];
    double a = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) a += part[i];
    a = block_sum_d(a, sh);
    if (threadIdx.x == 0) out[0] = sqrt_result ? sqrt(a) : a;
}

// dst[0] += (f32)(src[0] * factor): a scalar parameter's gradient from its f64 sum.
// twin: none: a device utility (adds a finished f64 sum to a scalar parameter's gradient)
extern "C" __global__ void scalar_grad_add(float* dst, const double* src, double factor) {
    if (blockIdx.x == 0 && threadIdx.x == 0) dst[0] = dst[0] + (float)(src[0] * factor);
}

// ------------------------------------------------------------------------------------------------
// cross-entropy (the classifier GEMM runs before, in row blocks; see `CudaBackend::lm_head_loss`)

// One block per row r of logits [N,V]: probs[r,:] = softmax (written in place when probs ==
// logits); row_loss[r] = logsumexp - logits[r,target] on counted rows (valid[r] != 0 and
// 0 <= target < V), else 0. Max in f32, sums in f64, exp in f32. targets: [N] i64; valid: nullable [N] u8.
// grad != 0: crossentropy_backward in the same pass, in place: probs[r,:] becomes
// scale * (probs - onehot(target)) on counted rows, 0 on the others; probs16 (nullable) its
// bf16 twin.
// twin: cpu::ops::crossentropy_forward
extern "C" __global__ void crossentropy_forward(float* probs, double* row_loss, const float* logits,
                                                const i64* targets, const unsigned char* valid, int n, int v,
                                                int grad, float scale, unsigned short* probs16) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    int r = blockIdx.x;
    if (r >= n) return;
    const float* x = logits + (i64)r * v;
    float* p = probs + (i64)r * v;
    float mx = ASA_NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_max_f(mx, shf);
    i64 tgt = targets[r];
    bool counted = (valid == 0 || valid[r] != 0) && tgt >= 0 && tgt < (i64)v;
    // what is stored for probability e at column j
    auto out = [&](float e, int j) {
        float y = e;
        if (grad) y = counted ? scale * (e - (j == (int)tgt ? 1.0f : 0.0f)) : 0.0f;
        p[j] = y;
        if (probs16) probs16[(i64)r * v + j] = asa_f32_to_bf16(y);
    };
    if (!asa_finite(mx) && mx < 0.0f) {
        // all -inf: no probability mass anywhere (avoid NaN)
        for (int j = threadIdx.x; j < v; j += blockDim.x) out(0.0f, j);
        if (threadIdx.x == 0) row_loss[r] = counted ? (double)__int_as_float(0x7f800000) : 0.0;
        return;
    }
    double s = 0.0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += (double)expf(x[j] - mx);
    s = block_sum_d(s, shd);
    double lse = (double)mx + log(s);
    float xt = counted ? x[tgt] : 0.0f;  // read before the in-place writes below
    __syncthreads();
    for (int j = threadIdx.x; j < v; j += blockDim.x) out(expf((float)((double)x[j] - lse)), j);
    if (threadIdx.x == 0) row_loss[r] = counted ? lse - (double)xt : 0.0;
}

// dlogits [N,V] (+)= scale * (probs - onehot(target)) on counted rows. `inplace` != 0: dlogits
// may alias probs and is overwritten (uncounted rows become 0); else it accumulates.
// twin: cpu::ops::crossentropy_backward
extern "C" __global__ void crossentropy_backward(float* dlogits, const float* probs, const i64* targets,
                                                 const unsigned char* valid, float scale, int n, int v,
                                                 int inplace, unsigned short* dlogits16) {
    ASA_GRID_LOOP(i, (i64)n * v) {
        int r = (int)(i / v), j = (int)(i % v);
        i64 tgt = targets[r];
        bool counted = (valid == 0 || valid[r] != 0) && tgt >= 0 && tgt < (i64)v;
        float d = 0.0f;
        if (counted) d = scale * (probs[i] - (j == (int)tgt ? 1.0f : 0.0f));
        const float y = inplace ? d : dlogits[i] + d;
        dlogits[i] = y;
        if (dlogits16) dlogits16[i] = asa_f32_to_bf16(y);
    }
}

// ------------------------------------------------------------------------------------------------
// optimizer

// ATen lerp: start + w*(end-start) for |w| < 0.5, else end - (end-start)*(1-w), one FMA.
__device__ __forceinline__ float asa_lerp(float start, float end, float w) {
    float diff = end - start;
    return fabsf(w) < 0.5f ? __fmaf_rn(w, diff, start) : __fmaf_rn(w - 1.0f, diff, end);
}

// AdamW, torch `_single_tensor_adamw` order in f32 (see src/optim.rs); the scalars are computed
// on the host in f64 and cast as PyTorch does. p, m, v, g: [n] (the flat parameter buffer).
// at (nullable): this step's [decay, neg_step_size, bias_correction2_sqrt] (f32 values as f64)
// in the step's scalar block, read instead of the arguments (which then stay the same from step
// to step: a captured CUDA graph replays them).
// twin: optim::AdamW::step
extern "C" __global__ void adamw_update(float* p, float* m, float* v, const float* g, float decay,
                                        float lerp_w, float beta2, float one_minus_beta2,
                                        float neg_step_size, float bias_correction2_sqrt, float eps,
                                        const double* guard, int nguard, i64 n, unsigned short* p16,
                                        const double* at) {
    if (at) {
        decay = (float)at[0];
        neg_step_size = (float)at[1];
        bias_correction2_sqrt = (float)at[2];
    }
    // p16: nullable, the weights' bf16 copy, written with them (the bf16 GEMMs read it)
    // a non-finite loss or gradient norm among guard[0..nguard) skips the update (as the CPU
    // trainer), decided here so that the host need not wait for them
    for (int j = 0; j < nguard; ++j)
        if (!isfinite(guard[j])) return;
    ASA_GRID_LOOP(i, n) {
        float gi = g[i];
        float pi = __fmul_rn(p[i], decay);
        float mi = asa_lerp(m[i], gi, lerp_w);
        float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias_correction2_sqrt), eps);
        pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step_size, mi), denom));
        p[i] = pi;
        if (p16) p16[i] = asa_f32_to_bf16(pi);
        m[i] = mi;
        v[i] = vi;
    }
}

// clip_grad_norm: coef = max_norm / (norm[0] + 1e-6); when coef < 1, x *= (f32)coef.
// The norm is read on the device (no host round trip).
// twin: optim::clip_grad_norm
extern "C" __global__ void clip_scale(float* x, const double* norm, double max_norm, i64 n) {
    double coef = max_norm / (norm[0] + 1e-6);
    if (!(coef < 1.0)) return;
    float c = (float)coef;
    ASA_GRID_LOOP(i, n) { x[i] = x[i] * c; }
}
