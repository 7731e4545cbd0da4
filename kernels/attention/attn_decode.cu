// Decode attention (one new query token per sequence) over a block-paged KV cache, with the cache in
// FP16, FP8-E4M3 (per token-and-head scale) or INT4-KIVI, dequantized on the fly; softmax in fp32.
//
// Shapes (one layer):
//   q, out:       [batch x n_heads x D] f16;  GQA: query head h reads kv head h / (n_heads / n_kv_heads)
//   block_table:  [batch x max_blocks] i32, physical block of each sequence's logical block
//   seq_lens:     [batch] i32 tokens in the cache per sequence (0 gives a zero output)
//   paged element (blk, kvh, slot, d) at ((blk * n_kv_heads + kvh) * block_size + slot) * D + d
//   FP8:  k/v codes u8 in that layout, k/v scales f32 at (blk * n_kv_heads + kvh) * block_size + slot
//   KIVI: codes u8 with two dims per byte (d even in the low nibble), row = D/2 bytes;
//         keys per CHANNEL over one block: k_scale f32 / k_zero u8 at (blk * n_kv_heads + kvh) * D + d;
//         values per TOKEN: v_scale f32 / v_zero u8 at (blk * n_kv_heads + kvh) * block_size + slot;
//         tokens of the last, incomplete block (t >= floor(len / block_size) * block_size) are not yet
//         quantized (per-channel key scales need the whole block) and live in f16 residual buffers
//         [batch x n_kv_heads x block_size x D]; kv_append_kivi quantizes a block when it fills.
//
// Work split and why: one block of 4 warps per (kv head, sequence), serving every query head that shares the
// kv head (GQA group of up to 8), so each K and V row is read from HBM once and used `group` times from
// registers. Warps take tokens round-robin; for a token the warp reads the K and V rows with each lane owning
// D/32 CONTIGUOUS dims (one 4- or 8-byte load per lane for f16, 2-4 bytes for FP8, 1-2 for INT4: the warp
// reads a row as one coalesced segment), reduces one dot product per query head with shuffles, and keeps an
// online softmax per query head (running max m, sum l, fp32 accumulator). The warps' partial states are
// merged through shared memory (16 KiB at D = 128) at the end.
// Registers: ~75-125 per thread (8 query states in registers). `__launch_bounds__(128, 1)` lets ptxas use
// them freely; with the default it aimed for 64 registers at D = 64 and spilled. That leaves about 4 blocks
// (16 warps) per SM, roughly half the bytes in flight HBM needs; processing two tokens per warp step is the
// next step if measurements show the kernel short of bandwidth.
// FP8: the cache holds Hadamard-rotated keys and values (kv_append_fp8), so each warp rotates its copy of the
// queries after loading them and the output before storing it (qf_hadamard_warp: shuffles, no shared memory).
// Kernels: attn_decode_{f16,fp8,int4kivi}_d{64,128}; grid (n_kv_heads, batch), block 128.
#include "../common/qf_common.cuh"

#define QF_ATTN_WARPS 4
#define QF_ATTN_MAX_GROUP 8  // GQA query heads per kv head handled by one block (Llama-3 uses 4, 70B 8)

struct PagedIndex {
    u32 n_kv_heads, block_size;
    // Index of (blk, kvh, slot) in per-token arrays; multiply by D (or D/2) for element arrays.
    __device__ __forceinline__ u64 token(u32 blk, u32 kvh, u32 slot) const {
        return ((u64)blk * n_kv_heads + kvh) * block_size + slot;
    }
};

// Loads N consecutive bytes (N = 1, 2, 4 or 8, naturally aligned) as one transaction.
template <int N>
__device__ __forceinline__ u64 qf_load_bytes(const u8 *p) {
    if (N == 8) return *reinterpret_cast<const u64 *>(p);
    if (N == 4) return *reinterpret_cast<const u32 *>(p);
    if (N == 2) return *reinterpret_cast<const u16 *>(p);
    return *p;
}

