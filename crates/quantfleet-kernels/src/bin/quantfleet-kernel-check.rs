//! CI compile check: compiles every kernel module through NVRTC for each target architecture (SASS with
//! ptxas -v for the resource report, and PTX as the runtime path caches it), prints registers, spills,
//! stack and static shared memory per kernel and architecture, and exits non-zero when a module fails to
//! compile, a declared kernel is missing from the output, or a kernel spills without a justification below.
//!
//! Usage: quantfleet-kernel-check [sm_80,sm_89,sm_90]   (needs libnvrtc 13.x on LD_LIBRARY_PATH;
//! scripts/cuda-compile-check.sh installs it from PyPI and runs this).

use std::process::ExitCode;

use quantfleet_kernels::cuda::{compile_module, nvrtc_version, parse_ptxas_report};
use quantfleet_kernels::sources::MODULES;

/// Kernels allowed to spill, with the reason. Empty: no kernel spills today.
const JUSTIFIED_SPILLS: &[(&str, &str)] = &[];

fn main() -> ExitCode {
    let archs: Vec<String> =
        std::env::args().nth(1).unwrap_or_else(|| "sm_80,sm_89,sm_90".into()).split(',').map(str::to_string).collect();
    match nvrtc_version() {
        Ok((major, minor)) => println!("NVRTC {major}.{minor}; targets {}", archs.join(", ")),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut failures = Vec::new();
    println!(
        "{:<28} {:<6} {:>5} {:>11} {:>10} {:>6} {:>6}",
        "kernel", "arch", "regs", "spill st/ld", "stack", "smem", ""
    );
    for module in MODULES {
        for arch in &archs {
            let compute = arch.replace("sm_", "compute_");
            if let Err(e) = compile_module(module, &compute, false) {
                failures.push(format!("{e}"));
                continue;
            }
            let out = match compile_module(module, arch, true) {
                Ok(out) => out,
                Err(e) => {
                    failures.push(format!("{e}"));
                    continue;
                }
            };
            let report = parse_ptxas_report(&out.log);
            for kernel in module.kernels {
                let Some(r) = report.iter().find(|r| r.kernel == *kernel) else {
                    failures.push(format!("{arch}: {kernel} declared in sources.rs but absent from the ptxas report"));
                    continue;
                };
                let spills = r.spill_store_bytes + r.spill_load_bytes;
                let justified = JUSTIFIED_SPILLS.iter().find(|(k, _)| k == kernel);
                let note = match (spills, justified) {
                    (0, _) => "",
                    (_, Some(_)) => "spills (justified)",
                    (_, None) => {
                        failures.push(format!("{arch}: {kernel} spills {spills} bytes without a justification"));
                        "SPILLS"
                    }
                };
                println!(
                    "{:<28} {:<6} {:>5} {:>5}/{:<5} {:>10} {:>6} {note}",
                    kernel,
                    arch,
                    r.registers,
                    r.spill_store_bytes,
                    r.spill_load_bytes,
                    r.stack_bytes,
                    r.static_smem_bytes
                );
            }
        }
    }
    for (k, why) in JUSTIFIED_SPILLS {
        println!("justified spill: {k}: {why}");
    }
    if failures.is_empty() {
        println!("all {} modules compiled for {}", MODULES.len(), archs.join(", "));
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}
