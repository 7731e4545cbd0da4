//! Runtime CPU dispatch for the fast paths.
//!
//! Each fast path is a branchless per-element kernel (`#[inline(always)]`) that is compiled three times by
//! [`multiversion!`]: once with AVX-512 (F/BW/VL) enabled, once with AVX2+FMA, once for any CPU. LLVM
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

impl Isa {
    /// Widest variant this CPU supports.
    pub fn detect() -> Isa {
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
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $body
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
            fn portable($($arg: $ty),*) $body
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;
