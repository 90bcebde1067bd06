"""A Hugging Face model folder: config.json, *.safetensors (with or without an index), tokenizer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import OffloadgenError
from ..models import blocks, config_from_hf, family_of

# Checkpoints saved by older code name tensors without the model-class prefix (facebook's OPT:
# "decoder.layers.0..."; bigscience's BLOOM: "h.0..."), so each name is also tried without it.
_PREFIXES = ("model.", "transformer.")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise OffloadgenError(f"{self.path}: no config.json (is this a Hugging Face model folder?)")
        try:
            self.hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise OffloadgenError(f"{config_file}: not UTF-8 text (is it a config.json?)") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise OffloadgenError(f"{config_file}: not valid JSON ({e})") from None
        except OSError as e:
            raise OffloadgenError(f"{config_file}: cannot read it ({e.strerror})") from None
        self.cfg = config_from_hf(self.hf_config, str(config_file))
        self.family = family_of(self.cfg)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt*")):
                raise OffloadgenError(f"{self.path}: only pickled weights (*.bin/*.pt); offloadgen reads "
                                      "safetensors only, since unpickling can run arbitrary code")
            raise OffloadgenError(f"{self.path}: no *.safetensors files")
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise OffloadgenError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
            self._handles[f] = handle
            for key in handle.keys():
                self._where[key] = f
        self._check_complete()

    def _resolve(self, hf_name: str) -> str | None:
        if hf_name in self._where:
            return hf_name
        for prefix in _PREFIXES:
            if hf_name.startswith(prefix) and hf_name[len(prefix):] in self._where:
                return hf_name[len(prefix):]
        return None

    def _check_complete(self) -> None:
        """Every tensor the config implies must be present with its shape, before any is loaded."""
        for block in blocks(self.cfg):
            for hf_name, shape in self.family.block_tensors(self.cfg, block).values():
                key = self._resolve(hf_name)
                if key is None:
                    raise OffloadgenError(f"{self.path}: tensor {hf_name!r} is missing from the safetensors files")
                tensor = self._handles[self._where[key]].get_slice(key)
                found = tuple(tensor.get_shape())
                if found != tuple(shape):
                    raise OffloadgenError(f"{self.path}: tensor {hf_name!r} has shape {found}, "
                                          f"config.json implies {tuple(shape)}")
                if tensor.get_dtype() not in FLOAT_DTYPES:  # integers are quantized or not weights at all
                    raise OffloadgenError(f"{self.path}: tensor {hf_name!r} is stored as {tensor.get_dtype()}; "
                                          f"weights must be floating point ({', '.join(FLOAT_DTYPES)})")

    def read_block(self, block, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for local, (hf_name, _) in self.family.block_tensors(self.cfg, block).items():
            key = self._resolve(hf_name)
            try:
                t = self._handles[self._where[key]].get_tensor(key).to(dtype)
                # safetensors' buffers may be only 8-byte aligned; BLAS then takes other kernels, which
                # round differently (1 ulp between resident and streamed weights on the CPU) and run slower
                out[local] = t.clone() if t.data_ptr() % 64 else t
            except SafetensorError as e:
                raise OffloadgenError(f"{self._where[key]}: cannot read {key!r} ({e})") from None
            # One float64 sum per tensor (no copy): NaN or inf anywhere makes it non-finite.
            if not math.isfinite(out[local].sum(dtype=torch.float64)):
                raise OffloadgenError(f"{self._where[key]}: tensor {key!r} holds NaN or infinite values as "
                                      f"{str(dtype).replace('torch.', '')}: the checkpoint is damaged, or its values "
                                      "do not fit that dtype (try --dtype float32)")
        return out

    def tokenizer(self):
        from ..tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(self.path, self.cfg)
