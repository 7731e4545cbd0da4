// KV-cache quantize/append: writes one new token's K and V per sequence into the block-paged cache that
// attn_decode.cu reads (layouts documented there), quantizing on the way in.
//   k_new, v_new: [batch x n_kv_heads x D] f16 (the projections of the token being decoded)
//   f16 / fp8:    slot_mapping [batch] i32 = physical block * block_size + offset; negative = skip (padding)
//   kivi:         positions [batch] i32 = index of the new token in its sequence, plus the block table
// FP8 is per (token, head) of the Hadamard-rotated head (qf_hadamard_shared, the CPU cache's rotation; the
// attention caller rotates its queries and its output the same way): scale = amax / 448 (1 for an all-zero
// row), code = e4m3_sat(x / scale), the arithmetic of quantfleet-quant's quantize_kv_per_token applied to
// quantfleet_quant::hadamard::rotate of the row, so both produce identical bytes.
// KIVI appends into the f16 residual block; when the token fills the block, the same CUDA block quantizes
// it: keys per channel over the block's tokens, values per token over D, both asymmetric INT4 fitted like
// quantfleet-quant's GroupParams::fit (range widened to include 0, zero point rounded to nearest even).
// Kernels: kv_append_{f16,fp8,kivi}; grid (n_kv_heads, batch), block 128 (threads loop over D).
#include "../common/qf_common.cuh"

extern "C" __global__ void __launch_bounds__(128)
    kv_append_f16(const u16 *QF_RESTRICT k_new, const u16 *QF_RESTRICT v_new, const i32 *QF_RESTRICT slot_mapping,
                  u16 *QF_RESTRICT k_cache, u16 *QF_RESTRICT v_cache, u32 n_kv_heads, u32 block_size, u32 head_dim) {
    const u32 kvh = blockIdx.x, b = blockIdx.y;
    const i32 slot = slot_mapping[b];
    if (slot < 0) return;
    const u64 src = ((u64)b * n_kv_heads + kvh) * head_dim;
    const u64 dst = (((u64)slot / block_size * n_kv_heads + kvh) * block_size + (u32)slot % block_size) * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        k_cache[dst + d] = k_new[src + d];
        v_cache[dst + d] = v_new[src + d];
    }
}

// Largest head_dim the FP8 append rotates in shared memory (the attention kernels serve 64 and 128).
#define QF_KV_MAX_HEAD_DIM 128

// One row of D values, rotated in `rot` (shared, D floats), quantized to E4M3 with its own scale (all threads
// of the block take part; the last barrier lets the next call reuse `rot`).
__device__ __forceinline__ void fp8_row(const u16 *QF_RESTRICT src, u8 *QF_RESTRICT dst, float *QF_RESTRICT scale_out,
                                        u32 head_dim, float *rot, float *scratch) {
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) rot[d] = qf_f16_to_f32(src[d]);
    qf_hadamard_shared(rot, head_dim);
    float amax = 0.0f;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) amax = fmaxf(amax, fabsf(rot[d]));
    amax = qf_block_max(amax, scratch);
    const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) dst[d] = qf_f32_to_e4m3_sat(rot[d] / scale);
    if (threadIdx.x == 0) *scale_out = scale;
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(128)
    kv_append_fp8(const u16 *QF_RESTRICT k_new, const u16 *QF_RESTRICT v_new, const i32 *QF_RESTRICT slot_mapping,
                  u8 *QF_RESTRICT k_cache, u8 *QF_RESTRICT v_cache, float *QF_RESTRICT k_scale,
                  float *QF_RESTRICT v_scale, u32 n_kv_heads, u32 block_size, u32 head_dim) {
    __shared__ float scratch[32];
    __shared__ float rot[QF_KV_MAX_HEAD_DIM];
    const u32 kvh = blockIdx.x, b = blockIdx.y;
    const i32 slot = slot_mapping[b];
    if (slot < 0 || head_dim > QF_KV_MAX_HEAD_DIM) return;  // uniform across the block: no barrier is skipped
    const u64 src = ((u64)b * n_kv_heads + kvh) * head_dim;
    const u64 tok = ((u64)slot / block_size * n_kv_heads + kvh) * block_size + (u32)slot % block_size;
    fp8_row(k_new + src, k_cache + tok * head_dim, k_scale + tok, head_dim, rot, scratch);
    fp8_row(v_new + src, v_cache + tok * head_dim, v_scale + tok, head_dim, rot, scratch);
}

