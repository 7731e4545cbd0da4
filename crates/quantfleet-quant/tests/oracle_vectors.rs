//! Conversion tests against an independent oracle: vectors produced by PyPI ml-dtypes 0.6.0 with
//! tests/vectors/gen_vectors.py (committed beside its output; Python is only needed to regenerate them).

use quantfleet_quant::fp4::{decode_e2m1, decode_e8m0, encode_e2m1};
use quantfleet_quant::fp8::{decode_fp8_slice_isa, encode_fp8_slice_isa};
use quantfleet_quant::halfp::{bf16, f16};
use quantfleet_quant::{Fp8Format, Isa, Saturation};

/// Parse "<hex> <hex>" lines, skipping '#' comments.
fn pairs(text: &str) -> Vec<(u32, u32)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace().map(|h| u32::from_str_radix(h, 16).expect("hex"));
            (it.next().expect("first column"), it.next().expect("second column"))
        })
        .collect()
}

fn same_value(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan() && a.is_sign_negative() == b.is_sign_negative())
}

const E4M3_DECODE: &str = include_str!("vectors/e4m3_decode.txt");
const E4M3_ENCODE: &str = include_str!("vectors/e4m3_encode.txt");
const E5M2_DECODE: &str = include_str!("vectors/e5m2_decode.txt");
const E5M2_ENCODE: &str = include_str!("vectors/e5m2_encode.txt");
const E2M1_DECODE: &str = include_str!("vectors/e2m1_decode.txt");
const E2M1_ENCODE: &str = include_str!("vectors/e2m1_encode.txt");
const E8M0_DECODE: &str = include_str!("vectors/e8m0_decode.txt");
const BF16_ENCODE: &str = include_str!("vectors/bf16_encode.txt");
const F16_ENCODE: &str = include_str!("vectors/f16_encode.txt");

fn fp8_cases() -> [(Fp8Format, &'static str, &'static str); 2] {
    [(Fp8Format::E4M3, E4M3_DECODE, E4M3_ENCODE), (Fp8Format::E5M2, E5M2_DECODE, E5M2_ENCODE)]
}

#[test]
fn fp8_decode_matches_oracle_for_all_256_codes() {
    for (format, decode, _) in fp8_cases() {
        let table = pairs(decode);
        assert_eq!(table.len(), 256);
        let codes: Vec<u8> = table.iter().map(|&(c, _)| c as u8).collect();
        for isa in Isa::available() {
            let mut fast = vec![0f32; 256];
            decode_fp8_slice_isa(isa, format, &codes, 1.0, &mut fast).unwrap();
            for (&(code, bits), &f) in table.iter().zip(&fast) {
                let want = f32::from_bits(bits);
                assert!(same_value(format.decode(code as u8), want), "{format:?} ref {code:#04x}");
                assert!(same_value(f, want), "{format:?} {isa:?} {code:#04x}: {f} vs {want}");
            }
        }
    }
}

#[test]
fn fp8_encode_matches_oracle_non_saturating() {
    for (format, _, encode) in fp8_cases() {
        let cases = pairs(encode);
        assert!(cases.len() > 8000, "{format:?}: {} cases", cases.len());
        let xs: Vec<f32> = cases.iter().map(|&(b, _)| f32::from_bits(b)).collect();
        for isa in Isa::available() {
            let mut fast = vec![0u8; xs.len()];
            encode_fp8_slice_isa(isa, format, Saturation::NonSaturating, &xs, 1.0, &mut fast).unwrap();
            for (i, &(_, code)) in cases.iter().enumerate() {
                let r = format.encode(xs[i], Saturation::NonSaturating);
                assert_eq!(r as u32, code, "{format:?} ref {:e} ({:#010x})", xs[i], xs[i].to_bits());
                assert_eq!(fast[i] as u32, code, "{format:?} {isa:?} {:e}", xs[i]);
            }
        }
    }
}

#[test]
fn fp8_saturating_differs_from_oracle_only_on_overflow() {
    for (format, _, encode) in fp8_cases() {
        let max = format.max_finite();
        let mut saturated = 0;
        for (bits, code) in pairs(encode) {
            let x = f32::from_bits(bits);
            let got = format.encode(x, Saturation::Saturating);
            let oracle_value = format.decode(code as u8);
            if !x.is_nan() && (oracle_value.is_nan() || oracle_value.is_infinite()) {
                saturated += 1;
                assert_eq!(format.decode(got), max.copysign(x), "{format:?} {x:e}");
            } else {
                assert_eq!(got as u32, code, "{format:?} {x:e}");
            }
        }
        assert!(saturated >= 20, "{format:?}: only {saturated} overflow cases");
    }
}

