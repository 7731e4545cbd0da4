// 16-bit weight GEMV / small-batch GEMM (no quantization): f16 or bf16 weights, f16/bf16 activations.
//   w: [N x K] f16 or bf16, row-major (the engine's BF16 tier, and GGUF matrices the CUDA backend serves as
//      f16, e.g. the tied embedding / LM head);  x: [batch x K];  y: [batch x N] = x . w[n]
// Two bytes per weight, so a 16-byte chunk is 8 weights. Rows start 2-byte aligned and are 2K bytes long, so
// the skeleton's head and tail (single bytes up to the 16-byte boundary) hold whole elements: the lane given
// the element's low byte loads the 16-bit value, the lane given the high byte does nothing.
// Kernels: gemv_{f16w,bf16w}_{f16,bf16}_{bt1,bt8}; grid (ceil(N/4), ceil(batch/BT)), block 128.
#include "gemv_common.cuh"

template <bool WBF16, bool BF16, int BT>
struct HalfWeights {
    u64 row_bytes;
    const u8 *w;
    __device__ __forceinline__ void single(u32 n, u32 byte, u32, const ActTile<BF16, BT> &xs,
                                           float (&acc)[BT]) const {
        if (byte & 1u) return;  // high byte: the element belongs to the lane holding its low byte
        const u16 bits = *reinterpret_cast<const u16 *>(w + (u64)n * row_bytes + byte);
        const float wv = qf_act_to_f32<WBF16>(bits);
#pragma unroll
        for (int b = 0; b < BT; ++b)
            acc[b] += xs.at(b, byte >> 1) * wv;
    }
    __device__ __forceinline__ void chunk(u32, u32 byte0, const uint4 &v, const ActTile<BF16, BT> &xs,
                                          float (&acc)[BT]) const {
        const u32 col0 = byte0 >> 1;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u32 word = i < 2 ? v.x : i < 4 ? v.y : i < 6 ? v.z : v.w;
            const float wv = qf_act_to_f32<WBF16>((u16)(word >> ((i & 1) * 16)));
#pragma unroll
            for (int b = 0; b < BT; ++b)
                acc[b] += xs.at(b, col0 + i) * wv;
        }
    }
};

#define QF_GEMV_HALF(name, bf16, bt, wbf16)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        gemv_##name(const u8 *QF_RESTRICT w, const u16 *QF_RESTRICT x, u16 *QF_RESTRICT y, u32 n_rows, u32 k, \
                    u32 batch) {                                                                            \
        HalfWeights<wbf16, bf16, bt> fmt{2ull * k, w};                                                      \
        gemv_launch<HalfWeights<wbf16, bf16, bt>, bf16, bt>(fmt, w, x, y, n_rows, k, batch,                 \
                                                            [](u32, float acc) { return acc; });            \
    }
#define QF_GEMV_F16W(name, bf16, bt) QF_GEMV_HALF(name, bf16, bt, false)
#define QF_GEMV_BF16W(name, bf16, bt) QF_GEMV_HALF(name, bf16, bt, true)
QF_GEMV_VARIANTS(QF_GEMV_F16W, f16w)
QF_GEMV_VARIANTS(QF_GEMV_BF16W, bf16w)
