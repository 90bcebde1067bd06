"""Quantized blocks cached on disk, so a second load of the same checkpoint does not quantize again.

One safetensors file per block holds its packed values, scales and minimums (and its 16-bit
tensors), under OFFLOADGEN_CACHE/quantized/<model>-<key>. The key covers the checkpoint's path,
its files' sizes and modification times, the bits, the group size and the dtype. Files are written to a
temporary name and renamed, so a killed load never leaves half a block behind.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..machine import cache_root

CACHE_VERSION = 1


class QuantCache:
    def __init__(self, folder: Path, quant, dtype: torch.dtype):
        files = sorted(Path(folder).glob("*.safetensors"))
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        key = hashlib.sha1(f"{Path(folder).resolve()}|{stamp}|{quant.bits}|{quant.group_size}|{dtype}|{CACHE_VERSION}"
                           .encode()).hexdigest()[:16]
        self.dir = cache_root() / "quantized" / f"{Path(folder).name}-q{quant.bits}g{quant.group_size}-{key}"

    def _file(self, block) -> Path:
        return self.dir / f"block-{block}.safetensors"

    def load(self, block) -> dict[str, torch.Tensor] | None:
        try:
            return load_file(self._file(block))
        except (FileNotFoundError, SafetensorError, OSError):
            return None  # absent or damaged: quantize again

    def save(self, block, parts: dict[str, torch.Tensor]) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._file(block).with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous().cpu() for k, v in parts.items()}, str(tmp))
            os.replace(tmp, self._file(block))
        except OSError:
            pass  # a full or read-only disk costs a re-quantization next time, nothing else
