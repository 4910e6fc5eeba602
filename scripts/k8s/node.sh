# shellcheck shell=bash
# Real nodes for scripts/cluster.sh (sourced by it; not run on its own).
#
# A cluster's node is a network namespace of its own, as a kind node is a container of its own:
# containerd, the kubelet, kube-proxy, CoreDNS and the NetworkPolicy controller run in it (entered
# with nsenter, so they share this machine's mounts: the kubelet's volume mounts are what containerd
# bind-mounts into containers), and its pods hang off a bridge inside it. Two clusters on one
# machine therefore never share iptables chains, ports or a bridge. Per cluster with pod network 10.X.0.0/24:
#
#   host  bbhX 10.X.2.1/30  <-- veth -->  eth0 10.X.2.2/30  node netns bbnX
#                                          bbpX 10.X.0.1/24 (the CNI bridge; CoreDNS listens here)
#                                          pods 10.X.0.2 ... 10.X.0.254
#
# The API server listens on 10.X.2.1; the host routes 10.X.0.0/24 through the node. The
# kube-scheduler runs on the host. Images come from one registry for the whole machine (the CNCF
# distribution registry, Debian's docker-registry) at $REGISTRY, a host address that every node
# reaches through its default route; its storage and every node's containerd root are kept in
# /var/lib/bloombee, outside the repository, so a second run pulls nothing it pulled before.

REGISTRY_IP=10.199.255.1
REGISTRY_PORT=5000
REGISTRY=$REGISTRY_IP:$REGISTRY_PORT
NODE_LIB=${BLOOMBEE_NODE_LIB:-/var/lib/bloombee}
NODE_RUN=/run/bloombee
CNI_BIN_DIR=${BLOOMBEE_CNI_BIN_DIR:-/usr/lib/cni}
# SIG Network's NetworkPolicy controller (nftables + nfqueue), one per node; built like CoreDNS.
KNP_MOD_DIR=$SCRIPT_DIR/k8s/kube-network-policies
KNP_VERSION=$(mod_version "$KNP_MOD_DIR" sigs.k8s.io/kube-network-policies)
PAUSE_IMAGE=$REGISTRY/pause:$(awk -F'?= *' '/^TAG \?=/ {print $2; exit}' \
    "$(go env GOMODCACHE 2>/dev/null)/k8s.io/kubernetes@$K8S_VERSION/build/pause/Makefile" 2>/dev/null || echo 3.10.2)

