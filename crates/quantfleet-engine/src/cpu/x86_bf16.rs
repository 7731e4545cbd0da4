//! AVX-512 BF16 kernels for the weight-only tiers whose products take bf16 inputs
//! ([`ActivationQuant::Bf16`](crate::packed::ActivationQuant::Bf16)): BF16, INT8, FP8 and INT4 weights
//! against the input rounded to bf16, multiplied by `vdpbf16ps` (32 products per instruction, summed in pairs into 16 f32
//! lanes). This is llama.cpp's arithmetic for BF16 weights (its BF16 dot product also rounds the input to
//! bf16), and it halves the work of the f32 kernels, which widen every weight to f32 and multiply 16 at a
//! time.
//!
//! BF16 weights are bf16 already; they are stored for these kernels as sixteen interleaved rows too
//! (`PackedLayout::Bf16Rows16`): a 64-byte load is a column pair of 16 rows, multiplied as it is.
//!
//! INT4 weights are stored for these kernels as sixteen interleaved rows (`PackedLayout::Int4Rows16`, built
//! at load): a 64-byte load holds 8 columns of 16 rows, one 32-bit lane per row, and the vector lanes stay
//! rows all the way to the store, so no row pays a horizontal sum and a group's scale multiply covers 16 rows.
//! The nibbles turn into bf16 without a table or a shuffle: shifting the lane's two 16-bit words right by 4j,
//! masking to 4 bits and setting bits `0x4300` (the bf16 exponent of 128, whose mantissa step is 1) gives
//! `128 + n` exactly for columns `2j` (low word) and `2j + 1` (high word), which meet a broadcast pair of
//! inputs. The offset and the zero point come out per group through the group's input sum: the accumulators
//! start at `-(128 + z) sum x` and the group ends with one multiply by its scale. Every product of `(128 + n)`
//! (8 significant bits) and a bf16 input is exact in f32; the sums are f32.
//!
//! INT8 and FP8 E4M3 weights (`PackedLayout::Byte8Rows16`, the BF16 layout with one byte per value) become
//! bf16 in registers, exactly: every INT8 code and every E4M3 value is a bf16 number. INT8 goes through f32
//! (sign-extend, convert, and one `vcvtne2ps2bf16` for 32 codes); E4M3 by integer arithmetic on 16-bit lanes:
//! a normal code's exponent and mantissa bits `em` (7 bits) become bf16 bits `(em << 4) + (120 << 7)` (the
//! exponent re-biased from 7 to 127), the eight subnormal magnitudes come from a table by a masked permute,
//! and the sign bit moves from bit 7 to bit 15. The row scale multiplies the 16 rows' sums at the end; FP8
//! with scale groups keeps one sum per group, which its 16 rows' scales multiply into the total.
//!
//! `cpu::packed_kernels` checks these kernels against the scalar reference (`PackedMatrix::dot_reference`,
//! which rounds the input to bf16 too).

use std::arch::x86_64::*;

use super::gemm::OutPtr;

/// Whether the CPU has the AVX-512 BF16 dot product (with AVX-512 BW/VL, which the AVX-512 level has).
pub(crate) fn has_avx512bf16() -> bool {
    is_x86_feature_detected!("avx512bf16")
}

/// A bf16 vector of 32 lanes from memory.
///
/// # Safety
/// `p` has 32 readable u16; the caller has AVX-512F.
#[inline(always)]
unsafe fn load_bh(p: *const u16) -> __m512bh {
    // SAFETY: as documented; __m512i and __m512bh are the same 64 bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i)) }
}

/// The pair of bf16 inputs at `p` in every 32-bit lane.
///
/// # Safety
/// `p` has 2 readable u16; the caller has AVX-512F.
#[inline(always)]
unsafe fn pair_bh(p: *const u16) -> __m512bh {
    // SAFETY: as documented.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))) }
}

