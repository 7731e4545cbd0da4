//! The GGUF parser on the real SmolLM2-135M file: structure as documented in shared/ENVIRONMENT.md,
//! checksum verification, and that every tensor dequantizes to finite values.

mod common;

use quantfleet_engine::dtype::{GgmlType, dequantize_row_reference};
use quantfleet_engine::gguf::GgufFile;

#[test]
fn real_smollm2_file_has_the_documented_structure() {
    let g = GgufFile::open_verified(&common::smollm2_path(), common::SMOLLM2_SHA256).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u64("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(g.get_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    let count = |t: GgmlType| g.tensors().iter().filter(|i| i.ggml_type == t).count();
    assert_eq!((count(GgmlType::Q4_1), count(GgmlType::Q8_0), count(GgmlType::F32)), (210, 1, 61));
    assert!(g.tensor("output.weight").is_none(), "SmolLM2 ties its output to the embedding");
    let params: u64 = g.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(params / 100_000, 1345, "134.5M parameters");

    // Every tensor dequantizes (first row checked everywhere, to keep the test fast) to finite values.
    for t in g.tensors() {
        let row_elems = t.dims[0] as usize;
        let row_bytes = t.ggml_type.row_bytes(t.dims[0]).unwrap() as usize;
        let mut row = vec![0.0f32; row_elems];
        dequantize_row_reference(t.ggml_type, &g.tensor_data(t)[..row_bytes], &mut row).unwrap();
        assert!(row.iter().all(|v| v.is_finite()), "{}", t.name);
    }
}

/// Truncations of the real file (an in-memory prefix) inside the header, metadata, tensor directory and data
/// are typed errors, never panics.
#[test]
fn truncated_copies_of_the_real_file_are_errors() {
    let bytes = std::fs::read(common::smollm2_path()).unwrap();
    let full = GgufFile::from_bytes(bytes.clone()).unwrap();
    let data_start = full.tensors().iter().map(|t| t.start).min().unwrap() as usize;
    // Header, inside the vocabulary array, inside the tensor directory, first and last tensor's data.
    for cut in [3, 20, 1_000, 500_000, data_start - 100, data_start + 10, bytes.len() - 1] {
        let err = GgufFile::from_bytes(bytes[..cut].to_vec()).expect_err("truncated file must not parse");
        assert!(!err.to_string().is_empty(), "cut at {cut}");
    }
}
