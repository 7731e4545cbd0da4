// W8A16 FP8-E4M3 weight GEMV / small-batch GEMM with per-output-channel scales.
//   w:      [N x K] E4M3 codes, row-major (quantfleet-quant Fp8Matrix::codes)
//   scales: f32, scales[n * scale_stride] (stride 1: per channel; stride 0: one per-tensor scale)
//   x:      [batch x K] f16/bf16;  y: [batch x N] f16/bf16, y = (x . decode(w[n])) * scale[n]
// One byte per weight, so a 16-byte chunk is 16 weights; decoding is two integer ops and a multiply
// (qf_e4m3_to_f32), the same on sm_80 (no FP8 units) and sm_89/sm_90.
// Kernels: gemv_fp8_{f16,bf16}_{bt1,bt8}; grid (ceil(N/4), ceil(batch/BT)), block 128.
#include "gemv_common.cuh"

template <bool BF16, int BT>
struct Fp8Weights {
    u64 row_bytes;
    __device__ __forceinline__ void single(u32, u32 col, u32 code, const ActTile<BF16, BT> &xs,
                                           float (&acc)[BT]) const {
        const float wv = qf_e4m3_to_f32(code);
#pragma unroll
        for (int b = 0; b < BT; ++b)
            acc[b] += xs.at(b, col) * wv;
    }
    __device__ __forceinline__ void chunk(u32, u32 col0, const uint4 &v, const ActTile<BF16, BT> &xs,
                                          float (&acc)[BT]) const {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const float wv = qf_e4m3_to_f32(qf_chunk_byte(v, i));
#pragma unroll
            for (int b = 0; b < BT; ++b)
                acc[b] += xs.at(b, col0 + i) * wv;
        }
    }
};

#define QF_GEMV_FP8(name, bf16, bt)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                      \
        gemv_##name(const u8 *QF_RESTRICT w, const float *QF_RESTRICT scales, u32 scale_stride,            \
                    const u16 *QF_RESTRICT x, u16 *QF_RESTRICT y, u32 n_rows, u32 k, u32 batch) {          \
        Fp8Weights<bf16, bt> fmt{k};                                                                       \
        gemv_launch<Fp8Weights<bf16, bt>, bf16, bt>(fmt, w, x, y, n_rows, k, batch, [=](u32 n, float acc) { \
            return acc * scales[(u64)n * scale_stride];                                                    \
        });                                                                                                \
    }
QF_GEMV_VARIANTS(QF_GEMV_FP8, fp8)
