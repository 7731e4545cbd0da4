//! The kernel sources, embedded at build time from `kernels/`, one NVRTC module per `.cu` file.
//! Our own `#include "..."` lines are inlined here (each header once, like `#pragma once`), so NVRTC gets a
//! single self-contained translation unit and needs no include path on a serving node.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use crate::error::{KernelError, Result};

/// One `.cu` file and the `extern "C"` kernels it defines.
#[derive(Debug)]
pub struct KernelModule {
    pub name: &'static str,
    /// Path under `kernels/`.
    pub path: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

macro_rules! kernel_file {
    ($path:literal) => {
        ($path, include_str!(concat!("../../../kernels/", $path)))
    };
}

/// Every file under `kernels/` that modules may include.
const FILES: &[(&str, &str)] =
    &[kernel_file!("common/qf_common.cuh"), kernel_file!("gemv/gemv_common.cuh"), kernel_file!("gemv/gemv_fp8.cu")];

fn file(path: &str) -> Result<&'static str> {
    FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, s)| *s)
        .ok_or_else(|| KernelError::Source(format!("{path} is not embedded (add it to sources::FILES)")))
}

macro_rules! module {
    ($name:literal, $path:literal, [$($k:literal),* $(,)?]) => {
        KernelModule { name: $name, path: $path, source: include_str!(concat!("../../../kernels/", $path)), kernels: &[$($k),*] }
    };
}

/// Every kernel module, in build order.
pub const MODULES: &[KernelModule] = &[
    module!(
        "gemv_fp8",
        "gemv/gemv_fp8.cu",
        ["gemv_fp8_f16_bt1", "gemv_fp8_f16_bt8", "gemv_fp8_bf16_bt1", "gemv_fp8_bf16_bt8"]
    ),
    module!(
        "gemv_int8",
        "gemv/gemv_int8.cu",
        ["gemv_int8_f16_bt1", "gemv_int8_f16_bt8", "gemv_int8_bf16_bt1", "gemv_int8_bf16_bt8"]
    ),
    module!(
        "gemv_int4",
        "gemv/gemv_int4.cu",
        ["gemv_int4_f16_bt1", "gemv_int4_f16_bt8", "gemv_int4_bf16_bt1", "gemv_int4_bf16_bt8"]
    ),
    module!(
        "gemv_half",
        "gemv/gemv_half.cu",
        [
            "gemv_f16w_f16_bt1",
            "gemv_f16w_f16_bt8",
            "gemv_f16w_bf16_bt1",
            "gemv_f16w_bf16_bt8",
            "gemv_bf16w_f16_bt1",
            "gemv_bf16w_f16_bt8",
            "gemv_bf16w_bf16_bt1",
            "gemv_bf16w_bf16_bt8"
        ]
    ),
    module!(
        "elementwise",
        "common/elementwise.cu",
        ["add_f16", "add_bf16", "swiglu_split_f16", "swiglu_split_bf16", "rope_table_f16", "rope_table_bf16"]
    ),
    module!(
        "attn_decode",
        "attention/attn_decode.cu",
        [
            "attn_decode_f16_d64",
            "attn_decode_f16_d128",
            "attn_decode_fp8_d64",
            "attn_decode_fp8_d128",
            "attn_decode_int4kivi_d64",
            "attn_decode_int4kivi_d128"
        ]
    ),
    module!("kv_append", "attention/kv_append.cu", ["kv_append_f16", "kv_append_fp8", "kv_append_kivi"]),
    module!("act_quant_fp8", "quant/act_quant_fp8.cu", ["act_quant_fp8_f16", "act_quant_fp8_bf16"]),
    module!(
        "layers",
        "common/layers.cu",
        [
            "rmsnorm_f16",
            "rmsnorm_bf16",
            "rope_f16",
            "rope_bf16",
            "swiglu_f16",
            "swiglu_bf16",
            "embedding_f16",
            "embedding_bf16"
        ]
    ),
    module!("sampling", "common/sampling.cu", ["sample_argmax_f32", "sample_softmax_f32", "sample_categorical_f32"]),
    module!(
        "selftest",
        "common/selftest.cu",
        ["selftest_block_reverse", "selftest_warp_ops", "selftest_atomics", "selftest_partial_shuffle"]
    ),
];

/// The module named `name`.
pub fn module(name: &str) -> Result<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name).ok_or_else(|| KernelError::UnknownModule(name.to_string()))
}

/// `dir/rel` with `.` and `..` resolved, as a path under `kernels/`.
fn join(dir: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for p in rel.split('/') {
        match p {
            "." | "" => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

fn inline(path: &str, text: &str, seen: &mut HashSet<String>, out: &mut String) -> Result<()> {
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("#include \"") {
            let rel = rest.split('"').next().unwrap_or_default();
            let target = join(dir, rel);
            if seen.insert(target.clone()) {
                out.push_str(&format!("// ---- {target}\n"));
                inline(&target, file(&target)?, seen, out)?;
            }
        } else if trimmed.starts_with("#include") {
            return Err(KernelError::Source(format!("{path}: `{trimmed}`: kernels may only include our own headers")));
        } else if trimmed != "#pragma once" {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

/// The module's source with every include inlined, ready for NVRTC.
pub fn nvrtc_source(m: &KernelModule) -> Result<String> {
    let mut out = String::new();
    inline(m.path, m.source, &mut HashSet::from([m.path.to_string()]), &mut out)?;
    Ok(out)
}

/// Hex SHA-256 of the inlined source: part of the PTX cache key, so an edited kernel is recompiled.
pub fn source_digest(m: &KernelModule) -> Result<String> {
    let digest = Sha256::digest(nvrtc_source(m)?.as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Kernel names are checked elsewhere: against the emulator's table (tests/registry.rs) and against
    // the compiled output (the NVRTC compile check), since macros assemble most of them.
    fn includes_are_inlined_once_and_paths_resolved() {
        assert_eq!(join("gemv", "../common/qf_common.cuh"), "common/qf_common.cuh");
        for m in MODULES {
            let src = nvrtc_source(m).unwrap();
            assert!(!src.contains("#include"), "{} still has an include", m.name);
            assert_eq!(src.matches("// ---- common/qf_common.cuh").count(), 1, "{}", m.name);
        }
    }
}
