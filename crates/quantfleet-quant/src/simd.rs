//! Runtime CPU dispatch for the fast paths.
//!
//! Each fast path is a branchless per-element kernel (`#[inline(always)]`) that is compiled three times by
//! `multiversion!`: once with AVX-512 (F/BW/VL) enabled, once with AVX2+FMA, once for any CPU. LLVM
//! vectorises the kernel at the widest width the enabled features allow (16 f32 lanes on AVX-512, 8 on AVX2).
//! The branchy scalar reference of each format lives beside its kernel and the tests compare every ISA
//! variant against it, so a fast path can never silently drift from the reference.

/// Instruction-set variant of a multiversioned kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F + BW + VL (x86_64).
    Avx512,
    /// AVX2 + FMA (x86_64).
    Avx2,
    /// Portable code for any CPU.
    Scalar,
}

/// Environment variable capping the instruction set of every Quantfleet CPU kernel (these and the engine's):
/// `avx512`, `avx2` or `portable`. Unset, each uses the widest the CPU has; `avx2` on an AVX-512 machine runs
/// exactly what an AVX2-only machine runs. A cap above the CPU's level changes nothing.
pub const ISA_ENV: &str = "QUANTFLEET_CPU_ISA";

/// The cap [`ISA_ENV`] sets, read once per process: None when unset or empty, an error naming the accepted
/// values when it is not one of them (the node refuses to start on it; [`Isa::detect`] then ignores it).
pub fn isa_cap() -> Result<Option<Isa>, String> {
    static CAP: std::sync::OnceLock<Result<Option<Isa>, String>> = std::sync::OnceLock::new();
    CAP.get_or_init(|| match std::env::var(ISA_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Isa::parse(&v).map(Some),
        Err(e) => Err(format!("{ISA_ENV}: {e}")),
    })
    .clone()
}

impl Isa {
    /// A variant by its [`ISA_ENV`] name.
    pub fn parse(name: &str) -> Result<Isa, String> {
        match name {
            "avx512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "portable" => Ok(Isa::Scalar),
            other => Err(format!("{ISA_ENV}={other:?} is not one of avx512, avx2, portable")),
        }
    }

    /// Width rank: Scalar < Avx2 < Avx512.
    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        }
    }

    /// Widest variant this CPU supports, capped by [`ISA_ENV`].
    pub fn detect() -> Isa {
        let hardware = Isa::hardware();
        match isa_cap() {
            Ok(Some(cap)) if cap.rank() < hardware.rank() => cap,
            _ => hardware,
        }
    }

    /// Widest variant this CPU supports.
    fn hardware() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every variant this CPU can run, widest first (the tests run each one against the reference).
    pub fn available() -> Vec<Isa> {
        let all = [Isa::Avx512, Isa::Avx2, Isa::Scalar];
        let best = Isa::detect();
        all.iter().copied().skip_while(|&isa| isa != best).collect()
    }
}

/// Define `fn $name(isa: Isa, args...)` whose body is compiled once per [`Isa`]; an ISA the CPU lacks
/// falls back to the next narrower one, so callers may pass any variant safely.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        // Kernels take their slices and sizes as plain arguments; the ISA adds one more.
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? $body
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                let best = $crate::simd::Isa::detect();
                if isa == $crate::simd::Isa::Avx512 && best == $crate::simd::Isa::Avx512 {
                    // SAFETY: the CPU reports AVX-512 F/BW/VL (and therefore AVX2/FMA).
                    return unsafe { avx512($($arg),*) };
                }
                if isa != $crate::simd::Isa::Scalar && best != $crate::simd::Isa::Scalar {
                    // SAFETY: the CPU reports AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Round to the nearest integer, ties to even, for |v| < 2^22: adding 1.5 * 2^23 pushes the fraction out of
/// the f32 mantissa and the FP adder rounds it (round-to-nearest-even is the default and only mode Rust
/// uses). Unlike `round_ties_even() as i32` this needs neither SSE4.1's roundps nor a saturating
/// float->int conversion, so it vectorises on every ISA, including the portable fallback.
#[inline(always)]
pub(crate) fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// `v` clamped to [lo, hi] with plain compares (maps to minps/maxps); callers pass finite values.
#[inline(always)]
pub(crate) fn clamp_fast(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v > lo { v } else { lo };
    if v < hi { v } else { hi }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_small_matches_round_ties_even() {
        let mut v = -5000.0f32;
        while v < 5000.0 {
            for x in [v, v + 0.5, -v - 0.5, f32::from_bits(v.to_bits() + 1)] {
                assert_eq!(round_small(x), x.round_ties_even() as i32, "{x}");
            }
            v += 0.37;
        }
    }
}
