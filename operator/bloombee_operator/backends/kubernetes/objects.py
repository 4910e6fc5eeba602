"""A DesiredState as Kubernetes objects (pure); ``backend.py`` applies them to every cluster.

``render`` is pure: desired state + the owning resource -> the child objects, each labelled and
owned by the DistributedLLM, grouped by the cluster they go to. Per stage a Deployment, a Service
and a NetworkPolicy named and labelled with the plan's hash (the stage's span, dtype, codec, link
and offload budgets in its arguments, exactly the flags ``bloombee up`` passes to local
processes), so a new plan's stages start beside the old plan's; the gateway's Deployment and
Service, which name no plan; the route ConfigMap the gateway follows (``route_config_map``: the
backend moves it to a new plan once that plan's stages are ready); and the plan as a ConfigMap.
Objects for the operator's own cluster carry an owner reference, so the API server's garbage
collector removes them with the resource; objects in remote clusters cannot (owner references do
not cross clusters) and are found by their labels when the finalizer cleans up.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bloombee_contract.launch import API_KEY_ENV, CACHE_ENV, LaunchSpec, ProbeLaunch
from bloombee_contract.paths import HEALTHZ_PATH, READYZ_PATH
from bloombee_contract.route import ROUTE_FILE

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.desired import DesiredState, StageSpec

STAGE_PORT = 8080
PEER_PORT = 8443  # a gateway's mutual-TLS port for its stages (its API stays on the service port)
TLS_DIR = "/etc/bloombee/tls"  # where each pod's TLS Secret (bloombee_contract.tls layout) is mounted
ROUTE_DIR = "/etc/bloombee/route"  # where the gateway's route ConfigMap is mounted
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PLAN = "bloombee.ai/plan-hash"
LABEL_STAGE_INDEX = "bloombee.ai/stage-index"
LABEL_LAST_STAGE = "bloombee.ai/last-stage"  # "true" on the last stage of each plan: it delivers results
PROBE_GIB = 0.25  # a probe: Python, aiohttp and one bulk transfer of at most 16 MB
MANAGED_BY = {"app.kubernetes.io/name": "bloombee", "app.kubernetes.io/managed-by": "bloombee-operator"}
CACHE_DIR = "/var/cache/bloombee"


@dataclass(frozen=True)
class Images:
    stage: str = "ghcr.io/bloombee/stage:0.1.0"
    gateway: str = "ghcr.io/bloombee/stage:0.1.0"  # the gateway ships in the stage image (same package)
    pull_policy: str = "IfNotPresent"


@dataclass(frozen=True)
class Owner:
    """The DistributedLLM the children belong to."""

    name: str
    namespace: str
    uid: str
    api_version: str = "bloombee.ai/v1alpha1"
    kind: str = "DistributedLLM"

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def labels(instance: str, component: str, **extra: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_INSTANCE: instance, LABEL_COMPONENT: component, **extra}


def selector(instance: str) -> str:
    """A label selector for every child of one resource (the finalizer's way into remote clusters)."""
    return f"{LABEL_INSTANCE}={instance},app.kubernetes.io/managed-by={MANAGED_BY['app.kubernetes.io/managed-by']}"


def _metadata(name: str, namespace: str, owner: Owner | None, object_labels: dict[str, str]) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": object_labels}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def _probe(path: str, port: int, period: int, scheme: str = "HTTP") -> dict:
    return {"httpGet": {"path": path, "port": port, "scheme": scheme}, "periodSeconds": period, "timeoutSeconds": 3,
            "failureThreshold": 3}  # fmt: skip


def tls_secret_name(child: str) -> str:
    """The Secret holding a child's certificate, key and the deployment's CA certificate."""
    return f"{child}-tls"


def _container(name: str, image: Images, image_ref: str, launch: LaunchSpec, port: int,
               scheme: str = "HTTP") -> dict:  # fmt: skip
    """A container that runs ``launch`` listening on every address at ``port``; ``scheme``: of its probes."""
    launch = replace(launch, host="0.0.0.0", port=port)  # type: ignore[type-var]
    container = {
        "name": name,
        "image": image_ref,
        "imagePullPolicy": image.pull_policy,
        "command": ["python", "-m", launch.module],
        "args": [*launch.subcommand, *launch.args()],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": [{"name": CACHE_ENV, "value": CACHE_DIR}],
        "readinessProbe": _probe(READYZ_PATH, port, 5, scheme),
        "livenessProbe": {**_probe(HEALTHZ_PATH, port, 10, scheme), "initialDelaySeconds": 30},
        # Converting or loading a model takes a while; a startup probe keeps liveness out of it.
        "startupProbe": {**_probe(HEALTHZ_PATH, port, 5, scheme), "failureThreshold": 120},
        # The root filesystem is read-only; Python's tempfile (torch, transformers) needs a /tmp.
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if getattr(launch, "tls_dir", None):
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return container


def _resources(memory_gib: float, cpu: float, load_peak_gib: float = 0.0) -> dict:
    """Requests what the plan budgets for the pod; its memory limit leaves room for loading the model
    (twice the request, or what converting a GGUF file peaks at where that is more). No CPU limit: CFS throttling would
    stall every token of a pipeline for the rest of its period; the request already reserves a
    fair share of the node."""
    memory = f"{max(1, round(memory_gib * 1024))}Mi"
    limit = f"{max(1, round(max(2 * memory_gib, load_peak_gib) * 1024))}Mi"
    return {"requests": {"cpu": f"{max(1, round(cpu * 1000))}m", "memory": memory}, "limits": {"memory": limit}}


def _ingress_policy(name: str, namespace: str, owner: Owner | None, object_labels: dict[str, str],
                    ports: list[tuple[int, list[dict] | None]]) -> dict:  # fmt: skip
    """A NetworkPolicy admitting, per port, only the listed peers (None: anyone, for a port every
    client may call, or one a remote cluster's pod calls, whose address no selector here can name;
    mutual TLS still decides who is served)."""
    rules = []
    for port, peers in ports:
        rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port}]}
        if peers is not None:
            rule["from"] = peers
        rules.append(rule)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, namespace, owner, object_labels),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_INSTANCE: object_labels[LABEL_INSTANCE], "bloombee.ai/name": name}},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def _pods(instance: str, **match: str) -> dict:
    return {"podSelector": {"matchLabels": {LABEL_INSTANCE: instance, **match}}}


