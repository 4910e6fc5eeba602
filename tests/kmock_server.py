"""KMock (the Kubernetes API mock server by kopf's author) on loopback, in a thread of its own.

The operator under test runs in kopf's own thread (KopfRunner) and talks to it over HTTP like
to any API server; the test reads and writes objects with the kubernetes client.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import kmock
import yaml

DISTRIBUTEDLLMS = "bloombee.ai/v1alpha1/distributedllms"
# The Multi-Cluster Services API, as a cluster that exports Services across a cluster set has it.
SERVICEEXPORTS = "multicluster.x-k8s.io/v1alpha1/serviceexports"


class KMockThread:
    def __init__(self) -> None:
        self.url = ""
        self.handler: kmock.KubernetesEmulator | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler, host="127.0.0.1") as server:
            handler.resources.load_bundled()  # the built-in kinds (Deployments, Services, Events, ...)
            handler.resources[DISTRIBUTEDLLMS] = {"kind": "DistributedLLM", "singular": "distributedllm",
                                                  "namespaced": True, "subresources": ["status"],
                                                  "verbs": ["get", "list", "watch", "create", "update", "patch",
                                                            "delete"]}  # fmt: skip
            verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
            handler.resources[SERVICEEXPORTS] = {"kind": "ServiceExport", "singular": "serviceexport",
                                                 "namespaced": True, "verbs": verbs}  # fmt: skip
            self.handler, self.url = handler, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> KMockThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("KMock did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": "llm"}}],
        }))  # fmt: skip
        return path
