//! Every admission case in tests/admission/ against the real API server, and a check that the cases cover every
//! CEL rule of the CRDs with a rejected object (and every kind with an accepted one).

use quantfleet_testsupport::admission::{Expect, load_cases, repo_cases_dir, run_case};
use quantfleet_testsupport::crds::{cel_rules, install_crds, load_crds, repo_crds_dir};
use quantfleet_testsupport::{TestEnv, TestNamespace};

#[tokio::test]
async fn admission_cases_behave_as_written() {
    let cases = load_cases(&repo_cases_dir()).expect("tests/admission/ holds valid cases");
    let env = TestEnv::new("admission").await.unwrap_or_else(|e| panic!("{e}"));
    let crds = install_crds(&env.client, &repo_crds_dir())
        .await
        .unwrap_or_else(|e| panic!("the CRDs in crds/ must be accepted and Established: {e}"));

    let mut failures = Vec::new();
    for case in &cases {
        // A fresh namespace per case: a case's objects must not collide with another case's.
        let namespace = TestNamespace::create(&env.client, "admission").await.expect("namespace");
        let outcome = run_case(&env.client, namespace.name(), &crds, case).await;
        namespace.delete(&env.client).await.expect("namespace deleted");
        let verdict = if outcome.passed { "ok  " } else { "FAIL" };
        println!("{verdict} {}: {} -> {}", case.file_name(), case.description, outcome.detail);
        if !outcome.passed {
            failures.push(format!("{} ({}): {}", case.file_name(), case.description, outcome.detail));
        }
    }
    println!("{} of {} admission cases behaved as expected", cases.len() - failures.len(), cases.len());
    assert!(failures.is_empty(), "{} admission case(s) misbehaved:\n{}", failures.len(), failures.join("\n"));
    env.cleanup().await.expect("namespace deleted");
}

#[test]
fn every_cel_rule_has_a_rejecting_case_and_every_kind_an_accepted_one() {
    let cases = load_cases(&repo_cases_dir()).expect("tests/admission/ holds valid cases");
    let crds = load_crds(&repo_crds_dir()).expect("crds/ holds the generated CRDs");
    let rejections: Vec<&str> = cases.iter().filter_map(|c| c.message_contains.as_deref()).collect();

    let mut uncovered = Vec::new();
    for rule in crds.iter().flat_map(cel_rules) {
        // The API server reports a rule's message, or "failed rule: <rule>" when it has none.
        let covered = rejections
            .iter()
            .any(|wanted| rule.message.as_deref().is_some_and(|m| m.contains(wanted)) || rule.rule.contains(wanted));
        if !covered {
            uncovered.push(format!("{} {} at {}: {}", rule.crd, rule.version, rule.path, rule.rule));
        }
    }
    assert!(uncovered.is_empty(), "CEL rules without a rejecting admission case:\n{}", uncovered.join("\n"));

    for crd in &crds {
        let kind = &crd.spec.names.kind;
        let accepted = cases
            .iter()
            .any(|c| c.expect == Expect::Accept && c.object.types.as_ref().is_some_and(|t| &t.kind == kind));
        assert!(accepted, "no admission case creates a valid {kind}");
    }
}
