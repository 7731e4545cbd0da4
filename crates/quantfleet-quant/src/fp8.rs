//! FP8 E4M3 (OCP "fn": finite, max 448, one NaN code per sign) and E5M2 (IEEE-like, with infinities).
//!
//! Conversions from f32 round to nearest, ties to even, directly from the f32 bits (no double rounding).
//! Overflow is an explicit choice ([`Saturation`]):
//! * `NonSaturating` follows ml-dtypes: E4M3 turns |x| > 464 (the tie point above 448) and ±inf into NaN;
//!   E5M2 turns |x| >= 61440 and ±inf into ±inf.
//! * `Saturating` clamps every finite overflow and ±inf to ±max finite (448 / 57344), like CUDA's
//!   `__NV_SATFINITE`. This is what the quantizers use: a scaled weight can never become NaN.
//!
//! NaN always encodes to the format's canonical quiet NaN with the input's sign (0x7F / 0x7E).

use crate::error::{QuantError, Result};
use crate::simd::{Isa, multiversion};

/// An 8-bit floating-point format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits (bias 7), 3 mantissa bits, finite only; max 448, min subnormal 2^-9.
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits, with ±inf; max 57344, min subnormal 2^-16.
    E5M2,
}

/// What happens to values beyond the largest finite magnitude.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Saturation {
    /// Clamp finite overflow and ±inf to ±max finite.
    Saturating,
    /// Overflow to NaN (E4M3) or ±inf (E5M2), as IEEE rounding of an unbounded exponent would.
    NonSaturating,
}

/// Constants that describe one small float format for the shared encoder.
#[derive(Clone, Copy)]
pub(crate) struct MiniSpec {
    pub man_bits: u32,
    pub bias: i32,
    /// Largest finite magnitude code (sign bit clear).
    pub max_code: u32,
    /// Magnitude code produced by non-saturating overflow (NaN for E4M3, inf for E5M2).
    pub overflow_code: u32,
    /// Magnitude code of NaN.
    pub nan_code: u32,
    /// Position of the sign bit.
    pub sign_shift: u32,
}

pub(crate) const E4M3_SPEC: MiniSpec =
    MiniSpec { man_bits: 3, bias: 7, max_code: 0x7E, overflow_code: 0x7F, nan_code: 0x7F, sign_shift: 7 };
pub(crate) const E5M2_SPEC: MiniSpec =
    MiniSpec { man_bits: 2, bias: 15, max_code: 0x7B, overflow_code: 0x7C, nan_code: 0x7E, sign_shift: 7 };

impl MiniSpec {
    /// Smallest normal magnitude, 2^(1-bias).
    fn min_normal(&self) -> f32 {
        f32::from_bits(((128 - self.bias) as u32) << 23)
    }

    /// Reference encoder: obviously-correct branches, one element at a time.
    pub(crate) fn encode_ref(&self, x: f32, sat: Saturation) -> u32 {
        let sign = if x.is_sign_negative() { 1u32 << self.sign_shift } else { 0 };
        if x.is_nan() {
            return sign | self.nan_code;
        }
        let a = x.abs();
        let overflow = match sat {
            Saturation::Saturating => self.max_code,
            Saturation::NonSaturating => self.overflow_code,
        };
        if a.is_infinite() {
            return sign | overflow;
        }
        let mag = if a < self.min_normal() {
            // Subnormal range: count multiples of the smallest subnormal 2^(1-bias-man_bits).
            // The power-of-two product is exact, so rounding happens once, here.
            let steps = a * f32::from_bits(((127 + self.bias - 1 + self.man_bits as i32) as u32) << 23);
            steps.round_ties_even() as u32
        } else {
            // Keep man_bits of the f32 mantissa, rounding the dropped bits to nearest even; a carry
            // into the exponent is exactly the right result. Then move from bias 127 to the format's bias.
            let bits = a.to_bits();
            let shift = 23 - self.man_bits;
            let rounded = (bits + (1 << (shift - 1)) - 1 + ((bits >> shift) & 1)) >> shift;
            rounded - (((127 - self.bias) as u32) << self.man_bits)
        };
        if mag > self.max_code { sign | overflow } else { sign | mag }
    }

