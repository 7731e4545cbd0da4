// INT8 symmetric weight GEMV / small-batch GEMM with per-output-channel scales.
//   w:      [N x K] int8 codes in -127..=127, row-major (quantfleet-quant Int8Matrix::codes)
//   scales: [N] f32;  x: [batch x K] f16/bf16;  y: [batch x N], y = (x . w[n]) * scales[n]
// Same streaming skeleton as FP8 (gemv_common.cuh): one byte per weight, 16 weights per 16-byte load.
// The int8 -> f32 conversion is one I2F per weight; with f16 activations a dp4a path would need int8
// activations (W8A8), which is the prefill GEMM's job, not this decode kernel's.
// Kernels: gemv_int8_{f16,bf16}_{bt1,bt8}; grid (ceil(N/4), ceil(batch/BT)), block 128.
#include "gemv_common.cuh"

template <bool BF16, int BT>
struct Int8Weights {
    u64 row_bytes;
    __device__ __forceinline__ void single(u32, u32 col, u32 code, const ActTile<BF16, BT> &xs,
                                           float (&acc)[BT]) const {
        const float wv = (float)(i8)code;
#pragma unroll
        for (int b = 0; b < BT; ++b)
            acc[b] += xs.at(b, col) * wv;
    }
    __device__ __forceinline__ void chunk(u32, u32 col0, const uint4 &v, const ActTile<BF16, BT> &xs,
                                          float (&acc)[BT]) const {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const float wv = (float)(i8)qf_chunk_byte(v, i);
#pragma unroll
            for (int b = 0; b < BT; ++b)
                acc[b] += xs.at(b, col0 + i) * wv;
        }
    }
};

#define QF_GEMV_INT8(name, bf16, bt)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        gemv_##name(const u8 *QF_RESTRICT w, const float *QF_RESTRICT scales, const u16 *QF_RESTRICT x,     \
                    u16 *QF_RESTRICT y, u32 n_rows, u32 k, u32 batch) {                                     \
        Int8Weights<bf16, bt> fmt{k};                                                                       \
        gemv_launch<Int8Weights<bf16, bt>, bf16, bt>(fmt, w, x, y, n_rows, k, batch,                        \
                                                     [=](u32 n, float acc) { return acc * scales[n]; });    \
    }
QF_GEMV_VARIANTS(QF_GEMV_INT8, int8)
