//! The `quantfleet` binary's planning and CRD commands, run as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quantfleet_testsupport::ScratchDir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn quantfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantfleet")).args(args).current_dir(repo()).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A file holding `body`, in a scratch directory removed when this drops.
struct TempFile {
    path: PathBuf,
    _dir: ScratchDir,
}

impl TempFile {
    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

fn temp_file(name: &str, body: &str) -> TempFile {
    let dir = ScratchDir::new("quantfleet-cli").unwrap();
    TempFile { path: dir.file(name, body).unwrap(), _dir: dir }
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
    let out = quantfleet(&["plan", file.path()]);
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
    let out = quantfleet(&["plan", file.path()]);
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
    let out = quantfleet(&["plan", file.path()]);
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
    let scratch = ScratchDir::new("quantfleet-crds").unwrap();
    let dir = scratch.path();
    let out = quantfleet(&["crdgen", dir.to_str().unwrap()]);
    assert!(out.status.success());
    let file = dir.join("quantizedmodels.quantfleet.io.yaml");
    let edited = std::fs::read_to_string(&file).unwrap().replace("maxLength: 63", "maxLength: 64");
    std::fs::write(&file, edited).unwrap();
    let out = quantfleet(&["crdgen", "--check", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantizedmodels.quantfleet.io.yaml differs"));
}

/// The objects of one chart template (scripts/helm-build.sh must have built helm: scripts/test.sh runs
/// scripts/helm-check.sh first). A flag the binary does not know would crash-loop the pod in a real cluster, and
/// the chart test's kwok pods never run the binary, so the rendered arguments are run here.
fn chart_template(template: &str, set: &[&str]) -> Vec<serde_json::Value> {
    let helm = Command::new("bash").arg(repo().join("scripts/helm-build.sh")).arg("--cached-only").output().unwrap();
    assert!(
        helm.status.success(),
        "helm is not built: run scripts/helm-build.sh ({})",
        String::from_utf8_lossy(&helm.stderr)
    );
    let mut cmd = Command::new(String::from_utf8(helm.stdout).unwrap().trim());
    cmd.args(["template", "qf", "charts/quantfleet", "--namespace", "qf", "--kube-version", "1.33.0"]);
    cmd.args(["--show-only", template]).current_dir(repo());
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

fn container_args(objects: &[serde_json::Value]) -> Vec<String> {
    let deployment = objects.iter().find(|v| v["kind"] == "Deployment").expect("a Deployment");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap();
    args.iter().map(|a| a.as_str().unwrap().to_owned()).collect()
}

fn chart_operator_args(set: &[&str]) -> Vec<String> {
    container_args(&chart_template("templates/operator-deployment.yaml", set))
}

/// Runs the binary as a pod would, without a cluster: it must get past argument parsing (and reading its
/// files) and fail connecting, never before.
fn fails_only_connecting(args: &[String], context: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantfleet"))
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?} with {context}: {stderr}");
    assert!(stderr.contains("connecting to the Kubernetes API"), "{args:?} with {context}: {stderr}");
}

#[test]
fn the_chart_renders_operator_arguments_the_binary_accepts() {
    for set in [&[][..], &["operator.replicas=2", r"operator.accelerators={X=48Gi\,8.9}", "router.enabled=false"]] {
        let args = chart_operator_args(set);
        assert_eq!(args[0], "operator");
        fails_only_connecting(&args, &format!("{set:?}"));
    }
}

#[test]
fn the_chart_renders_router_arguments_and_settings_the_binary_accepts() {
    let sets: [&[&str]; 2] = [
        &[],
        &["router.policy.name=chat-policy", "router.policy.namespace=models", "router.config.limits.maxTokens=2048"],
    ];
    for set in sets {
        let objects = chart_template("templates/router.yaml", set);
        let mut args = container_args(&objects);
        assert_eq!(&args[..2], ["router", "--kubernetes"], "the chart's router uses the Kubernetes source");
        let want_ns = if set.is_empty() { "qf" } else { "models" };
        assert!(args.contains(&format!("--namespace={want_ns}")), "{args:?}");
        // The settings file is the rendered ConfigMap's, at the path the Deployment mounts it.
        let config_map = objects.iter().find(|v| v["kind"] == "ConfigMap").expect("the router ConfigMap");
        let settings = temp_file("router.yaml", config_map["data"]["router.yaml"].as_str().unwrap());
        let config = args.iter_mut().find(|a| a.starts_with("--config=")).expect("a --config argument");
        assert_eq!(config.as_str(), "--config=/etc/quantfleet/router/router.yaml");
        *config = format!("--config={}", settings.path());
        fails_only_connecting(&args, &format!("{set:?}"));
        // The Role names exactly the policy the arguments do, in the same namespace.
        let role = objects.iter().find(|v| v["kind"] == "Role").expect("the router Role");
        let policy = args.iter().find_map(|a| a.strip_prefix("--policy=")).unwrap();
        assert_eq!(role["metadata"]["namespace"], want_ns);
        assert_eq!(role["rules"][0]["resourceNames"], serde_json::json!([policy]));
    }
    // The same binary refuses settings that would shadow the API's objects, before connecting.
    let bad = temp_file("router-bad.yaml", "listen: 0.0.0.0:8080\nendpoints: {fp8: ['10.0.0.1:50051']}\n");
    let out = quantfleet(&["router", "--kubernetes", "--policy", "p", "--config", bad.path()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("endpoints: comes from the Kubernetes API"), "{out:?}");
    // --policy is required with --kubernetes, --config without it.
    assert_eq!(quantfleet(&["router", "--kubernetes"]).status.code(), Some(2));
    let out = quantfleet(&["router"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"), "{out:?}");
}

/// A tier calibrated on a ConfigMap needs that text: `up` (no cluster) and `eval` (without --calibration-file)
/// refuse it at once, naming the tier, instead of quietly calibrating on the built-in text.
#[test]
fn up_and_eval_refuse_a_configmap_calibrated_tier_without_its_text() {
    let sample = std::fs::read_to_string(repo().join("deploy/samples/smollm2-135m.quantizedmodel.yaml")).unwrap();
    let edited = sample.replace("dataset: builtin", "dataset: configmap/chat-logs");
    assert_ne!(sample, edited, "the sample's int4-awq tier names its dataset");
    let model = temp_file("calibrated.yaml", &edited);
    let up = quantfleet(&["up", "--model-resource", model.path(), "--model", "/nonexistent.gguf"]);
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(!up.status.success());
    assert!(err.contains("tier int4-awq: calibration.dataset configmap/chat-logs"), "{err}");
    let eval = quantfleet(&["eval", "--model", "/nonexistent.gguf", "--data", "/nonexistent", "--tiers", model.path()]);
    let err = String::from_utf8_lossy(&eval.stderr);
    assert!(!eval.status.success());
    assert!(
        err.contains("tier int4-awq calibrates on configmap/chat-logs") && err.contains("--calibration-file"),
        "{err}"
    );
}
