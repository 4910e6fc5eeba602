"""Applying rendered objects to a cluster, and deleting them: the I/O half of the Kubernetes backend.

Server-side apply with the operator's field manager, so fields that others own (an HPA's
replicas, a mutating webhook's) are left alone and repeated applies are no-ops.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client, dynamic
from kubernetes.dynamic.exceptions import NotFoundError

FIELD_MANAGER = "bloombee-operator"


class Cluster:
    """One cluster's API, reached with a kubernetes ApiClient (in-cluster, kubeconfig, or a Secret's)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.dynamic = dynamic.DynamicClient(api)

    def _resource(self, obj: dict) -> dynamic.Resource:
        return self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])

    def apply(self, obj: dict) -> None:
        resource, namespace = self._resource(obj), obj["metadata"]["namespace"]
        try:
            resource.server_side_apply(body=obj, namespace=namespace, field_manager=FIELD_MANAGER, force_conflicts=True)
        except NotFoundError:
            # A real API server creates on apply; KMock (the test API server) answers 404 instead.
            resource.create(body=obj, namespace=namespace, field_manager=FIELD_MANAGER)

    def delete(self, obj: dict) -> bool:
        try:
            self._resource(obj).delete(name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"])
        except NotFoundError:
            return False
        return True

    def _live(self, obj: dict) -> Any | None:
        """The object as the API server has it now, or None."""
        try:
            return self._resource(obj).get(name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"])
        except NotFoundError:
            return None

    def exists(self, obj: dict) -> bool:
        return self._live(obj) is not None

    def ready_replicas(self, obj: dict) -> int:
        live = self._live(obj)
        status = (live.to_dict().get("status") or {}) if live is not None else {}
        return int(status.get("readyReplicas") or 0)
