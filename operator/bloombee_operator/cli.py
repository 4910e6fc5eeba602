"""The `bloombee` command.

bloombee up -f distributedllm.yaml            run the pipeline as local processes until Ctrl-C
bloombee up -f distributedllm.yaml --ask Q    ... answer one chat request, then stop
bloombee chat "Hello!" --endpoint URL --stream one chat request to a running gateway
bloombee validate -f distributedllm.yaml      check a resource; errors say which field is wrong
bloombee plan -f distributedllm.yaml          the DP plan: which node serves which layers
bloombee delete NAME -n NS                    delete DistributedLLMs on a cluster, wait until all they ran is gone
bloombee check --operator NS/DEPLOYMENT       the operator on a cluster answers; --resource NS/NAME: a chat too
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import yaml
from bloombee_contract.launch import API_KEY_ENV, LOG_LEVELS
from bloombee_contract.model_source import ModelSourceError, resolve_source

from bloombee_operator import reconcile
from bloombee_operator.api.resource import DistributedLLM, ResourceError, load_resource
from bloombee_operator.api.status import PlanStatus
from bloombee_operator.backends.local import LocalBackend, LocalBackendError
from bloombee_operator.model_shape import ModelShape
from bloombee_operator.planner import PlanningError, Workload

log = logging.getLogger("bloombee")


def chat_once(endpoint: str, model: str, question: str, max_tokens: int = 64, timeout_s: float = 300.0,
              system: str | None = None, temperature: float = 0.0, api_key: str | None = None) -> dict:
    """One chat request (not streamed); the reply as the gateway sent it."""
    with _chat_request(endpoint, model, question, max_tokens, system, temperature, api_key, stream=False,
                       timeout_s=timeout_s) as reply:  # fmt: skip
        return json.loads(reply.read())


def stream_chat(endpoint: str, model: str, question: str, max_tokens: int = 64, system: str | None = None,
                temperature: float = 0.0, api_key: str | None = None, timeout_s: float = 300.0) -> Iterator[str]:
    """One chat request, streamed: the text as it comes."""
    with _chat_request(endpoint, model, question, max_tokens, system, temperature, api_key, stream=True,
                       timeout_s=timeout_s) as reply:  # fmt: skip
        for line in reply:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                raise ChatError(f"the gateway failed midway: {event['error'].get('message')}")
            for choice in event.get("choices", []):
                yield choice["delta"].get("content") or ""


class ChatError(RuntimeError):
    """A chat request that failed, with what to do about it; ``retryable``: the gateway was busy,
    restarting or changing plans (429, 502, 503, 504, no connection), so a later try may succeed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def _chat_request(endpoint: str, model: str, question: str, max_tokens: int, system: str | None, temperature: float,
                  api_key: str | None, stream: bool, timeout_s: float) -> Any:  # fmt: skip
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                       "stream": stream}).encode()  # fmt: skip
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(f"{endpoint}/chat/completions", data=body, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        raise ChatError(_http_problem(endpoint, error), retryable=error.code in RETRYABLE_STATUS) from None
    except (urllib.error.URLError, ConnectionError) as error:
        raise ChatError(f"{endpoint} did not answer: {error}", retryable=True) from None


def _http_problem(endpoint: str, error: urllib.error.HTTPError) -> str:
    """What an HTTP error from the gateway means, with a hint where the cause is common."""
    try:
        detail = json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = error.reason
    hint = ""
    if error.code == 404 and not endpoint.rstrip("/").endswith("/v1"):
        hint = f" (the endpoint is the gateway's /v1 URL: try --endpoint {endpoint.rstrip('/')}/v1)"
    elif error.code == 401:
        hint = f" (pass the gateway's key with --api-key or ${API_KEY_ENV})"
    return f"{error.code} from {endpoint}: {detail}{hint}"


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
    # The key reaches the gateway in its environment (GatewayLaunch.api_key), never on a command line.
    # Each node of the resource is a share of this machine's cores, whatever the plan places on it,
    # so what a node measures of itself holds for every plan (a stage's speed is its node's).
    threads = args.threads or max(1, (os.cpu_count() or 1) // resource.spec.node_count)
    backend = LocalBackend(run_dir, host=args.host, gateway_port=port, threads_per_stage=threads,
                           link_delay_ms=args.link_delay_ms, tls=not args.no_tls, api_key=args.api_key)  # fmt: skip
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
        run.keep()  # the stages' profiling runs, and the plan's predictions on what they measured
        run.keep()  # where those measurements found a better plan, it now serves: the old plan's stages go
        status = run.resource.status
        assert status.plan is not None and status.endpoint is not None  # deploy wrote both or raised
        _print_plan(status.plan)
        endpoint = status.endpoint
        log.info("pipeline ready in %.1f s; status in %s", time.monotonic() - started, run.status_file)
        model = resource.metadata.name
        if args.ask:
            reply = chat_once(endpoint, model, args.ask, args.max_tokens, api_key=args.api_key)
            choice = reply["choices"][0]
            print(f"\nQ: {args.ask}\nA: {choice['message']['content']}")
            print(f"   ({reply['usage']['completion_tokens']} tokens, finish_reason={choice['finish_reason']})")
            return 0
        print(f"\nBloomBee is serving `{model}` at {endpoint}\nTry:\n")
        key = " -H 'Authorization: Bearer $BLOOMBEE_API_KEY'" if args.api_key else ""
        print(
            f"  curl {endpoint}/chat/completions -H 'Content-Type: application/json'{key} \\\n"
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
    except (LocalBackendError, ChatError, urllib.error.URLError, ValueError) as error:
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
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    while True:
        try:
            request = urllib.request.Request(f"{args.endpoint}/models", headers=headers)
            with urllib.request.urlopen(request, timeout=10) as reply:
                models = [m["id"] for m in json.loads(reply.read())["data"]]
            break
        except urllib.error.HTTPError as error:
            print(f"error: {_http_problem(args.endpoint, error)}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
            if time.monotonic() > deadline:
                print(f"error: {args.endpoint} did not answer in {args.wait_s:.0f} s: {error}", file=sys.stderr)
                return 1
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    model = args.model or models[0]
    asked = (args.endpoint, model, args.question, args.max_tokens)
    settings = {"system": args.system, "temperature": args.temperature, "api_key": args.api_key}
    while True:
        printed = False
        try:
            if args.stream:
                for piece in stream_chat(*asked, **settings):
                    printed = True
                    print(piece, end="", flush=True)
                print()
            else:
                print(chat_once(*asked, **settings)["choices"][0]["message"]["content"])
            return 0
        except ChatError as error:
            # A gateway that is busy, restarting or changing plans is tried again within --wait-s
            # (never once an answer has started to print).
            if not error.retryable or printed or time.monotonic() + 5.0 > deadline:
                print(f"error: {error}", file=sys.stderr)
                return 1
            print(f"{error}; trying again in 5 s", file=sys.stderr)
            time.sleep(5.0)


def cmd_validate(args: argparse.Namespace) -> int:
    resource = load_resource(args.file)
    if not args.no_local_model:
        try:
            resolve_source(resource.spec.model.source)
        except ModelSourceError as error:
            raise ResourceError(f"{args.file}: spec.model.source: {error} (looked for on this machine; "
                                "--no-local-model skips this when the model is only in the stage image)") from None
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
    resolve_source(spec.model.source)  # a missing model says so, before a child process tries it
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


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete DistributedLLMs on a cluster and wait until everything they ran is gone (the chart's
    pre-delete hook runs this, so `helm uninstall` leaves nothing running)."""
    from bloombee_operator import admin

    if not (args.names or args.selector or args.all):
        print("error: name the DistributedLLMs to delete, or select them with -l, or pass --all", file=sys.stderr)
        return 2
    namespace = None if args.all_namespaces else args.namespace or _current_namespace()
    if args.names and namespace is None:
        print("error: names are looked up in one namespace (-n), not with -A", file=sys.stderr)
        return 2
    try:
        gone = admin.delete_resources(admin.api_client(args.kubeconfig), namespace, args.names, args.selector,
                                      args.wait_s, say=print)  # fmt: skip
    except admin.CLUSTER_ERRORS as error:
        print(f"error: {admin.describe(error)}", file=sys.stderr)
        return 1
    return 0 if gone else 1


def _current_namespace() -> str:
    """The namespace of this pod's service account, else "default"."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"


def _ref(text: str) -> tuple[str, str]:
    namespace, _, name = text.rpartition("/")
    return namespace or _current_namespace(), name


def cmd_check(args: argparse.Namespace) -> int:
    """What `helm test` runs: the operator answers and can list DistributedLLMs; a resource is Ready
    and its gateway answers a chat."""
    from bloombee_operator import admin

    if not (args.operator or args.resource):
        print("error: say what to check: --operator NAMESPACE/DEPLOYMENT and/or --resource NAMESPACE/NAME",
              file=sys.stderr)  # fmt: skip
        return 2
    deadline = time.monotonic() + args.wait_s
    namespace, name = _ref(args.resource) if args.resource else ("", "")
    try:
        api = admin.api_client(args.kubeconfig)
        if args.operator and not admin.check_operator(api, *_ref(args.operator), args.wait_s, say=print):
            return 1
        if not args.resource:
            return 0
        endpoint = admin.ready_endpoint(api, admin.Ref(namespace, name), args.wait_s, say=print)
    except admin.CLUSTER_ERRORS as error:
        print(f"error: {admin.describe(error)}", file=sys.stderr)
        return 1
    if endpoint is None:
        return 1
    while True:  # bounded by the deadline
        try:
            reply = chat_once(endpoint, name, args.question, args.max_tokens, timeout_s=max(10.0, args.wait_s),
                              api_key=args.api_key)  # fmt: skip
            break
        except ChatError as error:
            if not error.retryable or time.monotonic() + 5.0 > deadline:
                print(f"error: {error}", file=sys.stderr)
                return 1
            print(f"{error}; trying again in 5 s")
            time.sleep(5.0)
    choice = reply["choices"][0]
    print(f"{endpoint} answered {args.question!r} with {choice['message']['content']!r} "
          f"({reply['usage']['completion_tokens']} tokens, finish_reason={choice['finish_reason']})")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloombee", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"bloombee {package_version('bloombee')}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="how much to log (any case)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run a DistributedLLM as local processes (no cluster needed)")
    up.add_argument("-f", "--file", required=True, help="DistributedLLM YAML (the same file kubectl applies)")
    up.add_argument("--host", default="127.0.0.1", help="address every process binds to (default loopback)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default: spec.gateway.service.port; 0 = any)")
    up.add_argument("--threads", type=int, default=None,
                    help="torch threads per stage (default: cores / the resource's nodes)")
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
    up.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help="require `Authorization: Bearer KEY` "
                    f"on the gateway's API (default: ${API_KEY_ENV}; none: open to whoever reaches the port)")
    up.add_argument("--check-every", type=float, default=10.0,
                    help="seconds between checks that restart dead processes and re-plan when due")  # fmt: skip
    up.set_defaults(handler=cmd_up)

    chat = commands.add_parser("chat", help="send one chat message to a running gateway and print the answer")
    chat.add_argument("question")
    chat.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="the gateway's /v1 URL")
    chat.add_argument("--model", default=None, help="served model name (default: the first the gateway lists)")
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--wait-s", type=float, default=0.0, help="keep trying this long while the gateway starts, "
                      "or answers that it is busy or changing plans (429, 502, 503, 504, no connection)")
    chat.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    chat.add_argument("--system", default=None, help="a system message before the question")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); up to 2")
    chat.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"the gateway's key (default: "
                      f"${API_KEY_ENV})")  # fmt: skip
    chat.set_defaults(handler=cmd_chat)

    validate = commands.add_parser("validate", help="check a DistributedLLM file; errors name the field")
    validate.add_argument("-f", "--file", required=True)
    validate.add_argument("--no-local-model", action="store_true",
                          help="do not look for spec.model.source on this machine (it is only in the stage image)")
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

    delete = commands.add_parser("delete", help="delete DistributedLLMs on a cluster and wait until all they ran "
                                 "is gone (where no operator removes one in time, remove it here)")  # fmt: skip
    delete.add_argument("names", nargs="*", help="DistributedLLMs in the namespace (-n)")
    delete.add_argument("-n", "--namespace", default=None, help="default: this pod's namespace, else default")
    delete.add_argument("-A", "--all-namespaces", action="store_true", help="select in every namespace")
    delete.add_argument("-l", "--selector", default=None, help="a label selector (app.kubernetes.io/instance=REL)")
    delete.add_argument("--all", action="store_true", help="every DistributedLLM in the namespace (-n) or all (-A)")
    delete.add_argument("--wait-s", type=float, default=90.0, help="how long to wait for the operator to remove "
                        "each resource before removing its children and finalizer here, and for its pods to go "
                        "(at least 60 s: their termination grace period)")
    delete.add_argument("--kubeconfig", default=None, help="default: in a pod its service account, else $KUBECONFIG")
    delete.set_defaults(handler=cmd_delete)

    check = commands.add_parser("check", help="check the operator on a cluster, and a resource's endpoint")
    check.add_argument("--operator", default=None, metavar="NAMESPACE/DEPLOYMENT",
                       help="its pod is ready, its liveness endpoint answers, and this identity lists DistributedLLMs")
    check.add_argument("--resource", default=None, metavar="NAMESPACE/NAME",
                       help="the DistributedLLM is Ready and its gateway answers a chat")  # fmt: skip
    check.add_argument("--question", default="What is the capital of France?")
    check.add_argument("--max-tokens", type=int, default=16)
    check.add_argument("--wait-s", type=float, default=60.0, help="how long the operator may take to be ready, "
                       "and the resource to be Ready and answer")  # fmt: skip
    check.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"the gateway's key (default: "
                       f"${API_KEY_ENV})")  # fmt: skip
    check.add_argument("--kubeconfig", default=None, help="default: in a pod its service account, else $KUBECONFIG")
    check.set_defaults(handler=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.handler(args)
    except (ResourceError, PlanningError, ModelSourceError, LocalBackendError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except BrokenPipeError:
        # The reader left (`bloombee plan -o json | head`): not an error of ours. Python would
        # report the pipe again while flushing stdout at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
