// The weight-streaming skeleton shared by every quantized GEMV/small-batch GEMM:
//   y[b, n] = sum_k x[b, k] * W[n, k]      x: [batch x K] f16/bf16, W: [N x K] packed, y: [batch x N]
//
// Layout and why:
// * One warp owns one output row n and streams that row's packed bytes front to back. Weights are read
//   exactly once per launch (per batch tile), which is the whole cost at decode: the kernel is bound by
//   HBM bandwidth, so every choice below is about full, coalesced 128-byte transactions.
// * The row's bytes are split into a head (up to 15 bytes until a 16-byte boundary), a body of 16-byte
//   chunks, and a tail. Each lane loads whole 16-byte chunks (uint4, one LDG.128): a warp covers 512
//   contiguous bytes per step, i.e. four full 128-byte lines. Rows of odd length (K = 17, 1025, 5137)
//   start at arbitrary alignment, which is why the head/tail exist instead of requiring K % 16 == 0.
// * Up to BT activation rows (a batch tile) are multiplied with each loaded weight chunk, so small-batch
//   prefill reuses each weight byte BT times from registers. Activations are small (batch x K x 2 bytes)
//   and shared by all warps, so they are served from L1/L2 with scalar loads.
// * Accumulation is fp32; the row's scale (if any) is applied once after the warp reduction.
// * Offsets into W are 64-bit: N x row_bytes exceeds 2^31 for large vocabularies and MLPs.
//
// A weight format W provides:
//   u64 row_bytes;                                    bytes per packed row
//   void chunk(n, byte0, uint4 bytes, xs, nb, acc)    accumulate 16 bytes starting at byte0 of row n
//   void single(n, byte, u32 value, xs, nb, acc)      accumulate one byte
#pragma once
#include "../common/qf_common.cuh"

#define QF_GEMV_WARPS 4  // rows per block: 128 threads keep enough warps in flight without long tails

// Activation rows of one batch tile: row b is x + b * k. Rows past the batch's end (b >= nb) read row
// nb - 1 instead and their sums are discarded at the end, so the inner loops carry no per-row branches.
template <bool BF16, int BT>
struct ActTile {
    const u16 *x;
    u32 k;
    int nb;
    __device__ __forceinline__ float at(int b, u32 col) const {
        return qf_act_to_f32<BF16>(x[(u64)min(b, nb - 1) * k + col]);
    }
};

template <class W, bool BF16, int BT>
__device__ __forceinline__ void gemv_row(const W &w, const u8 *QF_RESTRICT row_ptr, u32 n,
                                         const ActTile<BF16, BT> &xs, float (&acc)[BT]) {
    // Offsets within a row are 32-bit (a row is at most 2^32 bytes as K is u32); only the row's base
    // address is 64-bit. Fewer 64-bit values live across the loop kept ptxas from spilling.
    const u32 lane = threadIdx.x & 31;
    const u32 len = (u32)w.row_bytes;
    const u32 misalign = (u32)((u64)row_ptr & 15);
    const u32 head = misalign == 0 ? 0 : min(16 - misalign, len);
    const u32 chunks = (len - head) / 16;
    const u32 tail_start = head + chunks * 16;
    // Head and tail first (at most 15 bytes each, one per lane), so their bounds are dead during the loop.
    if (lane < head) w.single(n, lane, row_ptr[lane], xs, acc);
    if (tail_start + lane < len) w.single(n, tail_start + lane, row_ptr[tail_start + lane], xs, acc);
    const uint4 *body = reinterpret_cast<const uint4 *>(row_ptr + head);
    for (u32 c = lane; c < chunks; c += 32) w.chunk(n, head + c * 16, body[c], xs, acc);
}

// Byte i (0..15) of a 16-byte chunk.
__device__ __forceinline__ u32 qf_chunk_byte(const uint4 &v, int i) {
    const u32 word = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
    return (word >> ((i & 3) * 8)) & 0xFFu;
}

// Drives one launch: blockIdx.x picks QF_GEMV_WARPS rows, blockIdx.y a tile of BT batch rows.
// `epilogue(n, acc)` returns the final value of y[b, n] from the reduced accumulator.
template <class W, bool BF16, int BT, class Epilogue>
__device__ __forceinline__ void gemv_launch(const W &w, const u8 *QF_RESTRICT packed, const u16 *QF_RESTRICT x,
                                            u16 *QF_RESTRICT y, u32 n_rows, u32 k, u32 batch, Epilogue epilogue) {
    const u32 n = blockIdx.x * QF_GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= n_rows) return;  // whole warps leave together, so later shuffles stay convergent
    const u32 b0 = blockIdx.y * BT;
    ActTile<BF16, BT> xs{x + (u64)b0 * k, k, (int)min((u32)BT, batch - b0)};
    float acc[BT];
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] = 0.0f;
    gemv_row<W, BF16, BT>(w, packed + (u64)n * w.row_bytes, n, xs, acc);
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] = qf_warp_sum(acc[b]);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int b = 0; b < BT; ++b)
            if (b < xs.nb) y[(u64)(b0 + b) * n_rows + n] = qf_f32_to_act<BF16>(epilogue(n, acc[b]));
    }
}

// Declares the four batch-tile / activation variants of one weight format's kernel.
#define QF_GEMV_VARIANTS(MACRO, fmt) \
    MACRO(fmt##_f16_bt1, false, 1)   \
    MACRO(fmt##_f16_bt8, false, 8)   \
    MACRO(fmt##_bf16_bt1, true, 1)   \
    MACRO(fmt##_bf16_bt8, true, 8)