#[test]
fn fp8_ties_round_to_even_and_overflow_is_as_documented() {
    let e4 = Fp8Format::E4M3;
    let nonsat = Saturation::NonSaturating;
    let sat = Saturation::Saturating;
    // 448 = 1.110b * 2^8 (even); 464 is the tie with the missing 480, so it stays 448; above it is NaN.
    assert_eq!(e4.decode(e4.encode(464.0, nonsat)), 448.0);
    assert!(e4.decode(e4.encode(464.1, nonsat)).is_nan());
    assert!(e4.decode(e4.encode(f32::INFINITY, nonsat)).is_nan());
    assert_eq!(e4.decode(e4.encode(f32::NEG_INFINITY, sat)), -448.0);
    assert_eq!(e4.decode(e4.encode(1e30, sat)), 448.0);
    // Subnormal tie: 2^-10 is half the smallest subnormal 2^-9 and rounds to even (zero).
    assert_eq!(e4.encode(2f32.powi(-10), nonsat), 0);
    assert_eq!(e4.encode(3.0 * 2f32.powi(-10), nonsat), 2); // 1.5 steps -> 2 (even)
    assert_eq!(e4.encode(-0.0, nonsat), 0x80);
    // E5M2: 57344 = 1.11b * 2^15 is odd, so the tie 61440 rounds up to inf.
    let e5 = Fp8Format::E5M2;
    assert_eq!(e5.decode(e5.encode(61439.0, nonsat)), 57344.0);
    assert_eq!(e5.decode(e5.encode(61440.0, nonsat)), f32::INFINITY);
    assert_eq!(e5.decode(e5.encode(61440.0, sat)), 57344.0);
    assert!(e5.decode(e5.encode(f32::NAN, sat)).is_nan());
}

#[test]
fn fp8_every_code_round_trips() {
    for format in [Fp8Format::E4M3, Fp8Format::E5M2] {
        for code in 0..=255u8 {
            let v = format.decode(code);
            let back = format.encode(v, Saturation::NonSaturating);
            if v.is_nan() {
                // E5M2 has several NaN payloads; all re-encode to the canonical quiet NaN of their sign.
                assert!(format.decode(back).is_nan() && (back & 0x80) == (code & 0x80));
            } else {
                assert_eq!(back, code, "{format:?} {code:#04x} = {v}");
            }
        }
    }
}

#[test]
fn e2m1_matches_oracle_and_all_16_codes_round_trip() {
    let table = pairs(E2M1_DECODE);
    assert_eq!(table.len(), 16);
    for (code, bits) in table {
        assert!(same_value(decode_e2m1(code as u8), f32::from_bits(bits)), "{code}");
        assert_eq!(encode_e2m1(decode_e2m1(code as u8)) as u32, code);
    }
    let cases = pairs(E2M1_ENCODE);
    assert!(cases.len() > 8000);
    for (bits, code) in cases {
        let x = f32::from_bits(bits);
        assert_eq!(encode_e2m1(x) as u32, code, "{x:e}");
    }
    // Ties: 2.5 sits between 2 (even mantissa) and 3; 5 between 4 (even) and 6; 0.25 between 0 and 0.5.
    assert_eq!(decode_e2m1(encode_e2m1(2.5)), 2.0);
    assert_eq!(decode_e2m1(encode_e2m1(5.0)), 4.0);
    assert_eq!(decode_e2m1(encode_e2m1(0.25)), 0.0);
    assert_eq!(decode_e2m1(encode_e2m1(-100.0)), -6.0);
}

#[test]
fn e8m0_decode_matches_oracle() {
    let table = pairs(E8M0_DECODE);
    assert_eq!(table.len(), 256);
    for (code, bits) in table {
        assert!(same_value(decode_e8m0(code as u8), f32::from_bits(bits)), "{code:#04x}");
    }
}

#[test]
fn bf16_and_f16_match_oracle() {
    for (bits, code) in pairs(BF16_ENCODE) {
        assert_eq!(bf16::from_f32(f32::from_bits(bits)).to_bits() as u32, code, "{:e}", f32::from_bits(bits));
    }
    for (bits, code) in pairs(F16_ENCODE) {
        assert_eq!(f16::from_f32(f32::from_bits(bits)).to_bits() as u32, code, "{:e}", f32::from_bits(bits));
    }
}
