//! Emulated GEMV kernels against quantfleet-quant's scalar dequantization, on awkward shapes
//! (17, 1025, 5137 columns; batch 1, 3, 16) for f16 and bf16 activations. Data is synthetic.

mod common;

use common::*;
use quantfleet_kernels::Device;
use quantfleet_kernels::ops::Act;
use quantfleet_kernels::ops::gemv::{Fp8Scales, GemvShape, GemvWeights, gemv};
use quantfleet_quant::fp8_matrix::{Fp8Scaling, quantize_fp8};
use quantfleet_quant::int4::quantize_int4;
use quantfleet_quant::int8::quantize_int8;
use quantfleet_quant::{Fp8Format, Int4Config, MatrixRef};

const SHAPES: &[(usize, usize, usize)] = &[(5, 17, 1), (9, 1025, 3), (6, 5137, 16), (37, 64, 1), (3, 1, 2)];

/// Reference y[b, n] = sum_k x[b, k] * w_hat[n, k] in f64, and each element's fp32 accumulation budget.
fn reference(x: &[f32], w_hat: &[f32], shape: GemvShape) -> (Vec<f64>, Vec<f64>) {
    let GemvShape { n, k, batch } = shape;
    let mut want = vec![0f64; batch * n];
    let mut budget = vec![0f64; batch * n];
    for b in 0..batch {
        for r in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for c in 0..k {
                let p = x[b * k + c] as f64 * w_hat[r * k + c] as f64;
                s += p;
                a += p.abs();
            }
            want[b * n + r] = s;
            // fp32 accumulation in a different order: at most ~k ulps of the magnitude sum, rounded up.
            budget[b * n + r] = a * (k as f64 + 8.0) * 2f64.powi(-24);
        }
    }
    (want, budget)
}

fn run_gemv<D: Device>(dev: &D, weights: GemvWeights<'_>, act: Act, shape: GemvShape, x: &[u8]) -> Vec<f32> {
    let xb = up(dev, x);
    let y = out(dev, shape.batch * shape.n * 2);
    run(dev, gemv(weights, act, shape, &xb, &y).expect("valid launch"));
    from_act(act, &fetch(dev, &y, "y"))
}

fn gemv_fp8_matches_reference<D: Device>(dev: &D) {
    for (i, &(n, k, batch)) in SHAPES.iter().enumerate() {
        for act in [Act::F16, Act::Bf16] {
            let groups = |g| (Fp8Scales::PerGroup(g), Fp8Scaling::PerGroup(std::num::NonZeroUsize::new(g).unwrap()));
            let layouts = [
                (Fp8Scales::PerChannel, Fp8Scaling::PerRow),
                (Fp8Scales::PerTensor, Fp8Scaling::PerTensor),
                groups(32),
                groups(128),
            ];
            for (scales_layout, scaling) in layouts {
                let shape = GemvShape { n, k, batch };
                // Row magnitudes that vary along the row, so a misplaced group scale shows.
                let w: Vec<f32> = synthetic(10 + i as u64, n * k, 0.05)
                    .iter()
                    .enumerate()
                    .map(|(j, v)| v * (1.0 + ((j % k) / 32 % 5) as f32))
                    .collect();
                let q = quantize_fp8(&MatrixRef::new("w", &w, n, k).unwrap(), Fp8Format::E4M3, scaling).unwrap();
                let mut w_hat = vec![0f32; n * k];
                for r in 0..n {
                    q.dequantize_row(r, &mut w_hat[r * k..(r + 1) * k]).unwrap();
                }
                let (x, xbytes) = to_act(act, &synthetic(100 + i as u64, batch * k, 1.0));
                let codes = up(dev, &q.codes);
                let scales = up(dev, &f32_bytes(&q.scales));
                let got = run_gemv(
                    dev,
                    GemvWeights::Fp8 { codes: &codes, scales: &scales, scaling: scales_layout },
                    act,
                    shape,
                    &xbytes,
                );
                let (want, budget) = reference(&x, &w_hat, shape);
                assert_close(&format!("fp8 {shape:?} {act:?} {scales_layout:?}"), &got, &want, out_eps(act), &budget);
            }
        }
    }
}

fn gemv_refuses_short_buffers_and_empty_shapes<D: Device>(dev: &D) {
    let shape = GemvShape { n: 4, k: 17, batch: 1 };
    let codes = up(dev, &[0u8; 4 * 17 - 1]);
    let scales = up(dev, &[0u8; 16]);
    let x = up(dev, &[0u8; 34]);
    let y = out(dev, 8);
    let w = GemvWeights::Fp8 { codes: &codes, scales: &scales, scaling: Fp8Scales::PerChannel };
    let err = gemv(w, Act::F16, shape, &x, &y).unwrap_err();
    assert!(err.to_string().contains("codes"), "{err}");
    let w = GemvWeights::Fp8 { codes: &codes, scales: &scales, scaling: Fp8Scales::PerChannel };
    assert!(gemv(w, Act::F16, GemvShape { n: 0, k: 17, batch: 1 }, &x, &y).is_err());
    // Per-group scales: one per (row, group), so 4 rows of 17 columns in groups of 32 need 4 (16 bytes
    // pass), in groups of 16 the group is refused.
    let codes = up(dev, &[0u8; 4 * 17]);
    let w = GemvWeights::Fp8 { codes: &codes, scales: &scales, scaling: Fp8Scales::PerGroup(32) };
    assert!(gemv(w, Act::F16, shape, &x, &y).is_ok());
    let w = GemvWeights::Fp8 { codes: &codes, scales: &scales, scaling: Fp8Scales::PerGroup(16) };
    let err = gemv(w, Act::F16, shape, &x, &y).unwrap_err();
    assert!(err.to_string().contains("group size 16"), "{err}");
    let short = up(dev, &[0u8; 12]);
    let w = GemvWeights::Fp8 { codes: &codes, scales: &short, scaling: Fp8Scales::PerGroup(32) };
    assert!(gemv(w, Act::F16, shape, &x, &y).unwrap_err().to_string().contains("scales"));
}

