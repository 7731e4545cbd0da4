#!/usr/bin/env bash
# Builds helm from the Go module proxy (no binary downloads are possible on our CI machines) into
# $QUANTFLEET_CACHE/helm/<version>-<go version>/helm and prints that path on stdout (progress goes to stderr).
# Once built, a re-run only prints the path. A cold build records its wall time and peak memory in BUILD-STATS.
# With --cached-only it never builds: it fails (status 2) when helm is not built yet.
set -euo pipefail
main() {
    readonly HELM_VERSION="v3.21.4"
    cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
    log() { printf 'helm-build: %s\n' "$*" >&2; }
    command -v go >/dev/null || { log "go is not installed; it is needed once to build helm"; exit 1; }
    export GOTOOLCHAIN=local
    dir="$cache/helm/helm-${HELM_VERSION}-$(go env GOVERSION)"
    if [[ -x "$dir/helm" && -f "$dir/.complete" ]]; then
        [[ "${1:-}" == "--cached-only" ]] || log "cached: $dir/helm ($(cat "$dir/BUILD-STATS" 2>/dev/null || echo 'no build stats'))"
        printf '%s\n' "$dir/helm"
        exit 0
    fi
    if [[ "${1:-}" == "--cached-only" ]]; then
        log "helm is not built yet ($dir); run scripts/helm-build.sh (scripts/helm-check.sh does)"
        exit 2
    fi
    mkdir -p "$cache/helm"
    exec 9>"$cache/helm/.build.lock" # scripts/test.sh and a developer's cargo test must not build it twice
    flock 9
    if [[ -x "$dir/helm" && -f "$dir/.complete" ]]; then
        printf '%s\n' "$dir/helm"
        exit 0
    fi
    # The Go caches are shared with tests/controlplane/build.sh.
    export GOMODCACHE="${QUANTFLEET_HELM_GOMODCACHE:-$cache/go/mod}"
    export GOCACHE="${QUANTFLEET_HELM_GOCACHE:-$cache/go/build}"
    export GOFLAGS="-trimpath -modcacherw -buildvcs=false"
    export CGO_ENABLED=0
    staging="$cache/helm/staging.$$"
    rm -rf "$staging"
    mkdir -p "$staging"
    trap 'rm -rf "$staging"' EXIT
    log "cold build of helm ${HELM_VERSION} (go $(go env GOVERSION), -p ${QUANTFLEET_GO_BUILD_P:-2}); once, then cached"
    start="$(date +%s)"
    # `go install pkg@version` builds the module with its own go.mod (no replace directives needed for helm).
    if ! GOBIN="$staging" /usr/bin/time -v -o "$staging/time.txt" \
        go install -p "${QUANTFLEET_GO_BUILD_P:-2}" -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
        "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"; then
        log "build failed (see the go output above)"
        exit 1
    fi
    elapsed=$(($(date +%s) - start))
    peak_mib=$(($(awk -F': ' '/Maximum resident set size/ {print $2}' "$staging/time.txt") / 1024))
    "$staging/helm" version --short >/dev/null || { log "the built helm does not run"; exit 1; }
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$staging/helm" "$dir/helm"
    summary="cold build: ${elapsed}s wall, peak memory ${peak_mib} MiB (largest process)"
    printf '%s\n' "$summary" >"$dir/BUILD-STATS"
    touch "$dir/.complete"
    log "$summary; $("$dir/helm" version --short)"
    printf '%s\n' "$dir/helm"
}

main "$@"; exit
