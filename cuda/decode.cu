// Recurrent decoding: one position of one ASA layer, every head, one block per head (launcher:
// src/backend/cuda/decode.rs; CPU twin: `model::decode::attn_step`, whose arithmetic this follows
// step by step, the sums in f64 as there).
//
// Layouts (row-major): kp, v, q, out_h [H,d] (one position's projections, head-split); keys
// [H,K,d]; the carried state num_c, num_u [H,K,d], den_c, den_u [H,K] (f64), m_c, m_u [H,K]
// (f32; -inf: empty), sigma [H,M,M] and zs [H,M] (f64) for the refine; slot_in [M,K], slot_q/k/v
// [M,M], slot_out [K,M] (PyTorch Linear weights, out = W x); cos_d, sin_d [d] and cos_m, sin_m [M]
// the RoPE rows of this position (null: no RoPE); bias [H] the ALiBi slope x strength (null:
// none). Dynamic shared memory: 4 K doubles, then (d + K d + 4 K + 7 M) floats.
#include "common.cuh"

__device__ __forceinline__ float dc_max(float a, float b) { return a >= b ? a : b; }
// exp(m_c - r), 0 when nothing is carried
__device__ __forceinline__ double dc_rescale(float m_c, float r) {
    return asa_finite(m_c) ? exp((double)(m_c - r)) : 0.0;
}

