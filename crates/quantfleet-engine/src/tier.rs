//! Precision tiers at load: a `TierSpec` (the API type) turns the model's fp32-dequantized weights into
//! BF16, FP8 E4M3, INT8 or INT4 (RTN, AWQ, GPTQ) matrices through `quantfleet-quant`, honouring per-layer
//! overrides through the planner's own resolution (`quantfleet_api::plan::weight_spec_for`), so what the
//! engine stores is what the fit planner counted.
//!
//! AWQ and GPTQ calibrate on real activations: the calibration text (bundled `calibration/calibration.txt`,
//! a mix of chat, math, code, function-call and prose items, unless another is given) is cut into the tier's
//! `calibration.samples` windows of `calibration.sequenceLength` tokens, capped by
//! `LoadOptions::calibration_tokens` ([`calibration_windows`]), and runs through the model once, layer by layer,
//! each window its own sequence; each layer's linears are quantized from the inputs they see, and the pass
//! continues with the quantized layer (sequential calibration, as GPTQ does), so later layers calibrate on the
//! activations they will really get. GPTQ also covers lm_head (the final norm's output is its input; with tied
//! embeddings the token lookup reads the same codes) and, for per-channel INT8 and FP8, quantizes columns in
//! act-order, which has no run-time cost without groups.
//! AWQ searches one set of input scales per shared input (q/k/v after the attention norm, gate/up after the
//! FFN norm) and one each for o_proj and down_proj; the scales are kept beside the matrix and divide the input
//! at run time (`PackedMatrix::input_scales`), so nothing needs folding.
//! SmoothQuant (W8A8) runs on the same pass: each linear gets its own per-input-channel smoothing factors
//! (alpha searched on its calibration inputs, `quantfleet_quant::smoothquant`), kept like AWQ's scales.
//! AWQ and SmoothQuant leave the embeddings and lm_head at RTN in their format (their input scales would have
//! to divide the tied token lookup as well).
//!
//! Activations: a tier with `activations: int8` (W8A8 with int8 weights, W4A8 with int4 weights) quantizes
//! the input of every int8/int4 matrix product at run time, per token in blocks of 32 (`ActivationQuant::Int8`),
//! and multiplies in integers, lm_head included when it is int8/int4 (as llama.cpp does; keep lm_head at bf16
//! with an override to keep its input in f32, as vLLM's W8A8 schemes do). Matrices kept at bf16 by an override
//! keep f32 inputs, and the embedding lookup is unaffected. FP8 activations are refused: the CPU has no FP8
//! arithmetic to make them worth emulating. With `activations: bf16` (the default: weight-only tiers) every
//! matrix rounds its input to bf16 (`ActivationQuant::Bf16`), which lets CPUs with AVX-512 BF16 multiply it by
//! bf16 dot products (BF16 and INT4 weights as llama.cpp does for BF16; INT8 and FP8 weights are exact in
//! bf16 too), as a GPU's W8A16/W4A16 kernels take bf16 activations. `fp16` activations keep f32 inputs (at
//! least the precision asked for).

use std::num::NonZeroUsize;
use std::ops::Range;
use std::time::Instant;

use quantfleet_api::model::{CalibrationSpec, ModelArchitecture, TierSpec, WeightSpec};
use quantfleet_api::plan::{TensorSite, weight_spec_for};
use quantfleet_api::vocab::{
    ActivationPrecision, KvCacheDtype, KvCacheScheme, QuantMethod, WeightFormat as ApiFormat, WeightScaling,
};
use quantfleet_quant::awq::{AwqConfig, awq_shared_input};
use quantfleet_quant::gptq::{GptqConfig, GptqHessian, finish_hessian, gptq_prepared, hessian_accumulate};
use quantfleet_quant::matrix::subsample_rows;
use quantfleet_quant::smoothquant::{ActivationFormat, SmoothQuantConfig, smoothquant};
use quantfleet_quant::{Fp8Format, Fp8Scaling, Int4Config, MatrixRef, ScaleStorage, WeightFormat, quantize_rtn};
use rayon::prelude::*;

