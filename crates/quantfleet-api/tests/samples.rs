//! The sample resources in deploy/samples deserialize into the API types and serialize back to the same
//! objects: no field is silently dropped or renamed.

use quantfleet_api::{PrecisionPolicy, QuantizedModel};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(file: &str) {
    let text = std::fs::read_to_string(format!("{}/../../deploy/samples/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let original: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let typed: T = serde_json::from_value(original.clone()).unwrap();
    let back = serde_json::to_value(&typed).unwrap();
    // Every field the sample sets survives unchanged (defaults may be added, nothing is lost).
    fn contains(have: &serde_json::Value, want: &serde_json::Value, path: &str) {
        match (have, want) {
            (serde_json::Value::Object(h), serde_json::Value::Object(w)) => {
                for (k, v) in w {
                    contains(h.get(k).unwrap_or_else(|| panic!("{path}.{k} dropped")), v, &format!("{path}.{k}"));
                }
            }
            (serde_json::Value::Array(h), serde_json::Value::Array(w)) => {
                assert_eq!(h.len(), w.len(), "{path} length");
                for (i, (a, b)) in h.iter().zip(w).enumerate() {
                    contains(a, b, &format!("{path}[{i}]"));
                }
            }
            (h, w) => assert!(h == w || h.as_f64().is_some() && h.as_f64() == w.as_f64(), "{path}: {h} != {w}"),
        }
    }
    contains(&back, &original, "");
    assert_eq!(serde_json::from_value::<T>(back).unwrap(), typed);
}

#[test]
fn the_sample_model_round_trips() {
    round_trip::<QuantizedModel>("smollm2-135m.quantizedmodel.yaml");
}

#[test]
fn the_sample_policy_round_trips() {
    round_trip::<PrecisionPolicy>("smollm2-135m.precisionpolicy.yaml");
}