/// Whether rows `r0 .. r0 + nr` are whole groups of sixteen of a `rows` x `cols` matrix in a sixteen-row
/// layout (which holds `rows % 16 == 0` and `cols % 32 == 0`).
#[inline(always)]
fn rows16_fit((r0, nr): (usize, usize), rows: usize, cols: usize) -> bool {
    r0.is_multiple_of(16)
        && nr.is_multiple_of(16)
        && r0 + nr <= rows
        && rows.is_multiple_of(16)
        && cols.is_multiple_of(32)
}

/// An INT4 matrix in `PackedLayout::Int4Rows16` (see `packed.rs`): the interleaved bytes, and the scales and
/// zero points (asymmetric only) of row group `R`, weight group `g` at `16 (R * groups_per_row + g) + i`.
#[derive(Clone, Copy)]
pub(crate) struct I4Rows16<'a> {
    pub bytes: &'a [u8],
    pub scales: &'a [half::f16],
    pub zeros: Option<&'a [u8]>,
    pub group: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Rows `r0 .. r0 + nr` (multiples of 16) of an interleaved INT4 matrix against `NT` tokens: `xb[t]` is
/// token t's input as bf16 bits (column order), `gsum[t]` its f32 sum per weight group; each token keeps
/// `SPLIT` accumulators per row group (chains that hide the dot product's latency when few tokens share a
/// pass). `out.rows_ptr(t, r, 16)` receives rows `r0 + r ..` of token `t`.
#[inline(always)]
fn i4x16_body<const NT: usize, const SPLIT: usize>(
    m: I4Rows16<'_>,
    xb: [&[u16]; NT],
    gsum: [&[f32]; NT],
    (r0, nr): (usize, usize),
    out: OutPtr,
) {
    let gpr = m.cols.div_ceil(m.group);
    assert!(
        rows16_fit((r0, nr), m.rows, m.cols)
            && m.group.is_multiple_of(8)
            && m.bytes.len() == m.rows * m.cols / 2
            && m.scales.len() == m.rows * gpr
            && m.zeros.is_none_or(|z| z.len() == m.rows * gpr)
            && xb.iter().all(|x| x.len() == m.cols)
            && gsum.iter().all(|g| g.len() == gpr),
        "int4 rows16 shapes"
    );
    // SAFETY (whole body): every caller enables avx512f/bw/vl/bf16 and f16c. Row group R's bytes are
    // 8 * cols from 8 * cols * R, chunk k's 64 at 64 k of them (k < cols / 8); its scales and zero points are
    // 16 from 16 (R * gpr + g); input pairs are read at columns 8 k + 2 j + 1 < cols; all checked above.
    unsafe {
        let (mask, bias) = (_mm512_set1_epi16(0x000f), _mm512_set1_epi16(0x4300));
        // (a & b) | c in one instruction: truth table 0xEA over (a, b, c).
        let nib =
            |w: __m512i| std::mem::transmute::<__m512i, __m512bh>(_mm512_ternarylogic_epi32::<0xEA>(w, mask, bias));
        for rg in r0 / 16..(r0 + nr) / 16 {
            let base = m.bytes.as_ptr().add(8 * m.cols * rg);
            let mut total = [_mm512_setzero_ps(); NT];
            for g in 0..gpr {
                let sg = 16 * (rg * gpr + g);
                let scale = _mm512_cvtph_ps(_mm256_loadu_si256(m.scales.as_ptr().add(sg) as *const __m256i));
                let zero = match m.zeros {
                    Some(z) => {
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(z.as_ptr().add(sg) as *const __m128i)))
                    }
                    None => _mm512_set1_ps(8.0),
                };
                let offset = _mm512_add_ps(zero, _mm512_set1_ps(128.0));
                let mut acc = [[_mm512_setzero_ps(); SPLIT]; NT];
                for (a, gs) in acc.iter_mut().zip(gsum) {
                    a[0] = _mm512_mul_ps(offset, _mm512_set1_ps(-gs[g]));
                }
                for k in g * m.group / 8..((g + 1) * m.group).min(m.cols) / 8 {
                    let w = _mm512_loadu_si512(base.add(64 * k) as *const __m512i);
                    let v = [
                        nib(w),
                        nib(_mm512_srli_epi16::<4>(w)),
                        nib(_mm512_srli_epi16::<8>(w)),
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_or_si512(_mm512_srli_epi16::<12>(w), bias)),
                    ];
                    for (a, x) in acc.iter_mut().zip(xb) {
                        let xp = x.as_ptr().add(8 * k);
                        for (j, vj) in v.iter().enumerate() {
                            a[j % SPLIT] = _mm512_dpbf16_ps(a[j % SPLIT], *vj, pair_bh(xp.add(2 * j)));
                        }
                    }
                }
                for (tot, a) in total.iter_mut().zip(&acc) {
                    let sum = a[1..].iter().fold(a[0], |s, v| _mm512_add_ps(s, *v));
                    *tot = _mm512_fmadd_ps(sum, scale, *tot);
                }
            }
            for (t, tot) in total.iter().enumerate() {
                _mm512_storeu_ps(out.rows_ptr(t, 16 * rg - r0, 16), *tot);
            }
        }
    }
}