def _with_tls(deployment: dict, child: str) -> dict:
    """Mount the child's TLS Secret into its pods (``TLS_DIR``)."""
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    volumes.append({"name": "tls", "secret": {"secretName": tls_secret_name(child), "defaultMode": 0o400}})
    return deployment


def _deployment(name: str, namespace: str, owner: Owner | None, object_labels: dict[str, str],
                container: dict, replicas: int, node_selector: dict[str, str]) -> dict:  # fmt: skip
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, owner, object_labels),
        "spec": {
            "replicas": replicas,
            # A pod is replaced before its successor starts, never beside it: a stage's node rarely
            # has room for two (its memory, its accelerator), and with the default surge a rollout
            # on a full node waits forever for room the old pod holds.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "selector": {
                "matchLabels": {
                    LABEL_INSTANCE: object_labels[LABEL_INSTANCE],
                    LABEL_COMPONENT: object_labels[LABEL_COMPONENT],
                    "bloombee.ai/name": name,
                }
            },
            "template": {"metadata": {"labels": {**object_labels, "bloombee.ai/name": name}}, "spec": pod_spec},
        },
    }


def _service(name: str, namespace: str, owner: Owner | None, object_labels: dict[str, str], port: int,
             target: int, service_type: str = "ClusterIP", peer_port: int | None = None) -> dict:  # fmt: skip
    ports = [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]
    if peer_port is not None:
        ports.append({"name": "peer", "port": peer_port, "targetPort": peer_port, "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, owner, object_labels),
        "spec": {
            "type": service_type,
            "selector": {LABEL_INSTANCE: object_labels[LABEL_INSTANCE], "bloombee.ai/name": name},
            "ports": ports,
        },
    }


@dataclass(frozen=True)
class Placement:
    """Where each cluster's objects go: its node selector and the DNS suffix under which the other
    clusters reach its Services; ``local`` is the operator's own cluster (the gateway's too).
    ``api_servers``: per cluster, the addresses its API server reaches pods from, for its service
    proxy, through which the operator calibrates the stages (none known: its policies admit none)."""

    local: str
    node_selectors: dict[str, dict[str, str]]
    service_domains: dict[str, str] = field(default_factory=dict)
    api_servers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, resource: DistributedLLM, api_servers: dict[str, tuple[str, ...]] | None = None) -> Placement:
        clusters = resource.spec.clusters
        local = next((c.name for c in clusters if not c.kubeconfig_secret), clusters[0].name)
        return cls(local, {c.name: c.node_selector for c in clusters}, {c.name: c.service_domain for c in clusters},
                   dict(api_servers or {}))  # fmt: skip

    def domain(self, cluster: str) -> str:
        return self.service_domains.get(cluster, "svc")

    def exported(self, cluster: str) -> bool:
        """Services of a cluster reached through the Multi-Cluster Services API need a ServiceExport."""
        return self.domain(cluster).endswith("clusterset.local")


