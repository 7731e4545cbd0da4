//! Scheduling onto the fake GPU nodes is real: the scheduler matches `nvidia.com/gpu.product` and counts the
//! `nvidia.com/gpu` extended resource, kwok marks the pods Running and Ready, and the Deployment becomes Available.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use quantfleet_testsupport::TestEnv;
use quantfleet_testsupport::wait::{Probe, until};

const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
const GPU: &str = "nvidia.com/gpu";
const H100: &str = "NVIDIA-H100-80GB-HBM3";

/// A GPU worker Deployment; the image is never pulled (kwok runs no containers).
fn gpu_deployment(name: &str, replicas: i32, product: &str, gpus: u32) -> Deployment {
    let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
    let gpu_limit = BTreeMap::from([(GPU.to_string(), Quantity(gpus.to_string()))]);
    Deployment {
        metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    node_selector: Some(BTreeMap::from([(PRODUCT_LABEL.to_string(), product.to_string())])),
                    containers: vec![Container {
                        name: "node".into(),
                        image: Some("registry.invalid/quantfleet-node:test".into()),
                        resources: Some(ResourceRequirements { limits: Some(gpu_limit), ..Default::default() }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

async fn wait_available(client: &Client, namespace: &str, name: &str) {
    let api = Api::<Deployment>::namespaced(client.clone(), namespace);
    until(&format!("Deployment {name} to become Available"), Duration::from_secs(60), || async {
        let d = api.get(name).await.map_err(quantfleet_testsupport::Error::kube("reading the Deployment"))?;
        let conditions = d.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
        let available = conditions.iter().any(|c| c.type_ == "Available" && c.status == "True");
        let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
        let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        Ok(if available && ready == wanted {
            Probe::Done(())
        } else {
            Probe::Pending(format!("{ready}/{wanted} ready"))
        })
    })
    .await
    .expect("Deployment becomes Available");
}

/// The GPU product label of the node each pod of `app` runs on.
async fn products_of_pods(client: &Client, namespace: &str, app: &str) -> Vec<(String, String)> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("pods listed");
    let nodes = Api::<Node>::all(client.clone());
    let mut placed = Vec::new();
    for pod in pods {
        let node_name = pod.spec.and_then(|s| s.node_name).expect("an Available Deployment's pods are scheduled");
        let node = nodes.get(&node_name).await.expect("node exists");
        let product = node.metadata.labels.unwrap_or_default().get(PRODUCT_LABEL).cloned().unwrap_or_default();
        placed.push((node_name, product));
    }
    placed.sort();
    placed
}

#[tokio::test]
async fn gpu_deployment_is_scheduled_onto_h100_nodes_and_becomes_available() {
    let env = TestEnv::new("schedule-h100").await.unwrap_or_else(|e| panic!("{e}"));
    let api = Api::<Deployment>::namespaced(env.client.clone(), env.namespace());
    api.create(&PostParams::default(), &gpu_deployment("h100-worker", 2, H100, 1)).await.expect("created");
    wait_available(&env.client, env.namespace(), "h100-worker").await;

    let placed = products_of_pods(&env.client, env.namespace(), "h100-worker").await;
    println!("h100-worker pods placed on {placed:?}");
    assert_eq!(placed.len(), 2);
    assert!(placed.iter().all(|(_, product)| product == H100), "pods landed off H100 nodes: {placed:?}");
    env.cleanup().await.expect("namespace deleted");
}

#[tokio::test]
async fn each_gpu_product_selects_its_own_nodes() {
    let env = TestEnv::new("schedule-products").await.unwrap_or_else(|e| panic!("{e}"));
    let api = Api::<Deployment>::namespaced(env.client.clone(), env.namespace());
    let products = [("a100-worker", "NVIDIA-A100-SXM4-80GB", "gpu-a100-0"), ("l4-worker", "NVIDIA-L4", "gpu-l4-0")];
    for (name, product, _) in products {
        api.create(&PostParams::default(), &gpu_deployment(name, 1, product, 1)).await.expect("created");
    }
    for (name, product, node) in products {
        wait_available(&env.client, env.namespace(), name).await;
        let placed = products_of_pods(&env.client, env.namespace(), name).await;
        assert_eq!(placed, vec![(node.to_string(), product.to_string())]);
    }
    env.cleanup().await.expect("namespace deleted");
}

#[tokio::test]
async fn a_pod_needing_more_gpus_than_any_node_has_stays_pending() {
    let env = TestEnv::new("schedule-too-big").await.unwrap_or_else(|e| panic!("{e}"));
    let api = Api::<Deployment>::namespaced(env.client.clone(), env.namespace());
    // The H100 nodes have 8 GPUs each: 9 fit on none of them, whatever else is running.
    api.create(&PostParams::default(), &gpu_deployment("too-big", 1, H100, 9)).await.expect("created");
    let pods = Api::<Pod>::namespaced(env.client.clone(), env.namespace());
    let message = until("the scheduler to report the pod unschedulable", Duration::from_secs(60), || async {
        let list = pods
            .list(&ListParams::default().labels("app=too-big"))
            .await
            .map_err(quantfleet_testsupport::Error::kube("listing pods"))?;
        let condition = list.items.iter().find_map(|p| {
            let conditions = p.status.as_ref()?.conditions.as_ref()?;
            conditions.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False").cloned()
        });
        Ok(match condition {
            Some(c) if c.reason.as_deref() == Some("Unschedulable") => Probe::Done(c.message.unwrap_or_default()),
            other => Probe::Pending(format!("{} pods, PodScheduled=False condition: {other:?}", list.items.len())),
        })
    })
    .await
    .expect("pod reported unschedulable");
    println!("scheduler: {message}");
    assert!(message.contains("Insufficient nvidia.com/gpu"), "unexpected scheduler message: {message}");
    env.cleanup().await.expect("namespace deleted");
}
