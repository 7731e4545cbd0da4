//! Timing binary for quantfleet-quant: `cargo bench -p quantfleet-quant` (release profile, std::time).
//!
//! 1. Encode/decode throughput of every format on ONE core, in elements per second, for the widest ISA this
//!    CPU has and for the portable fallback (the 1 G elements/s targets are FP8 and INT4-RTN on AVX-512/AVX2).
//! 2. AWQ and GPTQ time per layer at SmolLM2-135M's shapes (q/k/v/o 576-wide, gate/up 576->1536,
//!    down 1536->576; 30 blocks = 210 linears), on SYNTHETIC weights and activations (timing does not depend on
//!    the values), then all 210 layers on 2 threads unless `--quick` is given. AWQ searches q/k/v and gate/up
//!    as shared-input groups, as a real run must.
//!
//! Flags: `--quick` skips the 210-layer runs; `--tokens N` sets calibration tokens (default 512).

use std::hint::black_box;
use std::time::{Duration, Instant};

use quantfleet_quant::awq::{AwqConfig, awq_shared_input};
use quantfleet_quant::fp4_matrix::quantize_fp4;
use quantfleet_quant::fp8::{decode_fp8_slice_isa, encode_fp8_slice_isa};
use quantfleet_quant::gptq::{GptqConfig, gptq_with_hessian, layer_hessian};
use quantfleet_quant::int4::quantize_int4_isa;
use quantfleet_quant::synthetic::{SynthRng, synthetic_layer};
use quantfleet_quant::*;

/// Best throughput of `f` over repeated runs lasting at least ~0.4 s in total.
fn rate(elements: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up (page faults, caches)
    let mut best = Duration::MAX;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < Duration::from_millis(400) && runs < 200) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    elements as f64 / best.as_secs_f64()
}

fn print_rate(name: &str, isa: Isa, r: f64) {
    println!("{name:<38} {:<8} {:>8.3} G elements/s", format!("{isa:?}"), r / 1e9);
}

fn formats() {
    // 4 Mi elements (16 MiB of f32): large enough to leave L2, small enough to sit in this CPU's L3.
    let (rows, cols) = (1024, 4096);
    let n = rows * cols;
    let mut rng = SynthRng::new(1);
    let data = rng.normal_vec(n, 0.05);
    let w = MatrixRef::new("bench", &data, rows, cols).unwrap();
    let mut codes = vec![0u8; n];
    let mut out = vec![0f32; n];
    let best = Isa::detect();
    println!("== format throughput, one core, {rows} x {cols} f32 (best ISA detected: {best:?})");
    for isa in [best, Isa::Scalar] {
        for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let r = rate(n, || {
                encode_fp8_slice_isa(isa, format, Saturation::Saturating, black_box(&data), 20.0, &mut codes).unwrap()
            });
            print_rate(&format!("{format:?} encode (scaled, saturating)"), isa, r);
            let r = rate(n, || decode_fp8_slice_isa(isa, format, black_box(&codes), 0.05, &mut out).unwrap());
            print_rate(&format!("{format:?} decode (scaled)"), isa, r);
        }
        for (label, config) in
            [("INT4 RTN sym g128", Int4Config::symmetric(128)), ("INT4 RTN asym g128", Int4Config::asymmetric(128))]
        {
            let config = config.unwrap();
            let r = rate(n, || {
                black_box(quantize_int4_isa(isa, &w, &config).unwrap());
            });
            print_rate(&format!("{label} encode (incl. scales)"), isa, r);
            let q = quantize_int4_isa(isa, &w, &config).unwrap();
            let r = rate(n, || {
                for (row, o) in out.chunks_mut(cols).enumerate() {
                    q.dequantize_row_isa(isa, row, o).unwrap();
                }
            });
            print_rate(&format!("{label} decode"), isa, r);
        }
    }
    let r = rate(n, || {
        black_box(quantize_rtn(&w, &WeightFormat::Int8).unwrap());
    });
    print_rate("INT8 per-channel encode", best, r);
    let q8 = quantize_rtn(&w, &WeightFormat::Int8).unwrap();
    let r = rate(n, || {
        for (row, o) in out.chunks_mut(cols).enumerate() {
            q8.dequantize_row(row, o).unwrap();
        }
    });
    print_rate("INT8 per-channel decode", best, r);
    for kind in [Fp4Kind::Nvfp4, Fp4Kind::Mxfp4] {
        let r = rate(n, || {
            black_box(quantize_fp4(&w, kind).unwrap());
        });
        print_rate(&format!("{kind:?} encode"), best, r);
        let q = quantize_fp4(&w, kind).unwrap();
        let r = rate(n, || {
            for (row, o) in out.chunks_mut(cols).enumerate() {
                q.dequantize_row(row, o).unwrap();
            }
        });
        print_rate(&format!("{kind:?} decode"), best, r);
    }
    for (label, format) in [("BF16", WeightFormat::Bf16), ("FP16", WeightFormat::F16)] {
        let r = rate(n, || {
            black_box(quantize_rtn(&w, &format).unwrap());
        });
        print_rate(&format!("{label} encode (half crate)"), best, r);
    }
}

/// SmolLM2-135M's linear shapes in one transformer block: (name, out, in).
const BLOCK: [(&str, usize, usize); 7] = [
    ("q_proj", 576, 576),
    ("k_proj", 192, 576),
    ("v_proj", 192, 576),
    ("o_proj", 576, 576),
    ("gate_proj", 1536, 576),
    ("up_proj", 1536, 576),
    ("down_proj", 576, 1536),
];

