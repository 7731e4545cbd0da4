//! Per-layer sensitivity report: how much each linear weight suffers in a candidate format, measured as
//! weight NMSE and (when calibration inputs are given) output NMSE on those inputs. A tier uses the ranking
//! to keep its most sensitive layers at higher precision (the `layerOverrides` of a QuantizedModel).

use std::fmt::Write as _;

use crate::error::{QuantError, Result};
use crate::matrix::{MatrixRef, check_calibration, nmse, output_nmse};
use crate::quantized::{WeightFormat, quantize_rtn};

/// One layer to assess.
#[derive(Clone, Copy, Debug)]
pub struct LayerInput<'a> {
    pub name: &'a str,
    pub weight: MatrixRef<'a>,
    pub calibration: Option<MatrixRef<'a>>,
}

/// Sensitivity of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSensitivity {
    pub name: String,
    pub weight_nmse: f64,
    pub output_nmse: Option<f64>,
    pub storage_bytes: usize,
}

impl LayerSensitivity {
    /// The number the ranking uses: output NMSE when measured, weight NMSE otherwise.
    pub fn score(&self) -> f64 {
        self.output_nmse.unwrap_or(self.weight_nmse)
    }
}

/// Sensitivity of every layer in one format (RTN).
#[derive(Clone, Debug)]
pub struct SensitivityReport {
    pub format: WeightFormat,
    pub layers: Vec<LayerSensitivity>,
}

/// Quantize each layer with RTN in `format` and measure its errors.
pub fn sensitivity_report(layers: &[LayerInput<'_>], format: &WeightFormat) -> Result<SensitivityReport> {
    if layers.is_empty() {
        return Err(QuantError::Empty { what: "layer list" });
    }
    let mut out = Vec::with_capacity(layers.len());
    for layer in layers {
        let q = quantize_rtn(&layer.weight, format)?;
        let w_hat = q.dequantize();
        let output = match &layer.calibration {
            Some(x) => {
                check_calibration(x, layer.weight.cols())?;
                Some(output_nmse(x, layer.weight.data(), &w_hat, layer.weight.rows()))
            }
            None => None,
        };
        out.push(LayerSensitivity {
            name: layer.name.to_string(),
            weight_nmse: nmse(layer.weight.data(), &w_hat),
            output_nmse: output,
            storage_bytes: q.storage_bytes(),
        });
    }
    Ok(SensitivityReport { format: *format, layers: out })
}

impl SensitivityReport {
    /// Layers from most to least sensitive.
    pub fn ranked(&self) -> Vec<&LayerSensitivity> {
        let mut v: Vec<&LayerSensitivity> = self.layers.iter().collect();
        v.sort_by(|a, b| b.score().total_cmp(&a.score()));
        v
    }

    /// Names of the `k` most sensitive layers (the candidates to keep at higher precision).
    pub fn most_sensitive(&self, k: usize) -> Vec<String> {
        self.ranked().into_iter().take(k).map(|l| l.name.clone()).collect()
    }

    /// A plain-text table, most sensitive first.
    pub fn to_table(&self) -> String {
        let mut s = format!("{:<40} {:>12} {:>12} {:>12}\n", "layer", "weight NMSE", "output NMSE", "bytes");
        for l in self.ranked() {
            let out = l.output_nmse.map_or("-".to_string(), |v| format!("{v:.3e}"));
            // Writing to a String cannot fail.
            let _ = writeln!(s, "{:<40} {:>12.3e} {:>12} {:>12}", l.name, l.weight_nmse, out, l.storage_bytes);
        }
        s
    }
}
