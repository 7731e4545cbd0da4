//! BF16 and FP16 conversions (round to nearest even) through the `half` crate, for slices.

pub use half::{bf16, f16};

/// f32 -> bf16, round to nearest even; NaN stays NaN.
pub fn to_bf16_slice(src: &[f32]) -> Vec<bf16> {
    src.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// f32 -> f16, round to nearest even; overflow becomes ±inf as IEEE specifies.
pub fn to_f16_slice(src: &[f32]) -> Vec<f16> {
    src.iter().map(|&x| f16::from_f32(x)).collect()
}

/// bf16 -> f32 (exact).
pub fn from_bf16_slice(src: &[bf16]) -> Vec<f32> {
    src.iter().map(|x| x.to_f32()).collect()
}

/// f16 -> f32 (exact).
pub fn from_f16_slice(src: &[f16]) -> Vec<f32> {
    src.iter().map(|x| x.to_f32()).collect()
}
