// Element-wise kernels the engine's CUDA backend needs around the matmuls, in the engine's own conventions
// (which differ from layers.cu's fused/half-split forms): separate gate and up tensors, GGUF's interleaved
// RoPE pairs with host-computed angles, and the residual add. f16/bf16 storage, fp32 math.
//
// add_{f16,bf16}(x, y, total): x[i] += y[i] for i < total; grid-stride.
// swiglu_split_{f16,bf16}(gate, up, out, total): out[i] = silu(gate[i]) * up[i]; grid-stride.
// rope_table_{f16,bf16}(x, cos, sin, n_heads, half): x [tokens x n_heads x 2*half] in place; pair i of a head
//   is elements (2i, 2i+1) (GGUF "NORM" layout, the engine's `RopeTable`), rotated by the angle whose cos/sin
//   are cos[t * half + i], sin[t * half + i] (f32, computed on the host in f64, shared by every layer of a
//   forward step). grid (tokens), block 128: a thread rotates pairs of all heads of its token.
#include "qf_common.cuh"

template <bool BF16>
__device__ __forceinline__ void add(u16 *QF_RESTRICT x, const u16 *QF_RESTRICT y, u64 total) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x)
        x[i] = qf_f32_to_act<BF16>(qf_act_to_f32<BF16>(x[i]) + qf_act_to_f32<BF16>(y[i]));
}

template <bool BF16>
__device__ __forceinline__ void swiglu_split(const u16 *QF_RESTRICT gate, const u16 *QF_RESTRICT up,
                                             u16 *QF_RESTRICT out, u64 total) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const float g = qf_act_to_f32<BF16>(gate[i]);
        out[i] = qf_f32_to_act<BF16>(g / (1.0f + expf(-g)) * qf_act_to_f32<BF16>(up[i]));
    }
}

template <bool BF16>
__device__ __forceinline__ void rope_table(u16 *QF_RESTRICT x, const float *QF_RESTRICT cos_t,
                                           const float *QF_RESTRICT sin_t, u32 n_heads, u32 half) {
    const u64 t = blockIdx.x;
    const u64 base = t * n_heads * 2 * half;
    for (u32 j = threadIdx.x; j < n_heads * half; j += blockDim.x) {
        const u32 h = j / half, i = j % half;
        const float c = cos_t[t * half + i], s = sin_t[t * half + i];
        const u64 a = base + (u64)h * 2 * half + 2 * i;
        const float x0 = qf_act_to_f32<BF16>(x[a]), x1 = qf_act_to_f32<BF16>(x[a + 1]);
        x[a] = qf_f32_to_act<BF16>(x0 * c - x1 * s);
        x[a + 1] = qf_f32_to_act<BF16>(x0 * s + x1 * c);
    }
}

#define QF_ELEMENTWISE_KERNELS(act, bf16)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        add_##act(u16 *QF_RESTRICT x, const u16 *QF_RESTRICT y, u64 total) {                                 \
        add<bf16>(x, y, total);                                                                              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) swiglu_split_##act(                                    \
        const u16 *QF_RESTRICT gate, const u16 *QF_RESTRICT up, u16 *QF_RESTRICT out, u64 total) {           \
        swiglu_split<bf16>(gate, up, out, total);                                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) rope_table_##act(                                      \
        u16 *QF_RESTRICT x, const float *QF_RESTRICT cos_t, const float *QF_RESTRICT sin_t, u32 n_heads,     \
        u32 half) {                                                                                          \
        rope_table<bf16>(x, cos_t, sin_t, n_heads, half);                                                    \
    }
QF_ELEMENTWISE_KERNELS(f16, false)
QF_ELEMENTWISE_KERNELS(bf16, true)