/// [`i4x16_body`] for one to eight tokens, with the accumulator split that suits the count.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
pub(crate) fn i4x16_rows<const NT: usize>(
    m: I4Rows16<'_>,
    xb: [&[u16]; NT],
    gsum: [&[f32]; NT],
    rows: (usize, usize),
    out: OutPtr,
) {
    match NT {
        1 => i4x16_body::<NT, 4>(m, xb, gsum, rows, out),
        2..=4 => i4x16_body::<NT, 2>(m, xb, gsum, rows, out),
        _ => i4x16_body::<NT, 1>(m, xb, gsum, rows, out),
    }
}

/// bf16 bits of the E4M3 subnormal magnitudes `k * 2^-9`, k = 0..7, in the first eight 16-bit lanes.
const E4M3_SUBNORMAL_BF16: [u16; 32] = {
    let mut t = [0u16; 32];
    // k * 2^-9 = 2^(e - 127) * (1 + f / 128): k = 1 -> e = 118, f = 0; 2, 3 -> 119 (f = 0, 64); 4..7 -> 120.
    let bits = [0x0000, 0x3b00, 0x3b80, 0x3bc0, 0x3c00, 0x3c20, 0x3c40, 0x3c60];
    let mut k = 0;
    while k < 8 {
        t[k] = bits[k];
        k += 1;
    }
    t
};

/// Column pair `p`'s 16 rows of INT8 codes (the 32 bytes at `p`) as bf16.
///
/// # Safety
/// `p` has 32 readable bytes; the caller has AVX-512 F/BW/BF16.
#[inline(always)]
unsafe fn int8_pair_bh(p: *const u8) -> __m512bh {
    // SAFETY: as documented. Rows 0..7's codes are the first 16 bytes, rows 8..15's the next 16;
    // `cvtne2ps` puts its second operand in the low 16 lanes. |code| <= 128 is exact in bf16.
    unsafe {
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)));
        _mm512_cvtne2ps_pbh(hi, lo)
    }
}

