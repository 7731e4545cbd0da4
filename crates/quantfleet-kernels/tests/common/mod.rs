//! Shared helpers for the emulated kernel tests: synthetic inputs (seeded, labelled synthetic), 16-bit
//! float conversions through the `half` crate, and comparison against f64 references with per-dtype budgets.
#![allow(dead_code)]

use half::{bf16, f16};
use quantfleet_kernels::Device;
use quantfleet_kernels::ops::Act;
use quantfleet_quant::synthetic::SynthRng;

/// Synthetic normal(0, std) values from a fixed seed.
pub fn synthetic(seed: u64, n: usize, std: f32) -> Vec<f32> {
    SynthRng::new(seed).normal_vec(n, std)
}

/// Values rounded to `act` (what the kernel actually sees) and their bytes.
pub fn to_act(act: Act, v: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let mut bytes = Vec::with_capacity(v.len() * 2);
    let rounded = v
        .iter()
        .map(|&x| {
            let (r, b) = match act {
                Act::F16 => (f16::from_f32(x).to_f32(), f16::from_f32(x).to_bits()),
                Act::Bf16 => (bf16::from_f32(x).to_f32(), bf16::from_f32(x).to_bits()),
            };
            bytes.extend_from_slice(&b.to_le_bytes());
            r
        })
        .collect();
    (rounded, bytes)
}

pub fn from_act(act: Act, bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| {
            let bits = u16::from_le_bytes([c[0], c[1]]);
            match act {
                Act::F16 => f16::from_bits(bits).to_f32(),
                Act::Bf16 => bf16::from_bits(bits).to_f32(),
            }
        })
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Half an ulp of the output format, relative.
pub fn out_eps(act: Act) -> f64 {
    match act {
        Act::F16 => 2f64.powi(-11),
        Act::Bf16 => 2f64.powi(-8),
    }
}

/// Checks `got` against `want` element by element: |got - want| <= rel * |want| + abs[i].
/// `abs` carries the accumulation budget of each element (e.g. k * 2^-23 * sum |x w|).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, abs: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f64);
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        let budget = rel * want[i].abs() + abs[i];
        assert!(
            err <= budget,
            "{what}: element {i}: got {}, want {}, error {err:e} > budget {budget:e}",
            got[i],
            want[i]
        );
        if budget > 0.0 && err / budget > worst.1 {
            worst = (i, err / budget);
        }
    }
    eprintln!("{what}: worst error at {} is {:.2} of its budget", worst.0, worst.1);
}

/// A GPU device for the `cuda` variants of the device tests (those are `#[ignore]`d: run them with
/// `cargo test -p quantfleet-kernels --features cuda -- --ignored` on a GPU host).
#[cfg(feature = "cuda")]
pub fn gpu() -> quantfleet_kernels::cuda::CudaRunner {
    let cache = std::env::temp_dir().join("quantfleet-test-ptx");
    quantfleet_kernels::cuda::CudaRunner::new(0, &cache).expect("the cuda test variants need an NVIDIA GPU")
}

/// Runs each listed `fn name<D: Device>(dev: &D)` once per device: `emu::name` on the CPU emulator in
/// every test run, `cuda::name` on a GPU (ignored unless asked for, since CI has no GPU).
#[macro_export]
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {
        mod emu {
            $(#[test]
            fn $name() {
                super::$name(&quantfleet_kernels::emu::EmuRunner);
            })*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(#[test]
            #[ignore = "needs an NVIDIA GPU: cargo test -p quantfleet-kernels --features cuda -- --ignored"]
            fn $name() {
                super::$name(&$crate::common::gpu());
            })*
        }
    };
}

/// Uploads `data` (tests treat device errors as failures).
pub fn up<D: Device>(dev: &D, data: &[u8]) -> D::Buffer {
    dev.upload(data).expect("upload")
}

/// A poisoned output buffer.
pub fn out<D: Device>(dev: &D, len: usize) -> D::Buffer {
    dev.poisoned(len).expect("alloc")
}

/// Contents of `buf` after checking its guard zones.
pub fn fetch<D: Device>(dev: &D, buf: &D::Buffer, name: &str) -> Vec<u8> {
    dev.check_guards(buf, name).expect("guard zones intact");
    dev.download(buf).expect("download")
}

/// Runs one launch.
pub fn run<D: Device>(dev: &D, launch: quantfleet_kernels::Launch) {
    dev.run(&launch).unwrap_or_else(|e| panic!("{} launch of {}: {e}", dev.name(), launch.kernel));
}