/// Linears that read the same input share one AWQ search (their scales fold into one norm gain), as in a
/// real run: indices into BLOCK.
const INPUT_GROUPS: [&[usize]; 4] = [&[0, 1, 2], &[3], &[4, 5], &[6]];

/// SYNTHETIC weights of one input group and their shared activations.
struct GroupData {
    weights: Vec<(Vec<f32>, usize)>,
    activations: Vec<f32>,
    inf: usize,
    tokens: usize,
}

fn group_data(group: &[usize], tokens: usize, seed: u64) -> GroupData {
    let inf = BLOCK[group[0]].2;
    let first = synthetic_layer(BLOCK[group[0]].1, inf, tokens, 8, 20.0, seed);
    let mut rng = SynthRng::new(seed + 1);
    let mut weights = vec![(first.weight, BLOCK[group[0]].1)];
    for &i in &group[1..] {
        weights.push((rng.normal_vec(BLOCK[i].1 * inf, 0.02), BLOCK[i].1));
    }
    GroupData { weights, activations: first.activations, inf, tokens }
}

/// Quantize one input group with `method`; returns the seconds spent in the quantizer.
fn run_group(method: &str, d: &GroupData) -> f64 {
    let x = MatrixRef::new("x", &d.activations, d.tokens, d.inf).unwrap();
    let ws: Vec<MatrixRef<'_>> =
        d.weights.iter().map(|(w, rows)| MatrixRef::new("w", w, *rows, d.inf).unwrap()).collect();
    let format = WeightFormat::Int4(Int4Config::symmetric(128).unwrap());
    let t = Instant::now();
    match method {
        "AWQ" => {
            black_box(awq_shared_input(&ws, &x, &AwqConfig::new(format)).unwrap());
        }
        _ => {
            let config = GptqConfig { max_tokens: d.tokens, act_order: true, ..GptqConfig::new(format) };
            // One Hessian per shared input, as a real run would build it.
            let h = layer_hessian(&x);
            for w in &ws {
                black_box(gptq_with_hessian(w, h.clone(), &config).unwrap());
            }
        }
    }
    t.elapsed().as_secs_f64()
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat (Linux; USER_HZ is 100 there).
/// Beside wall time it shows how much of the machine the run actually got when other work competes.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 overall.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn algorithms(tokens: usize, full: bool) {
    let (n, out, inf) = (128, 1536, 576);
    let mut rng = SynthRng::new(3);
    let (x, w) = (rng.normal_vec(n * inf, 1.0), rng.normal_vec(out * inf, 1.0));
    let r = rate(n * out * inf, || {
        black_box(quantfleet_quant::matrix::matmul_xwt(&x, n, &w, out, inf));
    });
    println!(
        "\n== search kernel: x W^T [{n} x {inf}] x [{out} x {inf}]^T: {:.2} G multiply-adds/s (one core)",
        r / 1e9
    );
    println!(
        "\n== AWQ (shared-input groups) / GPTQ (act-order), INT4 sym g128, one core, SYNTHETIC data at SmolLM2-135M shapes, {tokens} calibration tokens"
    );
    let data: Vec<GroupData> =
        INPUT_GROUPS.iter().enumerate().map(|(gi, g)| group_data(g, tokens, (gi * 10) as u64)).collect();
    for method in ["AWQ", "GPTQ"] {
        let mut block = 0.0;
        for (gi, group) in INPUT_GROUPS.iter().enumerate() {
            let s = run_group(method, &data[gi]);
            block += s;
            let names: Vec<String> =
                group.iter().map(|&i| format!("{} [{} x {}]", BLOCK[i].0, BLOCK[i].1, BLOCK[i].2)).collect();
            println!("{method:<5} {:<58} {:>8.3} s", names.join(" + "), s);
        }
        println!("{method:<5} one block (7 linears): {block:.3} s; 30 blocks on 1 core ~ {:.1} s", block * 30.0);
    }
    if !full {
        return;
    }
    println!(
        "\n== all 210 linears at SmolLM2-135M's shapes on 2 threads (group-parallel; the 4 groups' data reused by all 30 blocks)"
    );
    for method in ["AWQ", "GPTQ"] {
        let jobs: Vec<usize> = (0..30).flat_map(|_| 0..INPUT_GROUPS.len()).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let busy = std::sync::Mutex::new(0.0f64);
        let cpu0 = process_cpu_seconds();
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    loop {
                        let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&g) = jobs.get(j) else { break };
                        let secs = run_group(method, &data[g]);
                        *busy.lock().unwrap_or_else(|e| e.into_inner()) += secs;
                    }
                });
            }
        });
        let quant = *busy.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = match (cpu0, process_cpu_seconds()) {
            (Some(a), Some(b)) => format!("{:.1} CPU s", b - a),
            _ => "CPU time n/a".to_string(),
        };
        // Quantizer time is summed over both threads; wall above it means the threads were not both running.
        println!(
            "{method:<5} 210 layers, 2 threads: {:.1} s wall (quantizer time {:.1} s over 2 threads = {:.1} s per thread; {cpu})",
            t.elapsed().as_secs_f64(),
            quant,
            quant / 2.0
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let tokens = args
        .iter()
        .position(|a| a == "--tokens")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    formats();
    algorithms(tokens, !quick);
}
