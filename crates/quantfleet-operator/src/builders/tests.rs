//! The desired objects of the sample model's tiers, checked field by field.

use super::*;
use quantfleet_api::plan::{AcceleratorTable, plan_model};

fn sample() -> QuantizedModel {
    let mut qm: QuantizedModel =
        serde_yaml::from_str(include_str!("../../../../deploy/samples/smollm2-135m.quantizedmodel.yaml")).unwrap();
    qm.metadata.namespace = Some("serving".into());
    qm.metadata.uid = Some("0d6b7c2e-uid".into());
    qm
}

fn settings() -> Settings {
    Settings { node_image: "ghcr.io/quantfleet/quantfleet:0.1.0".into() }
}

fn build(qm: &QuantizedModel, index: usize) -> Result<TierObjects, BuildError> {
    let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
    build_tier(qm, &qm.spec.tiers[index], &plan.tiers[index], None, &settings())
}

/// The sample with its int4-awq tier calibrated on ConfigMap `chat-logs`.
fn with_calibration_config_map() -> QuantizedModel {
    let mut qm = sample();
    qm.spec.tiers[3].calibration.as_mut().unwrap().dataset = "configmap/chat-logs".into();
    qm
}

fn build_calibrated(qm: &QuantizedModel, index: usize, text: Option<&str>) -> Result<TierObjects, BuildError> {
    let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
    build_tier(qm, &qm.spec.tiers[index], &plan.tiers[index], text, &settings())
}

fn node_config(objects: &TierObjects) -> NodeConfig {
    serde_yaml::from_str(&objects.config_map.data.as_ref().unwrap()[NODE_CONFIG_KEY]).unwrap()
}

#[test]
fn names_labels_and_owner() {
    let objects = build(&sample(), 3).unwrap();
    for meta in [&objects.config_map.metadata, &objects.deployment.metadata, &objects.service.metadata] {
        assert_eq!(meta.name.as_deref(), Some("smollm2-135m-int4-awq"));
        assert_eq!(meta.namespace.as_deref(), Some("serving"));
        assert_eq!(meta.labels.as_ref().unwrap()[TIER_LABEL], "int4-awq");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("QuantizedModel", "0d6b7c2e-uid", Some(true))
        );
        assert_eq!(owner.api_version, "quantfleet.io/v1alpha1");
    }
}

#[test]
fn the_deployment_runs_the_node_on_the_declared_gpu_hardened() {
    let objects = build(&sample(), 3).unwrap();
    let spec = objects.deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let template = spec.template.spec.as_ref().unwrap();
    let term = &template
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms[0];
    let req = &term.match_expressions.as_ref().unwrap()[0];
    assert_eq!((req.key.as_str(), req.operator.as_str()), (GPU_PRODUCT_LABEL, "In"));
    assert_eq!(req.values.as_ref().unwrap(), &vec!["NVIDIA-L4".to_owned()]);

    let node = &template.containers[0];
    assert_eq!(
        node.args.as_ref().unwrap(),
        &vec!["node".to_owned(), "--config".into(), "/etc/quantfleet/node.yaml".into()]
    );
    let resources = node.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()[GPU_RESOURCE], Quantity("1".into()));
    assert_eq!(node.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap().port, 50051);
    assert!(node.startup_probe.is_some() && node.liveness_probe.is_some());

    let sc = node.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.read_only_root_filesystem, sc.allow_privilege_escalation, sc.run_as_non_root),
        (Some(true), Some(false), Some(true))
    );
    let pod_sc = template.security_context.as_ref().unwrap();
    assert_eq!(pod_sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert_eq!(pod_sc.run_as_user, Some(NODE_UID));
    assert!(node.volume_mounts.as_ref().unwrap().iter().any(|m| m.mount_path == "/tmp"), "a writable /tmp");
}

#[test]
fn resource_requests_come_from_the_plan() {
    let qm = sample();
    let plan = plan_model(&qm.spec, &AcceleratorTable::builtin());
    let objects = build(&qm, 0).unwrap();
    let node = &objects.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let memory = &node.resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"];
    assert_eq!(memory.0, format!("{}Mi", plan.tiers[0].weights.bytes.div_ceil(1 << 20) + 1024));
    let config = node_config(&objects);
    assert_eq!(config.kv_budget_bytes, Some(plan.tiers[0].kv_budget_bytes as u64));
    assert_eq!(config.tier, TierSpec { replicas: 1, ..qm.spec.tiers[0].clone() });
}

