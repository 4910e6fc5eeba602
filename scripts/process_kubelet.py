"""A process kubelet: runs the pods of a real Kubernetes API server as local processes.

There is no container engine on the machines this project is tested on, so this stands in for a
kubelet, a scheduler and kube-proxy at once, for one node:

* registers its Node and keeps it Ready (a heartbeat every few seconds);
* binds every pod that has no node to itself, unless the pod's nodeSelector asks for labels this
  node lacks (there is no scheduler);
* runs each container of its pods as a process in a network namespace of the pod's own, with its
  own address on a bridge (``<prefix>.<n>``), the container's command and args (``python`` and
  this environment's console scripts, such as ``kopf`` and ``bloombee``, become this machine's),
  its environment (literal values, Secret keys, a few field references), its Secret volumes
  (bind-mounted read-only in the process's own mount namespace) and, for the pod's
  service account, a kubeconfig with a token from the TokenRequest API in ``$KUBECONFIG``.
  Images are not pulled: every container runs this machine's Python environment, and the log
  says so. A container without a command runs its image's ENTRYPOINT as
  the project's Dockerfile for that image declares it;
* reports pod phase, address and readiness (from each container's HTTP readiness probe) back to
  the API server, restarts containers that exit, and stops the processes of deleted pods;
* makes Service names resolve inside each pod's namespace to a ready pod behind the Service
  (``/etc/netns/<netns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``, beside a
  ``resolv.conf`` that fails other names at once: no DNS server is reachable from pods). Service
  ports are assumed equal to the pods' ports, as they are for BloomBee's children;
* with ``--clusterset FILE`` (kubeconfigs of the clusters of one cluster set, one per line), stands
  in for the Multi-Cluster Services API's DNS: every Service with a ``ServiceExport`` in any of those
  clusters resolves as ``<name>.<namespace>.svc.clusterset.local`` to a ready endpoint (from its
  EndpointSlices). ``scripts/cluster.sh up --clusters N`` joins the clusters' pod networks through
  a router with real packet delay (``scripts/pod_wan.py``), so those addresses are reachable.

Run as root (network namespaces). Every loop is bounded by the process's life; ``SIGTERM`` stops
every pod it started and removes their namespaces.

    python scripts/process_kubelet.py --kubeconfig .cluster/c0/kubeconfig --node c0-node \
        --bridge bbc0 --prefix 10.200.0 --state-dir .cluster/c0/kubelet
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from clusterset import ClusterSet
from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger("process-kubelet")
REPO = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 5.0
SLOW_SYNC_S = 3.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def image_entrypoints() -> dict[str, list[str]]:
    """The ENTRYPOINT of each of the project's images, by image name, read from its Dockerfile."""
    found = {}
    for dockerfile in REPO.glob("Dockerfile.*"):
        entry = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile.read_text(), flags=re.MULTILINE)
        if entry:
            found[dockerfile.suffix.lstrip(".")] = json.loads(entry.group(1))
    return found


