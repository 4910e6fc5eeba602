"""A WAN between the pod networks of clusters on one machine: real packet delay through a router.

This kernel has no ``netem`` qdisc, so the delay is added in user space. Each cluster's pod
network is a ``/24`` (``scripts/cluster.sh``) whose packets reach this machine's root namespace on
one interface (for a real node, ``scripts/k8s/node.sh``, the veth to the node's namespace). This
joins them through one router namespace, ``bbwan-<name>``: every packet from one cluster to another
(pods, and the API server) leaves the root namespace for the router, where a TUN device hands it to
this process; it is held for the one-way delay and written back, and the router delivers it to the
other network. Handshakes, ACKs and retransmissions are delayed alike, which a delaying TCP proxy
cannot do. Traffic inside one cluster is untouched.

Addresses, for a pod network ``10.X.0.0/24`` arriving on interface ``I``, with the API server on
``A`` (``10.X.2.1`` for a real node; ``10.X.0.1`` if not given):

* a veth pair ``bbwX`` (root, ``10.X.1.1/30``) -- ``wX`` (router, ``10.X.1.2/30``);
* in the root namespace, routing table ``1000+X`` sends to the router, chosen by two rules for
  each other cluster's destinations (its ``/24`` and its API server): packets arriving from ``I``
  (the pods), and packets the machine itself sends from ``A`` (the API server answering a pod of
  another cluster);
* in the router, everything arriving on a ``w*`` link goes to ``tun0``, and what comes back out of
  ``tun0`` is routed by the destination to its cluster's link.

    python scripts/pod_wan.py up --name c --delay-ms 25 --network bbh200=10.200.0@10.200.2.1 \\
        --network bbh201=10.201.0@10.201.2.1
    python scripts/pod_wan.py down --name c --network bbh200=10.200.0@10.200.2.1 --network bbh201=10.201.0@10.201.2.1

``up`` builds the router and then runs the delay loop in the foreground until SIGTERM, when it
takes everything down again; ``down`` removes what a killed ``up`` left behind. Needs root.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import logging
import os
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger("pod-wan")
TUN_SET_IFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
ROUTER_TABLE = 101
RULE_PREF = 50  # before the local table's rule, which moves from 0 to LOCAL_PREF while a router runs
LOCAL_PREF = 100
MAX_PACKET = 65535
MAX_QUEUED = 200_000  # packets held at once; beyond it the router drops, as a full queue would


@dataclass(frozen=True)
class PodNetwork:
    ingress: str  # the interface its packets reach the root namespace on
    prefix: str  # first three octets: 10.X.0
    api: str  # the cluster's API server address

    @classmethod
    def parse(cls, text: str) -> PodNetwork:
        ingress, _, rest = text.partition("=")
        prefix, _, api = rest.partition("@")
        octets = prefix.split(".")
        if not ingress or len(octets) != 3 or octets[0] != "10" or octets[2] != "0":
            raise argparse.ArgumentTypeError(f"--network {text!r}: expected INTERFACE=10.X.0[@API_ADDRESS]")
        api = api or f"{prefix}.1"
        if not api.startswith(f"10.{octets[1]}."):
            raise argparse.ArgumentTypeError(f"--network {text!r}: the API server must be in 10.{octets[1]}/16")
        return cls(ingress, prefix, api)

    @property
    def x(self) -> int:
        return int(self.prefix.split(".")[1])

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.0/24"

    @property
    def destinations(self) -> list[str]:
        """What other clusters reach of it through the router: the pods, and the API server."""
        return [self.cidr] if self.api.startswith(f"{self.prefix}.") else [self.cidr, f"{self.api}/32"]

    @property
    def table(self) -> int:
        return 1000 + self.x


def sh(*command: str, check: bool = True) -> None:
    subprocess.run(command, check=check, capture_output=True, text=True)


def sysctl(namespace: str | None, key: str, value: str) -> None:
    prefix = ("ip", "netns", "exec", namespace) if namespace else ()
    sh(*prefix, "sysctl", "-qw", f"{key}={value}")


def local_rule_prefs() -> set[int]:
    rules = json.loads(subprocess.run(["ip", "-j", "rule", "show"], capture_output=True, text=True, check=True).stdout)
    return {rule["priority"] for rule in rules if rule.get("table") == "local"}


def local_table_after_rules() -> None:
    """Let our rules see packets for the other cluster's API server before the local table
    delivers them in place (its address is on this machine): the local rule moves from 0 to 100.
    Early demux goes too: it would tie a pod's packet to the API server's socket before routing,
    and the kernel drops a packet with a socket that routing then forwards (ip_forward)."""
    sysctl(None, "net.ipv4.ip_early_demux", "0")
    if LOCAL_PREF not in local_rule_prefs():
        sh("ip", "rule", "add", "pref", str(LOCAL_PREF), "lookup", "local")
    if 0 in local_rule_prefs():
        sh("ip", "rule", "del", "pref", "0", "lookup", "local")


def local_table_first() -> None:
    """Put the local table's rule back at 0, and early demux on, when no router is left."""
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)
    if any(link["ifname"].startswith("bbw") for link in links):
        return
    if 0 not in local_rule_prefs():
        sh("ip", "rule", "add", "pref", "0", "lookup", "local")
    if LOCAL_PREF in local_rule_prefs():
        sh("ip", "rule", "del", "pref", str(LOCAL_PREF), "lookup", "local")
    sysctl(None, "net.ipv4.ip_early_demux", "1")


