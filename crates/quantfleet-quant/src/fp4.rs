//! FP4 E2M1 element values and the E8M0 power-of-two scale used by OCP MX formats.
//!
//! E2M1 (OCP MX / NVFP4 element type): 2 exponent bits (bias 1), 1 mantissa bit, no inf and no NaN.
//! Magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}; code bit 3 is the sign. Encoding rounds to nearest even and
//! always saturates (±inf and |x| > 6 become ±6, as ml-dtypes does). NaN has no code: the quantizers reject it
//! before encoding, and the scalar encoder maps it to a signed zero.
//!
//! E8M0 (OCP MX shared scale): an unsigned biased exponent, value 2^(code-127); 0xFF is NaN.

use crate::fp8::{MiniSpec, Saturation};

pub(crate) const E2M1_SPEC: MiniSpec =
    MiniSpec { man_bits: 1, bias: 1, max_code: 0x7, overflow_code: 0x7, nan_code: 0, sign_shift: 3 };

/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// The 16 E2M1 values indexed by code (bit 3 = sign).
pub const E2M1_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Encode one value to an E2M1 code in the low 4 bits (round to nearest even, saturating).
pub fn encode_e2m1(x: f32) -> u8 {
    E2M1_SPEC.encode_ref(x, Saturation::Saturating) as u8
}

/// Decode the low 4 bits of `code` as E2M1.
pub fn decode_e2m1(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// Value of an E8M0 code: 2^(code-127), NaN for 0xFF.
pub fn decode_e8m0(code: u8) -> f32 {
    match code {
        0xFF => f32::NAN,
        // 2^-127 is an f32 subnormal.
        0 => f32::from_bits(1 << 22),
        c => f32::from_bits((c as u32) << 23),
    }
}

/// floor(log2(x)) for finite x > 0, exact (read from the bits, including f32 subnormals).
pub fn floor_log2(x: f32) -> i32 {
    let bits = x.to_bits() & 0x7FFF_FFFF;
    let exp = (bits >> 23) as i32;
    if exp == 0 {
        let mantissa = bits & 0x7F_FFFF;
        (31 - mantissa.leading_zeros() as i32) - 149
    } else {
        exp - 127
    }
}

/// OCP MX shared scale for a block whose largest magnitude is `amax`, as an E8M0 code:
/// X = 2^(floor(log2(amax)) - emax_elem), clamped to the E8M0 range [2^-127, 2^127].
/// (The spec derives it by flooring, not rounding; elements above the element max then saturate.)
/// An all-zero block gets the smallest scale, code 0; every element then encodes to zero anyway.
pub fn mx_shared_scale_e8m0(amax: f32, emax_elem: i32) -> u8 {
    if amax <= 0.0 || !amax.is_finite() {
        return 0;
    }
    let e = (floor_log2(amax) - emax_elem).clamp(-127, 127);
    (e + 127) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_reference_decoder_matches_table() {
        for code in 0..16u32 {
            assert_eq!(E2M1_SPEC.decode_ref(code, false).to_bits(), E2M1_VALUES[code as usize].to_bits());
        }
    }

    #[test]
    fn floor_log2_is_exact_at_powers_and_neighbours() {
        for e in -149..=127 {
            let p = if e >= -126 { f32::from_bits(((e + 127) as u32) << 23) } else { f32::from_bits(1 << (e + 149)) };
            assert_eq!(floor_log2(p), e, "2^{e}");
            if e > -149 {
                assert_eq!(floor_log2(f32::from_bits(p.to_bits() - 1)), e - 1, "below 2^{e}");
            }
        }
    }

    #[test]
    fn mx_scale_floors_instead_of_rounding() {
        // amax 7.9: floor(log2 7.9) = 2, minus emax 2 -> 2^0. Rounding log2 would give 2^1.
        assert_eq!(decode_e8m0(mx_shared_scale_e8m0(7.9, 2)), 1.0);
        assert_eq!(decode_e8m0(mx_shared_scale_e8m0(4.0, 2)), 1.0);
        assert_eq!(decode_e8m0(mx_shared_scale_e8m0(3.99, 2)), 0.5);
        assert_eq!(mx_shared_scale_e8m0(0.0, 2), 0);
        assert_eq!(mx_shared_scale_e8m0(f32::MAX, 2), 252);
        assert_eq!(mx_shared_scale_e8m0(1e-45, 2), 0);
    }
}
