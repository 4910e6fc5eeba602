"""The probe role: ``serve`` answers link measurements (a probe pod in each cluster); ``measure``
measures links from this machine once and prints them in the shape of ``status.links``.

    python -m bloombee_stage.probe serve --port 8080          the probe pod
    python -m bloombee_stage.probe measure eu=http://a:8080   one-off, from this machine
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence

from bloombee_contract.launch import ProbeLaunch
from bloombee_contract.tls import TlsError, TlsFiles

from bloombee_stage.serving.probe import (
    DEFAULT_BULK_BYTES,
    DEFAULT_ECHOES,
    LinkMeasurementError,
    measure,
    probe_app,
)
from bloombee_stage.serving.process import serve, setup_logging


def _targets(pairs: Sequence[str]) -> dict[str, str]:
    targets = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        if not sep or not url.startswith("http"):
            raise SystemExit(f"error: {pair!r} is not NAME=http://host:port")
        targets[name] = url
    return targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {ProbeLaunch.module}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    ProbeLaunch.add_arguments(commands.add_parser("serve", help="run a probe server (the probe pod)"))
    run = commands.add_parser("measure", help="measure links from this machine to probe servers")
    run.add_argument("targets", nargs="+", help="NAME=http://host:port of a stage server or probe pod")
    run.add_argument("--source", default="here", help="the name of this end in the output")
    run.add_argument("--echoes", type=int, default=DEFAULT_ECHOES)
    run.add_argument("--bulk-bytes", type=int, default=DEFAULT_BULK_BYTES)
    args = parser.parse_args(argv)
    if args.command == "serve":
        launch = ProbeLaunch.from_namespace(args)
        setup_logging()
        try:
            tls = TlsFiles.at(launch.tls_dir) if launch.tls_dir else None
        except TlsError as error:
            raise SystemExit(f"error: {error}") from None
        asyncio.run(serve(probe_app(tls), launch.host, launch.port, launch.ready_file, "probe", tls=tls))
        return
    try:
        links = asyncio.run(measure(args.source, _targets(args.targets), args.echoes, args.bulk_bytes))
    except LinkMeasurementError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps({"links": links}, indent=2))


if __name__ == "__main__":
    main()