// Asymmetric INT4 fit of values whose min and max are lo, hi (GroupParams::fit with clip 1).
struct Int4Fit {
    float scale, inv, zero;
    __device__ __forceinline__ Int4Fit(float lo, float hi) {
        lo = fminf(lo, 0.0f);
        hi = fmaxf(hi, 0.0f);
        scale = (hi - lo) / 15.0f;
        zero = scale > 0.0f ? rintf(fminf(fmaxf(-lo / scale, 0.0f), 15.0f)) : 0.0f;
        inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    }
    __device__ __forceinline__ u32 nibble(float x) const {
        const float q = rintf(fminf(fmaxf(x * inv, -32.0f), 32.0f)) + zero;
        return (u32)fminf(fmaxf(q, 0.0f), 15.0f);
    }
};

extern "C" __global__ void __launch_bounds__(128)
    kv_append_kivi(const u16 *QF_RESTRICT k_new, const u16 *QF_RESTRICT v_new, const i32 *QF_RESTRICT positions,
                   const i32 *QF_RESTRICT block_table, u32 max_blocks, u16 *QF_RESTRICT res_k, u16 *QF_RESTRICT res_v,
                   u8 *QF_RESTRICT k_cache, u8 *QF_RESTRICT v_cache, float *QF_RESTRICT k_scale,
                   float *QF_RESTRICT v_scale, u8 *QF_RESTRICT k_zero, u8 *QF_RESTRICT v_zero, u32 n_kv_heads,
                   u32 block_size, u32 head_dim) {
    __shared__ float scratch[32];
    const u32 kvh = blockIdx.x, b = blockIdx.y;
    const i32 pos = positions[b];
    if (pos < 0) return;
    const u32 slot = (u32)pos % block_size;
    const u64 src = ((u64)b * n_kv_heads + kvh) * head_dim;
    const u64 res = ((u64)b * n_kv_heads + kvh) * block_size * head_dim;  // this head's residual block
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        res_k[res + (u64)slot * head_dim + d] = k_new[src + d];
        res_v[res + (u64)slot * head_dim + d] = v_new[src + d];
    }
    if (slot != block_size - 1) return;
    __syncthreads();  // the whole residual block, including this token, is now visible to every thread

    const u32 blk = (u32)block_table[(u64)b * max_blocks + (u32)pos / block_size];
    const u64 tok0 = ((u64)blk * n_kv_heads + kvh) * block_size;  // first token of the block
    const u64 ch0 = ((u64)blk * n_kv_heads + kvh) * head_dim;     // first key channel of the block
    const u32 row_bytes = head_dim / 2;
    // Keys: thread j owns channels 2j and 2j+1 (one packed byte per token), fits both over the block.
    for (u32 j = threadIdx.x; j < row_bytes; j += blockDim.x) {
        float lo0 = 0.0f, hi0 = 0.0f, lo1 = 0.0f, hi1 = 0.0f;
        for (u32 t = 0; t < block_size; ++t) {
            const float a = qf_f16_to_f32(res_k[res + (u64)t * head_dim + 2 * j]);
            const float c = qf_f16_to_f32(res_k[res + (u64)t * head_dim + 2 * j + 1]);
            lo0 = fminf(lo0, a), hi0 = fmaxf(hi0, a), lo1 = fminf(lo1, c), hi1 = fmaxf(hi1, c);
        }
        const Int4Fit f0(lo0, hi0), f1(lo1, hi1);
        k_scale[ch0 + 2 * j] = f0.scale, k_zero[ch0 + 2 * j] = (u8)f0.zero;
        k_scale[ch0 + 2 * j + 1] = f1.scale, k_zero[ch0 + 2 * j + 1] = (u8)f1.zero;
        for (u32 t = 0; t < block_size; ++t) {
            const float a = qf_f16_to_f32(res_k[res + (u64)t * head_dim + 2 * j]);
            const float c = qf_f16_to_f32(res_k[res + (u64)t * head_dim + 2 * j + 1]);
            k_cache[(tok0 + t) * row_bytes + j] = (u8)(f0.nibble(a) | (f1.nibble(c) << 4));
        }
    }
    // Values: one asymmetric group per token over its D dims.
    for (u32 t = 0; t < block_size; ++t) {
        const u16 *row = res_v + res + (u64)t * head_dim;
        float lo = 0.0f, hi = 0.0f;
        for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
            const float x = qf_f16_to_f32(row[d]);
            lo = fminf(lo, x), hi = fmaxf(hi, x);
        }
        lo = -qf_block_max(-lo, scratch);
        hi = qf_block_max(hi, scratch);
        const Int4Fit f(lo, hi);
        for (u32 j = threadIdx.x; j < row_bytes; j += blockDim.x)
            v_cache[(tok0 + t) * row_bytes + j] =
                (u8)(f.nibble(qf_f16_to_f32(row[2 * j])) | (f.nibble(qf_f16_to_f32(row[2 * j + 1])) << 4));
        if (threadIdx.x == 0) v_scale[tok0 + t] = f.scale, v_zero[tok0 + t] = (u8)f.zero;
    }
}