#[test]
fn a_changed_tier_spec_changes_the_template_hash_and_nothing_else_does() {
    let qm = sample();
    let hash = |o: &TierObjects| {
        o.deployment.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
            [CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let before = hash(&build(&qm, 1).unwrap());
    assert_eq!(before, hash(&build(&qm, 1).unwrap()), "deterministic");
    let mut changed = qm.clone();
    changed.spec.tiers[1].kv_cache.dtype = quantfleet_api::KvCacheDtype::Int8;
    assert_ne!(before, hash(&build(&changed, 1).unwrap()));
    let mut scaled = qm.clone();
    scaled.spec.tiers[1].replicas = 5;
    assert_eq!(before, hash(&build(&scaled, 1).unwrap()), "scaling must not roll pods");
}

#[test]
fn pvc_sources_mount_the_claim_read_only() {
    let mut qm = sample();
    qm.spec.source.uri = "pvc://models/smollm2/model.gguf".into();
    let objects = build(&qm, 0).unwrap();
    let pod = objects.deployment.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "model").unwrap();
    let pvc = volume.persistent_volume_claim.unwrap();
    assert_eq!((pvc.claim_name.as_str(), pvc.read_only), ("models", Some(true)));
    assert_eq!(node_config(&objects).source.uri, "file:///models/smollm2/model.gguf");
    assert!(pod.init_containers.is_none());
}

#[test]
fn https_sources_are_fetched_and_verified_by_an_init_container() {
    let mut qm = sample();
    qm.spec.source.uri = "https://models.example.com/smollm2/model.gguf".into();
    let objects = build(&qm, 0).unwrap();
    let pod = objects.deployment.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let init = &pod.init_containers.unwrap()[0];
    let args = init.args.as_ref().unwrap();
    assert_eq!(
        &args[..5],
        &["fetch", "--uri", "https://models.example.com/smollm2/model.gguf", "--out", "/models/model.gguf"]
    );
    assert_eq!(&args[5..], &["--sha256", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"]);
    assert_eq!(node_config(&objects).source.uri, "file:///models/model.gguf");
}

#[test]
fn the_service_exposes_grpc_and_metrics_for_the_tier_pods() {
    let objects = build(&sample(), 2).unwrap();
    let spec = objects.service.spec.unwrap();
    assert_eq!(spec.selector.as_ref().unwrap()[TIER_LABEL], "fp8-kv8");
    let ports = spec.ports.unwrap();
    assert_eq!((ports[0].port, ports[0].app_protocol.as_deref()), (50051, Some("grpc")));
    assert_eq!(ports[1].port, 9090);
    let selector = objects.deployment.spec.unwrap().selector.match_labels.unwrap();
    assert_eq!(selector, spec.selector.unwrap(), "the Service selects exactly the Deployment's pods");
}

#[test]
fn objects_without_server_metadata_or_with_odd_sources_are_refused() {
    let mut qm = sample();
    qm.metadata.uid = None;
    assert_eq!(build(&qm, 0).unwrap_err(), BuildError::MissingMetadata("metadata.uid"));
    let mut qm = sample();
    qm.spec.source.uri = "pvc://claim-without-path".into();
    assert!(matches!(build(&qm, 0).unwrap_err(), BuildError::UnsupportedSource(_)));
}

#[test]
fn a_calibration_config_map_is_mounted_named_in_the_config_and_hashed() {
    let qm = with_calibration_config_map();
    let objects = build_calibrated(&qm, 3, Some("User: hi\nAssistant: hello")).unwrap();
    assert_eq!(node_config(&objects).calibration_file.as_deref(), Some("/etc/quantfleet-calibration/calibration.txt"));
    let template = objects.deployment.spec.as_ref().unwrap().template.clone();
    let pod = template.spec.unwrap();
    let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "calibration").unwrap();
    let source = volume.config_map.as_ref().unwrap();
    assert_eq!((source.name.as_str(), source.optional), ("chat-logs", Some(false)));
    let items = source.items.as_ref().unwrap();
    assert_eq!((items[0].key.as_str(), items[0].path.as_str()), ("calibration.txt", "calibration.txt"));
    let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "calibration").unwrap();
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/quantfleet-calibration", Some(true)));

    // Edited text rolls the pods (a new template hash); the same text does not.
    let hash = |objects: &TierObjects| {
        let annotations = objects.deployment.spec.as_ref().unwrap().template.metadata.clone().unwrap().annotations;
        annotations.unwrap().get(CALIBRATION_HASH_ANNOTATION).cloned()
    };
    let again = build_calibrated(&qm, 3, Some("User: hi\nAssistant: hello")).unwrap();
    let edited = build_calibrated(&qm, 3, Some("User: hi\nAssistant: hello!")).unwrap();
    assert!(hash(&objects).is_some());
    assert_eq!(hash(&objects), hash(&again));
    assert_ne!(hash(&objects), hash(&edited));

    // The text must have been read: building without it is an error, never a pod on the built-in text.
    assert_eq!(
        build_calibrated(&qm, 3, None).unwrap_err(),
        BuildError::CalibrationNotRead { tier: "int4-awq".into(), config_map: "chat-logs".into() }
    );
}

#[test]
fn tiers_that_do_not_calibrate_or_use_the_builtin_text_mount_nothing() {
    // The sample's int4-awq tier calibrates on the built-in text.
    let builtin = build(&sample(), 3).unwrap();
    // An RTN tier with a ConfigMap dataset never reads it.
    let mut qm = with_calibration_config_map();
    qm.spec.tiers[1].calibration = qm.spec.tiers[3].calibration.clone();
    let rtn = build_calibrated(&qm, 1, None).unwrap();
    for objects in [builtin, rtn] {
        assert_eq!(node_config(&objects).calibration_file, None);
        let template = objects.deployment.spec.unwrap().template;
        assert!(template.spec.unwrap().volumes.unwrap().iter().all(|v| v.name != "calibration"));
        assert!(!template.metadata.unwrap().annotations.unwrap().contains_key(CALIBRATION_HASH_ANNOTATION));
    }
}
