//! Container-level behaviour the engine relies on: static FP8 scales saturate, folding helpers are exact,
//! row access validates its arguments, and storage sizes match the documented layouts.

use quantfleet_quant::awq::{fold_into_norm, fold_into_previous_linear};
use quantfleet_quant::fp8_matrix::calibrate_fp8_scale;
use quantfleet_quant::matrix::matmul_xwt;
use quantfleet_quant::synthetic::SynthRng;
use quantfleet_quant::*;

#[test]
fn static_fp8_scale_saturates_out_of_range_values() {
    let calib = [0.5f32, -1.0, 0.25, 0.75];
    let c = MatrixRef::new("calib", &calib, 1, 4).unwrap();
    let scale = calibrate_fp8_scale(Fp8Format::E4M3, &[c]).unwrap();
    assert_eq!(scale, 1.0 / 448.0);
    // At run time a token exceeds the calibrated range: it clamps to ±1.0 instead of becoming NaN.
    let live = [3.0f32, -0.5, -7.0, 0.001];
    let m = MatrixRef::new("live", &live, 1, 4).unwrap();
    let q =
        quantize_rtn(&m, &WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::Static(scale) }).unwrap();
    let d = q.dequantize();
    assert_eq!(d[0], 1.0);
    assert_eq!(d[2], -1.0);
    assert!((d[1] + 0.5).abs() < 1e-6);
    let bad = WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::Static(0.0) };
    assert!(matches!(quantize_rtn(&m, &bad), Err(QuantError::InvalidParameter { .. })));
    assert!(calibrate_fp8_scale(Fp8Format::E4M3, &[]).is_err());
}

#[test]
fn folding_scales_into_the_previous_linear_is_exact() {
    // prev: [8 x 5] produces the 8 inputs of `next`: [3 x 8]. Dividing prev's output rows by s and multiplying
    // next's columns by s leaves next(prev(x)) unchanged.
    let mut rng = SynthRng::new(5);
    let (x, prev, next) = (rng.normal_vec(4 * 5, 1.0), rng.normal_vec(8 * 5, 1.0), rng.normal_vec(3 * 8, 1.0));
    let s: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.25).collect();
    let h = matmul_xwt(&x, 4, &prev, 8, 5);
    let y = matmul_xwt(&h, 4, &next, 3, 8);
    let mut prev_f = prev.clone();
    fold_into_previous_linear(&mut prev_f, 8, &s).unwrap();
    let next_s: Vec<f32> = next.iter().enumerate().map(|(i, &v)| v * s[i % 8]).collect();
    let y_f = matmul_xwt(&matmul_xwt(&x, 4, &prev_f, 8, 5), 4, &next_s, 3, 8);
    for (a, b) in y.iter().zip(&y_f) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
    assert!(fold_into_previous_linear(&mut prev_f, 7, &s).is_err());
    let mut gamma = vec![1.0; 7];
    assert!(matches!(fold_into_norm(&mut gamma, &s), Err(QuantError::LengthMismatch { .. })));
}

#[test]
fn row_access_is_validated_and_storage_matches_the_layout() {
    let mut rng = SynthRng::new(6);
    let (rows, cols) = (3, 1025);
    let data = rng.normal_vec(rows * cols, 1.0);
    let w = MatrixRef::new("w", &data, rows, cols).unwrap();
    let formats = [
        (WeightFormat::Bf16, rows * cols * 2),
        (WeightFormat::F16, rows * cols * 2),
        (WeightFormat::Fp8 { format: Fp8Format::E5M2, scaling: Fp8Scaling::PerTensor }, rows * cols + 4),
        (WeightFormat::Int8, rows * cols + 4 * rows),
        // 513 bytes per row, 9 groups of 128 per row (the last one has 1 column), f32 scales, no zeros.
        (WeightFormat::Int4(Int4Config::symmetric(128).unwrap()), rows * 513 + rows * 9 * 4),
        (WeightFormat::Int4(Int4Config::asymmetric(128).unwrap()), rows * 513 + rows * 9 * 5),
        (WeightFormat::Fp4(Fp4Kind::Nvfp4), rows * 513 + rows * 65 + 4),
        (WeightFormat::Fp4(Fp4Kind::Mxfp4), rows * 513 + rows * 33 + 4),
    ];
    for (format, bytes) in formats {
        let q = quantize_rtn(&w, &format).unwrap();
        assert_eq!((q.rows(), q.cols()), (rows, cols));
        assert_eq!(q.storage_bytes(), bytes, "{format:?}");
        let mut out = vec![0f32; cols];
        q.dequantize_row(2, &mut out).unwrap();
        assert!(matches!(q.dequantize_row(3, &mut out), Err(QuantError::RowOutOfRange { row: 3, rows: 3 })));
        let mut short = vec![0f32; cols - 1];
        assert!(matches!(q.dequantize_row(0, &mut short), Err(QuantError::LengthMismatch { .. })));
    }
    // f16 cannot hold 1e6: a typed error, not an infinity in the weights.
    let big = [1.0e6f32; 4];
    let m = MatrixRef::new("big", &big, 1, 4).unwrap();
    assert!(matches!(quantize_rtn(&m, &WeightFormat::F16), Err(QuantError::InvalidParameter { .. })));
}

#[test]
fn inconsistent_public_fields_are_an_error_not_a_panic() {
    let data = [1.0f32; 64];
    let w = MatrixRef::new("w", &data, 2, 32).unwrap();
    let mut out = vec![0f32; 32];
    let QuantizedMatrix::Int4(mut m) =
        quantize_rtn(&w, &WeightFormat::Int4(Int4Config::asymmetric(32).unwrap())).unwrap()
    else {
        unreachable!()
    };
    m.zeros.as_mut().unwrap().pop();
    assert!(matches!(m.dequantize_row(1, &mut out), Err(QuantError::LengthMismatch { .. })));
    m.zeros = None;
    m.packed.truncate(3);
    assert!(matches!(m.dequantize_row_ref(0, &mut out), Err(QuantError::LengthMismatch { .. })));
    let QuantizedMatrix::Fp4(mut f) = quantize_rtn(&w, &WeightFormat::Fp4(Fp4Kind::Nvfp4)).unwrap() else {
        unreachable!()
    };
    f.block_scales.clear();
    assert!(f.dequantize_row(0, &mut out).is_err());
    let QuantizedMatrix::Int8(mut i) = quantize_rtn(&w, &WeightFormat::Int8).unwrap() else { unreachable!() };
    i.scales.pop();
    assert!(i.dequantize_row(1, &mut out).is_err());
    let fp8 = WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow };
    let QuantizedMatrix::Fp8(mut e) = quantize_rtn(&w, &fp8).unwrap() else { unreachable!() };
    e.codes.pop();
    assert!(e.dequantize_row(1, &mut out).is_err());
    let bad = QuantizedMatrix::Bf16 { rows: 2, cols: 32, values: vec![] };
    assert!(bad.dequantize_row(1, &mut out).is_err());
}
