"""Typed launch specs: how the stage server, the gateway and the probe are started.

Each spec is a frozen dataclass whose fields are the process's command-line flags. The one
definition of a flag (its field: name, type, default, help) both renders the command line the
operator and ``bloombee up`` write (``spec.command()``) and builds the server's own argparse
(``Spec.parser()`` / ``Spec.parse(argv)``), so the two cannot drift; ``tests/test_launch.py``
round-trips every field through the real parser.

A flag is ``--`` plus the field name with dashes. Values are rendered only when they differ
from the default (required fields always), so a command line says what was chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from bloombee_contract.codec_cost import CODEC_NAMES

DTYPES = ("float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DRAFT_KINDS = ("none", "prompt-lookup", "early-exit", "model", "head")
DEFAULT_TREE_WIDTH = 4  # candidates per tree node a draft head proposes
STAGE_CODECS = (*CODEC_NAMES, "auto")  # what a stage may send onward; auto decides per frame
DEFAULT_DRAFT_TOKENS = 8  # longest draft per round, unless the resource says otherwise
PACKED_WEIGHTS_SETTINGS = ("auto", "on", "off")  # a stage's --packed-weights (bloombee_stage.model.packed)
DEFAULT_GATEWAY_PORT = 8000
DEFAULT_PREFIX_CACHE = 32
API_KEY_ENV = "BLOOMBEE_API_KEY"  # the gateway's key comes from the environment (a Secret), never argv
CACHE_ENV = "BLOOMBEE_CACHE"  # where converted models are cached
PREPARE_MODEL_MODULE = "bloombee_stage.model"  # python -m ... SOURCE: convert once, print the config as JSON

_T = TypeVar("_T")


class FlagValueError(argparse.ArgumentTypeError, ValueError):
    """A flag's text cannot be read; argparse shows the message, other callers catch a ValueError."""


@dataclass(frozen=True)
class Flag:
    """How one field travels as a command-line flag."""

    help: str
    parse: Callable[[str], Any] = str  # text -> value (argparse's type)
    show: Callable[[Any], str] = str  # value -> text; parse(show(v)) == v
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False  # a bool that is present (True) or absent (False)
    env: str | None = None  # read from this environment variable, never rendered on a command line


def flag(help: str, default: Any = dataclasses.MISSING, **how: Any) -> Any:
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **how)})


def _float_text(value: float) -> str:
    return repr(float(value))  # the shortest text that parses back to the same float


def parse_span(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep:
        raise FlagValueError(f"{text!r}: expected START:END, e.g. 0:10")
    try:
        return int(start), int(end)
    except ValueError:
        raise FlagValueError(f"{text!r}: START and END must be integers") from None


def show_span(span: tuple[int, int]) -> str:
    return f"{span[0]}:{span[1]}"


def parse_codec_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in CODEC_NAMES]
    if unknown or "raw" not in names:
        raise FlagValueError(f"{text!r}: names from {', '.join(CODEC_NAMES)}, raw included")
    return names


def _base_url(url: str) -> str:
    """A peer's base URL as it is compared and dialled: http(s), no trailing slash."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise FlagValueError(f"URL {url!r} must start with http:// or https://")
    return url


def parse_url_list(text: str) -> tuple[str, ...]:
    """``a,b``: base URLs."""
    urls = tuple(_base_url(url) for url in text.split(",") if url.strip())
    if not urls:
        raise FlagValueError(f"{text!r}: comma-separated URLs")
    return urls


def parse_stage_urls(text: str) -> tuple[tuple[str, ...], ...]:
    """``a,b1|b2,c``: stage URLs in layer order; a span's replicas separated by ``|``."""
    stages = tuple(tuple(_base_url(url) for url in part.split("|") if url.strip()) for part in text.split(","))
    if not stages or any(not replicas for replicas in stages):
        raise FlagValueError(f"{text!r}: every stage needs at least one URL")
    return stages


def show_stage_urls(stages: Sequence[Sequence[str]]) -> str:
    return ",".join("|".join(replicas) for replicas in stages)


def parse_hops(text: str) -> tuple[bool, ...]:
    flags = [part.strip() for part in text.split(",")]
    if any(part not in ("0", "1") for part in flags):
        raise FlagValueError(f"{text!r}: expected 0 or 1 per hop, comma-separated")
    return tuple(part == "1" for part in flags)