class Bridge:
    """The node's pod network: a bridge in the root namespace, one veth pair and address per pod."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name, self.prefix = name, prefix
        self.gateway = f"{prefix}.1"
        self.used: set[int] = set()

    def up(self) -> None:
        if run("ip", "link", "show", self.name, check=False).returncode != 0:
            run("ip", "link", "add", self.name, "type", "bridge")
            run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.name)
        run("ip", "link", "set", self.name, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")

    def attach(self, netns: str) -> str:
        """Create ``netns`` with an address on the bridge; return the address."""
        index = next(i for i in range(2, 255) if i not in self.used)
        self.used.add(index)
        address = f"{self.prefix}.{index}"
        host_end, pod_end = f"v{netns}"[:15], f"p{netns}"[:15]
        run("ip", "netns", "add", netns)
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        run("ip", "link", "set", host_end, "master", self.name, "up")
        run("ip", "link", "set", pod_end, "netns", netns)
        run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", pod_end)
        run("ip", "-n", netns, "link", "set", pod_end, "up")
        run("ip", "-n", netns, "link", "set", "lo", "up")
        run("ip", "-n", netns, "route", "add", "default", "via", self.gateway)
        return address

    def detach(self, netns: str, address: str) -> None:
        run("ip", "link", "del", f"v{netns}"[:15], check=False)
        run("ip", "netns", "del", netns, check=False)
        shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        self.used.discard(int(address.rsplit(".", 1)[1]))


@dataclass
class Container:
    name: str
    command: list[str]
    env: dict[str, str]
    probe: tuple[str, int, str] | None  # readiness: (path, port, scheme) of an HTTP GET
    log_path: Path
    mounts: list[tuple[Path, str]] = field(default_factory=list)  # (files here, path in the container)
    popen: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    exit_code: int | None = None
    ready: bool = False
    started_at: str = ""


@dataclass
class Pod:
    uid: str
    namespace: str
    name: str
    netns: str
    address: str
    restart_policy: str
    labels: dict[str, str]
    containers: list[Container] = field(default_factory=list)
    reported: dict = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.containers)


class Kubelet:
    def __init__(self, api: client.ApiClient, node: str, bridge: Bridge, state_dir: Path, api_url: str,
                 ca_file: str, clusterset: Path | None = None) -> None:  # fmt: skip
        self.api, self.core = api, client.CoreV1Api(api)
        self.clusterset = ClusterSet(clusterset) if clusterset else None
        self.node, self.bridge, self.state_dir = node, bridge, state_dir
        self.api_url, self.ca_file = api_url, ca_file  # how pods reach the API server
        self.pods: dict[str, Pod] = {}
        self.entrypoints = image_entrypoints()
        self.labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux"}
        self.last_heartbeat = 0.0
        self.stopping = False

    # -- node -----------------------------------------------------------------------------

    def register(self) -> None:
        body = {"metadata": {"name": self.node, "labels": self.labels},
                "spec": {"podCIDR": f"{self.bridge.prefix}.0/24"}}  # fmt: skip
        try:
            self.core.create_node(body)
            log.info("registered node %s", self.node)
        except ApiException as error:
            if error.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        at = now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": at,
                 "lastTransitionTime": at, "message": "process kubelet is posting ready status"}  # fmt: skip
        status = {"conditions": [ready], "addresses": [{"type": "InternalIP", "address": self.bridge.gateway},
                                                       {"type": "Hostname", "address": self.node}],
                  "capacity": {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": "110"},
                  "allocatable": {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": "110"},
                  "nodeInfo": {"kubeletVersion": "process-kubelet",
                               "containerRuntimeVersion": "processes"}}  # fmt: skip
        self.core.patch_node_status(self.node, {"status": status})
        self.last_heartbeat = time.monotonic()

    # -- the loop -------------------------------------------------------------------------

    def sync(self) -> None:
        if time.monotonic() - self.last_heartbeat > HEARTBEAT_S:
            self.heartbeat()
        listed = self.core.list_pod_for_all_namespaces().items
        for pod in listed:
            if not pod.spec.node_name and not pod.metadata.deletion_timestamp and self.fits(pod):
                self.bind(pod)
        mine = {p.metadata.uid: p for p in listed if p.spec.node_name == self.node}
        for uid in [uid for uid in self.pods if uid not in mine]:
            self.stop_pod(self.pods[uid])  # deleted from the API server outright
        for uid, pod in mine.items():
            if pod.metadata.deletion_timestamp:
                if uid in self.pods:
                    self.stop_pod(self.pods[uid])
                self.confirm_deletion(pod)
            elif uid not in self.pods and pod.status.phase not in ("Succeeded", "Failed"):
                self.start_pod(pod)  # new, or left running by a kubelet before this one
        self.write_hosts()  # before any launch: `ip netns exec` mounts the file only if it exists then
        for pod in self.pods.values():
            self.supervise(pod)
        for pod in list(self.pods.values()):
            self.report(pod)

    def fits(self, pod: client.V1Pod) -> bool:
        """As a scheduler would: a pod whose nodeSelector this node's labels do not match waits."""
        return all(self.labels.get(key) == value for key, value in (pod.spec.node_selector or {}).items())

    def bind(self, pod: client.V1Pod) -> None:
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.metadata.name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}}  # fmt: skip
        try:
            self.core.create_namespaced_pod_binding(pod.metadata.name, pod.metadata.namespace, body,
                                                    _preload_content=False)  # fmt: skip
            log.info("bound %s/%s to %s", pod.metadata.namespace, pod.metadata.name, self.node)
        except ApiException as error:
            if error.status != 409:
                log.warning("binding %s/%s failed: %s", pod.metadata.namespace, pod.metadata.name, error.reason)

    # -- pods -----------------------------------------------------------------------------

    def start_pod(self, pod: client.V1Pod) -> None:
        meta = pod.metadata
        directory = self.state_dir / f"{meta.namespace}_{meta.name}"
        try:
            volumes = self.secret_volumes(pod, directory / "volumes")
        except ApiException as error:  # a Secret not there yet: the pod waits, as with a kubelet
            log.info("pod %s/%s waits for a Secret: %s", meta.namespace, meta.name, error.reason)
            return
        netns = f"bb{meta.uid.replace('-', '')[:10]}"
        address = self.bridge.attach(netns)
        directory.mkdir(parents=True, exist_ok=True)
        running = Pod(meta.uid, meta.namespace, meta.name, netns, address, pod.spec.restart_policy or "Always",
                      dict(meta.labels or {}))
        base_env = self.service_account_env(pod, directory)
        for spec in pod.spec.containers:
            command = self.command_of(spec)
            env = {**base_env, **self.env_of(pod, spec, address)}
            mounts = [(volumes[m.name], m.mount_path) for m in spec.volume_mounts or [] if m.name in volumes]
            running.containers.append(Container(spec.name, command, env, self.probe_of(spec),
                                                directory / f"{spec.name}.log", mounts))  # fmt: skip
        self.pods[meta.uid] = running
        log.info("pod %s/%s at %s (netns %s); images are not pulled: containers run this machine's Python",
                 meta.namespace, meta.name, address, netns)  # fmt: skip

    def secret_volumes(self, pod: client.V1Pod, root: Path) -> dict[str, Path]:
        """Each Secret volume's files, written under ``root``: volume name -> directory. (emptyDir
        volumes are not made: their paths are this machine's.)"""
        found = {}
        for volume in pod.spec.volumes or []:
            if volume.secret is None:
                continue
            secret = self.core.read_namespaced_secret(volume.secret.secret_name, pod.metadata.namespace)
            directory = root / volume.name
            directory.mkdir(parents=True, exist_ok=True)
            for key, value in (secret.data or {}).items():
                path = directory / key
                path.write_bytes(base64.b64decode(value))
                path.chmod(volume.secret.default_mode or 0o644)
            found[volume.name] = directory
        return found

    def command_of(self, spec: client.V1Container) -> list[str]:
        command = list(spec.command or [])
        if not command:
            image = spec.image.rsplit("/", 1)[-1].split(":")[0]
            command = list(self.entrypoints.get(image, []))
            if not command:
                raise RuntimeError(f"container {spec.name}: no command, and no Dockerfile.{image} with an ENTRYPOINT")
        # The image's programs are this environment's: python itself, and the console scripts beside it
        # (kopf, bloombee, ...).
        local = Path(sys.executable).with_name(command[0])
        if command[0] in ("python", "python3"):
            command[0] = sys.executable
        elif "/" not in command[0] and local.is_file():
            command[0] = str(local)
        return [*command, *(spec.args or [])]

    def env_of(self, pod: client.V1Pod, spec: client.V1Container, address: str) -> dict[str, str]:
        fields = {"metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
                  "status.podIP": address, "spec.nodeName": self.node}  # fmt: skip
        env = {}
        for item in spec.env or []:
            if item.value_from is None:
                env[item.name] = item.value or ""
            elif item.value_from.secret_key_ref is not None:
                ref = item.value_from.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
                env[item.name] = base64.b64decode(secret.data[ref.key]).decode()
            elif item.value_from.field_ref is not None:
                env[item.name] = fields.get(item.value_from.field_ref.field_path, "")
        return env

    def service_account_env(self, pod: client.V1Pod, directory: Path) -> dict[str, str]:
        """A kubeconfig for the pod's service account (a TokenRequest token), in ``$KUBECONFIG``."""
        account = pod.spec.service_account_name or "default"
        request = {"spec": {"audiences": [], "expirationSeconds": 86400}}
        token = self.core.create_namespaced_service_account_token(account, pod.metadata.namespace, request)
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "local", "cluster": {"server": self.api_url, "certificate-authority": self.ca_file}}],
            "users": [{"name": account, "user": {"token": token.status.token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "local", "user": account,
                                                     "namespace": pod.metadata.namespace}}],
        }  # fmt: skip
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        path.chmod(0o600)
        return {"KUBECONFIG": str(path), "POD_NAMESPACE": pod.metadata.namespace}

    @staticmethod
    def probe_of(spec: client.V1Container) -> tuple[str, int, str] | None:
        probe = spec.readiness_probe
        if probe is None or probe.http_get is None:
            return None
        port = probe.http_get.port
        if isinstance(port, str):  # a named port
            port = next(p.container_port for p in spec.ports or [] if p.name == port)
        return probe.http_get.path or "/", int(port), (probe.http_get.scheme or "HTTP").lower()

    def supervise(self, pod: Pod) -> None:
        for container in pod.containers:
            if container.popen is not None and container.popen.poll() is not None:
                container.exit_code = container.popen.returncode
                (log.info if container.exit_code == 0 else log.warning)(
                    "%s/%s container %s exited with %s", pod.namespace, pod.name, container.name, container.exit_code)
                container.popen, container.ready = None, False
                if pod.restart_policy == "Never" or (pod.restart_policy == "OnFailure" and not container.exit_code):
                    continue
                container.restarts += 1
                delay = RESTART_BACKOFF_S[min(container.restarts - 1, len(RESTART_BACKOFF_S) - 1)]
                container.next_start = time.monotonic() + delay
            if container.popen is None and time.monotonic() >= container.next_start and (
                    container.exit_code is None or container.restarts > 0):  # fmt: skip
                self.launch(pod, container)
            if container.popen is not None:
                container.ready = self.probe_ready(pod, container)

    def launch(self, pod: Pod, container: Container) -> None:
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
                       **container.env}  # fmt: skip
        command = container.command
        if container.mounts:
            # `ip netns exec` gives the process a mount namespace of its own: the Secret's files are
            # bound over the mount path there only (the empty directory stays on this machine).
            binds = []
            for source, target in container.mounts:
                Path(target).mkdir(parents=True, exist_ok=True)
                binds.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)} && "
                             f"mount -o remount,bind,ro {shlex.quote(target)}")  # fmt: skip
            command = ["sh", "-c", " && ".join([*binds, 'exec "$@"']), "sh", *command]
        with open(container.log_path, "a") as log_file:
            container.popen = subprocess.Popen(["ip", "netns", "exec", pod.netns, *command],
                                               stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                                               cwd=container.log_path.parent, start_new_session=True)  # fmt: skip
        container.started_at, container.exit_code = now(), None
        log.info("started %s/%s container %s: %s", pod.namespace, pod.name, container.name, container.command)

    @staticmethod
    def probe_ready(pod: Pod, container: Container) -> bool:
        if container.probe is None:
            return True
        path, port, scheme = container.probe
        # As a kubelet does: HTTPS without checking the server's certificate, and without one of ours.
        context = ssl._create_unverified_context() if scheme == "https" else None
        try:
            with urllib.request.urlopen(f"{scheme}://{pod.address}:{port}{path}", timeout=1, context=context) as reply:
                return 200 <= reply.status < 400
        except OSError:
            return False

    def stop_pod(self, pod: Pod, grace_s: float = 10.0, deadline: float | None = None) -> None:
        """SIGTERM, then SIGKILL what still runs after ``grace_s`` (or at ``deadline``, shared by pods
        stopped together)."""
        for container in pod.containers:
            if container.popen is not None and container.popen.poll() is None:
                os.killpg(container.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s if deadline is None else deadline
        for container in pod.containers:
            if container.popen is None:
                continue
            try:
                container.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(container.popen.pid, signal.SIGKILL)
                container.popen.wait()
        self.bridge.detach(pod.netns, pod.address)
        self.pods.pop(pod.uid, None)
        log.info("stopped pod %s/%s", pod.namespace, pod.name)

    def confirm_deletion(self, pod: client.V1Pod) -> None:
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        except ApiException as error:
            if error.status != 404:
                raise

    # -- status and names -----------------------------------------------------------------

    def report(self, pod: Pod) -> None:
        running = [c for c in pod.containers if c.popen is not None]
        finished = pod.restart_policy != "Always" and all(c.exit_code is not None for c in pod.containers)
        succeeded = finished and all(c.exit_code == 0 for c in pod.containers)
        phase = "Running" if running else ("Succeeded" if succeeded else "Failed") if finished else "Pending"
        ready = "True" if pod.ready and running else "False"
        statuses = []
        for c in pod.containers:
            state = ({"running": {"startedAt": c.started_at}} if c.popen is not None else
                     {"terminated": {"exitCode": c.exit_code or 0, "reason": "Error" if c.exit_code else "Completed"}}
                     if c.exit_code is not None else {"waiting": {"reason": "ContainerCreating"}})  # fmt: skip
            statuses.append({"name": c.name, "ready": c.ready, "restartCount": c.restarts, "image": "local",
                             "imageID": "", "started": c.popen is not None, "state": state})  # fmt: skip
        status = {"phase": phase, "podIP": pod.address, "podIPs": [{"ip": pod.address}],
                  "hostIP": self.bridge.gateway, "containerStatuses": statuses,
                  "conditions": [{"type": kind, "status": value} for kind, value in
                                 (("PodScheduled", "True"), ("Initialized", "True"),
                                  ("ContainersReady", ready), ("Ready", ready))]}  # fmt: skip
        if status == pod.reported:
            return
        for condition in status["conditions"]:
            condition["lastTransitionTime"] = now()
        try:
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
            pod.reported = {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                                     for c in status["conditions"]]}  # fmt: skip
        except ApiException as error:
            if error.status != 404:
                log.warning("status of %s/%s: %s", pod.namespace, pod.name, error.reason)

    def write_hosts(self) -> None:
        """Service names -> a ready pod behind each Service, in every pod's /etc/hosts."""
        ready = [p for p in self.pods.values() if p.ready]
        lines = ["127.0.0.1 localhost"]
        for service in self.core.list_service_for_all_namespaces().items:
            selector = service.spec.selector or {}
            if not selector:
                continue
            behind = [p for p in ready if p.namespace == service.metadata.namespace
                      and all(p.labels.get(k) == v for k, v in selector.items())]  # fmt: skip
            if behind:
                name, namespace = service.metadata.name, service.metadata.namespace
                lines.append(f"{behind[0].address} {name}.{namespace}.svc.cluster.local {name}.{namespace}.svc "
                             f"{name}.{namespace} {name}")  # fmt: skip
        if self.clusterset is not None:
            lines += [f"{address} {name}" for name, address in sorted(self.clusterset.names().items())]
        text = "\n".join(lines) + "\n"
        for pod in self.pods.values():
            hosts = Path("/etc/netns") / pod.netns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            if not hosts.is_file() or hosts.read_text() != text:
                hosts.write_text(text)
            # No DNS server is reachable from a pod: names not in hosts fail at once, not after the
            # resolver's timeouts (http.server, for one, looks up its own name when it starts).
            resolv = hosts.with_name("resolv.conf")
            if not resolv.is_file():
                resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every pod: all asked at once, so their grace periods run side by side (one deadline)."""
        deadline = time.monotonic() + grace_s
        for pod in self.pods.values():
            for container in pod.containers:
                if container.popen is not None and container.popen.poll() is None:
                    os.killpg(container.popen.pid, signal.SIGTERM)
        for pod in list(self.pods.values()):
            self.stop_pod(pod, deadline=deadline)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True, help="an identity that may manage nodes and pods")
    parser.add_argument("--node", required=True, help="this node's name")
    parser.add_argument("--bridge", required=True, help="the pod network's bridge, e.g. bbc0")
    parser.add_argument("--prefix", required=True, help="the pod network's first three octets, e.g. 10.200.0")
    parser.add_argument("--api-port", type=int, required=True, help="the API server's port, as pods reach it")
    parser.add_argument("--ca-file", required=True, help="the cluster CA, for pods' kubeconfigs")
    parser.add_argument("--state-dir", required=True, help="pod logs and kubeconfigs")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between syncs")
    parser.add_argument("--clusterset", type=Path, help="a file of the cluster set's kubeconfigs, one per line "
                        "(read on every sync): their exported Services resolve as *.svc.clusterset.local")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = config.new_client_from_config(args.kubeconfig)
    bridge = Bridge(args.bridge, args.prefix)
    bridge.up()
    kubelet = Kubelet(api, args.node, bridge, Path(args.state_dir), f"https://{bridge.gateway}:{args.api_port}",
                      str(Path(args.ca_file).resolve()), args.clusterset)  # fmt: skip
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    kubelet.register()
    try:
        while not stop:
            began = time.monotonic()
            try:
                kubelet.sync()
            except (ApiException, OSError) as error:  # the API server restarting: try again next tick
                log.warning("sync failed: %s", error)
            if time.monotonic() - began > SLOW_SYNC_S:
                log.warning("a sync took %.1f s (pods' readiness is seen no faster)", time.monotonic() - began)
            time.sleep(args.interval)
    finally:
        kubelet.shutdown()


if __name__ == "__main__":
    main()
