//! Tests of the GGUF parser on SYNTHETIC files built here: a valid small file, then truncations and
//! corruptions of it, each of which must give a typed error (never a panic or an out-of-bounds read).

use super::*;

/// Builds a synthetic GGUF v3 image: metadata, then tensors laid out at 32-byte aligned offsets.
pub(crate) struct SyntheticGguf {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl SyntheticGguf {
    pub fn new() -> Self {
        Self { kv: Vec::new(), n_kv: 0, tensors: Vec::new() }
    }

    fn key(&mut self, key: &str, type_id: u32) {
        put_str(&mut self.kv, key);
        self.kv.extend_from_slice(&type_id.to_le_bytes());
        self.n_kv += 1;
    }

    pub fn u32(mut self, key: &str, v: u32) -> Self {
        self.key(key, 4);
        self.kv.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn f32(mut self, key: &str, v: f32) -> Self {
        self.key(key, 6);
        self.kv.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bool(mut self, key: &str, v: bool) -> Self {
        self.key(key, 7);
        self.kv.push(v as u8);
        self
    }

    pub fn string(mut self, key: &str, v: &str) -> Self {
        self.key(key, 8);
        put_str(&mut self.kv, v);
        self
    }

    pub fn str_array(mut self, key: &str, items: &[&str]) -> Self {
        self.key(key, 9);
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        self.kv.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for s in items {
            put_str(&mut self.kv, s);
        }
        self
    }

    pub fn i32_array(mut self, key: &str, items: &[i32]) -> Self {
        self.key(key, 9);
        self.kv.extend_from_slice(&5u32.to_le_bytes());
        self.kv.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for v in items {
            self.kv.extend_from_slice(&v.to_le_bytes());
        }
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        let id = (0..64).find(|&i| GgmlType::from_id(i) == Some(ty)).unwrap();
        self.tensors.push((name.to_string(), dims.to_vec(), id, data));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + data.len() as u64).next_multiple_of(32);
        }
        for (_, _, _, data) in &self.tensors {
            out.resize(out.len().next_multiple_of(32), 0);
            out.extend_from_slice(data);
        }
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn f32_bytes(vals: &[f32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn sample() -> SyntheticGguf {
    SyntheticGguf::new()
        .string("general.architecture", "llama")
        .u32("llama.block_count", 2)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str_array("tokenizer.ggml.tokens", &["a", "b", "ab"])
        .i32_array("tokenizer.ggml.token_type", &[1, 1, 3])
        .tensor("norm", &[8], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]))
        .tensor("q", &[32, 2], GgmlType::Q8_0, vec![7u8; 68])
}

#[test]
fn synthetic_file_parses_with_metadata_and_tensors() {
    let g = GgufFile::from_bytes(sample().build()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
    assert!((g.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap() - 1e-5).abs() < 1e-9);
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), 3);
    assert_eq!(g.metadata_keys().next(), Some("general.architecture"));
    let norm = g.tensor("norm").unwrap();
    assert_eq!(norm.dims, vec![8]);
    assert_eq!(g.tensor_data(norm)[..4], 1.0f32.to_le_bytes());
    let q = g.tensor("q").unwrap();
    assert_eq!((q.ggml_type, q.len, q.start % 32), (GgmlType::Q8_0, 68, 0));
    assert!(matches!(g.get_u64("general.architecture"), Err(GgufError::WrongType { .. })));
    assert!(matches!(g.get_str("nope"), Err(GgufError::MissingKey { .. })));
}

#[test]
fn every_truncation_of_a_synthetic_file_is_an_error() {
    let full = sample().build();
    for cut in 0..full.len() {
        let r = GgufFile::from_bytes(full[..cut].to_vec());
        assert!(r.is_err(), "truncated to {cut} of {} bytes parsed", full.len());
    }
}

#[test]
fn seeded_byte_corruptions_of_a_synthetic_file_never_panic() {
    let full = sample().build();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rejected = 0;
    for _ in 0..4000 {
        let mut bytes = full.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % bytes.len() as u64) as usize;
            bytes[i] = next() as u8;
        }
        // Must return (Ok or Err) without panicking; data bytes may be corrupted harmlessly.
        if GgufFile::from_bytes(bytes).is_err() {
            rejected += 1;
        }
    }
    assert!(rejected > 100, "only {rejected} of 4000 corruptions were detected");
}

#[test]
fn specific_corruptions_give_specific_errors() {
    let mut bad_magic = sample().build();
    bad_magic[0] = b'X';
    assert!(matches!(GgufFile::from_bytes(bad_magic), Err(GgufError::BadMagic { .. })));

    let mut bad_version = sample().build();
    bad_version[4] = 9;
    assert!(matches!(GgufFile::from_bytes(bad_version), Err(GgufError::UnsupportedVersion(9))));

    let mut huge_count = sample().build();
    huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(huge_count), Err(GgufError::ImplausibleCount { .. })));

    let partial_block = SyntheticGguf::new().tensor("t", &[31], GgmlType::Q4_1, vec![0; 20]);
    assert!(matches!(GgufFile::from_bytes(partial_block.build()), Err(GgufError::BadTensor { .. })));

    let too_big = SyntheticGguf::new().tensor("t", &[64, 2], GgmlType::F32, vec![0; 64]);
    assert!(matches!(GgufFile::from_bytes(too_big.build()), Err(GgufError::Truncated { .. })));

    let dup = SyntheticGguf::new().u32("k", 1).u32("k", 2);
    assert!(matches!(GgufFile::from_bytes(dup.build()), Err(GgufError::Duplicate { .. })));

    let bad_align = SyntheticGguf::new().u32("general.alignment", 24);
    assert!(matches!(GgufFile::from_bytes(bad_align.build()), Err(GgufError::BadAlignment(24))));
}

#[test]
fn unknown_tensor_type_and_overlapping_tensors_are_rejected() {
    let mut bytes = SyntheticGguf::new().tensor("t", &[4], GgmlType::F32, vec![0; 16]).build();
    // The type id sits right after name (8 + 1 bytes), n_dims (4) and one dim (8), 24 bytes into the header.
    let type_pos = 24 + 8 + 1 + 4 + 8;
    bytes[type_pos..type_pos + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(bytes), Err(GgufError::UnknownTensorType { type_id: 99, .. })));

    let mut two = SyntheticGguf::new()
        .tensor("a", &[16], GgmlType::F32, vec![0; 64])
        .tensor("b", &[8], GgmlType::F32, vec![0; 32])
        .build();
    // Point b's relative offset (last 8 bytes of its info) at 32, inside a's 64 bytes.
    let b_offset_pos = 24 + (8 + 1 + 4 + 8 + 4 + 8) * 2 - 8;
    two[b_offset_pos..b_offset_pos + 8].copy_from_slice(&32u64.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(two), Err(GgufError::BadTensor { .. })));
}

#[test]
fn checksum_is_verified_when_given() {
    let dir = std::env::temp_dir().join(format!("qf-gguf-sha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("synthetic.gguf");
    let bytes = sample().build();
    std::fs::write(&path, &bytes).unwrap();
    let good = sha256_hex(&bytes);
    assert!(GgufFile::open_verified(&path, &good.to_uppercase()).is_ok());
    let wrong = "0".repeat(64);
    assert!(matches!(GgufFile::open_verified(&path, &wrong), Err(GgufError::ChecksumMismatch { .. })));
    assert!(matches!(GgufFile::open(&dir.join("missing.gguf")), Err(GgufError::Io { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}