use crate::backend::{Backend, KvLayout, SeqSpan};
use crate::cpu::{CpuBackend, CpuMatrix, CpuTensor};
use crate::dtype::dequantize_row_reference;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, KvDtype, SeqKv};
use crate::model::{Llama, Workspace};
use crate::packed::{ActivationQuant, PackedFormat, PackedMatrix};
use crate::tokenizer::Tokenizer;

/// The bundled calibration text (see `calibration/README.md` for its source).
pub const BUILTIN_CALIBRATION: &str = include_str!("../calibration/calibration.txt");

/// How a tier is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Calibration text for AWQ/GPTQ; `None` uses [`BUILTIN_CALIBRATION`].
    pub calibration_text: Option<String>,
    /// Most calibration tokens run through the model: a cap on the tier's `calibration.samples` x
    /// `calibration.sequenceLength` (see [`calibration_windows`]); GPTQ's Hessians use them all. The default
    /// keeps GPTQ's Hessians well above full rank (1536 inputs for SmolLM2's down_proj): on SmolLM2 FP8 with a
    /// bf16 lm_head, `quantfleet eval`'s mean KLD went 0.0076 -> 0.0070 -> 0.0058 from 2048 to 4096 to 8192
    /// tokens. At 8192 an int4-gptq load takes 36-40 s on 2 cores (`tier_bench`, LOAD s): the calibration
    /// forward pass, the Hessians and the down_proj Cholesky inverses take about a quarter each.
    pub calibration_tokens: usize,
    /// AWQ: tokens its searches use (evenly subsampled), alpha grid points (alpha = 0, 1/grid, .., 1) and
    /// clipping ratios. AWQ's cost grows with all three; these defaults keep a 28-layer search to minutes.
    pub awq_tokens: usize,
    pub awq_grid: usize,
    pub awq_clip_grid: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { calibration_text: None, calibration_tokens: 8192, awq_tokens: 64, awq_grid: 10, awq_clip_grid: 4 }
    }
}

/// What loading a tier did.
#[derive(Debug, Clone, Default)]
pub struct TierLoadReport {
    /// Bytes of all weight matrices as stored (packed tiers: owned; native GGUF matrices: their file bytes).
    pub weight_bytes: u64,
    /// Seconds spent quantizing (calibration pass included).
    pub quantize_seconds: f64,
    /// Calibration tokens run (0 when no AWQ/GPTQ matrix was quantized).
    pub calibration_tokens: usize,
    /// `(tensor name, storage format)` of every matrix, in model order.
    pub formats: Vec<(String, String)>,
}

/// The quant-crate format (and method) that a weight spec asks for, or a clear error for what the CPU engine
/// does not implement.
pub fn quant_format(spec: &WeightSpec) -> Result<WeightFormat> {
    let unsupported = |what: String| Err(EngineError::UnsupportedModel(format!("tier weights: {what}")));
    let scaling = spec.effective_scaling();
    match spec.format {
        ApiFormat::Bf16 => Ok(WeightFormat::Bf16),
        ApiFormat::Fp16 => unsupported("fp16 weights are not implemented by the CPU engine (use bf16)".into()),
        ApiFormat::Nvfp4 | ApiFormat::Mxfp4 => {
            unsupported(format!("{} weights need SM100 and are not implemented by the CPU engine", spec.format))
        }
        ApiFormat::Fp8E4m3 => match scaling {
            Some(WeightScaling::PerChannel) => {
                Ok(WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerRow })
            }
            Some(WeightScaling::PerTensor) => {
                Ok(WeightFormat::Fp8 { format: Fp8Format::E4M3, scaling: Fp8Scaling::PerTensor })
            }
            Some(WeightScaling::PerGroup) => match spec.effective_group_size() {
                Some(g @ (32 | 64 | 128 | 256)) => Ok(WeightFormat::Fp8 {
                    format: Fp8Format::E4M3,
                    scaling: Fp8Scaling::PerGroup(NonZeroUsize::new(g as usize).expect("a listed size")),
                }),
                other => {
                    unsupported(format!("fp8-e4m3 per-group scales need groupSize 32, 64, 128 or 256, not {other:?}"))
                }
            },
            None => unsupported("fp8-e4m3 without a scale granularity".into()),
        },
        ApiFormat::Int8 => {
            if scaling != Some(WeightScaling::PerChannel) || !spec.effective_symmetric() {
                return unsupported("int8 weights are symmetric per-channel only".into());
            }
            Ok(WeightFormat::Int8)
        }
        ApiFormat::Int4 => {
            if scaling != Some(WeightScaling::PerGroup) {
                return unsupported(format!("int4 with {scaling:?} scaling (per-group only)"));
            }
            let group = spec.effective_group_size().unwrap_or(128) as usize;
            let mut c =
                if spec.effective_symmetric() { Int4Config::symmetric(group) } else { Int4Config::asymmetric(group) }
                    .map_err(|e| EngineError::UnsupportedModel(format!("tier weights: {e}")))?;
            c.scales = ScaleStorage::F16;
            Ok(WeightFormat::Int4(c))
        }
    }
}