    /// Reference decoder from the bit fields.
    pub(crate) fn decode_ref(&self, code: u32, has_inf: bool) -> f32 {
        let sign = if (code >> self.sign_shift) & 1 == 1 { -1.0f32 } else { 1.0 };
        let mag = code & ((1 << self.sign_shift) - 1);
        let exp_mask = (1u32 << (self.sign_shift - self.man_bits)) - 1;
        let e = (mag >> self.man_bits) & exp_mask;
        let m = mag & ((1 << self.man_bits) - 1);
        if e == exp_mask && self.nan_code != 0 {
            if has_inf {
                return if m == 0 { sign * f32::INFINITY } else { f32::NAN.copysign(sign) };
            }
            if mag == self.nan_code {
                return f32::NAN.copysign(sign);
            }
        }
        let frac = m as f32 / (1u32 << self.man_bits) as f32;
        let value = if e == 0 { frac * pow2(1 - self.bias) } else { (1.0 + frac) * pow2(e as i32 - self.bias) };
        sign * value
    }
}

/// Exact 2^e for normal f32 exponents (-126..=127), built from the bits.
pub(crate) fn pow2(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((e + 127) as u32) << 23)
}

impl Fp8Format {
    pub(crate) fn spec(self) -> &'static MiniSpec {
        match self {
            Fp8Format::E4M3 => &E4M3_SPEC,
            Fp8Format::E5M2 => &E5M2_SPEC,
        }
    }

    /// Largest finite value: 448 (E4M3) or 57344 (E5M2).
    pub const fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// Smallest positive normal: 2^-6 (E4M3) or 2^-14 (E5M2).
    pub fn min_normal(self) -> f32 {
        self.spec().min_normal()
    }

    /// Smallest positive subnormal: 2^-9 (E4M3) or 2^-16 (E5M2).
    pub fn min_subnormal(self) -> f32 {
        let s = self.spec();
        pow2(1 - s.bias - s.man_bits as i32)
    }

    /// Relative rounding error bound for normal values: half an ulp, 2^-(mantissa bits + 1).
    pub fn relative_error_bound(self) -> f32 {
        pow2(-(self.spec().man_bits as i32) - 1)
    }

    /// Encode one value (scalar reference).
    pub fn encode(self, x: f32, sat: Saturation) -> u8 {
        self.spec().encode_ref(x, sat) as u8
    }

    /// Decode one code (scalar reference from the bit fields).
    pub fn decode(self, code: u8) -> f32 {
        self.spec().decode_ref(code as u32, self == Fp8Format::E5M2)
    }
}

/// Branchless small-float encoder (E4M3, E5M2, E2M1 with its sign at bit 3) used by the vectorised paths;
/// must equal `MiniSpec::encode_ref` bit for bit.
#[inline(always)]
fn encode_kernel<const MAN: u32, const BIAS: i32, const MAX: u32, const OVF: u32, const NAN: u32, const SIGN: u32>(
    x: f32,
) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 31) << SIGN;
    let abs = bits & 0x7FFF_FFFF;
    let min_normal_bits = ((128 - BIAS) as u32) << 23;
    let sub_scale = f32::from_bits(((127 + BIAS - 1 + MAN as i32) as u32) << 23);
    // min() keeps the product tiny (and maps NaN to a finite number) so the int conversion is in range.
    let clamped = f32::from_bits(abs.min(min_normal_bits));
    let sub = crate::simd::round_small(clamped * sub_scale) as u32;
    let shift = 23 - MAN;
    let nrm =
        ((abs + (1 << (shift - 1)) - 1 + ((abs >> shift) & 1)) >> shift).wrapping_sub(((127 - BIAS) as u32) << MAN);
    let mag = if abs < min_normal_bits { sub } else { nrm };
    let mag = if mag > MAX { OVF } else { mag };
    let mag = if abs > 0x7F80_0000 { NAN } else { mag };
    (sign | mag) as u8
}

