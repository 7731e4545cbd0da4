//! Typed errors for every quantizer entry point: bad input is reported, never a panic.

use thiserror::Error;

/// Why a quantization or dequantization request was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum QuantError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what}: expected {expected} elements, got {actual}")]
    LengthMismatch { what: &'static str, expected: usize, actual: usize },
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFinite { what: &'static str, index: usize, value: f32 },
    #[error("group size {0} is not supported (use 32, 64, 128 or 256)")]
    UnsupportedGroupSize(usize),
    #[error("group size {group_size} does not divide {what} = {len}")]
    GroupSizeNotDividing { what: &'static str, len: usize, group_size: usize },
    #[error("calibration activations have {actual} columns but the weight has {expected} input features")]
    CalibrationShape { expected: usize, actual: usize },
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    #[error("row {row} out of range for a matrix with {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("the Hessian is not positive definite even after dampening (pivot {pivot} at column {column})")]
    NotPositiveDefinite { column: usize, pivot: f64 },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, QuantError>;

/// Fail with [`QuantError::LengthMismatch`] unless `actual == expected` (containers have public fields, so
/// row access re-checks their lengths instead of trusting them).
pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(QuantError::LengthMismatch { what, expected, actual });
    }
    Ok(())
}

/// Fail with [`QuantError::NonFinite`] at the first NaN or infinity in `data`.
pub(crate) fn check_finite(what: &'static str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite { what, index, value: data[index] }),
        None => Ok(()),
    }
}
