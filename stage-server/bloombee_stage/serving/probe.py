"""Link measurement: round-trip time and bandwidth between two ends, as the planner needs them.

Every stage server and every probe pod answers ``/probe`` (``add_probe_routes``):

* ``GET /probe``             an empty echo: one round trip;
* ``GET /probe?bytes=N``     N bytes down (bandwidth towards the caller);
* ``POST /probe``            counts what it was sent (bandwidth away from the caller);
* ``POST /probe/measure``    ``{"targets": {"us": "http://..."}}``: measure from *here* to each
  target and answer ``{"links": [...]}``: how the operator learns a link between two clusters
  that it is part of neither end of. It asks the probe pod in one cluster (through that
  cluster's API server) to measure towards the probe pods of the others.

A link is reported in the shape of the resource's ``status.links``: ``from``, ``to``, ``rttMs``
(the median of the echo round trips, so one slow sample does not count), ``mbps`` (the bulk
transfers' bytes over their time less one round trip, the better of up and down) and
``measuredAt``. ``summarise`` is the pure part. Which links to measure, and through which
cluster, is the operator's business. The probe role's command line is ``bloombee_stage.probe``.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from bloombee_contract.paths import HEALTHZ_PATH, MEASURE_PATH, PROBE_PATH, READYZ_PATH
from bloombee_contract.tls import TlsFiles

from bloombee_stage.serving.process import peer_session

MAX_BULK_BYTES = 16 << 20  # what one measurement may move each way: enough to see 1 Gbit/s, not to flood
MAX_MEASURE_TARGETS = 32
PEER_TLS = web.AppKey("peer_tls", TlsFiles | None)
DEFAULT_ECHOES = 7
DEFAULT_BULK_BYTES = 4 << 20


class LinkMeasurementError(RuntimeError):
    """A link that could not be measured; the message names the link and why."""


@dataclass(frozen=True)
class Samples:
    """What one measurement of one link saw."""

    source: str
    target: str
    echo_s: tuple[float, ...]
    bulk_bytes: int
    bulk_s: tuple[float, ...]  # one per bulk transfer (down, up)


def summarise(samples: Samples, measured_at: str | None = None) -> dict:
    """One ``status.links`` entry from a link's samples (pure)."""
    if not samples.echo_s or not samples.bulk_s:
        raise LinkMeasurementError(f"link {samples.source} -> {samples.target}: no samples")
    rtt = statistics.median(samples.echo_s)
    # A transfer's time includes one round trip of request and first byte; what remains is the wire.
    wire = max(min(samples.bulk_s) - rtt, 1e-6)
    return {
        "from": samples.source,
        "to": samples.target,
        "rttMs": round(rtt * 1000, 3),
        "mbps": round(samples.bulk_bytes * 8 / wire / 1e6, 3),
        "measuredAt": measured_at or now(),
    }


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def sample_link(http: aiohttp.ClientSession, source: str, target: str, url: str,
                      echoes: int = DEFAULT_ECHOES, bulk_bytes: int = DEFAULT_BULK_BYTES) -> Samples:  # fmt: skip
    """Echo ``echoes`` times, then move ``bulk_bytes`` down and up, over one kept-alive connection."""
    probe = url.rstrip("/") + PROBE_PATH
    echo_s, bulk_s = [], []
    try:
        async with http.get(probe) as reply:  # opens the connection, so no sample pays for the handshake
            await reply.read()
        for _ in range(echoes):
            started = time.perf_counter()
            async with http.get(probe) as reply:
                reply.raise_for_status()
                await reply.read()
            echo_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        async with http.get(probe, params={"bytes": str(bulk_bytes)}) as reply:
            reply.raise_for_status()
            received = len(await reply.read())
        bulk_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        async with http.post(probe, data=bytes(bulk_bytes)) as reply:
            reply.raise_for_status()
            sent = (await reply.json())["received"]
        bulk_s.append(time.perf_counter() - started)
    except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as error:
        raise LinkMeasurementError(f"link {source} -> {target} ({probe}): {error or type(error).__name__}") from None
    if received != bulk_bytes or sent != bulk_bytes:
        raise LinkMeasurementError(f"link {source} -> {target}: moved {received}/{sent} of {bulk_bytes} bytes")
    return Samples(source, target, tuple(echo_s), bulk_bytes, tuple(bulk_s))


