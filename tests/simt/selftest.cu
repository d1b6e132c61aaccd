// Kernels that test the emulator itself (tests/cuda_emu.rs); compiled only into the emulator.

// out: [blockDim.x * 4] per block: xor 1, up 3, down 5, broadcast of lane 7 (ints, within warps);
// then sh = thread id, __syncthreads, out2 [blockDim.x] = sh[blockDim.x - 1 - tid].
extern "C" __global__ void simt_selftest_exchange(int* out, int* out2) {
    __shared__ int sh[1024];
    int tid = threadIdx.x;
    int v = 1000 * blockIdx.x + tid;
    int* o = out + (blockIdx.x * blockDim.x + tid) * 4;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 1);
    o[1] = __shfl_up_sync(0xffffffffu, v, 3);
    o[2] = __shfl_down_sync(0xffffffffu, v, 5);
    o[3] = __shfl_sync(0xffffffffu, v, 7);
    sh[tid] = v;
    __syncthreads();
    out2[blockIdx.x * blockDim.x + tid] = sh[blockDim.x - 1 - tid];
}

// Thread 0 waits for the block while the rest of its warp waits for the warp: neither barrier
// can complete (a GPU hangs or misbehaves); the emulator reports a deadlock.
extern "C" __global__ void simt_selftest_divergent_sync(int* out) {
    if (threadIdx.x == 0)
        __syncthreads();
    else
        __syncwarp();
    out[threadIdx.x] = 1;
}
