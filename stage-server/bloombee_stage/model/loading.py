"""The converted-model cache: a HF directory for any model source (``bloombee_contract.model_source``).

GGUF is slow to read (de-quantisation takes ~15 s for SmolLM2) and transformers refuses
``save_pretrained`` on a model loaded from it, so a GGUF source is converted once into a plain
HF directory under the cache (rebuilt from its config without ``quantization_config``). The
conversion runs under a file lock and is moved into place with one ``rename``: two stages that
start at once on one node never read a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bloombee_contract.model_source import ModelSource, ModelSourceError, resolve_source

log = logging.getLogger(__name__)

CONVERTED_MARKER = "bloombee-converted.json"


def cache_root() -> Path:
    return Path(os.environ.get("BLOOMBEE_CACHE", Path.home() / ".cache" / "bloombee"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_cache_dir(source: ModelSource) -> Path:
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "models" / f"{source.path.stem}-{key[:16]}"


def prepare_model(text: str) -> Path:
    """Return a HF directory for the source, converting (once, under a lock) when it is GGUF."""
    source = resolve_source(text)
    if source.kind != "gguf":
        return source.hf_dir
    target = _gguf_cache_dir(source)
    if (target / CONVERTED_MARKER).is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / CONVERTED_MARKER).is_file():  # another process finished while we waited
            return target
        log.info("converting %s to a HF directory under %s (one time, ~20 s)", source.path, target)
        scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            _convert_gguf(source.path, scratch)
            (scratch / CONVERTED_MARKER).write_text(json.dumps({"source": text}))
            if target.exists():  # a stale, unmarked directory from a crashed conversion
                shutil.rmtree(target)
            os.rename(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    # save_pretrained refuses a model that carries a GGUF quantization_config; the weights are
    # already de-quantised, so a fresh model from the bare config holds them faithfully.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def read_config(model_dir: Path) -> dict:
    """The model's config.json as a dict (no torch needed)."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def main(argv: list[str] | None = None) -> None:
    """`python -m bloombee_stage.model SOURCE`: convert if needed and print the model's config as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source", help="gguf://package/file.gguf, a .gguf/.safetensors file or a HF directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_dir = prepare_model(args.source)
    except ModelSourceError as error:
        raise SystemExit(f"error: {error}") from None
    # One JSON line: the model's config plus where it lives, for the control plane (which has no torch).
    print(json.dumps({**read_config(model_dir), "model_dir": str(model_dir)}))


if __name__ == "__main__":
    main()
