// Sampling helpers over f32 logits [batch x vocab], one block of 256 threads per sequence.
// sample_argmax_f32(logits, out, vocab): greedy token, ties to the lowest index (deterministic).
// sample_softmax_f32(logits, probs, vocab, inv_temperature): probs = softmax(logits * inv_temperature),
//   max-subtracted in fp32.
// sample_categorical_f32(probs, uniforms, out, vocab): inverse-CDF draw from (unnormalised) probs with the
//   host's uniform u in [0, 1) per sequence, so a seeded host RNG makes sampling reproducible. Each thread
//   owns a contiguous slice of the vocabulary; slice sums are scanned in shared memory, then the one thread
//   whose slice holds u * total walks it. Contiguous slices cost uncoalesced loads but keep the CDF in
//   vocabulary order, which is what makes the draw reproducible across GPUs and the CPU.
#include "qf_common.cuh"

#define QF_SAMPLE_THREADS 256

extern "C" __global__ void __launch_bounds__(QF_SAMPLE_THREADS)
    sample_argmax_f32(const float *QF_RESTRICT logits, i32 *QF_RESTRICT out, u32 vocab) {
    __shared__ float s_val[QF_SAMPLE_THREADS];
    __shared__ u32 s_idx[QF_SAMPLE_THREADS];
    const float *row = logits + (u64)blockIdx.x * vocab;
    float best = QF_NEG_INF;
    u32 idx = 0xFFFFFFFFu;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x)
        if (row[i] > best) best = row[i], idx = i;  // strictly greater: the first (lowest) index wins
    s_val[threadIdx.x] = best;
    s_idx[threadIdx.x] = idx;
    __syncthreads();
    for (u32 stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            const float v = s_val[threadIdx.x + stride];
            const u32 j = s_idx[threadIdx.x + stride];
            if (v > s_val[threadIdx.x] || (v == s_val[threadIdx.x] && j < s_idx[threadIdx.x]))
                s_val[threadIdx.x] = v, s_idx[threadIdx.x] = j;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s_idx[0] == 0xFFFFFFFFu ? 0 : (i32)s_idx[0];
}

extern "C" __global__ void __launch_bounds__(QF_SAMPLE_THREADS)
    sample_softmax_f32(const float *QF_RESTRICT logits, float *QF_RESTRICT probs, u32 vocab, float inv_temperature) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * vocab;
    float m = QF_NEG_INF;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, logits[row + i] * inv_temperature);
    m = qf_block_max(m, scratch);
    float sum = 0.0f;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float e = expf(logits[row + i] * inv_temperature - m);
        probs[row + i] = e;
        sum += e;
    }
    sum = qf_block_sum(sum, scratch);
    const float inv = 1.0f / sum;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) probs[row + i] *= inv;
}

extern "C" __global__ void __launch_bounds__(QF_SAMPLE_THREADS)
    sample_categorical_f32(const float *QF_RESTRICT probs, const float *QF_RESTRICT uniforms, i32 *QF_RESTRICT out,
                           u32 vocab) {
    __shared__ float s_prefix[QF_SAMPLE_THREADS + 1];
    const float *row = probs + (u64)blockIdx.x * vocab;
    const u32 per = (vocab + blockDim.x - 1) / blockDim.x;
    const u32 lo = min(vocab, threadIdx.x * per), hi = min(vocab, lo + per);
    float part = 0.0f;
    for (u32 i = lo; i < hi; ++i) part += row[i];
    s_prefix[threadIdx.x + 1] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
        s_prefix[0] = 0.0f;
        for (u32 t = 1; t <= blockDim.x; ++t) s_prefix[t] += s_prefix[t - 1];
    }
    __syncthreads();
    const float target = uniforms[blockIdx.x] * s_prefix[blockDim.x];
    // The owning thread: its slice starts at or below the target and ends above it; the last non-empty
    // slice also takes targets at or beyond the (rounded) total.
    const bool last = hi == vocab && lo < hi;
    if (lo < hi && s_prefix[threadIdx.x] <= target && (target < s_prefix[threadIdx.x + 1] || last)) {
        float c = s_prefix[threadIdx.x];
        u32 pick = hi - 1;
        for (u32 i = lo; i < hi; ++i) {
            c += row[i];
            if (target < c) {
                pick = i;
                break;
            }
        }
        out[blockIdx.x] = (i32)pick;
    }
}
