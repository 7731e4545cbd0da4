//! Algorithm tests that can fail: on SYNTHETIC seeded layers with planted outlier input channels, AWQ and
//! GPTQ must beat RTN at the same bits, and SmoothQuant must beat naive W8A8, by stated margins, measured on
//! held-out tokens (the second half of the synthetic activations, never seen by the searches).

use quantfleet_quant::awq::{AwqConfig, awq, fold_into_norm};
use quantfleet_quant::gptq::{GptqConfig, gptq};
use quantfleet_quant::matrix::{matmul_xwt, nmse, output_nmse};
use quantfleet_quant::smoothquant::{ActivationFormat, SmoothQuantConfig, smoothquant, w8a8_forward};
use quantfleet_quant::synthetic::{SyntheticLayer, synthetic_layer};
use quantfleet_quant::*;

const OUT: usize = 64;
const IN: usize = 128;
const TOKENS: usize = 256;
const GROUP32: std::num::NonZeroUsize = std::num::NonZeroUsize::new(32).unwrap();

/// (layer, calibration tokens, held-out tokens).
fn layer(seed: u64, gain: f32) -> (SyntheticLayer, Vec<f32>, Vec<f32>) {
    let l = synthetic_layer(OUT, IN, TOKENS, 8, gain, seed);
    let half = TOKENS / 2 * IN;
    let (calib, held) = l.activations.split_at(half);
    let (calib, held) = (calib.to_vec(), held.to_vec());
    (l, calib, held)
}

fn rtn_output_nmse(w: &MatrixRef<'_>, x: &MatrixRef<'_>, format: &WeightFormat) -> f64 {
    output_nmse(x, w.data(), &quantize_rtn(w, format).unwrap().dequantize(), w.rows())
}

#[test]
fn awq_beats_rtn_int4_on_planted_outliers() {
    for (seed, symmetric) in [(11, true), (12, false)] {
        let (l, calib, held) = layer(seed, 20.0);
        let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
        let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
        let xh = MatrixRef::new("held", &held, TOKENS / 2, IN).unwrap();
        let config = if symmetric { Int4Config::symmetric(128) } else { Int4Config::asymmetric(128) }.unwrap();
        let format = WeightFormat::Int4(config);
        let result = awq(&w, &xc, &AwqConfig::new(format)).unwrap();
        let rtn = rtn_output_nmse(&w, &xh, &format);
        let ours = output_nmse(&xh, w.data(), &result.effective_weight(), OUT);
        eprintln!("int4 g128 sym={symmetric}: RTN {rtn:.3e}, AWQ {ours:.3e} (alpha {})", result.alpha);
        // Stated margin: held-out output error at most half of RTN's.
        assert!(ours < 0.5 * rtn, "AWQ {ours} vs RTN {rtn}");
        assert!(result.alpha > 0.0, "the outliers should pull alpha away from plain RTN");
        assert!(result.search_nmse <= result.search_nmse_rtn);

        // Folding 1/s into a preceding norm gain reproduces the unfolded layer exactly (up to f32 rounding).
        let mut gamma = vec![1f32; IN];
        fold_into_norm(&mut gamma, &result.input_scales).unwrap();
        let xs: Vec<f32> = held.iter().enumerate().map(|(i, &v)| v * gamma[i % IN]).collect();
        let folded = matmul_xwt(&xs, TOKENS / 2, &result.weight.dequantize(), OUT, IN);
        let unfolded = matmul_xwt(&held, TOKENS / 2, &result.effective_weight(), OUT, IN);
        assert!(nmse(&unfolded, &folded) < 1e-10);
    }
}

