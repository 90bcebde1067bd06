"""Quantized blocks cached on disk, so a second load of the same checkpoint does not quantize again.

One safetensors file per block holds the block exactly as its packed layout lays it out in memory
(offload/packed.py: packed values, scales, minimums and 16-bit tensors in one flat byte buffer),
as a single uint8 tensor, with the layout's entries in the metadata. A second load reads each file
straight into the buffer the block lives in, in parallel pieces: at the disk's speed, with no
second copy. Files live under OFFLOADGEN_CACHE/quantized/<model>-<key>; the key covers the
checkpoint's path, its files' sizes and modification times, the bits, the group size and the
dtype. Files are written to a temporary name and renamed, so a killed load never leaves half a
block behind; one whose layout differs (or is damaged) is quantized again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import OffloadgenError
from ..machine import cache_root
from ..safetensors_io import SafetensorsFile, write_safetensors

CACHE_VERSION = 2  # 2: one flat packed buffer per block (1: one tensor per entry)


def layout_signature(layout) -> str:
    """The byte layout a cached block must have to be read into this run's buffer."""
    return json.dumps([[k, off, str(dt), list(shape)] for k, (off, dt, shape) in sorted(layout.entries.items())]
                      + [layout.nbytes], separators=(",", ":"))


class QuantCache:
    def __init__(self, folder: Path, quant, dtype: torch.dtype):
        files = sorted(Path(folder).glob("*.safetensors"))
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        key = hashlib.sha1(f"{Path(folder).resolve()}|{stamp}|{quant.bits}|{quant.group_size}|{dtype}|{CACHE_VERSION}"
                           .encode()).hexdigest()[:16]
        self.dir = cache_root() / "quantized" / f"{Path(folder).name}-q{quant.bits}g{quant.group_size}-{key}"

    def _file(self, block) -> Path:
        return self.dir / f"block-{block}.safetensors"

    def load_into(self, block, layout, flat: torch.Tensor) -> bool:
        """Read the cached block into flat (its packed buffer, on any device); False where it is
        absent, damaged or laid out otherwise (quantize again)."""
        try:
            f = SafetensorsFile(self._file(block))
        except (OSError, OffloadgenError):
            return False
        try:
            if (list(f.keys()) != ["block"] or f.metadata.get("layout") != layout_signature(layout)
                    or f.dtype_name("block") != "U8" or f.nbytes("block") != layout.nbytes):
                return False
            if flat.device.type == "cpu":
                f.read_into("block", flat[:layout.nbytes])
            else:
                flat[:layout.nbytes].copy_(f.read("block"))
            return True
        except OffloadgenError:
            return False
        finally:
            f.close()

    def save(self, block, layout, flat: torch.Tensor) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._file(block).with_suffix(f".tmp{os.getpid()}")
            write_safetensors(tmp, {"block": flat[:layout.nbytes].cpu()}, {"layout": layout_signature(layout)})
            os.replace(tmp, self._file(block))
        except OSError:
            pass  # a full or read-only disk costs a re-quantization next time, nothing else
