"""The cluster set's DNS names: the Multi-Cluster Services API's ``clusterset.local`` zone.

Clusters of one set (``scripts/cluster.sh up --clusters N``) export Services with a
``ServiceExport``; every exported Service with a ready endpoint resolves, in every member, as
``<name>.<namespace>.svc.clusterset.local`` to that endpoint's address (from its EndpointSlices).
What a multi-cluster controller (Submariner's Lighthouse, GKE's MCS) does in a cloud is done here by
reading every member's API server:

* ``ClusterSet.names()`` -- the names and addresses, read from the members' kubeconfigs (a file of
  paths, one per line, read again on every call);
* ``python scripts/clusterset.py --members FILE --hosts OUT [--hosts OUT ...]`` -- keeps hosts files
  (``ADDRESS NAME`` lines) up to date, every ``--interval`` seconds until SIGTERM, for the CoreDNS
  of each real node (its ``hosts`` plugin serves the ``clusterset.local`` zone from the file).

Addresses are pod addresses, reachable across the clusters' pod networks through the delay router
(``scripts/pod_wan.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger("clusterset")
ZONE = "svc.clusterset.local"


class ClusterSet:
    """The exported Services of a set of clusters, by their ``clusterset.local`` names."""

    def __init__(self, members_file: Path) -> None:
        self.members_file = members_file
        self.clients: dict[str, client.ApiClient] = {}

    def members(self) -> list[client.ApiClient]:
        if not self.members_file.is_file():
            return []
        for path in self.members_file.read_text().split():
            if path not in self.clients and Path(path).is_file():
                self.clients[path] = config.new_client_from_config(path)
        return list(self.clients.values())

    def names(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for api in self.members():
            try:
                exports = client.CustomObjectsApi(api).list_cluster_custom_object(
                    "multicluster.x-k8s.io", "v1alpha1", "serviceexports", _request_timeout=5)["items"]  # fmt: skip
                slices = client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces(_request_timeout=5).items
            except (ApiException, OSError) as error:  # a member that is down, or without the CRD
                log.debug("cluster set member skipped: %s", error)
                continue
            ready: dict[tuple[str, str], str] = {}
            for endpoint_slice in slices:
                service = (endpoint_slice.metadata.labels or {}).get("kubernetes.io/service-name")
                for endpoint in endpoint_slice.endpoints or []:
                    if service and endpoint.addresses and (endpoint.conditions is None or endpoint.conditions.ready):
                        ready.setdefault((endpoint_slice.metadata.namespace, service), endpoint.addresses[0])
            for export in exports:
                key = (export["metadata"]["namespace"], export["metadata"]["name"])
                if key in ready:
                    found.setdefault(f"{key[1]}.{key[0]}.{ZONE}", ready[key])
        return found


def hosts_text(names: dict[str, str]) -> str:
    return "".join(f"{address} {name}\n" for name, address in sorted(names.items()))


def write_if_changed(path: Path, text: str) -> bool:
    """Replace ``path`` in one step (a reader never sees half a file); False when it already said so."""
    if path.is_file() and path.read_text() == text:
        return False
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=Path, required=True, help="the members' kubeconfig paths, one per line")
    parser.add_argument("--hosts", type=Path, action="append", required=True, help="a hosts file to keep (repeat)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads of the members")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    members = ClusterSet(args.members)
    log.info("keeping %s for the members in %s", ", ".join(map(str, args.hosts)), args.members)
    while not stopping:  # until SIGTERM
        text = hosts_text(members.names())
        if any([write_if_changed(path, text) for path in args.hosts]):
            log.info("%d name(s): %s", text.count("\n"), " ".join(line.split()[1] for line in text.splitlines()))
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