#[test]
fn gptq_beats_rtn_int4_and_int8() {
    // GPTQ needs more calibration tokens than input features, or it overfits the calibration subspace
    // (the Hessian is rank-deficient): 512 tokens, 256 for calibration.
    let l = synthetic_layer(OUT, IN, 512, 8, 20.0, 21);
    let (calib, held) = l.activations.split_at(256 * IN);
    let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
    let xc = MatrixRef::new("calib", calib, 256, IN).unwrap();
    let xh = MatrixRef::new("held", held, 256, IN).unwrap();
    let cases = [
        (WeightFormat::Int4(Int4Config::symmetric(64).unwrap()), false, 0.4),
        (WeightFormat::Int4(Int4Config::asymmetric(128).unwrap()), true, 0.4),
        (
            WeightFormat::Int4(Int4Config { scales: ScaleStorage::DoubleQuant, ..Int4Config::asymmetric(32).unwrap() }),
            false,
            0.4,
        ),
        (WeightFormat::Int8, true, 0.4),
        (WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow }, false, 0.4),
        (WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow }, true, 0.4),
        (WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerTensor }, true, 0.4),
        (WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerGroup(GROUP32) }, true, 0.4),
        (WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerGroup(GROUP32) }, false, 0.4),
    ];
    // Stated margin for every case: held-out output error below 40% of RTN's.
    for (format, act_order, margin) in cases {
        let config = GptqConfig { act_order, block_size: 32, ..GptqConfig::new(format) };
        let q = gptq(&w, &xc, &config).unwrap();
        let rtn = rtn_output_nmse(&w, &xh, &format);
        let ours = output_nmse(&xh, w.data(), &q.dequantize(), OUT);
        eprintln!("{format:?} act_order={act_order}: RTN {rtn:.3e}, GPTQ {ours:.3e}");
        assert!(ours < margin * rtn, "{format:?}: GPTQ {ours} vs RTN {rtn}");
    }
}

/// GPTQ's FP8 matrices keep RTN's layout: the same per-row (per-tensor, per-group) scales, from the original
/// weights' amax, so the fp8 tier stores the same bytes whichever method made it; only the codes differ.
#[test]
fn gptq_fp8_keeps_rtn_scales_and_rejects_a_bad_static_scale() {
    let (l, calib, _) = layer(33, 10.0);
    let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
    let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
    let per_group = Fp8Scaling::PerGroup(std::num::NonZeroUsize::new(48).unwrap());
    for scaling in [Fp8Scaling::PerRow, Fp8Scaling::PerTensor, Fp8Scaling::Static(0.01), per_group] {
        let format = WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling };
        let (QuantizedMatrix::Fp8(g), QuantizedMatrix::Fp8(r)) =
            (gptq(&w, &xc, &GptqConfig::new(format)).unwrap(), quantize_rtn(&w, &format).unwrap())
        else {
            panic!("{scaling:?}: FP8 in, FP8 out");
        };
        assert_eq!(
            (g.rows, g.cols, g.format, &g.scales, g.group_size),
            (r.rows, r.cols, r.format, &r.scales, r.group_size),
            "{scaling:?}"
        );
        assert_ne!(g.codes, r.codes, "{scaling:?}: GPTQ must move some codes off RTN's");
    }
    for bad in [0.0, -1.0, f32::NAN] {
        let format = WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::Static(bad) };
        assert!(matches!(gptq(&w, &xc, &GptqConfig::new(format)), Err(QuantError::InvalidParameter { .. })));
    }
}

#[test]
fn gptq_lazy_blocks_do_not_change_the_result() {
    // Lazy batching is an exact reordering of the same updates: block sizes must agree to f32 rounding.
    let (l, calib, _) = layer(31, 10.0);
    let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
    let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
    let f = WeightFormat::Int8;
    let a = gptq(&w, &xc, &GptqConfig { block_size: 1, ..GptqConfig::new(f) }).unwrap().dequantize();
    let b = gptq(&w, &xc, &GptqConfig { block_size: 128, ..GptqConfig::new(f) }).unwrap().dequantize();
    assert!(nmse(&a, &b) < 1e-6, "{}", nmse(&a, &b));
}

#[test]
fn smoothquant_beats_naive_w8a8() {
    let (l, calib, held) = layer(41, 50.0);
    let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
    let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
    let xh = MatrixRef::new("held", &held, TOKENS / 2, IN).unwrap();
    let reference = matmul_xwt(&held, TOKENS / 2, &l.weight, OUT, IN);
    for config in [SmoothQuantConfig::int8(), SmoothQuantConfig::fp8()] {
        let naive_w = quantize_rtn(&w, &config.weights).unwrap();
        let naive = nmse(&reference, &w8a8_forward(&xh, None, &naive_w, config.activations).unwrap());
        let r = smoothquant(&w, &xc, &config).unwrap();
        let ours = nmse(&reference, &w8a8_forward(&xh, Some(&r.smoothing), &r.weight, r.activations).unwrap());
        eprintln!("{:?}: naive W8A8 {naive:.3e}, SmoothQuant {ours:.3e} (alpha {:?})", config.activations, r.alpha);
        assert!(r.alpha.is_some(), "50x activation outliers must make some smoothing win");
        // Stated margin: at least 2x lower for INT8 (per-token INT8 is crushed by 50x outliers); FP8's
        // exponent absorbs part of the outlier problem, so its margin is 20%.
        let margin = if config.activations == ActivationFormat::Int8 { 0.5 } else { 0.8 };
        assert!(ours < margin * naive, "{:?}: {ours} vs {naive}", config.activations);
    }
}

