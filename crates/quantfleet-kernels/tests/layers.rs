//! Emulated per-token kernels against scalar references: FP8 activation quantization byte-for-byte
//! against quantfleet-quant, RMSNorm / RoPE / SwiGLU against f64 math, embedding gather exactly (including
//! the out-of-range status flag). Awkward widths 17, 1025, 5137; token counts 1, 3, 16. Data is synthetic.

mod common;

use common::*;
use quantfleet_kernels::Device;
use quantfleet_kernels::ops::Act;
use quantfleet_kernels::ops::layers::{act_quant_fp8, add, embedding, rmsnorm, rope, rope_table, swiglu, swiglu_split};
use quantfleet_quant::fp8_matrix::{Fp8Scaling, quantize_fp8};
use quantfleet_quant::{Fp8Format, MatrixRef};

const SHAPES: &[(usize, usize)] = &[(1, 17), (3, 1025), (16, 5137)];

fn act_quant_fp8_matches_quantizer_bytes<D: Device>(dev: &D) {
    for (i, &(tokens, cols)) in SHAPES.iter().enumerate() {
        for act in [Act::F16, Act::Bf16] {
            let mut v = synthetic(400 + i as u64, tokens * cols, 2.0);
            v[..cols].iter_mut().for_each(|x| *x = 0.0); // an all-zero token takes scale 1
            let (x, xb) = to_act(act, &v);
            let want =
                quantize_fp8(&MatrixRef::new("x", &x, tokens, cols).unwrap(), Fp8Format::E4M3, Fp8Scaling::PerRow)
                    .unwrap();
            let (xd, codes, scales) = (up(dev, &xb), out(dev, tokens * cols), out(dev, 4 * tokens));
            run(dev, act_quant_fp8(act, tokens, cols, &xd, &codes, &scales).unwrap());
            assert_eq!(&fetch(dev, &codes, "codes"), &want.codes[..], "codes {tokens}x{cols} {act:?}");
            assert_eq!(bytes_f32(&fetch(dev, &scales, "scales")), want.scales, "scales {tokens}x{cols} {act:?}");
        }
    }
}

fn rmsnorm_matches_reference<D: Device>(dev: &D) {
    for (i, &(tokens, cols)) in SHAPES.iter().enumerate() {
        for act in [Act::F16, Act::Bf16] {
            let (x, xb) = to_act(act, &synthetic(500 + i as u64, tokens * cols, 3.0));
            let w: Vec<f32> = synthetic(600 + i as u64, cols, 0.2).iter().map(|d| 1.0 + d).collect();
            let (xd, wd, y) = (up(dev, &xb), up(dev, &f32_bytes(&w)), out(dev, xb.len()));
            run(dev, rmsnorm(act, tokens, cols, &xd, &wd, &y, 1e-5).unwrap());
            let got = from_act(act, &fetch(dev, &y, "y"));
            let mut want = Vec::new();
            for row in x.chunks(cols) {
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
                let r = 1.0 / (ms + 1e-5).sqrt();
                want.extend(row.iter().zip(&w).map(|(&v, &g)| v as f64 * r * g as f64));
            }
            let budget: Vec<f64> = want.iter().map(|w| w.abs() * 1e-5 + 1e-6).collect();
            assert_close(&format!("rmsnorm {tokens}x{cols} {act:?}"), &got, &want, out_eps(act), &budget);
        }
    }
}

fn rope_matches_reference<D: Device>(dev: &D) {
    let (n_heads, head_dim, base) = (3, 64, 10000f32);
    let positions: Vec<i32> = vec![0, 1, 17, 1025, 4097];
    let tokens = positions.len();
    for act in [Act::F16, Act::Bf16] {
        let (x, xb) = to_act(act, &synthetic(700, tokens * n_heads * head_dim, 1.0));
        let xd = up(dev, &xb);
        let pos = up(dev, &positions.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<_>>());
        run(dev, rope(act, tokens, n_heads, head_dim, &xd, &pos, base).unwrap());
        let got = from_act(act, &fetch(dev, &xd, "xd"));
        let half = head_dim / 2;
        let (mut want, mut budget) = (vec![0f64; x.len()], vec![0f64; x.len()]);
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..n_heads {
                for i in 0..half {
                    let a = (t * n_heads + h) * head_dim + i;
                    let angle = p as f64 * (base as f64).powf(-(2.0 * i as f64) / head_dim as f64);
                    let (s, c) = angle.sin_cos();
                    let (x0, x1) = (x[a] as f64, x[a + half] as f64);
                    want[a] = x0 * c - x1 * s;
                    want[a + half] = x1 * c + x0 * s;
                    // The angle is formed in fp32 (pos * inv_freq): a few ulps of the angle, times |x|.
                    let e = (x0.abs() + x1.abs()) * (angle.abs() * 2f64.powi(-21) + 2f64.powi(-20));
                    budget[a] = e;
                    budget[a + half] = e;
                }
            }
        }
        assert_close(&format!("rope {act:?}"), &got, &want, out_eps(act), &budget);
    }
}