/// The KV cache dtype a tier asks for. `int4` is served with the KIVI scheme (keys per channel, values per
/// token, a full-precision sink and residual window; see `kv_cache::KiviGeometry`) or per token (a scale and
/// zero point per token and head); full-precision windows on the other quantized caches are clear errors.
pub fn kv_dtype(tier: &TierSpec) -> Result<KvDtype> {
    let kv = &tier.kv_cache;
    let dtype = match (kv.dtype, kv.scheme) {
        (KvCacheDtype::Fp16, _) => KvDtype::F16,
        (KvCacheDtype::Bf16, _) => KvDtype::Bf16,
        (KvCacheDtype::Fp8E4m3, _) => KvDtype::Fp8E4m3,
        (KvCacheDtype::Int8, _) => KvDtype::Int8,
        (KvCacheDtype::Int4, KvCacheScheme::Kivi) => {
            let window = |what: &str, n: i32| {
                u32::try_from(n).map_err(|_| {
                    EngineError::UnsupportedModel(format!("tier {}: kvCache.{what} is negative ({n})", tier.name))
                })
            };
            let dtype = KvDtype::Int4Kivi {
                sink_tokens: window("sinkTokens", kv.sink_tokens)?,
                residual_tokens: window("residualTokens", kv.residual_tokens)?,
            };
            // The window's rules do not depend on the model's shape: check them now, before loading.
            dtype.check_window().map_err(|e| match e {
                EngineError::UnsupportedModel(m) => EngineError::UnsupportedModel(format!("tier {}: {m}", tier.name)),
                other => other,
            })?;
            return Ok(dtype);
        }
        (KvCacheDtype::Int4, KvCacheScheme::PerToken) => KvDtype::Int4PerToken,
    };
    if kv.sink_tokens != 0 || kv.residual_tokens != 0 {
        return Err(EngineError::UnsupportedModel(format!(
            "tier {}: sink/residual full-precision windows are implemented only for int4 KIVI caches",
            tier.name
        )));
    }
    Ok(dtype)
}

/// Checks everything about a tier the CPU engine cannot serve before any work is done.
pub fn check_tier(arch: &ModelArchitecture, tier: &TierSpec) -> Result<()> {
    if tier.activations == ActivationPrecision::Fp8E4m3 {
        return Err(EngineError::UnsupportedModel(format!(
            "tier {}: fp8-e4m3 activations are not implemented by the CPU engine (int8 activations are: W8A8/W4A8)",
            tier.name
        )));
    }
    let mut sites = vec![TensorSite::Embedding, TensorSite::LmHead];
    sites.extend((0..arch.num_layers.max(0) as u32).map(TensorSite::Layer));
    for site in sites {
        let spec = weight_spec_for(arch, tier, site);
        let format = quant_format(spec)?;
        let ok = match spec.method {
            QuantMethod::Rtn => true,
            QuantMethod::Awq => matches!(format, WeightFormat::Int4(_)),
            QuantMethod::Gptq => {
                matches!(format, WeightFormat::Int4(_) | WeightFormat::Int8 | WeightFormat::Fp8 { .. })
            }
            QuantMethod::SmoothQuant => {
                matches!(format, WeightFormat::Int8) && tier.activations == ActivationPrecision::Int8
            }
        };
        if !ok {
            return Err(EngineError::UnsupportedModel(format!(
                "tier {}: method {} on {} weights with {} activations is not supported (awq: int4; gptq: \
                 int4/int8/fp8-e4m3; smoothquant: int8 weights with int8 activations)",
                tier.name, spec.method, spec.format, tier.activations
            )));
        }
    }
    Ok(())
}

