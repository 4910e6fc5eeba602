"""The `bloombee` command.

bloombee up -f distributedllm.yaml            run the pipeline as local processes until Ctrl-C
bloombee up -f distributedllm.yaml --ask Q    ... answer one chat request, then stop
bloombee chat "Hello!" --endpoint URL          one chat request to a running gateway
bloombee validate -f distributedllm.yaml      check a resource; errors say which field is wrong
bloombee plan -f distributedllm.yaml          the DP plan: which node serves which layers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bloombee_operator import reconcile
from bloombee_operator.api.resource import DistributedLLM, ResourceError, load_resource
from bloombee_operator.api.status import PlanStatus
from bloombee_operator.backends.local import LocalBackend, LocalBackendError
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import PlanningError, Workload

log = logging.getLogger("bloombee")


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


RESTART_BACKOFF_MAX_S = 60.0


class LocalRun:
    """The reconcile steps (reconcile.py) driven against local processes, with the status kept in a
    file (``<run dir>/status.yaml``) instead of the API server."""

    def __init__(self, body: dict, backend: LocalBackend, run_dir: Path) -> None:
        self.body, self.backend, self.status_file = body, backend, run_dir / "status.yaml"

    @property
    def resource(self) -> DistributedLLM:
        """The resource with the status written so far, parsed once per step as the operator does."""
        return reconcile.read(self.body)

    def step(self, outcome: reconcile.Outcome) -> None:
        self.body["status"] = outcome.applied_to(self.resource.status)
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        self.status_file.write_text(yaml.safe_dump(self.body["status"], sort_keys=False))
        for event in outcome.events:
            (log.warning if event.type == "Warning" else log.info)("%s: %s", event.reason, event.message)

    def deploy(self) -> None:
        outcome = reconcile.deploy(self.resource, self.backend)
        while outcome.retry_after_s is not None:
            self.step(outcome)
            time.sleep(outcome.retry_after_s)
            outcome = reconcile.deploy(self.resource, self.backend)
        self.step(outcome)

    def keep(self) -> None:
        self.step(reconcile.keep(self.resource, self.backend))


def cmd_up(args: argparse.Namespace) -> int:
    resource = load_resource(args.file)
    run_dir = Path(args.run_dir or Path(".bloombee") / resource.metadata.name)
    # A one-shot --ask needs no well-known port; a serving pipeline listens where the resource says.
    port = args.port if args.port is not None else 0 if args.ask else resource.spec.gateway.service.port
    backend = LocalBackend(run_dir, host=args.host, gateway_port=port, threads_per_stage=args.threads,
                           link_delay_ms=args.link_delay_ms, tls=not args.no_tls)  # fmt: skip
    run = LocalRun(resource.model_dump(mode="json", by_alias=True, exclude_none=True), backend, run_dir)
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        log.info(
            "preparing model %s (the first run converts it; later runs reuse the cache)", resource.spec.model.source
        )
        started = time.monotonic()
        run.deploy()
        run.keep()  # readiness into the status file
        status = run.resource.status
        assert status.plan is not None and status.endpoint is not None  # deploy wrote both or raised
        _print_plan(status.plan)
        endpoint = status.endpoint
        log.info("pipeline ready in %.1f s; status in %s", time.monotonic() - started, run.status_file)
        model = resource.metadata.name
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
        print("Press Ctrl-C to stop. A stage that dies is restarted.")
        next_check, failures = time.monotonic() + args.check_every, 0
        while not stop_requested:
            if time.monotonic() >= next_check or (backend.dead() and failures == 0):
                try:
                    run.keep()  # restarts what died or hung, re-plans when planner.replanEvery is due
                    failures, wait_s = 0, args.check_every
                except LocalBackendError as error:  # a restart failed: the others serve on; try again later
                    failures += 1
                    wait_s = min(RESTART_BACKOFF_MAX_S, 2.0**failures)
                    log.warning("%s\ntrying again in %.0f s (attempt %d)", error, wait_s, failures + 1)
                next_check = time.monotonic() + wait_s
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except reconcile.Permanent as failed:
        log.error("%s", failed)
        return 1
    except (LocalBackendError, urllib.error.URLError, ValueError) as error:
        log.error("%s", error)
        return 1
    finally:
        log.info("stopping %d processes", len(backend.processes))
        backend.stop()


def _print_plan(plan: PlanStatus) -> None:
    print(f"{'STAGE':<6} {'NODE':<16} {'CLUSTER':<12} {'LAYERS':<9} {'OFFLOAD W':>9} {'OFFLOAD KV':>10} {'MS':>8}")
    for index, stage in enumerate(plan.stages):
        span = f"{stage.layers[0]}-{stage.layers[1] - 1}"
        print(f"{index:<6} {stage.node:<16} {stage.cluster:<12} {span:<9} "
              f"{stage.offload.weights:>9.2f} {stage.offload.kv:>10.2f} {stage.predicted_ms:>8.2f}")  # fmt: skip
    print(f"\nmicro-batch {plan.micro_batch} of {plan.batch} sequences ({plan.method}); predicted "
          f"{plan.predicted_tokens_per_second:.1f} tokens/s, {plan.predicted_latency_ms:.1f} ms per token")  # fmt: skip


def cmd_chat(args: argparse.Namespace) -> int:
    """One chat request to a running gateway, waiting up to --wait-s for it to come up."""
    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{args.endpoint}/models", timeout=10) as reply:
                models = [m["id"] for m in json.loads(reply.read())["data"]]
            break
        except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
            if time.monotonic() > deadline:
                print(f"error: {args.endpoint} did not answer in {args.wait_s:.0f} s: {error}", file=sys.stderr)
                return 1
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    model = args.model or models[0]
    try:
        reply = chat_once(args.endpoint, model, args.question, args.max_tokens)
    except urllib.error.HTTPError as error:
        print(f"error: {error.code} from {args.endpoint}: {error.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    print(reply["choices"][0]["message"]["content"])
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    resource = load_resource(args.file)
    print(f"{args.file}: DistributedLLM {resource.metadata.namespace}/{resource.metadata.name} is valid")
    print(f"(`bloombee plan -f {args.file}` shows the stages it would run)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from bloombee_operator.backends.local import model_config
    from bloombee_operator.planner import plan
    from bloombee_operator.planning import admission_note, plan_status, planner_inputs
    from bloombee_operator.planning_inputs import load_links, nodes_from_file

    resource = load_resource(args.file)
    spec = resource.spec
    inputs = planner_inputs(resource, ModelShape.from_config(model_config(spec.model.source)), [])
    nodes = nodes_from_file(args.nodes) if args.nodes else inputs.nodes
    clusters = sorted({n.cluster for n in nodes}, key=[c.name for c in spec.clusters].index)
    links = load_links(args.links, clusters)
    workload = Workload(
        batch=args.batch or spec.planner.concurrency, context=args.context or spec.planner.context_tokens
    )
    result = plan(inputs.profile, nodes, links, workload, inputs.options)
    planned = plan_status(result, dataclasses.replace(inputs, nodes=nodes, links=links, workload=workload))
    if args.output == "json":
        print(json.dumps(planned.dump(), indent=2))
        return 0
    _print_plan(planned)
    admission = admission_note(result.held, workload.batch)
    if admission:
        print(admission)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloombee", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run a DistributedLLM as local processes (no cluster needed)")
    up.add_argument("-f", "--file", required=True, help="DistributedLLM YAML (the same file kubectl applies)")
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
    up.add_argument("--no-tls", action="store_true", help="plain HTTP between the parts (default: mutual TLS under "
                    "a CA made for the run in RUN_DIR/tls; the gateway's API is plain HTTP either way)")
    up.add_argument(
        "--ask", default=None, help="send this chat message once everything is ready, print the reply, stop"
    )
    up.add_argument("--max-tokens", type=int, default=64, help="max_tokens for --ask")
    up.add_argument("--check-every", type=float, default=10.0,
                    help="seconds between checks that restart dead processes and re-plan when due")  # fmt: skip
    up.set_defaults(handler=cmd_up)

    chat = commands.add_parser("chat", help="send one chat message to a running gateway and print the answer")
    chat.add_argument("question")
    chat.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="the gateway's /v1 URL")
    chat.add_argument("--model", default=None, help="served model name (default: the first the gateway lists)")
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--wait-s", type=float, default=0.0, help="keep trying this long while the gateway starts")
    chat.set_defaults(handler=cmd_chat)

    validate = commands.add_parser("validate", help="check a DistributedLLM file; errors name the field")
    validate.add_argument("-f", "--file", required=True)
    validate.set_defaults(handler=cmd_validate)

    planner = commands.add_parser("plan", help="run the DP planner for a resource and print the plan")
    planner.add_argument("-f", "--file", required=True, help="DistributedLLM YAML")
    planner.add_argument("--links", default=None, help="measured links (status.links shape); default: 1 ms, 1 Gb/s")
    planner.add_argument("--nodes", default=None, help="nodes with measured speeds; default: the resource's hints")
    planner.add_argument("--batch", type=int, default=None, help="sequences users keep in flight, the demand; the "
                         "plan admits up to this many (default planner.concurrency)")  # fmt: skip
    planner.add_argument(
        "--context", type=int, default=None, help="tokens per sequence (default planner.contextTokens)"
    )
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
