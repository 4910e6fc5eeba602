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
from bloombee_operator.planner import PlanningError
from bloombee_operator.reconcile import DesiredState, desired_state
from bloombee_operator.resource import ResourceError, load_resource

log = logging.getLogger("bloombee")


def _print_stages(desired: DesiredState) -> None:
    print(f"{'STAGE':<28} {'CLUSTER':<12} {'LAYERS':<10} {'DTYPE':<9} CODEC")
    for stage in desired.stages:
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
    backend = LocalBackend(run_dir, host=args.host, gateway_port=port, threads_per_stage=args.threads,
                           link_delay_ms=args.link_delay_ms)  # fmt: skip
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


def cmd_plan(args: argparse.Namespace) -> int:
    from bloombee_operator.backends.local import model_config
    from bloombee_operator.planner import Options, Workload, plan
    from bloombee_operator.planner.inputs import load_links, nodes_from_file, nodes_from_resource, profile_from_config

    resource = load_resource(args.file)
    spec = resource.spec
    profile = profile_from_config(model_config(spec.model.source), spec.model.dtype, spec.compression)
    nodes = nodes_from_file(args.nodes) if args.nodes else nodes_from_resource(resource, profile)
    clusters = sorted({n.cluster for n in nodes}, key=[c.name for c in spec.clusters].index)
    links = load_links(args.links, clusters)
    options = Options(objective=spec.planner.objective, max_micro_batch=spec.planner.max_micro_batch,
                      allow_offload=spec.planner.allow_offload)  # fmt: skip
    result = plan(profile, nodes, links, Workload(batch=args.batch, context=args.context), options)
    if args.output == "json":
        print(json.dumps(plan_status(result), indent=2))
        return 0
    print(f"{'STAGE':<6} {'NODE':<20} {'LAYERS':<9} {'OFFLOAD W':>9} {'OFFLOAD KV':>10} {'MS':>8}")
    for index, stage in enumerate(result.stages):
        span = f"{stage.layers[0]}-{stage.layers[1] - 1}"
        print(f"{index:<6} {stage.node:<20} {span:<9} {stage.offload_weights:>9.2f} {stage.offload_kv:>10.2f} "
              f"{stage.seconds * 1000:>8.2f}")  # fmt: skip
    print(f"\nmicro-batch {result.micro_batch} of {result.batch} sequences ({result.method}); predicted "
          f"{result.tokens_per_second:.1f} tokens/s, {result.latency_s * 1000:.1f} ms per token")  # fmt: skip
    return 0


def plan_status(result) -> dict:
    """A plan in the shape of the resource's status.plan."""
    return {
        "method": result.method,
        "microBatch": result.micro_batch,
        "batch": result.batch,
        "predictedTokensPerSecond": result.tokens_per_second,
        "predictedLatencyMs": result.latency_s * 1000,
        "stages": [
            {
                "node": s.node,
                "layers": list(s.layers),
                "offload": {"weights": s.offload_weights, "kv": s.offload_kv},
                "predictedMs": s.seconds * 1000,
            }
            for s in result.stages
        ],
    }


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
    up.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        help="emulate far-apart clusters: add this latency each way on every link (a delaying proxy)",
    )
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

    planner = commands.add_parser("plan", help="run the DP planner for a resource and print the plan")
    planner.add_argument("-f", "--file", required=True, help="DistributedLLM YAML")
    planner.add_argument("--links", default=None, help="measured links (status.links shape); default: 1 ms, 1 Gb/s")
    planner.add_argument("--nodes", default=None, help="nodes with measured speeds; default: the resource's hints")
    planner.add_argument("--batch", type=int, default=8, help="sequences in flight to plan for (throughput)")
    planner.add_argument("--context", type=int, default=2048, help="tokens of context per sequence")
    planner.add_argument("-o", "--output", choices=["table", "json"], default="table")
    planner.set_defaults(handler=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.handler(args)
    except (ResourceError, PlanningError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
