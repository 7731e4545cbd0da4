// Per-token FP8-E4M3 activation quantization (the input side of W8A8 prefill GEMMs).
//   x: [tokens x cols] f16/bf16  ->  codes: [tokens x cols] E4M3, scales: [tokens] f32
//   scale = amax(row) / 448 (1 for an all-zero row); code = e4m3_sat(x * (1 / scale))
// Bit-identical to quantfleet-quant's quantize_fp8(.., E4M3, PerRow) (same inverse-multiply contract),
// so the engine's CPU and GPU paths agree byte for byte. One block per token: the row is read twice (amax,
// then encode), the second time from L1/L2; 256 threads stride the row so loads stay coalesced.
// Kernels: act_quant_fp8_{f16,bf16}; grid (tokens), block 256.
#include "../common/qf_common.cuh"

template <bool BF16>
__device__ __forceinline__ void act_quant_fp8(const u16 *QF_RESTRICT x, u8 *QF_RESTRICT codes, float *QF_RESTRICT scales,
                                              u32 cols) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * cols;
    float amax = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(qf_act_to_f32<BF16>(x[row + c])));
    amax = qf_block_max(amax, scratch);
    const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    const float inv = 1.0f / scale;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) codes[row + c] = qf_f32_to_e4m3_sat(qf_act_to_f32<BF16>(x[row + c]) * inv);
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

extern "C" __global__ void __launch_bounds__(256)
    act_quant_fp8_f16(const u16 *QF_RESTRICT x, u8 *QF_RESTRICT codes, float *QF_RESTRICT scales, u32 cols) {
    act_quant_fp8<false>(x, codes, scales, cols);
}
extern "C" __global__ void __launch_bounds__(256)
    act_quant_fp8_bf16(const u16 *QF_RESTRICT x, u8 *QF_RESTRICT codes, float *QF_RESTRICT scales, u32 cols) {
    act_quant_fp8<true>(x, codes, scales, cols);
}
