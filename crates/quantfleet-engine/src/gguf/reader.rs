//! A bounds-checked little-endian cursor over the GGUF bytes. Every read checks the remaining length first,
//! and every count read from the file is checked against the bytes left before anything is allocated for it,
//! so a truncated or corrupted file yields `GgufError`, never a panic or a huge allocation.

use super::value::MetadataValue;
use crate::error::GgufError;

/// Metadata arrays may nest (arrays of arrays); real files use one level. Bounding the depth keeps a crafted
/// file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 4;

pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated { offset: self.pos as u64, needed: n, len: self.bytes.len() as u64 });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    pub fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items each at least `min_item_bytes` long: rejected if the rest of the file cannot hold them.
    pub fn count(&mut self, what: &'static str, min_item_bytes: u64) -> Result<u64, GgufError> {
        let count = self.u64()?;
        if count.saturating_mul(min_item_bytes.max(1)) > self.remaining() as u64 {
            return Err(GgufError::ImplausibleCount { what, count });
        }
        Ok(count)
    }

    pub fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        let offset = self.pos as u64;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::InvalidUtf8 { offset })
    }

    pub fn value(&mut self, type_id: u32, depth: usize) -> Result<MetadataValue, GgufError> {
        use MetadataValue as V;
        Ok(match type_id {
            0 => V::U8(u8::from_le_bytes(self.array()?)),
            1 => V::I8(i8::from_le_bytes(self.array()?)),
            2 => V::U16(u16::from_le_bytes(self.array()?)),
            3 => V::I16(i16::from_le_bytes(self.array()?)),
            4 => V::U32(self.u32()?),
            5 => V::I32(i32::from_le_bytes(self.array()?)),
            6 => V::F32(f32::from_le_bytes(self.array()?)),
            7 => V::Bool(self.array::<1>()?[0] != 0),
            8 => V::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep(MAX_ARRAY_DEPTH));
                }
                let elem_type = self.u32()?;
                let min = min_value_bytes(elem_type).ok_or(GgufError::UnknownValueType(elem_type))?;
                let n = self.count("array elements", min)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(self.u64()?),
            11 => V::I64(i64::from_le_bytes(self.array()?)),
            12 => V::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(GgufError::UnknownValueType(other)),
        })
    }
}

/// The smallest encoding of a value of the type (strings: their 8-byte length; arrays: type + count).
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}