def build(router: str, networks: list[PodNetwork]) -> None:
    local_table_after_rules()
    sh("ip", "netns", "add", router)
    sh("ip", "-n", router, "link", "set", "lo", "up")
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        sysctl(router, *key.split("="))
    sysctl(None, "net.ipv4.ip_forward", "1")
    for net in networks:
        outside, inside = f"bbw{net.x}", f"w{net.x}"
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", router)
        sh("ip", "addr", "add", f"10.{net.x}.1.1/30", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        # The other cluster's API server answers from an address of this machine: accept it back.
        sysctl(None, f"net.ipv4.conf.{outside}.accept_local", "1")
        sysctl(None, f"net.ipv4.conf.{outside}.rp_filter", "0")
        sh("ip", "-n", router, "addr", "add", f"10.{net.x}.1.2/30", "dev", inside)
        sh("ip", "-n", router, "link", "set", inside, "up")
        for destination in net.destinations:
            sh("ip", "-n", router, "route", "add", destination, "via", f"10.{net.x}.1.1", "dev", inside)
        sh("ip", "-n", router, "rule", "add", "iif", inside, "lookup", str(ROUTER_TABLE))
        sh("ip", "route", "replace", "default", "via", f"10.{net.x}.1.2", "dev", outside, "table", str(net.table))
        for other in networks:
            for destination in other.destinations if other != net else ():
                for match in (("iif", net.ingress), ("iif", "lo", "from", net.api)):
                    sh("ip", "rule", "add", "pref", str(RULE_PREF), *match, "to", destination,
                       "lookup", str(net.table))  # fmt: skip


def teardown(router: str, networks: list[PodNetwork]) -> None:
    for net in networks:
        for _ in range(8 * len(networks)):  # bounded: at most four rules per other network
            if subprocess.run(["ip", "rule", "del", "lookup", str(net.table)], capture_output=True).returncode:
                break
        sh("ip", "route", "flush", "table", str(net.table), check=False)
        sh("ip", "link", "del", f"bbw{net.x}", check=False)
    sh("ip", "netns", "del", router, check=False)
    local_table_first()


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUN_SET_IFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return fd


def delay_loop(tun: int, delay_s: float, stopping: list[bool]) -> None:
    """Hold every packet read from ``tun`` for ``delay_s``, then write it back, in order."""
    held: list[tuple[float, int, bytes]] = []
    sequence = dropped = 0
    while not stopping:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, packet = heapq.heappop(held)
            try:
                os.write(tun, packet)
            except BlockingIOError:  # the device's queue is full: the packet is lost, TCP resends it
                dropped += 1
        timeout = max(0.0, held[0][0] - now) if held else 0.5
        try:
            readable, _, _ = select.select([tun], [], [], timeout)
        except InterruptedError:
            continue
        if not readable:
            continue
        arrived = time.monotonic()
        for _ in range(256):  # drain what is waiting, a bounded batch
            try:
                packet = os.read(tun, MAX_PACKET)
            except BlockingIOError:
                break
            if len(held) >= MAX_QUEUED:
                dropped += 1
                continue
            sequence += 1
            heapq.heappush(held, (arrived + delay_s, sequence, packet))
    log.info("stopped after %d packets (%d dropped)", sequence, dropped)


def enter_namespace(fd: int) -> None:
    """setns(2) for this process (``os.setns`` is Python 3.12+)."""
    clone_newnet = 0x40000000
    if ctypes.CDLL(None, use_errno=True).setns(fd, clone_newnet) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def router_name(name: str) -> str:
    return f"bbwan-{name}"[:15]


def up(name: str, delay_ms: float, networks: list[PodNetwork]) -> None:
    router = router_name(name)
    teardown(router, networks)  # what a killed run left
    stopping: list[bool] = []
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    try:
        build(router, networks)
        # The TUN device must live in the router namespace: enter it for this process.
        with open(f"/run/netns/{router}") as namespace:
            enter_namespace(namespace.fileno())
        tun = open_tun("tun0")
        sh("ip", "link", "set", "tun0", "up", "txqueuelen", "10000")
        sysctl(None, "net.ipv4.conf.tun0.rp_filter", "0")
        sysctl(None, "net.ipv4.conf.tun0.accept_local", "1")
        sh("ip", "route", "replace", "default", "dev", "tun0", "table", str(ROUTER_TABLE))
        joined = ", ".join("+".join(n.destinations) for n in networks)
        log.info("router %s joins %s with %.1f ms one way", router, joined, delay_ms)
        delay_loop(tun, delay_ms / 1000.0, stopping)
    finally:
        enter_namespace(home)
        teardown(router, networks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--name", required=True, help="the router's name (its namespace is bbwan-NAME)")
    parser.add_argument("--network", type=PodNetwork.parse, action="append", required=True,
                        help="a cluster's pod network, INTERFACE=10.X.0[@API_ADDRESS] (two or more): "
                        "INTERFACE: where its packets arrive; API_ADDRESS (10.X.0.1 if left out): its API")  # fmt: skip
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay between networks")
    args = parser.parse_args(argv)
    if args.command == "up" and len(args.network) < 2:
        parser.error("up needs at least two --network")
    if args.delay_ms < 0:
        parser.error("--delay-ms must not be negative")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "up":
        up(args.name, args.delay_ms, args.network)
    else:
        teardown(router_name(args.name), args.network)


if __name__ == "__main__":
    main()
