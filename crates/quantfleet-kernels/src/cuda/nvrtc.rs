//! NVRTC compilation of one kernel module for one architecture, and the ptxas resource report
//! (registers, spills, shared memory) that the CI compile check prints.

use std::ffi::CString;

use cudarc::nvrtc::{result, sys};

use crate::error::{KernelError, Result};
use crate::sources::{self, KernelModule};

/// Options every compilation uses. No `--use_fast_math` / `--ftz`: the FP8 decode relies on f32 subnormals
/// and the softmax on accurate expf. `-lineinfo` costs nothing at run time and lets profilers map SASS to
/// source lines.
const BASE_OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// What NVRTC produced.
#[derive(Debug)]
pub struct CompileOutput {
    /// PTX text (for `compute_XY` targets) or None for `sm_XY` targets (which produce SASS only).
    pub ptx: Option<String>,
    /// The program log (ptxas `-v` output when requested).
    pub log: String,
}

/// Resources ptxas reported for one kernel on one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_bytes: u32,
    pub static_smem_bytes: u32,
}

fn nvrtc_present() -> Result<()> {
    // SAFETY: only probes for the shared library; no NVRTC symbol is called.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::NoNvrtc(
            "libnvrtc (13.x) was not found on the library path; install the NVIDIA CUDA NVRTC runtime".into(),
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_present()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both out-pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::NoNvrtc(format!("{e:?}")))?;
    Ok((major, minor))
}

fn c_text(v: Vec<std::ffi::c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `module` for `arch`: `compute_XY` gives PTX (what the runtime caches and the driver JITs),
/// `sm_XY` gives SASS and, with `ptxas_verbose`, the resource report in the log.
pub fn compile_module(module: &KernelModule, arch: &str, ptxas_verbose: bool) -> Result<CompileOutput> {
    nvrtc_present()?;
    let source = CString::new(sources::nvrtc_source(module)?).map_err(|e| KernelError::Source(e.to_string()))?;
    let name = CString::new(module.path).map_err(|e| KernelError::Source(e.to_string()))?;
    let fail = |log: String| KernelError::Compile { module: module.name.into(), arch: arch.into(), log };
    let prog = result::create_program(&source, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let mut options: Vec<String> = BASE_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    if ptxas_verbose {
        options.push("-Xptxas=-v".into());
    }
    // SAFETY: `prog` is live until destroy_program below; `source` and `name` outlive it.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }.map(c_text).unwrap_or_default();
    let out = match compiled {
        Err(_) => Err(fail(log)),
        Ok(()) if arch.starts_with("compute_") => unsafe { result::get_ptx(prog) }
            .map(|p| CompileOutput { ptx: Some(c_text(p)), log: log.clone() })
            .map_err(|e| fail(format!("{e:?}\n{log}"))),
        Ok(()) => Ok(CompileOutput { ptx: None, log }),
    };
    // SAFETY: created above and not yet destroyed.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn number_before(text: &str, unit: &str) -> Option<u32> {
    let i = text.find(unit)?;
    text[..i].split(|c: char| !c.is_ascii_digit()).rev().find(|s| !s.is_empty())?.parse().ok()
}

/// Parses ptxas `-v` output into one entry per kernel (`Function properties for X` blocks).
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(KernelResources {
                kernel: rest.trim().to_string(),
                registers: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                stack_bytes: 0,
                static_smem_bytes: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.static_smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n\
                   ptxas info    : Function properties for k1\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 40 registers, used 1 barriers, 132 bytes smem, 400 bytes cmem[0]\n\
                   ptxas info    : Function properties for k2\n\
                   \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 18 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let r = parse_ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].registers, r[0].spill_store_bytes, r[0].spill_load_bytes), (40, 4, 12));
        assert_eq!((r[0].stack_bytes, r[0].static_smem_bytes), (8, 132));
        assert_eq!((r[1].kernel.as_str(), r[1].registers, r[1].static_smem_bytes), ("k2", 18, 0));
    }
}