#[test]
fn bad_algorithm_input_is_a_typed_error() {
    let (l, calib, _) = layer(51, 5.0);
    let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
    let x_wrong = MatrixRef::new("calib", &calib[..(TOKENS / 2) * (IN - 1)], TOKENS / 2, IN - 1).unwrap();
    let f = WeightFormat::Int4(Int4Config::symmetric(32).unwrap());
    assert!(matches!(awq(&w, &x_wrong, &AwqConfig::new(f)), Err(QuantError::CalibrationShape { .. })));
    assert!(matches!(gptq(&w, &x_wrong, &GptqConfig::new(f)), Err(QuantError::CalibrationShape { .. })));
    assert!(matches!(smoothquant(&w, &x_wrong, &SmoothQuantConfig::int8()), Err(QuantError::CalibrationShape { .. })));
    let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
    let fp4 = WeightFormat::Fp4(Fp4Kind::Mxfp4);
    assert!(matches!(gptq(&w, &xc, &GptqConfig::new(fp4)), Err(QuantError::InvalidParameter { .. })));
    assert!(matches!(
        awq(&w, &xc, &AwqConfig { clip_search: true, ..AwqConfig::new(fp4) }),
        Err(QuantError::InvalidParameter { .. })
    ));
    let sq = SmoothQuantConfig { alpha: Some(1.5), ..SmoothQuantConfig::int8() };
    assert!(matches!(smoothquant(&w, &xc, &sq), Err(QuantError::InvalidParameter { .. })));
    let mut nan = l.weight.clone();
    nan[100] = f32::INFINITY;
    assert!(matches!(MatrixRef::new("w", &nan, OUT, IN), Err(QuantError::NonFinite { index: 100, .. })));
    assert!(matches!(MatrixRef::new("w", &[], 0, IN), Err(QuantError::Empty { .. })));
    assert!(matches!(MatrixRef::new("w", &l.weight, OUT, IN + 1), Err(QuantError::LengthMismatch { .. })));
    assert!(matches!(Int4Config::symmetric(48), Err(QuantError::UnsupportedGroupSize(48))));
}

#[test]
fn sensitivity_report_ranks_the_outlier_layer_first() {
    use quantfleet_quant::sensitivity::{LayerInput, sensitivity_report};
    // Three SYNTHETIC layers; only "hot" has planted outlier weights (one per 64, 40x larger), which stretch its
    // INT4 group ranges and crush the other weights, so its errors must be the largest.
    let calm_a = synthetic_layer(OUT, IN, 64, 8, 4.0, 61);
    let mut hot = synthetic_layer(OUT, IN, 64, 8, 4.0, 62);
    hot.weight.iter_mut().step_by(64).for_each(|w| *w *= 40.0);
    let calm_b = synthetic_layer(OUT, IN, 64, 8, 4.0, 63);
    let layers: Vec<(&str, &SyntheticLayer)> = vec![("calm_a", &calm_a), ("hot", &hot), ("calm_b", &calm_b)];
    let inputs: Vec<LayerInput<'_>> = layers
        .iter()
        .map(|(name, l)| LayerInput {
            name,
            weight: MatrixRef::new("w", &l.weight, OUT, IN).unwrap(),
            calibration: Some(MatrixRef::new("x", &l.activations, 64, IN).unwrap()),
        })
        .collect();
    let format = WeightFormat::Int4(Int4Config::symmetric(128).unwrap());
    let report = sensitivity_report(&inputs, &format).unwrap();
    eprintln!("{}", report.to_table());
    assert_eq!(report.most_sensitive(1), vec!["hot".to_string()]);
    let hot_score = report.layers[1].output_nmse.unwrap();
    assert!(hot_score > 2.0 * report.layers[0].output_nmse.unwrap());
    // INT8 is far less sensitive than INT4 on the same layer.
    let int8 = sensitivity_report(&inputs[1..2], &WeightFormat::Int8).unwrap();
    assert!(int8.layers[0].output_nmse.unwrap() < hot_score / 50.0);
    assert!(sensitivity_report(&[], &format).is_err());
}

