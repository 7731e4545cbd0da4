//! Fast CPU kernels against the scalar reference, on SYNTHETIC seeded weights with awkward shapes, at every
//! instruction-set level this CPU supports. Error budget: f32 accumulation in a different order, so
//! |fast - reference| <= 2e-6 * sum|w*x| (a few ulps of the magnitude being summed) + 1e-6.

use half::{bf16, f16};

use super::dot::dot_row_reference;
use super::matmul::{BlockMatrix, SimdLevel, matmul};
use crate::dtype::{GgmlType, dequantize_row_reference};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A synthetic row-major matrix of `ty` with random scales and quants.
fn synthetic(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rows {
        match ty {
            GgmlType::Q4_1 => {
                for _ in 0..cols / 32 {
                    out.extend(f16::from_f32(rng.uniform().abs() * 0.1).to_bits().to_le_bytes());
                    out.extend(f16::from_f32(rng.uniform() * 0.5).to_bits().to_le_bytes());
                    out.extend((0..16).map(|_| rng.next() as u8));
                }
            }
            GgmlType::Q8_0 => {
                for _ in 0..cols / 32 {
                    out.extend(f16::from_f32(rng.uniform().abs() * 0.01).to_bits().to_le_bytes());
                    out.extend((0..32).map(|_| rng.next() as u8));
                }
            }
            GgmlType::F32 => out.extend((0..cols).flat_map(|_| rng.uniform().to_le_bytes())),
            GgmlType::F16 => out.extend((0..cols).flat_map(|_| f16::from_f32(rng.uniform()).to_bits().to_le_bytes())),
            GgmlType::BF16 => out.extend((0..cols).flat_map(|_| bf16::from_f32(rng.uniform()).to_bits().to_le_bytes())),
            other => panic!("no synthetic generator for {}", other.name()),
        }
    }
    out
}

fn levels() -> Vec<SimdLevel> {
    [SimdLevel::Portable, SimdLevel::Avx2Fma, SimdLevel::Avx512].into_iter().filter(|l| l.is_supported()).collect()
}

