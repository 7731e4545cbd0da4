//! The garbage collector removes what an owner owns once the owner is deleted: the operator relies on this
//! (its Deployments and Services carry ownerReferences to their QuantizedModel).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv};
use serde_json::json;

fn config_map(name: &str, owner: Option<&ConfigMap>) -> ConfigMap {
    let owner_references = owner.map(|o| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: o.metadata.name.clone().unwrap_or_default(),
            uid: o.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]
    });
    ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), owner_references, ..ObjectMeta::default() },
        data: Some(BTreeMap::from([("synthetic".to_string(), "test data".to_string())])),
        ..ConfigMap::default()
    }
}

async fn names<K>(api: &Api<K>, labels: &str) -> Result<Vec<String>, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = api.list(&ListParams::default().labels(labels)).await.map_err(Error::kube("listing"))?;
    Ok(list.items.iter().filter_map(|o| o.meta().name.clone()).collect())
}

#[tokio::test]
async fn deleting_an_owner_collects_its_children_and_nothing_else() {
    let env = TestEnv::new("gc-owner").await.unwrap_or_else(|e| panic!("{e}"));
    let api = Api::<ConfigMap>::namespaced(env.client.clone(), env.namespace());
    let post = PostParams::default();
    let owner = api.create(&post, &config_map("owner", None)).await.expect("owner created");
    for child in ["child-a", "child-b"] {
        api.create(&post, &config_map(child, Some(&owner))).await.expect("child created");
    }
    api.create(&post, &config_map("bystander", None)).await.expect("bystander created");

    api.delete("owner", &DeleteParams::background()).await.expect("owner deleted");
    let remaining = until("the garbage collector to delete the children", Duration::from_secs(60), || async {
        let mut left = names(&api, "").await?;
        left.retain(|n| n != "kube-root-ca.crt");
        Ok(if left.iter().any(|n| n.starts_with("child-")) {
            Probe::Pending(format!("{left:?}"))
        } else {
            Probe::Done(left)
        })
    })
    .await
    .expect("children collected");
    assert_eq!(remaining, vec!["bystander".to_string()]);
    env.cleanup().await.expect("namespace deleted");
}

#[tokio::test]
async fn deleting_a_deployment_collects_its_replicasets_and_pods() {
    let env = TestEnv::new("gc-deployment").await.unwrap_or_else(|e| panic!("{e}"));
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/web:test"}]}
            }
        }
    }))
    .expect("valid Deployment");
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), env.namespace());
    deployments.create(&PostParams::default(), &deployment).await.expect("created");

    let client = env.client.clone();
    let ns = env.namespace().to_string();
    let count = |client: Client, ns: String| async move {
        let rs = names(&Api::<ReplicaSet>::namespaced(client.clone(), &ns), "app=web").await?;
        let pods = names(&Api::<Pod>::namespaced(client, &ns), "app=web").await?;
        Ok::<_, Error>((rs.len(), pods.len()))
    };
    until("the Deployment's ReplicaSet and 2 pods", Duration::from_secs(60), || async {
        let (rs, pods) = count(client.clone(), ns.clone()).await?;
        Ok(if rs == 1 && pods == 2 {
            Probe::Done(())
        } else {
            Probe::Pending(format!("{rs} ReplicaSets, {pods} pods"))
        })
    })
    .await
    .expect("children created");

    deployments.delete("web", &DeleteParams::background()).await.expect("Deployment deleted");
    until("the ReplicaSet and pods to be collected", Duration::from_secs(60), || async {
        let (rs, pods) = count(client.clone(), ns.clone()).await?;
        Ok(if rs == 0 && pods == 0 {
            Probe::Done(())
        } else {
            Probe::Pending(format!("{rs} ReplicaSets, {pods} pods"))
        })
    })
    .await
    .expect("children collected");
    env.cleanup().await.expect("namespace deleted");
}