// twin: model::decode::attn_step
extern "C" __global__ void asa_decode_step(float* out_h, double* num_c, double* den_c, float* m_c, double* num_u,
                                           double* den_u, float* m_u, double* sigma, double* zs, const float* kp,
                                           const float* v, const float* q, const float* keys, const float* cos_d,
                                           const float* sin_d, const float* bias, const float* slot_in,
                                           const float* slot_q, const float* slot_k, const float* slot_v,
                                           const float* slot_out, const float* cos_m, const float* sin_m, int pos,
                                           int chunk, int normalize_k, int content, int signed_sw, float wtemp,
                                           float rtemp, float gamma, float gate, int nk, int d, int m) {
    ASA_DYN_SHARED(double, smd);
    const int hi = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    double* e_s = smd;          // [K] this token's term exp(w - R)
    double* sc_s = e_s + nk;    // [K] exp(m_c - R) after the fold
    double* fold_s = sc_s + nk; // [K] the fold's rescale of the carried sums (-1: no fold)
    double* inv_s = fold_s + nk; // [K] 1 / max(den, eps)
    float* kr = (float*)(inv_s + nk); // [d] the write key (normalised, rotated)
    float* st = kr + d;               // [K,d] the slot states at this position (first: the key)
    float* lg = st + nk * d;          // [K] read logits
    float* rw = lg + nk;              // [K] read weights
    float* zc = rw + nk;              // [K] slot_out(u2)
    float* sw = zc + nk;              // [K] refine weights
    float* ub = sw + nk;              // [M] slot_in(rw)
    float* qs = ub + m;               // [M]
    float* ks = qs + m;               // [M]
    float* vs = ks + m;               // [M]
    float* u2 = vs + m;               // [M]
    float* tmp = u2 + m;              // [2M]
    __shared__ double sh_norm, sh_dsum;

    const i64 hd = (i64)hi * d, hk = (i64)hi * nk;
    const double scale = 1.0 / sqrt((double)d);

    // 1. the write key: normalise (f64 norm), then RoPE
    if (tid == 0) {
        double s = 0.0;
        for (int j = 0; j < d; ++j) s += (double)kp[hd + j] * (double)kp[hd + j];
        sh_norm = sqrt(s);
    }
    __syncthreads();
    for (int j = tid; j < d; j += nt) {
        const float x = kp[hd + j];
        st[j] = normalize_k ? (float)((double)x / fmax(sh_norm, 1e-8)) : x;
    }
    __syncthreads();
    if (cos_d) {
        for (int p = tid; p < d / 2; p += nt) {
            const float a = st[2 * p], b = st[2 * p + 1];
            kr[2 * p] = a * cos_d[2 * p] - b * sin_d[2 * p];
            kr[2 * p + 1] = b * cos_d[2 * p + 1] + a * sin_d[2 * p + 1];
        }
    } else {
        for (int j = tid; j < d; j += nt) kr[j] = st[j];  // (any d, odd too)
    }
    __syncthreads();

    // 2. per slot: the write logit, the fold of a finished chunk, this token's term
    const bool fold = pos > 0 && pos % chunk == 0;
    for (int s = tid; s < nk; s += nt) {
        const i64 j = hk + s;
        const float* key = keys + j * d;
        double raw = 0.0;
        for (int x = 0; x < d; ++x) raw += (double)key[x] * (double)kr[x];
        float w = (float)((double)(float)raw * scale);
        w = w / wtemp;
        if (bias) w += bias[hi] * (float)pos;
        fold_s[s] = -1.0;
        if (fold) {
            const float r_end = dc_max(m_c[j], m_u[j]);
            const double f = dc_rescale(m_c[j], r_end);
            fold_s[s] = f;
            den_c[j] = den_c[j] * f + den_u[j];
            den_u[j] = 0.0;
            m_c[j] = r_end;
            m_u[j] = ASA_NEG_INF;
        }
        m_u[j] = dc_max(w, m_u[j]);
        const float r = dc_max(m_c[j], m_u[j]);
        const double sc = dc_rescale(m_c[j], r);
        const double e = asa_finite(r) ? exp((double)(w - r)) : 0.0;
        den_u[j] += e;
        const double den = den_c[j] * sc + den_u[j];
        e_s[s] = e;
        sc_s[s] = sc;
        inv_s[s] = 1.0 / fmax(den, (double)ASA_DEN_EPS);
    }
    __syncthreads();

    // 3. per (slot, channel): fold the numerators, add this token, the slot state
    for (int idx = tid; idx < nk * d; idx += nt) {
        const int s = idx / d, x = idx % d;
        const i64 o = (hk + s) * d + x;
        if (fold_s[s] >= 0.0) {
            num_c[o] = num_c[o] * fold_s[s] + num_u[o];
            num_u[o] = 0.0;
        }
        num_u[o] += e_s[s] * (double)v[hd + x];
        st[idx] = (float)((num_c[o] * sc_s[s] + num_u[o]) * inv_s[s]);
    }
    __syncthreads();

    // 4. read logits q.key/sqrt(d) (+ gamma q.S/sqrt(d)), then the softmax over slots
    for (int s = tid; s < nk; s += nt) {
        const float* key = keys + (hk + s) * d;
        double a = 0.0, c = 0.0;
        for (int x = 0; x < d; ++x) {
            a += (double)q[hd + x] * (double)key[x];
            c += (double)st[s * d + x] * (double)q[hd + x];
        }
        const float lk = (float)((double)(float)a * scale);
        lg[s] = content ? lk + gamma * (float)(c * scale) : lk;
    }
    __syncthreads();
    if (tid == 0) {
        double mx = (double)ASA_NEG_INF;
        for (int s = 0; s < nk; ++s) mx = fmax(mx, (double)lg[s] / (double)rtemp);
        double sum = 0.0;
        for (int s = 0; s < nk; ++s) sum += exp((double)lg[s] / (double)rtemp - mx);
        for (int s = 0; s < nk; ++s) rw[s] = (float)(exp((double)lg[s] / (double)rtemp - mx) / sum);
    }
    __syncthreads();

    // 5. the slotspace refine at this position (m = 0: none)
    if (m > 0) {
        for (int a = tid; a < m; a += nt) {
            double acc = 0.0;
            for (int s = 0; s < nk; ++s) acc += (double)rw[s] * (double)slot_in[(i64)a * nk + s];
            ub[a] = (float)acc;
        }
        __syncthreads();
        for (int a = tid; a < m; a += nt) {
            double aq = 0.0, ak = 0.0, av = 0.0;
            for (int b = 0; b < m; ++b) {
                const double u = (double)ub[b];
                aq += u * (double)slot_q[(i64)a * m + b];
                ak += u * (double)slot_k[(i64)a * m + b];
                av += u * (double)slot_v[(i64)a * m + b];
            }
            tmp[a] = (float)aq;
            tmp[m + a] = (float)ak;
            vs[a] = (float)av;
        }
        __syncthreads();
        if (cos_m) {
            for (int p = tid; p < 2 * (m / 2); p += nt) {  // pair p % (m/2) of q (p < m/2) or k (m even)
                float* src = tmp + (p < m / 2 ? 0 : m);
                const int r = p % (m / 2);
                const float x = src[2 * r], y = src[2 * r + 1];
                src[2 * r] = x * cos_m[2 * r] - y * sin_m[2 * r];
                src[2 * r + 1] = y * cos_m[2 * r + 1] + x * sin_m[2 * r + 1];
            }
            __syncthreads();
        }
        // phi(x) = elu(x) + 1
        for (int a = tid; a < m; a += nt) {
            const float x = tmp[a], y = tmp[m + a];
            qs[a] = x > 0.0f ? x + 1.0f : expf(x);
            ks[a] = y > 0.0f ? y + 1.0f : expf(y);
        }
        __syncthreads();
        double* sig = sigma + (i64)hi * m * m;
        double* z = zs + (i64)hi * m;
        for (int idx = tid; idx < m * m; idx += nt) {
            const int a = idx / m, b = idx % m;
            sig[idx] += (double)ks[a] * (double)vs[b];
        }
        __syncthreads();
        if (tid == 0) {
            double dsum = 0.0;
            for (int a = 0; a < m; ++a) {
                z[a] += (double)ks[a];
                dsum += (double)qs[a] * fmax(z[a], (double)ASA_DEN_EPS);
            }
            sh_dsum = 1.0 / fmax(dsum, (double)ASA_DEN_EPS);
        }
        __syncthreads();
        for (int b = tid; b < m; b += nt) {
            double acc = 0.0;
            for (int a = 0; a < m; ++a) acc += (double)qs[a] * sig[(i64)a * m + b];
            u2[b] = (float)(acc * sh_dsum);
        }
        __syncthreads();
        for (int s = tid; s < nk; s += nt) {
            double acc = 0.0;
            for (int b = 0; b < m; ++b) acc += (double)u2[b] * (double)slot_out[(i64)s * m + b];
            zc[s] = (float)acc;
        }
        __syncthreads();
        if (tid == 0) {
            if (signed_sw) {
                for (int s = 0; s < nk; ++s) sw[s] = tanhf(zc[s]);
            } else {
                double mx = (double)ASA_NEG_INF;
                for (int s = 0; s < nk; ++s) mx = fmax(mx, (double)zc[s]);
                double sum = 0.0;
                for (int s = 0; s < nk; ++s) sum += exp((double)zc[s] - mx);
                for (int s = 0; s < nk; ++s) sw[s] = (float)(exp((double)zc[s] - mx) / sum);
            }
        }
        __syncthreads();
    }

    // 6. the head's output: sum_k (rw + gate sw) S_k
    for (int x = tid; x < d; x += nt) {
        double acc = 0.0;
        for (int s = 0; s < nk; ++s) {
            const float wgt = m > 0 ? rw[s] + gate * sw[s] : rw[s];
            acc += (double)wgt * (double)st[s * d + x];
        }
        out_h[hd + x] = (float)acc;
    }
}
