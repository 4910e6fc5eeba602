"""A stage: a contiguous span of a Llama-family model's decoder layers.

The span is the transformers model itself, built from the model's config with
``num_hidden_layers`` set to the span's length, so the decoder layers, rotary embedding,
attention masks and KV cache are transformers' own code (and greedy output stays
token-for-token equal to ``generate`` on the whole model). Only the span's tensors are read
from disk, renamed from global to local layer indices.

Where the ends live (decided here, see DESIGN.md "Models"):

* the token embedding only on the stage whose span starts at layer 0 -- token ids are what
  cross the first link, 8 bytes a token instead of a hidden state;
* the final norm and the LM head only on the stage whose span ends at the last layer -- it
  picks the next token itself, so a token id, not a vocabulary of logits, goes back to the
  gateway.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from bloombee_contract.launch import PACKED_WEIGHTS_SETTINGS
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask

from bloombee_stage.model.offload import (
    KVStore,
    TensorLocation,
    WeightStreamer,
    attach_kv_store,
    safetensors_locations,
    spread,
)
from bloombee_stage.model.packed import PackedSwitch, pack_linears, should_pack

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SpanError(ValueError):
    """A layer span that the model cannot serve."""


@dataclass(frozen=True)
class Span:
    """Layers [start, end) of a model with ``total`` layers."""

    start: int
    end: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.total:
            raise SpanError(f"layer span [{self.start}, {self.end}) is not inside the model's 0..{self.total} layers")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.total

    @property
    def length(self) -> int:
        return self.end - self.start


def _checkpoint_tensor_names(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SpanError(f"{model_dir}: no safetensors files")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def _span_owns(name: str, span: Span, tie_word_embeddings: bool, head: bool) -> bool:
    """Whether a non-layer tensor (embedding, final norm, head) belongs to this span."""
    if name.startswith("model.embed_tokens."):
        return span.is_first or (head and tie_word_embeddings)
    return name.startswith(("model.norm.", "lm_head.")) and head


def _layer_tensor(name: str) -> tuple[int, str] | None:
    """(global layer index, name inside the layer) of a ``model.layers.<i>.<rest>`` tensor, else None."""
    if not name.startswith("model.layers."):
        return None
    index_text, _, rest = name[len("model.layers.") :].partition(".")
    return int(index_text), rest


def _offloaded_locations(available: dict[str, Path], span: Span,
                         local_layers: list[int]) -> dict[int, list[TensorLocation]]:  # fmt: skip
    """Where each offloaded layer's tensors are on disk, named as inside the layer module."""
    in_file = {path: safetensors_locations(path) for path in set(available.values())}
    found: dict[int, list[TensorLocation]] = {index: [] for index in local_layers}
    for name, path in sorted(available.items()):
        layer = _layer_tensor(name)
        if layer is not None and layer[0] - span.start in found:
            found[layer[0] - span.start].append(replace(in_file[path][name], name=layer[1]))
    return found