/// The model's shape in the API's terms (for override resolution).
pub fn architecture(model: &Llama<CpuBackend>) -> ModelArchitecture {
    let c = &model.config;
    ModelArchitecture {
        num_layers: c.n_layers as i32,
        hidden_size: c.d_model as i32,
        intermediate_size: c.d_ff as i32,
        num_attention_heads: c.n_heads as i32,
        num_key_value_heads: c.n_kv_heads as i32,
        head_dim: c.head_dim as i32,
        vocab_size: c.vocab as i32,
        tied_embeddings: model.output.is_none(),
        max_position_embeddings: c.context as i32,
    }
}

/// The fp32 values of a matrix (dequantizing a GGUF block matrix, or a packed one).
pub fn matrix_f32(m: &CpuMatrix) -> Result<Vec<f32>> {
    let (rows, cols) = m.shape();
    let mut out = vec![0.0f32; rows * cols];
    match m {
        CpuMatrix::Gguf { .. } => {
            let (ty, data) = m.gguf_data().expect("GGUF matrix");
            let rb = data.len() / rows;
            out.par_chunks_mut(cols)
                .enumerate()
                .try_for_each(|(r, o)| dequantize_row_reference(ty, &data[r * rb..(r + 1) * rb], o))?;
        }
        CpuMatrix::Packed(p) => {
            out.par_chunks_mut(cols).enumerate().try_for_each(|(r, o)| p.dequantize_row_reference(r, o))?;
        }
    }
    Ok(out)
}

fn quant_err(name: &str) -> impl Fn(quantfleet_quant::QuantError) -> EngineError + '_ {
    move |e| EngineError::UnsupportedModel(format!("quantizing {name}: {e}"))
}

/// Runs `f` on the weights of matrix `name` as f32 (dequantized from whatever format holds them).
fn with_weights<T>(name: &str, m: &CpuMatrix, f: impl FnOnce(&MatrixRef) -> Result<T>) -> Result<T> {
    let (rows, cols) = m.shape();
    let w = matrix_f32(m)?;
    f(&MatrixRef::new("weights", &w, rows, cols).map_err(quant_err(name))?)
}

fn rtn(name: &str, m: &CpuMatrix, format: &WeightFormat) -> Result<PackedMatrix> {
    with_weights(name, m, |w| PackedMatrix::from_quantized(&quantize_rtn(w, format).map_err(quant_err(name))?))
}