# The machine's packages the nodes run: containerd and runc, the CNI plugins, iptables for
# kube-proxy, buildah for the pause image, the registry.
need_node_packages() {
    local missing=() tool
    for tool in containerd runc iptables conntrack buildah docker-registry nsenter; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ -x $CNI_BIN_DIR/bridge ]] || missing+=(cni-plugins)
    ((${#missing[@]} == 0)) && return 0
    log "installing what real nodes need from Debian's packages (missing: ${missing[*]})"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc containernetworking-plugins \
        iptables conntrack buildah docker-registry util-linux >/dev/null
}

# ------------------------------------------------------------ registry -----

registry_alive() { curl -sf --max-time 2 "http://$REGISTRY/v2/" >/dev/null 2>&1; }

# Starts the machine's registry once; every cluster's node pulls from it. Idempotent.
registry_up() {
    registry_alive && return 0
    mkdir -p "$NODE_LIB/registry" "$NODE_RUN"
    # An address of the host's own (on lo: this kernel has no dummy links) that every node's
    # default route reaches.
    ip addr replace "$REGISTRY_IP/32" dev lo
    cat >"$NODE_RUN/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $NODE_LIB/registry}
  delete: {enabled: true}
http: {addr: "$REGISTRY"}
EOF
    setsid docker-registry serve "$NODE_RUN/registry.yml" </dev/null >>"$NODE_RUN/registry.log" 2>&1 7>&- 8>&- 9>&- &
    echo $! >"$NODE_RUN/registry.pid"
    local i
    for ((i = 0; i < 100; i++)); do registry_alive && break; sleep 0.1; done
    registry_alive || die "the registry did not start on $REGISTRY: $NODE_RUN/registry.log"
    log "registry at $REGISTRY (storage $NODE_LIB/registry)"
}

# When the machine's last node is gone, nobody pulls or pushes (images are pushed for a node's
# tests): the registry stops and drops what no tag names any more (earlier builds of the images), so
# repeated runs do not fill a disk that CI machines share. The next `up` starts it again.
registry_collect_if_unused() {
    local pid
    ip netns list 2>/dev/null | grep -q '^bbn' && return 0
    pid=$(cat "$NODE_RUN/registry.pid" 2>/dev/null || true)
    [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "docker-registry serve" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && return 0  # still serving: collect another time
    docker-registry garbage-collect --delete-untagged "$NODE_RUN/registry.yml" >>"$NODE_RUN/registry.log" 2>&1 \
        && log "registry stopped (no node left); untagged images collected: $(du -sh "$NODE_LIB/registry" | cut -f1) kept"
}

# The images of this machine's registry that a node holds but the registry no longer serves (an
# earlier build, collected) leave the node's store: each node keeps what a test can still ask for.
prune_node_images() { # x
    local sock=$NODE_RUN/nodes/$1/containerd.sock ref name digest removed=0
    for ref in $(ctr -a "$sock" -n k8s.io images ls -q 2>/dev/null | grep "^$REGISTRY/" || true); do
        [[ $ref == *@sha256:* ]] || continue
        name=${ref#"$REGISTRY"/} digest=${ref##*@}
        name=${name%@*}
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -I \
            -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
            -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "http://$REGISTRY/v2/$name/manifests/$digest") == 404 ]]; then
            ctr -a "$sock" -n k8s.io images rm --sync "$ref" >/dev/null 2>&1 && removed=$((removed + 1))
        fi
    done
    ((removed == 0)) || log "$CLUSTER: $removed image(s) the registry no longer serves removed from the node"
}

# The sandbox ("pause") image every pod starts with, compiled from the C source that ships in the
# Kubernetes module, as upstream builds registry.k8s.io/pause, and pushed to the registry once.
pause_image_up() {
    curl -sf --max-time 5 -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
        "http://$REGISTRY/v2/pause/manifests/${PAUSE_IMAGE##*:}" && return 0
    local src tmp container
    src=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c
    [[ -f $src ]] || (cd "$K8S_MOD_DIR" && go mod download k8s.io/kubernetes)
    tmp=$(mktemp -d)
    gcc -Os -static -Wall -Werror -DVERSION="v${PAUSE_IMAGE##*:}" -o "$tmp/pause" "$src"
    container=$(buildah from scratch)
    buildah copy "$container" "$tmp/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$container"
    buildah commit --quiet "$container" "localhost/bloombee-pause:${PAUSE_IMAGE##*:}" >/dev/null
    buildah rm "$container" >/dev/null
    buildah push --quiet --tls-verify=false "localhost/bloombee-pause:${PAUSE_IMAGE##*:}" "docker://$PAUSE_IMAGE"
    rm -rf "$tmp"
    log "sandbox image $PAUSE_IMAGE built from pause.c and pushed"
}

# ---------------------------------------------------------------- nodes -----

# Certificates of the node's components, signed by the cluster CA (make_pki's).
node_pki() { # pki node node_ip
    local pki=$1 node=$2 node_ip=$3
    (
        cd "$pki"
        umask 077
        # The Node authorizer knows a kubelet by this name and group.
        sign_cert kubelet "/O=system:nodes/CN=system:node:$node" "$CLIENT_EXT"
        sign_cert kubelet-serving "/CN=$node" "$(server_ext "IP:$node_ip,DNS:$node")"
        # The bootstrap policy binds system:node-proxier to this user and system:kube-scheduler's role to that one.
        sign_cert kube-proxy "/CN=system:kube-proxy" "$CLIENT_EXT"
        sign_cert kube-scheduler "/CN=system:kube-scheduler" "$CLIENT_EXT"
        sign_cert coredns "/CN=system:coredns" "$CLIENT_EXT"
        sign_cert kube-network-policies "/CN=system:kube-network-policies" "$CLIENT_EXT"
        # The API server's identity towards kubelets (logs, exec, port-forward).
        sign_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$CLIENT_EXT"
        rm -f ca.srl
        chmod 644 ./*.crt
    )
}

# The node's network: its namespace, the link to the host, the pod bridge.
make_node_network() { # x
    local x=$1 ns=bbn$1
    ip netns add "$ns"
    ip link add "bbh$x" type veth peer name eth0 netns "$ns"
    ip addr add "10.$x.2.1/30" dev "bbh$x"
    ip link set "bbh$x" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.$x.2.2/30" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "10.$x.2.1"
    ip -n "$ns" link add "bbp$x" type bridge
    ip -n "$ns" addr add "10.$x.0.1/24" dev "bbp$x"
    ip -n "$ns" link set "bbp$x" up
    ip route replace "10.$x.0.0/24" via "10.$x.2.2" dev "bbh$x"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    # kube-proxy's rules must see pod-to-pod traffic that crosses the bridge (a Service's
    # backend on the same node as its client).
    ip netns exec "$ns" sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null \
        || { modprobe br_netfilter 2>/dev/null; ip netns exec "$ns" sysctl -qw net.bridge.bridge-nf-call-iptables=1; }
}

remove_node_network() { # x
    local x=$1
    ip route del "10.$x.0.0/24" 2>/dev/null || true
    ip link del "bbh$x" 2>/dev/null || true
    ip netns del "bbn$x" 2>/dev/null || true
}

# Starts a node component inside the node's network namespace only (mounts stay the host's).
start_node_proc() { # name binary args...
    launch_proc "$1" nsenter --net="/run/netns/$NODE_NS" "${@:2}"
}

write_node_configs() { # x api_url
    local x=$1 api_url=$2 node=$CLUSTER-node conf=$DIR/node
    mkdir -p "$conf/cni" "$NODE_LIB/nodes/$x" "$NODE_RUN/nodes/$x"
    for c in kubelet kube-proxy kube-scheduler coredns kube-network-policies; do
        write_kubeconfig "$DIR/$c.kubeconfig" "$api_url" "$c" "$DIR/pki/$c.crt" "$DIR/pki/$c.key" "$DIR/pki/ca.crt"
    done
    cat >"$conf/containerd.toml" <<EOF
version = 2
root = "$NODE_LIB/nodes/$x/containerd"
state = "$NODE_RUN/nodes/$x/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$NODE_RUN/nodes/$x/containerd.sock"
[ttrpc]
  address = "$NODE_RUN/nodes/$x/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_LIB/nodes/$x/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  # Lowering a process's OOM score needs CAP_SYS_RESOURCE, which this machine kind lacks: the
  # kubelet's -998 for sandboxes and Guaranteed pods is raised to containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$conf/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$conf/certs.d"
EOF
    # The machine's registry speaks plain HTTP on a private address.
    mkdir -p "$conf/certs.d/$REGISTRY"
    cat >"$conf/certs.d/$REGISTRY/hosts.toml" <<EOF
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
    cat >"$conf/cni/10-bloombee.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "bloombee-$CLUSTER",
  "plugins": [
    {"type": "bridge", "bridge": "bbp$x", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.$x.0.0/24", "rangeStart": "10.$x.0.2",
              "gateway": "10.$x.0.1"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$NODE_RUN/nodes/$x/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    # Pods with dnsPolicy Default get no upstream: nothing outside this machine is reachable.
    printf 'options ndots:5\n' >"$conf/resolv.conf"
    cat >"$conf/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine kind is cgroup v1, which the kubelet refuses from 1.35 on unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# Each node's pods live under a cgroup of their own, so two nodes on one machine never clean up
# each other's pods.
cgroupRoot: /bloombee-$x
containerRuntimeEndpoint: unix://$NODE_RUN/nodes/$x/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving.key
clusterDomain: cluster.local
clusterDNS: [10.$x.0.1]
resolvConf: $conf/resolv.conf
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
failSwapOn: false
serializeImagePulls: false
# CI machines share their disk: evict only when it is nearly full.
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%}
imageGCHighThresholdPercent: 95
imageGCLowThresholdPercent: 90
syncFrequency: 10s
EOF
    cat >"$conf/Corefile" <<EOF
.:53 {
    bind 10.$x.0.1
    errors
    ready 127.0.0.1:8181
    health 127.0.0.1:8080
    kubernetes cluster.local in-addr.arpa {
        kubeconfig $DIR/coredns.kubeconfig $CLUSTER
        pods insecure
        ttl 5
    }
    hosts $DIR/clusterset.hosts clusterset.local {
        reload 2s
        fallthrough
    }
    cache 5
    reload
    loadbalance
}
EOF
    : >"$DIR/clusterset.hosts"
}

# A ClusterRole with these rules, bound to the user of that name (a node component's certificate).
grant_cluster_role() { # user rules_json
    local body
    body=$(mktemp)
    printf '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole","metadata":{"name":"%s"},"rules":%s}' \
        "$1" "$2" >"$body"
    api_post /apis/rbac.authorization.k8s.io/v1/clusterroles "$body"
    printf '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"%s"},
 "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"%s"},
 "subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"User","name":"%s"}]}' "$1" "$1" "$1" >"$body"
    api_post /apis/rbac.authorization.k8s.io/v1/clusterrolebindings "$body"
    rm -f "$body"
}

# CoreDNS reads Services, EndpointSlices, Pods and Namespaces: upstream's system:coredns role.
coredns_rbac() {
    grant_cluster_role system:coredns '[{"apiGroups":[""],"resources":["endpoints","services","pods","namespaces"],"verbs":["list","watch"]},
 {"apiGroups":["discovery.k8s.io"],"resources":["endpointslices"],"verbs":["list","watch"]}]'
}

# The NetworkPolicy controller reads Pods, Namespaces and NetworkPolicies (upstream's install.yaml
# role) and records events.
knp_rbac() {
    grant_cluster_role system:kube-network-policies '[{"apiGroups":[""],"resources":["pods","namespaces"],"verbs":["list","watch"]},
 {"apiGroups":["networking.k8s.io"],"resources":["networkpolicies"],"verbs":["list","watch"]},
 {"apiGroups":["","events.k8s.io"],"resources":["events"],"verbs":["create","patch","update"]}]'
}

# The controller's rules send packets to an nfqueue with nftables' queue expression, which this
# machine kind's kernel lacks (CONFIG_NFT_QUEUE unset; nft_compat and xtables' NFQUEUE target are
# built in): it is built from a copy of the wrapper module whose google/nftables has expr/queue.go
# replaced by scripts/k8s/kube-network-policies/expr_queue.go.overlay, which sends the same rule as
# the NFQUEUE target. (go build -overlay refuses files in the module cache.) Prints the copy's dir.
knp_source() { # tmp_dir
    local tmp=$1 nft_version nft_dir
    (cd "$KNP_MOD_DIR" && go mod download) >&2
    nft_version=$(cd "$KNP_MOD_DIR" && go list -m -f '{{.Version}}' github.com/google/nftables)
    nft_dir=$(cd "$KNP_MOD_DIR" && go list -m -f '{{.Dir}}' github.com/google/nftables)
    mkdir -p "$tmp/src"
    cp "$KNP_MOD_DIR"/{go.mod,go.sum,main.go} "$tmp/src/"
    cp -r "$nft_dir" "$tmp/nftables"
    chmod -R u+w "$tmp/nftables"
    cp "$KNP_MOD_DIR/expr_queue.go.overlay" "$tmp/nftables/expr/queue.go"
    (cd "$tmp/src" && go mod edit -replace "github.com/google/nftables@$nft_version=../nftables")
    echo "$tmp/src"
}

# True once the controller enforces: its nftables table is in the node's ruleset and it reads its queue.
knp_ready() {
    ip netns exec "$NODE_NS" nft list table inet kube-network-policies >/dev/null 2>&1 &&
        ip netns exec "$NODE_NS" awk '$1 == 100 {found = 1} END {exit !found}' /proc/net/netfilter/nfnetlink_queue 2>/dev/null
}

api_post() { # path json_file: create, 409 (exists) is fine
    local code
    code=$(api "$1" /dev/null --max-time 10 -X POST -H 'Content-Type: application/json' --data-binary "@$2")
    [[ $code == 201 || $code == 409 ]] || die "POST $1 answered $code"
}

# The kubelet wants its cgroup root to exist in every hierarchy; a cpuset one takes its parent's CPUs.
node_cgroups() { # x
    local h
    for h in /sys/fs/cgroup/*/; do
        [[ -L ${h%/} || $h == */unified/ ]] && continue
        mkdir -p "$h/bloombee-$1"
        if [[ -f $h/cpuset.cpus ]]; then
            cat "$h/cpuset.cpus" >"$h/bloombee-$1/cpuset.cpus"
            cat "$h/cpuset.mems" >"$h/bloombee-$1/cpuset.mems"
        fi
    done
}

containerd_ready() { [[ -S $NODE_RUN/nodes/$NODE_X/containerd.sock ]]; }

# Starts the cluster's node: containerd, kubelet, kube-proxy, CoreDNS and kube-network-policies in
# its namespace, the scheduler on the host. Waits for the Node to be Ready and policies enforced.
start_real_node() { # x api_url
    local x=$1 api_url=$2 node=$CLUSTER-node
    NODE_X=$x NODE_NS=bbn$x
    echo "$x" >"$DIR/node-index"
    node_cgroups "$x"
    write_node_configs "$x" "$api_url"
    rm -rf "$NODE_RUN/nodes/$x/ipam" "$NODE_LIB/nodes/$x/kubelet"
    coredns_rbac
    knp_rbac

    log "$CLUSTER: starting containerd in node namespace $NODE_NS ($NODE_LIB/nodes/$x/containerd)"
    start_node_proc containerd containerd --config "$DIR/node/containerd.toml"
    wait_for "containerd" containerd_ready containerd
    prune_node_images "$x"
    log "$CLUSTER: starting kube-scheduler"
    start_proc kube-scheduler --kubeconfig="$DIR/kube-scheduler.kubeconfig" \
        --secure-port=0 --leader-elect=false --profiling=false
    log "$CLUSTER: starting the kubelet ($node, $NODE_LIB/nodes/$x/kubelet)"
    start_node_proc kubelet "$BIN_DIR/kubelet" --config="$DIR/node/kubelet.yaml" \
        --kubeconfig="$DIR/kubelet.kubeconfig" --hostname-override="$node" --node-ip="10.$x.2.2" \
        --root-dir="$NODE_LIB/nodes/$x/kubelet" --node-labels="bloombee.dev/cluster=$CLUSTER"
    log "$CLUSTER: starting kube-proxy and CoreDNS"
    start_node_proc kube-proxy "$BIN_DIR/kube-proxy" --kubeconfig="$DIR/kube-proxy.kubeconfig" \
        --hostname-override="$node" --cluster-cidr="10.$x.0.0/24" --proxy-mode=iptables \
        --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0s --conntrack-tcp-timeout-close-wait=0s \
        --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
    start_node_proc coredns "$BIN_DIR/coredns" -conf "$DIR/node/Corefile"
    # NetworkPolicies: the first packet of each connection to or from a pod that a policy selects
    # goes to nfqueue 100 in the node's namespace, where this controller accepts or drops it. Root's
    # own connections in the node (the kubelet's probes) pass, as upstream's rules let them.
    log "$CLUSTER: starting kube-network-policies $KNP_VERSION"
    start_node_proc kube-network-policies "$BIN_DIR/kube-network-policies" \
        --kubeconfig="$DIR/kube-network-policies.kubeconfig" --hostname-override="$node" \
        --nfqueue-id=100 --metrics-bind-address=127.0.0.1:9080
    wait_for "node $node Ready" node_ready kubelet
    wait_for "kube-network-policies to enforce (its nftables table and nfqueue 100)" knp_ready kube-network-policies
}

# Before the node's processes stop: the pods' containers and sandboxes are stopped through the
# kubelet (every pod deleted while no controller makes new ones), so nothing of them outlives it.
drain_real_node() { # dir
    local dir=$1 x i sock
    [[ -f $dir/node-index ]] || return 0
    x=$(cat "$dir/node-index")
    sock=$NODE_RUN/nodes/$x/containerd.sock
    proc_alive "$dir" kubelet && proc_alive "$dir" kube-apiserver || return 0
    DIR=$dir API_URL=$(sed -n 's/^API_SERVER=//p' "$dir/cluster.env")
    for c in kube-controller-manager kube-scheduler; do stop_one "$dir" "$c"; done
    local namespaces body
    body=$(mktemp)
    api /api/v1/namespaces "$body" >/dev/null
    namespaces=$(python3 -c 'import json, sys
print(" ".join(n["metadata"]["name"] for n in json.load(open(sys.argv[1]))["items"]))' "$body" 2>/dev/null || true)
    rm -f "$body"
    for ns in $namespaces; do
        api "/api/v1/namespaces/$ns/pods?gracePeriodSeconds=1" /dev/null -X DELETE >/dev/null
    done
    for ((i = 0; i < 60; i++)); do
        [[ -z $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null) ]] && break
        sleep 0.5
    done
}

stop_real_node() { # dir
    local dir=$1 x
    [[ -f $dir/node-index ]] || return 0
    x=$(cat "$dir/node-index")
    # Containers outlive the kubelet and containerd (their shims are separate processes): stop them,
    # then unmount what the kubelet mounted for volumes.
    local shim
    for shim in $(pgrep -f "containerd-shim-runc-v2 .*-address $NODE_RUN/nodes/$x/containerd.sock" || true); do
        pkill -KILL -P "$shim" 2>/dev/null || true
        kill -KILL "$shim" 2>/dev/null || true
    done
    local m
    for m in $(awk -v p="$NODE_LIB/nodes/$x/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$NODE_LIB/nodes/$x/kubelet" "$NODE_RUN/nodes/$x"
    # Each node's pod cgroups (kubepods under /bloombee-X) in every hierarchy.
    local h
    for h in /sys/fs/cgroup/*/; do
        [[ -d $h/bloombee-$x ]] && find "$h/bloombee-$x" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    remove_node_network "$x"
}
