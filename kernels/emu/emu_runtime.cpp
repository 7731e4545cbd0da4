// The fiber scheduler behind cuda_emu.h: runs a kernel's blocks one after another, each block's threads as
// fibers, and implements __syncthreads and the warp collectives by parking fibers until their peers
// arrive. Errors (unknown kernel, wrong argument sizes, divergent collectives, deadlocks) are returned to
// Rust as a message, never by aborting the process.
#include <ucontext.h>

#include <cstdint>

#include <memory>
#include <string>
#include <vector>

#include "emu_registry.h"

// Fiber context switches. glibc's swapcontext makes a sigprocmask system call on every switch, and a
// full-size launch (an LM head of 49152 rows is 1.5 M threads, each parking at every warp shuffle) switches
// tens of millions of times; on x86-64 a switch is instead six callee-saved registers and the stack pointer
// (the System V ABI's preserved state besides the FP control words, which kernels never change).
#if defined(__x86_64__)
extern "C" void qf_emu_switch(void **save_sp, void *load_sp);
asm(R"(
    .text
    .globl qf_emu_switch
    .type qf_emu_switch, @function
qf_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size qf_emu_switch, .-qf_emu_switch
)");
struct Context {
    void *sp = nullptr;
};
inline void ctx_switch(Context &save, Context &load) { qf_emu_switch(&save.sp, load.sp); }
// A context that starts `entry` on `stack` (which must never return).
inline void ctx_make(Context &c, char *stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    auto *slot = reinterpret_cast<void **>(top);
    *--slot = nullptr;                                // fake return address: entry sees a call-aligned stack
    *--slot = reinterpret_cast<void *>(entry);        // where qf_emu_switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--slot = nullptr;    // rbp, rbx, r12-r15
    c.sp = slot;
}
#else
struct Context {
    ucontext_t uc;
};
inline void ctx_switch(Context &save, Context &load) { swapcontext(&save.uc, &load.uc); }
inline void ctx_make(Context &c, char *stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

namespace qf_emu {
thread_local ThreadCoords g_coords;

namespace {
constexpr size_t kStackBytes = 64 * 1024;  // kernels keep a few dozen scalars per thread; this is ample

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
    Context ctx;
    State state = State::Runnable;
    uint64_t result = 0;  // payload handed back by the last warp collective
    dim3 idx;
};

struct WarpSlot {
    unsigned arrived = 0;
    unsigned mask = 0;
    WarpOp op = WarpOp::Idx;
    int width = 32;
    uint64_t in[32] = {};
    int arg[32] = {};
};

struct Block {
    Context sched;
    std::vector<Fiber> fibers;
    std::vector<WarpSlot> warps;
    size_t current = 0;
    void (*entry)(void **) = nullptr;
    void **params = nullptr;
    std::string error;
};

thread_local Block *g_block = nullptr;
thread_local std::unique_ptr<char[]> g_stacks;
thread_local size_t g_stack_fibers = 0;
thread_local std::vector<unsigned char> g_dyn_smem;

void park(State s) {
    Block *b = g_block;
    Fiber &f = b->fibers[b->current];
    f.state = s;
    ctx_switch(f.ctx, b->sched);
}

// A fiber's whole life: the kernel body, then back to the scheduler for good (it is never resumed).
void fiber_main() {
    Block *b = g_block;
    b->entry(b->params);
    for (;;) park(State::Done);
}

[[noreturn]] void fail(std::string msg) {
    Block *b = g_block;
    if (b->error.empty()) b->error = std::move(msg);
    for (;;) park(State::Done);  // the scheduler abandons the block and never resumes this fiber
}

const char *op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Idx: return "__shfl_sync";
        case WarpOp::Xor: return "__shfl_xor_sync";
        case WarpOp::Down: return "__shfl_down_sync";
        case WarpOp::Up: return "__shfl_up_sync";
        case WarpOp::Ballot: return "__ballot_sync/__syncwarp";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
    }
    return "?";
}

