"""The gateway process: read its launch spec, load the tokenizer and any draft model, serve.

    python -m bloombee_stage.gateway --model SOURCE --stages URL,URL --served-model-name NAME
    python -m bloombee_stage.gateway --model SOURCE --route-file route.json --served-model-name NAME
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from bloombee_contract.launch import GatewayLaunch
from bloombee_contract.model_source import ModelSourceError
from bloombee_contract.paths import INFO_PATH, RESULT_PATH, STEP_PATH
from bloombee_contract.tls import TlsFiles

from bloombee_stage.gateway.app import create_app
from bloombee_stage.gateway.draft_tree import HeadDrafter
from bloombee_stage.gateway.drafting import ModelDrafter
from bloombee_stage.gateway.engine import GenerationEngine
from bloombee_stage.model.draft_head import fastest_dtype, load_for_model
from bloombee_stage.model.loading import prepare_model, read_config
from bloombee_stage.model.span import Span, SpanError, StageModel
from bloombee_stage.serving.process import serve, setup_logging

log = logging.getLogger("bloombee.gateway")


def load_drafter(kind: str, model_dir: Path, layers: int | None, source: str | None,
                 vocab: int) -> ModelDrafter | None:  # fmt: skip
    """The draft model a kind needs: the target's first ``layers`` layers plus its head, or a small model."""
    if kind == "early-exit":
        total = int(read_config(model_dir)["num_hidden_layers"])
        if layers is None or not 1 <= layers < total:
            raise ValueError(f"--draft early-exit needs --draft-layers between 1 and {total - 1}")
        model = StageModel(model_dir, Span(0, layers, total), head=True)
    elif kind == "model":
        if not source:
            raise ValueError("--draft model needs --draft-model SOURCE")
        draft_dir = prepare_model(source)
        total = int(read_config(draft_dir)["num_hidden_layers"])
        model = StageModel(draft_dir, Span(0, total, total))
        if int(model.config.vocab_size) < vocab:
            raise ValueError(f"draft model {source!r} has {model.config.vocab_size} tokens; the model has {vocab}: "
                             "a draft model must share the tokenizer")  # fmt: skip
    else:
        return None
    log.info("draft %s: %d layers loaded in %.1f s", kind, model.span.length, model.load_seconds)
    return ModelDrafter(model, kind)


def main(argv: list[str] | None = None) -> None:
    launch = GatewayLaunch.parse(argv)
    setup_logging(launch.log_level)
    from transformers import AutoTokenizer

    try:
        tls = TlsFiles.at(launch.tls_dir) if launch.tls_dir else None
        model_dir = prepare_model(launch.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        drafter = load_drafter(launch.draft, model_dir, launch.draft_layers, launch.draft_model, len(tokenizer))
        head = None
        if launch.draft == "head":
            trained = load_for_model(model_dir, *([Path(launch.draft_head)] if launch.draft_head else []))
            dtype = fastest_dtype(trained)
            log.info("draft head: %d-token draft vocabulary, computing in %s", trained.vocab_ids.numel(), dtype)
            head = HeadDrafter(trained.compute_in(dtype))
        engine = GenerationEngine(tokenizer, read_config(model_dir), launch, drafter, head)
    except (ModelSourceError, SpanError, ValueError) as error:  # DraftHeadError and RouteError are ValueErrors
        raise SystemExit(f"error: {error}") from None
    internal = frozenset({RESULT_PATH, STEP_PATH, INFO_PATH})
    asyncio.run(serve(create_app(engine), launch.host, launch.port, launch.ready_file, "gateway", engine.start, tls=tls,
                      internal_port=launch.internal_port, internal_paths=internal))
