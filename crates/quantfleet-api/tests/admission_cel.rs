//! Evaluates the CRDs' CEL rules client-side against every admission case in tests/admission/, the same
//! cases the control-plane suite sends to a real kube-apiserver. This catches a wrong rule or message in
//! seconds; the real API server remains the authority (it also checks the OpenAPI limits, which cases mark
//! `checkedBy: schema` and this test skips).

use kube::CustomResourceExt;
use quantfleet_api::{PrecisionPolicy, QuantizedModel};
use serde_json::Value;
use std::path::PathBuf;

fn schema_of(kind: &str) -> Value {
    let crd = match kind {
        "QuantizedModel" => QuantizedModel::crd(),
        "PrecisionPolicy" => PrecisionPolicy::crd(),
        other => panic!("admission case for unknown kind {other}"),
    };
    let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
    serde_json::to_value(schema).unwrap()
}

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/admission")
}

#[test]
fn every_cel_admission_case_behaves_as_expected() {
    let mut files: Vec<_> = std::fs::read_dir(cases_dir())
        .expect("tests/admission exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in &files {
        let case: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        if case.get("checkedBy").and_then(Value::as_str).unwrap_or("cel") != "cel" {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let object = &case["object"];
        let schema = schema_of(object["kind"].as_str().unwrap());
        let outcome = match case.get("updateTo") {
            Some(update) => {
                if let Err(errs) = kube_cel::validate(&schema, object, None) {
                    failures.push(format!("{name}: the object before the update was rejected: {errs:?}"));
                    continue;
                }
                kube_cel::validate(&schema, update, Some(object))
            }
            None => kube_cel::validate(&schema, object, None),
        };
        checked += 1;
        match (case["expect"].as_str().unwrap(), outcome) {
            ("accept", Ok(())) => {}
            ("accept", Err(errs)) => failures.push(format!("{name}: expected accept, got {errs:?}")),
            ("reject", Ok(())) => failures.push(format!("{name}: expected reject, was accepted")),
            ("reject", Err(errs)) => {
                let want = case["messageContains"].as_str().unwrap();
                if !errs.iter().any(|e| e.message.contains(want)) {
                    failures.push(format!("{name}: rejected, but no message contains {want:?}: {errs:?}"));
                }
            }
            (other, _) => failures.push(format!("{name}: unknown expect {other:?}")),
        }
    }
    assert!(checked >= 60, "only {checked} CEL cases found in {}", cases_dir().display());
    assert!(failures.is_empty(), "{} of {checked} cases misbehaved:\n{}", failures.len(), failures.join("\n"));
}