fn gemv_int8_matches_reference<D: Device>(dev: &D) {
    for (i, &(n, k, batch)) in SHAPES.iter().enumerate() {
        for act in [Act::F16, Act::Bf16] {
            let shape = GemvShape { n, k, batch };
            let w = synthetic(20 + i as u64, n * k, 0.05);
            let q = quantize_int8(&MatrixRef::new("w", &w, n, k).unwrap()).unwrap();
            let mut w_hat = vec![0f32; n * k];
            for r in 0..n {
                q.dequantize_row(r, &mut w_hat[r * k..(r + 1) * k]).unwrap();
            }
            let (x, xbytes) = to_act(act, &synthetic(200 + i as u64, batch * k, 1.0));
            let codes = up(dev, &q.codes.iter().map(|&c| c as u8).collect::<Vec<_>>());
            let scales = up(dev, &f32_bytes(&q.scales));
            let got = run_gemv(dev, GemvWeights::Int8 { codes: &codes, scales: &scales }, act, shape, &xbytes);
            let (want, budget) = reference(&x, &w_hat, shape);
            assert_close(&format!("int8 {shape:?} {act:?}"), &got, &want, out_eps(act), &budget);
        }
    }
}

fn gemv_int4_matches_reference<D: Device>(dev: &D) {
    // Group sizes 64 and 128, symmetric and asymmetric; K = 17 and 5137 end in a partial group and an
    // odd (padding) nibble, K = 1025 crosses a group boundary inside most 16-byte chunks.
    for (i, &(n, k, batch)) in SHAPES.iter().enumerate() {
        for (group, symmetric, act) in
            [(64, true, Act::F16), (128, false, Act::F16), (128, true, Act::Bf16), (64, false, Act::Bf16)]
        {
            let shape = GemvShape { n, k, batch };
            let w = synthetic(30 + i as u64, n * k, 0.05);
            let config = if symmetric { Int4Config::symmetric(group) } else { Int4Config::asymmetric(group) }.unwrap();
            let q = quantize_int4(&MatrixRef::new("w", &w, n, k).unwrap(), &config).unwrap();
            let mut w_hat = vec![0f32; n * k];
            for r in 0..n {
                q.dequantize_row_ref(r, &mut w_hat[r * k..(r + 1) * k]).unwrap();
            }
            let scales: Vec<f32> = (0..n * q.groups_per_row()).map(|g| q.scales.get(g)).collect();
            let (x, xbytes) = to_act(act, &synthetic(300 + i as u64, batch * k, 1.0));
            let packed = up(dev, &q.packed);
            let scales = up(dev, &f32_bytes(&scales));
            let zeros = q.zeros.as_ref().map(|z| up(dev, z));
            let weights = GemvWeights::Int4 {
                packed: &packed,
                scales: &scales,
                zeros: zeros.as_ref().map(|z| z as &dyn quantfleet_kernels::DeviceBuffer),
                group_size: group,
            };
            let got = run_gemv(dev, weights, act, shape, &xbytes);
            let (want, budget) = reference(&x, &w_hat, shape);
            assert_close(
                &format!("int4 g{group} sym={symmetric} {shape:?} {act:?}"),
                &got,
                &want,
                out_eps(act),
                &budget,
            );
        }
    }
}

fn gemv_half_matches_reference<D: Device>(dev: &D) {
    // 16-bit weights: rows of 2K bytes start at every 2-byte alignment, so the head and tail hold whole
    // elements split across lanes by byte (K = 17 and 5137 end mid-chunk, K = 1025 starts rows misaligned).
    for (i, &(n, k, batch)) in SHAPES.iter().enumerate() {
        for (wbf16, act) in [(false, Act::F16), (true, Act::F16), (false, Act::Bf16), (true, Act::Bf16)] {
            let shape = GemvShape { n, k, batch };
            let wact = if wbf16 { Act::Bf16 } else { Act::F16 };
            let (w_hat, wbytes) = to_act(wact, &synthetic(30 + i as u64, n * k, 0.05));
            let (x, xbytes) = to_act(act, &synthetic(130 + i as u64, batch * k, 1.0));
            let wd = up(dev, &wbytes);
            let got = run_gemv(dev, GemvWeights::Half { w: &wd, bf16: wbf16 }, act, shape, &xbytes);
            let (want, budget) = reference(&x, &w_hat, shape);
            assert_close(&format!("half bf16w={wbf16} {shape:?} {act:?}"), &got, &want, out_eps(act), &budget);
        }
    }
}

device_tests!(
    gemv_half_matches_reference,
    gemv_fp8_matches_reference,
    gemv_int8_matches_reference,
    gemv_int4_matches_reference,
    gemv_refuses_short_buffers_and_empty_shapes
);
