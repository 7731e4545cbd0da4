// Shared device helpers for every Quantfleet kernel: fixed-width integer names, number-format conversions
// (f16, bf16, FP8 E4M3) and warp/block reductions.
//
// No CUDA toolkit header is included on purpose: NVRTC on a serving node then needs no include path, only
// libnvrtc itself. f16 conversions use one PTX `cvt` instruction on the GPU; under the CPU emulator (QF_EMU,
// see emu/cuda_emu.h) the same functions are implemented bit by bit with identical rounding (to nearest,
// ties to even), so emulated results equal device results for these conversions.
#pragma once

#ifdef QF_EMU
typedef uint8_t u8;
typedef int8_t i8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef int32_t i32;
typedef uint64_t u64;
typedef int64_t i64;
#define QF_DYNAMIC_SMEM(T, name) T *name = reinterpret_cast<T *>(qf_emu::dynamic_smem())
#define QF_RESTRICT __restrict__
#else
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;
#define QF_DYNAMIC_SMEM(T, name)                            \
    extern __shared__ __align__(16) unsigned char qf_smem_[]; \
    T *name = reinterpret_cast<T *>(qf_smem_)
#define QF_RESTRICT __restrict__
#endif

#define QF_FULL_MASK 0xffffffffu
#define QF_NEG_INF __int_as_float(0xff800000)  // no math header under NVRTC, so no INFINITY macro

// ---- f16 / bf16 ----------------------------------------------------------------------------------------

