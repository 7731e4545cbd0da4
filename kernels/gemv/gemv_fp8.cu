// W8A16 FP8-E4M3 weight GEMV / small-batch GEMM with per-tensor, per-output-channel or per-group scales.
//   w:      [N x K] E4M3 codes, row-major (quantfleet-quant Fp8Matrix::codes)
//   scales: f32. group_shift == 0: scales[n * scale_stride] multiplies row n's sum (stride 1: per channel;
//           stride 0: one per-tensor scale). group_shift > 0: [N x G] with G = ceil(K >> group_shift), one per
//           2^group_shift consecutive columns of a row, multiplied into each weight
//   x:      [batch x K] f16/bf16;  y: [batch x N] f16/bf16
// One byte per weight, so a 16-byte chunk is 16 weights; decoding is two integer ops and a multiply
// (qf_e4m3_to_f32), the same on sm_80 (no FP8 units) and sm_89/sm_90. A chunk starts anywhere in a row
// (rows of odd length), so it touches at most two groups (group >= 32): two scale loads per chunk, from L1.
// Kernels: gemv_fp8_{f16,bf16}_{bt1,bt8}; grid (ceil(N/4), ceil(batch/BT)), block 128.
#include "gemv_common.cuh"

template <bool BF16, int BT>
struct Fp8Weights {
    u64 row_bytes;
    const float *QF_RESTRICT scales;
    u32 group_shift, groups_per_row;  // group_shift 0: no per-group scales (the epilogue scales the row)

    __device__ __forceinline__ float group_scale(u32 n, u32 col) const {
        return group_shift ? scales[(u64)n * groups_per_row + (col >> group_shift)] : 1.0f;
    }
    __device__ __forceinline__ void single(u32 n, u32 col, u32 code, const ActTile<BF16, BT> &xs,
                                           float (&acc)[BT]) const {
        const float wv = qf_e4m3_to_f32(code) * group_scale(n, col);
#pragma unroll
        for (int b = 0; b < BT; ++b)
            acc[b] += xs.at(b, col) * wv;
    }
    __device__ __forceinline__ void chunk(u32 n, u32 col0, const uint4 &v, const ActTile<BF16, BT> &xs,
                                          float (&acc)[BT]) const {
        const float s0 = group_scale(n, col0), s1 = group_scale(n, col0 + 15);
        const u32 first_group = group_shift ? col0 >> group_shift : 0;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const bool second = group_shift && ((col0 + i) >> group_shift) != first_group;
            const float wv = qf_e4m3_to_f32(qf_chunk_byte(v, i)) * (second ? s1 : s0);
#pragma unroll
            for (int b = 0; b < BT; ++b)
                acc[b] += xs.at(b, col0 + i) * wv;
        }
    }
};

#define QF_GEMV_FP8(name, bf16, bt)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                      \
        gemv_##name(const u8 *QF_RESTRICT w, const float *QF_RESTRICT scales, u32 scale_stride,            \
                    u32 group_shift, const u16 *QF_RESTRICT x, u16 *QF_RESTRICT y, u32 n_rows, u32 k,       \
                    u32 batch) {                                                                           \
        const u32 gpr = group_shift ? (k + (1u << group_shift) - 1) >> group_shift : 0;                    \
        Fp8Weights<bf16, bt> fmt{k, scales, group_shift, gpr};                                             \
        gemv_launch<Fp8Weights<bf16, bt>, bf16, bt>(fmt, w, x, y, n_rows, k, batch, [=](u32 n, float acc) { \
            return group_shift ? acc : acc * scales[(u64)n * scale_stride];                                \
        });                                                                                                \
    }
QF_GEMV_VARIANTS(QF_GEMV_FP8, fp8)
