// CPU emulation of the CUDA features our kernels use, so the same .cu sources compile with g++ and run on
// the CPU with real CUDA semantics. Force-included (g++ -include) before every kernel source by the
// quantfleet-kernels build script; kernel sources never include it themselves.
//
// Model: one launch runs its blocks one after another on the calling OS thread. Each CUDA thread of a block
// is a fiber (ucontext) with its own stack, so a thread can stop in the middle of the kernel:
//   * __syncthreads() parks the fiber until every live thread of the block has reached a barrier (threads
//     that already returned count as arrived, as on Volta and later).
//   * __shfl*_sync / __ballot_sync / __any_sync / __all_sync park the lane until every lane named in the
//     mask has reached a warp collective; the last lane to arrive computes all results. Lanes in the mask that
//     have exited, or that wait at __syncthreads instead, are reported as a divergence error, not a hang.
//   * `__shared__` variables are `static thread_local`: one copy per OS thread, shared by the fibers of the
//     block that is running (blocks do not overlap). Dynamic shared memory is a per-launch buffer filled with
//     0xFF (NaN in every float format we use) at the start of each block, so reads before writes show up.
//   * Atomics use the compiler's __atomic builtins (fibers only switch at barriers and collectives, so any
//     read-modify-write is already indivisible, but the builtins keep the semantics explicit).
// Not emulated: inline PTX (asm), tensor-core mma, clusters, async copies. Sources keep such code behind
// `#ifndef QF_EMU` with a portable twin next to it (see common/qf_common.cuh).
#pragma once
#define QF_EMU 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace qf_emu {
struct ThreadCoords {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
};
// Coordinates of the fiber that is running on this OS thread.
extern thread_local ThreadCoords g_coords;

void sync_threads();
// One warp collective. `kind` selects the operation; `arg` is the source lane, xor mask or delta; `width`
// is the shuffle segment width. Returns the 64-bit payload this lane receives.
enum class WarpOp { Idx, Xor, Down, Up, Ballot, Any, All };
uint64_t warp_collective(WarpOp kind, unsigned mask, uint64_t value, int arg, int width);
unsigned lane_id();
unsigned char *dynamic_smem();
}  // namespace qf_emu

#define threadIdx (qf_emu::g_coords.thread_idx)
#define blockIdx (qf_emu::g_coords.block_idx)
#define blockDim (qf_emu::g_coords.block_dim)
#define gridDim (qf_emu::g_coords.grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __constant__ static const

inline void __syncthreads() { qf_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    qf_emu::warp_collective(qf_emu::WarpOp::Ballot, mask, 1, 0, 32);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Shuffles carry any trivially copyable value of up to 8 bytes through the 64-bit payload.
template <typename T>
inline uint64_t qf_emu_pack(T v) {
    static_assert(sizeof(T) <= 8, "shuffle payloads are at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <typename T>
inline T qf_emu_unpack(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return qf_emu_unpack<T>(qf_emu::warp_collective(qf_emu::WarpOp::Idx, mask, qf_emu_pack(v), src, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return qf_emu_unpack<T>(qf_emu::warp_collective(qf_emu::WarpOp::Xor, mask, qf_emu_pack(v), lane_mask, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return qf_emu_unpack<T>(
        qf_emu::warp_collective(qf_emu::WarpOp::Down, mask, qf_emu_pack(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return qf_emu_unpack<T>(
        qf_emu::warp_collective(qf_emu::WarpOp::Up, mask, qf_emu_pack(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return static_cast<unsigned>(qf_emu::warp_collective(qf_emu::WarpOp::Ballot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
    return static_cast<int>(qf_emu::warp_collective(qf_emu::WarpOp::Any, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
    return static_cast<int>(qf_emu::warp_collective(qf_emu::WarpOp::All, mask, pred != 0, 0, 32));
}

inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float *p, float v) {
    float old, sum;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        sum = old + v;
    } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline int atomicMax(int *p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned atomicMax(unsigned *p, unsigned v) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned atomicCAS(unsigned *p, unsigned expected, unsigned desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}
inline unsigned atomicExch(unsigned *p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }

inline float __int_as_float(int v) { return qf_emu_unpack<float>(static_cast<uint32_t>(v)); }
inline float __uint_as_float(unsigned v) { return qf_emu_unpack<float>(v); }
inline int __float_as_int(float v) { return static_cast<int>(static_cast<uint32_t>(qf_emu_pack(v))); }
inline unsigned __float_as_uint(float v) { return static_cast<uint32_t>(qf_emu_pack(v)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline int __clz(unsigned v) { return v == 0 ? 32 : __builtin_clz(v); }
template <typename T>
inline T __ldg(const T *p) { return *p; }
using std::max;
using std::min;