/// Column pair `p`'s 16 rows of FP8 E4M3 codes (the 32 bytes at `p`) as bf16 (see the module docs). The NaN
/// codes never reach a kernel (`PackedMatrix::validate` refuses them).
///
/// # Safety
/// `p` has 32 readable bytes; the caller has AVX-512 F/BW.
#[inline(always)]
unsafe fn fp8_pair_bh(p: *const u8) -> __m512bh {
    // SAFETY: as documented.
    unsafe {
        let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const __m256i));
        let em = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
        let normal = _mm512_add_epi16(_mm512_slli_epi16::<4>(em), _mm512_set1_epi16(120 << 7));
        let table = _mm512_loadu_si512(E4M3_SUBNORMAL_BF16.as_ptr() as *const __m512i);
        let subnormal = _mm512_cmplt_epu16_mask(em, _mm512_set1_epi16(8));
        let magnitude = _mm512_mask_permutexvar_epi16(normal, subnormal, em, table);
        // magnitude | (code << 8 & 0x8000): truth table 0xF8 = a | (b & c).
        let sign = _mm512_slli_epi16::<8>(w);
        let bits = _mm512_ternarylogic_epi32::<0xF8>(magnitude, sign, _mm512_set1_epi16(0x8000u16 as i16));
        std::mem::transmute::<__m512i, __m512bh>(bits)
    }
}

/// What a column-pair layout's values are (`PairRows16::kind`): the const parameter of [`pairs16_rows`].
pub(crate) const PAIRS_BF16: u8 = 0;
pub(crate) const PAIRS_INT8: u8 = 1;
pub(crate) const PAIRS_FP8: u8 = 2;

/// A matrix in a column-pair layout (see `packed.rs`): `PackedLayout::Bf16Rows16` (`PAIRS_BF16`, no scales)
/// or `PackedLayout::Byte8Rows16` (`PAIRS_INT8` / `PAIRS_FP8`, with the scales of every `span` columns: of
/// row group `R`, scale group `g` at `16 (R * groups + g) + i`; `span == cols` for one scale per row, whose
/// scales are then in row order).
#[derive(Clone, Copy)]
pub(crate) struct PairRows16<'a> {
    pub bytes: &'a [u8],
    pub scales: Option<&'a [f32]>,
    pub span: usize,
    pub rows: usize,
    pub cols: usize,
}

/// Rows `r0 .. r0 + nr` (multiples of 16) of a column-pair matrix of values `KIND` against `NT` tokens' bf16
/// inputs (`xb`, column order): each load is a column pair of 16 rows (64 bytes of bf16, or 32 of INT8/FP8
/// codes turned into bf16 once), multiplied into every token's accumulators against the token's broadcast
/// input pair; each token keeps `SPLIT` accumulators (see [`i4x16_body`]); each scale group's sums are
/// multiplied by the rows' scales when the format has them (one group per row: one multiply at the end).
/// `out.rows_ptr(t, r, 16)` receives rows `r0 + r ..` of token `t`.
#[inline(always)]
fn pairs16_body<const NT: usize, const SPLIT: usize, const KIND: u8>(
    m: PairRows16<'_>,
    xb: [&[u16]; NT],
    (r0, nr): (usize, usize),
    out: OutPtr,
) {
    let pair_bytes = if KIND == PAIRS_BF16 { 64 } else { 32 };
    let gpr = m.cols.div_ceil(m.span.max(1));
    assert!(
        rows16_fit((r0, nr), m.rows, m.cols)
            && m.span.is_multiple_of(32)
            && m.span <= m.cols
            && m.bytes.len() == pair_bytes * m.rows * m.cols / 32
            && m.scales.is_some() == (KIND != PAIRS_BF16)
            && m.scales.is_none_or(|s| s.len() == m.rows * gpr)
            && xb.iter().all(|x| x.len() == m.cols),
        "column-pair rows16 shapes"
    );
    // SAFETY (whole body): every caller enables avx512f/bw/vl/bf16. Row group R's bytes are
    // pair_bytes * cols / 2 from pair_bytes * cols / 2 * R, pair p's pair_bytes at pair_bytes * p of them
    // (p < cols / 2); its scales of group g are the 16 from 16 (R * gpr + g); input pairs are read at columns
    // 2 p + 1 < cols; all checked above.
    unsafe {
        for rg in r0 / 16..(r0 + nr) / 16 {
            let base = m.bytes.as_ptr().add(pair_bytes * m.cols / 2 * rg);
            let mut total = [_mm512_setzero_ps(); NT];
            for g in 0..gpr {
                let mut acc = [[_mm512_setzero_ps(); SPLIT]; NT];
                // SPLIT consecutive pairs per step, one per accumulator (a group's pairs are a multiple of 16, as
                // span and cols are of 32, so of SPLIT); constant indices keep the accumulators in registers.
                let pairs = g * m.span / 2..((g + 1) * m.span).min(m.cols) / 2;
                for p0 in pairs.step_by(SPLIT) {
                    for q in 0..SPLIT {
                        let at = base.add(pair_bytes * (p0 + q));
                        let w = match KIND {
                            PAIRS_BF16 => load_bh(at as *const u16),
                            PAIRS_INT8 => int8_pair_bh(at),
                            _ => fp8_pair_bh(at),
                        };
                        for (a, x) in acc.iter_mut().zip(xb) {
                            a[q] = _mm512_dpbf16_ps(a[q], w, pair_bh(x.as_ptr().add(2 * (p0 + q))));
                        }
                    }
                }
                for (tot, a) in total.iter_mut().zip(&acc) {
                    let sum = a[1..].iter().fold(a[0], |s, v| _mm512_add_ps(s, *v));
                    // One group per row: sum * scale + 0, the product rounded once as a multiply would be.
                    *tot = match m.scales {
                        Some(s) => _mm512_fmadd_ps(sum, _mm512_loadu_ps(s.as_ptr().add(16 * (rg * gpr + g))), *tot),
                        None => _mm512_add_ps(sum, *tot),
                    };
                }
            }
            for (t, tot) in total.iter().enumerate() {
                _mm512_storeu_ps(out.rows_ptr(t, 16 * rg - r0, 16), *tot);
            }
        }
    }
}