fn swiglu_matches_reference<D: Device>(dev: &D) {
    for (i, &(tokens, inter)) in SHAPES.iter().enumerate() {
        let act = if i % 2 == 0 { Act::F16 } else { Act::Bf16 };
        let (gu, gub) = to_act(act, &synthetic(800 + i as u64, tokens * 2 * inter, 2.0));
        let (gd, out) = (up(dev, &gub), out(dev, 2 * tokens * inter));
        run(dev, swiglu(act, tokens, inter, &gd, &out).unwrap());
        let got = from_act(act, &fetch(dev, &out, "out"));
        let want: Vec<f64> = (0..tokens * inter)
            .map(|j| {
                let (t, c) = (j / inter, j % inter);
                let g = gu[t * 2 * inter + c] as f64;
                g / (1.0 + (-g).exp()) * gu[t * 2 * inter + inter + c] as f64
            })
            .collect();
        let budget: Vec<f64> = want.iter().map(|w| w.abs() * 1e-6 + 1e-7).collect();
        assert_close(&format!("swiglu {tokens}x{inter} {act:?}"), &got, &want, out_eps(act), &budget);
    }
}

fn embedding_gathers_rows_and_flags_bad_ids<D: Device>(dev: &D) {
    let (vocab, dim) = (37, 1025);
    let (_, table) = to_act(Act::Bf16, &synthetic(900, vocab * dim, 1.0));
    let td = up(dev, &table);
    for (ids, bad) in [(vec![0i32, 36, 5, 5], false), (vec![3, 37, -1], true)] {
        let idb = up(dev, &ids.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<_>>());
        let (out, status) = (out(dev, 2 * ids.len() * dim), up(dev, &[0; 4]));
        run(dev, embedding(Act::Bf16, ids.len(), vocab, dim, &td, &idb, &out, &status).unwrap());
        let all = fetch(dev, &out, "out");
        for (t, &id) in ids.iter().enumerate() {
            let got = &all[2 * t * dim..2 * (t + 1) * dim];
            if (0..vocab as i32).contains(&id) {
                assert_eq!(got, &table[2 * id as usize * dim..2 * (id as usize + 1) * dim], "row {t}");
            } else {
                assert!(got.iter().all(|&b| b == 0), "out-of-range id {id} must give zeros");
            }
        }
        assert_eq!(&fetch(dev, &status, "status"), &(bad as u32).to_le_bytes(), "status for {ids:?}");
    }
}

fn add_and_swiglu_split_match_reference<D: Device>(dev: &D) {
    for (i, &(tokens, cols)) in SHAPES.iter().enumerate() {
        let act = if i % 2 == 0 { Act::F16 } else { Act::Bf16 };
        let total = tokens * cols;
        let (a, ab) = to_act(act, &synthetic(1000 + i as u64, total, 2.0));
        let (b, bb) = to_act(act, &synthetic(1100 + i as u64, total, 2.0));
        let (xd, yd, o) = (up(dev, &ab), up(dev, &bb), out(dev, 2 * total));
        run(dev, swiglu_split(act, total, &xd, &yd, &o).unwrap());
        let got = from_act(act, &fetch(dev, &o, "out"));
        let want: Vec<f64> = a.iter().zip(&b).map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64).collect();
        let budget: Vec<f64> = want.iter().map(|w| w.abs() * 1e-6 + 1e-7).collect();
        assert_close(&format!("swiglu_split {tokens}x{cols} {act:?}"), &got, &want, out_eps(act), &budget);
        run(dev, add(act, total, &xd, &yd).unwrap());
        let got = from_act(act, &fetch(dev, &xd, "x"));
        let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
        assert_close(&format!("add {tokens}x{cols} {act:?}"), &got, &want, out_eps(act), &vec![0.0; total]);
    }
}

fn rope_table_matches_reference<D: Device>(dev: &D) {
    // Interleaved pairs (2i, 2i + 1) rotated by host angles, as the engine's RopeTable gives them.
    let (n_heads, head_dim) = (3, 64);
    let half = head_dim / 2;
    let positions = [0usize, 1, 17, 1025, 4097];
    let tokens = positions.len();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &positions {
        for i in 0..half {
            let (s, c) = (p as f64 * 10000f64.powf(-((2 * i) as f64) / head_dim as f64)).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    for act in [Act::F16, Act::Bf16] {
        let (x, xb) = to_act(act, &synthetic(1200, tokens * n_heads * head_dim, 1.0));
        let (xd, cd, sd) = (up(dev, &xb), up(dev, &f32_bytes(&cos)), up(dev, &f32_bytes(&sin)));
        run(dev, rope_table(act, tokens, n_heads, head_dim, &xd, &cd, &sd).unwrap());
        let got = from_act(act, &fetch(dev, &xd, "x"));
        let mut want = vec![0f64; x.len()];
        for t in 0..tokens {
            for h in 0..n_heads {
                for i in 0..half {
                    let a = (t * n_heads + h) * head_dim + 2 * i;
                    let (c, s) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                    want[a] = x[a] as f64 * c - x[a + 1] as f64 * s;
                    want[a + 1] = x[a] as f64 * s + x[a + 1] as f64 * c;
                }
            }
        }
        let budget: Vec<f64> = (0..x.len()).map(|j| (x[j ^ 1].abs() + x[j].abs()) as f64 * 1e-7).collect();
        assert_close(&format!("rope_table {act:?}"), &got, &want, out_eps(act), &budget);
    }
}

device_tests!(
    add_and_swiglu_split_match_reference,
    rope_table_matches_reference,
    act_quant_fp8_matches_quantizer_bytes,
    rmsnorm_matches_reference,
    rope_matches_reference,
    swiglu_matches_reference,
    embedding_gathers_rows_and_flags_bad_ids
);