def show_hops(hops: Sequence[bool]) -> str:
    return ",".join(str(int(hop)) for hop in hops)


def _positive(kind: Callable[[str], _T]) -> Callable[[str], _T]:
    def check(text: str) -> _T:
        value = kind(text)
        if value <= 0:  # type: ignore[operator]
            raise FlagValueError(f"{text!r}: must be positive")
        return value

    check.__name__ = kind.__name__
    return check


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise FlagValueError(f"{text!r}: a fraction must lie in [0, 1]")
    return value


class LaunchSpec:
    """Shared behaviour of the specs below: render a command line, build and run the parser."""

    module: ClassVar[str]  # python -m <module>
    subcommand: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str]

    @classmethod
    def flags(cls) -> list[tuple[dataclasses.Field, Flag]]:
        return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def args(self) -> list[str]:
        """The flags of this spec, as a command line takes them."""
        rendered: list[str] = []
        for field, how in self.flags():
            value = getattr(self, field.name)
            required = field.default is dataclasses.MISSING
            if how.env or (not required and value == field.default) or value is None:
                continue
            option = "--" + field.name.replace("_", "-")
            rendered += [option] if how.switch else [option, how.show(value)]
        return rendered

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module, *self.subcommand, *self.args()]

    def environment(self) -> dict[str, str]:
        """Values that travel in the environment (secrets); set only those given."""
        return {how.env: str(getattr(self, f.name)) for f, how in self.flags()
                if how.env and getattr(self, f.name) is not None}  # fmt: skip

    def with_flags(self: _S, flags: Sequence[str]) -> _S:
        """This spec with more command-line flags applied, read by the server's own parser (later wins)."""
        if not flags:
            return self
        parsed = type(self).parse([*self.args(), *flags])
        kept = {f.name: getattr(self, f.name) for f, how in self.flags() if how.env and getattr(parsed, f.name) is None}
        return dataclasses.replace(parsed, **kept)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for field, how in cls.flags():
            option = "--" + field.name.replace("_", "-")
            required = field.default is dataclasses.MISSING
            if how.switch:
                parser.add_argument(option, dest=field.name, action="store_true", help=how.help)
                continue
            if how.env:
                default, help_text = os.environ.get(how.env) or None, f"{how.help} (default: ${how.env})"
            elif required or field.default is None:
                default, help_text = None, how.help
            else:
                default, help_text = field.default, f"{how.help} (default: {how.show(field.default)})"
            parser.add_argument(option, dest=field.name, type=how.parse, default=default, required=required,
                                choices=how.choices, metavar=how.metavar, help=help_text)  # fmt: skip

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=" ".join(["python -m", cls.module, *cls.subcommand]),
                                         description=cls.description)  # fmt: skip
        cls.add_arguments(parser)
        return parser

    @classmethod
    def from_namespace(cls: type[_S], namespace: argparse.Namespace) -> _S:
        return cls(**{field.name: getattr(namespace, field.name) for field, _ in cls.flags()})

    @classmethod
    def parse(cls: type[_S], argv: Sequence[str] | None = None) -> _S:
        return cls.from_namespace(cls.parser().parse_args(argv))


_S = TypeVar("_S", bound=LaunchSpec)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise FlagValueError(f"{text!r}: must not be negative")
    return value


def _tls_dir_flag() -> Any:
    return flag("mutual TLS: a directory with ca.crt, tls.crt and tls.key (bloombee_contract.tls); peers must then "
                "present a certificate from the same CA", None)  # fmt: skip