/// Quantizes matrices that read the same input `x` (`[tokens, cols]`) with the spec's method.
fn quantize_group(
    names: &[String],
    ms: &[&CpuMatrix],
    x: &CpuTensor,
    spec: &WeightSpec,
    opts: &LoadOptions,
) -> Result<Vec<PackedMatrix>> {
    let format = quant_format(spec)?;
    let name = names.join("+");
    match spec.method {
        QuantMethod::Rtn => names.par_iter().zip(ms.par_iter()).map(|(n, m)| rtn(n, m, &format)).collect(),
        QuantMethod::SmoothQuant => {
            let config = SmoothQuantConfig {
                alpha: None,
                // The search judges each alpha with the runtime's own activation quantization.
                activations: ActivationFormat::Int8Block32,
                weights: format,
                max_tokens: opts.awq_tokens,
            };
            let xr = MatrixRef::new("calibration", &x.data, x.rows, x.cols).map_err(quant_err(&name))?;
            names
                .par_iter()
                .zip(ms.par_iter())
                .map(|(n, m)| {
                    with_weights(n, m, |w| {
                        let r = smoothquant(w, &xr, &config).map_err(quant_err(n))?;
                        let mut p = PackedMatrix::from_quantized(&r.weight)?;
                        // Kept even when no smoothing won (all ones), so every SmoothQuant matrix stores the
                        // same bytes (4 per input feature, as AWQ's scales).
                        p.input_scales = Some(if r.alpha.is_some() { r.smoothing } else { vec![1.0; w.cols()] });
                        Ok(p)
                    })
                })
                .collect()
        }
        QuantMethod::Awq => {
            let ws: Vec<Vec<f32>> = ms.iter().map(|m| matrix_f32(m)).collect::<Result<_>>()?;
            let refs: Vec<MatrixRef> = ws
                .iter()
                .zip(ms)
                .map(|(w, m)| MatrixRef::new("weights", w, m.shape().0, m.shape().1))
                .collect::<std::result::Result<_, _>>()
                .map_err(quant_err(&name))?;
            let xr = MatrixRef::new("calibration", &x.data, x.rows, x.cols).map_err(quant_err(&name))?;
            let mut config = AwqConfig::new(format);
            config.grid = opts.awq_grid;
            config.clip_grid = opts.awq_clip_grid;
            config.max_tokens = opts.awq_tokens;
            let r = awq_shared_input(&refs, &xr, &config).map_err(quant_err(&name))?;
            r.weights
                .iter()
                .map(|q| {
                    let mut p = PackedMatrix::from_quantized(q)?;
                    p.input_scales = Some(r.input_scales.clone());
                    Ok(p)
                })
                .collect()
        }
        QuantMethod::Gptq => {
            let mut config = GptqConfig::new(format);
            config.max_tokens = opts.calibration_tokens;
            // Per-channel and per-tensor formats have no groups for act-order to reorder, so it costs nothing at
            // run time; on SmolLM2 FP8 (bf16 lm_head) it took `quantfleet eval`'s mean KLD from 0.0125 to 0.0080.
            config.act_order = matches!(format, WeightFormat::Int8 | WeightFormat::Fp8 { .. });
            let xr = MatrixRef::new("calibration", &x.data, x.rows, x.cols).map_err(quant_err(&name))?;
            let xs = subsample_rows(&xr, config.max_tokens);
            let xs = MatrixRef::new("calibration", &xs, xs.len() / x.cols, x.cols).map_err(quant_err(&name))?;
            // One Hessian, damped, ordered and factored once for every linear of this input (q/k/v, gate/up).
            let h = GptqHessian::new(parallel_hessian(&xs), x.cols, &config).map_err(quant_err(&name))?;
            names
                .par_iter()
                .zip(ms.par_iter())
                .map(|(n, m)| {
                    with_weights(n, m, |w| {
                        PackedMatrix::from_quantized(&gptq_prepared(w, &h, &config).map_err(quant_err(n))?)
                    })
                })
                .collect()
        }
    }
}

/// GPTQ's layer Hessian 2/n X^T X with its rows split across the rayon pool: each part gets about the same
/// share of the lower triangle (row i costs i + 1 products per token), a few parts per thread.
fn parallel_hessian(x: &MatrixRef<'_>) -> Vec<f64> {
    let (n, d) = (x.rows(), x.cols());
    let parts = (4 * rayon::current_num_threads()).clamp(1, d.max(1));
    // Equal areas under the triangle: part k ends at row d * sqrt(k / parts).
    let mut cuts: Vec<usize> =
        (0..=parts).map(|k| ((d as f64) * (k as f64 / parts as f64).sqrt()).round() as usize).collect();
    cuts.dedup();
    let mut h = vec![0f64; d * d];
    let mut rest = h.as_mut_slice();
    let mut jobs = Vec::with_capacity(cuts.len());
    for w in cuts.windows(2) {
        let (part, tail) = rest.split_at_mut((w[1] - w[0]) * d);
        jobs.push((w[0]..w[1], part));
        rest = tail;
    }
    jobs.into_par_iter().for_each(|(rows, part)| hessian_accumulate(x.data(), n, d, rows, part));
    finish_hessian(h, n, d)
}

/// A matrix of `tier` as it will run: INT8/INT4 weights of an `activations: int8` tier quantize their input at
/// run time; every matrix of an `activations: bf16` tier rounds it to bf16.
fn with_tier_activations(mut p: PackedMatrix, tier: &TierSpec) -> Result<PackedMatrix> {
    let activations = match (tier.activations, p.format) {
        (ActivationPrecision::Int8, PackedFormat::Int8 | PackedFormat::Int4 { .. }) => ActivationQuant::Int8,
        (ActivationPrecision::Bf16, _) => ActivationQuant::Bf16,
        _ => return Ok(p),
    };
    p.activations = activations;
    p.validate()?;
    Ok(p)
}

