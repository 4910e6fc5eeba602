"""Offloading: a stage's weights and KV cache beyond its device budget, streamed in per layer.

Tiers: *device* (GPU memory under CUDA, else the process's own working set), *host* (pinned
memory under CUDA) and *disk* (the safetensors file itself for weights; a file per session for
cold KV). ``--offload-weights F`` keeps the weights of a fraction F of the span's layers in the
lower tier; ``--offload-kv G`` keeps the KV cache of a fraction G of the layers there.

Which layers: spread evenly through the span (``spread``), not bunched at its end, so every
offloaded layer's load overlaps the compute of the layer before it, resident or not.

Order (FlexGen's zig-zag, arXiv 2303.06865, on our step shape): a step carries every sequence of
its micro-batch at once, so a loaded layer serves the whole micro-batch before it is dropped and
weights cross the tier boundary once per step, not once per sequence. Two device slots
double-buffer the stream: while layer k runs from one slot, a background thread reads the next
offloaded layer into the other; after the last offloaded layer, it reads the first one again, so
the next step starts with it in place. Without prefetch the read happens when the layer is due.

Disk reads use ``pread`` into the slot's own buffer: the weights never enter the process's
resident set except in the two slots (the OS page cache may keep the file, which is memory the
kernel can reclaim, not the process's).

KV of an offloaded layer lives in a file, laid out position-major ([seq, batch, heads, dim]) so
a step appends only its new positions; between steps the cache holds a shape-only (meta)
placeholder, so lengths, masks and rollbacks work unchanged, and the layer's keys and values are
read back just before it runs.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
_ALIGN = 64


def spread(count: int, fraction: float) -> list[int]:
    """Indices of round(count * fraction) of ``count`` layers, evenly spread."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"offload fraction {fraction} is not between 0 and 1")
    chosen = round(count * fraction)
    return sorted({math.floor((k + 0.5) * count / chosen) for k in range(chosen)}) if chosen else []


