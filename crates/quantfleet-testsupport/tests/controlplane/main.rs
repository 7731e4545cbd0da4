//! The control-plane suite: Quantfleet's CRDs, admission rules, scheduling onto fake GPU nodes, garbage
//! collection and RBAC, all on a real kube-apiserver (see tests/controlplane/README.md). One test binary, so
//! a developer run without `scripts/test.sh` starts the control plane once for all of them.

mod admission;
mod crds;
mod gc;
mod rbac;
mod scheduling;
