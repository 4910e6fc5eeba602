"""The stage server process: read its launch spec, load its span, serve.

    python -m bloombee_stage.stage --model SOURCE --layers 0:10
"""

from __future__ import annotations

import asyncio
import logging

import torch
from bloombee_contract.launch import StageLaunch
from bloombee_contract.model_source import ModelSourceError
from bloombee_contract.tls import TlsFiles

from bloombee_stage.model.loading import prepare_model, read_config
from bloombee_stage.model.offload import measure_bandwidth
from bloombee_stage.model.span import OffloadSettings, Span, SpanError, StageModel
from bloombee_stage.serving.process import serve, setup_logging
from bloombee_stage.stage.app import create_app
from bloombee_stage.stage.service import StageSettings

log = logging.getLogger("bloombee.stage")


def main(argv: list[str] | None = None) -> None:
    launch = StageLaunch.parse(argv)
    setup_logging(launch.log_level)
    if launch.threads:
        torch.set_num_threads(launch.threads)
    start, end = launch.layers
    try:
        tls = TlsFiles.at(launch.tls_dir) if launch.tls_dir else None
        model_dir = prepare_model(launch.model)
        total = int(read_config(model_dir)["num_hidden_layers"])
        offload = OffloadSettings(launch.offload_weights, launch.offload_kv, launch.offload_tier,
                                  not launch.no_prefetch)  # fmt: skip
        model = StageModel(model_dir, Span(start, end, total), launch.dtype, launch.device, offload,
                           packed=launch.packed_weights)  # fmt: skip
    except (ModelSourceError, SpanError, ValueError) as error:  # TlsError is a ValueError
        raise SystemExit(f"error: {error}") from None
    log.info("loaded layers [%d, %d) of %d in %.1f s%s", start, end, total, model.load_seconds,
             f"; {model.packed.packed_bytes / 1e6:.0f} MB packed for drafts and micro-batches" if model.packed else "")
    bandwidth = measure_bandwidth(next(model_dir.glob("*.safetensors")))
    log.info("tier bandwidths: %s", {key: f"{value / 1e9:.2f} GB/s" for key, value in bandwidth.items()})
    settings = StageSettings(
        name=launch.name,
        codec=launch.codec,
        link_bandwidth=launch.link_mbps * 1e6 / 8 if launch.link_mbps else None,
        accept_codecs=launch.accept_codecs,
        tier_bandwidth=bandwidth,
        kv_budget_bytes=int(launch.kv_budget_gib * (1 << 30)),
        kv_owner_share=launch.kv_owner_share,
        peers=frozenset(launch.peers) if launch.peers else None,
        micro_batch=launch.micro_batch,
        plan=launch.plan,
        session_timeout_s=launch.session_timeout,
        tls=tls,
    )
    app = create_app(model, settings)
    asyncio.run(serve(app, launch.host, launch.port, launch.ready_file, f"stage {launch.name}", tls=tls))
