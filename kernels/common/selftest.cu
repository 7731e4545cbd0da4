// Kernels that pin down the CUDA semantics the CPU emulator must reproduce (kernels/emu/): a block-wide
// barrier around shared memory, warp shuffles / votes across 32 lanes, and atomics. They also compile
// through NVRTC like every other module, so the same expectations can be checked on a real GPU.
// selftest_block_reverse(in, out): out[i] = in[blockDim.x - 1 - i] within each block, via shared memory;
//   without a real barrier threads would read slots not yet written (0xFF poison under the emulator).
// selftest_warp_ops(in, out): per thread 6 results: shfl_xor 1, shfl_down 3, shfl_up 2, shfl from
//   lane 31 - lane, ballot(in odd), any/all(in > threshold) packed.
// selftest_atomics(counter, fsum): every thread adds 1 to *counter and 0.5f to *fsum.
// selftest_partial_shuffle(out): only even lanes call a full-mask shuffle: undefined on a GPU, reported as
//   a divergence error by the emulator (its test expects that error).
#include "qf_common.cuh"

extern "C" __global__ void selftest_block_reverse(const u32 *QF_RESTRICT in, u32 *QF_RESTRICT out) {
    __shared__ u32 tile[1024];
    const u32 base = blockIdx.x * blockDim.x;
    tile[threadIdx.x] = in[base + threadIdx.x];
    __syncthreads();
    out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void selftest_warp_ops(const u32 *QF_RESTRICT in, u32 *QF_RESTRICT out, u32 threshold) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
    const u32 v = in[i];
    u32 *o = out + (u64)i * 6;
    o[0] = __shfl_xor_sync(QF_FULL_MASK, v, 1);
    o[1] = __shfl_down_sync(QF_FULL_MASK, v, 3);
    o[2] = __shfl_up_sync(QF_FULL_MASK, v, 2);
    o[3] = __shfl_sync(QF_FULL_MASK, v, 31 - lane);
    o[4] = __ballot_sync(QF_FULL_MASK, v & 1);
    o[5] = (u32)__any_sync(QF_FULL_MASK, v > threshold) | ((u32)__all_sync(QF_FULL_MASK, v > threshold) << 1);
}

extern "C" __global__ void selftest_atomics(u32 *QF_RESTRICT counter, float *QF_RESTRICT fsum) {
    atomicAdd(counter, 1u);
    atomicAdd(fsum, 0.5f);
}

extern "C" __global__ void selftest_partial_shuffle(u32 *QF_RESTRICT out) {
    const u32 lane = threadIdx.x & 31;
    if (lane % 2 == 0) out[threadIdx.x] = __shfl_sync(QF_FULL_MASK, lane, 0);
}