@dataclass(frozen=True)
class StageLaunch(LaunchSpec):
    module: ClassVar[str] = "bloombee_stage.stage"
    description: ClassVar[str] = "Serve a contiguous span of a model's layers and push outputs to the next stage."

    model: str = flag("model source: gguf://pkg/file.gguf, .gguf, .safetensors, HF dir")
    layers: tuple[int, int] = flag("span START:END (END exclusive)", parse=parse_span, show=show_span,
                                   metavar="START:END")  # fmt: skip
    dtype: str = flag("weights and activations", "float32", choices=DTYPES)
    device: str | None = flag("torch device (default: cuda when present, else cpu)", None)
    host: str = flag("address to bind", "127.0.0.1")
    port: int = flag("0 = any free port (reported in the log and --ready-file)", 0, parse=int)
    name: str = flag("this stage's name in logs, metrics and error reports", "stage")
    threads: int = flag("torch threads (0 = leave torch's default)", 0, parse=int)
    codec: str = flag("codec for hidden states sent onward; auto: per frame, whichever of raw and the codecs the "
                      "next stage decodes is fastest over a link of --link-mbps (raw when that is not given)",
                      "raw", choices=STAGE_CODECS)  # fmt: skip
    link_mbps: float | None = flag("measured bandwidth to the next stage, Mbit/s", None,
                                   parse=_positive(float), show=_float_text)  # fmt: skip
    accept_codecs: tuple[str, ...] = flag("codecs taken from peers, comma-separated", CODEC_NAMES,
                                          parse=parse_codec_list, show=",".join)  # fmt: skip
    kv_budget_gib: float = flag("KV cache budget over all sessions, GiB", 2.0, parse=_positive(float),
                                show=_float_text)  # fmt: skip
    micro_batch: int | None = flag("the plan's micro-batch: refuse steps with more rows (default: any)", None,
                                   parse=_positive(int))  # fmt: skip
    plan: str | None = flag("the plan this stage serves (its hash): steps routed for another plan are refused "
                            "(default: any)", None)
    peers: tuple[str, ...] | None = flag("base URLs this stage may send to (the next span's replicas, its gateway); "
                                         "a frame routed or replying anywhere else is refused (default: any part "
                                         "of the deployment, as mutual TLS proves)", None, parse=parse_url_list,
                                         show=",".join)  # fmt: skip
    kv_owner_share: float = flag("most of the KV budget the sessions of one caller (a gateway's certificate) may "
                                 "reserve, as a fraction; stages shared by several gateways keep room for each",
                                 1.0, parse=_positive(_fraction), show=_float_text, metavar="S")  # fmt: skip
    offload_weights: float = flag("fraction of the span's layers whose weights stay in the lower tier and stream in",
                                  0.0, parse=_fraction, show=_float_text, metavar="F")  # fmt: skip
    offload_kv: float = flag("fraction of the span's layers whose KV cache stays on disk between steps", 0.0,
                             parse=_fraction, show=_float_text, metavar="G")  # fmt: skip
    offload_tier: str | None = flag("lower tier for weights (default: pinned host memory under CUDA, else disk)",
                                    None, choices=("host", "disk"))  # fmt: skip
    no_prefetch: bool = flag("load offloaded layers only when due (no overlap)", False, switch=True)
    packed_weights: str = flag("a second copy of the weights packed for steps of a few positions (drafts to verify, "
                               "micro-batches), on CPUs: 8 positions then cost ~1.0x one instead of ~1.6x; auto: "
                               "when no weights stream and memory has room; on: refused with --offload-weights", "auto",
                               choices=PACKED_WEIGHTS_SETTINGS)  # fmt: skip
    session_timeout: float = flag("seconds before an idle session closes", 300.0, parse=_positive(float),
                                  show=_float_text)  # fmt: skip
    tls_dir: str | None = _tls_dir_flag()
    ready_file: str | None = flag("write {url, port, pid} here once listening", None)
    log_level: str = flag("how much to log", "INFO", parse=str.upper, choices=LOG_LEVELS)


