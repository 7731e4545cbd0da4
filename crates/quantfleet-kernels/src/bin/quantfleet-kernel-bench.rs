//! GPU bandwidth benchmark of the decode-critical kernels: times each launch with CUDA events and prints
//! achieved bandwidth (bytes moved / time) against H100 HBM3's 3.35 TB/s. Needs a GPU, the driver and
//! libnvrtc 13.x; without a driver it prints the typed error and exits 1. Inputs are synthetic constants
//! (the kernels' speed does not depend on the values).
//!
//! Usage: quantfleet-kernel-bench [iterations, default 200]

use std::process::ExitCode;

use quantfleet_kernels::cuda::{CudaRunner, probe};
use quantfleet_kernels::ops::Act;
use quantfleet_kernels::ops::attention::{KvCache, PagedLayout, attn_decode};
use quantfleet_kernels::ops::gemv::{Fp8Scales, GemvShape, GemvWeights, gemv};
use quantfleet_kernels::{Launch, Result};

const HBM_BYTES_PER_S: f64 = 3.35e12;

fn report(runner: &CudaRunner, name: &str, launch: &Launch, bytes: f64, iters: u32) -> Result<()> {
    let ms = runner.time_launch(launch, iters)? as f64;
    let gbs = bytes / (ms * 1e-3) / 1e9;
    let bound_us = bytes / HBM_BYTES_PER_S * 1e6;
    println!(
        "{name:<44} {:>9.2} us {:>8.0} GB/s  ({:>5.1}% of 3.35 TB/s; bound {bound_us:.2} us)",
        ms * 1e3,
        gbs,
        gbs / 33.5
    );
    Ok(())
}

fn run(iters: u32) -> Result<()> {
    let info = probe(0)?;
    println!(
        "{} (sm_{}{}), {:.1} GiB",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.total_memory_bytes as f64 / (1u64 << 30) as f64
    );
    let cache = std::env::temp_dir().join("quantfleet-bench-ptx");
    let r = CudaRunner::new(0, &cache)?;
    for (n, k) in [(4096usize, 4096usize), (14336, 4096), (4096, 14336)] {
        for batch in [1usize, 8] {
            let shape = GemvShape { n, k, batch };
            let x = r.upload(&vec![0x3c; 2 * batch * k])?; // f16 ~1.0
            let y = r.alloc(2 * batch * n)?;
            let codes = r.upload(&vec![0x38; n * k])?; // E4M3 1.0 / int8 56
            let scales = r.upload(&vec![0; 4 * n * k.div_ceil(128)])?;
            let packed = r.upload(&vec![0x99; n * k.div_ceil(2)])?;
            let act_bytes = (2 * batch * (k + n)) as f64;
            let fp8 = gemv(
                GemvWeights::Fp8 { codes: &codes, scales: &scales, scaling: Fp8Scales::PerChannel },
                Act::F16,
                shape,
                &x,
                &y,
            )?;
            report(&r, &format!("gemv fp8  {n}x{k} batch {batch}"), &fp8, (n * k + 4 * n) as f64 + act_bytes, iters)?;
            let int8 = gemv(GemvWeights::Int8 { codes: &codes, scales: &scales }, Act::F16, shape, &x, &y)?;
            report(&r, &format!("gemv int8 {n}x{k} batch {batch}"), &int8, (n * k + 4 * n) as f64 + act_bytes, iters)?;
            let int4 = gemv(
                GemvWeights::Int4 { packed: &packed, scales: &scales, zeros: None, group_size: 128 },
                Act::F16,
                shape,
                &x,
                &y,
            )?;
            let int4_bytes = (n * k / 2 + 4 * n * k.div_ceil(128)) as f64 + act_bytes;
            report(&r, &format!("gemv int4 g128 {n}x{k} batch {batch}"), &int4, int4_bytes, iters)?;
        }
    }
    // Decode attention, 8 kv heads x 32 query heads, D 128, 16-token blocks, 32 sequences of 4096 tokens.
    let (batch, len, block) = (32usize, 4096usize, 16usize);
    let layout = PagedLayout {
        batch,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        block_size: block,
        num_blocks: batch * len / block,
        max_blocks: len / block,
    };
    let table: Vec<u8> = (0..(batch * len / block) as i32).flat_map(|b| b.to_le_bytes()).collect();
    let table = r.upload(&table)?;
    let lens = r.upload(&(0..batch).flat_map(|_| (len as i32).to_le_bytes()).collect::<Vec<u8>>())?;
    let q = r.upload(&vec![0x3c; 2 * batch * 32 * 128])?;
    let out = r.alloc(2 * batch * 32 * 128)?;
    let tokens = layout.num_blocks * 8 * block;
    let (k16, v16) = (r.upload(&vec![0; 2 * tokens * 128])?, r.upload(&vec![0; 2 * tokens * 128])?);
    let f16 = attn_decode(KvCache::F16 { k: &k16, v: &v16 }, layout, &q, &out, &table, &lens, 0.088)?;
    report(&r, &format!("attn f16 kv, {batch} x {len} tokens"), &f16, (2 * tokens * 128 * 2) as f64, iters.min(50))?;
    let (k8, v8) = (r.upload(&vec![0x38; tokens * 128])?, r.upload(&vec![0x38; tokens * 128])?);
    let (ks, vs) = (r.upload(&vec![0; 4 * tokens])?, r.upload(&vec![0; 4 * tokens])?);
    let fp8 = attn_decode(
        KvCache::Fp8 { k: &k8, v: &v8, k_scale: &ks, v_scale: &vs },
        layout,
        &q,
        &out,
        &table,
        &lens,
        0.088,
    )?;
    report(&r, &format!("attn fp8 kv, {batch} x {len} tokens"), &fp8, (2 * tokens * (128 + 4)) as f64, iters.min(50))?;
    r.synchronize()
}

fn main() -> ExitCode {
    let iters = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    match run(iters) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