/// [`pairs16_body`] for one to eight tokens, with the accumulator split that suits the count.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) fn pairs16_rows<const NT: usize, const KIND: u8>(
    m: PairRows16<'_>,
    xb: [&[u16]; NT],
    rows: (usize, usize),
    out: OutPtr,
) {
    match NT {
        1 => pairs16_body::<NT, 4, KIND>(m, xb, rows, out),
        2..=4 => pairs16_body::<NT, 2, KIND>(m, xb, rows, out),
        _ => pairs16_body::<NT, 1, KIND>(m, xb, rows, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every E4M3 code but the two NaNs becomes the bf16 bits of its value (E4M3 values are all bf16
    /// numbers, so exactly), and every INT8 code its value.
    #[test]
    fn eight_bit_codes_become_their_bf16_values() {
        if !has_avx512bf16() {
            eprintln!("no AVX-512 BF16 on this CPU: skipped");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        fn convert(codes: &[u8; 32], fp8: bool) -> [u16; 32] {
            // SAFETY: 32 bytes; the features are enabled on this function and the CPU has them (checked).
            unsafe {
                let v = if fp8 { fp8_pair_bh(codes.as_ptr()) } else { int8_pair_bh(codes.as_ptr()) };
                std::mem::transmute::<__m512bh, [u16; 32]>(v)
            }
        }
        for chunk in 0..8u8 {
            let codes: [u8; 32] = std::array::from_fn(|i| 32 * chunk + i as u8);
            // SAFETY: the CPU has AVX-512 BF16 (checked above), which implies F/BW/VL here.
            let (fp8, int8) = unsafe { (convert(&codes, true), convert(&codes, false)) };
            for (i, &c) in codes.iter().enumerate() {
                let v = quantfleet_quant::Fp8Format::E4M3.decode(c);
                if !v.is_nan() {
                    assert_eq!(fp8[i], half::bf16::from_f32(v).to_bits(), "E4M3 code {c:#04x} = {v}");
                    assert_eq!(half::bf16::from_bits(fp8[i]).to_f32(), v);
                }
                assert_eq!(half::bf16::from_bits(int8[i]).to_f32(), c as i8 as f32, "INT8 code {c:#04x}");
            }
        }
    }
}
