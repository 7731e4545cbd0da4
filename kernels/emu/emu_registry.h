// The table of kernels the emulator can launch by name, with each kernel's argument count and sizes taken
// from its C++ signature, so a Rust caller passing the wrong argument list gets an error instead of garbage.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace qf_emu {
struct KernelEntry {
    const char *name;
    void (*launch)(void **params);
    size_t arity;
    const size_t *sizes;
};

template <typename... A, size_t... I>
void call_unpacked(void (*k)(A...), void **p, std::index_sequence<I...>) {
    k(*static_cast<std::decay_t<A> *>(p[I])...);
}
template <typename... A>
void call_kernel(void (*k)(A...), void **p) {
    call_unpacked(k, p, std::index_sequence_for<A...>{});
}
template <auto K>
void adapter(void **p) {
    call_kernel(K, p);
}
template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}
template <typename... A>
const size_t *arg_sizes(void (*)(A...)) {
    static const size_t sizes[] = {sizeof(std::decay_t<A>)..., 0};
    return sizes;
}

extern const KernelEntry kKernels[];
extern const size_t kKernelCount;
}  // namespace qf_emu

#define QF_EMU_KERNEL(k) \
    qf_emu::KernelEntry { #k, &qf_emu::adapter<&k>, qf_emu::arity(&k), qf_emu::arg_sizes(&k) }