@dataclass(frozen=True)
class TensorLocation:
    name: str  # inside the layer module, e.g. "self_attn.q_proj.weight"
    path: Path
    offset: int  # absolute, in bytes
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def safetensors_locations(path: Path) -> dict[str, TensorLocation]:
    """Every tensor's place in a safetensors file, from its header (8-byte length + JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    locations = {}
    for name, entry in header.items():
        if name != "__metadata__":
            start, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            locations[name] = TensorLocation(name, path, base + start, end - start, tuple(entry["shape"]), dtype)
    return locations


def _set_parameter(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


@dataclass
class StreamStats:
    bytes_read: int = 0
    read_seconds: float = 0.0
    stall_seconds: float = 0.0  # compute waiting for a layer that was not there yet
    loads: int = 0


class WeightStreamer:
    """Keeps offloaded layers' weights in the host or disk tier and streams them into two slots."""

    def __init__(
        self, layers: nn.ModuleList, locations: dict[int, list[TensorLocation]], tier: str, dtype: torch.dtype,
        device: torch.device, prefetch: bool = True,
    ) -> None:  # fmt: skip
        if tier not in ("host", "disk"):
            raise ValueError(f"offload tier {tier!r}: host or disk")
        self.layers, self.locations, self.tier = layers, locations, tier
        self.dtype, self.device, self.prefetch = dtype, device, prefetch
        self.order = sorted(locations)
        self.stats = StreamStats()
        self._files = {path: os.open(path, os.O_RDONLY) for path in {loc.path for locs in locations.values()
                                                                      for loc in locs}}  # fmt: skip
        self._layout = {index: self._plan_layout(locs) for index, locs in locations.items()}
        slot_bytes = max((size for _, size in self._layout.values()), default=0)
        pin = device.type == "cuda"
        self._staging = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._slots = self._staging if device.type == "cpu" else [
            torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2)]  # fmt: skip
        self._host = {index: self._read_layer(index, torch.empty(self._layout[index][1], dtype=torch.uint8,
                                                                  pin_memory=pin))
                      for index in self.order} if tier == "host" else {}  # fmt: skip
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, tuple[Future, int]] = {}
        self._next_slot = 0  # slots alternate per load, so a prefetch never lands in the slot in use
        self._placeholder = torch.empty(0, dtype=dtype, device=device)
        for index in self.order:
            self._uninstall(index)

    @staticmethod
    def _plan_layout(locations: list[TensorLocation]) -> tuple[list[int], int]:
        offsets, cursor = [], 0
        for location in locations:
            offsets.append(cursor)
            cursor += -(-location.nbytes // _ALIGN) * _ALIGN
        return offsets, cursor

    # -- bytes per tier --------------------------------------------------------------------------

    def describe(self) -> dict[str, float]:
        """What streaming cost while serving: the planner's host bandwidth comes from here."""
        stats = self.stats
        rate = stats.bytes_read / stats.read_seconds if stats.read_seconds else 0.0
        return {"bytes_read": stats.bytes_read, "read_seconds": round(stats.read_seconds, 4),
                "stall_seconds": round(stats.stall_seconds, 4), "loads": stats.loads, "read_bps": rate}  # fmt: skip

    def offloaded_bytes(self) -> int:
        return sum(size for _, size in self._layout.values())

    def slot_bytes(self) -> int:
        return sum(slot.numel() for slot in self._slots)

    # -- loading ---------------------------------------------------------------------------------

    def _read_layer(self, index: int, into: torch.Tensor) -> torch.Tensor:
        offsets, _ = self._layout[index]
        started = time.perf_counter()
        view = memoryview(into.numpy())
        for location, start in zip(self.locations[index], offsets, strict=True):
            done = os.preadv(self._files[location.path], [view[start : start + location.nbytes]], location.offset)
            if done != location.nbytes:
                raise OSError(f"{location.path}: short read of {location.name} ({done} of {location.nbytes} bytes)")
        self.stats.read_seconds += time.perf_counter() - started
        self.stats.bytes_read += sum(loc.nbytes for loc in self.locations[index])
        return into

    def _load(self, index: int, slot: int) -> None:
        """Runs on the offload thread: bring layer ``index`` into ``slot``."""
        size = self._layout[index][1]
        on_disk = self.tier == "disk"
        source = self._read_layer(index, self._staging[slot][:size]) if on_disk else self._host[index]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._slots[slot][:size].copy_(source, non_blocking=True)
            self._stream.synchronize()
        elif source.data_ptr() != self._slots[slot].data_ptr():
            self._slots[slot][:size].copy_(source)
        self.stats.loads += 1

    def _start(self, index: int) -> None:
        if index not in self._pending:
            slot, self._next_slot = self._next_slot, 1 - self._next_slot
            self._pending[index] = (self._worker.submit(self._load, index, slot), slot)

    def before(self, index: int) -> None:
        """Called before layer ``index`` runs: its weights in place, the next offloaded layer on its way."""
        if index not in self.locations:
            return
        self._start(index)
        started = time.perf_counter()
        loading, slot_index = self._pending.pop(index)
        loading.result()
        self.stats.stall_seconds += time.perf_counter() - started
        slot = self._slots[slot_index]
        offsets, _ = self._layout[index]
        for location, start in zip(self.locations[index], offsets, strict=True):
            raw = slot[start : start + location.nbytes].view(location.dtype).view(location.shape)
            _set_parameter(
                self.layers[index], location.name, raw if location.dtype == self.dtype else raw.to(self.dtype)
            )
        if self.prefetch and len(self.order) > 1:
            self._start(self.order[(self.order.index(index) + 1) % len(self.order)])

    def after(self, index: int) -> None:
        if index in self.locations:
            self._uninstall(index)

    def _uninstall(self, index: int) -> None:
        for location in self.locations[index]:
            _set_parameter(self.layers[index], location.name, self._placeholder)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()


@dataclass
class _StoredLayer:
    length: int = 0  # positions on disk that are still valid
    row_shape: tuple[int, ...] = ()  # (batch, heads, dim)
    dtype: torch.dtype = torch.float32


@dataclass
class KVStore:
    """A session's offloaded KV layers, one file each, position-major so steps only append."""

    directory: Path
    layers: dict[int, _StoredLayer] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_read: int = 0

    def _path(self, index: int, kind: str) -> Path:
        return self.directory / f"layer{index}.{kind}"

    def page_out(self, index: int, keys: torch.Tensor, values: torch.Tensor, changed_from: int | None = None) -> None:
        """Write layer ``index``'s positions that the file does not hold yet. A step only appends, so
        that is the new positions; a caller that rewrote earlier ones (a draft tree's accepted path
        moved into place) names the first of them in ``changed_from``, or the file keeps stale KV."""
        stored = self.layers.setdefault(index, _StoredLayer())
        total = keys.shape[-2]
        rows = (keys.shape[0], keys.shape[1], keys.shape[3])
        if rows != stored.row_shape or keys.dtype != stored.dtype:
            stored.length, stored.row_shape, stored.dtype = 0, rows, keys.dtype
        start = min(stored.length, total)
        if changed_from is not None:
            start = min(start, max(0, changed_from))
        row_bytes = math.prod(rows) * keys.element_size()
        for kind, tensor in (("k", keys), ("v", values)):
            fresh = tensor[:, :, start:, :].permute(2, 0, 1, 3).contiguous().cpu()
            with open(self._path(index, kind), "r+b" if start else "wb") as handle:
                handle.seek(start * row_bytes)
                handle.write(fresh.view(torch.uint8).numpy().tobytes())
            self.bytes_written += fresh.numel() * fresh.element_size()
        stored.length = total

    def page_in(self, index: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stored = self.layers[index]
        if length > stored.length:
            raise RuntimeError(f"KV layer {index}: {length} positions wanted, {stored.length} on disk")
        stored.length = length  # a rollback shortened the cache: later positions are stale
        count = length * math.prod(stored.row_shape)
        pair = []
        for kind in ("k", "v"):
            flat = torch.from_file(str(self._path(index, kind)), shared=False, size=count, dtype=stored.dtype)
            pair.append(flat.view(length, *stored.row_shape).permute(1, 2, 0, 3).contiguous().to(device))
            self.bytes_read += flat.numel() * flat.element_size()
        return pair[0], pair[1]


def attach_kv_store(cache: object, root: Path | None) -> KVStore:
    """A KV store for one session's cache; its files go when the cache is garbage."""
    directory = Path(tempfile.mkdtemp(prefix="bloombee-kv-", dir=root))
    store = KVStore(directory)
    weakref.finalize(cache, _remove_tree, directory)
    return store


def _remove_tree(directory: Path) -> None:
    for path in directory.glob("*"):
        path.unlink(missing_ok=True)
    directory.rmdir()


def measure_bandwidth(path: Path, nbytes: int = 64 << 20) -> dict[str, float]:
    """Tier bandwidths in bytes/s, measured once at start-up: file reads (first and repeated) and host copies.

    The first read of a region may come from the disk, a repeated one comes from the page cache:
    offloaded weights that fit in the machine's free memory stream at the second speed after the
    first step, larger ones at the first (``stream_bandwidth``).
    """
    size = min(nbytes, os.path.getsize(path))
    buffer = torch.empty(size, dtype=torch.uint8)
    descriptor = os.open(path, os.O_RDONLY)
    reads = []
    try:
        for _ in range(2):
            started = time.perf_counter()
            os.preadv(descriptor, [memoryview(buffer.numpy())], 0)
            reads.append(size / max(time.perf_counter() - started, 1e-9))
    finally:
        os.close(descriptor)
    target = torch.empty_like(buffer)
    started = time.perf_counter()
    target.copy_(buffer)
    host = size / max(time.perf_counter() - started, 1e-9)
    result = {"disk_read_bps": reads[0], "cached_read_bps": reads[1], "host_copy_bps": host}
    if torch.cuda.is_available():
        pinned = buffer.pin_memory()
        device_buffer = torch.empty(size, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        device_buffer.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        result["host_to_device_bps"] = size / max(time.perf_counter() - started, 1e-9)
    return result


def _read_number(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


CGROUP_MEMORY_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_memory() -> int | None:
    """Bytes this process could still be handed: the host's MemAvailable, or less where its
    container's memory limit (cgroup v2, else v1) leaves less; None where neither can be read
    (0 is a full container, not an unknown).

    A pod sees the host's /proc/meminfo, so the limit is what counts there; the page cache is
    charged to the cgroup too, which is why offloaded files are judged cached against this."""
    free = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for limit_file, usage_file in CGROUP_MEMORY_FILES:
        limit, usage = _read_number(limit_file), _read_number(usage_file)
        if limit is not None and usage is not None:
            room = max(0, limit - usage)
            free = room if free is None else min(free, room)
            break
    return free


def stream_bandwidth(bandwidth: dict[str, float], tier: str, offloaded_bytes: int) -> float:
    """The rate a stage streams offloaded weights at, for the planner: see ``measure_bandwidth``."""
    if tier == "host":
        rate = bandwidth["host_copy_bps"]
    else:
        cached = offloaded_bytes < (available_memory() or 0)  # unknown memory: assume the disk's rate
        rate = bandwidth["cached_read_bps"] if cached else bandwidth["disk_read_bps"]
    if "host_to_device_bps" in bandwidth:  # under CUDA the lower tier feeds a host-to-device copy
        rate = bandwidth["host_to_device_bps"] if tier == "host" else min(rate, bandwidth["host_to_device_bps"])
    return rate
