"""A stage's codec profiles, refined from its own frames (the cost rule is in bloombee_contract.codec_cost)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from bloombee_contract.codec_cost import COMPRESSING, DEFAULT_PROFILES, RAW, CodecProfile

from bloombee_stage.wire.codecs import CODECS


class CodecStats:
    """A stage's running profiles: every so often it codes a real frame with each codec and times it."""

    def __init__(self, dtype: str, codecs: Iterable[str] = COMPRESSING, sample_every: int = 64,
                 weight: float = 0.2) -> None:  # fmt: skip
        self.dtype = dtype
        self.profiles = {name: DEFAULT_PROFILES.get(dtype, {}).get(name, RAW) for name in codecs}
        self.sample_every = sample_every
        self.weight = weight
        self.frames = 0
        self.sampled = 0

    def maybe_sample(self, raw: bytes) -> None:
        """Profile the codecs on ``raw`` for the first few frames, then on one in ``sample_every``."""
        self.frames += 1
        if len(raw) < 4096 or (self.sampled >= 4 and self.frames % self.sample_every):
            return
        self.sampled += 1
        for name, old in self.profiles.items():
            codec = CODECS[name]
            started = time.perf_counter()
            encoded = codec.encode(raw, self.dtype)
            encoded_at = time.perf_counter()
            codec.decode(encoded, self.dtype, len(raw))
            decoded_at = time.perf_counter()
            seen = CodecProfile(len(raw) / max(len(encoded), 1), len(raw) / max(encoded_at - started, 1e-9),
                                len(raw) / max(decoded_at - encoded_at, 1e-9), old.overhead_s)  # fmt: skip
            self.profiles[name] = seen if old is RAW else self._blend(old, seen)

    def describe(self) -> dict[str, dict[str, float]]:
        return {
            name: {"ratio": round(p.ratio, 4), "encode_MBps": round(p.encode_bps / 1e6),
                   "decode_MBps": round(p.decode_bps / 1e6)}
            for name, p in self.profiles.items()
        }  # fmt: skip

    def _blend(self, old: CodecProfile, seen: CodecProfile) -> CodecProfile:
        a = self.weight
        return CodecProfile(*((1 - a) * x + a * y for x, y in zip(
            (old.ratio, old.encode_bps, old.decode_bps), (seen.ratio, seen.encode_bps, seen.decode_bps),
            strict=True)), old.overhead_s)  # fmt: skip