/// E2M1 (always saturating; NaN becomes a signed zero, as the reference does).
#[inline(always)]
pub(crate) fn encode_e2m1_fast(x: f32) -> u8 {
    encode_kernel::<1, 1, 0x7, 0x7, 0, 3>(x)
}

#[inline(always)]
fn encode_e4m3_sat(x: f32) -> u8 {
    encode_kernel::<3, 7, 0x7E, 0x7E, 0x7F, 7>(x)
}
#[inline(always)]
fn encode_e4m3_nonsat(x: f32) -> u8 {
    encode_kernel::<3, 7, 0x7E, 0x7F, 0x7F, 7>(x)
}
#[inline(always)]
fn encode_e5m2_sat(x: f32) -> u8 {
    encode_kernel::<2, 15, 0x7B, 0x7B, 0x7E, 7>(x)
}
#[inline(always)]
fn encode_e5m2_nonsat(x: f32) -> u8 {
    encode_kernel::<2, 15, 0x7B, 0x7C, 0x7E, 7>(x)
}

/// Branchless E4M3 decoder: place the 7 magnitude bits at the top of the f32 mantissa and multiply by
/// 2^(127-7). Subnormal codes become f32 subnormals and scale exactly; 0x7F is the only NaN.
#[inline(always)]
pub(crate) fn decode_e4m3_kernel(code: u8) -> f32 {
    let c = code as u32;
    let mag = c & 0x7F;
    let v = f32::from_bits(mag << 20) * f32::from_bits((127 + 120) << 23);
    let v = if mag == 0x7F { f32::NAN } else { v };
    f32::from_bits(v.to_bits() | ((c & 0x80) << 24))
}

/// Branchless E5M2 decoder, same trick with 2^(127-15); exponent 31 is inf (mantissa 0) or NaN.
#[inline(always)]
pub(crate) fn decode_e5m2_kernel(code: u8) -> f32 {
    let c = code as u32;
    let mag = c & 0x7F;
    let v = f32::from_bits(mag << 21) * f32::from_bits((127 + 112) << 23);
    let v = if mag >= 0x7C { if mag == 0x7C { f32::INFINITY } else { f32::NAN } } else { v };
    f32::from_bits(v.to_bits() | ((c & 0x80) << 24))
}

multiversion! {
    fn encode_e4m3_slice_sat(src: &[f32], inv_scale: f32, dst: &mut [u8]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = encode_e4m3_sat(x * inv_scale);
        }
    }
}
multiversion! {
    fn encode_e4m3_slice_nonsat(src: &[f32], inv_scale: f32, dst: &mut [u8]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = encode_e4m3_nonsat(x * inv_scale);
        }
    }
}
multiversion! {
    fn encode_e5m2_slice_sat(src: &[f32], inv_scale: f32, dst: &mut [u8]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = encode_e5m2_sat(x * inv_scale);
        }
    }
}
multiversion! {
    fn encode_e5m2_slice_nonsat(src: &[f32], inv_scale: f32, dst: &mut [u8]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = encode_e5m2_nonsat(x * inv_scale);
        }
    }
}
multiversion! {
    fn decode_e4m3_slice(src: &[u8], scale: f32, dst: &mut [f32]) {
        for (d, &c) in dst.iter_mut().zip(src) {
            *d = decode_e4m3_kernel(c) * scale;
        }
    }
}
multiversion! {
    fn decode_e5m2_slice(src: &[u8], scale: f32, dst: &mut [f32]) {
        for (d, &c) in dst.iter_mut().zip(src) {
            *d = decode_e5m2_kernel(c) * scale;
        }
    }
}

fn check_lengths(src: usize, dst: usize) -> Result<()> {
    if src != dst {
        return Err(QuantError::LengthMismatch { what: "destination slice", expected: src, actual: dst });
    }
    Ok(())
}

