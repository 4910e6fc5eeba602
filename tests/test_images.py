"""The images themselves (scripts/images.sh builds them; install.sh --test runs it): run with podman
and runc as a kubelet would run them, on a read-only root filesystem as user 10001.

The stage image serves a real pipeline: two stage containers and a gateway container, the model
baked into the image and converted into a writable cache volume (the chart's emptyDir), answer a
chat with transformers' greedy tokens; the image's own HEALTHCHECK passes. The operator image
holds no torch and runs kopf against a real kube-apiserver until its liveness probe answers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bloombee_contract.launch import GatewayLaunch, StageLaunch
from pipelines import SMOLLM2
from test_pipeline_smollm2 import chat_request, reference_tokens

ROOT = Path(__file__).resolve().parent.parent
OPERATOR, STAGE = subprocess.run(["bash", str(ROOT / "scripts/images.sh"), "names"], capture_output=True, text=True,
                                 check=True).stdout.split()  # fmt: skip
USER = "10001"


def _limits() -> list[str]:
    """What scripts/images.sh gives every container here: limits below the host's hard ones."""
    import resource

    files = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    processes = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 65536) // 2
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", f"nproc={processes}:{processes}"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, container: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                return
        state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state not in ("running", "created"):
            raise AssertionError(f"{container} is {state}: {podman('logs', container, check=False).stderr[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"{url} not ready in {timeout:.0f} s: {podman('logs', container, check=False).stderr[-3000:]}")


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Containers a test started; all removed at the end."""
    started: list[str] = []
    yield started
    for name in started:
        podman("rm", "--force", "--time", "5", name, check=False)


def run_container(started: list[str], name: str, image: str, command: list[str], *options: str) -> str:
    """A container as a pod runs it: detached, host network (the test's loopback), read-only root
    filesystem, non-root, the image's own health check kept."""
    podman("rm", "--force", name, check=False)
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", *_limits(), *options, image,
           *command)  # fmt: skip
    started.append(name)
    return name


@pytest.mark.model
def test_the_stage_image_serves_a_pipeline_as_a_non_root_user_on_a_read_only_root(tmp_path, containers,
                                                                                  smollm2_reference):  # fmt: skip
    size = int(podman("image", "inspect", "--format", "{{.Size}}", STAGE).stdout)
    (inspected,) = json.loads(podman("image", "inspect", STAGE).stdout)
    assert inspected["Config"]["User"] == USER and inspected["Healthcheck"]["Test"], inspected["Config"]
    cache = tmp_path / "cache"  # the chart's emptyDir for converted models
    cache.mkdir()
    shutil.chown(cache, int(USER), int(USER))
    volume = ["--volume", f"{cache}:/var/cache/bloombee"]
    ports = [8080, _free_port()]  # stage 0 on the port the image's HEALTHCHECK asks
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for index, (layers, port) in enumerate(zip([(0, 15), (15, 30)], ports, strict=True)):
        launch = StageLaunch(model=SMOLLM2, layers=layers, port=port, name=f"stage-{index}", threads=1)
        name = run_container(containers, f"bloombee-test-stage-{index}", STAGE, launch.command(), *volume)
        _wait_for(urls[index] + "/readyz", name)
    whoami = podman("exec", "bloombee-test-stage-0", "id", "-u").stdout.strip()
    assert whoami == USER
    write = podman("exec", "bloombee-test-stage-0", "touch", "/usr/local/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert podman("healthcheck", "run", "bloombee-test-stage-0", check=False).returncode == 0

    gateway_port = _free_port()
    gateway = GatewayLaunch(model=SMOLLM2, stages=tuple((url,) for url in urls), served_model_name="smollm2",
                            port=gateway_port)  # fmt: skip
    name = run_container(containers, "bloombee-test-gateway", STAGE, gateway.command(), *volume)
    endpoint = f"http://127.0.0.1:{gateway_port}"
    _wait_for(endpoint + "/health", name)
    body = json.dumps(chat_request("What is the capital of France?", max_tokens=16)).encode()
    request = urllib.request.Request(endpoint + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=300) as reply:
        answer = json.loads(reply.read())
    assert answer["choices"][0]["token_ids"] == reference_tokens(smollm2_reference, answer["prompt_token_ids"], 16)
    print(f"stage image {size / 1e6:.0f} MB")


def test_the_operator_image_holds_no_torch_and_its_liveness_probe_answers(tmp_path, real_cluster, real_api,
                                                                          containers):  # fmt: skip
    size = int(podman("image", "inspect", "--format", "{{.Size}}", OPERATOR).stdout)
    (inspected,) = json.loads(podman("image", "inspect", OPERATOR).stdout)
    assert inspected["Config"]["User"] == USER and inspected["Healthcheck"]["Test"], inspected["Config"]
    probe = "import importlib.util as u, bloombee_operator.handlers; print(u.find_spec('torch') is None)"
    done = podman("run", "--rm", "--read-only", *_limits(), "--entrypoint", "python", OPERATOR, "-c", probe)
    assert done.stdout.strip() == "True", done.stderr
    # kopf's liveness endpoint answers once it runs against the API server (the image's entrypoint;
    # its health check asks port 8080).
    readable = tmp_path / "kubeconfig"  # the admin kubeconfig, readable by the image's user
    shutil.copy(real_cluster, readable)
    readable.chmod(0o644)
    kubeconfig = ["--volume", f"{readable}:/kubeconfig:ro", "--env", "KUBECONFIG=/kubeconfig"]
    name = run_container(containers, "bloombee-test-operator", OPERATOR, [], *kubeconfig)
    _wait_for("http://127.0.0.1:8080/healthz", name, timeout=120)
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    print(f"operator image {size / 1e6:.0f} MB")


def test_an_image_pushed_to_a_registry_is_pulled_by_its_digest(tmp_path):
    """A local OCI registry (the distribution registry from Debian's packages) takes the operator
    image from ``images.sh push``, and a pull by the digest it printed gives the same image."""
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'blobs'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")  # fmt: skip
    registry = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and registry.poll() is None, "the registry did not start"
                time.sleep(0.2)
        pushed = subprocess.run(["bash", str(ROOT / "scripts/images.sh"), "push", f"127.0.0.1:{port}", "operator"],
                                capture_output=True, text=True, timeout=600, check=True).stdout.split()  # fmt: skip
        (reference,) = pushed
        assert reference.startswith(f"127.0.0.1:{port}/bloombee/operator@sha256:")
        podman("pull", "--quiet", "--tls-verify=false", reference, timeout=300)
        local = podman("image", "inspect", "--format", "{{.Id}}", OPERATOR).stdout.strip()
        assert podman("image", "inspect", "--format", "{{.Id}}", reference).stdout.strip() == local
        podman("rmi", reference, check=False)
    finally:
        registry.terminate()
        registry.wait(timeout=10)
