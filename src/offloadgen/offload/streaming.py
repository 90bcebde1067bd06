"""Weights in CPU memory, copied to the GPU just ahead of use, overlapping the compute.

Each streamed block is packed into one flat host buffer (one large copy runs at full bus speed;
many small ones do not). A ring of `prefetch_depth + 1` flat GPU buffers receives them on a side
CUDA stream: while block i computes, blocks i+1 .. i+depth are in flight. Streamed blocks repeat
in the same order every pass, so the prefetch runs on across pass boundaries (the next pass's
first layers copy while this pass finishes and samples).

Events order the two streams: a block's compute waits for its copy ("ready"), and a copy into a
buffer waits until the block that last used the buffer is done ("free").

With pinned=False the blocks stay in ordinary (pageable) memory and a worker thread stages each
one through a pinned buffer: no slow pinning at start-up, at the price of a CPU copy per block.
"""
from __future__ import annotations

import queue
import sys
import threading
import time

import torch
from tqdm import tqdm

from ..models import family_of
from .pinned import pin_tensors, unpin_tensors

ALIGN = 256  # bytes: keeps every tensor view aligned for vectorised kernels


class PackedBlock:
    """One block's tensors laid out in a single flat buffer, with (offset, shape) per tensor."""

    def __init__(self, layout: dict[str, tuple[int, tuple]], numel: int):
        self.layout = layout
        self.numel = numel

    @staticmethod
    def plan(shapes: dict[str, tuple], elem: int) -> "PackedBlock":
        layout, pos, align = {}, 0, max(1, ALIGN // elem)
        for name, shape in shapes.items():
            n = 1
            for s in shape:
                n *= s
            layout[name] = (pos, tuple(shape))
            pos += -(-n // align) * align
        return PackedBlock(layout, pos)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (off, shape) in self.layout.items():
            n = 1
            for s in shape:
                n *= s
            out[name] = flat[off:off + n].view(shape)
        return out


class StreamingWeights:
    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, placement, pinned: bool = True,
                 progress: bool = True):
        self.cfg = checkpoint.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.placement = placement
        self.order = list(placement.streamed)
        self.position = {b: i for i, b in enumerate(self.order)}
        family = family_of(self.cfg)
        elem = torch.empty((), dtype=dtype).element_size()
        self.packed = {b: PackedBlock.plan({k: s for k, (_, s) in family.block_tensors(self.cfg, b).items()}, elem)
                       for b in self.order}
        self.timings = {}

        # Resident blocks: straight to the device. Tied tensors (same checkpoint name) are shared.
        t0 = time.perf_counter()
        shared: dict[str, torch.Tensor] = {}
        self.resident = {}
        bar = tqdm(total=len(placement.resident) + len(self.order), desc="placing weights", unit="block",
                   file=sys.stderr, leave=False, disable=None if progress else True)
        for b in placement.resident:
            names = family.block_tensors(self.cfg, b)
            weights = {}
            for local, t in checkpoint.read_block(b, dtype).items():
                key = names[local][0]
                if key not in shared:
                    shared[key] = t.to(self.device)
                weights[local] = shared[key]
            self.resident[b] = weights
            bar.update()

        # Streamed blocks: packed host buffers, filled straight from the checkpoint.
        self.host = {}
        for b in self.order:
            flat = torch.empty(self.packed[b].numel, dtype=dtype)
            views = self.packed[b].views(flat)
            for local, t in checkpoint.read_block(b, dtype).items():
                views[local].copy_(t)
            self.host[b] = flat
            bar.update()
        bar.close()
        self.timings["fill_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.pinned = pinned and self.cuda
        self._registered = []
        if self.pinned:
            ok = pin_tensors(list(self.host.values()))
            self._registered = [t for t, good in zip(self.host.values(), ok) if good]
            if not all(ok):  # registration refused (e.g. no permission): fall back to the allocator
                for b, good in zip(list(self.host), ok):
                    if not good:
                        self.host[b] = self.host[b].pin_memory()
        self.timings["pin_s"] = time.perf_counter() - t0

        slots = placement.ring_slots if self.order else 0
        ring_numel = max((p.numel for p in self.packed.values()), default=0)
        self.ring = [torch.empty(ring_numel, dtype=dtype, device=self.device) for _ in range(slots)]
        self.depth = slots - 1
        self.slot_of: dict = {}  # block -> ring slot it was last issued into
        self.ready: dict = {}  # block -> event recorded after its copy
        self.free = [None] * slots  # slot -> event recorded when its last block was done
        self.next_issue = 0  # index (over all passes) of the next streamed block to copy
        self.next_use = 0  # index of the next streamed block the engine will ask for
        self.issued_log: list = []  # (issue index, block, slot) for tests of the schedule
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        if not self.pinned and self.cuda and self.order:
            self.staging = [torch.empty(ring_numel, dtype=dtype).pin_memory() for _ in range(slots)]
            self.staged_free = [None] * slots
            self.jobs: queue.Queue = queue.Queue()
            self.issued = {}
            self.worker_error = None
            self.worker = threading.Thread(target=self._stage_worker, daemon=True)
            self.worker.start()
        for _ in range(min(slots, len(self.order))):
            self._issue()

    # -- the schedule ------------------------------------------------------------------------------
    def _issue(self) -> None:
        """Start copying the next streamed block (in cyclic pass order) into its ring slot."""
        i = self.next_issue
        block, slot = self.order[i % len(self.order)], i % len(self.ring)
        self.next_issue += 1
        self.slot_of[block] = slot
        self.issued_log.append((i, block, slot))
        src = self.host[block]
        dst = self.ring[slot][:src.numel()]
        if not self.cuda:
            dst.copy_(src)
            return
        if not self.pinned:
            event = threading.Event()
            self.issued[block] = event
            self.jobs.put((block, slot, self.free[slot], event))
            return
        with torch.cuda.stream(self.copy_stream):
            if self.free[slot] is not None:
                self.copy_stream.wait_event(self.free[slot])
            dst.copy_(src, non_blocking=True)
            self.ready[block] = torch.cuda.Event()
            self.ready[block].record(self.copy_stream)

    def _stage_worker(self) -> None:
        torch.cuda.set_device(self.device)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self._stage(*job)
            except BaseException as e:  # hand the failure to the engine's thread instead of hanging it
                self.worker_error = e
                job[3].set()
                return

    def _stage(self, block, slot, free_event, issued) -> None:
        src, staging = self.host[block], self.staging[slot]
        if self.staged_free[slot] is not None:
            self.staged_free[slot].synchronize()  # the staging buffer's last copy has left it
        staging[:src.numel()].copy_(src)
        with torch.cuda.stream(self.copy_stream):
            if free_event is not None:
                self.copy_stream.wait_event(free_event)
            self.ring[slot][:src.numel()].copy_(staging[:src.numel()], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.ready[block] = ready
        self.staged_free[slot] = ready
        issued.set()

    def get(self, block) -> dict[str, torch.Tensor]:
        if block in self.resident:
            return self.resident[block]
        expected = self.order[self.next_use % len(self.order)]
        assert block == expected, f"streamed blocks must be asked for in pass order: got {block}, expected {expected}"
        if self.cuda:
            if not self.pinned:
                self.issued[block].wait()  # the worker has recorded the block's ready event
                if self.worker_error is not None:
                    raise RuntimeError("the weight staging thread failed") from self.worker_error
            torch.cuda.current_stream(self.device).wait_event(self.ready[block])
        slot = self.slot_of[block]
        return self.packed[block].views(self.ring[slot])

    def done(self, block) -> None:
        if block in self.resident:
            return
        slot = self.slot_of[block]
        if self.cuda:
            # record_stream is not needed: the ring buffers live as long as this object.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free[slot] = event
        self.next_use += 1
        self._issue()

    def copy_only_pass_s(self, passes: int = 3) -> float | None:
        """Seconds to move one pass's streamed blocks through the ring with no compute (best of
        `passes`): the floor a decode step can reach with this placement, measured on the same
        buffers and memory as the real steps. Call between generations (at a pass boundary)."""
        if not self.cuda or not self.order:
            return None
        times = []
        for _ in range(passes):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for b in self.order:
                self.get(b)
                self.done(b)
            torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def close(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.jobs.put(None)
            self.worker.join()
            self.worker = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        unpin_tensors(self._registered)
        self._registered = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
