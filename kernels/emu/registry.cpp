// Every kernel the emulator can launch, by the same extern "C" name NVRTC gives it. The Rust test
// `every_kernel_is_registered_and_compiled` checks this table against the module list in
// crates/quantfleet-kernels/src/sources.rs, so a kernel cannot be added to one and forgotten in the other.
#include "emu_registry.h"

#include "../attention/attn_decode.cu"
#include "../attention/kv_append.cu"
#include "../common/elementwise.cu"
#include "../common/layers.cu"
#include "../common/sampling.cu"
#include "../common/selftest.cu"
#include "../gemv/gemv_fp8.cu"
#include "../gemv/gemv_half.cu"
#include "../gemv/gemv_int4.cu"
#include "../gemv/gemv_int8.cu"
#include "../quant/act_quant_fp8.cu"

namespace qf_emu {
const KernelEntry kKernels[] = {
    QF_EMU_KERNEL(selftest_block_reverse),
    QF_EMU_KERNEL(selftest_warp_ops),
    QF_EMU_KERNEL(selftest_atomics),
    QF_EMU_KERNEL(selftest_partial_shuffle),
    QF_EMU_KERNEL(act_quant_fp8_f16),
    QF_EMU_KERNEL(act_quant_fp8_bf16),
    QF_EMU_KERNEL(rmsnorm_f16),
    QF_EMU_KERNEL(rope_f16),
    QF_EMU_KERNEL(swiglu_f16),
    QF_EMU_KERNEL(embedding_f16),
    QF_EMU_KERNEL(rmsnorm_bf16),
    QF_EMU_KERNEL(rope_bf16),
    QF_EMU_KERNEL(swiglu_bf16),
    QF_EMU_KERNEL(embedding_bf16),
    QF_EMU_KERNEL(sample_argmax_f32),
    QF_EMU_KERNEL(sample_softmax_f32),
    QF_EMU_KERNEL(sample_categorical_f32),
    QF_EMU_KERNEL(attn_decode_f16_d64),
    QF_EMU_KERNEL(attn_decode_f16_d128),
    QF_EMU_KERNEL(attn_decode_fp8_d64),
    QF_EMU_KERNEL(attn_decode_fp8_d128),
    QF_EMU_KERNEL(attn_decode_int4kivi_d64),
    QF_EMU_KERNEL(attn_decode_int4kivi_d128),
    QF_EMU_KERNEL(kv_append_f16),
    QF_EMU_KERNEL(kv_append_fp8),
    QF_EMU_KERNEL(kv_append_kivi),
    QF_EMU_KERNEL(gemv_fp8_f16_bt1),
    QF_EMU_KERNEL(gemv_fp8_f16_bt8),
    QF_EMU_KERNEL(gemv_fp8_bf16_bt1),
    QF_EMU_KERNEL(gemv_fp8_bf16_bt8),
    QF_EMU_KERNEL(gemv_int8_f16_bt1),
    QF_EMU_KERNEL(gemv_int8_f16_bt8),
    QF_EMU_KERNEL(gemv_int8_bf16_bt1),
    QF_EMU_KERNEL(gemv_int8_bf16_bt8),
    QF_EMU_KERNEL(gemv_int4_f16_bt1),
    QF_EMU_KERNEL(gemv_int4_f16_bt8),
    QF_EMU_KERNEL(gemv_int4_bf16_bt1),
    QF_EMU_KERNEL(gemv_int4_bf16_bt8),
    QF_EMU_KERNEL(add_f16),
    QF_EMU_KERNEL(swiglu_split_f16),
    QF_EMU_KERNEL(rope_table_f16),
    QF_EMU_KERNEL(add_bf16),
    QF_EMU_KERNEL(swiglu_split_bf16),
    QF_EMU_KERNEL(rope_table_bf16),
    QF_EMU_KERNEL(gemv_f16w_f16_bt1),
    QF_EMU_KERNEL(gemv_f16w_f16_bt8),
    QF_EMU_KERNEL(gemv_f16w_bf16_bt1),
    QF_EMU_KERNEL(gemv_f16w_bf16_bt8),
    QF_EMU_KERNEL(gemv_bf16w_f16_bt1),
    QF_EMU_KERNEL(gemv_bf16w_f16_bt8),
    QF_EMU_KERNEL(gemv_bf16w_bf16_bt1),
    QF_EMU_KERNEL(gemv_bf16w_bf16_bt8),
};
const size_t kKernelCount = sizeof(kKernels) / sizeof(kKernels[0]);
}  // namespace qf_emu
