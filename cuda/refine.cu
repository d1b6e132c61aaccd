// The slotspace refine's element-wise stages around its linear attention, one launch each way
// (launch sequences in src/backend/cuda/refine.rs; CPU twins: the `rope_forward`,
// `mask_rows_forward`, `phi_forward` chain of `AsaLayer::slotspace_forward` and its backward).
//
// Layouts (row-major): qkv and d3 [N,T,3M] (rows of q | k | v, N = B*H sequences), the rest
// [N,T,M]; cos, sin [T,M] (null: no RoPE); valid [B,T] (null: no padding), sequence nn of head
// nn % H of batch nn / H. Both walk (position, pair) with `rope_walk`: a thread handles pair p
// of q, k and v of one position.
#include "common.cuh"

// phi(x) = elu(x) + 1 (the twin of `phi_forward`)
__device__ __forceinline__ float rf_phi(float x) { return x > 0.0f ? x + 1.0f : expf(x); }
// d phi(x) . g (the twin of `phi_backward`'s term)
__device__ __forceinline__ float rf_dphi(float x, float g) { return x > 0.0f ? g : g * expf(x); }

// RoPE of the pair (a, b) at pair p of a position (the expressions of `rope_forward`).
__device__ __forceinline__ void rf_rope(float& a, float& b, const float* c, const float* s, int p) {
    const float x = a, y = b;
    a = x * c[2 * p] - y * s[2 * p];
    b = y * c[2 * p + 1] + x * s[2 * p + 1];
}

// Its transpose (the expressions of `rope_backward`, into zeros).
__device__ __forceinline__ void rf_rope_t(float& ga, float& gb, const float* c, const float* s, int p) {
    const float x = ga, y = gb;
    ga = x * c[2 * p] + y * s[2 * p + 1];
    gb = y * c[2 * p + 1] - x * s[2 * p];
}

// qs, ks, qf, kf, vs [N,T,M] (stored) from qkv: qs, ks = RoPE(q), RoPE(k); qf, kf = phi of them;
// vs = v. Padded positions: qs, ks = 0 before phi when `mask_before_phi` (the online variant),
// else qf, kf = 0 after it; vs = 0 in both.
// twin: cpu::slot_ops::phi_forward
extern "C" __global__ void refine_qkv_forward(float* qs, float* ks, float* qf, float* kf, float* vs,
                                              const float* qkv, const float* cos_t, const float* sin_t,
                                              const unsigned char* valid, int mask_before_phi, int h, int n,
                                              int t, int m) {
    rope_walk(n, t, m, [&](i64 o, i64 tab, int p, i64 nn, int ti) {
        const i64 w = 3 * (o - 2 * p) + 2 * p;  // the pair in qkv's row of 3M
        float qa = qkv[w], qb = qkv[w + 1];
        float ka = qkv[w + m], kb = qkv[w + m + 1];
        float va = qkv[w + 2 * m], vb = qkv[w + 2 * m + 1];
        if (cos_t) {
            rf_rope(qa, qb, cos_t + tab, sin_t + tab, p);
            rf_rope(ka, kb, cos_t + tab, sin_t + tab, p);
        }
        const bool pad = valid && !valid[(nn / h) * t + ti];
        if (pad && mask_before_phi) qa = qb = ka = kb = 0.0f;
        qs[o] = qa;
        qs[o + 1] = qb;
        ks[o] = ka;
        ks[o + 1] = kb;
        const bool zero_f = pad && !mask_before_phi;
        qf[o] = zero_f ? 0.0f : rf_phi(qa);
        qf[o + 1] = zero_f ? 0.0f : rf_phi(qb);
        kf[o] = zero_f ? 0.0f : rf_phi(ka);
        kf[o + 1] = zero_f ? 0.0f : rf_phi(kb);
        vs[o] = pad ? 0.0f : va;
        vs[o + 1] = pad ? 0.0f : vb;
    });
}

// d3 [N,T,3M] (stored; d3_16 nullable, its bf16 twin) = the gradient of refine_qkv_forward's
// qkv from dqf, dkf, dvs: phi' at qs, ks, then RoPE transposed; 0 at padded positions (both
// variants: the masks zero the gradient either before or after phi').
// twin: cpu::slot_ops::phi_backward
extern "C" __global__ void refine_qkv_backward(float* d3, unsigned short* d3_16, const float* dqf, const float* dkf,
                                               const float* dvs, const float* qs, const float* ks,
                                               const float* cos_t, const float* sin_t,
                                               const unsigned char* valid, int h, int n, int t, int m) {
    rope_walk(n, t, m, [&](i64 o, i64 tab, int p, i64 nn, int ti) {
        const i64 w = 3 * (o - 2 * p) + 2 * p;
        float g[6] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // dq pair, dk pair, dv pair
        if (!(valid && !valid[(nn / h) * t + ti])) {
            g[0] = rf_dphi(qs[o], dqf[o]);
            g[1] = rf_dphi(qs[o + 1], dqf[o + 1]);
            g[2] = rf_dphi(ks[o], dkf[o]);
            g[3] = rf_dphi(ks[o + 1], dkf[o + 1]);
            g[4] = dvs[o];
            g[5] = dvs[o + 1];
            if (cos_t) {
                rf_rope_t(g[0], g[1], cos_t + tab, sin_t + tab, p);
                rf_rope_t(g[2], g[3], cos_t + tab, sin_t + tab, p);
            }
        }
#pragma unroll
        for (int j = 0; j < 3; ++j) {
            const i64 at = w + (i64)j * m;
            d3[at] = g[2 * j];
            d3[at + 1] = g[2 * j + 1];
            if (d3_16) {
                d3_16[at] = asa_f32_to_bf16(g[2 * j]);
                d3_16[at + 1] = asa_f32_to_bf16(g[2 * j + 1]);
            }
        }
    });
}