// Computes every participating lane's result once the whole mask has arrived.
void resolve(Block *b, size_t warp, WarpSlot &w) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
        if ((w.mask >> l & 1u) && w.in[l]) bits |= 1u << l;
    for (int l = 0; l < 32; ++l) {
        if (!(w.mask >> l & 1u)) continue;
        const int seg = l & ~(w.width - 1), pos = l & (w.width - 1);
        int src = l;
        switch (w.op) {
            case WarpOp::Idx: src = seg + (w.arg[l] & (w.width - 1)); break;
            case WarpOp::Xor: src = l ^ w.arg[l]; break;
            case WarpOp::Down: src = pos + w.arg[l] < w.width ? l + w.arg[l] : l; break;
            case WarpOp::Up: src = pos >= w.arg[l] ? l - w.arg[l] : l; break;
            default: break;
        }
        uint64_t out = 0;
        switch (w.op) {
            case WarpOp::Ballot: out = bits; break;
            case WarpOp::Any: out = bits != 0; break;
            case WarpOp::All: out = bits == w.mask; break;
            default:
                if (src < 0 || src > 31 || !(w.mask >> src & 1u))
                    fail("warp " + std::to_string(warp) + ": " + op_name(w.op) + " lane " + std::to_string(l) +
                         " reads lane " + std::to_string(src) + ", which is not in the mask");
                out = w.in[src];
        }
        Fiber &f = b->fibers[warp * 32 + l];
        f.result = out;
        if (f.state == State::AtWarp) f.state = State::Runnable;
    }
    w.arrived = 0;
}
}  // namespace

void sync_threads() { park(State::AtBarrier); }

unsigned lane_id() { return static_cast<unsigned>(g_block->current % 32); }

unsigned char *dynamic_smem() { return g_dyn_smem.data(); }

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
    Block *b = g_block;
    const size_t linear = b->current, warp = linear / 32;
    const unsigned lane = static_cast<unsigned>(linear % 32);
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail(std::string(op_name(op)) + ": width " + std::to_string(width) + " is not a power of two <= 32");
    if (!(mask >> lane & 1u))
        fail(std::string(op_name(op)) + ": lane " + std::to_string(lane) + " is not in its own mask");
    const size_t lanes_in_warp = std::min<size_t>(32, b->fibers.size() - warp * 32);
    if (lanes_in_warp < 32 && (mask >> lanes_in_warp) != 0)
        fail(std::string(op_name(op)) + ": mask names lanes beyond the block's last thread");
    WarpSlot &w = b->warps[warp];
    if (w.arrived == 0) {
        w.mask = mask;
        w.op = op;
        w.width = width;
    } else if (w.mask != mask || w.op != op || w.width != width) {
        fail("warp " + std::to_string(warp) + ": divergent collectives (" + op_name(w.op) + " vs " + op_name(op) +
             ", or different masks/widths) are not supported");
    }
    w.in[lane] = value;
    w.arg[lane] = arg;
    w.arrived |= 1u << lane;
    if (w.arrived == w.mask) {
        resolve(b, warp, w);
        return b->fibers[linear].result;
    }
    park(State::AtWarp);
    return b->fibers[linear].result;
}

namespace {
// Runs one block to completion; returns an empty string or the error.
std::string run_block(Block &b, dim3 block_idx, dim3 grid, dim3 bdim, size_t smem) {
    const size_t n = b.fibers.size();
    std::fill(g_dyn_smem.begin(), g_dyn_smem.begin() + smem, 0xFF);
    for (auto &w : b.warps) w = WarpSlot{};
    for (size_t i = 0; i < n; ++i) {
        Fiber &f = b.fibers[i];
        f.state = State::Runnable;
        f.result = 0;
        f.idx = dim3(static_cast<unsigned>(i % bdim.x), static_cast<unsigned>(i / bdim.x % bdim.y),
                     static_cast<unsigned>(i / (bdim.x * bdim.y)));
        ctx_make(f.ctx, g_stacks.get() + i * kStackBytes, kStackBytes, fiber_main);
    }
    for (;;) {
        bool ran = false;
        for (size_t i = 0; i < n; ++i) {
            if (b.fibers[i].state != State::Runnable) continue;
            ran = true;
            b.current = i;
            g_coords = ThreadCoords{b.fibers[i].idx, block_idx, bdim, grid};
            ctx_switch(b.sched, b.fibers[i].ctx);
            if (!b.error.empty()) return b.error;
        }
        if (ran) continue;
        size_t live = 0, at_barrier = 0;
        for (auto &f : b.fibers) {
            live += f.state != State::Done;
            at_barrier += f.state == State::AtBarrier;
        }
        if (live == 0) return {};
        if (at_barrier == live) {
            for (auto &f : b.fibers)
                if (f.state == State::AtBarrier) f.state = State::Runnable;
            continue;
        }
        for (size_t wi = 0; wi < b.warps.size(); ++wi)
            if (b.warps[wi].arrived)
                return "deadlock: warp " + std::to_string(wi) + " waits in " + op_name(b.warps[wi].op) +
                       " for lanes that exited or wait at __syncthreads";
        return "deadlock: threads wait at __syncthreads while others wait in a warp collective";
    }
}
}  // namespace
}  // namespace qf_emu

