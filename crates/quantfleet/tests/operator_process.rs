//! `quantfleet operator` as processes on a real control plane: two replicas, one leader; when the leader is
//! killed the standby takes over after the Lease expires and reconciles what happens next.

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use quantfleet_api::QuantizedModel;
use quantfleet_api::conditions::find;
use quantfleet_testsupport::crds::{install_crds, repo_crds_dir};
use quantfleet_testsupport::wait::{Probe, until};
use quantfleet_testsupport::{Error, TestEnv, control_plane};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn operator(instance: &str, ns: &str, kubeconfig: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_quantfleet"))
        .args(["operator", "--node-image", "registry.invalid/quantfleet:test", "--metrics-addr", "127.0.0.1:0"])
        .args(["--lease-namespace", ns, "--lease-name", "op-process-test", "--lease-duration-seconds", "3"])
        .args(["--instance", instance])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting quantfleet operator")
}

/// A model whose only tier cannot fit an L4: reconciling it writes FitsAccelerator=False and creates nothing.
fn misfit(name: &str) -> QuantizedModel {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "quantfleet.io/v1alpha1", "kind": "QuantizedModel", "metadata": {"name": name},
        "spec": {
            "source": {"uri": "file:///models/m.gguf"},
            "architecture": {"numLayers": 80, "hiddenSize": 8192, "intermediateSize": 28672, "numAttentionHeads": 64,
                             "numKeyValueHeads": 8, "headDim": 128, "vocabSize": 128256, "maxPositionEmbeddings": 8192},
            "accelerator": {"product": "NVIDIA-L4"},
            "tiers": [{"name": "bf16", "weights": {"format": "bf16"}}]
        }
    }))
    .unwrap()
}

async fn wait_reconciled(models: &Api<QuantizedModel>, name: &str) -> Result<(), Error> {
    until(&format!("model {name} to be reconciled"), Duration::from_secs(60), || async {
        let qm = models.get(name).await.map_err(Error::kube("reading model"))?;
        Ok(match qm.status.as_ref().and_then(|s| find(&s.conditions, "FitsAccelerator")) {
            Some(c) if c.status == "False" => Probe::Done(()),
            other => Probe::Pending(format!("{other:?}")),
        })
    })
    .await
}

async fn holder(leases: &Api<Lease>) -> Result<Option<String>, Error> {
    let lease = leases.get_opt("op-process-test").await.map_err(Error::kube("reading lease"))?;
    Ok(lease.and_then(|l| l.spec).and_then(|s| s.holder_identity))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_dies() -> Result<(), Error> {
    let env = TestEnv::new("op-process").await?;
    install_crds(&env.client, &repo_crds_dir()).await?;
    let ns = env.namespace().to_owned();
    let kubeconfig = control_plane()?.kubeconfig().to_path_buf();
    let mut children = vec![operator("replica-a", &ns, &kubeconfig), operator("replica-b", &ns, &kubeconfig)];
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let models: Api<QuantizedModel> = Api::namespaced(env.client.clone(), &ns);

    let leader = until("a leader to be elected", Duration::from_secs(60), || async {
        Ok(match holder(&leases).await? {
            Some(h) if !h.is_empty() => Probe::Done(h),
            other => Probe::Pending(format!("holder {other:?}")),
        })
    })
    .await?;
    models.create(&PostParams::default(), &misfit("first")).await.map_err(Error::kube("creating model"))?;
    wait_reconciled(&models, "first").await?;

    let index = if leader == "replica-a" { 0 } else { 1 };
    children[index].kill().expect("killing the leader");
    children[index].wait().expect("reaping the leader");
    let standby = if index == 0 { "replica-b" } else { "replica-a" };
    until("the standby to take the lease over", Duration::from_secs(60), || async {
        Ok(match holder(&leases).await? {
            Some(h) if h == standby => Probe::Done(()),
            other => Probe::Pending(format!("holder {other:?}")),
        })
    })
    .await?;
    models.create(&PostParams::default(), &misfit("second")).await.map_err(Error::kube("creating model"))?;
    wait_reconciled(&models, "second").await?;

    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    env.cleanup().await
}
