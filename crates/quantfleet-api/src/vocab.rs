//! The shared vocabulary of precision tiers: weight and activation number formats, quantization methods,
//! KV-cache dtypes and schemes, and the task classes a policy routes. Every crate (engine, node, router,
//! operator) speaks in these types, so their serialized spellings are part of the public API.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Generates `as_str`, `Display` and `ALL` for a unit enum whose serde names are given once, here.
macro_rules! spelled_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The spelling used in resources, flags and metrics labels.
            pub const fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownName {
                        kind: stringify!($ty),
                        given: s.to_owned(),
                        expected: &[$($name),+],
                    }),
                }
            }
        }
    };
}

/// A name that is not one of an enum's spellings (from a flag, a file or a metric label).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}; expected one of: {}", expected.join(", "))]
pub struct UnknownName {
    /// The Rust type that was being parsed.
    pub kind: &'static str,
    /// What was given.
    pub given: String,
    /// The accepted spellings.
    pub expected: &'static [&'static str],
}

/// Number format the weights of a tier are stored in.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightFormat {
    /// bfloat16: the unquantized baseline (8-bit exponent, 7-bit mantissa). Needs SM80+.
    #[serde(rename = "bf16")]
    Bf16,
    /// IEEE half precision. Unquantized; slightly narrower range than bf16.
    #[serde(rename = "fp16")]
    Fp16,
    /// OCP FP8 E4M3 (max 448) with per-tensor or per-channel f32 scales. Weight-only (W8A16) from SM80;
    /// with fp8 activations (W8A8) it needs SM89+.
    #[serde(rename = "fp8-e4m3")]
    Fp8E4m3,
    /// 8-bit integers, symmetric, with per-channel (or per-group) scales.
    #[serde(rename = "int8")]
    Int8,
    /// 4-bit integers in groups (groupSize 32-256) with f16 scales and, when asymmetric, zero points.
    #[serde(rename = "int4")]
    Int4,
    /// NVIDIA NVFP4: E2M1 values in blocks of 16 with an E4M3 block scale and an f32 tensor scale. Needs SM100+.
    #[serde(rename = "nvfp4")]
    Nvfp4,
    /// OCP MXFP4: E2M1 values in blocks of 32 with an E8M0 (power of two) shared scale. Needs SM100+.
    #[serde(rename = "mxfp4")]
    Mxfp4,
}

spelled_enum!(WeightFormat {
    Bf16 => "bf16", Fp16 => "fp16", Fp8E4m3 => "fp8-e4m3", Int8 => "int8", Int4 => "int4",
    Nvfp4 => "nvfp4", Mxfp4 => "mxfp4",
});

impl WeightFormat {
    /// Bits per stored element, before scale overhead.
    pub const fn bits(self) -> u32 {
        match self {
            WeightFormat::Bf16 | WeightFormat::Fp16 => 16,
            WeightFormat::Fp8E4m3 | WeightFormat::Int8 => 8,
            WeightFormat::Int4 | WeightFormat::Nvfp4 | WeightFormat::Mxfp4 => 4,
        }
    }

    /// True for the two unquantized 16-bit formats.
    pub const fn is_unquantized(self) -> bool {
        matches!(self, WeightFormat::Bf16 | WeightFormat::Fp16)
    }

    /// The fixed block size of microscaling formats (their block is part of the format, not a setting).
    pub const fn fixed_block(self) -> Option<u32> {
        match self {
            WeightFormat::Nvfp4 => Some(16),
            WeightFormat::Mxfp4 => Some(32),
            _ => None,
        }
    }
}

/// How quantization scales are chosen for the weights.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum QuantMethod {
    /// Round-to-nearest with scales from the weights alone: the baseline, no calibration data.
    #[default]
    #[serde(rename = "rtn")]
    Rtn,
    /// Activation-aware weight quantization: per-input-channel scales searched on calibration activations.
    /// For int4.
    #[serde(rename = "awq")]
    Awq,
    /// GPTQ: column-by-column quantization with Hessian-based error feedback from calibration inputs.
    /// For int4 and int8.
    #[serde(rename = "gptq")]
    Gptq,
    /// SmoothQuant: migrates activation outliers into the weights for W8A8 (int8 or fp8-e4m3 weights with
    /// int8 or fp8-e4m3 activations).
    #[serde(rename = "smoothquant")]
    SmoothQuant,
}

spelled_enum!(QuantMethod { Rtn => "rtn", Awq => "awq", Gptq => "gptq", SmoothQuant => "smoothquant" });

impl QuantMethod {
    /// Whether the method needs calibration activations.
    pub const fn needs_calibration(self) -> bool {
        !matches!(self, QuantMethod::Rtn)
    }
}

/// Granularity of weight scales.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightScaling {
    /// One scale for the whole tensor.
    #[serde(rename = "per-tensor")]
    PerTensor,
    /// One scale per output channel (row of the weight matrix).
    #[serde(rename = "per-channel")]
    PerChannel,
    /// One scale (and zero point when asymmetric) per `groupSize` consecutive input elements of a row.
    #[serde(rename = "per-group")]
    PerGroup,
}

spelled_enum!(WeightScaling { PerTensor => "per-tensor", PerChannel => "per-channel", PerGroup => "per-group" });