#[test]
fn awq_shared_input_uses_one_scale_for_all_members_and_beats_rtn() {
    use quantfleet_quant::awq::awq_shared_input;
    // q/k/v-like: three SYNTHETIC weights reading the same input, so one set of scales must serve all three.
    let (l, calib, held) = layer(71, 20.0);
    let mut rng = quantfleet_quant::synthetic::SynthRng::new(72);
    let k_w = rng.normal_vec(32 * IN, 0.02);
    let v_w = rng.normal_vec(32 * IN, 0.02);
    let members = [
        MatrixRef::new("q", &l.weight, OUT, IN).unwrap(),
        MatrixRef::new("k", &k_w, 32, IN).unwrap(),
        MatrixRef::new("v", &v_w, 32, IN).unwrap(),
    ];
    let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
    let xh = MatrixRef::new("held", &held, TOKENS / 2, IN).unwrap();
    let format = WeightFormat::Int4(Int4Config::symmetric(64).unwrap());
    let r = awq_shared_input(&members, &xc, &AwqConfig::new(format)).unwrap();
    assert_eq!(r.weights.len(), 3);
    assert_eq!(r.input_scales.len(), IN);
    for (i, w) in members.iter().enumerate() {
        assert_eq!(r.weights[i].rows(), w.rows());
        let rtn = rtn_output_nmse(w, &xh, &format);
        let ours = output_nmse(&xh, w.data(), &r.effective_weight(i).unwrap(), w.rows());
        eprintln!("member {i}: RTN {rtn:.3e}, shared AWQ {ours:.3e}");
        assert!(ours < 0.75 * rtn, "member {i}: {ours} vs {rtn}");
    }
    assert!(r.effective_weight(3).is_none());
    assert!(matches!(awq_shared_input(&[], &xc, &AwqConfig::new(format)), Err(QuantError::Empty { .. })));
}

#[test]
fn gptq_with_a_shared_hessian_equals_gptq_and_rejects_bad_hessians() {
    use quantfleet_quant::gptq::{gptq_with_hessian, layer_hessian};
    let (l, calib, _) = layer(81, 10.0);
    let w = MatrixRef::new("w", &l.weight, OUT, IN).unwrap();
    let xc = MatrixRef::new("calib", &calib, TOKENS / 2, IN).unwrap();
    let config = GptqConfig::new(WeightFormat::Int4(Int4Config::asymmetric(32).unwrap()));
    let direct = gptq(&w, &xc, &config).unwrap();
    let shared = gptq_with_hessian(&w, layer_hessian(&xc), &config).unwrap();
    assert_eq!(direct, shared);
    assert!(matches!(gptq_with_hessian(&w, vec![1.0; 10], &config), Err(QuantError::LengthMismatch { .. })));
    let mut h = layer_hessian(&xc);
    h[5] = f64::NAN;
    assert!(matches!(gptq_with_hessian(&w, h, &config), Err(QuantError::NonFinite { .. })));
    // An indefinite Hessian (negative diagonal beyond what dampening repairs) is a typed error, not a panic.
    let mut bad = vec![0f64; IN * IN];
    for i in 0..IN {
        bad[i * IN + i] = if i == 3 { -100.0 } else { 1.0 };
    }
    assert!(matches!(gptq_with_hessian(&w, bad, &config), Err(QuantError::NotPositiveDefinite { .. })));
}

/// Per-block-32 activation quantization (the CPU engine's W8A8/W4A8 runtime) confines an outlier's coarse
/// scale to its own block; per-token quantization spreads it over the whole row. Synthetic row: 256 values
/// in [-1, 1] with one outlier of 60.
#[test]
fn block32_activation_quantization_confines_an_outlier() {
    use quantfleet_quant::MatrixRef;
    use quantfleet_quant::smoothquant::{ActivationFormat, fake_quantize_activations};
    let mut x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    x[70] = 60.0;
    let m = MatrixRef::new("x", &x, 1, 256).unwrap();
    let err = |f| {
        let q = fake_quantize_activations(&m, f).unwrap();
        q.iter()
            .zip(&x)
            .enumerate()
            .filter(|(i, _)| !(64..96).contains(i))
            .map(|(_, (a, b))| (a - b).powi(2))
            .sum::<f32>()
    };
    let (token, block) = (err(ActivationFormat::Int8), err(ActivationFormat::Int8Block32));
    // Outside the outlier's block: per-token steps are 60/127, per-block steps about 1/127.
    assert!(block * 100.0 < token, "block {block} vs token {token}");
    let q = fake_quantize_activations(&m, ActivationFormat::Int8Block32).unwrap();
    assert!((q[70] - 60.0).abs() < 1e-5, "the block maximum is exact");
}
