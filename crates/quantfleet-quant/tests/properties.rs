//! Property tests: rounding error within each format's bound, lossless packing, awkward lengths (odd sizes and
//! partial groups such as 17, 1025, 5137 columns) and fast paths equal to the scalar references.

use proptest::prelude::*;
use quantfleet_quant::fp4::{decode_e2m1, encode_e2m1};
use quantfleet_quant::fp8::{decode_fp8_slice_isa, encode_fp8_slice_isa};
use quantfleet_quant::int4::{pack_nibbles, quantize_int4_isa, unpack_nibbles};
use quantfleet_quant::synthetic::SynthRng;
use quantfleet_quant::*;

const AWKWARD: [usize; 7] = [1, 17, 33, 255, 576, 1025, 5137];

fn fp8_format() -> impl Strategy<Value = Fp8Format> {
    prop_oneof![Just(Fp8Format::E4M3), Just(Fp8Format::E5M2)]
}

/// Random matrix whose rows have very different magnitudes (scales must follow them).
fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = SynthRng::new(seed);
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let mag = 10f32.powf(rng.uniform() * 6.0 - 3.0);
        v.extend(rng.normal_vec(cols, mag));
    }
    v
}

proptest! {
    #[test]
    fn fp8_round_trip_error_within_half_ulp(format in fp8_format(), x in -1.0e5f32..1.0e5, sat in any::<bool>()) {
        let sat = if sat { Saturation::Saturating } else { Saturation::NonSaturating };
        let code = format.encode(x, sat);
        let y = format.decode(code);
        if x.abs() <= format.max_finite() {
            let bound = if x.abs() >= format.min_normal() {
                format.relative_error_bound() * x.abs()
            } else {
                format.min_subnormal() / 2.0
            };
            prop_assert!((x - y).abs() <= bound, "{x} -> {y}");
        } else if sat == Saturation::Saturating {
            prop_assert_eq!(y, format.max_finite().copysign(x));
        }
        // Every ISA variant of the slice path agrees with the scalar reference.
        for isa in Isa::available() {
            let mut c = [0u8; 1];
            encode_fp8_slice_isa(isa, format, sat, &[x], 1.0, &mut c).unwrap();
            prop_assert_eq!(c[0], code);
            let mut d = [0f32; 1];
            decode_fp8_slice_isa(isa, format, &c, 1.0, &mut d).unwrap();
            prop_assert!(d[0].to_bits() == y.to_bits() || (d[0].is_nan() && y.is_nan()));
        }
    }

    #[test]
    fn e2m1_round_trip_error_within_half_spacing(x in -6.0f32..6.0) {
        let y = decode_e2m1(encode_e2m1(x));
        let spacing = if x.abs() < 2.0 { 0.5 } else if x.abs() < 4.0 { 1.0 } else { 2.0 };
        prop_assert!((x - y).abs() <= spacing / 2.0, "{x} -> {y}");
    }

    #[test]
    fn nibble_packing_is_lossless(codes in proptest::collection::vec(0u8..16, 0..6000)) {
        let packed = pack_nibbles(&codes);
        prop_assert_eq!(packed.len(), codes.len().div_ceil(2));
        prop_assert_eq!(unpack_nibbles(&packed, codes.len()).unwrap(), codes);
    }

    #[test]
    fn int4_error_within_bound_on_awkward_shapes(
        cols in proptest::sample::select(AWKWARD.to_vec()),
        group in proptest::sample::select(vec![32usize, 64, 128, 256]),
        symmetric in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let rows = 3;
        let data = matrix(rows, cols, seed);
        let w = MatrixRef::new("w", &data, rows, cols).unwrap();
        let config = if symmetric { Int4Config::symmetric(group) } else { Int4Config::asymmetric(group) }.unwrap();
        let reference = quantize_int4_isa(Isa::Scalar, &w, &config).unwrap();
        for isa in Isa::available() {
            prop_assert_eq!(&quantize_int4_isa(isa, &w, &config).unwrap(), &reference, "{:?}", isa);
        }
        prop_assert_eq!(reference.packed.len(), rows * cols.div_ceil(2));
        let mut fast = vec![0f32; cols];
        let mut slow = vec![0f32; cols];
        for r in 0..rows {
            reference.dequantize_row_ref(r, &mut slow).unwrap();
            for isa in Isa::available() {
                reference.dequantize_row_isa(isa, r, &mut fast).unwrap();
                prop_assert_eq!(&fast, &slow);
            }
            for c in 0..cols {
                let s = reference.group_params(r, c / group).scale;
                // Symmetric: half a step. Asymmetric: the rounded zero point can shift the grid by half a step.
                let bound = if symmetric { 0.5 } else { 1.0 } * s * (1.0 + 1e-5);
                prop_assert!((data[r * cols + c] - slow[c]).abs() <= bound, "r{} c{}: {} vs {}", r, c, data[r * cols + c], slow[c]);
            }
        }
    }

    #[test]
    fn double_quantized_and_f16_scales_stay_close_to_f32(cols in proptest::sample::select(AWKWARD.to_vec()), seed in any::<u64>()) {
        let data = matrix(4, cols, seed);
        let w = MatrixRef::new("w", &data, 4, cols).unwrap();
        let base = Int4Config::asymmetric(64).unwrap();
        let errs: Vec<f64> = [ScaleStorage::F32, ScaleStorage::F16, ScaleStorage::DoubleQuant].iter().map(|&scales| {
            let q = quantize_rtn(&w, &WeightFormat::Int4(Int4Config { scales, ..base })).unwrap();
            quantfleet_quant::matrix::nmse(&data, &q.dequantize())
        }).collect();
        prop_assert!(errs[0] < 0.02, "{:?}", errs);
        // f16 keeps 11 significant bits of each scale: its extra error is at the 1e-7 level.
        prop_assert!(errs[1] <= errs[0] * 1.05 + 1e-6, "{:?}", errs);
        // 8-bit scale codes shared across rows of very different magnitude lose the small rows: bounded, not free.
        prop_assert!(errs[2].is_finite() && errs[2] <= 1.0 + 1e-9, "{:?}", errs);
    }

    #[test]
    fn int8_and_fp8_per_row_errors_within_bound(cols in proptest::sample::select(AWKWARD.to_vec()), format in fp8_format(), seed in any::<u64>()) {
        let rows = 3;
        let data = matrix(rows, cols, seed);
        let w = MatrixRef::new("w", &data, rows, cols).unwrap();
        let q8 = quantize_rtn(&w, &WeightFormat::Int8).unwrap();
        let qf = quantize_rtn(&w, &WeightFormat::Fp8 { format, scaling: Fp8Scaling::PerRow }).unwrap();
        let (QuantizedMatrix::Int8(m8), QuantizedMatrix::Fp8(mf)) = (&q8, &qf) else { unreachable!() };
        let (d8, df) = (q8.dequantize(), qf.dequantize());
        for i in 0..rows * cols {
            let r = i / cols;
            // Half a step, plus the f32 rounding of x/s and q*s (a few ulps of |x|, which reaches 127 steps).
            let bound8 = m8.scales[r] * 0.5 + data[i].abs() * 4.0 * f32::EPSILON;
            prop_assert!((data[i] - d8[i]).abs() <= bound8, "{} vs {} (scale {})", data[i], d8[i], m8.scales[r]);
            let s = mf.scale(r, i % cols);
            let bound = format.relative_error_bound() * data[i].abs() * (1.0 + 1e-5) + format.min_subnormal() * s;
            prop_assert!((data[i] - df[i]).abs() <= bound, "{} vs {}", data[i], df[i]);
        }
    }

    /// Per-group FP8 scales: the same bound with each group's own scale, which is the group's amax mapped to
    /// the largest finite value, so no group's scale exceeds its row's.
    #[test]
    fn fp8_per_group_errors_within_bound(cols in proptest::sample::select(AWKWARD.to_vec()), group in proptest::sample::select(vec![1usize, 32, 100, 128]), format in fp8_format(), seed in any::<u64>()) {
        let rows = 3;
        let data = matrix(rows, cols, seed);
        let w = MatrixRef::new("w", &data, rows, cols).unwrap();
        let g = std::num::NonZeroUsize::new(group).unwrap();
        let qg = quantize_rtn(&w, &WeightFormat::Fp8 { format, scaling: Fp8Scaling::PerGroup(g) }).unwrap();
        let qr = quantize_rtn(&w, &WeightFormat::Fp8 { format, scaling: Fp8Scaling::PerRow }).unwrap();
        let (QuantizedMatrix::Fp8(mg), QuantizedMatrix::Fp8(mr)) = (&qg, &qr) else { unreachable!() };
        prop_assert_eq!(mg.scales.len(), rows * cols.div_ceil(group));
        let d = qg.dequantize();
        for i in 0..rows * cols {
            let (r, c) = (i / cols, i % cols);
            let s = mg.scale(r, c);
            prop_assert!(s <= mr.scale(r, c), "group scale {} above the row's {}", s, mr.scale(r, c));
            let amax = data[r * cols + c / group * group..][..group.min(cols - c / group * group)]
                .iter().fold(0f32, |a, v| a.max(v.abs()));
            prop_assert_eq!(s, quantfleet_quant::fp8_matrix::fp8_scale(format, amax));
            let bound = format.relative_error_bound() * data[i].abs() * (1.0 + 1e-5) + format.min_subnormal() * s;
            prop_assert!((data[i] - d[i]).abs() <= bound, "{} vs {}", data[i], d[i]);
        }
    }

    #[test]
    fn fp4_block_formats_error_within_bound(cols in proptest::sample::select(AWKWARD.to_vec()), nv in any::<bool>(), seed in any::<u64>()) {
        let rows = 2;
        let mut rng = SynthRng::new(seed);
        let data = rng.normal_vec(rows * cols, 1.0);
        let w = MatrixRef::new("w", &data, rows, cols).unwrap();
        let kind = if nv { Fp4Kind::Nvfp4 } else { Fp4Kind::Mxfp4 };
        let QuantizedMatrix::Fp4(m) = quantize_rtn(&w, &WeightFormat::Fp4(kind)).unwrap() else { unreachable!() };
        let reference = quantfleet_quant::fp4_matrix::quantize_fp4_ref(&w, kind).unwrap();
        for isa in Isa::available() {
            prop_assert_eq!(&quantfleet_quant::fp4_matrix::quantize_fp4_isa(isa, &w, kind).unwrap(), &reference);
        }
        prop_assert_eq!(&m, &reference);
        let mut out = vec![0f32; cols];
        let mut fast = vec![0f32; cols];
        for r in 0..rows {
            m.dequantize_row_ref(r, &mut out).unwrap();
            for isa in Isa::available() {
                m.dequantize_row_isa(isa, r, &mut fast).unwrap();
                prop_assert_eq!(&fast, &out);
            }
            for c in 0..cols {
                let s = m.block_scale(r, c / kind.block_size());
                // Within 6*s: half the E2M1 spacing (at most 1*s). MX floors its scale, so values up to 8*s
                // saturate to 6*s: at most 2*s.
                let bound = if nv { 1.0 } else { 2.0 } * s * (1.0 + 1e-5);
                prop_assert!((data[r * cols + c] - out[c]).abs() <= bound, "{:?} {} vs {}", kind, data[r * cols + c], out[c]);
            }
        }
    }
}