def _span_state_dict(model_dir: Path, available: dict[str, Path], span: Span, tie_word_embeddings: bool,
                     head: bool, skip: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:  # fmt: skip
    """Read only the span's tensors (less the ``skip`` local layers), renamed to local layer indices."""
    wanted: dict[str, str] = {}  # checkpoint name -> name in the span module
    for name in available:
        layer = _layer_tensor(name)
        if layer is not None:
            index, rest = layer
            if span.start <= index < span.end and index - span.start not in skip:
                wanted[name] = f"model.layers.{index - span.start}.{rest}"
        elif _span_owns(name, span, tie_word_embeddings, head):
            wanted[name] = name
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(available[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                state[wanted[name]] = handle.get_tensor(name)
    if head and "lm_head.weight" not in state:
        if "model.embed_tokens.weight" not in state:
            raise SpanError(f"{model_dir}: no lm_head.weight and no tied embedding to use as the head")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _span_config(config: PretrainedConfig, span: Span) -> PretrainedConfig:
    span_config = copy.deepcopy(config)
    span_config.num_hidden_layers = span.length
    if getattr(span_config, "layer_types", None):
        span_config.layer_types = list(config.layer_types[span.start : span.end])
    span_config.tie_word_embeddings = False  # the head weight is loaded explicitly
    span_config.use_cache = True
    return span_config


@dataclass(frozen=True)
class OffloadSettings:
    weights: float = 0.0  # fraction of the span's layers whose weights live in the lower tier
    kv: float = 0.0  # fraction of the span's layers whose KV cache lives on disk between steps
    tier: str | None = None  # weights' lower tier: "host" or "disk" (default: host under CUDA, else disk)
    prefetch: bool = True  # read the next offloaded layer while the current one computes
    kv_dir: Path | None = None  # where KV files go (default: the system's temporary directory)


class StageModel:
    """Runs a span's layers for a micro-batch of sessions; callers serialise calls (one torch thread).

    ``head``: the span also holds the final norm and LM head although it does not end at the
    last layer (an early-exit draft model); the span that ends at the last layer always does.
    ``packed``: "auto", "on" or "off": pre-packed weights for steps of a few positions (packed.py).
    """

    def __init__(self, model_dir: Path, span: Span, dtype: str = "float32", device: str | None = None,
                 offload: OffloadSettings | None = None, head: bool = False, packed: str = "auto") -> None:  # fmt: skip
        if dtype not in DTYPES:
            raise SpanError(f"dtype {dtype!r} not one of {sorted(DTYPES)}")
        if packed not in PACKED_WEIGHTS_SETTINGS:
            raise SpanError(f"packed {packed!r} not one of {list(PACKED_WEIGHTS_SETTINGS)}")
        self.model_dir = Path(model_dir)
        self.span = span
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = AutoConfig.from_pretrained(self.model_dir)
        self.full_config = config
        self.config = _span_config(config, span)
        self.config._attn_implementation = "sdpa"
        self.offload = offload or OffloadSettings()
        self.has_head = span.is_last or head
        offloaded = spread(span.length, self.offload.weights)
        if offloaded and packed == "on":  # a packed copy of every layer is what streaming must not hold
            raise SpanError(f"packed weights 'on' needs the span's weights resident; span [{span.start}, {span.end}) "
                            f"streams {len(offloaded)} of its {span.length} layers (offload weights "
                            f"{self.offload.weights:g}): use packed 'auto' or 'off', or no weight offload")  # fmt: skip
        self.kv_offloaded = frozenset(spread(span.length, self.offload.kv))
        started = time.perf_counter()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype, attn_implementation="sdpa")
        available = _checkpoint_tensor_names(self.model_dir)  # read once: resident and streamed layers both need it
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = _span_state_dict(self.model_dir, available, span, tied, self.has_head, frozenset(offloaded))
        state = {name: tensor.to(self.dtype) for name, tensor in state.items()}
        missing, _ = model.load_state_dict(state, strict=False, assign=True)
        body = model.model
        # Modules a span does not own are dropped, so they hold no memory.
        if not span.is_first:
            body.embed_tokens = None
        if not self.has_head:
            body.norm = None
            model.lm_head = None
        streamed = tuple(f"model.layers.{index}." for index in offloaded)
        expected_missing = [
            name for name in missing
            if not name.startswith(("model.embed_tokens", "model.norm", "lm_head", *streamed))
        ]  # fmt: skip
        if expected_missing:
            raise SpanError(f"{model_dir}: checkpoint lacks {expected_missing[:5]} for span [{span.start}, {span.end})")
        # rotary inv_freq is a non-persistent buffer: it is not in the checkpoint, so rebuild it for real.
        body.rotary_emb = type(body.rotary_emb)(config=self.config)
        self.streamer: WeightStreamer | None = None
        if offloaded:
            tier = self.offload.tier or ("host" if self.device.type == "cuda" else "disk")
            self.streamer = WeightStreamer(body.layers, _offloaded_locations(available, span, offloaded), tier,
                                           self.dtype, self.device, self.offload.prefetch)  # fmt: skip
        self.model = model.to(self.device).eval()
        # Steps of a few positions (drafts, micro-batches) run on weights packed once for them,
        # unless the plan streams weights: then memory is what is short.
        self.packed: PackedSwitch | None = None
        if not offloaded and should_pack(self.device, self.dtype, self.weight_bytes(), packed):
            self.packed = pack_linears(self.model)
        self.load_seconds = time.perf_counter() - started
        self.layer_ms = 0.0  # running mean of measured ms per layer per forward
        self.last_layers_s = (0.0, 0.0)  # the last forward's decoder layers: wall and thread-CPU seconds

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def kv_bytes_per_token(self, resident: bool = True) -> int:
        """KV bytes per token of the layers whose cache stays in memory (or, resident=False, of those that don't)."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = self.span.length - len(self.kv_offloaded) if resident else len(self.kv_offloaded)
        return 2 * layers * cfg.num_key_value_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def weight_bytes(self) -> int:
        """Weights held resident (offloaded layers' placeholders count nothing; their slots are apart)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def weight_tiers(self) -> dict[str, int]:
        """Weight bytes per tier: resident, the two streaming slots, the lower tier, and the packed
        copy for steps of a few positions (packed.py)."""
        tiers = {"device": self.weight_bytes(), "slots": 0, "host": 0, "disk": 0,
                 "packed": self.packed.packed_bytes if self.packed else 0}
        if self.streamer is not None:
            tiers["slots"] = self.streamer.slot_bytes()
            tiers[self.streamer.tier] = self.streamer.offloaded_bytes()
        return tiers

    def _page_in(self, cache: DynamicCache, index: int) -> None:
        layer = cache.layers[index]
        if layer.is_initialized and layer.keys is not None and layer.keys.is_meta:
            store: KVStore = cache.bloombee_kv_store
            layer.keys, layer.values = store.page_in(index, layer.keys.shape[-2], self.device)

    def _page_out(self, cache: DynamicCache, index: int, changed_from: int | None = None) -> None:
        layer = cache.layers[index]
        store = getattr(cache, "bloombee_kv_store", None)
        if store is None:
            store = cache.bloombee_kv_store = attach_kv_store(cache, self.offload.kv_dir)
        store.page_out(index, layer.keys, layer.values, changed_from)
        layer.keys = torch.empty(layer.keys.shape, dtype=layer.keys.dtype, device="meta")
        layer.values = torch.empty(layer.values.shape, dtype=layer.values.dtype, device="meta")

    @torch.inference_mode()
    def copy_prefix(self, source: DynamicCache, target: DynamicCache, length: int) -> None:
        """Make ``target`` hold the first ``length`` positions of ``source`` (a fork of a shared prefix)."""
        for index, (held, layer) in enumerate(zip(source.layers, target.layers, strict=True)):
            offloaded = index in self.kv_offloaded
            if offloaded:
                self._page_in(source, index)
            copy_layer_prefix(held, layer, length)
            if offloaded:
                self._page_out(source, index)
                self._page_out(target, index, changed_from=0)  # whatever the target's file held is not its KV

    @torch.inference_mode()
    def rewind(self, cache: DynamicCache, start: int, tree_path: list[int] | None = None) -> None:
        """Make a session's cache hold exactly its first ``start`` positions, as the next step expects.

        ``tree_path``: the last step verified a draft tree and kept these nodes; their KV (at cache
        positions ``base + node``, ``base = start - len(tree_path)``) moves to ``base, base + 1, ...``
        first (``keep_path``). An offloaded layer is paged in for the move and its moved positions
        written back: its file holds the tree's order until then, and a later page-in reads the file.
        """
        path = list(tree_path or [])
        base = start - len(path)
        if not path_moves(path):
            truncate_cache(cache, start)
            return
        paged = [index for index in sorted(self.kv_offloaded) if cache.layers[index].is_initialized]
        for index in paged:
            self._page_in(cache, index)
        keep_path(cache, base, path)
        truncate_cache(cache, start)
        for index in paged:
            self._page_out(cache, index, changed_from=base)

    @torch.inference_mode()
    def forward_rows(self, inputs: torch.Tensor, caches: list[DynamicCache], lengths: list[int],
                     keep: list[int] | None = None, trees: list[list[int] | None] | None = None,
                     features: list[int] | None = None, verifying: bool = False) -> Any:  # fmt: skip
        """Run the span on a micro-batch: row b appends ``lengths[b]`` positions of ``inputs`` to ``caches[b]``.

        inputs: token ids [rows, positions] (first stage) or hidden states [rows, positions,
        hidden], each row right-padded. Returns hidden states [rows, positions, hidden] (padding
        zeroed), or with a head the logits of each row's last ``keep[b]`` real positions, one
        [keep[b], vocab] tensor per row.

        ``trees[b]``: row b's last ``len(trees[b])`` positions are a draft tree (parents as in
        ``RowMeta.tree``): each node attends to the row's earlier positions and its ancestors
        only, at the position of its depth (``tree_layout``); all nodes enter the cache, and the
        next step keeps the accepted path (``keep_path``). ``features[b]`` (a head only): also
        return the final hidden state (after the norm: what the head reads) of row b's last
        ``features[b]`` positions, as a second list.

        ``verifying``: the step checks drafted positions. Such steps and micro-batches run on the
        packed weights where there are some (packed.py); one session's plain step runs exactly
        as transformers' ``generate`` does.
        """
        few_positions = verifying or inputs.shape[0] > 1 or any(trees or [])
        with self.packed.turned(few_positions) if self.packed else nullcontext():
            return self._forward_rows(inputs, caches, lengths, keep, trees, features)

    def _forward_rows(self, inputs: torch.Tensor, caches: list[DynamicCache], lengths: list[int],
                      keep: list[int] | None, trees: list[list[int] | None] | None,
                      features: list[int] | None) -> Any:  # fmt: skip
        body = self.model.model
        started, started_cpu = time.perf_counter(), time.thread_time()
        rows, width = inputs.shape[0], inputs.shape[1]
        hidden = body.embed_tokens(inputs.to(self.device)) if self.span.is_first else inputs.to(self.device, self.dtype)
        layouts = [tree_layout(length, tree) if tree else None
                   for length, tree in zip(lengths, trees or [None] * rows, strict=True)]  # fmt: skip
        if rows == 1 and layouts[0] is not None:  # one session's tree: its own mask and positions
            hidden = hidden[:, : lengths[0]]
            past = caches[0].get_seq_length()
            offsets, allowed = layouts[0]
            position_ids = (past + offsets).to(self.device).unsqueeze(0)
            seen = torch.ones(lengths[0], past, dtype=torch.bool)
            mask = torch.cat([seen, allowed], dim=1).to(self.device).view(1, 1, lengths[0], -1)
            layer_cache: DynamicCache | _PaddedRows = caches[0]
        elif rows == 1:  # one session: transformers' own mask and cache path, exactly as generate runs it
            hidden = hidden[:, : lengths[0]]
            past = caches[0].get_seq_length()
            position_ids = torch.arange(past, past + lengths[0], device=self.device).unsqueeze(0)
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                      cache=caches[0], position_ids=position_ids)  # fmt: skip
            layer_cache = caches[0]
        else:
            layer_cache = _PaddedRows(caches, lengths, layouts)
            position_ids = layer_cache.position_ids(width, self.device)
            mask = layer_cache.mask(width, self.device)
        position_embeddings = body.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in enumerate(body.layers):
            if self.streamer is not None:
                self.streamer.before(index)
            if index in self.kv_offloaded:
                for cache in caches:
                    self._page_in(cache, index)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=layer_cache, use_cache=True)  # fmt: skip
            if index in self.kv_offloaded:
                for cache in caches:
                    self._page_out(cache, index)
            if self.streamer is not None:
                self.streamer.after(index)
        self.last_layers_s = (time.perf_counter() - started, time.thread_time() - started_cpu)
        elapsed_ms = self.last_layers_s[0] * 1000 / self.span.length
        self.layer_ms = elapsed_ms if self.layer_ms == 0 else 0.9 * self.layer_ms + 0.1 * elapsed_ms
        if not self.has_head:
            if hidden.shape[1] < width:  # the one-row path ran on the real positions only
                hidden = torch.nn.functional.pad(hidden, (0, 0, 0, width - hidden.shape[1]))
            for row, length in enumerate(lengths):
                hidden[row, length:] = 0
            return hidden
        keep = keep or [1] * rows
        wanted = features or [0] * rows
        wide = [max(kept, asked) for kept, asked in zip(keep, wanted, strict=True)]
        picked = torch.cat([hidden[row, length - width : length] for row, (length, width)
                            in enumerate(zip(lengths, wide, strict=True))])  # fmt: skip
        normed = body.norm(picked).split(wide)
        if wide == keep:
            logits = self.model.lm_head(torch.cat(normed)).split(keep)
        else:  # the head only where logits are wanted: it costs far more than the norm
            logits = self.model.lm_head(torch.cat([part[width - kept :] for part, width, kept
                                                   in zip(normed, wide, keep, strict=True)])).split(keep)  # fmt: skip
        if features is None:
            return list(logits)
        return list(logits), [part[width - asked :] for part, width, asked in zip(normed, wide, wanted, strict=True)]

    def forward(self, inputs: torch.Tensor, cache: DynamicCache, keep_last: int = 1) -> torch.Tensor:
        """One session: ``inputs`` [1, positions(, hidden)]; logits come back as [1, keep_last, vocab]."""
        output = self.forward_rows(inputs, [cache], [inputs.shape[1]], [keep_last])
        return output[0].unsqueeze(0) if isinstance(output, list) else output


PADDED_VIEW_LIMIT = 1.5  # sessions keep views of a step's padded KV while it is at most this × their positions


class _PaddedRows:
    """Several sessions' caches shown to a decoder layer as one batch: pasts left-padded to the longest.

    ``update`` appends each row's real new keys and values to its own session cache and returns
    the padded batch for attention; ``mask`` hides the padding (past and new) and keeps the new
    positions causal.
    """

    def __init__(self, caches: list[DynamicCache], lengths: list[int],
                 layouts: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> None:  # fmt: skip
        self.caches = caches
        self.lengths = lengths
        self.layouts = layouts or [None] * len(caches)
        self.pasts = [cache.get_seq_length() for cache in caches]
        self.longest = max(self.pasts)

    def position_ids(self, width: int, device: torch.device) -> torch.Tensor:
        offsets = torch.arange(width).repeat(len(self.caches), 1)
        for row, layout in enumerate(self.layouts):
            if layout is not None:
                offsets[row, : self.lengths[row]] = layout[0]
        return (torch.tensor(self.pasts).unsqueeze(1) + offsets).to(device)

    def mask(self, width: int, device: torch.device) -> torch.Tensor:
        """bool [rows, 1, width, longest + width]: True where a query may attend."""
        columns = torch.arange(self.longest + width, device=device)
        queries = torch.arange(width, device=device).unsqueeze(1)
        past = torch.tensor(self.pasts, device=device).view(-1, 1, 1)
        real = torch.tensor(self.lengths, device=device).view(-1, 1, 1)
        in_past = (columns < self.longest) & (columns >= self.longest - past)
        new = columns - self.longest
        in_new = (new >= 0) & (new <= queries) & (new < real)
        for row, layout in enumerate(self.layouts):
            if layout is not None:  # a draft tree: its nodes see their ancestors only
                length = self.lengths[row]
                in_new[row, :length, self.longest : self.longest + length] = layout[1].to(device)
        return (in_past | in_new).unsqueeze(1)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return self._padded(keys, layer_idx, "keys"), self._padded(values, layer_idx, "values")

    def _padded(self, new: torch.Tensor, layer_idx: int, kind: str) -> torch.Tensor:
        """The batch's pasts left-padded to the longest, then the new positions; each session's
        cache becomes a view of its own real positions in it (no second copy of its past). A view
        keeps the whole padded batch alive, so where padding would make that more than
        PADDED_VIEW_LIMIT times the real positions, each session gets its own copy instead."""
        rows, heads, width, dim = new.shape
        batch = new.new_empty(rows, heads, self.longest + width, dim)
        shared = rows * (self.longest + width) <= PADDED_VIEW_LIMIT * (sum(self.pasts) + sum(self.lengths))
        batch[:, :, self.longest :] = new
        for row, cache in enumerate(self.caches):
            held, pad = self.pasts[row], self.longest - self.pasts[row]
            layer = cache.layers[layer_idx]
            if pad:
                batch[row, :, :pad] = 0
            if held:
                batch[row, :, pad : self.longest] = getattr(layer, kind)[0]
            if not layer.is_initialized:
                layer.lazy_initialization(new, new)
            own = batch[row : row + 1, :, pad : self.longest + self.lengths[row]]
            setattr(layer, kind, own if shared else own.clone())
        return batch


def tree_layout(length: int, tree: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A row of ``length`` new positions whose last ``len(tree)`` are a draft tree: each position's
    offset from the row's first (its depth along its path) and bool [length, length], which new
    positions each may attend to (itself and its ancestors; the undrafted positions are a chain)."""
    first = length - len(tree)
    parents = list(range(-1, first - 1)) + [first - 1 if parent < 0 else first + parent for parent in tree]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    offsets = torch.zeros(length, dtype=torch.int64)
    for index, parent in enumerate(parents):
        if parent >= 0:
            allowed[index] = allowed[parent]
            offsets[index] = offsets[parent] + 1
        allowed[index, index] = True
    return offsets, allowed


def path_moves(nodes: list[int]) -> bool:
    """Whether keeping a tree's accepted ``nodes`` moves any KV: not when they are its first nodes,
    as a chain's always are (nor when there are none)."""
    return nodes != list(range(len(nodes)))


def keep_path(cache: DynamicCache, base: int, nodes: list[int]) -> None:
    """Move the KV of a draft tree's accepted ``nodes`` (cache positions ``base + node``) to
    ``base, base + 1, ...``; the caller then cuts the cache at the accepted length."""
    if not path_moves(nodes):
        return
    index = torch.tensor([base + node for node in nodes])
    for number, layer in enumerate(cache.layers):
        if layer.keys is None:
            continue
        if layer.keys.is_meta:  # its KV is in a file (offloaded): moving nothing here would keep the wrong nodes
            raise ValueError(f"cache layer {number} is paged out; page it in before moving a tree's path (rewind)")
        for kind in ("keys", "values"):
            held = getattr(layer, kind)
            moved = held.index_select(2, index.to(held.device))
            kept = torch.cat([held[:, :, :base], moved, held[:, :, base + len(nodes) :]], dim=2)
            setattr(layer, kind, kept)


def copy_layer_prefix(source: Any, target: Any, length: int) -> None:
    """Make cache layer ``target`` hold a copy of the first ``length`` positions of ``source``."""
    keys, values = source.keys[:, :, :length].clone(), source.values[:, :, :length].clone()
    if not target.is_initialized:
        target.lazy_initialization(keys, values)
    target.keys, target.values = keys, values


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop cached positions past ``length`` (the KV rollback)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
