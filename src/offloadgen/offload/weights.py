"""Weight sources: where the engine gets each block's tensors, and the protocol they all follow."""
from __future__ import annotations

import sys
from typing import Protocol, runtime_checkable

import torch
from tqdm import tqdm

from ..models import blocks, family_of


@runtime_checkable
class WeightSource(Protocol):
    """What the engine and the benchmark may ask of any weight source.

    Blocks are asked for in pass order: get(block) returns {name: tensor on the compute device},
    valid until done(block). A streaming source copies ahead of use; a resident one just hands
    them out."""

    timings: dict  # start-up seconds and counts, for the benchmark's record
    disk: object | None  # the on-disk store (offload/disk.py) when weights are read from disk

    def get(self, block) -> dict[str, torch.Tensor]: ...

    def done(self, block) -> None: ...

    def get_experts(self, block, ids: list[int]) -> dict[str, torch.Tensor]:
        """Between get(block) and done(block) of an MoE layer: the tensors of its experts `ids`
        that get() did not hold (a source streaming experts on demand fetches them now)."""

    def reset(self) -> None:
        """Forget a pass that stopped midway (an out-of-memory retry starts from the first block)."""

    def copy_only_pass_s(self) -> float | None:
        """Seconds one pass's transfers take with no compute, or None where nothing streams."""

    def close(self) -> None:
        """Stop threads and release page-locked memory."""


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

    disk = None

    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True):
        self.cfg = checkpoint.cfg
        self.device = device
        self.timings: dict = {}
        self._blocks, shared = {}, {}
        for block in tqdm(blocks(self.cfg), desc="loading weights", unit="block", file=sys.stderr,
                          leave=False, disable=None if progress else True):  # None: only on a terminal
            self._blocks[block] = load_resident_block(checkpoint, block, dtype, device, shared)

    def get(self, block) -> dict[str, torch.Tensor]:
        return self._blocks[block]

    def done(self, block) -> None:
        pass

    def get_experts(self, block, ids: list[int]) -> dict[str, torch.Tensor]:
        return {}  # get() holds every expert

    def reset(self) -> None:
        pass

    def copy_only_pass_s(self) -> float | None:
        return None

    def close(self) -> None:
        pass

    def nbytes(self) -> int:
        unique = {t.data_ptr(): t for w in self._blocks.values() for t in w.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())
