"""Each deployment's CA and its parts' certificates, kept as Secrets: the minting half of TLS on
Kubernetes (``objects.render(tls=True)`` mounts them; ``bloombee_contract.tls`` reads them).

The CA lives in ``<resource>-ca`` in the operator's cluster, owned by the resource (the garbage
collector removes it with the resource); every stage, gateway and probe gets ``<child>-tls`` in
its own cluster: the CA certificate, its certificate for the names its Service is dialled by, its
key, and for probes the measure key that signs requests relayed by an API server. A Secret that
exists is minted again only when its certificate has less than a third of its lifetime left
(``pki.due_for_renewal``): the kubelet updates the mounted files and the part loads them without
a restart, so a renewal drops no generation.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from bloombee_contract.tls import CA_FILE, CERT_FILE, KEY_FILE, MEASURE_KEY_FILE

from bloombee_operator.backends.kubernetes.objects import Owner, labels, tls_secret_name
from bloombee_operator.pki import Identity, due_for_renewal, issue, new_ca


def ca_secret_name(resource: str) -> str:
    return f"{resource}-ca"


def secret_body(name: str, namespace: str, owner: Owner | None, object_labels: dict[str, str],
                files: dict[str, bytes]) -> dict[str, Any]:  # fmt: skip
    """A Secret holding ``files``. Pure."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": object_labels}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "data": {key: base64.b64encode(value).decode() for key, value in files.items()}}  # fmt: skip


class DeploymentSecrets:
    """The CA of one resource and the TLS Secrets of its children, made on first need."""

    def __init__(self, resource: str, namespace: str, owner: Owner) -> None:
        self.resource, self.namespace, self.owner = resource, namespace, owner
        self._ca: tuple[Identity, bytes] | None = None

    def ca(self, local: Any) -> tuple[Identity, bytes]:
        """The CA and the measure key, read from ``<resource>-ca`` in ``local`` or made there."""
        if self._ca is None:
            name = ca_secret_name(self.resource)
            stored = local.secret_data(name, self.namespace)
            if stored is None or not {CA_FILE, KEY_FILE, MEASURE_KEY_FILE} <= set(stored):
                ca = new_ca(f"{self.namespace}/{self.resource}")
                stored = {CA_FILE: ca.cert, KEY_FILE: ca.key, MEASURE_KEY_FILE: secrets.token_hex(32).encode()}
                local.apply(secret_body(name, self.namespace, self.owner, labels(self.resource, "ca"), stored))
            self._ca = (Identity(stored[CA_FILE], stored[KEY_FILE]), stored[MEASURE_KEY_FILE])
        return self._ca

    def ensure(self, local: Any, cluster: Any, child: str, component: str, hosts: list[str],
               owned: bool) -> bool:  # fmt: skip
        """``<child>-tls`` in ``cluster``, minted unless it is there and not due for renewal; whether
        it was minted."""
        name = tls_secret_name(child)
        stored = cluster.secret_data(name, self.namespace)
        if stored is not None and not due_for_renewal(stored.get(CERT_FILE, b"")):
            return False
        ca, measure_key = self.ca(local)
        part = issue(ca, f"{component}/{child}", hosts)
        files = {CA_FILE: ca.cert, CERT_FILE: part.cert, KEY_FILE: part.key}
        if component in ("probe", "stage"):  # what the operator asks through a service proxy, signed
            files[MEASURE_KEY_FILE] = measure_key
        cluster.apply(secret_body(name, self.namespace, self.owner if owned else None,
                                  labels(self.resource, component), files))  # fmt: skip
        return True

    def measure_key(self, local: Any) -> bytes:
        return self.ca(local)[1]
