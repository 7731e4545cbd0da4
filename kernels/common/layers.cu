// The small per-token layers around the matmuls: RMSNorm, rotary embedding, SwiGLU and embedding gather.
// All are memory-bound one-pass kernels; fp32 math, f16/bf16 storage.
//
// rmsnorm_{f16,bf16}(x, weight, y, cols, eps): x, y [tokens x cols], weight [cols] f32;
//   y = x * rsqrt(mean(x^2) + eps) * weight. One block (256 threads) per token; the sum of squares is a
//   block reduction, the row is re-read from L1 for the output.
// rope_{f16,bf16}(x, positions, n_heads, head_dim, log2_base): x [tokens x n_heads x head_dim] in place,
//   positions [tokens] i32. Half-split ("NeoX"/Llama-HF) pairs (i, i + D/2) rotated by
//   pos * base^(-2i/D); the angle is formed in fp32 as pos * inv_freq like the reference implementations.
//   grid (tokens), block 128: a thread rotates pairs of all heads of its token.
// swiglu_{f16,bf16}(gate_up, out, inter, total): gate_up [tokens x 2*inter] = [gate | up] (one fused
//   projection), out [tokens x inter] = silu(gate) * up; grid-stride over `total` = tokens * inter.
// embedding_{f16,bf16}(table, ids, out, vocab, dim, status): out[t] = table[ids[t]]; an id outside
//   [0, vocab) writes a zero row and sets status[0] = 1 (atomically), which the host checks: device data
//   cannot be validated before the launch. grid (tokens), block 128.
#include "qf_common.cuh"

template <bool BF16>
__device__ __forceinline__ void rmsnorm(const u16 *QF_RESTRICT x, const float *QF_RESTRICT w, u16 *QF_RESTRICT y, u32 cols,
                                        float eps) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * cols;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = qf_act_to_f32<BF16>(x[row + c]);
        ss += v * v;
    }
    ss = qf_block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)cols + eps);
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x)
        y[row + c] = qf_f32_to_act<BF16>(qf_act_to_f32<BF16>(x[row + c]) * r * w[c]);
}

template <bool BF16>
__device__ __forceinline__ void rope(u16 *QF_RESTRICT x, const i32 *QF_RESTRICT positions, u32 n_heads, u32 head_dim,
                                     float log2_base) {
    const u32 half = head_dim / 2;
    const float pos = (float)positions[blockIdx.x];
    const u64 base = (u64)blockIdx.x * n_heads * head_dim;
    for (u32 j = threadIdx.x; j < n_heads * half; j += blockDim.x) {
        const u32 h = j / half, i = j % half;
        const float inv_freq = exp2f(-(float)(2 * i) / (float)head_dim * log2_base);
        const float angle = pos * inv_freq;
        const float c = cosf(angle), s = sinf(angle);
        const u64 a = base + (u64)h * head_dim + i, b = a + half;
        const float x0 = qf_act_to_f32<BF16>(x[a]), x1 = qf_act_to_f32<BF16>(x[b]);
        x[a] = qf_f32_to_act<BF16>(x0 * c - x1 * s);
        x[b] = qf_f32_to_act<BF16>(x1 * c + x0 * s);
    }
}

template <bool BF16>
__device__ __forceinline__ void swiglu(const u16 *QF_RESTRICT gate_up, u16 *QF_RESTRICT out, u32 inter, u64 total) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / inter, c = i % inter;
        const float g = qf_act_to_f32<BF16>(gate_up[t * 2 * inter + c]);
        const float u = qf_act_to_f32<BF16>(gate_up[t * 2 * inter + inter + c]);
        out[i] = qf_f32_to_act<BF16>(g / (1.0f + expf(-g)) * u);
    }
}

__device__ __forceinline__ void embedding(const u16 *QF_RESTRICT table, const i32 *QF_RESTRICT ids, u16 *QF_RESTRICT out,
                                          u32 vocab, u32 dim, u32 *QF_RESTRICT status) {
    const i32 id = ids[blockIdx.x];
    const bool ok = id >= 0 && (u32)id < vocab;
    if (!ok && threadIdx.x == 0) atomicMax(status, 1u);
    const u64 src = ok ? (u64)id * dim : 0, dst = (u64)blockIdx.x * dim;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) out[dst + c] = ok ? table[src + c] : (u16)0;
}

#define QF_LAYER_KERNELS(act, bf16)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) rmsnorm_##act(                                         \
        const u16 *QF_RESTRICT x, const float *QF_RESTRICT w, u16 *QF_RESTRICT y, u32 cols, float eps) {     \
        rmsnorm<bf16>(x, w, y, cols, eps);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) rope_##act(                                            \
        u16 *QF_RESTRICT x, const i32 *QF_RESTRICT positions, u32 n_heads, u32 head_dim, float log2_base) {  \
        rope<bf16>(x, positions, n_heads, head_dim, log2_base);                                              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) swiglu_##act(const u16 *QF_RESTRICT gate_up,           \
                                                                   u16 *QF_RESTRICT out, u32 inter, u64 total) { \
        swiglu<bf16>(gate_up, out, inter, total);                                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                        \
        embedding_##act(const u16 *QF_RESTRICT table, const i32 *QF_RESTRICT ids, u16 *QF_RESTRICT out,      \
                        u32 vocab, u32 dim, u32 *QF_RESTRICT status) {                                       \
        embedding(table, ids, out, vocab, dim, status);                                                      \
    }
QF_LAYER_KERNELS(f16, false)
QF_LAYER_KERNELS(bf16, true)
