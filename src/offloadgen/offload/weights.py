"""Weight sources: objects with get(block) -> {name: tensor on the device} and done(block)."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..models import blocks, family_of


def load_resident_block(checkpoint, block, dtype: torch.dtype, device: torch.device,
                        shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's tensors on the device; a tensor already loaded under the same checkpoint name (tied
    embeddings: the embedding matrix is also the LM head) is reused, so it takes memory once."""
    names = family_of(checkpoint.cfg).block_tensors(checkpoint.cfg, block)
    out = {}
    for local, t in checkpoint.read_block(block, dtype).items():
        key = names[local][0]
        if key not in shared:
            shared[key] = t.to(device)
        out[local] = shared[key]
    return out


class ResidentWeights:
    """Every block loaded once onto the compute device: the no-offload case, and all CPU runs."""

    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True):
        self.cfg = checkpoint.cfg
        self.device = device
        self._blocks, shared = {}, {}
        for block in tqdm(blocks(self.cfg), desc="loading weights", unit="block", file=sys.stderr,
                          leave=False, disable=None if progress else True):  # None: only on a terminal
            self._blocks[block] = load_resident_block(checkpoint, block, dtype, device, shared)

    def get(self, block) -> dict[str, torch.Tensor]:
        return self._blocks[block]

    def done(self, block) -> None:
        pass

    def nbytes(self) -> int:
        unique = {t.data_ptr(): t for w in self._blocks.values() for t in w.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())