extern "C" {
size_t qf_emu_kernel_count() { return qf_emu::kKernelCount; }
const char *qf_emu_kernel_name(size_t i) { return i < qf_emu::kKernelCount ? qf_emu::kKernels[i].name : nullptr; }

// Launches `name` over grid x block with `smem` bytes of dynamic shared memory. `params[i]` points at the
// i-th argument's bytes and `sizes[i]` is its size, checked against the kernel's signature. Returns 0, or
// 1 with a NUL-terminated message in `err`.
int qf_emu_launch(const char *name, const unsigned grid[3], const unsigned block[3], size_t smem, void **params,
                  const size_t *sizes, size_t nparams, char *err, size_t err_len) {
    using namespace qf_emu;
    auto report = [&](const std::string &msg) {
        if (err_len > 0) {
            const size_t k = std::min(msg.size(), err_len - 1);
            std::memcpy(err, msg.data(), k);
            err[k] = 0;
        }
        return 1;
    };
    const KernelEntry *k = nullptr;
    for (size_t i = 0; i < kKernelCount; ++i)
        if (std::strcmp(kKernels[i].name, name) == 0) k = &kKernels[i];
    if (!k) return report(std::string("unknown kernel ") + name);
    if (nparams != k->arity)
        return report(std::string(name) + " takes " + std::to_string(k->arity) + " arguments, got " +
                      std::to_string(nparams));
    for (size_t i = 0; i < nparams; ++i)
        if (sizes[i] != k->sizes[i])
            return report(std::string(name) + ": argument " + std::to_string(i) + " has " +
                          std::to_string(sizes[i]) + " bytes, the kernel expects " + std::to_string(k->sizes[i]));
    const dim3 g(grid[0], grid[1], grid[2]), bd(block[0], block[1], block[2]);
    const size_t threads = size_t(bd.x) * bd.y * bd.z;
    if (threads == 0 || threads > 1024 || bd.z > 64) return report("block must have 1..=1024 threads, z <= 64");
    if (g.x == 0 || g.y == 0 || g.y > 65535 || g.z == 0 || g.z > 65535) return report("grid dimension out of range");
    if (smem > 227 * 1024) return report("dynamic shared memory above 227 KiB (the H100 limit)");
    if (g_stack_fibers < threads) {
        g_stacks.reset(new char[threads * kStackBytes]);
        g_stack_fibers = threads;
    }
    if (g_dyn_smem.size() < smem) g_dyn_smem.resize(smem);
    Block b;
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.entry = k->launch;
    b.params = params;
    Block *saved = g_block;
    g_block = &b;
    std::string error;
    for (unsigned z = 0; z < g.z && error.empty(); ++z)
        for (unsigned y = 0; y < g.y && error.empty(); ++y)
            for (unsigned x = 0; x < g.x && error.empty(); ++x) {
                error = run_block(b, dim3(x, y, z), g, bd, smem);
                if (!error.empty())
                    error = std::string(name) + " block (" + std::to_string(x) + "," + std::to_string(y) + "," +
                            std::to_string(z) + "): " + error;
            }
    g_block = saved;
    return error.empty() ? 0 : report(error);
}
}