/// Re-quantizes every matrix of `model` (loaded natively from its GGUF file) as `tier` asks.
pub fn apply_tier(
    model: &mut Llama<CpuBackend>,
    tokenizer: &Tokenizer,
    tier: &TierSpec,
    opts: &LoadOptions,
) -> Result<TierLoadReport> {
    let started = Instant::now();
    let arch = architecture(model);
    check_tier(&arch, tier)?;
    let be = model.backend.clone();
    let n_layers = model.config.n_layers;
    let layer_spec = |l: usize| weight_spec_for(&arch, tier, TensorSite::Layer(l as u32));
    // Tied: the embedding matrix is lm_head too (the planner resolves both sites to the same spec).
    let head_site = if model.output.is_some() { TensorSite::LmHead } else { TensorSite::Embedding };
    let head_spec = weight_spec_for(&arch, tier, head_site);
    let head_gptq = head_spec.method == QuantMethod::Gptq;
    let calibrate = head_gptq || (0..n_layers).any(|l| layer_spec(l).method.needs_calibration());
    let mut report = TierLoadReport::default();

    let mut head_input = None;
    if calibrate {
        let cal = calibrate_layers(model, tokenizer, &arch, tier, opts, head_gptq)?;
        report.calibration_tokens = cal.tokens;
        head_input = cal.head_input;
    } else {
        // RTN everywhere: each matrix independently, in parallel.
        let jobs: Vec<(usize, usize)> = (0..n_layers).flat_map(|l| (0..7).map(move |i| (l, i))).collect();
        let packed: Vec<PackedMatrix> = jobs
            .par_iter()
            .map(|&(l, i)| {
                let spec = layer_spec(l);
                let m = model.layers[l].matrices()[i];
                with_tier_activations(rtn(&format!("blk.{l}.{}", LAYER_NAMES[i]), m, &quant_format(spec)?)?, tier)
            })
            .collect::<Result<_>>()?;
        for ((l, i), p) in jobs.into_iter().zip(packed) {
            *model.layers[l].matrices_mut()[i] = be.upload_packed(p)?;
        }
    }
    // lm_head: GPTQ on the final norm's output over the calibration text when its spec asks for it (with
    // tied embeddings the token lookup then reads the GPTQ codes too); RTN otherwise. AWQ and SmoothQuant
    // leave it at RTN: their input scales would have to divide the tied lookup as well.
    let head = |name: &str, m: &CpuMatrix| -> Result<PackedMatrix> {
        let packed = match &head_input {
            Some(x) => quantize_group(&[name.to_owned()], &[m], x, head_spec, opts)?.remove(0),
            None => rtn(name, m, &quant_format(head_spec)?)?,
        };
        with_tier_activations(packed, tier)
    };
    match &model.output {
        None => model.tok_embd = be.upload_packed(head("token_embd", &model.tok_embd)?)?,
        Some(out) => {
            let out = be.upload_packed(head("output", out)?)?;
            model.output = Some(out);
            let embd_spec = weight_spec_for(&arch, tier, TensorSite::Embedding);
            let packed = rtn("token_embd", &model.tok_embd, &quant_format(embd_spec)?)?;
            model.tok_embd = be.upload_packed(with_tier_activations(packed, tier)?)?;
        }
    }
    report.quantize_seconds = started.elapsed().as_secs_f64();
    report.formats = model_formats(model);
    report.weight_bytes = model_weight_bytes(model);
    Ok(report)
}

/// Names of a layer's matrices in `Layer::matrices` order.
pub const LAYER_NAMES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// `(tensor name, format)` of every matrix.
pub fn model_formats(model: &Llama<CpuBackend>) -> Vec<(String, String)> {
    let mut out = vec![("token_embd".to_owned(), model.tok_embd.format_name())];
    for (l, layer) in model.layers.iter().enumerate() {
        for (name, m) in LAYER_NAMES.iter().zip(layer.matrices()) {
            out.push((format!("blk.{l}.{name}"), m.format_name()));
        }
    }
    if let Some(o) = &model.output {
        out.push(("output".to_owned(), o.format_name()));
    }
    out
}

