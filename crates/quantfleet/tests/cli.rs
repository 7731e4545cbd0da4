//! The `quantfleet` binary's planning and CRD commands, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn quantfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantfleet")).args(args).current_dir(repo()).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn temp_file(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quantfleet-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

const SEVENTY_B_ON_L4: &str = r#"
apiVersion: quantfleet.io/v1alpha1
kind: QuantizedModel
metadata: {name: llama-70b}
spec:
  source: {uri: "pvc://models/llama-3-70b/model.safetensors"}
  architecture: {numLayers: 80, hiddenSize: 8192, intermediateSize: 28672, numAttentionHeads: 64,
                 numKeyValueHeads: 8, headDim: 128, vocabSize: 128256, maxPositionEmbeddings: 8192}
  accelerator: {product: NVIDIA-L4}
  tiers:
    - name: int4
      weights: {format: int4, method: awq}
"#;

#[test]
fn plan_accepts_the_samples() {
    let out = quantfleet(&[
        "plan",
        "deploy/samples/smollm2-135m.quantizedmodel.yaml",
        "deploy/samples/smollm2-135m.precisionpolicy.yaml",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.contains("int4-awq     int4-g128-awq/bf16/fp16"), "{text}");
    assert!(text.contains("PrecisionPolicy smollm2-135m: valid"), "{text}");
}

#[test]
fn plan_fails_closed_and_says_what_would_fit() {
    let file = temp_file("70b.yaml", SEVENTY_B_ON_L4);
    let out = quantfleet(&["plan", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("int4 ") && text.contains("NO"), "{text}");
    assert!(text.contains("Would fit:") && text.contains("accelerator.count >= 3"), "{text}");
}

#[test]
fn plan_reports_cel_violations_and_undeclared_tiers() {
    let bad =
        SEVENTY_B_ON_L4.replace("method: awq}", "method: awq, groupSize: 100}").replace("NVIDIA-L4", "NVIDIA-H200")
            + r#"---
apiVersion: quantfleet.io/v1alpha1
kind: PrecisionPolicy
metadata: {name: p}
spec:
  modelRef: {name: llama-70b}
  defaultTier: bf16
"#;
    let file = temp_file("bad.yaml", &bad);
    let out = quantfleet(&["plan", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("invalid: spec.tiers[0].weights: weights.groupSize must be one of 32, 64, 128, 256"),
        "{text}"
    );
    assert!(text.contains("spec.defaultTier: tier \"bf16\" is not declared by the model"), "{text}");
}

#[test]
fn plan_rejects_unreadable_input_with_a_clear_error() {
    let file = temp_file("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n");
    let out = quantfleet(&["plan", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("has kind \"Service\"; expected QuantizedModel or PrecisionPolicy")
    );
    let out = quantfleet(&["plan", "/nonexistent/model.yaml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn crdgen_check_detects_drift() {
    // Without a directory both copies are checked: crds/ and the Helm chart's charts/quantfleet/crds/.
    let out = quantfleet(&["crdgen", "--check"]);
    assert!(out.status.success(), "committed crds/ and chart CRDs must match the types: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("charts/quantfleet/crds"));
    let dir = std::env::temp_dir().join(format!("quantfleet-crds-{}", std::process::id()));
    let out = quantfleet(&["crdgen", dir.to_str().unwrap()]);
    assert!(out.status.success());
    let file = dir.join("quantizedmodels.quantfleet.io.yaml");
    let edited = std::fs::read_to_string(&file).unwrap().replace("maxLength: 63", "maxLength: 64");
    std::fs::write(&file, edited).unwrap();
    let out = quantfleet(&["crdgen", "--check", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantizedmodels.quantfleet.io.yaml differs"));
}