/// `dst[i] = encode(src[i] * inv_scale)` on the given ISA (falls back when the CPU lacks it).
/// Multiplying by a precomputed inverse (not dividing) is part of the contract: the reference does the same.
pub fn encode_fp8_slice_isa(
    isa: Isa,
    format: Fp8Format,
    sat: Saturation,
    src: &[f32],
    inv_scale: f32,
    dst: &mut [u8],
) -> Result<()> {
    check_lengths(src.len(), dst.len())?;
    match (format, sat) {
        (Fp8Format::E4M3, Saturation::Saturating) => encode_e4m3_slice_sat(isa, src, inv_scale, dst),
        (Fp8Format::E4M3, Saturation::NonSaturating) => encode_e4m3_slice_nonsat(isa, src, inv_scale, dst),
        (Fp8Format::E5M2, Saturation::Saturating) => encode_e5m2_slice_sat(isa, src, inv_scale, dst),
        (Fp8Format::E5M2, Saturation::NonSaturating) => encode_e5m2_slice_nonsat(isa, src, inv_scale, dst),
    }
    Ok(())
}

/// `dst[i] = encode(src[i] * inv_scale)` on the widest ISA this CPU has.
pub fn encode_fp8_slice(format: Fp8Format, sat: Saturation, src: &[f32], inv_scale: f32, dst: &mut [u8]) -> Result<()> {
    encode_fp8_slice_isa(Isa::detect(), format, sat, src, inv_scale, dst)
}

/// `dst[i] = decode(src[i]) * scale` on the given ISA.
pub fn decode_fp8_slice_isa(isa: Isa, format: Fp8Format, src: &[u8], scale: f32, dst: &mut [f32]) -> Result<()> {
    check_lengths(src.len(), dst.len())?;
    match format {
        Fp8Format::E4M3 => decode_e4m3_slice(isa, src, scale, dst),
        Fp8Format::E5M2 => decode_e5m2_slice(isa, src, scale, dst),
    }
    Ok(())
}

/// `dst[i] = decode(src[i]) * scale` on the widest ISA this CPU has.
pub fn decode_fp8_slice(format: Fp8Format, src: &[u8], scale: f32, dst: &mut [f32]) -> Result<()> {
    decode_fp8_slice_isa(Isa::detect(), format, src, scale, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_reference_on_every_code_and_neighbours() {
        for code in 0..=255u8 {
            for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
                let r = format.decode(code);
                let k = match format {
                    Fp8Format::E4M3 => decode_e4m3_kernel(code),
                    Fp8Format::E5M2 => decode_e5m2_kernel(code),
                };
                assert!(
                    r.to_bits() == k.to_bits()
                        || (r.is_nan() && k.is_nan() && r.is_sign_negative() == k.is_sign_negative()),
                    "{format:?} {code:#x}: {r} vs {k}"
                );
            }
        }
        let mut x = 1e-12f32;
        while x < 1e6 {
            for v in [x, -x, f32::from_bits(x.to_bits() + 1), f32::from_bits(x.to_bits() - 1)] {
                assert_eq!(encode_e4m3_sat(v), Fp8Format::E4M3.encode(v, Saturation::Saturating), "{v}");
                assert_eq!(encode_e4m3_nonsat(v), Fp8Format::E4M3.encode(v, Saturation::NonSaturating), "{v}");
                assert_eq!(encode_e5m2_sat(v), Fp8Format::E5M2.encode(v, Saturation::Saturating), "{v}");
                assert_eq!(encode_e5m2_nonsat(v), Fp8Format::E5M2.encode(v, Saturation::NonSaturating), "{v}");
                assert_eq!(encode_e2m1_fast(v), crate::fp4::encode_e2m1(v), "{v}");
            }
            x *= 1.0137;
        }
        for v in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 0.25, 2.5, 5.0, 7.0] {
            assert_eq!(encode_e2m1_fast(v), crate::fp4::encode_e2m1(v), "{v}");
        }
    }
}
