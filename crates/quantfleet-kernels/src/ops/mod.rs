//! Launch builders for every kernel family: each checks shapes and buffer sizes, picks the variant and
//! grid, and returns a [`crate::Launch`]. Layouts are documented on the kernels (kernels/README.md).

pub mod attention;
pub mod gemv;
pub mod layers;
pub mod sampling;

/// 16-bit float type of activations and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    F16,
    Bf16,
}

impl Act {
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Act::F16 => "f16",
            Act::Bf16 => "bf16",
        }
    }
}