/// Bytes of every weight matrix as stored (norm vectors excluded).
pub fn model_weight_bytes(model: &Llama<CpuBackend>) -> u64 {
    let mut total = model.tok_embd.storage_bytes() as u64;
    for layer in &model.layers {
        total += layer.matrices().iter().map(|m| m.storage_bytes() as u64).sum::<u64>();
    }
    total + model.output.as_ref().map_or(0, |o| o.storage_bytes() as u64)
}

/// The calibration sequences cut from `n_text` tokens of calibration text: consecutive windows of the tier's
/// `calibration.sequenceLength` tokens (at most the model's context), at most `calibration.samples` of them and
/// at most `cap` tokens in all. A shorter last window is kept when it has 16 tokens or more.
pub fn calibration_windows(n_text: usize, spec: &CalibrationSpec, cap: usize, context: usize) -> Vec<Range<usize>> {
    let len = (spec.sequence_length.max(1) as usize).min(context.max(1));
    let budget = n_text.min(cap).min(len.saturating_mul(spec.samples.max(0) as usize));
    (0..budget)
        .step_by(len)
        .map(|start| start..(start + len).min(budget))
        .filter(|w| w.len() >= MIN_CALIBRATION_TOKENS)
        .collect()
}

/// Fewest tokens in a calibration sequence (and in all).
const MIN_CALIBRATION_TOKENS: usize = 16;

/// What the calibration pass saw.
struct Calibration {
    tokens: usize,
    /// The final norm's output over every calibration token: lm_head's input, kept when lm_head uses GPTQ.
    head_input: Option<CpuTensor>,
}

