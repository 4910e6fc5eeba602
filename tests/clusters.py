"""Real Kubernetes control planes for tests (``scripts/cluster.sh``), and the waits around them."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "bloombee.ai", "v1alpha1", "distributedllms"
T = TypeVar("T")


@contextmanager
def control_planes(name: str, count: int = 1, delay_ms: float | None = None,
                   nodes: str = "none") -> Iterator[list[Path]]:  # fmt: skip
    """``count`` clusters of our own (NAME, or NAME0, NAME1, ...): their admin kubeconfigs. ``nodes``:
    ``none`` (the control plane alone: pods stay Pending), or ``real`` (a node each: a kubelet with
    containerd, kube-proxy, CoreDNS, the scheduler; root only)."""
    command = ["bash", "scripts/cluster.sh", "up", "--name", name, "--clusters", str(count), "--nodes", nodes]
    if delay_ms is not None:
        command += ["--delay-ms", str(delay_ms)]
    started = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    names = [name] if count == 1 else [f"{name}{i}" for i in range(count)]
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        yield [ROOT / ".cluster" / each / "kubeconfig" for each in names]
    finally:  # one `down` for all: it stops them side by side
        subprocess.run(["bash", "scripts/cluster.sh", "down", *(arg for each in names for arg in ("--name", each))],
                       cwd=ROOT, capture_output=True, timeout=240)  # fmt: skip


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("real nodes need root: network namespaces, cgroups, mounts (as on the project's machines)")


def settings(kubeconfig: Path) -> dict[str, str]:
    """The cluster's ``cluster.env``: API_SERVER, POD_PREFIX, BRIDGE, ..."""
    return dict(line.split("=", 1) for line in (kubeconfig.parent / "cluster.env").read_text().split())


@functools.cache
def _pushed_images(registry: str) -> tuple[tuple[str, str], ...]:
    built = subprocess.run(["bash", "scripts/images.sh", "build", "--push", registry], cwd=ROOT, capture_output=True,
                           text=True, timeout=3000)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    pushed = dict(re.findall(rf"^{re.escape(registry)}/bloombee/(\w+)@(sha256:[0-9a-f]{{64}})$", built.stdout, re.M))
    assert set(pushed) == {"operator", "stage"}, built.stdout
    return tuple((name, f"{registry}/bloombee/{name}@{digest}") for name, digest in sorted(pushed.items()))


def registry_images(kubeconfig: Path) -> dict[str, str]:
    """Both images built from the Dockerfiles and pushed to the registry of a cluster with real nodes
    (once per test session): name -> repo@digest."""
    return dict(_pushed_images(settings(kubeconfig)["REGISTRY"]))


def image_values(images: dict[str, str]) -> list[str]:
    """The chart's values that name both images by digest."""
    (operator, operator_digest), (stage, stage_digest) = (images[name].split("@") for name in ("operator", "stage"))
    return ["--set", f"operator.image.repository={operator}", "--set", f"operator.image.digest={operator_digest}",
            "--set", f"stageImage.repository={stage}", "--set", f"stageImage.digest={stage_digest}"]  # fmt: skip


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 90.0, interval_s: float = 0.5) -> T:
    """Poll ``check`` until it returns something true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded polling
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def install_crd(api) -> None:
    """The DistributedLLM CRD, created and Established."""
    from kubernetes import client

    crd = yaml.safe_load((ROOT / "crds" / "distributedllm.yaml").read_text())
    extensions = client.ApiextensionsV1Api(api)
    try:
        extensions.create_custom_resource_definition(crd)
    except client.ApiException as error:
        if error.status != 409:
            raise

    def established() -> bool:
        served = extensions.read_custom_resource_definition(crd["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in served.status.conditions or [])

    wait_for("the CRD to be Established", established, timeout_s=60)


def helm_binary() -> str:
    """helm from the binary cache (``scripts/cluster.sh helm`` puts it there)."""
    found = subprocess.run(["bash", "scripts/cluster.sh", "helm"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    return found.stdout.strip().splitlines()[-1]


def kubectl_path(kubeconfig: Path) -> str:
    """kubectl from the binary cache (``scripts/cluster.sh up --nodes real`` builds it)."""
    return str(Path(settings(kubeconfig)["BIN_DIR"]) / "kubectl")


def kubectl(kubeconfig: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """kubectl run to the end, as users run it."""
    return subprocess.run([kubectl_path(kubeconfig), *args], cwd=ROOT,
                          env={**os.environ, "KUBECONFIG": str(kubeconfig)}, capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip


def helm(kubeconfig: Path, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], cwd=ROOT, env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                          capture_output=True, text=True, timeout=timeout_s)  # fmt: skip


def get_resource(api, namespace: str, name: str) -> dict | None:
    from kubernetes import client

    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def create_namespace(api, name: str) -> None:
    from kubernetes import client

    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    except client.ApiException as error:
        if error.status != 409:
            raise


def ready_pod_ip(api, namespace: str, selector: str) -> str | None:
    from kubernetes import client

    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    ready = [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
    return ready[0].status.pod_ip if ready else None
