"""Made-up weights for benchmarks: deterministic, non-zero, finite, and made at memory speed.

A random generator over 60 GB would take minutes, so one fixed pseudo-random pattern of about a
million values is made once and each tensor is tiled from it, starting at an offset derived from
the tensor's name (so tensors differ from each other).
"""
from __future__ import annotations

import zlib

import torch

from ..models import family_of

_PATTERN_LEN = (1 << 20) + 7  # odd length: consecutive rows of a matrix do not repeat in step
_patterns: dict[torch.dtype, torch.Tensor] = {}


def _pattern(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _patterns:
        g = torch.Generator().manual_seed(1234)
        _patterns[dtype] = (torch.randn(_PATTERN_LEN, generator=g) * 0.02).to(dtype)
    return _patterns[dtype]


def fill_dummy(out: torch.Tensor, name: str) -> torch.Tensor:
    """Fill `out` in place with the tiled pattern; norm weights near 1, like trained ones."""
    pattern = _pattern(out.dtype)
    flat = out.view(-1)
    pos, offset = 0, zlib.crc32(name.encode()) % _PATTERN_LEN
    while pos < flat.numel():
        take = min(_PATTERN_LEN - offset, flat.numel() - pos)
        flat[pos:pos + take].copy_(pattern[offset:offset + take])
        pos, offset = pos + take, 0
    if out.dim() == 1 and "norm" in name and not name.endswith("bias"):
        out.add_(1.0)
    return out


class DummyCheckpoint:
    path = None  # no files: nothing to cache quantized blocks for, nothing to fingerprint

    def __init__(self, cfg):
        self.cfg = cfg
        self.family = family_of(cfg)
        self.name = f"dummy-{cfg.model_type}"

    def read_block(self, block, dtype: torch.dtype, out: dict[str, torch.Tensor] | None = None,
                   skip=()) -> dict[str, torch.Tensor]:
        # Keyed by checkpoint name, so tied embeddings stay tied.
        return {local: fill_dummy(out[local] if out is not None else torch.empty(shape, dtype=dtype), hf_name)
                for local, (hf_name, shape) in self.family.block_tensors(self.cfg, block).items() if local not in skip}

    def tokenizer(self):
        from ..tokenizer import ByteTokenizer
        return ByteTokenizer(self.cfg)
