//! The API server is configured like a real cluster's: service-account tokens are signed and accepted, and RBAC
//! decides what they may do. The operator's ClusterRole will be tested the same way.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::config::AuthInfo;
use kube::{Api, Client};
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv, control_plane};

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() }
}

/// The HTTP status of listing ConfigMaps in `namespace` (200 when allowed).
async fn list_status(client: &Client, namespace: &str) -> Result<u16, Error> {
    match Api::<ConfigMap>::namespaced(client.clone(), namespace).list(&ListParams::default()).await {
        Ok(_) => Ok(200),
        Err(kube::Error::Api(status)) => Ok(status.code),
        Err(e) => Err(Error::kube("listing ConfigMaps as the service account")(e)),
    }
}

#[tokio::test]
async fn service_account_tokens_authenticate_and_rbac_authorizes() {
    let env = TestEnv::new("rbac").await.unwrap_or_else(|e| panic!("{e}"));
    let ns = env.namespace().to_string();
    let post = PostParams::default();
    Api::<ServiceAccount>::namespaced(env.client.clone(), &ns)
        .create(&post, &ServiceAccount { metadata: meta("reader"), ..ServiceAccount::default() })
        .await
        .expect("service account created");
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(600), ..TokenRequestSpec::default() },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(env.client.clone(), &ns)
        .create_token_request("reader", &post, &request)
        .await
        .expect("the API server signs service-account tokens")
        .status
        .expect("a token request has a status")
        .token;

    let mut config = control_plane().unwrap_or_else(|e| panic!("{e}")).config().await.expect("config");
    config.auth_info = AuthInfo { token: Some(token.into()), ..AuthInfo::default() };
    let as_reader = Client::try_from(config).expect("client");

    assert_eq!(list_status(&as_reader, &ns).await.expect("list"), 403, "RBAC must deny an unbound account");

    let role = Role {
        metadata: meta("configmap-reader"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(env.client.clone(), &ns).create(&post, &role).await.expect("role created");
    let binding = RoleBinding {
        metadata: meta("reader-reads-configmaps"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "configmap-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(env.client.clone(), &ns).create(&post, &binding).await.expect("binding created");

    until("the RoleBinding to take effect", Duration::from_secs(30), || async {
        Ok(match list_status(&as_reader, &ns).await? {
            200 => Probe::Done(()),
            code => Probe::Pending(format!("HTTP {code}")),
        })
    })
    .await
    .expect("the bound account may list ConfigMaps");
    // The Role is namespaced: other namespaces stay closed.
    assert_eq!(list_status(&as_reader, "default").await.expect("list"), 403);
    env.cleanup().await.expect("namespace deleted");
}