template <int D>
struct F16Cache {
    static constexpr int DPL = D / 32;
    static constexpr bool ROTATED = false;
    const u16 *k, *v;
    PagedIndex ix;
    __device__ __forceinline__ void row(const u16 *base, u32 blk, u32 kvh, u32 slot, u32 lane, float (&out)[DPL]) const {
        const u64 bits = qf_load_bytes<2 * DPL>(reinterpret_cast<const u8 *>(base + ix.token(blk, kvh, slot) * D + lane * DPL));
#pragma unroll
        for (int i = 0; i < DPL; ++i) out[i] = qf_f16_to_f32((u16)(bits >> (16 * i)));
    }
    __device__ __forceinline__ void key(u32, u32 blk, u32 kvh, u32 slot, u32, u32 lane, float (&o)[DPL]) const {
        row(k, blk, kvh, slot, lane, o);
    }
    __device__ __forceinline__ void value(u32, u32 blk, u32 kvh, u32 slot, u32, u32 lane, float (&o)[DPL]) const {
        row(v, blk, kvh, slot, lane, o);
    }
};

template <int D>
struct Fp8Cache {
    static constexpr int DPL = D / 32;
    static constexpr bool ROTATED = true;  // rows are R k and R v
    const u8 *k, *v;
    const float *k_scale, *v_scale;
    PagedIndex ix;
    __device__ __forceinline__ void row(const u8 *base, const float *scales, u32 blk, u32 kvh, u32 slot, u32 lane,
                                        float (&out)[DPL]) const {
        const u64 t = ix.token(blk, kvh, slot);
        const u64 bits = qf_load_bytes<DPL>(base + t * D + lane * DPL);
        const float s = scales[t];
#pragma unroll
        for (int i = 0; i < DPL; ++i) out[i] = qf_e4m3_to_f32((u32)(bits >> (8 * i)) & 0xFFu) * s;
    }
    __device__ __forceinline__ void key(u32, u32 blk, u32 kvh, u32 slot, u32, u32 lane, float (&o)[DPL]) const {
        row(k, k_scale, blk, kvh, slot, lane, o);
    }
    __device__ __forceinline__ void value(u32, u32 blk, u32 kvh, u32 slot, u32, u32 lane, float (&o)[DPL]) const {
        row(v, v_scale, blk, kvh, slot, lane, o);
    }
};

template <int D>
struct KiviCache {
    static constexpr int DPL = D / 32;
    static constexpr bool ROTATED = false;
    const u8 *k, *v;
    const float *k_scale, *v_scale;
    const u8 *k_zero, *v_zero;
    const u16 *res_k, *res_v;  // [batch x n_kv_heads x block_size x D]
    PagedIndex ix;
    u32 quantized_len;  // tokens of this sequence held in INT4 (whole blocks)

    __device__ __forceinline__ bool residual(u32 t, const u16 *res, u32 b, u32 kvh, u32 slot, u32 lane,
                                             float (&out)[DPL]) const {
        if (t < quantized_len) return false;
        const u64 row = (((u64)b * ix.n_kv_heads + kvh) * ix.block_size + slot) * D + lane * DPL;
        const u64 bits = qf_load_bytes<2 * DPL>(reinterpret_cast<const u8 *>(res + row));
#pragma unroll
        for (int i = 0; i < DPL; ++i) out[i] = qf_f16_to_f32((u16)(bits >> (16 * i)));
        return true;
    }
    __device__ __forceinline__ u64 nibbles(const u8 *base, u32 blk, u32 kvh, u32 slot, u32 lane) const {
        return qf_load_bytes<DPL / 2>(base + ix.token(blk, kvh, slot) * (D / 2) + lane * (DPL / 2));
    }
    __device__ __forceinline__ void key(u32 b, u32 blk, u32 kvh, u32 slot, u32 t, u32 lane, float (&o)[DPL]) const {
        if (residual(t, res_k, b, kvh, slot, lane, o)) return;
        const u64 bits = nibbles(k, blk, kvh, slot, lane);
        const u64 ch = ((u64)blk * ix.n_kv_heads + kvh) * D + lane * DPL;
#pragma unroll
        for (int i = 0; i < DPL; ++i)
            o[i] = ((float)((bits >> (4 * i)) & 0xFu) - (float)k_zero[ch + i]) * k_scale[ch + i];
    }
    __device__ __forceinline__ void value(u32 b, u32 blk, u32 kvh, u32 slot, u32 t, u32 lane, float (&o)[DPL]) const {
        if (residual(t, res_v, b, kvh, slot, lane, o)) return;
        const u64 bits = nibbles(v, blk, kvh, slot, lane);
        const u64 tok = ix.token(blk, kvh, slot);
        const float s = v_scale[tok], z = (float)v_zero[tok];
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] = ((float)((bits >> (4 * i)) & 0xFu) - z) * s;
    }
};

