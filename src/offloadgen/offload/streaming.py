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

import collections
import os
import queue
import sys
import threading
import time

import torch
from tqdm import tqdm

from ..errors import OffloadgenError
from ..models import family_of
from ..quant import QuantConfig
from .experts import WHOLE_SPAN_SHARE, ArrivingExperts, ExpertCache, expert_layouts
from .packed import ALIGN, PackedBlock
from .pinned import copy_in_chunks, driver_pinned, pin_tensors, unpin_tensors
from .weights import load_resident_blocks

RESIDENT_FILL_THREADS = 4  # packed resident blocks filled at once (read or quantized, then copied over)


def host_parts_wanted() -> bool:
    """OFFLOADGEN_HOST_PARTS: 1 (the default) or 0; anything else is refused, not read as either."""
    raw = os.environ.get("OFFLOADGEN_HOST_PARTS", "1")
    if raw not in ("0", "1"):
        raise OffloadgenError(f"OFFLOADGEN_HOST_PARTS must be 1 (each rank keeps its own parts of the streamed "
                              f"weights, the default) or 0 (whole blocks shared by the node); got {raw!r}")
    return raw == "1"


class StreamingWeights:
    """The streaming weight source (weights.WeightSource). Start-up has four steps, each its own
    method: resident blocks to the device, streamed blocks into host memory (or onto disk),
    pinning, and the GPU ring; then the first copies are issued."""

    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, placement, pinned: bool = True,
                 progress: bool = True, quant: QuantConfig | None = None, offload_dir: str | None = None,
                 world=None, fetch: str = "whole", whole_span_share: float = WHOLE_SPAN_SHARE, gather: str = "nccl"):
        self.cfg = checkpoint.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.placement = placement
        # Several ranks (distributed.World): streamed blocks sit once per node, in shared memory with
        # fetch="whole"; with "allgather" and "pool" each rank copies 1/N of a block over its own link
        # (and holds only that 1/N: _place_parts) and all-gathers the rest.
        self.world = world if world is not None and world.active else None
        if fetch not in ("whole", "allgather", "pool"):
            raise ValueError(f"fetch must be 'whole', 'allgather' or 'pool', not {fetch!r}")
        self.shards = self.world.size if fetch in ("allgather", "pool") and self.world is not None else 1
        if self.shards > 1 and (offload_dir is not None or not pinned):
            raise OffloadgenError(f"--weight-fetch {fetch} streams from pinned CPU memory: it cannot be combined "
                                  "with --disk-offload or --pin-memory 0")
        if placement.pooled and self.shards == 1:
            raise ValueError("pooled blocks need several ranks fetching with 'pool'")
        if gather not in ("nccl", "copy"):
            raise ValueError(f"gather must be 'nccl' or 'copy', not {gather!r}")
        # copy: the ranks read each other's parts with copies (offload/peer_copy.py), not NCCL
        self.peers = None
        self.peer_copy = gather == "copy" and self.shards > 1
        self.order = placement.fetched
        # Sharded, each rank keeps only its part of the streamed blocks (_place_parts);
        # OFFLOADGEN_HOST_PARTS=0 keeps the whole blocks once per node in shared memory instead (an A/B).
        self.host_parts = self.shards > 1 and host_parts_wanted()
        self.driver_pinned: set = set()  # blocks whose host memory came page-locked from the driver
        self.quant = quant
        family = family_of(self.cfg)
        self.layouts = {b: PackedBlock(b, {k: s for k, (_, s) in family.block_tensors(self.cfg, b).items()}, dtype, quant)
                        for b in [*placement.resident, *self.order]}
        # A real checkpoint's quantized blocks are cached on disk; dummy weights are remade faster than read.
        self.quant_cache = None
        if quant is not None and checkpoint.path is not None:
            from ..quant.cache import QuantCache
            self.quant_cache = QuantCache(checkpoint.path, quant, dtype)
        # bus_bytes: every byte copied to the device (blocks and experts); expert_*: the routed
        # experts' copies, cache hits and misses (experts.py)
        self.timings = {"quantized_blocks": 0, "cached_blocks": 0, "bus_bytes": 0, "expert_bytes": 0,
                        "expert_hits": 0, "expert_misses": 0}
        # Streamed MoE layers whose experts are fetched one by one, as routed (placement.expert_streaming)
        self.whole_span_share = whole_span_share
        self.moe = expert_layouts({b: self.layouts[b] for b in self.order}) if placement.expert_streaming else {}
        self._count_lock = threading.Lock()  # blocks are filled from several threads
        self.disk = None
        t0 = time.perf_counter()
        bar = tqdm(total=len(placement.resident) + len(self.order), desc="placing weights", unit="block",
                   file=sys.stderr, leave=False, disable=None if progress else True)
        self._registered: list[torch.Tensor] = []  # host buffers registered as pinned, to unregister
        self._place_resident(checkpoint, bar)
        self._place_pooled(checkpoint, bar)
        self._place_streamed(checkpoint, offload_dir, bar, progress,
                             pin_now=pinned and self.cuda and offload_dir is None and self.world is None)
        self.timings["fill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._pin_host(pinned)
        self.timings["pin_s"] = time.perf_counter() - t0
        self._make_ring()
        self.restart = False  # set by reset() with all-gathered weights: wait_copy starts the pass
        self._start()

    def _block_parts(self, checkpoint, b) -> dict[str, torch.Tensor]:
        """A block's entries as its layout stores them (for the disk store's writer): the packed
        buffer's views, filled as _fill_block fills it."""
        flat = torch.empty(self.layouts[b].nbytes, dtype=torch.uint8)
        self._fill_block(checkpoint, b, flat)
        return self.layouts[b].views(flat)

    def _fill_block(self, checkpoint, b, flat: torch.Tensor) -> None:
        """Fill a block's packed buffer (host memory or the device). A 16-bit block in host memory is
        read straight from the files into its place; a quantized one comes from the quantized-block
        cache, read straight in too, or is read, quantized (on the device the weights go to: 60 GB
        quantize fast on a GPU and slowly on a CPU), written in, and cached."""
        layout = self.layouts[b]
        if not layout.quantized and flat.device.type == "cpu":
            checkpoint.read_block(b, self.dtype, out=layout.views(flat))
            return
        if layout.quantized and self.quant_cache is not None and self.quant_cache.load_into(b, layout, flat):
            with self._count_lock:
                self.timings["cached_blocks"] += 1
            return
        layout.write(flat, layout.encode(checkpoint.read_block(b, self.dtype), self.device))
        if layout.quantized:
            with self._count_lock:
                self.timings["quantized_blocks"] += 1
            if self.quant_cache is not None:
                self.quant_cache.save(b, layout, flat)

    def fill_part(self, checkpoint, b, lo: int, hi: int, out: torch.Tensor) -> None:
        """Fill `out` with bytes [lo, hi) of block b's packed buffer: a rank's 1/N of a block. A
        16-bit block's tensors that lie wholly inside are read straight into place; the one or two
        cut by the part's ends are read whole into a temporary and their bytes in the part copied,
        so that N ranks making their parts read the block about once between them. A quantized
        block is made whole (its entries are encoded a tensor at a time) and its part copied."""
        layout = self.layouts[b]
        if layout.quantized:
            flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
            self._fill_block(checkpoint, b, flat)
            out.copy_(flat[lo:hi])
            return
        inside, cut, pos = set(), [], lo
        for key, (off, dt, shape) in sorted(layout.entries.items(), key=lambda kv: kv[1][0]):
            end = off + torch.Size(shape).numel() * dt.itemsize
            if end <= lo or off >= hi:
                continue
            if pos < off:  # the padding before an entry: zeros, as in a whole block's buffer
                out[pos - lo:off - lo].zero_()
            pos = min(hi, end)
            (inside.add(key) if lo <= off and end <= hi else cut.append((key, off)))
        out[pos - lo:].zero_()
        everything = set(layout.entries)
        if inside:
            checkpoint.read_block(b, self.dtype, out=layout.views(out, inside, base=lo), skip=everything - inside)
        for key, off in cut:
            whole = checkpoint.read_block(b, self.dtype, skip=everything - {key})[key].reshape(-1).view(torch.uint8)
            a, z = max(lo, off), min(hi, off + whole.numel())
            out[a - lo:z - lo].copy_(whole[a - off:z - off])

    def _part_span(self, b) -> tuple[int, int]:
        """The bytes [lo, hi) of block b's packed buffer that are this rank's 1/N (the last rank's
        may be shorter, or empty)."""
        n = self.layouts[b].nbytes
        part, r = self._part_bytes(n), self.world.rank
        return min(r * part, n), min((r + 1) * part, n)

    def _place_resident(self, checkpoint, bar) -> None:
        """Resident blocks go straight to the device; tied tensors (same checkpoint name) are shared.
        Quantized ones stay packed there and are dequantized per use."""
        from ..distributed import fill_in_parallel
        packed = [b for b in self.placement.resident if self.layouts[b].quantized]
        dense = [b for b in self.placement.resident if not self.layouts[b].quantized]
        self.resident = load_resident_blocks(checkpoint, dense, self.dtype, self.device, on_done=bar.update)
        self.resident_packed = {b: torch.empty(self.layouts[b].nbytes, dtype=torch.uint8, device=self.device)
                                for b in packed}

        def fill(b, flat):
            self._fill_block(checkpoint, b, flat)
            bar.update()
        fill_in_parallel(self.resident_packed, fill, threads=RESIDENT_FILL_THREADS)

    def _place_pooled(self, checkpoint, bar) -> None:
        """This rank's 1/N of every pooled block, kept on its GPU: the part it contributes to the
        block's all-gather every pass, in place of a copy from host memory. Each rank makes its
        parts itself, from several threads (a rank's start-up is mostly this)."""
        from ..distributed import fill_in_parallel
        self.pool_shard = {b: None for b in self.placement.pooled}
        if self.peer_copy:
            self._make_arenas()

        def make(b, _):
            part = self._part_bytes(self.layouts[b].nbytes)
            lo, hi = self._part_span(b)
            mine = torch.empty(hi - lo, dtype=torch.uint8)
            self.fill_part(checkpoint, b, lo, hi, mine)
            if self.peer_copy:  # its place in this rank's arena, which the other ranks read
                shard = self.peers.view(self.world.rank, self.arena_offset[b], part)
            else:
                shard = torch.zeros(part, dtype=torch.uint8, device=self.device)
            shard[:mine.numel()].copy_(mine)
            self.pool_shard[b] = shard
            bar.update()
        fill_in_parallel(dict(self.pool_shard), make)
        if self.peer_copy:
            self.peers.ready()

    def _make_arenas(self) -> None:
        """This rank's arena for --weight-gather copy: its part of every pooled block, then its
        landing buffers (placement.landings of them, when some block streams), at the same
        offsets on every rank; and every other rank's arena, opened here."""
        from .peer_copy import PeerArenas
        self.arena_offset, offset = {}, 0
        for b in self.placement.pooled:
            self.arena_offset[b] = offset
            offset += self._part_bytes(self.layouts[b].nbytes)
        streamed = [b for b in self.order if b not in self.placement.pooled]
        self.landing_offset, self.landing_numel = [], self._part_bytes(max(
            (self.layouts[b].nbytes for b in self.order), default=0))
        for _ in range(self.placement.landings if streamed else 0):
            self.landing_offset.append(offset)
            offset += self.landing_numel
        self.peers = PeerArenas(offset, self.world, self.device)

    def _place_streamed(self, checkpoint, offload_dir, bar, progress, pin_now: bool) -> None:
        """Streamed blocks: packed host buffers filled straight from the checkpoint (under torchrun
        once per node: in shared memory, or each rank its 1/N with allgather and pool), each pinned
        as soon as it is filled where pin_now, or packed files on disk, written once and reused by
        a later run with the same model."""
        self.host = {}
        if not self.placement.streamed:
            bar.close()
            return
        from .disk import DiskStore, store_key
        key = store_key(checkpoint, self.dtype, self.quant, self.layouts)
        if offload_dir is not None:
            self.disk = DiskStore(offload_dir, key, self.layouts)
            bar.close()
            bar = tqdm(total=len(self.layouts), desc=f"writing weights to {self.disk.path}", unit="block",
                       file=sys.stderr, leave=False, disable=None if progress else True)
            self.timings["disk_write_s"] = self.disk.write(lambda b: self._block_parts(checkpoint, b),
                                                           progress=bar.update)
            bar.close()
            return

        def fill(b, flat):
            self._fill_block(checkpoint, b, flat)
            # pinned while other blocks are still read
            if pin_now and pin_tensors([flat], threads=1, device=self.device)[0]:
                self._registered.append(flat)
            bar.update()
        sizes = {b: self.layouts[b].nbytes for b in self.placement.streamed}
        if self.host_parts:
            self._place_parts(checkpoint, bar)
        elif self.world is not None:
            from ..distributed import shared_host_buffers
            self.host = shared_host_buffers(sizes, self.world, key, fill)
        else:
            from ..distributed import fill_in_parallel
            self.host = {b: torch.empty(n, dtype=torch.uint8) for b, n in sizes.items()}
            fill_in_parallel(self.host, fill)
        bar.close()

    def _place_parts(self, checkpoint, bar) -> None:
        """With the fetch sharded (allgather, pool) each rank copies only its 1/N of every streamed
        block over its link, so it keeps only that part in host memory and makes it itself: the
        node holds the weights once in all, made by every rank at once (4 H100s, OPT-30B: ready in
        15.1-22.2 s, median 16.5, in 9 runs, against 18.2-20.7 s, median 19.8, in 7 runs where
        local rank 0 filled whole blocks for all). A part sits in
        memory the CUDA driver allocated page-locked (driver_pinned), which needs no /proc access
        between ranks; steps ran as fast as from the node-shared memory (docs/distributed.md)."""
        from ..distributed import fill_in_parallel
        self.host = dict.fromkeys(self.placement.streamed)

        def make(b, _):
            lo, hi = self._part_span(b)
            part = driver_pinned(hi - lo, self.device) if self.cuda else None
            if part is None:  # no CUDA, or refused: ordinary memory, registered by _pin_host
                part = torch.empty(hi - lo, dtype=torch.uint8)
            else:
                self.driver_pinned.add(b)
            self.fill_part(checkpoint, b, lo, hi, part)
            self.host[b] = part
            bar.update()
        fill_in_parallel(dict(self.host), make)

    def _pin_host(self, pinned: bool) -> None:
        """Pin the host buffers that were not pinned as they were filled."""
        self.pinned = pinned and self.cuda and self.disk is None
        if self.pinned:
            done = {t.data_ptr() for t in self._registered}
            todo = [b for b, t in self.host.items()
                    if t.data_ptr() not in done and b not in self.driver_pinned and t.numel()]
            ok = pin_tensors([self.host[b] for b in todo], device=self.device)
            self._registered += [self.host[b] for b, good in zip(todo, ok) if good]
            for b, good in zip(todo, ok):  # registration refused (e.g. no permission): fall back to the allocator
                if not good:
                    self.host[b] = self.host[b].pin_memory()

    def _make_ring(self) -> None:
        """The GPU buffers streamed blocks arrive in (page-aligned host buffers for a CPU run from
        disk, read straight into), the dequantization workspace, and the staging thread when the
        host memory is not pinned."""
        slots = self.placement.ring_slots if self.order else 0
        ring_numel = max((self.layouts[b].nbytes for b in self.order), default=0)
        if self.disk is not None:
            from .disk import aligned_buffer, padded
            ring_numel = padded(ring_numel)
        if self.shards > 1:  # room for N equal parts of the largest block
            part_numel = self._part_bytes(ring_numel)
            ring_numel = self.shards * part_numel
            # This rank's 1/N of each streamed block lands in a buffer of its own, not in its place
            # in the ring slot: the host copies (PCIe) then run up to placement.landings blocks ahead
            # of the gathers, past pooled blocks and layers still computing. Landing in the slot
            # itself, a copy waited for the slot, and PCIe idled while pooled layers were gathered
            # (4 H100s: step 1.28x the planned PCIe time). Each gather waits for the slowest rank's
            # part; landing buffers beyond the ring's slots let the other ranks' copies go on
            # meanwhile, so that a late copy costs the step once rather than every link's time.
            # Every fetched block pooled: nothing lands (the planner counts none then either).
            if self.peer_copy:  # in this rank's arena, where the other ranks read them
                self.landing = [self.peers.view(self.world.rank, o, part_numel) for o in self.landing_offset]
            else:
                self.landing = [torch.empty(part_numel, dtype=torch.uint8, device=self.device)
                                for _ in range(self.placement.landings if self.host else 0)]
        if self.disk is not None and not self.cuda:
            self.ring = [aligned_buffer(ring_numel) for _ in range(slots)]
        else:
            self.ring = [torch.empty(ring_numel, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        dense = max((layout.dense_numel for layout in self.layouts.values()), default=0)
        self.workspace = torch.empty(dense, dtype=self.dtype, device=self.device) if dense else None
        self.depth = slots - 1
        # (issue index, block, slot) of recent copies, for tests of the schedule; bounded, since a
        # long job issues a copy per streamed block per pass.
        self.issued_log: collections.deque = collections.deque(maxlen=4096)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.gather_stream = torch.cuda.Stream(self.device) if self.cuda and self.shards > 1 else None
        self.staged = bool(not self.pinned and self.cuda and self.order)
        self.worker = None
        if self.staged:
            if self.disk is not None:  # O_DIRECT targets: page-aligned, then pinned in place
                self.staging = [aligned_buffer(ring_numel) for _ in range(slots)]
                ok = pin_tensors(self.staging, device=self.device)
                self._registered += [t for t, good in zip(self.staging, ok) if good]
            else:
                self.staging = [torch.empty(ring_numel, dtype=torch.uint8).pin_memory() for _ in range(slots)]
            self.staged_free = [None] * slots
            self.jobs: queue.Queue = queue.Queue()
            self.issued = {}
            self.worker_error = None
            self.worker = threading.Thread(target=self._stage_worker, daemon=True)
            self.worker.start()
        self._make_expert_pool()

    def _make_expert_pool(self) -> None:
        """GPU slots of one expert each for the expert cache, sized by the planner."""
        if self.moe and (self.staged or self.disk is not None or self.shards > 1):
            raise OffloadgenError("expert streaming copies experts from pinned CPU memory on one GPU: it cannot be "
                                  "combined with --disk-offload, --pin-memory 0 or --weight-fetch allgather/pool")
        slots = self.placement.expert_slots if self.moe else 0
        size = max((lay.expert_nbytes for lay in self.moe.values()), default=0)
        self.expert_cache = ExpertCache(slots)
        self.pool = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        self.pool_ready: dict[int, object] = {}  # slot -> event of its last copy
        self.pool_free: dict[int, object] = {}  # slot -> event of its last use
        self.pool_used: dict = {}  # block -> slots its pass reads
        # (block, "ring" or "cache", expert) per expert copied over the bus, (block, "span", ids)
        # per layer copied as one span: for tests of what crossed the bus
        self.expert_log: collections.deque = collections.deque(maxlen=4096)

    def _start(self) -> None:
        """Begin a pass: the first depth + 1 streamed blocks start copying."""
        self.next_issue = self.next_use = 0
        self.slot_of, self.ready = {}, {}
        self.free = [None] * len(self.ring)
        if self.shards > 1:
            # landing buffers: the copy index each holds until its gather is issued, and the event
            # after which it may be overwritten (its gather has read it)
            self.next_copy, self.copies = 0, 0
            self.landed: dict[int, tuple] = {}  # issue index -> (landing buffer, copy event or None)
            self.landing_held = [False] * len(self.landing)
            self.landing_free = [None] * len(self.landing)
        for _ in range(min(len(self.ring), len(self.order))):
            self._issue()

    def reset(self) -> None:
        """After a pass that failed midway (say, out of memory): let the copies in flight land and
        start again from the first block, so the next pass finds the schedule where it expects."""
        if self.staged:
            for event in list(self.issued.values()):
                event.wait()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.pool_used.clear()
        if self.shards > 1:
            # the first blocks' all-gathers wait for the next pass: issued now, they would meet the
            # other ranks' gathers of the pass still under way there (other blocks and sizes: gloo
            # aborts the healthy rank's process, NCCL mixes the blocks)
            self.restart = True
            return
        self._start()

    # -- the schedule ------------------------------------------------------------------------------
    def _issue(self) -> None:
        """Start copying the next streamed block (in cyclic pass order) into its ring slot."""
        i = self.next_issue
        block, slot = self.order[i % len(self.order)], i % len(self.ring)
        self.next_issue += 1
        self.slot_of[block] = slot
        self.issued_log.append((i, block, slot))
        n = self.moe[block].trunk_nbytes if block in self.moe else self.layouts[block].nbytes
        self.timings["bus_bytes"] += n
        if self.shards > 1:
            self._issue_shard(i, block, slot)
            return
        if not self.cuda:
            if self.disk is not None:
                self.disk.read_into(block, self.ring[slot])
            else:
                self.ring[slot][:n].copy_(self.host[block][:n])
            return
        if self.staged:
            event = threading.Event()
            self.issued[block] = event
            self.jobs.put((block, slot, self.free[slot], event))
            return
        with torch.cuda.stream(self.copy_stream):
            if self.free[slot] is not None:
                self.copy_stream.wait_event(self.free[slot])
            copy_in_chunks(self.ring[slot][:n], self.host[block][:n])
            self.ready[block] = torch.cuda.Event()
            self.ready[block].record(self.copy_stream)

    def _part_bytes(self, nbytes: int) -> int:
        return -(-nbytes // (self.shards * ALIGN)) * ALIGN

    def _copy_ahead(self, upto: int) -> None:
        """Issue this rank's host copies of the streamed blocks up to issue index `upto` (pooled
        blocks need none), each into a free landing buffer; stop where none is free (its block's
        gather not issued yet). Copies go in index order, so the one a gather needs is never behind
        a buffer held by a later one."""
        while self.next_copy <= upto:
            i = self.next_copy
            block = self.order[i % len(self.order)]
            if block in self.pool_shard:
                self.next_copy += 1
                continue
            buf = self.copies % len(self.landing)
            if self.landing_held[buf]:
                return
            src = self.host[block]  # this rank's part (or, with the node-shared buffers, the whole block)
            if not self.host_parts:
                lo, hi = self._part_span(block)
                src = src[lo:hi]
            dst = self.landing[buf][:src.numel()]
            event = None
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):
                    if self.landing_free[buf] is not None:
                        self.copy_stream.wait_event(self.landing_free[buf])
                    copy_in_chunks(dst, src)
                    event = torch.cuda.Event()
                    event.record(self.copy_stream)
            else:
                dst.copy_(src)
            self.landed[i] = (buf, event)
            self.landing_held[buf] = True
            self.copies += 1
            self.next_copy += 1

    def _issue_shard(self, i: int, block, slot) -> None:
        """All-gather block `block` (issue index i) into its ring slot: every rank gives its 1/N,
        from its landing buffer (copied from host memory by _copy_ahead) or, for a pooled block,
        straight from the part this GPU keeps; then copies run ahead again."""
        part = self._part_bytes(self.layouts[block].nbytes)
        gathered = self.ring[slot][:part * self.shards]
        pooled = block in self.pool_shard
        self._copy_ahead(i)
        if pooled:
            mine, buf, arrived = self.pool_shard[block], None, None
        else:
            buf, arrived = self.landed.pop(i)
            mine = self.landing[buf][:part]
        if not self.cuda:
            self._gather(gathered, mine, block, part, buf)
            released = None
        else:
            # Two queues, so that the links work at once: the copy stream carries only host-to-device
            # copies (PCIe), the gather stream only gathers (NVLink). On one queue the next block's
            # host copy waited for this block's gather, and a step cost both links' times.
            with torch.cuda.stream(self.gather_stream):
                for wait in (arrived, self.free[slot]):  # this rank's part has landed; the slot is read
                    if wait is not None:
                        self.gather_stream.wait_event(wait)
                self.ready[block], released = self._gather(gathered, mine, block, part, buf)
        if buf is not None:  # the buffer may be refilled once every rank's gather has read it
            self.landing_free[buf] = released
            self.landing_held[buf] = False
        self._copy_ahead(i + len(self.landing))

    def _gather(self, gathered, mine, block, part: int, buf):
        """The gather itself, on the current queue: NCCL's all-gather, or with --weight-gather copy
        copies from every rank's arena (its pooled part, or landing buffer `buf`, fenced). On CUDA,
        (ready, released): the events after which the block may be read and its landing buffer
        refilled; (None, None) on the CPU, where it is done when this returns."""
        import torch.distributed as dist
        if self.peer_copy:
            offset = self.arena_offset[block] if buf is None else self.landing_offset[buf]
            return self.peers.gather(gathered, offset, part, fenced=buf is not None)
        if not self.cuda:
            dist.all_gather_into_tensor(gathered, mine, group=self.world.group)
            return None, None
        # NCCL runs on its own stream after what the gather stream has queued; wait() puts the
        # gather stream behind the gather, and the block's ready event behind it.
        dist.all_gather_into_tensor(gathered, mine, group=self.world.group, async_op=True).wait()
        ready = torch.cuda.Event()
        ready.record(self.gather_stream)
        return ready, ready

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
        staging, n = self.staging[slot], self.layouts[block].nbytes
        if self.staged_free[slot] is not None:
            self.staged_free[slot].synchronize()  # the staging buffer's last copy has left it
        if self.disk is not None:
            self.disk.read_into(block, staging)
        else:
            staging[:n].copy_(self.host[block])
        with torch.cuda.stream(self.copy_stream):
            if free_event is not None:
                self.copy_stream.wait_event(free_event)
            copy_in_chunks(self.ring[slot][:n], staging[:n])
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.ready[block] = ready
        self.staged_free[slot] = ready
        issued.set()

    def get(self, block) -> dict[str, torch.Tensor]:
        if block in self.resident:
            return self.resident[block]
        if block in self.resident_packed:
            return self.layouts[block].dense(self.resident_packed[block], self.workspace)
        self.wait_copy(block)
        slot = self.slot_of[block]
        if block in self.moe:  # its trunk: the experts come with get_experts, once routed
            return self.layouts[block].dense(self.ring[slot], self.workspace, self.moe[block].trunk_names)
        return self.layouts[block].dense(self.ring[slot], self.workspace)

    def get_experts(self, block, ids: list[int]) -> dict[str, torch.Tensor]:
        """The tensors of experts `ids` of a streamed MoE layer, after get(block) and before
        done(block); {} for any other block (its get() held every expert). Cached experts cost no
        copy; the others are copied now, each one span, into the expert cache when it admits them
        or else into their place in the layer's ring slot. When most of the layer's experts are
        missed, they are all copied as one span (the cache then takes its share from the ring)."""
        if block not in self.moe:
            return {}
        lay, ring = self.moe[block], self.ring[self.slot_of[block]]
        keys = [(block, e) for e in ids]
        self.expert_cache.request(keys)
        missed = [e for e in ids if (block, e) not in self.expert_cache.where]
        self.timings["expert_hits"] += len(ids) - len(missed)
        self.timings["expert_misses"] += len(missed)
        if len(missed) >= self.whole_span_share * len(lay.spans):
            event = self._copy_expert_bytes(ring[lay.first:lay.last], self.host[block][lay.first:lay.last])
            self.expert_log.append((block, "span", tuple(ids)))
            for e in missed:  # on the device, behind the span's copy: no bus
                self._admit(block, e, keys, ring[slice(*lay.spans[e])], bus=False)
            return self._arrived(block, {e: (ring, 0, event) for e in ids})
        where, used = {}, []
        for e in ids:  # ascending: the order run_experts uses them
            lo, hi = lay.spans[e]
            if e in missed:
                slot = self._admit(block, e, keys, self.host[block][lo:hi], bus=True)
                if slot is None:
                    where[e] = (ring, 0, self._copy_expert_bytes(ring[lo:hi], self.host[block][lo:hi]))
                    self.expert_log.append((block, "ring", e))
                    continue
            slot = self.expert_cache.where[(block, e)]
            where[e] = (self.pool[slot], lo, self.pool_ready.get(slot))
            used.append(slot)
        self.pool_used[block] = used
        return self._arrived(block, where)

    def _admit(self, block, e: int, keep: list, src: torch.Tensor, bus: bool) -> int | None:
        """Copy expert e into a slot of the expert cache if the cache takes it; its slot or None."""
        slot = self.expert_cache.admit((block, e), keep=set(keep)) if self.pool else None
        if slot is not None:
            self.pool_ready[slot] = self._copy_expert_bytes(self.pool[slot][:src.numel()], src,
                                                            self.pool_free.get(slot), bus)
            if bus:
                self.expert_log.append((block, "cache", e))
        return slot

    def _copy_expert_bytes(self, dst: torch.Tensor, src: torch.Tensor, wait=None, bus: bool = True):
        """One copy on the copy stream (behind the trunks already issued); its event, or None on
        the CPU. bus=False: a copy within the device, from the ring into the expert cache."""
        if bus:
            self.timings["bus_bytes"] += src.numel()
            self.timings["expert_bytes"] += src.numel()
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.copy_stream):
            if wait is not None:
                self.copy_stream.wait_event(wait)
            copy_in_chunks(dst, src)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event

    def _arrived(self, block, where: dict) -> dict[str, torch.Tensor]:
        """Expert tensors from (buffer, base offset, copy event) per expert. Quantized experts are
        dequantized as each arrives; 16-bit ones are views the compute waits on at first use."""
        packed, lay = self.layouts[block], self.moe[block]
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        tensors, events = {}, {}
        for e, (buf, base, event) in where.items():
            if event is not None and packed.quantized:
                stream.wait_event(event)
            elif event is not None:
                events[e] = event
            tensors.update(packed.dense(buf, self.workspace, lay.names[e], base))
        return ArrivingExperts(tensors, events, stream)

    def wait_copy(self, block) -> None:
        """Make the compute stream wait until a streamed block has arrived in its ring slot."""
        if self.restart:  # the first pass after a reset (with all-gathered weights) starts here
            self.restart = False
            self._start()
        expected = self.order[self.next_use % len(self.order)]
        assert block == expected, f"streamed blocks must be asked for in pass order: got {block}, expected {expected}"
        if self.cuda:
            if self.staged:
                self.issued[block].wait()  # the worker has recorded the block's ready event
                if isinstance(self.worker_error, OffloadgenError):  # e.g. a damaged offload folder: say so
                    raise self.worker_error
                if self.worker_error is not None:
                    raise RuntimeError("the weight staging thread failed") from self.worker_error
            torch.cuda.current_stream(self.device).wait_event(self.ready[block])

    def done(self, block) -> None:
        if block in self.resident or block in self.resident_packed:
            return
        slot = self.slot_of[block]
        if self.cuda:
            # record_stream is not needed: the ring buffers live as long as this object.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.free[slot] = event
            for s in self.pool_used.pop(block, ()):  # the expert cache slots it read
                self.pool_free[s] = event
        self.next_use += 1
        self._issue()

    def copy_only_pass_s(self, passes: int = 3) -> float | None:
        """Seconds to move one pass's streamed blocks through the ring with no compute (best of
        `passes`): the floor a decode step can reach with this placement, measured on the same
        buffers and memory as the real steps. Call between generations (at a pass boundary)."""
        if not self.cuda or not self.order or self.disk is not None or self.moe:  # from disk: the probe says it, cheaper
            return None  # with expert streaming a pass's bytes depend on its routing
        times = []
        for _ in range(passes):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for b in self.order:
                self.wait_copy(b)
                self.done(b)
            torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def close(self) -> None:
        if self.worker is not None:
            self.jobs.put(None)
            self.worker.join()
            self.worker = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        unpin_tensors(self._registered)
        self._registered = []
        if self.peers is not None:
            self.peers.close()
        if self.disk is not None:
            self.disk.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