__device__ __forceinline__ float qf_f16_to_f32(u16 h) {
#ifdef QF_EMU
    const u32 sign = (u32)(h & 0x8000u) << 16;
    const u32 exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    u32 bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
        // Subnormal (or zero): man * 2^-24, exact in f32.
        float v = (float)man * 5.9604644775390625e-8f;
        bits = __float_as_uint(v) | sign;
    }
    return __uint_as_float(bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 qf_f32_to_f16(float f) {
#ifdef QF_EMU
    const u32 x = __float_as_uint(f);
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 abs = x & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return (u16)(sign | 0x7E00u);  // NaN
    if (abs >= 0x477FF000u) return (u16)(sign | 0x7C00u);  // rounds to or beyond 65520: inf
    if (abs < 0x38800000u) {
        // Result is f16 subnormal: value / 2^-24 rounded to nearest even, done in f32 (exact scaling).
        const float scaled = __uint_as_float(abs) * 16777216.0f;
        return (u16)(sign | (u32)rintf(scaled));
    }
    const u32 shifted = abs - (112u << 23);
    const u32 rounded = shifted + 0xFFFu + ((shifted >> 13) & 1u);
    return (u16)(sign | (rounded >> 13));
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ float qf_bf16_to_f32(u16 h) { return __uint_as_float((u32)h << 16); }

__device__ __forceinline__ u16 qf_f32_to_bf16(float f) {
    const u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x40u);  // keep NaN a (quiet) NaN
    return (u16)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// Activations are 16-bit floats; BF16 selects bfloat16 instead of IEEE half at compile time.
template <bool BF16>
__device__ __forceinline__ float qf_act_to_f32(u16 h) {
    return BF16 ? qf_bf16_to_f32(h) : qf_f16_to_f32(h);
}
template <bool BF16>
__device__ __forceinline__ u16 qf_f32_to_act(float f) {
    return BF16 ? qf_f32_to_bf16(f) : qf_f32_to_f16(f);
}

// ---- FP8 E4M3 (OCP "fn": max 448, 0x7F/0xFF are NaN) ---------------------------------------------------

// Decode: put the 7 magnitude bits at the top of an f32 mantissa and multiply by 2^120. Subnormal codes
// become f32 subnormals and scale exactly (kernels are built without flush-to-zero). Portable across sm_80
// (no FP8 hardware) and sm_89/sm_90, and two integer ops plus one multiply per weight.
__device__ __forceinline__ float qf_e4m3_to_f32(u32 code) {
    const u32 mag = code & 0x7Fu;
    float v = __uint_as_float(mag << 20) * 1.329227995784916e36f;  // 2^120
    if (mag == 0x7Fu) v = __uint_as_float(0x7FC00000u);
    return __uint_as_float(__float_as_uint(v) | ((code & 0x80u) << 24));
}

// Saturating encode, round to nearest even, bit-identical to quantfleet-quant's E4M3 Saturating encoder:
// finite overflow and +-inf clamp to +-448, NaN becomes 0x7F with the input's sign.
__device__ __forceinline__ u8 qf_f32_to_e4m3_sat(float x) {
    const u32 bits = __float_as_uint(x);
    const u32 sign = (bits >> 24) & 0x80u;
    const u32 abs = bits & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return (u8)(sign | 0x7Fu);
    u32 mag;
    if (abs < 0x3C800000u) {  // below 2^-6, the smallest normal: count subnormal steps of 2^-9
        mag = (u32)rintf(__uint_as_float(abs) * 512.0f);
    } else {
        const u32 rounded = (abs + 0x7FFFFu + ((abs >> 20) & 1u)) >> 20;
        mag = rounded - (120u << 3);
    }
    if (mag > 0x7Eu) mag = 0x7Eu;
    return (u8)(sign | mag);
}

// ---- reductions ------------------------------------------------------------------------------------------

__device__ __forceinline__ float qf_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(QF_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float qf_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(QF_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats of shared
// memory; every thread gets the total. Two barriers: one before reading the partials, one so the scratch
// can be reused by the next call.
__device__ __forceinline__ float qf_block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = qf_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    t = qf_warp_sum(t);
    __syncthreads();
    return t;
}

__device__ __forceinline__ float qf_block_max(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = qf_warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : -3.402823466e38f;
    t = qf_warp_max(t);
    __syncthreads();
    return t;
}

// In place, x[0..n) <- R x for x in shared memory: the normalized Walsh-Hadamard rotation of
// quantfleet_quant::hadamard::rotate, per block of b values, b the largest power of two dividing n. The same
// butterflies (a + c, a - c) on the same pairs and the same final scale 1 / sqrt(b) (IEEE sqrt and division,
// as NVRTC compiles them by default), so it gives the host's f32 bits. Every thread of the block must call
// it; it starts after and ends with a barrier, so x may be written just before and read just after.
__device__ __forceinline__ void qf_hadamard_shared(float *x, u32 n) {
    const u32 b = n & (0u - n);
    for (u32 h = 1; h < b; h *= 2) {
        __syncthreads();
        for (u32 p = threadIdx.x; p < n / 2; p += blockDim.x) {
            const u32 i = p / h * 2 * h + p % h, j = i + h;
            const float a = x[i], c = x[j];
            x[i] = a + c;
            x[j] = a - c;
        }
    }
    __syncthreads();
    const float norm = 1.0f / sqrtf((float)b);
    for (u32 d = threadIdx.x; d < n; d += blockDim.x) x[d] *= norm;
    __syncthreads();
}

// The same rotation in registers, for a vector of 32 * DPL values (DPL a power of two) that a warp holds with
// lane l owning x[l * DPL .. (l + 1) * DPL): butterflies of span h < DPL inside each lane, wider ones across
// lanes through shuffles (a lane holds the upper end of a pair when its bit h / DPL is set). Same stages in
// the same order, same pairs, same scale: the host's f32 bits. All 32 lanes must call it.
template <int DPL>
__device__ __forceinline__ void qf_hadamard_warp(float (&x)[DPL], u32 lane) {
#pragma unroll
    for (int h = 1; h < DPL; h *= 2) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            if ((i & h) == 0) {
                const float a = x[i], c = x[i + h];
                x[i] = a + c;
                x[i + h] = a - c;
            }
        }
    }
#pragma unroll
    for (u32 m = 1; m < 32; m *= 2) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const float other = __shfl_xor_sync(QF_FULL_MASK, x[i], m);
            x[i] = (lane & m) ? other - x[i] : x[i] + other;
        }
    }
    const float norm = 1.0f / sqrtf((float)(32 * DPL));
#pragma unroll
    for (int i = 0; i < DPL; ++i) x[i] *= norm;
}