template <class KV, int D>
__device__ __forceinline__ void attn_decode(const KV &kv, const u16 *QF_RESTRICT q, u16 *QF_RESTRICT out,
                                            const i32 *QF_RESTRICT block_table, u32 len, float scale,
                                            u32 n_heads, u32 n_kv_heads, u32 max_blocks) {
    constexpr int DPL = D / 32;
    const u32 kvh = blockIdx.x, b = blockIdx.y;
    const u32 group = n_heads / n_kv_heads;  // query heads sharing this kv head, 1..=QF_ATTN_MAX_GROUP
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 block_size = kv.ix.block_size;
    // Query head kvh * group + g of sequence b; this lane's dims start at lane * DPL.
    const u64 qbase = ((u64)b * n_heads + (u64)kvh * group) * D + lane * DPL;

    // Per query head g: scaled query, fp32 accumulator, running max and sum. Loops over g are unrolled to
    // QF_ATTN_MAX_GROUP with `g < group` guards so every array index is static and stays in registers.
    float qv[QF_ATTN_MAX_GROUP][DPL], acc[QF_ATTN_MAX_GROUP][DPL], m[QF_ATTN_MAX_GROUP], l[QF_ATTN_MAX_GROUP];
#pragma unroll
    for (int g = 0; g < QF_ATTN_MAX_GROUP; ++g) {
        m[g] = QF_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            qv[g][i] = (u32)g < group ? qf_f16_to_f32(q[qbase + (u64)g * D + i]) : 0.0f;
            acc[g][i] = 0.0f;
        }
        if (KV::ROTATED && (u32)g < group) qf_hadamard_warp<DPL>(qv[g], lane);  // uniform across the warp
#pragma unroll
        for (int i = 0; i < DPL; ++i) qv[g][i] *= scale;
    }
    float kr[DPL], vr[DPL];
    const i32 *QF_RESTRICT table = block_table + (u64)b * max_blocks;  // this sequence's blocks
    for (u32 t = warp; t < len; t += QF_ATTN_WARPS) {
        const u32 blk = (u32)table[t / block_size];
        const u32 slot = t % block_size;
        kv.key(b, blk, kvh, slot, t, lane, kr);
        kv.value(b, blk, kvh, slot, t, lane, vr);
#pragma unroll
        for (int g = 0; g < QF_ATTN_MAX_GROUP; ++g) {
            if ((u32)g < group) {  // uniform across the warp, so the shuffles below stay convergent
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; ++i) s += qv[g][i] * kr[i];
                s = qf_warp_sum(s);
                const float m_new = fmaxf(m[g], s);
                const float corr = expf(m[g] - m_new), p = expf(s - m_new);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int i = 0; i < DPL; ++i) acc[g][i] = acc[g][i] * corr + p * vr[i];
                m[g] = m_new;
            }
        }
    }

    // Merge the warps' (m, l, acc) per query head: out = sum_w acc_w e^(m_w - M) / sum_w l_w e^(m_w - M).
    __shared__ float s_m[QF_ATTN_WARPS][QF_ATTN_MAX_GROUP], s_l[QF_ATTN_WARPS][QF_ATTN_MAX_GROUP];
    __shared__ float s_acc[QF_ATTN_WARPS][QF_ATTN_MAX_GROUP][D];
