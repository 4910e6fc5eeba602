"""A userspace TCP proxy that delays every byte by a fixed time each way: a WAN link on loopback.

``bloombee up --link-delay-ms 25`` puts one in front of every stage and of the gateway's result
endpoint, so each hop of the pipeline costs what a far-apart link would. Data is forwarded in the
order it was read, each chunk released ``delay`` after it arrived, so the link's latency is
added without limiting its bandwidth (a packet-level delayer in a network namespace is the
other way, see DESIGN.md; this one needs no privileges).

    python -m bloombee_operator.backends.link_delay --to http://127.0.0.1:8001 --delay-ms 25
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("bloombee.link_delay")
CHUNK = 1 << 16


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy source to sink, each chunk leaving ``delay_s`` after it was read; EOF travels delayed too."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    if sink.can_write_eof():
                        sink.write_eof()
                return
            sink.write(data)
            await sink.drain()

    releaser = asyncio.create_task(release())
    try:
        while True:
            data = await source.read(CHUNK)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                break
        await releaser
    finally:
        releaser.cancel()


class LinkDelay:
    """Accepts connections and joins each to a new connection upstream, delayed both ways."""

    def __init__(self, delay_s: float, upstream: str | None = None, upstream_ready_file: Path | None = None) -> None:
        if (upstream is None) == (upstream_ready_file is None):
            raise ValueError("give exactly one of upstream and upstream_ready_file")
        self.delay_s = delay_s
        self.upstream = upstream
        self.upstream_ready_file = upstream_ready_file
        self.connections = 0

    def target(self) -> tuple[str, int]:
        """Host and port upstream; a ready file is read at each connection (its server may start after us)."""
        announced = {} if self.upstream else json.loads(Path(self.upstream_ready_file).read_text())
        url = self.upstream or announced.get("peer_url") or announced["url"]
        parts = urlsplit(url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            host, port = self.target()
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except (OSError, ValueError, KeyError) as error:
            log.warning("cannot reach upstream: %s", error)
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer, self.delay_s), _pump(up_reader, writer, self.delay_s))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The proxy is stopping. Ending the connection's task quietly: Python 3.11's start_server
            # asks a cancelled handler task for its exception and logs the CancelledError as an ERROR.
            return
        finally:
            for stream in (writer, up_writer):
                stream.close()


async def serve(proxy: LinkDelay, host: str, port: int, ready_file: str | None, scheme: str) -> None:
    server = await asyncio.start_server(proxy.handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    url = f"{scheme}://{host}:{bound}"  # bytes pass through: TLS, if upstream speaks it, is end to end
    log.info("delaying %.1f ms each way on %s -> %s", proxy.delay_s * 1000, url,
             proxy.upstream or proxy.upstream_ready_file)  # fmt: skip
    if ready_file:
        scratch = Path(ready_file + ".tmp")
        scratch.write_text(json.dumps({"url": url, "port": bound, "pid": os.getpid()}))
        os.replace(scratch, ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bloombee_operator.backends.link_delay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="upstream base URL, e.g. http://127.0.0.1:8001")
    target.add_argument("--to-ready-file", help="read the upstream URL from this ready file at each connection")
    parser.add_argument("--delay-ms", type=float, required=True, help="added latency each way, milliseconds")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", default=None)
    parser.add_argument("--scheme", choices=("http", "https"), default=None,
                        help="of the URL announced (default: that of --to; http with --to-ready-file)")
    args = parser.parse_args(argv)
    scheme = args.scheme or (urlsplit(args.to).scheme if args.to else "http")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ready = Path(args.to_ready_file) if args.to_ready_file else None
    started = time.monotonic()
    asyncio.run(serve(LinkDelay(args.delay_ms / 1000, args.to, ready), args.host, args.port, args.ready_file,
                      scheme))
    log.info("stopped after %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