/// The sequential calibration pass (see the module docs) over [`calibration_windows`] of the calibration
/// text, each window its own sequence (positions from 0, attention within the window).
fn calibrate_layers(
    model: &mut Llama<CpuBackend>,
    tokenizer: &Tokenizer,
    arch: &ModelArchitecture,
    tier: &TierSpec,
    opts: &LoadOptions,
    keep_head_input: bool,
) -> Result<Calibration> {
    let text = opts.calibration_text.as_deref().unwrap_or(BUILTIN_CALIBRATION);
    let text_tokens = tokenizer.encode(text)?;
    let spec = tier.calibration.clone().unwrap_or_default();
    let windows = calibration_windows(text_tokens.len(), &spec, opts.calibration_tokens, model.config.context);
    if windows.is_empty() {
        return Err(EngineError::InvalidRequest(format!(
            "calibration text gives {} tokens (sequenceLength {}, at most {} used); AWQ/GPTQ/SmoothQuant need \
             at least {MIN_CALIBRATION_TOKENS}",
            text_tokens.len(),
            spec.sequence_length,
            opts.calibration_tokens
        )));
    }
    let tokens: Vec<u32> = windows.iter().flat_map(|w| text_tokens[w.clone()].iter().copied()).collect();
    let n = tokens.len();
    let be = model.backend.clone();
    let c = model.config.clone();
    // One layer's keys and values at a time: the pass finishes a layer before the next one starts, so every
    // layer writes and reads layer 0 of a one-layer cache (an all-layer f32 cache of 8192 tokens would hold
    // 360 MiB on SmolLM2 for nothing).
    let layout = KvLayout { n_layers: 1, ..c.kv_layout(crate::kv_cache::DEFAULT_BLOCK_TOKENS) };
    let blocks: usize = windows.iter().map(|w| w.len().div_ceil(layout.block_tokens)).sum();
    let mut kv = KvCache::with_budget(&be, layout, blocks * layout.block_elems() * 4)?;
    let mut seqs: Vec<SeqKv> = windows.iter().map(|_| SeqKv::default()).collect();
    for (seq, w) in seqs.iter_mut().zip(&windows) {
        kv.reserve(seq, w.len())?;
    }
    let mut ws: Workspace<CpuBackend> = model.new_workspace();
    ws.rope.fill(windows.iter().flat_map(|w| 0..w.len()), c.head_dim, c.rope_base);
    be.embed(&model.tok_embd, &tokens, &mut ws.x)?;
    let mut row0 = 0;
    let spans: Vec<SeqSpan> = seqs
        .iter()
        .zip(&windows)
        .map(|(seq, w)| {
            let span = SeqSpan { row0, n_tokens: w.len(), start_pos: 0, block_table: &seq.block_table };
            row0 += w.len();
            span
        })
        .collect();
    for l in 0..c.n_layers {
        let spec = weight_spec_for(arch, tier, TensorSite::Layer(l as u32));
        let names = |idx: &[usize]| idx.iter().map(|&i| format!("blk.{l}.{}", LAYER_NAMES[i])).collect::<Vec<_>>();
        let requantize = |model: &mut Llama<CpuBackend>, idx: &[usize], x: &CpuTensor| -> Result<()> {
            let mats: Vec<&CpuMatrix> = idx.iter().map(|&i| model.layers[l].matrices()[i]).collect();
            let packed = quantize_group(&names(idx), &mats, x, spec, opts)?;
            for (&i, p) in idx.iter().zip(packed) {
                *model.layers[l].matrices_mut()[i] = be.upload_packed(with_tier_activations(p, tier)?)?;
            }
            Ok(())
        };
        be.rms_norm(&ws.x, &model.layers[l].attn_norm, c.rms_eps, &mut ws.h)?;
        requantize(model, &[0, 1, 2], &ws.h)?;
        let layer = &model.layers[l];
        be.matmul_many(&[&layer.wq, &layer.wk, &layer.wv], &ws.h, &mut [&mut ws.q, &mut ws.k, &mut ws.v])?;
        be.rope(&mut ws.q, c.head_dim, &ws.rope)?;
        be.rope(&mut ws.k, c.head_dim, &ws.rope)?;
        be.kv_write(&mut kv.storage, 0, &ws.k, &ws.v, &spans)?;
        be.attention(&ws.q, &kv.storage, 0, &spans, &mut ws.attn)?;
        requantize(model, &[3], &ws.attn)?;
        be.matmul(&model.layers[l].wo, &ws.attn, &mut ws.proj)?;
        be.add_assign(&mut ws.x, &ws.proj)?;

        be.rms_norm(&ws.x, &model.layers[l].ffn_norm, c.rms_eps, &mut ws.h)?;
        requantize(model, &[4, 5], &ws.h)?;
        let layer = &model.layers[l];
        be.matmul_many(&[&layer.gate, &layer.up], &ws.h, &mut [&mut ws.gate, &mut ws.up])?;
        be.swiglu(&ws.gate, &ws.up, &mut ws.act)?;
        requantize(model, &[6], &ws.act)?;
        be.matmul(&model.layers[l].down, &ws.act, &mut ws.proj)?;
        be.add_assign(&mut ws.x, &ws.proj)?;
    }
    drop(spans);
    for seq in &mut seqs {
        kv.release(seq);
    }
    let head_input = if keep_head_input {
        be.rms_norm(&ws.x, &model.output_norm, c.rms_eps, &mut ws.h)?;
        Some(std::mem::take(&mut ws.h))
    } else {
        None
    };
    Ok(Calibration { tokens: n, head_input })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(samples: i32, sequence_length: i32) -> CalibrationSpec {
        CalibrationSpec { samples, sequence_length, ..CalibrationSpec::default() }
    }

    #[test]
    fn calibration_windows_follow_samples_length_cap_and_context() {
        // samples x sequenceLength within the text and the cap: whole windows.
        assert_eq!(calibration_windows(10_000, &spec(3, 512), 4096, 8192), vec![0..512, 512..1024, 1024..1536]);
        // The cap cuts the last window; a remainder of 16 tokens or more is kept.
        assert_eq!(calibration_windows(10_000, &spec(8, 512), 1040, 8192), vec![0..512, 512..1024, 1024..1040]);
        // ... and a shorter one dropped.
        assert_eq!(calibration_windows(10_000, &spec(8, 512), 1030, 8192), vec![0..512, 512..1024]);
        // A short text gives what it has.
        assert_eq!(calibration_windows(700, &spec(128, 512), 4096, 8192), vec![0..512, 512..700]);
        // Windows never exceed the model's context.
        assert_eq!(calibration_windows(10_000, &spec(2, 8192), 4096, 1024), vec![0..1024, 1024..2048]);
        // Fewer than 16 tokens in all: nothing, which the calibration pass turns into a clear error.
        assert!(calibration_windows(15, &spec(1, 512), 4096, 8192).is_empty());
        assert!(calibration_windows(10_000, &spec(1, 512), 8, 8192).is_empty());
    }
}
