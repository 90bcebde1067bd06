"""Weight sources: objects with get(block) -> {name: tensor on the device} and done(block)."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..models import blocks


class ResidentWeights:
    """Every block loaded once onto the compute device: the no-offload case, and all CPU runs."""

    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True):
        self.cfg = checkpoint.cfg
        self.device = device
        self._blocks = {}
        for block in tqdm(blocks(self.cfg), desc="loading weights", unit="block", file=sys.stderr,
                          leave=False, disable=None if progress else True):  # None: only on a terminal
            self._blocks[block] = {k: v.to(device) for k, v in checkpoint.read_block(block, dtype).items()}

    def get(self, block) -> dict[str, torch.Tensor]:
        return self._blocks[block]

    def done(self, block) -> None:
        pass

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self._blocks.values() for t in w.values())