@dataclass(frozen=True)
class GatewayLaunch(LaunchSpec):
    module: ClassVar[str] = "bloombee_stage.gateway"
    description: ClassVar[str] = "OpenAI-compatible endpoint that drives a chain of BloomBee stage servers."

    model: str = flag("model source (for the tokenizer and config)")
    served_model_name: str = flag("the name clients put in `model`")
    stages: tuple[tuple[str, ...], ...] | None = flag(
        "stage URLs in layer order, comma-separated; replicas of one span separated by '|' (each generation "
        "takes the path predicted fastest); or --route-file", None, parse=parse_stage_urls,
        show=show_stage_urls)  # fmt: skip
    route_file: str | None = flag("a route (JSON: plan, stages, microBatch, relayHops, maxSequences) to follow "
                                  "instead of --stages and those flags, read again whenever it changes: a new "
                                  "plan's stages are taken on once they all answer, generations in flight finish "
                                  "on the old ones", None)  # fmt: skip
    host: str = flag("address to bind", "127.0.0.1")
    port: int = flag("0 = any free port", DEFAULT_GATEWAY_PORT, parse=int)
    public_url: str | None = flag("URL the last stage uses to reach this gateway", None)
    step_timeout: float = flag("seconds to wait for one step's result", 120.0, parse=_positive(float),
                               show=_float_text)  # fmt: skip
    api_key: str | None = flag("require `Authorization: Bearer KEY` on /v1/", None, env=API_KEY_ENV)
    relay: bool = flag("baseline: relay every hop through the gateway as Petals does", False, switch=True)
    relay_hops: tuple[bool, ...] | None = flag(
        "comma-separated 0/1 per hop between stages: 1 routes that hop through this gateway (from the plan)", None,
        parse=parse_hops, show=show_hops)  # fmt: skip
    draft: str = flag("speculative decoding: draft tokens by prompt lookup, by the model's first --draft-layers "
                      "layers and its head (early-exit), by a small model (--draft-model), or by the trained draft "
                      "head that ships with the model (head: token trees, --draft-width wide); the pipeline verifies "
                      "them in one pass (greedy: same tokens; sampling: same distribution)", "none",
                      choices=DRAFT_KINDS)  # fmt: skip
    draft_width: int = flag("head: candidates per tree node (1: a chain)", DEFAULT_TREE_WIDTH, parse=_positive(int))
    draft_head: str | None = flag("head: directory of a trained draft head (default: the one shipped with BloomBee; "
                                  "scripts/train_draft_head.py --out DIR makes one)", None)
    draft_max: int = flag("longest draft per round (adapts below it)", DEFAULT_DRAFT_TOKENS, parse=_positive(int))
    draft_layers: int | None = flag("early-exit: layers of the model to draft with", None, parse=_positive(int))
    draft_model: str | None = flag("model draft: source of a small model with the same tokenizer", None)
    micro_batch: int | None = flag("rows (concurrent requests) per step; the plan's micro-batch size (1: every "
                                   "request steps alone; default: the route's, else 1)", None,
                                   parse=_positive(int))  # fmt: skip
    max_in_flight: int | None = flag("micro-batches in the pipeline at once (default: as the plan costs them)", None,
                                     parse=_positive(int))  # fmt: skip
    prefix_cache: int = flag("finished generations whose sessions stay on the stages so a prompt that starts the "
                             "same way copies those positions instead of computing them (0: off)",
                             DEFAULT_PREFIX_CACHE, parse=int)  # fmt: skip
    recovery_wait: float = flag("seconds a generation whose stage was lost waits for it (restarted) or a replica to "
                                "answer again before it replays its tokens there; then it fails (0: fail at once)",
                                60.0, parse=_non_negative_float, show=_float_text)  # fmt: skip
    max_waiting: int | None = flag("requests waiting for a seat beyond which a new one is refused at once with 429 "
                                   "and Retry-After (default: 4 x --max-sequences; no limit without seats)", None,
                                   parse=_positive(int))  # fmt: skip
    default_max_tokens: int = flag("tokens a request that names no max_tokens may generate (its sessions reserve KV "
                                   "for that many, not for the whole context)", 2048, parse=_positive(int))  # fmt: skip
    request_timeout: float = flag("seconds a request may take from arrival to its last token, its wait for a seat "
                                  "included; past it the request fails (504), freeing its seat and KV", 600.0,
                                  parse=_positive(float), show=_float_text)  # fmt: skip
    internal_port: int = flag("with --tls-dir: the mutual-TLS port where stages deliver results and relayed hops "
                              "(0 = any free port); --port stays the clients' plain HTTP API", 0, parse=int)
    tls_dir: str | None = _tls_dir_flag()
    max_sequences: int | None = flag("generations served at once (the plan's admitted sequences, which the stages' "
                                     "KV budgets hold); more requests wait for a seat (default: no cap)", None,
                                     parse=_positive(int))  # fmt: skip
    ready_file: str | None = flag("write {url, port, pid} here once listening", None)
    log_level: str = flag("how much to log", "INFO", parse=str.upper, choices=LOG_LEVELS)


@dataclass(frozen=True)
class ProbeLaunch(LaunchSpec):
    module: ClassVar[str] = "bloombee_stage.probe"
    subcommand: ClassVar[tuple[str, ...]] = ("serve",)
    description: ClassVar[str] = "Answer link measurements (/probe) from the other clusters."

    host: str = flag("address to bind", "0.0.0.0")
    port: int = flag("port (0 = any free port)", 8080, parse=int)
    tls_dir: str | None = _tls_dir_flag()
    ready_file: str | None = flag("write {url, port, pid} here once listening", None)
