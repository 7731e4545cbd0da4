//! ggml tensor element types as they appear in GGUF files: their ids, block geometry (elements per block,
//! bytes per block), and the scalar reference dequantization of the types this engine computes with.
//!
//! Every type id llama.cpp defines is listed so that a file using, say, Q6_K is still parsed and bounds-checked;
//! computing with it is a separate, explicit error (`EngineError::UnsupportedTensorType`).

use half::{bf16, f16};

/// A ggml element type (`enum ggml_type` ids, stable across GGUF versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
        }
    }

    /// Elements per block: a row's length must be a multiple of this.
    pub fn block_elems(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => 256,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn block_bytes(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
        }
    }

    /// Bytes of one row of `elems` elements, or None if `elems` is not a whole number of blocks.
    pub fn row_bytes(self, elems: u64) -> Option<u64> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Whether this engine can dequantize and compute with the type.
    pub fn is_computable(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }
}

/// Reads the little-endian f16 at `b[0..2]` (block scales are stored unaligned inside blocks).
#[inline(always)]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Scalar reference dequantization of one row: `bytes` holds exactly `out.len()` elements of `ty`.
/// Fast paths are tested against this, so it is written for obviousness, not speed.
pub fn dequantize_row_reference(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> crate::Result<()> {
    let expected = ty.row_bytes(out.len() as u64);
    if expected != Some(bytes.len() as u64) {
        return Err(crate::EngineError::InvalidRequest(format!(
            "{} row of {} elements needs {:?} bytes, got {}",
            ty.name(),
            out.len(),
            expected,
            bytes.len()
        )));
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_at(c);
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            // block: f16 scale d, then 32 signed bytes; x = d * q.
            for (o, blk) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(blk);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * (blk[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            // block: f16 scale d, f16 minimum m, 16 bytes of nibbles; element j < 16 is the low nibble of byte j,
            // element j + 16 its high nibble; x = d * q + m.
            for (o, blk) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_at(blk);
                let m = f16_at(&blk[2..]);
                for j in 0..16 {
                    let byte = blk[4 + j];
                    o[j] = d * (byte & 0x0f) as f32 + m;
                    o[j + 16] = d * (byte >> 4) as f32 + m;
                }
            }
        }
        other => return Err(crate::EngineError::UnsupportedTensorType(other.name())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_id_round_trips_and_unknown_ids_are_rejected() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert!(t.block_bytes() > 0 && t.block_elems() > 0, "{}", t.name());
            }
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
        assert_eq!(GgmlType::from_id(31), None);
        assert_eq!(GgmlType::from_id(3), Some(GgmlType::Q4_1));
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    }

    #[test]
    fn row_bytes_rejects_partial_blocks() {
        assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(GgmlType::Q4_1.row_bytes(577), None);
        assert_eq!(GgmlType::F16.row_bytes(3), Some(6));
    }

    #[test]
    fn q4_1_and_q8_0_dequantize_by_hand_computed_values() {
        // Synthetic blocks: Q4_1 with d = 0.5, m = -1.0; byte j = (j+1) << 4 | j.
        let mut q41 = Vec::new();
        q41.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        q41.extend_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        q41.extend((0..16u8).map(|j| ((j + 1) & 0x0f) << 4 | j));
        let mut out = [0.0f32; 32];
        dequantize_row_reference(GgmlType::Q4_1, &q41, &mut out).unwrap();
        assert_eq!(out[0], -1.0);
        assert_eq!(out[3], 0.5);
        assert_eq!(out[16], -0.5); // high nibble of byte 0 is 1
        assert_eq!(out[31], -1.0); // high nibble of byte 15 is (16 & 15) = 0

        let mut q80 = Vec::new();
        q80.extend_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        q80.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
        dequantize_row_reference(GgmlType::Q8_0, &q80, &mut out).unwrap();
        assert_eq!(out[0], -4.0);
        assert_eq!(out[16], 0.0);
        assert_eq!(out[31], 3.75);
    }

    #[test]
    fn half_floats_dequantize_exactly() {
        let vals = [1.5f32, -2.0, 0.0, 65504.0];
        let f16s: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect();
        let bf16s: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
        let mut out = [0.0f32; 4];
        dequantize_row_reference(GgmlType::F16, &f16s, &mut out).unwrap();
        assert_eq!(out, vals);
        dequantize_row_reference(GgmlType::BF16, &bf16s, &mut out).unwrap();
        assert_eq!(&out[..3], &vals[..3]);
        assert_eq!(out[3], 65536.0, "bf16 keeps 8 mantissa bits: 65504 rounds to 65536");
    }

    #[test]
    fn wrong_length_and_uncomputable_types_are_errors() {
        let mut out = [0.0f32; 32];
        assert!(dequantize_row_reference(GgmlType::Q4_1, &[0u8; 19], &mut out).is_err());
        assert!(dequantize_row_reference(GgmlType::Q6K, &[0u8; 0], &mut out[..0]).is_err());
    }
}