def service_url(name: str, namespace: str, domain: str, port: int, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{name}.{namespace}.{domain}:{port}"


def service_hosts(name: str, namespace: str, domain: str) -> list[str]:
    """The names a child's Service is dialled by: what its certificate must cover."""
    return sorted({name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local",
                   f"{name}.{namespace}.{domain}"})  # fmt: skip


def stage_url(desired: DesiredState, stage: StageSpec, placement: Placement, tls: bool = False) -> str:
    return service_url(stage.name, desired.namespace, placement.domain(stage.cluster), STAGE_PORT, tls)


def gateway_url(desired: DesiredState, placement: Placement) -> str:
    """The gateway's OpenAI API (plain HTTP inside the cluster)."""
    return service_url(desired.gateway.name, desired.namespace, placement.domain(placement.local), desired.gateway.port)


def gateway_peer_url(desired: DesiredState, placement: Placement) -> str:
    """Where the stages deliver results: the gateway's mutual-TLS port."""
    return service_url(desired.gateway.name, desired.namespace, placement.domain(placement.local), PEER_PORT, True)


def probe_name(resource: DistributedLLM, cluster: str) -> str:
    """One per cluster, by its index: two clusters of the spec may be node pools of one API server."""
    index = [c.name for c in resource.spec.clusters].index(cluster)
    return f"{resource.metadata.name}-probe-{index}"


def probe_url(resource: DistributedLLM, cluster: str, placement: Placement, tls: bool = False) -> str:
    namespace = resource.metadata.namespace
    return service_url(probe_name(resource, cluster), namespace, placement.domain(cluster), STAGE_PORT, tls)


def _service_export(service: dict) -> dict:
    meta = service["metadata"]
    kept = ("name", "namespace", "labels", "ownerReferences")
    return {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {key: meta[key] for key in kept if key in meta}}  # fmt: skip


def render_probes(resource: DistributedLLM, owner: Owner, placement: Placement, images: Images | None = None,
                  tls: bool = False) -> dict[str, list[dict]]:  # fmt: skip
    """A probe Deployment and Service in every cluster (``bloombee_stage.probe serve``): the ends
    the links between clusters are measured between. Pure."""
    images = images or Images()
    namespace = resource.metadata.namespace
    object_labels = labels(resource.metadata.name, "probe")
    by_cluster: dict[str, list[dict]] = {}
    for cluster in resource.spec.clusters:
        name = probe_name(resource, cluster.name)
        owned = owner if cluster.name == placement.local else None
        launch = ProbeLaunch(tls_dir=TLS_DIR if tls else None)
        container = _container("probe", images, images.stage, launch, STAGE_PORT, "HTTPS" if tls else "HTTP")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            container[probe]["httpGet"]["path"] = HEALTHZ_PATH
        container["resources"] = _resources(PROBE_GIB, cpu=0.1)
        service = _service(name, namespace, owned, object_labels, STAGE_PORT, STAGE_PORT)
        deployment = _deployment(name, namespace, owned, object_labels, container, 1, cluster.node_selector)
        by_cluster[cluster.name] = [
            _with_tls(deployment, name) if tls else deployment,
            service,
            *([_service_export(service)] if placement.exported(cluster.name) else []),
        ]
    return by_cluster


def render(desired: DesiredState, owner: Owner, placement: Placement, images: Images | None = None,
           api_key_secret: str | None = None, tls: bool = False) -> dict[str, list[dict]]:  # fmt: skip
    """Every child object, by cluster name. Pure: the same inputs give the same objects. With
    ``tls`` every part speaks mutual TLS with the certificate of its Secret ``<name>-tls`` (which
    the backend mints: keys are not pure)."""
    images = images or Images()
    by_cluster: dict[str, list[dict]] = {}
    ns = desired.namespace

    def owned(cluster: str) -> Owner | None:
        return owner if cluster == placement.local else None

    for stage in desired.stages:
        object_labels = labels(desired.name, "stage", **{LABEL_STAGE_INDEX: str(stage.index),
                                                         LABEL_PLAN: desired.plan_hash})  # fmt: skip
        if stage.index == len(desired.stages) - 1:
            object_labels[LABEL_LAST_STAGE] = "true"
        launch = replace(stage.launch(desired.model_source), tls_dir=TLS_DIR if tls else None)
        if tls:  # the stage sends only to the next span and its gateway (results, relayed hops, reports)
            after = desired.stages[stage.index + 1 :][:1]
            peers = [stage_url(desired, s, placement, tls) for s in after] + [gateway_peer_url(desired, placement)]
            launch = replace(launch, peers=tuple(peers))
        container = _container("stage", images, images.stage, launch, STAGE_PORT, "HTTPS" if tls else "HTTP")
        container["resources"] = _resources(stage.memory_gib, stage.cpu, stage.load_peak_gib)
        selector_for = placement.node_selectors.get(stage.cluster, {})
        deployment = _deployment(stage.name, ns, owned(stage.cluster), object_labels, container, 1, selector_for)
        by_cluster.setdefault(stage.cluster, []).extend(
            [
                _with_tls(deployment, stage.name) if tls else deployment,
                service := _service(stage.name, ns, owned(stage.cluster), object_labels, STAGE_PORT, STAGE_PORT),
                *([_service_export(service)] if placement.exported(stage.cluster) else []),
                _ingress_policy(stage.name, ns, owned(stage.cluster), object_labels,
                                [(STAGE_PORT, _stage_callers(desired, stage, placement))]),
            ]
        )

    gateway = desired.gateway
    object_labels = labels(desired.name, "gateway")
    launch = gateway.launch(desired.model_source, f"{ROUTE_DIR}/{ROUTE_FILE}",
                            gateway_peer_url(desired, placement) if tls else gateway_url(desired, placement))
    if tls:
        launch = replace(launch, tls_dir=TLS_DIR, internal_port=PEER_PORT)
    container = _container("gateway", images, images.gateway, launch, gateway.port)
    container["resources"] = _resources(gateway.memory_gib, gateway.cpu, gateway.load_peak_gib)
    if tls:
        container["ports"].append({"name": "peer", "containerPort": PEER_PORT, "protocol": "TCP"})
    if api_key_secret:
        container["env"].append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": api_key_secret, "key": "api-key"}}})  # fmt: skip
    plan = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            f"{desired.name}-plan", ns, owner, labels(desired.name, "plan", **{LABEL_PLAN: desired.plan_hash})
        ),
        "data": {
            "plan.json": json.dumps(
                {"planHash": desired.plan_hash, "stages": [asdict(stage) for stage in desired.stages]}, indent=2
            )
        },
    }
    container["volumeMounts"].append({"name": "route", "mountPath": ROUTE_DIR, "readOnly": True})
    gateway_deployment = _deployment(gateway.name, ns, owner, object_labels, container, gateway.replicas,
                                     placement.node_selectors.get(placement.local, {}))  # fmt: skip
    gateway_deployment["spec"]["template"]["spec"]["volumes"].append(
        {"name": "route", "configMap": {"name": route_name(desired.name)}})
    by_cluster.setdefault(placement.local, []).extend(
        [
            _with_tls(gateway_deployment, gateway.name) if tls else gateway_deployment,
            service := _service(gateway.name, ns, owner, object_labels, gateway.port, gateway.port,
                                gateway.service_type, PEER_PORT if tls else None),
            # the last stage, maybe in another cluster, posts its tokens to the gateway
            *([_service_export(service)] if placement.exported(placement.local) else []),
            # its API is for every client; its peer port for the stages that post to it
            _ingress_policy(gateway.name, ns, owner, object_labels, [(gateway.port, None)]
                            + ([(PEER_PORT, _gateway_callers(desired, placement))] if tls else [])),
            plan,
            route_config_map(desired, owner, placement, tls),
        ]
    )
    return by_cluster


