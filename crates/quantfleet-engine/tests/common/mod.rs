//! Shared helpers for tests on the real SmolLM2-135M model and the numpy oracle's reference logits.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

/// The real model: `QUANTFLEET_SMOLLM2_GGUF` (exported by scripts/test.sh), else the default cache path.
/// Panics with instructions when absent: these tests must fail loudly, never skip.
pub fn smollm2_path() -> PathBuf {
    let path = match std::env::var_os("QUANTFLEET_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("QUANTFLEET_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/quantfleet")))
                .expect("neither QUANTFLEET_CACHE nor HOME is set");
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.is_file(),
        "SmolLM2-135M GGUF not found at {}: run scripts/fetch-model.sh (scripts/test.sh does) and/or set \
         QUANTFLEET_SMOLLM2_GGUF to the path it prints",
        path.display()
    );
    path
}

pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// One case of /work/shared/oracle/reference_logits.json (found through `../shared/oracle` from the repo root).
pub struct OracleCase {
    pub name: String,
    pub text: String,
    pub ids: Vec<u32>,
    /// Per position: the oracle's top-5 (token, logit).
    pub top: Vec<Vec<(u32, f32)>>,
    pub logsumexp: Vec<f32>,
    pub greedy_next: u32,
    pub last_gap: f32,
}

pub fn oracle_path() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        std::env::var_os("QUANTFLEET_ORACLE_DIR").map(PathBuf::from),
        Some(repo.join("../shared/oracle")),
        Some(PathBuf::from("/work/shared/oracle")),
    ];
    candidates.into_iter().flatten().map(|d| d.join("reference_logits.json")).find(|p| p.is_file()).expect(
        "reference_logits.json not found: expected shared/oracle beside the repository (or set QUANTFLEET_ORACLE_DIR)",
    )
}

pub fn oracle_cases() -> Vec<OracleCase> {
    let text = std::fs::read_to_string(oracle_path()).expect("read reference_logits.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parse reference_logits.json");
    let as_u32 = |v: &serde_json::Value| v.as_u64().expect("token id") as u32;
    let as_f32 = |v: &serde_json::Value| v.as_f64().expect("float") as f32;
    json.as_array()
        .expect("oracle is a list")
        .iter()
        .map(|c| OracleCase {
            name: c["name"].as_str().unwrap().to_string(),
            text: c["text"].as_str().unwrap().to_string(),
            ids: c["ids"].as_array().unwrap().iter().map(as_u32).collect(),
            top: c["top_logits_per_position"]
                .as_array()
                .unwrap()
                .iter()
                .map(|pos| pos.as_array().unwrap().iter().map(|p| (as_u32(&p[0]), as_f32(&p[1]))).collect())
                .collect(),
            logsumexp: c["logsumexp_per_position"].as_array().unwrap().iter().map(as_f32).collect(),
            greedy_next: as_u32(&c["greedy_next"]),
            last_gap: as_f32(&c["last_top1_top2_gap"]),
        })
        .collect()
}
