//! Quantfleet's quantization numerics: number formats, packed weight containers, weight quantizers
//! (RTN, AWQ, GPTQ, SmoothQuant), KV-cache quantizers (per-token FP8/INT8, KIVI INT4) and the Hadamard
//! rotation the per-token ones are stored in, and a per-layer sensitivity report. Pure Rust, no I/O, no
//! async: the engine, the CLI and tests all call it directly.
//!
//! Conventions used throughout:
//! * Weight matrices are row-major f32 `[out_features x in_features]`; a "row" is one output channel.
//! * Calibration activations are row-major f32 `[n_tokens x in_features]`.
//! * Every public entry point validates its input and returns [`QuantError`]; nothing panics on bad input.

pub mod awq;
pub mod error;
pub mod fp4;
pub mod fp4_matrix;
pub mod fp8;
pub mod fp8_matrix;
pub mod gptq;
pub mod hadamard;
pub mod halfp;
pub mod int4;
pub mod int8;
pub mod kv;
pub mod linalg;
pub mod matrix;
pub mod quantized;
pub mod sensitivity;
pub mod simd;
pub mod smoothquant;
pub mod synthetic;

pub use error::{QuantError, Result};
pub use fp4_matrix::{Fp4Kind, Fp4Matrix};
pub use fp8::{Fp8Format, Saturation};
pub use fp8_matrix::{Fp8Matrix, Fp8Scaling};
pub use int4::{GroupSize, Int4Config, Int4Matrix, ScaleStorage};
pub use int8::Int8Matrix;
pub use matrix::MatrixRef;
pub use quantized::{QuantizedMatrix, WeightFormat, quantize_rtn};
pub use simd::Isa;