def route_name(instance: str) -> str:
    return f"{instance}-route"


def route_config_map(desired: DesiredState, owner: Owner, placement: Placement, tls: bool = False) -> dict:
    """The route the gateway follows (``bloombee_contract.route``), to ``desired``'s stages. The
    kubelet refreshes the mounted file within about a minute of a change; the gateway reads it
    every second and moves over once every new stage answers."""
    route = desired.route(tuple((stage_url(desired, s, placement, tls),) for s in desired.stages))
    object_labels = labels(desired.name, "route", **{LABEL_PLAN: desired.plan_hash})
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(route_name(desired.name), desired.namespace, owner, object_labels),
            "data": {ROUTE_FILE: route.dumps()}}  # fmt: skip


def _gateway_callers(desired: DesiredState, placement: Placement) -> list[dict] | None:
    """Who posts to a gateway's peer port: its last stage (results), and every stage whose hop the
    plan relays through the gateway; anyone where one of them runs in another cluster. The last
    stage of any plan of the resource is admitted: during a plan switch the old plan's still
    delivers the results of the generations that finish there."""
    stages = desired.stages
    relaying = [stage for index, stage in enumerate(stages[:-1]) if index < len(desired.gateway.relay_hops)
                and desired.gateway.relay_hops[index]]  # fmt: skip
    if any(stage.cluster != placement.local for stage in [*relaying, stages[-1]]):
        return None
    return [_pods(desired.name, **{LABEL_COMPONENT: "stage", LABEL_LAST_STAGE: "true"})] + [
        _pods(desired.name, **{LABEL_STAGE_INDEX: str(stage.index), LABEL_PLAN: desired.plan_hash})
        for stage in relaying]  # fmt: skip


def _stage_callers(desired: DesiredState, stage: StageSpec, placement: Placement) -> list[dict] | None:
    """Who may call a stage: its gateway (steps, heartbeats, relayed hops), the stage before it, the
    operator's probes, its cluster's API server (the service proxy that the operator's calibration
    goes through); anyone where one of them runs in another cluster."""
    callers = [_pods(desired.name, **{LABEL_COMPONENT: "gateway"}), _pods(desired.name, **{LABEL_COMPONENT: "probe"})]
    callers += [{"ipBlock": {"cidr": ipaddress.ip_network(address).with_prefixlen}}
                for address in placement.api_servers.get(stage.cluster, ())]  # fmt: skip
    clusters = {placement.local, stage.cluster}
    if stage.index > 0:
        before = desired.stages[stage.index - 1]
        callers.append(_pods(desired.name, **{LABEL_STAGE_INDEX: str(before.index), LABEL_PLAN: desired.plan_hash}))
        clusters.add(before.cluster)
    return callers if clusters == {stage.cluster} else None


def object_key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
