//! The generated CRDs are accepted by a real API server (structural schema, CEL rules that compile) and served.

use quantfleet_testsupport::crds::{cel_rules, install_crds, load_crds, repo_crds_dir};
use quantfleet_testsupport::{TestEnv, control_plane};

#[tokio::test]
async fn every_crd_is_accepted_and_established() {
    let expected: Vec<String> = load_crds(&repo_crds_dir())
        .expect("crds/ holds the generated CRDs")
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let env = TestEnv::new("crds").await.unwrap_or_else(|e| panic!("{e}"));
    let installed = install_crds(&env.client, &repo_crds_dir())
        .await
        .unwrap_or_else(|e| panic!("the CRDs in crds/ must be accepted and Established: {e}"));
    let names: Vec<String> = installed.iter().filter_map(|c| c.metadata.name.clone()).collect();
    assert_eq!(names, expected);
    for crd in &installed {
        println!("established {} ({} CEL rules)", crd.metadata.name.as_deref().unwrap_or("?"), cel_rules(crd).len());
    }
    println!("kubeconfig: {}", control_plane().unwrap_or_else(|e| panic!("{e}")).kubeconfig().display());
    env.cleanup().await.expect("namespace deleted");
}
