"""Applying rendered objects to a cluster, and deleting them: the I/O half of the Kubernetes backend.

Server-side apply with the operator's field manager, so fields that others own (an HPA's
replicas, a mutating webhook's) are left alone and repeated applies are no-ops.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import yaml
from bloombee_contract.paths import MEASURE_PATH, PROFILE_PATH, READYZ_PATH
from bloombee_contract.tls import SIGNATURE_HEADER, sign
from kubernetes import client, config, dynamic
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from bloombee_operator.api.resource import DistributedLLM
from bloombee_operator.api.status import NodeProfile
from bloombee_operator.backends.kubernetes.objects import (
    LABEL_COMPONENT,
    LABEL_PLAN,
    STAGE_PORT,
    Images,
    Owner,
    Placement,
    gateway_url,
    probe_name,
    probe_url,
    render,
    render_probes,
    selector,
    service_hosts,
    tls_secret_name,
)
from bloombee_operator.backends.kubernetes.tls_secrets import DeploymentSecrets
from bloombee_operator.desired import PLAN_NAME_CHARS, DesiredState
from bloombee_operator.faults import Fault, pod_faults
from bloombee_operator.model_shape import ModelShape, model_shape
from bloombee_operator.planner.cost import GATEWAY
from bloombee_operator.planning import profile_request
from bloombee_operator.reconcile import LinksPending, Switch

FIELD_MANAGER = "bloombee-operator"
KUBERNETES_SERVICE = "kubernetes.io/service-name=kubernetes"  # default/kubernetes: the API server's own addresses
log = logging.getLogger("bloombee.kubernetes")


def current_ready_replicas(deployment: dict) -> int:
    """Ready pods of a Deployment (as the API server has it) for its current spec: none while the
    controller has not seen its newest spec, or before a pod of that spec is rolled out (a pod of the
    spec before is not ready for this one)."""
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(deployment["metadata"].get("generation") or 0):
        return 0
    return min(int(status.get("readyReplicas") or 0), int(status.get("updatedReplicas") or 0))


class Cluster:
    """One cluster's API, reached with a kubernetes ApiClient (in-cluster, kubeconfig, or a Secret's)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.dynamic = dynamic.DynamicClient(api)
        self._api_servers: tuple[str, ...] = ()

    def api_server_addresses(self) -> tuple[str, ...]:
        """Where this cluster's API server reaches pods from (its service proxy): the addresses of the
        ``default/kubernetes`` Service's EndpointSlices, read once they are known. Empty when they
        cannot be read (the stages' NetworkPolicies then admit no service proxy, and say so in the log)."""
        if not self._api_servers:
            try:
                discovery = client.DiscoveryV1Api(self.dynamic.client)
                slices = discovery.list_namespaced_endpoint_slice("default", label_selector=KUBERNETES_SERVICE,
                                                                  _request_timeout=30).items  # fmt: skip
            except (client.exceptions.ApiException, OSError) as error:
                log.warning("cannot read the API server's addresses (EndpointSlices of default/kubernetes: %s); "
                            "the stages' NetworkPolicies will not admit its service proxy", error)  # fmt: skip
                return ()
            self._api_servers = tuple(sorted({a for s in slices for e in s.endpoints or [] for a in e.addresses or []}))
        return self._api_servers

    def _resource(self, obj: dict) -> dynamic.Resource:
        return self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])

    def apply(self, obj: dict) -> None:
        namespace = obj["metadata"]["namespace"]
        self._resource(obj).server_side_apply(body=obj, namespace=namespace, field_manager=FIELD_MANAGER,
                                              force_conflicts=True)  # fmt: skip

    def delete(self, obj: dict) -> bool:
        """Delete ``obj`` (a Deployment with its TLS Secret: Secrets are never listed); whether it was there."""
        meta = obj["metadata"]
        try:
            self._resource(obj).delete(name=meta["name"], namespace=meta["namespace"])
        except NotFoundError:
            return False
        if obj["kind"] == "Deployment":
            secret = {"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": tls_secret_name(meta["name"]), "namespace": meta["namespace"]}}  # fmt: skip
            self.delete(secret)
        return True

    def live(self, obj: dict) -> Any | None:
        """The object as the API server has it now, or None."""
        try:
            return self._resource(obj).get(name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"])
        except NotFoundError:
            return None

    def secret_data(self, name: str, namespace: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded; None when there is no such Secret."""
        live = self.live({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}})
        if live is None:
            return None
        return {key: base64.b64decode(value) for key, value in ((live.to_dict().get("data")) or {}).items()}

    def exists(self, obj: dict) -> bool:
        return self.live(obj) is not None

    def pods(self, namespace: str, label_selector: str) -> list[dict]:
        pods = self.dynamic.resources.get(api_version="v1", kind="Pod")
        return list(pods.get(namespace=namespace, label_selector=label_selector).to_dict().get("items") or [])

    def ready_replicas(self, obj: dict) -> int:
        live = self.live(obj)
        return current_ready_replicas(live.to_dict()) if live is not None else 0

    def differs(self, obj: dict) -> bool:
        """Would applying this Deployment change its pods (new, or other containers)?"""
        live = self.live(obj)
        if live is None:
            return True
        containers = (((live.to_dict().get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
        return containers is None or [(c.get("args"), c.get("image")) for c in containers] != [
            (c.get("args"), c.get("image")) for c in obj["spec"]["template"]["spec"]["containers"]]  # fmt: skip

    def children(self, label_selector: str, namespace: str) -> list[dict]:
        """Every object of the kinds the operator creates that carries these labels."""
        found = []
        for api_version, kind in CHILD_KINDS:
            try:
                path = self.dynamic.resources.get(api_version=api_version, kind=kind).path(namespace=namespace)
            except ResourceNotFoundError:
                continue  # a kind this cluster does not serve (ServiceExport without the MCS API)
            items = self._call(path, "GET", query_params=[("labelSelector", label_selector)]).get("items") or []
            found += [{"apiVersion": api_version, "kind": kind, **item} for item in items]
        return found

    def proxy_post(self, service: str, namespace: str, path: str, body: dict, timeout_s: float = 120.0,
                   measure_key: bytes | None = None) -> dict:  # fmt: skip
        """POST through the API server's service proxy to a Service's pods, and read the JSON reply.
        With ``measure_key`` the pod speaks TLS and the request is signed with the key (the proxy
        presents no certificate of ours)."""
        scheme = "https:" if measure_key else ""
        url = f"/api/v1/namespaces/{namespace}/services/{scheme}{service}:{STAGE_PORT}/proxy{path}"
        # Signed over the bytes the client sends: it serialises a JSON body with json.dumps, as here.
        signed = json.dumps(body).encode()
        headers = {SIGNATURE_HEADER: sign(measure_key, signed, time.time())} if measure_key else {}
        return self._call(url, "POST", body=body, timeout_s=timeout_s, headers=headers)

    def pod_get(self, pod: str, namespace: str, port: int, path: str, timeout_s: float = 10.0) -> tuple[int, Any]:
        """GET ``path`` of a pod's plain-HTTP ``port`` through the API server's pod proxy: the
        status and the JSON reply (None where it is not JSON)."""
        url = f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}"
        status, payload = self._request(url, "GET", timeout_s)
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, None

    def _call(self, path: str, method: str, timeout_s: float = 60.0, query_params: list | None = None,
              body: dict | None = None, headers: dict[str, str] | None = None) -> dict:  # fmt: skip
        """A raw API request (with the client's credentials), its JSON reply as a dict."""
        status, payload = self._request(path, method, timeout_s, query_params, body, headers)
        if status >= 400:
            raise client.exceptions.ApiException(status=status, reason=payload.decode(errors="replace")[:500])
        return json.loads(payload)

    def _request(self, path: str, method: str, timeout_s: float = 60.0, query_params: list | None = None,
                 body: dict | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
        api = self.dynamic.client
        headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        method, url, headers, data, post = api.param_serialize(method, path, query_params=query_params or [],
                                                               header_params=headers, body=body,
                                                               auth_settings=["BearerToken"])  # fmt: skip
        reply = api.call_api(
            method, url, header_params=headers, body=data, post_params=post, _request_timeout=timeout_s
        )
        return reply.status, reply.read()


CHILD_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"),
               ("networking.k8s.io/v1", "NetworkPolicy"),
               ("multicluster.x-k8s.io/v1alpha1", "ServiceExport"))  # fmt: skip
KUBECONFIG_KEY = "kubeconfig"


def _is_route(obj: dict) -> bool:
    return obj["kind"] == "ConfigMap" and obj["metadata"]["labels"].get(LABEL_COMPONENT) == "route"


class RemoteClusterError(RuntimeError):
    """A remote cluster's kubeconfig Secret is missing or unusable; the message names it."""


def remote_client(local: client.ApiClient, namespace: str, secret: str) -> client.ApiClient:
    """An API client for a remote cluster, from the kubeconfig in a Secret (key ``kubeconfig``)."""
    try:
        data = client.CoreV1Api(local).read_namespaced_secret(secret, namespace).data or {}
    except client.exceptions.ApiException as error:
        raise RemoteClusterError(f"Secret {namespace}/{secret}: {error.status} {error.reason}") from None
    if KUBECONFIG_KEY not in data:
        raise RemoteClusterError(f"Secret {namespace}/{secret} has no key {KUBECONFIG_KEY!r}")
    try:
        kubeconfig = yaml.safe_load(base64.b64decode(data[KUBECONFIG_KEY]))
        return config.new_client_from_config_dict(kubeconfig)
    except (ValueError, yaml.YAMLError, config.ConfigException) as error:
        raise RemoteClusterError(f"Secret {namespace}/{secret}: not a usable kubeconfig: {error}") from None


class KubernetesBackend:
    """The reconcile steps' backend (reconcile.Backend) over one or more clusters.

    ``local`` is the operator's own cluster; each remote cluster's API comes from its kubeconfig
    Secret. Children are applied with server-side apply; the finalizer finds children in every
    cluster by label (owner references do not cross clusters). One backend serves one resource;
    the ``resource`` that ``measure_links`` and ``remove`` take (reconcile.Backend) is that one.
    """

    def __init__(self, local: Cluster, resource: DistributedLLM, owner: Owner, images: Images,
                 api_key_secret: str | None = None, clients: dict[str, Cluster] | None = None) -> None:  # fmt: skip
        self.local, self.owner, self.images, self.api_key_secret = local, owner, images, api_key_secret
        self._resource = resource
        self.clients = clients if clients is not None else {}  # remote clusters by Secret name, kept by the caller
        self.secrets = DeploymentSecrets(resource.metadata.name, resource.metadata.namespace, owner)

    def model_shape(self, source: str) -> ModelShape:
        return model_shape(source)

    def cluster(self, name: str) -> Cluster:
        """The API of the resource's cluster ``name`` (the operator's own unless it has a kubeconfig)."""
        spec = next(c for c in self._resource.spec.clusters if c.name == name)
        if not spec.kubeconfig_secret or name == Placement.of(self._resource).local:
            return self.local
        if spec.kubeconfig_secret not in self.clients:
            namespace = self._resource.metadata.namespace
            api = remote_client(self.local.dynamic.client, namespace, spec.kubeconfig_secret)
            self.clients[spec.kubeconfig_secret] = Cluster(api)
        return self.clients[spec.kubeconfig_secret]

    def _rendered(self, desired: DesiredState) -> dict[str, list[dict]]:
        clusters = {stage.cluster for stage in desired.stages}
        placement = Placement.of(self._resource, {name: self.cluster(name).api_server_addresses() for name in clusters})
        return render(desired, self.owner, placement, self.images, self.api_key_secret, tls=True)

    def _ensure_tls(self, rendered: dict[str, list[dict]]) -> None:
        """Every Deployment's TLS Secret in its cluster, for the names its Service is dialled by."""
        placement = Placement.of(self._resource)
        namespace = self._resource.metadata.namespace
        for cluster_name, objects in rendered.items():
            for obj in (o for o in objects if o["kind"] == "Deployment"):
                name = obj["metadata"]["name"]
                hosts = service_hosts(name, namespace, placement.domain(cluster_name))
                self.secrets.ensure(self.local, self.cluster(cluster_name), name,
                                    obj["metadata"]["labels"][LABEL_COMPONENT], hosts,
                                    owned=cluster_name == placement.local)  # fmt: skip

    def apply(self, desired: DesiredState) -> list[str]:
        """Apply ``desired``'s children beside any other plan's (make-before-break); the gateway's
        route moves to the new plan once its stages are ready (``retire``)."""
        changed = []
        rendered = self._rendered(desired)
        self._ensure_tls(rendered)
        for cluster_name, objects in rendered.items():
            cluster = self.cluster(cluster_name)
            for obj in objects:
                if _is_route(obj):
                    continue  # created, or moved once the plan it names can serve, by _route_to
                if obj["kind"] == "Deployment" and cluster.differs(obj):
                    changed.append(obj["metadata"]["name"])
                cluster.apply(obj)
        self._route_to(desired, rendered)
        return changed

    def _route_to(self, desired: DesiredState, rendered: dict[str, list[dict]]) -> bool:
        """Point the gateway's route at ``desired``'s stages once every one of them is ready;
        whether it names ``desired``'s plan now."""
        local = Placement.of(self._resource).local
        route = next(obj for obj in rendered[local] if _is_route(obj))
        cluster = self.cluster(local)
        found = cluster.live(route)
        live = found.to_dict() if found is not None else None
        if live is not None and live["metadata"].get("labels", {}).get(LABEL_PLAN) == desired.plan_hash:
            if live.get("data") != route["data"]:
                cluster.apply(route)  # the same stages; what the plan admits changed
            return True
        if live is not None and self.ready_stages(desired) < len(desired.stages):
            return False
        cluster.apply(route)
        return True

    def retire(self, desired: DesiredState) -> Switch:
        """Delete older plans' stage children once the route names ``desired``'s plan, every gateway
        pod serves it (each one's ``/readyz``, through the API server's pod proxy) and none still
        drains an old plan's generations."""
        found = [(api, obj) for api in self._apis()
                 for obj in api.children(f"{selector(desired.name)},{LABEL_COMPONENT}=stage", desired.namespace)]
        old_children = [(api, obj) for api, obj in found
                        if obj["metadata"].get("labels", {}).get(LABEL_PLAN) != desired.plan_hash]  # fmt: skip
        routed = self._route_to(desired, self._rendered(desired))
        if not old_children:
            return Switch(serving=desired.plan_hash if routed else None)
        old = tuple(sorted({(obj["metadata"].get("labels", {}).get(LABEL_PLAN) or "unlabelled")[:PLAN_NAME_CHARS]
                            for _, obj in old_children}))  # fmt: skip
        if not routed:
            return Switch(old, "the new plan's stages to be ready")
        states = self._gateway_states(desired)
        if not states:
            return Switch(old, "a gateway pod to answer")
        behind = sorted(pod for pod, state in states.items() if (state or {}).get("plan") != desired.plan_hash)
        if behind:
            return Switch(old, f"gateway pods {', '.join(behind)} to take on plan {desired.plan_hash} (the kubelet "
                               "refreshes their route file within about a minute)")  # fmt: skip
        draining = sorted({plan for state in states.values() for plan in (state or {}).get("draining", [])})
        if draining:
            return Switch(old, f"the generations in flight on plan {', '.join(draining)} to finish",
                          serving=desired.plan_hash)  # fmt: skip
        removed = [obj["metadata"]["name"] for api, obj in old_children if api.delete(obj)
                   and obj["kind"] == "Deployment"]  # fmt: skip
        return Switch(old, "", tuple(removed), desired.plan_hash)

    def _gateway_states(self, desired: DesiredState) -> dict[str, dict | None]:
        """Each running gateway pod's ``/readyz`` answer (the plan it serves, those it drains), by pod."""
        local = self.cluster(Placement.of(self._resource).local)
        pods = local.pods(desired.namespace, f"{selector(desired.name)},{LABEL_COMPONENT}=gateway")
        states: dict[str, dict | None] = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            if (pod.get("status") or {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
                continue
            try:
                _, states[name] = local.pod_get(name, desired.namespace, desired.gateway.port, READYZ_PATH)
            except (client.exceptions.ApiException, OSError) as error:
                log.info("gateway pod %s does not answer /readyz through the proxy: %s", name, error)
                states[name] = None
        return states

    def _apis(self, skip_unreachable: bool = False) -> list[Cluster]:
        """Each API server once: clusters of the spec without a kubeconfig share the operator's."""
        apis: dict[int, Cluster] = {}
        for cluster in self._resource.spec.clusters:
            try:
                api = self.cluster(cluster.name)
            except RemoteClusterError:
                if skip_unreachable:
                    continue
                raise
            apis.setdefault(id(api), api)
        return list(apis.values())

    def restore(self, desired: DesiredState) -> list[str]:
        restored = []
        rendered = self._rendered(desired)
        self._ensure_tls(rendered)
        for cluster_name, objects in rendered.items():
            cluster = self.cluster(cluster_name)
            for obj in objects:
                if not cluster.exists(obj):
                    cluster.apply(obj)
                    restored.append(f"{obj['kind']} {obj['metadata']['name']}")
        return restored

    def ready_stages(self, desired: DesiredState) -> int:
        ready = 0
        for cluster_name, objects in self._rendered(desired).items():
            cluster = self.cluster(cluster_name)
            stages = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] != desired.gateway.name]
            ready += sum(cluster.ready_replicas(obj) >= 1 for obj in stages)
        return ready

    def faults(self, desired: DesiredState) -> list[Fault]:
        budgets = {stage.name: stage.memory_gib for stage in desired.stages}
        budgets[desired.gateway.name] = desired.gateway.memory_gib
        pods = []
        for cluster in self._apis():  # each API server once
            try:
                pods += cluster.pods(desired.namespace, selector(desired.name))
            except client.ApiException as error:  # a remote kubeconfig without `list pods`: readiness still shows
                log.warning("cannot list the pods of %s in one of its clusters: %s %s", desired.name, error.status,
                            error.reason)  # fmt: skip
        return pod_faults(pods, budgets)

    def gateway_ready(self, desired: DesiredState) -> bool:
        gateway = {"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": desired.gateway.name, "namespace": desired.namespace}}  # fmt: skip
        return self.cluster(Placement.of(self._resource).local).ready_replicas(gateway) >= 1

    def endpoint(self, desired: DesiredState) -> str:
        return f"{gateway_url(desired, Placement.of(self._resource))}/v1"

    def remove(self, resource: DistributedLLM) -> int:
        # A remote cluster whose Secret went first cannot be reached: nothing more can be done there.
        apis = self._apis(skip_unreachable=True)
        found = selector(resource.metadata.name)
        return sum(api.delete(obj) for api in apis for obj in api.children(found, resource.metadata.namespace))

    def local_links(self, resource: DistributedLLM) -> list[dict]:
        return []  # a cluster's own network: the planner's local link

    def measure_profiles(self, desired: DesiredState) -> dict | None:
        """Each stage's profiling run and what it measured of its traffic, asked through its
        cluster's API server (signed, as the probes' measurements are). Stages run on nodes of their
        own here, so no host is shared; the gateway's measurements are not collected yet (its
        ``/info`` is on its mutual-TLS port, which the service proxy cannot present a certificate to)."""
        if self.ready_stages(desired) < len(desired.stages):
            return None
        key = self.secrets.measure_key(self.local)
        nodes = []
        body = profile_request(desired.max_micro_batch)
        for stage in desired.stages:
            try:
                run = self.cluster(stage.cluster).proxy_post(stage.name, desired.namespace, PROFILE_PATH, body,
                                                             measure_key=key)  # fmt: skip
            except (client.exceptions.ApiException, OSError, ValueError) as error:
                log.warning("could not profile %s (%s); planning on what was known", stage.name, error)
                return None
            nodes.append(NodeProfile.from_run(stage.node, None, run).dump())
        return {"nodes": nodes}

    def measure_links(self, resource: DistributedLLM) -> list[dict]:
        """Probe pods in every cluster; each measures towards the clusters after it, asked through
        its cluster's API server (the service proxy), so no probe needs to be reachable from here."""
        placement = Placement.of(resource)
        probes = render_probes(resource, self.owner, placement, self.images, tls=True)
        self._ensure_tls(probes)
        waiting = []
        for cluster_name, objects in probes.items():
            cluster = self.cluster(cluster_name)
            for obj in objects:
                cluster.apply(obj)
            if cluster.ready_replicas(objects[0]) < 1:
                waiting.append(cluster_name)
        if waiting:
            raise LinksPending(f"waiting for the probe pods in {', '.join(waiting)}")
        names = [c.name for c in resource.spec.clusters]
        entries = []
        for index, source in enumerate(names[:-1]):
            targets = {target: probe_url(resource, target, placement, tls=True) for target in names[index + 1 :]}
            body = {"source": source, "targets": targets}
            cluster = self.cluster(source)
            reply = cluster.proxy_post(probe_name(resource, source), resource.metadata.namespace, MEASURE_PATH, body,
                                       measure_key=self.secrets.measure_key(self.local))  # fmt: skip
            entries += reply["links"]
        # The gateway runs in the operator's cluster: its links are that cluster's.
        for entry in list(entries):
            for end, other in (("from", "to"), ("to", "from")):
                if entry[end] == placement.local:
                    entries.append({**entry, "from": GATEWAY, "to": entry[other]})
        return entries
