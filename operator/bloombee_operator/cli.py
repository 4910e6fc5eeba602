"""The `bloombee` command.

bloombee up -f distributedllm.yaml            run the pipeline as local processes until Ctrl-C
bloombee up -f distributedllm.yaml --ask Q    ... answer one chat request, then stop
bloombee validate -f distributedllm.yaml      check a resource and print the stages it would run
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bloombee_operator.backends.local import LocalBackend, LocalBackendError
from bloombee_operator.reconcile import DesiredState, desired_state
from bloombee_operator.resource import ResourceError, load_resource

log = logging.getLogger("bloombee")


def _print_stages(desired: DesiredState) -> None:
    print(f"{'STAGE':<28} {'CLUSTER':<12} {'LAYERS':<10} {'DTYPE':<9} CODEC")
    for stage in sorted(desired.stages, key=lambda s: s.index):
        span = f"{stage.layers[0]}-{stage.layers[1] - 1}"
        print(f"{stage.name:<28} {stage.cluster:<12} {span:<10} {stage.dtype:<9} {stage.codec}")


def chat_once(endpoint: str, model: str, question: str, max_tokens: int = 64, timeout_s: float = 300.0) -> dict:
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{endpoint}/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


def cmd_up(args: argparse.Namespace) -> int:
    resource = load_resource(args.file)
    run_dir = Path(args.run_dir or Path(".bloombee") / resource.metadata.name)
    # A one-shot --ask needs no well-known port; a serving pipeline listens where the resource says.
    port = args.port if args.port is not None else 0 if args.ask else resource.spec.gateway.service.port
    backend = LocalBackend(run_dir, host=args.host, gateway_port=port, threads_per_stage=args.threads)
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        log.info(
            "preparing model %s (the first run converts it; later runs reuse the cache)", resource.spec.model.source
        )
        shape = backend.inspect_model(resource.spec.model.source)
        desired = desired_state(resource, shape, num_stages=args.stages)
        _print_stages(desired)
        started = time.monotonic()
        endpoint = backend.apply(desired)
        log.info("pipeline ready in %.1f s", time.monotonic() - started)
        model = desired.gateway.served_model_name
        if args.ask:
            reply = chat_once(endpoint, model, args.ask, args.max_tokens)
            choice = reply["choices"][0]
            print(f"\nQ: {args.ask}\nA: {choice['message']['content']}")
            print(f"   ({reply['usage']['completion_tokens']} tokens, finish_reason={choice['finish_reason']})")
            return 0
        print(f"\nBloomBee is serving `{model}` at {endpoint}\nTry:\n")
        print(
            f"  curl {endpoint}/chat/completions -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
        )
        print("Press Ctrl-C to stop.")
        while not stop_requested:
            dead = backend.dead()
            if dead:
                for process in dead:
                    log.error(
                        "%s exited (code %s); last lines:\n%s",
                        process.name,
                        process.popen.returncode,
                        process.log_tail(),
                    )
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except (LocalBackendError, urllib.error.URLError, ValueError) as error:
        log.error("%s", error)
        return 1
    finally:
        log.info("stopping %d processes", len(backend.processes))
        backend.stop()


def cmd_validate(args: argparse.Namespace) -> int:
    resource = load_resource(args.file)
    print(f"{args.file}: DistributedLLM {resource.metadata.namespace}/{resource.metadata.name} is valid")
    if args.layers:
        from bloombee_operator.reconcile import ModelShape

        _print_stages(desired_state(resource, ModelShape(args.layers, 0), num_stages=args.stages))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloombee", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run a DistributedLLM as local processes (no cluster needed)")
    up.add_argument("-f", "--file", required=True, help="DistributedLLM YAML (the same file kubectl applies)")
    up.add_argument("--stages", type=int, default=3, help="stage processes to split the layers over (default 3)")
    up.add_argument("--host", default="127.0.0.1", help="address every process binds to (default loopback)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default: spec.gateway.service.port; 0 = any)")
    up.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: cores / stages)")
    up.add_argument("--run-dir", default=None, help="where logs and ready files go (default .bloombee/NAME)")
    up.add_argument(
        "--ask", default=None, help="send this chat message once everything is ready, print the reply, stop"
    )
    up.add_argument("--max-tokens", type=int, default=64, help="max_tokens for --ask")
    up.set_defaults(handler=cmd_up)

    validate = commands.add_parser("validate", help="check a DistributedLLM file and show its stages")
    validate.add_argument("-f", "--file", required=True)
    validate.add_argument("--layers", type=int, default=0, help="model layer count, to print the stage split")
    validate.add_argument("--stages", type=int, default=3)
    validate.set_defaults(handler=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.handler(args)
    except ResourceError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