async def measure(source: str, targets: Mapping[str, str], echoes: int = DEFAULT_ECHOES,
                  bulk_bytes: int = DEFAULT_BULK_BYTES, timeout_s: float = 60.0,
                  tls: TlsFiles | None = None) -> list[dict]:  # fmt: skip
    """``status.links`` entries from ``source`` to every target (name -> probe base URL), one by
    one so the transfers do not share the source's uplink."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    entries = []
    async with peer_session(timeout, tls) as http:
        for target, url in targets.items():
            entries.append(summarise(await sample_link(http, source, target, url, echoes, bulk_bytes)))
    return entries


async def handle_probe(request: web.Request) -> web.Response:
    if request.method == "POST":
        received = len(await request.read())
        return web.json_response({"received": received})
    try:
        size = int(request.query.get("bytes", "0"))
    except ValueError:
        return web.json_response({"error": "bytes must be an integer"}, status=400)
    return web.Response(body=bytes(min(max(size, 0), MAX_BULK_BYTES)), content_type="application/octet-stream")


def _measure_request(body: object, tls: bool) -> tuple[str, dict[str, str], int, int]:
    """The measurement asked for; with ``tls`` only towards servers of the deployment (https: the
    handshake proves it), and never more than a few targets or ``MAX_BULK_BYTES`` each way."""
    if not isinstance(body, dict) or not isinstance(body.get("targets"), dict) or not body["targets"]:
        raise ValueError('expected {"source": "eu", "targets": {"us": "http://host:port"}, ...}')
    targets = body["targets"]
    scheme = "https://" if tls else "http"
    if not all(isinstance(k, str) and isinstance(v, str) and v.startswith(scheme) for k, v in targets.items()):
        raise ValueError(f"targets must map cluster names to {'https' if tls else 'http(s)'} URLs")
    if len(targets) > MAX_MEASURE_TARGETS:
        raise ValueError(f"at most {MAX_MEASURE_TARGETS} targets per request")
    echoes, bulk = body.get("echoes", DEFAULT_ECHOES), body.get("bulkBytes", DEFAULT_BULK_BYTES)
    if not (isinstance(echoes, int) and 1 <= echoes <= 100 and isinstance(bulk, int)
            and 1 <= bulk <= MAX_BULK_BYTES):  # fmt: skip
        raise ValueError(f"echoes must lie in 1..100 and bulkBytes in 1..{MAX_BULK_BYTES}")
    return str(body.get("source", "here")), targets, echoes, bulk


async def handle_measure(request: web.Request) -> web.Response:
    try:
        source, targets, echoes, bulk = _measure_request(await request.json(), request.app[PEER_TLS] is not None)
    except (ValueError, json.JSONDecodeError) as error:
        return web.json_response({"error": str(error)}, status=400)
    try:
        links = await measure(source, targets, echoes, bulk, tls=request.app[PEER_TLS])
    except LinkMeasurementError as error:
        return web.json_response({"error": str(error)}, status=502)
    return web.json_response({"links": links})


def add_probe_routes(app: web.Application, tls: TlsFiles | None = None) -> None:
    """The probe routes; ``tls``: how measurements from here call the other ends."""
    app[PEER_TLS] = tls
    app.router.add_route("*", PROBE_PATH, handle_probe)
    app.router.add_post(MEASURE_PATH, handle_measure)


def probe_app(tls: TlsFiles | None = None) -> web.Application:
    """The probe pod: nothing but the probe routes and a health check."""
    app = web.Application(client_max_size=MAX_BULK_BYTES + 1024)
    add_probe_routes(app, tls)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get(HEALTHZ_PATH, healthz)
    app.router.add_get(READYZ_PATH, healthz)
    return app
