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


RESIDENT_READ_THREADS = 4  # blocks read at once; each read is itself split over the reader pool


def load_resident_blocks(checkpoint, block_list: list, dtype: torch.dtype, device: torch.device,
                         on_done=None) -> dict:
    """{block: {name: tensor on the device}}, several blocks read at once, so that the disk stays busy
    while earlier blocks are checked and copied. A tensor an earlier block holds under the same
    checkpoint name (tied embeddings: the embedding matrix is also the LM head) is not read again:
    it is shared, and takes memory once. On the CPU the files are read into the final tensors."""
    from concurrent.futures import ThreadPoolExecutor
    family = family_of(checkpoint.cfg)
    names = {b: family.block_tensors(checkpoint.cfg, b) for b in block_list}
    first: dict[str, tuple] = {}
    for b in block_list:
        for local, (hf_name, _) in names[b].items():
            first.setdefault(hf_name, (b, local))
    tied = {b: {local: first[hf] for local, (hf, _) in names[b].items() if first[hf] != (b, local)} for b in block_list}
    out: dict = {}

    def load(b) -> None:
        tensors = checkpoint.read_block(b, dtype, skip=set(tied[b]))
        out[b] = {local: t.to(device) for local, t in tensors.items()}
        if on_done is not None:
            on_done()
    with ThreadPoolExecutor(max_workers=RESIDENT_READ_THREADS, thread_name_prefix="offloadgen-load") as pool:
        list(pool.map(load, block_list))
    for b in block_list:
        for local, (src_block, src_local) in tied[b].items():
            out[b][local] = out[src_block][src_local]
    return {b: {local: out[b][local] for local in names[b]} for b in block_list}  # in the family's order


class ResidentWeights:
    """Every block loaded once onto the compute device: the no-offload case, and all CPU runs."""

    disk = None

    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, progress: bool = True):
        self.cfg = checkpoint.cfg
        self.device = device
        self.timings: dict = {}
        bar = tqdm(total=len(blocks(self.cfg)), desc="loading weights", unit="block", file=sys.stderr,
                   leave=False, disable=None if progress else True)  # None: only on a terminal
        self._blocks = load_resident_blocks(checkpoint, blocks(self.cfg), dtype, device, on_done=bar.update)
        bar.close()

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
