// CPU emulation of the CUDA subset that `cuda/*.cu` uses, so the kernels can be run and checked
// against their CPU twins on a machine without a GPU (tests/cuda_emu.rs).
//
// Force-included (`-include simt.hpp`) before a kernel file, which is then compiled as plain
// C++ (`-ffp-contract=off`: no FMA unless the kernel asks for one, as with NVRTC's defaults for
// the `__f*_rn` intrinsics). Each thread of a block is a fiber (ucontext); the blocks of a grid
// run one after another (last to first). `__syncthreads`, `__syncwarp` and the warp shuffles are barriers of the
// fibers, so divergence bugs that would hang or race on a GPU show up as a deadlock error or as
// wrong numbers. Static `__shared__` arrays become function-local statics (one block runs at a
// time, so they behave as block-shared memory); dynamic shared memory is filled with 0xff bytes
// (NaN) at every block start, so reads of unwritten shared memory poison the result.
//
// Emulated atomics: the unsigned atomicAdd of the arrival tickets (fibers switch only at
// barriers, so a read-modify-write is atomic); __threadfence orders nothing that needs ordering
// here (one block runs at a time, so every block's writes precede the next block's reads).
// Not emulated: float atomics (the kernels have none), textures, cooperative groups, timing.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

// Kernel sources test this to take their portable paths (e.g. asa_mma_bf16 in common.cuh).
#define ASA_SIMT 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define ASA_DYN_SHARED(T, name) T* name = static_cast<T*>(simt::dyn_smem())

struct simt_dim3 {
    unsigned x, y, z;
};

namespace simt {

struct Fiber;
extern Fiber* cur;
extern simt_dim3 block_idx, block_dim, grid_dim;

const simt_dim3& thread_idx();
void* dyn_smem();
void syncthreads();
void syncwarp();
// Warp exchange: every live lane of the calling lane's warp publishes `v` (8 bytes), then each
// lane receives the value published by `src` (its own value when src is out of range).
uint64_t exchange(uint64_t v, int src);
int lane_id();

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

}  // namespace simt

#define threadIdx (simt::thread_idx())
#define blockIdx (simt::block_idx)
#define blockDim (simt::block_dim)
#define gridDim (simt::grid_dim)

inline void __syncthreads() { simt::syncthreads(); }
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}
inline void __syncwarp(unsigned = 0xffffffffu) { simt::syncwarp(); }

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = simt::lane_id();
    int base = lane & ~(width - 1);
    return simt::from_bits<T>(simt::exchange(simt::to_bits(v), base + (src & (width - 1))));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = simt::lane_id();
    int src = lane ^ mask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return simt::from_bits<T>(simt::exchange(simt::to_bits(v), src));
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = simt::lane_id();
    int src = lane - (int)delta;
    if (src < (lane & ~(width - 1))) src = lane;
    return simt::from_bits<T>(simt::exchange(simt::to_bits(v), src));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = simt::lane_id();
    int src = lane + (int)delta;
    if (src >= (lane & ~(width - 1)) + width) src = lane;
    return simt::from_bits<T>(simt::exchange(simt::to_bits(v), src));
}

// IEEE intrinsics (round to nearest)
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }

// bit casts
inline float __int_as_float(int i) { return simt::from_bits<float>((uint32_t)i); }
inline float __uint_as_float(unsigned u) { return simt::from_bits<float>(u); }
inline int __float_as_int(float f) { return (int)(uint32_t)simt::to_bits(f); }
inline unsigned __float_as_uint(float f) { return (uint32_t)simt::to_bits(f); }
inline double __longlong_as_double(long long i) { return simt::from_bits<double>((uint64_t)i); }
inline long long __double_as_longlong(double d) { return (long long)simt::to_bits(d); }

// CUDA's integer min/max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(int a, long long b) { return min((long long)a, b); }
inline long long min(long long a, int b) { return min(a, (long long)b); }
inline long long max(int a, long long b) { return max((long long)a, b); }
inline long long max(long long a, int b) { return max(a, (long long)b); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

namespace simt {

// Kernel registry: `call` unpacks a cuLaunchKernel-style argument array (pointers to the
// values) into the kernel's parameters.
using Thunk = void (*)(void**);
// `nparams`: the kernel's parameter count, which every launch's argument count must match
void register_kernel(const char* name, Thunk f, int nparams);
struct Reg {
    Reg(const char* name, Thunk f, int nparams) { register_kernel(name, f, nparams); }
};
template <class... A>
constexpr int arity(void (*)(A...)) {
    return (int)sizeof...(A);
}

template <class T>
struct Bare {
    using type = T;
};
template <class T>
struct Bare<const T> {
    using type = T;
};

template <class... A, std::size_t... I>
inline void call_impl(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<typename Bare<A>::type*>(a[I])...);
}
template <class... A>
inline void call(void (*f)(A...), void** a) {
    call_impl(f, a, std::index_sequence_for<A...>{});
}

}  // namespace simt
