#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kube-controller-manager, kube-scheduler from Kubernetes
# v1.33.13, etcd v3.5.21, kwok v0.8.0) from the Go module proxy into a cache directory keyed by the versions and
# by the hash of the Go module files, and prints that bin directory on stdout (progress goes to stderr).
# Idempotent: once a build completed, a re-run only prints the directory (well under a second).
# With --cached-only it never builds: it fails (status 2) when no cached build exists.
# A cold build prints its wall time and peak memory (sum of the RSS of the whole build tree, sampled every
# second, and the largest single process as reported by /usr/bin/time -v).
set -euo pipefail
# The body is one function, parsed in full before it runs: editing this file during a build is harmless.
main() {

    readonly K8S_VERSION="v1.33.13"
    readonly ETCD_VERSION="v3.5.21"
    readonly KWOK_VERSION="v0.8.0"
    readonly BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

    here="$(cd "$(dirname "$0")" && pwd)"
    cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
    log() { printf 'controlplane-build: %s\n' "$*" >&2; }

    # The key covers what decides the binaries' content: versions, module graphs (go.mod/go.sum) and our mains.
    inputs_hash="$(cd "$here" && cat go.mod go.sum cmd/*/main.go kwok/go.mod kwok/go.sum | sha256sum | cut -c1-12)"
    key="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}-${inputs_hash}"
    bindir="$cache/controlplane/$key/bin"
    stamp="$bindir/.complete"

    # kwok has no built-in stages: it plays the upstream "fast" node and pod stages of its own module version
    # (node-initialize, node-heartbeat-with-lease, pod-ready, pod-complete, pod-delete), copied next to the binaries
    # so a cleaned Go module cache does not break a cached control plane.
    readonly KWOK_STAGES=(node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease
        pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete)
    assemble_kwok_stages() {
        local src out="$bindir/kwok-stages.yaml"
        src="$(cd "$here/kwok" && GOTOOLCHAIN=local GOMODCACHE="$cache/go/mod" GOFLAGS=-modcacherw \
            go mod download -json sigs.k8s.io/kwok | awk -F'"' '/"Dir":/ {print $4}')"
        [[ -d "$src/kustomize/stage" ]] || { log "kwok module source not found (got '$src')"; return 1; }
        {
            echo "# kwok ${KWOK_VERSION} stages, assembled by tests/controlplane/build.sh from the kwok module."
            for s in "${KWOK_STAGES[@]}"; do
                echo "---"
                cat "$src/kustomize/stage/$s.yaml"
            done
        } >"$out.partial"
        mv "$out.partial" "$out"
    }

    if [[ -f "$stamp" && -f "$bindir/kwok-stages.yaml" ]]; then
        [[ "${1:-}" == "--cached-only" ]] ||
            log "cached in $bindir ($(cat "$bindir/BUILD-STATS" 2>/dev/null || echo 'no build stats'))"
        printf '%s\n' "$bindir"
        exit 0
    fi
    if [[ -f "$stamp" ]]; then
        assemble_kwok_stages
        printf '%s\n' "$bindir"
        exit 0
    fi
    if [[ "${1:-}" == "--cached-only" ]]; then
        log "no cached build at $bindir"
        exit 2
    fi

    command -v go >/dev/null || { log "go is not installed; it is needed once to build the control plane"; exit 1; }
    mkdir -p "$cache/controlplane"
    # Two concurrent callers (scripts/test.sh and a developer's cargo test) must not build the same tree twice.
    exec 9>"$cache/controlplane/.build.lock"
    flock 9
    if [[ -f "$stamp" ]]; then
        printf '%s\n' "$bindir"
        exit 0
    fi

    export GOTOOLCHAIN=local
    export GOMODCACHE="$cache/go/mod"
    export GOCACHE="$cache/go/build"
    export GOFLAGS="-trimpath -modcacherw -buildvcs=false"
    export CGO_ENABLED=0 # static binaries, and no C compiler in the long pole
    # Defaults suit the CI machine (2 cores); QUANTFLEET_GO_BUILD_P raises parallelism on bigger machines.
    parallel="${QUANTFLEET_GO_BUILD_P:-2}"

    version_pkg="k8s.io/component-base/version"
    k8s_ldflags="-s -w -X ${version_pkg}.gitVersion=${K8S_VERSION} -X ${version_pkg}.gitMajor=1"
    k8s_ldflags+=" -X ${version_pkg}.gitMinor=33 -X ${version_pkg}.gitTreeState=clean"

    staging="$cache/controlplane/$key/staging.$$"
    rm -rf "$staging"
    mkdir -p "$staging"
    trap 'rm -rf "$staging"; [[ -n "${sampler:-}" ]] && kill "$sampler" 2>/dev/null || true' EXIT

    build_all() {
        (cd "$here" && go build -p "$parallel" -ldflags "$k8s_ldflags" -o "$staging/" ./cmd/...)
        (cd "$here/kwok" && go build -p "$parallel" -ldflags "-s -w" -o "$staging/kwok" sigs.k8s.io/kwok/cmd/kwok)
    }

    # Peak memory of the whole build tree: the Go compiler runs -p processes at once, so the largest single
    # process (what rusage reports) understates what the machine must hold.
    tree_rss_kib() {
        ps -e -o pid=,ppid=,rss= | awk -v root="$1" '
            { parent[$1] = $2; rss[$1] = $3 }
            END {
                for (p in parent) {
                    q = p
                    while (q != "" && q != 0 && q != root) q = parent[q]
                    if (q == root) sum += rss[p]
                }
                print sum + 0
            }'
    }

    log "cold build of $key (go $(go env GOVERSION), -p $parallel); this takes minutes once, then is cached"
    start="$(date +%s)"
    peak_file="$staging/peak-tree-rss-kib"
    echo 0 >"$peak_file"
    (
        peak=0
        while sleep 1; do
            now="$(tree_rss_kib "$$")"
            if ((now > peak)); then peak="$now"; echo "$peak" >"$peak_file"; fi
        done
    ) &
    sampler=$!
    export -f build_all
    export here parallel k8s_ldflags staging
    if ! /usr/bin/time -v -o "$staging/time.txt" bash -c build_all; then
        log "build failed (see the go output above)"
        exit 1
    fi
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=""
    elapsed=$(($(date +%s) - start))
    peak_tree_mib=$(($(cat "$peak_file") / 1024))
    peak_proc_mib=$(($(awk -F': ' '/Maximum resident set size/ {print $2}' "$staging/time.txt") / 1024))

    for b in "${BINARIES[@]}"; do
        [[ -x "$staging/$b" ]] || { log "build did not produce $b"; exit 1; }
    done
    rm -rf "$bindir"
    mkdir -p "$(dirname "$bindir")"
    mkdir "$bindir"
    for b in "${BINARIES[@]}"; do mv "$staging/$b" "$bindir/$b"; done
    assemble_kwok_stages
    summary="cold build: ${elapsed}s wall, peak memory ${peak_tree_mib} MiB (build tree), ${peak_proc_mib} MiB (largest process), -p ${parallel}"
    printf '%s\n' "$summary" >"$bindir/BUILD-STATS"
    touch "$stamp"
    log "$summary"
    log "binaries: $(cd "$bindir" && du -sh . | cut -f1) in $bindir"
    printf '%s\n' "$bindir"
}

main "$@"; exit  # on one line: bash stops here even if this file was edited while running