/// Number format of activations fed to the matrix multiplies.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ActivationPrecision {
    /// bfloat16 activations: weight-only quantization (W8A16, W4A16).
    #[default]
    #[serde(rename = "bf16")]
    Bf16,
    /// IEEE half activations.
    #[serde(rename = "fp16")]
    Fp16,
    /// FP8 E4M3 activations with dynamic per-token scales (W8A8 FP8). Needs SM89+.
    #[serde(rename = "fp8-e4m3")]
    Fp8E4m3,
    /// INT8 activations with dynamic scales per token and block of 32 channels (W8A8 with int8 weights, usually
    /// with SmoothQuant; W4A8 with int4 weights, as llama.cpp's Q4_0 x Q8_0 products).
    #[serde(rename = "int8")]
    Int8,
}

spelled_enum!(ActivationPrecision { Bf16 => "bf16", Fp16 => "fp16", Fp8E4m3 => "fp8-e4m3", Int8 => "int8" });

/// Element type the KV cache is stored in.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KvCacheDtype {
    /// IEEE half: the unquantized default.
    #[default]
    #[serde(rename = "fp16")]
    Fp16,
    /// bfloat16.
    #[serde(rename = "bf16")]
    Bf16,
    /// FP8 E4M3 with a per-token, per-head f32 scale: halves KV memory.
    #[serde(rename = "fp8-e4m3")]
    Fp8E4m3,
    /// INT8 with a per-token, per-head f32 scale: halves KV memory.
    #[serde(rename = "int8")]
    Int8,
    /// INT4 (KIVI scheme: keys per-channel, values per-token) with a full-precision window of recent and sink
    /// tokens: about a quarter of fp16 memory.
    #[serde(rename = "int4")]
    Int4,
}

spelled_enum!(KvCacheDtype { Fp16 => "fp16", Bf16 => "bf16", Fp8E4m3 => "fp8-e4m3", Int8 => "int8", Int4 => "int4" });

impl KvCacheDtype {
    /// Bits per stored element, before scale overhead.
    pub const fn bits(self) -> u32 {
        match self {
            KvCacheDtype::Fp16 | KvCacheDtype::Bf16 => 16,
            KvCacheDtype::Fp8E4m3 | KvCacheDtype::Int8 => 8,
            KvCacheDtype::Int4 => 4,
        }
    }

    /// True when the cache stores quantized values with scales.
    pub const fn is_quantized(self) -> bool {
        self.bits() < 16
    }
}

/// How a quantized KV cache groups its scales.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KvCacheScheme {
    /// One scale per token and head, for keys and values alike.
    #[default]
    #[serde(rename = "per-token")]
    PerToken,
    /// KIVI: keys quantized per channel over groups of tokens, values per token; for int4 only.
    #[serde(rename = "kivi")]
    Kivi,
}

spelled_enum!(KvCacheScheme { PerToken => "per-token", Kivi => "kivi" });

/// The kinds of request a policy routes separately, because quantization hurts them differently
/// (quality breaks first on math, code, structured output and long context).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskClass {
    /// General conversation: the most tolerant class.
    #[serde(rename = "chat")]
    Chat,
    /// Source code generation and editing.
    #[serde(rename = "code")]
    Code,
    /// Arithmetic and mathematical reasoning.
    #[serde(rename = "math")]
    Math,
    /// Agent and structured-output requests: tools or a JSON schema are present.
    #[serde(rename = "agent")]
    Agent,
    /// Prompts longer than the classifier's long-context threshold.
    #[serde(rename = "long-context")]
    LongContext,
}

spelled_enum!(TaskClass { Chat => "chat", Code => "code", Math => "math", Agent => "agent", LongContext => "long-context" });

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + std::fmt::Debug + PartialEq + Serialize + for<'a> Deserialize<'a> + std::str::FromStr + fmt::Display,
        <T as std::str::FromStr>::Err: std::fmt::Debug,
    {
        for v in all {
            let json = serde_json::to_value(v).unwrap();
            assert_eq!(json, serde_json::Value::String(v.to_string()), "serde and Display disagree for {v:?}");
            assert_eq!(v.to_string().parse::<T>().unwrap(), *v);
            assert_eq!(serde_json::from_value::<T>(json).unwrap(), *v);
        }
    }

    #[test]
    fn spellings_agree_between_serde_display_and_from_str() {
        round_trips(WeightFormat::ALL);
        round_trips(QuantMethod::ALL);
        round_trips(WeightScaling::ALL);
        round_trips(ActivationPrecision::ALL);
        round_trips(KvCacheDtype::ALL);
        round_trips(KvCacheScheme::ALL);
        round_trips(TaskClass::ALL);
    }

    #[test]
    fn unknown_names_list_the_accepted_ones() {
        let err = "fp4".parse::<WeightFormat>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"fp4\"") && msg.contains("nvfp4") && msg.contains("int4"), "{msg}");
    }

    #[test]
    fn bit_widths() {
        assert_eq!(WeightFormat::Int4.bits(), 4);
        assert_eq!(WeightFormat::Fp8E4m3.bits(), 8);
        assert_eq!(KvCacheDtype::Int4.bits(), 4);
        assert!(!KvCacheDtype::Bf16.is_quantized());
        assert_eq!(WeightFormat::Nvfp4.fixed_block(), Some(16));
        assert_eq!(WeightFormat::Int4.fixed_block(), None);
    }
}