#[test]
fn matmul_matches_reference_for_every_type_shape_and_level() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let types = [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F32, GgmlType::F16, GgmlType::BF16];
    // Rows not multiples of 4 or 32; columns of 1, 2 and 33 blocks; token counts around the kernel tiles.
    for ty in types {
        for (rows, cols) in [(17, 32), (33, 64), (5, 1056), (70, 96)] {
            let data = synthetic(ty, rows, cols, &mut rng);
            let w = BlockMatrix { ty, rows, cols, data: &data };
            let row_bytes = data.len() / rows;
            for n_tokens in [1, 3, 4, 5, 17, 70] {
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.uniform()).collect();
                let mut wrow = vec![0.0f32; cols];
                for level in levels() {
                    let mut out = vec![f32::NAN; n_tokens * rows];
                    matmul(level, w, &x, n_tokens, &mut out);
                    for t in 0..n_tokens {
                        for r in 0..rows {
                            let row = &data[r * row_bytes..(r + 1) * row_bytes];
                            let xt = &x[t * cols..(t + 1) * cols];
                            let want = dot_row_reference(ty, row, xt).unwrap();
                            dequantize_row_reference(ty, row, &mut wrow).unwrap();
                            let mag: f32 = wrow.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                            let got = out[t * rows + r];
                            assert!(
                                (got - want).abs() <= 2e-6 * mag + 1e-6,
                                "{} {rows}x{cols} T={n_tokens} {level:?} ({t},{r}): {got} vs {want}",
                                ty.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn f32_matmul_with_columns_off_the_lane_width_uses_the_row_path() {
    let mut rng = Rng(7);
    let (rows, cols, n_tokens) = (9, 37, 6);
    let data = synthetic(GgmlType::F32, rows, cols, &mut rng);
    let w = BlockMatrix { ty: GgmlType::F32, rows, cols, data: &data };
    let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.uniform()).collect();
    for level in levels() {
        let mut out = vec![0.0; n_tokens * rows];
        matmul(level, w, &x, n_tokens, &mut out);
        let want = dot_row_reference(GgmlType::F32, &data[..cols * 4], &x[cols..2 * cols]).unwrap();
        assert!((out[rows] - want).abs() < 1e-5, "{level:?}");
    }
}

#[test]
fn matmul_many_equals_separate_matmuls_and_rejects_bad_shapes() {
    use std::sync::Arc;

    use crate::backend::Backend;
    use crate::cpu::{CpuBackend, CpuTensor};
    use crate::gguf::GgufFile;
    use crate::gguf::tests::SyntheticGguf;

    let mut rng = Rng(99);
    // Synthetic Q/K/V-like matrices with different row counts over a shared 64-wide input.
    let file = SyntheticGguf::new()
        .tensor("q", &[64, 40], GgmlType::Q4_1, synthetic(GgmlType::Q4_1, 40, 64, &mut rng))
        .tensor("k", &[64, 8], GgmlType::Q8_0, synthetic(GgmlType::Q8_0, 8, 64, &mut rng))
        .tensor("v", &[64, 33], GgmlType::F32, synthetic(GgmlType::F32, 33, 64, &mut rng))
        .tensor("bad", &[32, 4], GgmlType::F32, synthetic(GgmlType::F32, 4, 32, &mut rng))
        .build();
    let file = Arc::new(GgufFile::from_bytes(file).unwrap());
    let cpu = CpuBackend::new();
    let m = |n: &str| cpu.upload_matrix(&file, file.tensor(n).unwrap()).unwrap();
    let (q, k, v, bad) = (m("q"), m("k"), m("v"), m("bad"));
    for n_tokens in [1, 5] {
        let x = CpuTensor { rows: n_tokens, cols: 64, data: (0..n_tokens * 64).map(|_| rng.uniform()).collect() };
        let (mut a, mut b, mut c) = (CpuTensor::default(), CpuTensor::default(), CpuTensor::default());
        cpu.matmul_many(&[&q, &k, &v], &x, &mut [&mut a, &mut b, &mut c]).unwrap();
        for (w, got) in [(&q, &a), (&k, &b), (&v, &c)] {
            let mut want = CpuTensor::default();
            cpu.matmul(w, &x, &mut want).unwrap();
            assert_eq!((got.rows, got.cols, &got.data), (want.rows, want.cols, &want.data));
        }
        assert!(cpu.matmul_many(&[&q, &bad], &x, &mut [&mut a, &mut b]).is_err());
        assert!(cpu.matmul_many(&[&q, &k], &x, &mut [&mut a]).is_err());
    }
}

/// KV dtypes round trip through `kv_write` and attention: per element, the decoded value is within the
/// dtype's bound of the written one (fp16 2^-11, bf16 2^-8 relative; fp8 E4M3 2^-4 relative down to its
/// subnormal step at the per-(token, head) scale; int8 half a step of amax/127; the per-token quantized
/// dtypes hold the rotated head, `KvDtype::rotated`), and attention over the quantized cache stays close to
/// attention over the f32 cache. SYNTHETIC values, 2 blocks + a partial one.
#[test]
fn kv_dtypes_round_trip_and_attention_stays_close_to_f32() {
    use crate::backend::{Backend, KvLayout, SeqSpan};
    use crate::cpu::{CpuBackend, CpuTensor};
    use crate::kv_cache::KvDtype;

    let mut rng = Rng(4242);
    let layout = KvLayout { n_layers: 2, n_kv_heads: 2, head_dim: 64, block_tokens: 16 };
    let n = 37;
    let width = layout.n_kv_heads * layout.head_dim;
    // Keys with a planted outlier channel (as real keys have), values plain.
    let k: Vec<f32> = (0..n * width).map(|i| rng.uniform() * if i % 64 == 5 { 20.0 } else { 1.0 }).collect();
    let v: Vec<f32> = (0..n * width).map(|_| rng.uniform()).collect();
    let q: Vec<f32> = (0..n * 4 * 64).map(|_| rng.uniform()).collect();
    let table = [2u32, 0, 1];
    let spans = [SeqSpan { row0: 0, n_tokens: n, start_pos: 0, block_table: &table }];
    let cpu = CpuBackend::new();
    let tensor = |rows, cols, data: &[f32]| CpuTensor { rows, cols, data: data.to_vec() };
    let run = |dtype: KvDtype| {
        let mut kv = cpu.new_kv_storage(layout, dtype, 3).unwrap();
        cpu.kv_write(&mut kv, 1, &tensor(n, width, &k), &tensor(n, width, &v), &spans).unwrap();
        let mut out = CpuTensor::default();
        cpu.attention(&tensor(n, 4 * 64, &q), &kv, 1, &spans, &mut out).unwrap();
        (kv, out.data)
    };
    let (_, reference) = run(KvDtype::F32);
    for (dtype, rel, max_attn_err) in [
        (KvDtype::F16, 1.0 / 2048.0, 2e-3),
        (KvDtype::Bf16, 1.0 / 256.0, 2e-2),
        (KvDtype::Fp8E4m3, 1.0 / 16.0, 0.15),
        // INT8 per-token keys would lose the small channels next to the planted outlier; the Hadamard rotation
        // spreads it over the head. Measured 0.011 (0.031 unrotated).
        (KvDtype::Int8, 0.0, 2e-2),
        // 16 levels between each (token, head)'s min and max. Measured 0.155 (0.33 unrotated).
        (KvDtype::Int4PerToken, 0.0, 0.25),
    ] {
        let (kv, out) = run(dtype);
        // Element round trip through the store's decoder.
        let (bt, hd) = (layout.block_tokens, layout.head_dim);
        let mut scratch = Vec::new();
        for t in 0..n {
            for h in 0..layout.n_kv_heads {
                for (kind, src) in [(0, &k), (1, &v)] {
                    let base = table[t / bt] as usize * layout.block_elems() + layout.head_offset(1, kind, h);
                    let run = kv.store.get(base, bt * hd, kind == 0, bt, hd, &mut scratch).to_vec();
                    // A rotated cache stores R k and R v (`KvDtype::rotated`).
                    let mut row = src[t * width + h * hd..t * width + (h + 1) * hd].to_vec();
                    if dtype.rotated() {
                        quantfleet_quant::hadamard::rotate(&mut row);
                    }
                    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    for (d, &x) in row.iter().enumerate() {
                        let got = if kind == 0 { run[d * bt + t % bt] } else { run[(t % bt) * hd + d] };
                        let bound = match dtype {
                            KvDtype::Int8 => amax / 127.0 * 0.5 + 1e-6,
                            KvDtype::Int4PerToken => {
                                // Half a step of the f32 fit, plus the f16 scale's rounding over 15 steps.
                                let (lo, hi) = row.iter().fold((0f32, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
                                let step = (hi - lo) / 15.0;
                                step * 0.5 + 15.0 * step * 2f32.powi(-11) + 1e-6
                            }
                            KvDtype::Fp8E4m3 => rel * x.abs() + amax / 448.0 * 2f32.powi(-9) + 1e-7,
                            _ => rel * x.abs() + 1e-7,
                        };
                        assert!((got - x).abs() <= bound, "{dtype:?} t{t} h{h} kind{kind} d{d}: {got} vs {x}");
                    }
                }
            }
        }
        let err = out.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < max_attn_err, "{dtype:?}: attention max error {err}");
    }
}

/// Attention tiles rows (16 per task, all query heads of a KV head together) so each KV block is decoded once
/// per tile: the result must equal attending every row alone (a one-row span per row over the same cache),
/// bit for bit, for every KV dtype, with two sequences in one batch (one of them at an offset, tiles crossing
/// block boundaries and ending in a partial tile). SYNTHETIC values.
#[test]
fn tiled_attention_equals_attending_each_row_alone() {
    use crate::backend::{Backend, KvLayout, SeqSpan};
    use crate::cpu::{CpuBackend, CpuTensor};
    use crate::kv_cache::KvDtype;

    let mut rng = Rng(77);
    let layout = KvLayout { n_layers: 1, n_kv_heads: 3, head_dim: 64, block_tokens: 16 };
    let (n_heads, width) = (9, 3 * 64);
    // Sequence A: 41 new rows from position 0; sequence B: 23 new rows from position 19 (positions 0..19
    // written first, as an earlier step would have).
    let (table_a, table_b) = ([4u32, 0, 2], [1u32, 5, 3]);
    let (na, nb_prev, nb) = (41, 19, 23);
    let rows = |n: usize, rng: &mut Rng| -> Vec<f32> { (0..n * width).map(|_| rng.uniform()).collect() };
    let cpu = CpuBackend::new();
    let tensor = |rows, cols, data: &[f32]| CpuTensor { rows, cols, data: data.to_vec() };
    let (k_prev, v_prev) = (rows(nb_prev, &mut rng), rows(nb_prev, &mut rng));
    let (k, v) = (rows(na + nb, &mut rng), rows(na + nb, &mut rng));
    let q: Vec<f32> = (0..(na + nb) * n_heads * 64).map(|_| rng.uniform()).collect();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Fp8E4m3, KvDtype::Int8, KvDtype::Int4PerToken] {
        let mut kv = cpu.new_kv_storage(layout, dtype, 6).unwrap();
        let prev = [SeqSpan { row0: 0, n_tokens: nb_prev, start_pos: 0, block_table: &table_b }];
        cpu.kv_write(&mut kv, 0, &tensor(nb_prev, width, &k_prev), &tensor(nb_prev, width, &v_prev), &prev).unwrap();
        let spans = [
            SeqSpan { row0: 0, n_tokens: na, start_pos: 0, block_table: &table_a },
            SeqSpan { row0: na, n_tokens: nb, start_pos: nb_prev, block_table: &table_b },
        ];
        cpu.kv_write(&mut kv, 0, &tensor(na + nb, width, &k), &tensor(na + nb, width, &v), &spans).unwrap();
        let mut tiled = CpuTensor::default();
        cpu.attention(&tensor(na + nb, n_heads * 64, &q), &kv, 0, &spans, &mut tiled).unwrap();
        for row in 0..na + nb {
            let (table, pos) = if row < na { (&table_a[..], row) } else { (&table_b[..], nb_prev + row - na) };
            let one = [SeqSpan { row0: 0, n_tokens: 1, start_pos: pos, block_table: table }];
            let qrow = &q[row * n_heads * 64..(row + 1) * n_heads * 64];
            let mut alone = CpuTensor::default();
            cpu.attention(&tensor(1, n_heads * 64, qrow), &kv, 0, &one, &mut alone).unwrap();
            let got = &tiled.data[row * n_heads * 64..(row + 1) * n_heads * 64];
            assert!(got == alone.data.as_slice(), "{dtype:?} row {row}: tiled attention differs from the row alone");
        }
    }
}

/// The x86 attention kernels (vector score accumulation, F16C decoding of an f16 cache) compute what the
/// portable loop does, in the same order: the output is identical bit for bit on every level, for every KV
/// dtype, decode and prefill rows alike. SYNTHETIC values: one 37-row prefill then one decode row.
#[test]
fn attention_is_identical_on_every_level() {
    use crate::backend::{Backend, KvLayout, SeqSpan};
    use crate::cpu::{CpuBackend, CpuTensor};
    use crate::kv_cache::KvDtype;

    let mut rng = Rng(31337);
    let layout = KvLayout { n_layers: 1, n_kv_heads: 3, head_dim: 64, block_tokens: 16 };
    let (n_heads, width, n) = (9, 3 * 64, 38);
    let k: Vec<f32> = (0..n * width).map(|_| rng.uniform() * 4.0).collect();
    let v: Vec<f32> = (0..n * width).map(|_| rng.uniform()).collect();
    let q: Vec<f32> = (0..n * n_heads * 64).map(|_| rng.uniform()).collect();
    let table = [2u32, 0, 1];
    let tensor = |rows, cols, data: &[f32]| CpuTensor { rows, cols, data: data.to_vec() };
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Fp8E4m3, KvDtype::Int8, KvDtype::Int4PerToken] {
        let mut outs = Vec::new();
        for level in levels() {
            let cpu = CpuBackend::with_level(level).unwrap();
            let mut kv = cpu.new_kv_storage(layout, dtype, 3).unwrap();
            let prefill = [SeqSpan { row0: 0, n_tokens: n - 1, start_pos: 0, block_table: &table }];
            let (kp, vp) = (tensor(n - 1, width, &k[..(n - 1) * width]), tensor(n - 1, width, &v[..(n - 1) * width]));
            cpu.kv_write(&mut kv, 0, &kp, &vp, &prefill).unwrap();
            let mut out = CpuTensor::default();
            cpu.attention(&tensor(n - 1, n_heads * 64, &q[..(n - 1) * n_heads * 64]), &kv, 0, &prefill, &mut out)
                .unwrap();
            let decode = [SeqSpan { row0: 0, n_tokens: 1, start_pos: n - 1, block_table: &table }];
            let (kd, vd) = (tensor(1, width, &k[(n - 1) * width..]), tensor(1, width, &v[(n - 1) * width..]));
            cpu.kv_write(&mut kv, 0, &kd, &vd, &decode).unwrap();
            let mut last = CpuTensor::default();
            cpu.attention(&tensor(1, n_heads * 64, &q[(n - 1) * n_heads * 64..]), &kv, 0, &decode, &mut last).unwrap();
            out.data.extend(&last.data);
            assert!(out.data.iter().all(|x| x.is_finite()), "{dtype:?} {level:?}: non-finite attention");
            outs.push((level, out.data));
        }
        for (level, out) in &outs[1..] {
            assert!(out == &outs[0].1, "{dtype:?}: {level:?} attention differs from {:?}", outs[0].0);
        }
    }
    // The F16C run decoder, including a tail shorter than one vector, against `half`'s conversion.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        let src: Vec<f16> = (0..29).map(|i| f16::from_f32(rng.uniform() * 1e3 * i as f32)).collect();
        let mut got = vec![f32::NAN; 29];
        // SAFETY: F16C (and so AVX) checked just above.
        unsafe { super::x86::f16_run_to_f32(&src, &mut got) };
        assert!(src.iter().zip(&got).all(|(h, &g)| h.to_f32() == g), "F16C decode differs from half's");
    }
}

/// A batch step over the GGUF file's own Q4_1 and Q8_0 weights gives every token exactly its one-token
/// product (the multi-token kernels widen each block once for up to 8 tokens but keep each token's
/// arithmetic), on every level, for 2-16 tokens: batching changes no logits. SYNTHETIC weights.
#[test]
fn gguf_batch_steps_equal_one_token_products_bit_for_bit() {
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        for (rows, cols) in [(33, 64), (70, 96), (5, 1056)] {
            let data = synthetic(ty, rows, cols, &mut rng);
            let w = BlockMatrix { ty, rows, cols, data: &data };
            for n_tokens in [2, 3, 8, 9, 16] {
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.uniform()).collect();
                for level in levels() {
                    let mut batch = vec![f32::NAN; n_tokens * rows];
                    matmul(level, w, &x, n_tokens, &mut batch);
                    for (t, xt) in x.chunks_exact(cols).enumerate() {
                        let mut one = vec![f32::NAN; rows];
                        matmul(level, w, xt, 1, &mut one);
                        let got: Vec<u32> = batch[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{} {rows}x{cols} T={n_tokens} {level:?} token {t}", ty.name());
                    }
                }
            }
        }
    }
}

#[test]
fn isa_names_parse_and_a_cap_only_lowers_the_level() {
    assert_eq!(SimdLevel::parse("avx512"), Ok(SimdLevel::Avx512));
    assert_eq!(SimdLevel::parse("avx2"), Ok(SimdLevel::Avx2Fma));
    assert_eq!(SimdLevel::parse("portable"), Ok(SimdLevel::Portable));
    let err = SimdLevel::parse("AVX2").unwrap_err();
    assert!(err.contains("QUANTFLEET_CPU_ISA=\"AVX2\"") && err.contains("avx512, avx2, portable"), "{err}");
    // detect() is the hardware level min the cap: the levels are ordered.
    assert!(SimdLevel::Portable < SimdLevel::Avx2Fma && SimdLevel::Avx2Fma < SimdLevel::Avx512);
    assert_eq!(SimdLevel::Avx512.min(SimdLevel::Avx2Fma), SimdLevel::Avx2Fma);
    assert_eq!(SimdLevel::Avx2Fma.min(SimdLevel::Avx512), SimdLevel::Avx2Fma);
}
