#!/usr/bin/env bash
# Starts a real Kubernetes v1.33 control plane for tests on free loopback ports in a temporary directory:
# etcd, kube-apiserver (RBAC, client-certificate admin in system:masters, service-account token signing),
# kube-controller-manager (garbage collector, deployment, replicaset, namespace and friends), kube-scheduler
# and kwok with the fake GPU nodes of nodes/*.yaml. It waits until everything is ready, writes a kubeconfig,
# prints `QUANTFLEET_KUBECONFIG=<path>` on stdout and then supervises: it tears everything down (and removes the
# temporary directory) on SIGTERM/SIGINT/SIGHUP, when the watched process exits, or when a component dies.
#
# Usage: launch.sh [--watch-pid PID] [--ready-file FILE]
#   --watch-pid PID    tear down once PID is gone (default: this script's parent), so a crashed or
#                      killed test run leaves no stray processes behind.
#   --ready-file FILE  also write the kubeconfig path into FILE once ready (for callers in the background).
# Binaries come from tests/controlplane/build.sh's cache; this script never builds (a cold build takes minutes),
# it fails with a message naming the script to run. Set QUANTFLEET_CP_KEEP=1 to keep the directory and logs.
set -euo pipefail

main() {
    here="$(cd "$(dirname "$0")" && pwd)"
    watch_pid="$PPID"
    ready_file=""
    while (($#)); do
        case "$1" in
            --watch-pid) watch_pid="$2"; shift 2 ;;
            --ready-file) ready_file="$2"; shift 2 ;;
            *) fail "unknown argument '$1' (usage: launch.sh [--watch-pid PID] [--ready-file FILE])" ;;
        esac
    done

    if ! bindir="$("$here/build.sh" --cached-only)"; then
        fail "control-plane binaries are not built; run tests/controlplane/build.sh (or scripts/test.sh) first"
    fi
    for tool in openssl curl python3 kubectl setpriv; do
        command -v "$tool" >/dev/null || fail "'$tool' is required by the launcher but not installed"
    done

    started="$(date +%s.%N)"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/quantfleet-cp.XXXXXX")"
    pids=()
    names=()
    trap teardown EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    trap 'exit 129' HUP

    make_pki
    start_etcd
    start_apiserver
    write_kubeconfig
    start_controller_manager
    start_scheduler
    start_kwok
    create_nodes

    ready_secs="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$started" "$(date +%s.%N)")"
    log "ready in ${ready_secs}s (warm start): $dir"
    printf 'QUANTFLEET_KUBECONFIG=%s\n' "$dir/kubeconfig"
    if [[ -n "$ready_file" ]]; then
        printf '%s\n' "$dir/kubeconfig" >"$ready_file.partial"
        mv "$ready_file.partial" "$ready_file"
    fi
    supervise
}

