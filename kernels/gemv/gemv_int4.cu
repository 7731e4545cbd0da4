// W4A16 INT4 group-wise weight GEMV / small-batch GEMM, symmetric or asymmetric, any group size of
// 32/64/128/256 (g64 and g128 are the common ones).
//   packed: [N x ceil(K/2)] bytes, row-major; column 2j in the LOW nibble of byte j, 2j+1 in the high one
//           (quantfleet-quant Int4Matrix::packed; odd K leaves the last high nibble unused)
//   scales: [N x G] f32 with G = ceil(K / group);   zeros: [N x G] u8, or null for symmetric (zero = 8)
//   x: [batch x K] f16/bf16;  y: [batch x N];  w[n, c] = (nibble - zero[n, c/group]) * scale[n, c/group]
// Layout and why: rows stay in the quantizer's order, so the engine uploads Int4Matrix bytes unchanged,
// and a row is still one contiguous stream: each lane's 16-byte load is 32 weights, a warp step reads 512
// contiguous bytes (1024 weights). A 32-column chunk touches at most two groups (group >= 32), so each
// chunk loads two (scale, zero) pairs instead of one per weight; they come from L1 since the four lanes
// covering one g128 group read the same pair.
// Kernels: gemv_int4_{f16,bf16}_{bt1,bt8}; grid (ceil(N/4), ceil(batch/BT)), block 128.
#include "gemv_common.cuh"

template <bool BF16, int BT>
struct Int4Weights {
    u64 row_bytes;
    u32 k, group_shift, groups_per_row;
    const float *QF_RESTRICT scales;
    const u8 *QF_RESTRICT zeros;  // null: symmetric

    // (scale, zero) of the group holding column `col`. No clamp needed: the largest column a row's bytes
    // reach is K (the padding nibble of an odd K), and an odd K is never a multiple of the (even) group
    // size, so K >> group_shift is still the last group. (A clamp here made ptxas spill on sm_89/sm_90.)
    __device__ __forceinline__ float2 params(u32 n, u32 col) const {
        const u32 g = col >> group_shift;
        const u64 i = (u64)n * groups_per_row + g;
        return make_float2(scales[i], zeros ? (float)zeros[i] : 8.0f);
    }
    // Columns col and col+1 from one byte. The high nibble of an odd row's last byte is padding: its weight
    // is forced to 0 and its activation index clamped, branch-free (a per-element branch here made ptxas
    // keep state on the stack).
    __device__ __forceinline__ void pair(u32 code, u32 col, float scale, float zero, const ActTile<BF16, BT> &xs,
                                         float (&acc)[BT]) const {
        const float lo = ((float)(code & 0xFu) - zero) * scale;
        const bool has_hi = col + 1 < k;
        const float hi = has_hi ? ((float)(code >> 4) - zero) * scale : 0.0f;
        const u32 col_hi = has_hi ? col + 1 : col;
#pragma unroll
        for (int b = 0; b < BT; ++b)
            acc[b] += xs.at(b, col) * lo + xs.at(b, col_hi) * hi;
    }
    __device__ __forceinline__ void single(u32 n, u32 byte, u32 code, const ActTile<BF16, BT> &xs,
                                           float (&acc)[BT]) const {
        const float2 p = params(n, byte * 2);
        pair(code, byte * 2, p.x, p.y, xs, acc);
    }
    __device__ __forceinline__ void chunk(u32 n, u32 byte0, const uint4 &v, const ActTile<BF16, BT> &xs,
                                          float (&acc)[BT]) const {
        const u32 col0 = byte0 * 2;
        const float2 p0 = params(n, col0), p1 = params(n, col0 + 31);
        const u32 first_group = col0 >> group_shift;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const u32 col = col0 + 2 * i;
            const bool second = (col >> group_shift) != first_group;
            pair(qf_chunk_byte(v, i), col, second ? p1.x : p0.x, second ? p1.y : p0.y, xs, acc);
        }
    }
};

#define QF_GEMV_INT4(name, bf16, bt)                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        gemv_##name(const u8 *QF_RESTRICT packed, const float *QF_RESTRICT scales, const u8 *QF_RESTRICT zeros, \
                    u32 group_shift, const u16 *QF_RESTRICT x, u16 *QF_RESTRICT y, u32 n_rows, u32 k,       \
                    u32 batch) {                                                                            \
        const u32 gpr = (k + (1u << group_shift) - 1) >> group_shift;                                       \
        Int4Weights<bf16, bt> fmt{(k + 1) / 2, k, group_shift, gpr, scales, zeros};                         \
        gemv_launch<Int4Weights<bf16, bt>, bf16, bt>(fmt, packed, x, y, n_rows, k, batch,                   \
                                                     [](u32, float acc) { return acc; });                   \
    }
QF_GEMV_VARIANTS(QF_GEMV_INT4, int4)
