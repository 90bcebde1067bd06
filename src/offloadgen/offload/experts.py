"""Expert-aware streaming for mixture-of-experts layers (docs/moe-streaming.md).

A streamed MoE layer's packed block holds its trunk (attention, norms, router, shared expert)
first and then each expert, contiguous. The ring copies only the trunk ahead of use; once the
layer's routing is known the engine asks for the routed experts, and each one not already on the
GPU crosses the bus as one copy of its byte span. An expert cache (GPU slots of one expert each)
keeps the most used experts between passes: least-frequently-used eviction, with every count
halved now and then so that the cache follows routing as it drifts.
"""
from __future__ import annotations

import collections

import torch

from ..models.moe import experts_of

# A layer whose missed experts are at least this share of its experts is copied as one span
# (prefill, large batches): one large copy runs at full bus speed, many small ones do not.
WHOLE_SPAN_SHARE = 0.75


class ExpertLayout:
    """Where a layer's trunk and experts lie in its packed block."""

    def __init__(self, packed):
        self.names: dict[int, set[str]] = {}
        for local in _locals(packed):
            e = experts_of(local)
            if e is not None:
                self.names.setdefault(e, set()).add(local)
        self.trunk_names = {n for n in _locals(packed) if experts_of(n) is None}
        self.spans = {e: packed.span(self.names[e]) for e in sorted(self.names)}
        self.trunk_nbytes = min(lo for lo, _ in self.spans.values())  # the trunk is the block's front
        self.first, self.last = self.trunk_nbytes, max(hi for _, hi in self.spans.values())

    @property
    def expert_nbytes(self) -> int:
        return max(hi - lo for lo, hi in self.spans.values())


def _locals(packed) -> set[str]:
    """A packed block's tensor names (a quantized tensor's three entries are one tensor)."""
    return set(packed.quantized) | {k for k in packed.entries if k.rsplit(".", 1)[0] not in packed.quantized}


def expert_layouts(layouts: dict) -> dict:
    """ExpertLayout of each block that holds experts."""
    out = {}
    for b, packed in layouts.items():
        if isinstance(b, int) and any(experts_of(k) is not None for k in packed.entries):
            out[b] = ExpertLayout(packed)
    return out


class ExpertCache:
    """Which (layer, expert) sits in which GPU slot. Counts every request, cached or not; evicts
    the least-counted expert when a more-counted one is missed; halves every count once per
    `age_every` requests."""

    def __init__(self, slots: int, age_every: int = 4096):
        self.slots = slots
        self.where: dict[tuple, int] = {}
        self.free = list(range(slots))
        self.count: collections.Counter = collections.Counter()
        self.requests, self.age_every = 0, age_every

    def request(self, keys: list[tuple]) -> None:
        for k in keys:
            self.count[k] += 1
        self.requests += 1
        if self.requests % self.age_every == 0:
            for k in list(self.count):
                self.count[k] /= 2

    def admit(self, key: tuple, keep: set) -> int | None:
        """A slot for a missed expert, evicting a less used one (not one in `keep`); None: copy it
        into the ring for this pass only."""
        if self.free:
            slot = self.free.pop()
        else:
            victims = [k for k in self.where if k not in keep]
            if not victims:
                return None
            victim = min(victims, key=lambda k: self.count[k])
            if self.count[victim] >= self.count[key]:
                return None
            slot = self.where.pop(victim)
        self.where[key] = slot
        return slot


class ArrivingExperts(dict):
    """An MoE layer's expert tensors, each made ready on first use: the compute stream waits for
    an expert's own copy before its first matmul, so the first experts compute while later ones
    are still copying (run_experts takes them in ascending order, the order they were issued)."""

    def __init__(self, tensors: dict, events: dict, stream):
        super().__init__(tensors)
        self.events, self.stream = events, stream

    def __getitem__(self, key):
        e = experts_of(key)
        event = self.events.pop(e, None) if e is not None else None
        if event is not None:
            self.stream.wait_event(event)
        return super().__getitem__(key)


def new_cache_pool(slots: int, expert_nbytes: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(expert_nbytes, dtype=torch.uint8, device=device) for _ in range(slots)]