log() { printf 'controlplane: %s\n' "$*" >&2; }
fail() { log "error: $*"; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Components get SIGTERM through PR_SET_PDEATHSIG when this script dies, even by SIGKILL.
spawn() {
    local name="$1"
    shift
    setpriv --pdeathsig TERM -- "$@" >"$dir/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
}

wait_until() {
    local what="$1" timeout="$2" deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        check_alive
        ((SECONDS < deadline)) || fail "$what not ready after ${timeout}s"
        sleep 0.2
    done
}

check_alive() {
    local i
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            log "${names[$i]} exited; last lines of its log:"
            tail -n 30 "$dir/${names[$i]}.log" >&2 || true
            fail "${names[$i]} died"
        fi
    done
}

make_pki() {
    local pki="$dir/pki"
    mkdir -p "$pki"
    (
        cd "$pki"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=quantfleet-test-ca" -out ca.crt
        openssl ecparam -name prime256v1 -genkey -noout -out server.key
        openssl req -new -key server.key -subj "/CN=kube-apiserver" -out server.csr
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' \
            >server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
            -extfile server.ext -out server.crt
        # The admin identity: group system:masters bypasses RBAC, as a cluster admin's would.
        openssl ecparam -name prime256v1 -genkey -noout -out admin.key.sec1
        openssl pkcs8 -topk8 -nocrypt -in admin.key.sec1 -out admin.key
        openssl req -new -key admin.key -subj "/O=system:masters/CN=quantfleet-test-admin" -out admin.csr
        printf 'extendedKeyUsage=clientAuth\n' >admin.ext
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
            -extfile admin.ext -out admin.crt
        openssl genrsa -out sa.key 2048
        openssl rsa -in sa.key -pubout -out sa.pub
    ) 2>"$dir/pki.log" || { cat "$dir/pki.log" >&2; fail "could not create the test PKI with openssl"; }
}

start_etcd() {
    local peer
    etcd_port="$(free_port)"
    peer="$(free_port)"
    spawn etcd "$bindir/etcd" --name=test --data-dir="$dir/etcd" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$peer" --initial-advertise-peer-urls="http://127.0.0.1:$peer" \
        --initial-cluster="test=http://127.0.0.1:$peer" --unsafe-no-fsync=true --log-level=warn
    wait_until etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/health"
}

start_apiserver() {
    local pki="$dir/pki"
    api_port="$(free_port)"
    spawn kube-apiserver "$bindir/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$etcd_port" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
        --tls-cert-file="$pki/server.crt" --tls-private-key-file="$pki/server.key" \
        --client-ca-file="$pki/ca.crt" --authorization-mode=RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
        --service-cluster-ip-range=10.0.0.0/16 --allow-privileged=true \
        --disable-admission-plugins=ServiceAccount \
        --cert-dir="$dir/apiserver-certs" --v=1
    wait_until kube-apiserver 120 curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
        "https://127.0.0.1:$api_port/readyz"
}

write_kubeconfig() {
    local pki="$dir/pki"
    b64() { base64 -w0 <"$1"; }
    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: quantfleet-test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: quantfleet-test-admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
contexts:
- name: quantfleet-test
  context:
    cluster: quantfleet-test
    user: quantfleet-test-admin
current-context: quantfleet-test
EOF
}

# The controllers the tests and the operator rely on; the rest (cloud, CSR signing, node IPAM) only add noise.
# node-lifecycle-controller lifts the not-ready taint the API server puts on every new node once kwok reports it
# Ready (without it nothing schedules).
readonly CONTROLLERS="garbage-collector-controller,deployment-controller,replicaset-controller,namespace-controller,\
serviceaccount-controller,serviceaccount-token-controller,endpoints-controller,endpointslice-controller,\
endpointslice-mirroring-controller,statefulset-controller,job-controller,daemonset-controller,disruption-controller,\
resourcequota-controller,ttl-after-finished-controller,pod-garbage-collector-controller,\
clusterrole-aggregation-controller,root-ca-certificate-publisher-controller,node-lifecycle-controller"

start_controller_manager() {
    local port
    port="$(free_port)"
    spawn kube-controller-manager "$bindir/kube-controller-manager" \
        --kubeconfig="$dir/kubeconfig" --leader-elect=false \
        --bind-address=127.0.0.1 --secure-port="$port" --cert-dir="$dir/kcm-certs" \
        --controllers="$CONTROLLERS" \
        --service-account-private-key-file="$dir/pki/sa.key" --root-ca-file="$dir/pki/ca.crt" \
        --use-service-account-credentials=false --concurrent-gc-syncs=5 --v=1 \
        --kube-api-qps=200 --kube-api-burst=400 \
        --node-monitor-grace-period=300s # a test run compiling on 2 cores must not make kwok's nodes look dead
    # The client limit is raised from the default 20 requests/s (burst 30), as large clusters do: at 20/s the
    # deployment and replicaset controllers alone need ~2 minutes to roll out the scale benchmark's 600
    # Deployments, which would measure this throttle rather than the operator.
    wait_until kube-controller-manager 60 curl -fsSk "https://127.0.0.1:$port/healthz"
}

start_scheduler() {
    local port
    port="$(free_port)"
    spawn kube-scheduler "$bindir/kube-scheduler" \
        --kubeconfig="$dir/kubeconfig" --leader-elect=false \
        --bind-address=127.0.0.1 --secure-port="$port" --cert-dir="$dir/scheduler-certs" --v=1
    wait_until kube-scheduler 60 curl -fsSk "https://127.0.0.1:$port/healthz"
}

start_kwok() {
    local port
    port="$(free_port)"
    spawn kwok "$bindir/kwok" --kubeconfig="$dir/kubeconfig" --config="$bindir/kwok-stages.yaml" \
        --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
        --node-lease-duration-seconds=40 --server-address="127.0.0.1:$port"
    wait_until kwok 30 curl -fsS "http://127.0.0.1:$port/healthz"
}

create_nodes() {
    kubectl --kubeconfig="$dir/kubeconfig" apply -f "$here/nodes/" >"$dir/nodes.log" 2>&1 ||
        { cat "$dir/nodes.log" >&2; fail "could not create the fake GPU nodes"; }
    wait_until "fake GPU nodes" 60 kubectl --kubeconfig="$dir/kubeconfig" wait --for=condition=Ready \
        node --selector=type=kwok --timeout=1s
    # Schedulable only once the node lifecycle controller has lifted the not-ready taint.
    wait_until "untainted fake GPU nodes" 60 untainted
}

untainted() {
    [[ -z "$(kubectl --kubeconfig="$dir/kubeconfig" get nodes --selector=type=kwok \
        -o jsonpath='{.items[*].spec.taints}')" ]]
}

supervise() {
    while kill -0 "$watch_pid" 2>/dev/null; do
        check_alive
        # `wait` on a background sleep lets the TERM/INT traps run at once instead of after the sleep.
        sleep 1 &
        wait "$!" || true
    done
    log "watched process $watch_pid is gone; tearing down"
}

# Newest component first, so nothing complains about a vanished etcd on the way out.
teardown() {
    local status=$? i deadline
    trap - EXIT TERM INT HUP
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
    deadline=$((SECONDS + 3)) # a throwaway cluster: no need for a long graceful shutdown
    for i in "${!pids[@]}"; do
        while kill -0 "${pids[$i]}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
    done
    if [[ -n "${dir:-}" && -d "$dir" ]]; then
        if [[ "${QUANTFLEET_CP_KEEP:-0}" == 1 ]]; then
            log "kept $dir (QUANTFLEET_CP_KEEP=1)"
        else
            rm -rf "$dir"
        fi
    fi
    exit "$status"
}

main "$@"; exit  # on one line: bash stops here even if this file was edited while running