#pragma unroll
    for (int g = 0; g < QF_ATTN_MAX_GROUP; ++g) {
        if ((u32)g < group) {
            if (lane == 0) {
                s_m[warp][g] = m[g];
                s_l[warp][g] = l[g];
            }
#pragma unroll
            for (int i = 0; i < DPL; ++i) s_acc[warp][g][lane * DPL + i] = acc[g][i];
        }
    }
    __syncthreads();
    for (u32 g = warp; g < group; g += QF_ATTN_WARPS) {  // warp w writes query heads w, w + 4
        float mx = QF_NEG_INF;
        for (int w = 0; w < QF_ATTN_WARPS; ++w) mx = fmaxf(mx, s_m[w][g]);
        float denom = 0.0f, num[DPL];
#pragma unroll
        for (int i = 0; i < DPL; ++i) num[i] = 0.0f;
        for (int w = 0; w < QF_ATTN_WARPS; ++w) {
            const float f = s_l[w][g] > 0.0f ? expf(s_m[w][g] - mx) : 0.0f;
            denom += s_l[w][g] * f;
#pragma unroll
            for (int i = 0; i < DPL; ++i) num[i] += s_acc[w][g][lane * DPL + i] * f;
        }
        const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;  // empty sequence: zeros
#pragma unroll
        for (int i = 0; i < DPL; ++i) num[i] *= inv;
        if (KV::ROTATED) qf_hadamard_warp<DPL>(num, lane);  // back from the cache's basis
        // The output address is formed here, not kept from the start: one fewer 64-bit value live across the
        // token loop removed small ptxas spills in the D = 64 variants.
        u16 *o = out + ((u64)blockIdx.y * n_heads + (u64)blockIdx.x * group + g) * D + lane * DPL;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] = qf_f32_to_f16(num[i]);
    }
}

#define QF_ATTN_COMMON_ARGS                                                                                  \
    const u16 *QF_RESTRICT q, u16 *QF_RESTRICT out, const i32 *QF_RESTRICT block_table,                      \
        const i32 *QF_RESTRICT seq_lens, float scale, u32 n_heads, u32 n_kv_heads, u32 block_size, u32 max_blocks
#define QF_ATTN_CALL(cache, d) \
    attn_decode<cache, d>(kv, q, out, block_table, (u32)seq_lens[blockIdx.y], scale, n_heads, n_kv_heads, max_blocks)

#define QF_ATTN_F16(d)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                        \
        attn_decode_f16_d##d(QF_ATTN_COMMON_ARGS, const u16 *QF_RESTRICT k, const u16 *QF_RESTRICT v) {     \
        F16Cache<d> kv{k, v, {n_kv_heads, block_size}};                                                      \
        QF_ATTN_CALL(F16Cache<d>, d);                                                                        \
    }
#define QF_ATTN_FP8(d)                                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                        \
        attn_decode_fp8_d##d(QF_ATTN_COMMON_ARGS, const u8 *QF_RESTRICT k, const u8 *QF_RESTRICT v,         \
                             const float *QF_RESTRICT k_scale, const float *QF_RESTRICT v_scale) {          \
        Fp8Cache<d> kv{k, v, k_scale, v_scale, {n_kv_heads, block_size}};                                    \
        QF_ATTN_CALL(Fp8Cache<d>, d);                                                                        \
    }
#define QF_ATTN_KIVI(d)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 1) attn_decode_int4kivi_d##d(                             \
        QF_ATTN_COMMON_ARGS, const u8 *QF_RESTRICT k, const u8 *QF_RESTRICT v, const float *QF_RESTRICT k_scale, \
        const float *QF_RESTRICT v_scale, const u8 *QF_RESTRICT k_zero, const u8 *QF_RESTRICT v_zero,        \
        const u16 *QF_RESTRICT res_k, const u16 *QF_RESTRICT res_v) {                                        \
        const u32 len = (u32)seq_lens[blockIdx.y];                                                           \
        KiviCache<d> kv{k, v, k_scale, v_scale, k_zero, v_zero, res_k, res_v, {n_kv_heads, block_size},      \
                        len / block_size * block_size};                                                      \
        QF_ATTN_CALL(KiviCache<d>, d);                                                                       \
    }
QF_ATTN_F16(64)
QF_ATTN_F16(128)
QF_ATTN_FP8(64)
QF_ATTN_FP8(128)
QF_ATTN_KIVI(64)
QF_ATTN_KIVI(128)
