"""The KV cache: on the compute device, or in CPU memory (`--kv-offload`).

On the device, each layer holds keys and values [batch, kv_heads, max_len, head_dim].

Offloaded, the cache lives in CPU memory, one tensor per layer and micro-batch laid out slot-major
[max_len, rows, kv_heads, head_dim]: the slots a pass writes and the slots attention reads are then
each one contiguous range, so every transfer is a single large copy. A decode step attends in one
of two places, chosen per micro-batch:

- on the CPU, where the cache already is (FlexGen's choice): only q, the new k/v and the attention
  output cross the bus, and the cores read the cache at CPU-memory speed, while the bus carries
  weights;
- on the GPU: the cache's used slots are copied over the bus into a device buffer, one layer
  ahead on a side stream, and attention runs there. This costs bus time, which the weights also
  need.

The runtime gives some micro-batches to each so that neither the bus nor the CPU waits on the other
(see gpu_fraction). The prefill always attends on the GPU (its keys and values are there) and
writes them back; with async_write that copy runs on a side stream, overlapping the next layer.

Continuous batching (StepInputs.write_slots) writes each row at its own slot, and prefills a prompt
chunk into one row of a part. Those writes scatter into strided host slots, which no single DMA
does: from the GPU they land in pinned staging and the CPU puts them in place before anything
next reads or rewrites that layer and part (_apply_deferred), by when the copy has long landed.
At most STAGING_LIMIT bytes wait so: past it the oldest go in place at once (_bound_staging).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import torch

from ..models.layers import DeviceKV, sdpa
from ..quant.kv import KVQuant, kv_quant
from .cpu_attention import attend as cpu_attend, bias_from_mask, put_rows
from .kv_split import SplitController
from .pinned import copy_in_chunks, pin_tensors, to_device_zero_copy, unpin_tensors


class KVCache:
    """With quant_bits (4 or 8) keys and values are kept quantized (quant/kv.py), slot-major
    [max_len, batch, row bytes] like the offloaded cache, and each layer's are dequantized for
    attention into a workspace of one layer and micro-batch."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, quant_bits: int | None = None, quant_group_size: int = 64):
        self.codec = kv_quant(quant_bits, quant_group_size, kv_heads, head_dim)
        shape, store = (batch, kv_heads, max_len, head_dim), dtype
        if self.codec is not None:
            shape, store = (max_len, batch, self.codec.row_bytes), torch.uint8
            self.workspace = QuantWorkspace(self.codec, dtype, device)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]

    def layer(self, i: int, part: int, rows: slice):
        if self.codec is not None:
            return QuantDeviceKV(self.k[i][:, rows], self.v[i][:, rows], self.workspace)
        return DeviceKV(self.k[i][rows], self.v[i][rows])

    def zero_(self) -> None:
        pass  # made with zeros

    def close(self) -> None:
        pass

    @staticmethod
    def nbytes_for(n_layers, batch, max_len, kv_heads, head_dim, dtype) -> int:
        elem = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * batch * max_len * kv_heads * head_dim * elem


# The Triton decode attention (quant/triton_kv.attend_cuda) reads the codes without a dense copy,
# but on the H100 it has not yet measured faster than dequantizing and SDPA: with it, OPT-30B with
# 4-bit weights and cache at batch 384 ran 128.6 tok/s and the CPU waited 0.39 s a step for the
# GPU side (the split moved every part to the CPU), against 179.9 tok/s and 0.03 s without it
# (benchmarks/RESULTS.md, 2026-11-26). It stays off by default until an A/B in one call says
# otherwise: `bash benchmarks/large_batch.sh wq4kvq4 wq4kvq4triton`.
TRITON_DECODE_ATTENTION = os.environ.get("OFFLOADGEN_KV_TRITON_ATTENTION", "0") == "1"


def attend_stored(codec: KVQuant, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, mask, scale,
                  workspace: "QuantWorkspace", triton_decode: bool | None = None) -> torch.Tensor:
    """Attention of q [B, H, t, D] over 4/8-bit rows [end, B, row_bytes] on the device: SDPA over
    the workspace's dense copy of this layer and micro-batch. With triton_decode (default:
    OFFLOADGEN_KV_TRITON_ATTENTION=1) a decode step on CUDA reads the codes in one Triton kernel
    instead: no dense copy, one launch instead of two dequantizations and SDPA."""
    end = k_rows.shape[0]
    triton_decode = TRITON_DECODE_ATTENTION if triton_decode is None else triton_decode
    if triton_decode and q.is_cuda and q.shape[2] == 1:
        from ..quant.triton_kv import attend_cuda
        return attend_cuda(codec, q, k_rows, v_rows, None if mask is None else mask[..., :end], scale)
    return sdpa(q, workspace.dense(k_rows, "k"), workspace.dense(v_rows, "v"), mask, scale)


class QuantWorkspace:
    """Device buffers that one layer and micro-batch's keys and values are dequantized into for
    attention, grown to the largest asked for: never a dense copy of the whole cache."""

    def __init__(self, codec: KVQuant, dtype: torch.dtype, device: torch.device):
        self.codec, self.dtype, self.device = codec, dtype, device
        self.buffers: dict[str, torch.Tensor] = {}

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """New keys or values [rows, heads, t, dim] -> the cache's slot-major rows [t, rows, row bytes]."""
        x = x.permute(2, 0, 1, 3)
        return self.codec.encode(x.reshape(*x.shape[:2], -1))

    def dense(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """Stored rows [end, rows, row bytes] -> keys or values [rows, heads, end, dim]."""
        end, n = rows.shape[:2]
        size = end * n * self.codec.features
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < size:
            buf = self.buffers[name] = torch.empty(size, dtype=self.dtype, device=self.device)
        out = self.codec.decode(rows, self.dtype, out=buf[:size].view(end, n, self.codec.features))
        return out.view(end, n, self.codec.kv_heads, self.codec.head_dim).permute(1, 2, 0, 3)


class QuantDeviceKV:
    """One layer's 4/8-bit cache for one micro-batch, on the compute device (see KVCache)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, workspace: QuantWorkspace):
        self.k, self.v, self.ws = k, v, workspace

    def attend(self, q, k, v, step, mask, scale=None) -> torch.Tensor:
        kt, vt = self.ws.stored(k), self.ws.stored(v)
        if step.write_slots is None:
            self.k[step.start:step.end], self.v[step.start:step.end] = kt, vt
        else:  # each row at its own slot (continuous batching)
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[step.write_slots, rows], self.v[step.write_slots, rows] = kt[0], vt[0]
        if step.start == 0 and step.write_slots is None:
            # a prefill attends over its own keys before they are quantized, as FlexGen's does
            return sdpa(q, k, v, mask, scale)
        return attend_stored(self.ws.codec, q, self.k[:step.end], self.v[:step.end], mask, scale, self.ws)


SPLIT_HEADROOM = 2  # micro-batches beyond the plan's that the split may move to the GPU
STAGING_LIMIT = 2 << 30  # pinned bytes of row writes staged at once (OffloadedKVCache._bound_staging)


@dataclass
class KVOffload:
    """How the offloaded cache is kept: --pin-kv-cache, --async-kv-offload, and where decode
    attention runs ("cpu", "gpu", or "auto": gpu_fraction chosen by the runtime's model, then
    adjusted between decode steps from their times when `adaptive`, see kv_split)."""
    pinned: bool = False
    async_write: bool = False
    attention: str = "auto"
    gpu_fraction: float | None = None  # share of micro-batches attending on the GPU; None: from attention
    adaptive: bool = True
    max_gpu_parts: int | None = None  # the most the split may move to the GPU; None: SPLIT_HEADROOM more
    quant_bits: int | None = None  # 4 or 8: keys and values stored quantized (quant/kv.py); None: dtype
    quant_group_size: int = 64
    overlap: bool = False  # CPU-attended micro-batches in a thread and stream of their own (offload/cpu_side.py)
    # (seconds the streamed weights keep the bus a decode step, seconds one GPU-attended micro-batch's
    # cache adds), from the plan: how many micro-batches the split moves at once (kv_split)
    split_bus_s: tuple | None = None

    def __post_init__(self):
        if self.attention not in ("auto", "cpu", "gpu"):
            raise ValueError(f"KV attention must be auto, cpu or gpu, not {self.attention!r}")

    def gpu_parts(self, n_parts: int) -> int:
        fraction = self.gpu_fraction
        if fraction is None:
            fraction = {"cpu": 0.0, "gpu": 1.0}.get(self.attention, 0.0)
        return max(0, min(n_parts, round(fraction * n_parts)))

    def most_gpu_parts(self, n_parts: int) -> int:
        """The most micro-batches that may attend on the GPU at once: what GPU memory is planned for."""
        n = self.gpu_parts(n_parts)
        if self.attention != "auto" or not self.adaptive:
            return n
        most = n + SPLIT_HEADROOM if self.max_gpu_parts is None else self.max_gpu_parts
        return max(n, min(n_parts, most))


def gpu_fraction(weights_bus_s: float, cache_bytes: float, h2d_bytes_s: float, cpu_attention_bytes_s: float) -> float:
    """Share x of the cache to attend on the GPU so that a decode step, modelled as

        max((streamed weights + x * cache) / bus,  (1 - x) * cache / CPU attention bandwidth)

    is shortest: the bus and the CPU cores finish together, or all on the CPU while the weights
    alone keep the bus longer than the CPU needs for the whole cache."""
    if cache_bytes <= 0:
        return 0.0
    cpu_s = cache_bytes / cpu_attention_bytes_s
    if cpu_s <= weights_bus_s:
        return 0.0
    x = (cpu_s - weights_bus_s) / (cache_bytes / h2d_bytes_s + cpu_s)
    return max(0.0, min(1.0, x))


class OffloadedKVCache:
    def __init__(self, n_layers: int, parts: list[slice], max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, opts: KVOffload):
        self.n_layers, self.parts, self.max_len = n_layers, parts, max_len
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.opts = opts
        n_gpu = opts.gpu_parts(len(parts))
        self.gpu_parts = set(range(len(parts) - n_gpu, len(parts)))  # the last micro-batches
        self.codec = kv_quant(opts.quant_bits, opts.quant_group_size, kv_heads, head_dim)
        self.quant = None if self.codec is None else QuantWorkspace(self.codec, dtype, self.device)
        self.row_shape = (kv_heads, head_dim) if self.codec is None else (self.codec.row_bytes,)
        self.store_dtype = dtype if self.codec is None else torch.uint8
        shape = lambda rows: (max_len, rows.stop - rows.start, *self.row_shape)  # noqa: E731
        self.k = [[torch.empty(shape(p), dtype=self.store_dtype) for p in parts] for _ in range(n_layers)]
        self.v = [[torch.empty(shape(p), dtype=self.store_dtype) for p in parts] for _ in range(n_layers)]
        self._registered = []
        if opts.pinned and self.cuda:
            flat = [t for layer in self.k + self.v for t in layer]
            ok = pin_tensors(flat, device=self.device)
            self._registered = [t for t, good in zip(flat, ok) if good]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: dict[tuple[int, int], torch.cuda.Event] = {}  # asynchronous writes still landing
        self.scratch: dict[int, list] = {}  # GPU parts: two (k, v) device buffers, used by turns
        self.prefetched: dict[int, tuple] = {}  # part -> (layer, slots, buffer index, event)
        self.staging: dict[tuple[int, str], torch.Tensor] = {}
        self.deferred: dict[tuple[int, int], list] = {}  # (layer, part) -> staged row writes, in order
        self.staged_bytes = 0  # pinned staging the deferred writes hold (bounded: _bound_staging)
        # Held while staged writes are added or put in place: the cpu_side worker puts its parts'
        # in place (_landed_for_host) while this thread stages others' and bounds them, which can
        # put the worker's part's in place: it must not read those slots half written.
        self._staging_lock = threading.Lock()
        self.row_stage: dict[tuple[int, int], tuple] = {}  # pinned buffers for rows' past slots, and their last use
        self._row_reads = (-1, 0)  # (layer, reads so far in it): picks a staging buffer
        # Host seconds too: where a decode step's host thread goes (issue 17's step was the host's).
        # cpu_side_host_s: all of attend_on_cpu (waits and attention included, not time queued
        # behind another lane's kernel); cpu_lane_attention_s: of cpu_attention_s, the kernels
        # run from the cpu_side lanes (beside the other lane's host time); gpu_attention_host_s:
        # issuing a GPU-attended decode micro-batch's attention and its cache copies (not GPU time).
        # cpu_cache_read_bytes: the slots [:end] of the CPU-attended rows (what SDPA reads);
        # cpu_cache_visible_bytes: of those, the keys some query sees (all the Numba kernel reads:
        # the reference workload's prompts are 28 tokens left-padded to prompt_len, so about a tenth).
        self.stats = dict(cpu_attention_s=0.0, wait_for_gpu_s=0.0, cpu_cache_read_bytes=0, cpu_cache_visible_bytes=0,
                          h2d_cache_bytes=0, d2h_cache_bytes=0, cpu_side_host_s=0.0, gpu_attention_host_s=0.0,
                          cpu_lane_attention_s=0.0)
        self._stats_lock = threading.Lock()  # CPU-attended micro-batches count from their own thread (cpu_side)
        adaptive = self.cuda and opts.attention == "auto" and opts.adaptive
        self.split = SplitController(len(parts), n_gpu, opts.most_gpu_parts(len(parts)),
                                     bus=opts.split_bus_s) if adaptive else None
        self._mark = None  # (time, stats) at the start of the last decode pass
        # Runs a CPU attention kernel (a callable) and returns its result, and whether the calling
        # thread is one of the lanes that issue CPU-attended micro-batches side by side: see
        # use_cpu_side. None: here, on the calling thread, one micro-batch after the other.
        self.kernel_runner = None
        self.in_lane = lambda: False

    def use_cpu_side(self, side) -> None:
        """CPU attention kernels run in side's attention thread, fed by its lanes (offload/cpu_side.py);
        side None: on the calling thread again."""
        if side is None:
            self.kernel_runner, self.in_lane = None, lambda: False
        else:
            self.kernel_runner, self.in_lane = side.attend, side.in_lane

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.k + self.v for t in layer)

    def _count(self, name: str, amount) -> None:
        with self._stats_lock:
            self.stats[name] += amount

    def attends_on_cpu(self, part: int, rows: slice | None, step) -> bool:
        """Whether this micro-batch's attention runs on the CPU in this pass (after begin_pass)."""
        whole = self.parts[part]
        return step.length == 1 and (rows is None or rows == whole) and part not in self.gpu_parts

    @property
    def pinned_bytes(self) -> int:
        """What cudaHostRegister really locked: a copy from a buffer it refused is pageable, and
        such a copy holds the host thread for its whole length, at a fraction of the bus."""
        return sum(t.numel() * t.element_size() for t in self._registered)

    def layer(self, i: int, part: int, rows: slice) -> "OffloadedLayerKV":
        return OffloadedLayerKV(self, i, part, rows)

    def zero_(self) -> None:
        """Rows at their own lengths attend over slots other rows have not written yet, masked; but
        a masked slot holding NaN (uninitialised memory) still poisons the sum (0 * NaN)."""
        for t in (t for layer in self.k + self.v for t in layer):
            t.zero_()

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        with self._staging_lock:
            self.deferred.clear()
            self.staged_bytes = 0
        self.row_stage.clear()
        unpin_tensors(self._registered)
        self._registered = []

    def fits(self, parts: list[slice], max_len: int, opts: KVOffload) -> bool:
        """Whether a later generation can reuse this cache (pinning anew is slow). The split it
        has learned (kv_split) carries over."""
        return self.parts == parts and self.max_len >= max_len and self.opts == opts

    def begin_pass(self, step, prefills: bool = False) -> None:
        """At the start of every pass (the engine calls it, with the step of part 0 when the pass
        has it): between two decode steps, the last one's times go to the split controller and its
        answer applies to this one. Prefills say nothing about decode, nor does a continuous
        batch's pass that also prefills prompt chunks (`prefills`): its time includes theirs, which
        neither side's attention explains (on the H100 such passes took 1.26 s against 0.89 s)."""
        if self.split is None:
            return
        now = time.perf_counter()
        names = ("cpu_attention_s", "cpu_lane_attention_s", "wait_for_gpu_s", "gpu_attention_host_s", "cpu_side_host_s")
        if step.start > 0 and self._mark is not None:
            t0, *marks = self._mark
            attention, in_lanes, wait, issue, side = (self.stats[name] - mark for name, mark in zip(names, marks))
            # the CPU side's cost is all its time but the waits: staging q, k and v and copying the
            # output out are on it too, not only the attention (kv_split's c). The kernels of
            # micro-batches in the lanes run beside the lanes' host time, summed over them: the
            # longer of the two is the cost (summed, the lanes' 2.2 s of a 1.8 s pass on the H100
            # moved parts to the GPU and back). Those attended on the engine's thread (an MoE
            # layer's, a part's beside a prompt chunk) run one after the other: all counted.
            cost, step_s = max(attention, side - wait - in_lanes), now - t0
            if in_lanes > 0:
                # A lane waits for its q while the other lane's kernel keeps the cores busy, and
                # the two lanes' waits are summed: not the CPU side's idle time, which is at most
                # what the pass left it. Counted in full, a CPU-bound pass read as waiting on the
                # GPU and the split sent parts back to the CPU.
                wait = min(wait, max(0.0, step_s - cost))
            n = self.split.observe(cost, wait, step_s, issue)
            new = set(range(len(self.parts) - n, len(self.parts)))
            for j in self.gpu_parts - new:
                self.prefetched.pop(j, None)  # fetched ahead for a part that now attends on the CPU
            self.gpu_parts = new
        self._mark = (now, *(self.stats[name] for name in names)) if step.start > 0 and not prefills else None

    # -- pieces -------------------------------------------------------------------------------------
    def _pinned_like(self, part: int, name: str, t: torch.Tensor) -> torch.Tensor:
        """A reusable pinned host buffer for small per-part tensors (q, attention output)."""
        buf = self.staging.get((part, name))
        if buf is None or buf.shape != t.shape:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
            self.staging[(part, name)] = buf
        return buf

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """New keys or values [rows, heads, t, dim] -> the host layout's slots [t, rows, ...]:
        permuted, or quantized into rows of bytes."""
        return x.permute(2, 0, 1, 3).contiguous() if self.quant is None else self.quant.stored(x)

    def _attend_buffers(self, q, kb, vb, end: int, mask, scale) -> torch.Tensor:
        """Attention over a device buffer's slots [:end] (keys kb, values vb)."""
        if self.quant is None:
            return sdpa(q, self._dense(kb, end, "k"), self._dense(vb, end, "v"), mask, scale)
        return attend_stored(self.codec, q, kb[:end], vb[:end], mask, scale, self.quant)

    def _dense(self, buf: torch.Tensor, end: int, name: str) -> torch.Tensor:
        """A device buffer's slots [:end] as keys or values [rows, heads, end, dim] for SDPA."""
        return buf[:end].permute(1, 2, 0, 3) if self.quant is None else self.quant.dense(buf[:end], name)

    def _write_back(self, i: int, j: int, kt: torch.Tensor, vt: torch.Tensor, start: int, end: int) -> None:
        """New keys/values in the host layout (_stored) on the device -> host slots [start:end]."""
        self._apply_deferred(i, j)  # older row writes first: they must not land over these
        hk, hv = self.k[i][j], self.v[i][j]
        self._count("d2h_cache_bytes", 2 * kt.numel() * kt.element_size())
        if not self.cuda:
            hk[start:end].copy_(kt)
            hv[start:end].copy_(vt)
            return
        if not self.opts.async_write:  # in order on the compute stream
            hk[start:end].copy_(kt, non_blocking=True)
            hv[start:end].copy_(vt, non_blocking=True)
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            copy_in_chunks(hk[start:end], kt)
            copy_in_chunks(hv[start:end], vt)
        kt.record_stream(self.stream)  # freed only once the side stream is done with them
        vt.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        self.pending[(i, j)] = done

    def _landed_for_host(self, i: int, j: int) -> None:
        event = self.pending.pop((i, j), None)
        if event is not None:
            event.synchronize()
        self._apply_deferred(i, j)

    def _buffers(self, j: int) -> list:
        if j not in self.scratch:
            rows = self.parts[j].stop - self.parts[j].start
            make = lambda: torch.empty(self.max_len, rows, *self.row_shape,  # noqa: E731
                                       dtype=self.store_dtype, device=self.device)
            self.scratch[j] = [(make(), make()), (make(), make())]
        return self.scratch[j]

    def _copy_past(self, i: int, j: int, upto: int, index: int, stream) -> None:
        kb, vb = self._buffers(j)[index]
        self._apply_deferred(i, j)
        if self.cuda:
            event = self.pending.get((i, j))
            if event is not None:
                stream.wait_event(event)
        with torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext():
            copy_in_chunks(kb[:upto], self.k[i][j][:upto])
            copy_in_chunks(vb[:upto], self.v[i][j][:upto])
        self._count("h2d_cache_bytes", 2 * kb[:upto].numel() * kb.element_size())

    def _past_on_device(self, i: int, j: int, upto: int) -> int:
        """Index of the device buffer that holds layer i's slots [:upto] for part j."""
        hit = self.prefetched.pop(j, None)
        if hit is not None and hit[:2] == (i, upto):
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(hit[3])
            return hit[2]
        index = 0 if hit is None else 1 - hit[2]
        self._copy_past(i, j, upto, index, torch.cuda.current_stream(self.device) if self.cuda else None)
        return index

    def _prefetch(self, i: int, j: int, upto: int, index: int) -> None:
        """Copy layer i's slots [:upto] for part j into buffer `index` on the side stream, once the
        compute that last read that buffer is done."""
        if not self.cuda:
            return
        free = torch.cuda.Event()
        free.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(free)
        self._copy_past(i, j, upto, index, self.stream)
        landed = torch.cuda.Event()
        landed.record(self.stream)
        self.prefetched[j] = (i, upto, index, landed)

    # -- rows at their own slots (continuous batching) ----------------------------------------------
    def _defer(self, i: int, j: int, k_new: torch.Tensor, v_new: torch.Tensor, put, rows: set) -> None:
        """Write new keys/values (device tensors) into host slots of `rows` of part j: put(k, v)
        does it with host tensors; on the CPU now, from the GPU later, from pinned staging."""
        self._count("d2h_cache_bytes", 2 * k_new.numel() * k_new.element_size())
        if not self.cuda:
            put(k_new, v_new)
            return
        compute = torch.cuda.current_stream(self.device)
        # With async_write on the side stream, so that a prompt chunk's copy does not hold up compute.
        stream = self.stream if self.opts.async_write else compute
        sources = [t.contiguous() for t in (k_new, v_new)]
        if stream is not compute:
            ready = torch.cuda.Event()
            ready.record(compute)
            stream.wait_event(ready)
        staged = []
        with torch.cuda.stream(stream):
            for t in sources:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                staged.append(host)
        if stream is not compute:
            for t in sources:
                t.record_stream(stream)  # freed only once the side stream has read them
        event = torch.cuda.Event()
        event.record(stream)
        with self._staging_lock:
            self.deferred.setdefault((i, j), []).append((event, *staged, put, rows))
            self.staged_bytes += sum(t.numel() * t.element_size() for t in staged)
        self._bound_staging()

    def _bound_staging(self) -> None:
        """Put the oldest staged writes in place while staging holds more than STAGING_LIMIT bytes.
        Writes otherwise wait until their layer and part are next read, the next pass: a pass that
        prefills a whole batch (96 prompts of 512 tokens, OPT-30B) staged every row of every layer
        at once, 67 GB of fresh pinned memory beside a 67 GB cache, and the process was killed on
        the 125 GiB H100 host. The oldest are a layer or more behind, long landed, so this rarely
        waits. They may be the last pass's writes to a part the cpu_side worker reads in this one:
        the worker's _landed_for_host waits for them on _staging_lock."""
        for key in list(self.deferred):
            if self.staged_bytes <= STAGING_LIMIT:
                return
            self._apply_deferred(*key)

    def _apply_deferred(self, i: int, j: int, rows: set | None = None) -> None:
        """Put (i, j)'s staged writes in place, in order: all of them, or those touching `rows` and
        those already landed. One pass's writes touch disjoint rows and older ones have landed, so
        what is left behind never overlaps what goes in before it."""
        with self._staging_lock:
            entries = self.deferred.pop((i, j), None)
            if not entries:
                return
            keep = []
            for entry in entries:
                event, k_host, v_host, put, touched = entry
                if rows is None or touched & rows or event.query():
                    event.synchronize()
                    put(k_host, v_host)
                    self.staged_bytes -= k_host.numel() * k_host.element_size() + v_host.numel() * v_host.element_size()
                else:
                    keep.append(entry)
            if keep:
                self.deferred[(i, j)] = keep

    def _rows_past_on_device(self, i: int, j: int, local: slice, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [:upto] of rows `local` of part j as device tensors [rows, heads, upto, dim].

        Gathered by the CPU into pinned memory and read by a kernel (to_device_zero_copy), so the
        copy never queues behind a layer of weights on the copy engine."""
        event = self.pending.pop((i, j), None)
        if event is not None:
            event.synchronize()
        self._apply_deferred(i, j, set(range(local.start, local.stop)))
        src = (self.k[i][j][:upto, local], self.v[i][j][:upto, local])
        self._count("h2d_cache_bytes", 2 * src[0].numel() * src[0].element_size())
        if not self.cuda:
            return tuple(self._dense(t, upto, name).clone() for t, name in zip(src, "kv"))
        # Buffers by turns, reused two layers on, once the kernel that read them is done.
        layer, n = self._row_reads
        self._row_reads = (i, n + 1 if layer == i else 0)
        key = (i % 2, self._row_reads[1])
        buf, used = self.row_stage.get(key, (None, None))
        if used is not None:
            used.synchronize()
        numel = src[0].numel()
        if buf is None or buf.numel() < 2 * numel:
            buf = torch.empty(2 * numel, dtype=self.store_dtype, pin_memory=True)
        out = []
        for n_, (t, name) in enumerate(zip(src, "kv")):
            host = buf[n_ * numel:(n_ + 1) * numel].view(t.shape)
            host.copy_(t)
            out.append(self._dense(to_device_zero_copy(host, self.device), upto, name).clone())
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.row_stage[key] = (buf, done)
        return tuple(out)

    def attend_rows(self, i, j, local: slice, q, k, v, step, mask, scale):
        """A prompt chunk of some rows of part j (slots start..end of those rows only): attends on
        the device over the rows' earlier slots and the chunk, and writes the chunk back."""
        start, end = step.start, step.end
        keys, values = k, v
        if start > 0:
            past_k, past_v = self._rows_past_on_device(i, j, local, start)
            keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        out = sdpa(q, keys, values, mask, scale)
        hk, hv = self.k[i][j], self.v[i][j]

        def put(k_host, v_host):
            hk[start:end, local] = k_host
            hv[start:end, local] = v_host
        self._defer(i, j, self._stored(k), self._stored(v), put, set(range(local.start, local.stop)))
        return out

    def _decode_rows_on_device(self, i, j, q, k, v, step, mask, scale):
        """A decode step of rows at their own slots, attended on the GPU: the part's slots [:end]
        come over as in a static step (the prefetch included), each row's new k/v goes in at its
        slot, and only real rows' new k/v go back (a parked row's slot is beyond the keys)."""
        end = step.end
        index = self._past_on_device(i, j, end)
        kb, vb = self._buffers(j)[index]
        rows = torch.arange(k.shape[0], device=k.device)
        k_new, v_new = self._stored(k)[0], self._stored(v)[0]
        kb[step.write_slots, rows] = k_new
        vb[step.write_slots, rows] = v_new
        out = self._attend_buffers(q, kb, vb, end, mask, scale)
        slots = write_slots_host(step)
        real = (slots < end).nonzero().flatten()
        hk, hv = self.k[i][j], self.v[i][j]

        def put(k_host, v_host):
            put_rows(hk, slots[real], real, k_host)
            put_rows(hv, slots[real], real, v_host)
        self._defer(i, j, k_new, v_new, put, set(real.tolist()))
        if j in self.gpu_parts:  # the guess for the next pass: one slot further
            nxt, upto = (i + 1, end) if i + 1 < self.n_layers else (0, min(end + 1, self.max_len))
            self._prefetch(nxt, j, upto, 1 - index)
        return out

    # -- attention ----------------------------------------------------------------------------------
    def attend_on_device(self, i, j, q, k, v, step, mask, scale):
        if step.write_slots is not None:
            return self._decode_rows_on_device(i, j, q, k, v, step, mask, scale)
        start, end = step.start, step.end
        kt, vt = self._stored(k), self._stored(v)  # once: the device buffer and the host both take them
        if start == 0:
            self.prefetched.pop(j, None)  # a new sequence: whatever was fetched ahead is stale
            keys, values = k, v
        else:
            index = self._past_on_device(i, j, start)
            kb, vb = self._buffers(j)[index]
            kb[start:end].copy_(kt)
            vb[start:end].copy_(vt)
        out = sdpa(q, keys, values, mask, scale) if start == 0 else self._attend_buffers(q, kb, vb, end, mask, scale)
        self._write_back(i, j, kt, vt, start, end)
        if start > 0 and j in self.gpu_parts:
            # The next layer's cache (or, after the last layer, the next pass's first) comes in
            # while this one computes.
            nxt, upto = (i + 1, start) if i + 1 < self.n_layers else (0, end)
            self._prefetch(nxt, j, upto, 1 - index)
        return out

    def attend_on_cpu(self, i, j, q, k, v, step, mask, scale):
        started = time.perf_counter()
        start, end = step.start, step.end
        self._landed_for_host(i, j)
        hk, hv = self.k[i][j], self.v[i][j]
        kt, vt = self._stored(k), self._stored(v)  # [t, rows, ...] as the host stores them
        own_slots = step.write_slots is not None
        if own_slots:  # rows at their own slots: staged here, put in place once they have arrived
            k_new, v_new = kt[0], vt[0]
            if self.cuda:
                k_new, v_new = self._pinned_like(j, "k", k_new), self._pinned_like(j, "v", v_new)
        if self.cuda:
            q_host = self._pinned_like(j, "q", q)
            q_host.copy_(q, non_blocking=True)
            if own_slots:
                k_new.copy_(kt[0], non_blocking=True)
                v_new.copy_(vt[0], non_blocking=True)
            else:
                hk[start:end].copy_(kt, non_blocking=True)
                hv[start:end].copy_(vt, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(torch.cuda.current_stream(self.device))
            t0 = time.perf_counter()
            arrived.synchronize()
            self._count("wait_for_gpu_s", time.perf_counter() - t0)
        else:
            q_host = q
            if not own_slots:
                hk[start:end] = kt
                hv[start:end] = vt
        if own_slots:
            rows = torch.arange(k.shape[0])
            put_rows(hk, write_slots_host(step), rows, k_new)
            put_rows(hv, write_slots_host(step), rows, v_new)
        self._count("d2h_cache_bytes", 2 * kt.numel() * kt.element_size())
        # One bias per mask and pass: layers may use different masks (Gemma 3's sliding and global).
        # With it, how many (slot, row) keys some query sees: the kernel reads only those (a
        # left-padded prompt's padding is masked, and not read).
        biases = step.extras.setdefault("cpu_biases", {})
        if id(mask) not in biases:
            made = bias_from_mask(mask, end)
            biases[id(mask)] = (made, int((made > float("-inf")).any(dim=3).any(dim=2).sum()))
        bias, visible = biases[id(mask)]
        # On CUDA the result goes straight into the pinned buffer the GPU reads it from.
        out_host = self._pinned_like(j, "out", q) if self.cuda else None

        def kernel():
            t0 = time.perf_counter()
            out = cpu_attend(q_host, hk, hv, end, bias, scale, quant=self.codec, out=out_host)
            return out, time.perf_counter() - t0
        t0 = time.perf_counter()
        out, seconds = kernel() if self.kernel_runner is None else self.kernel_runner(kernel)
        queued = time.perf_counter() - t0 - seconds  # behind another lane's kernel: not this one's cost
        self._count("cpu_attention_s", seconds)
        if self.in_lane():
            self._count("cpu_lane_attention_s", seconds)  # beside the other lane's host time (begin_pass)
        self._count("cpu_cache_read_bytes", 2 * hk[:end].numel() * hk.element_size())
        self._count("cpu_cache_visible_bytes", 2 * visible * hk[0, 0].numel() * hk.element_size())
        out = to_device_zero_copy(out, self.device) if self.cuda else out
        self._count("cpu_side_host_s", time.perf_counter() - started - queued)  # kv_split's CPU cost
        return out


def write_slots_host(step) -> torch.Tensor:
    """The step's per-row write slots on the CPU, copied once per pass."""
    slots = step.extras.get("write_slots_host")
    if slots is None:
        slots = step.extras["write_slots_host"] = step.write_slots.cpu()
    return slots


class OffloadedLayerKV:
    def __init__(self, cache: OffloadedKVCache, i: int, part: int, rows: slice | None = None):
        self.cache, self.i, self.part, self.rows = cache, i, part, rows

    def attend(self, q, k, v, step, mask, scale=None) -> torch.Tensor:
        c = self.cache
        whole = c.parts[self.part]
        if self.rows is not None and self.rows != whole:  # some rows of the part: a prompt chunk
            local = slice(self.rows.start - whole.start, self.rows.stop - whole.start)
            return c.attend_rows(self.i, self.part, local, q, k, v, step, mask, scale)
        if c.attends_on_cpu(self.part, self.rows, step):
            return c.attend_on_cpu(self.i, self.part, q, k, v, step, mask, scale)  # counts its host time
        t0 = time.perf_counter()
        if step.length == 1:
            out = c.attend_on_device(self.i, self.part, q, k, v, step, mask, scale)
            c._count("gpu_attention_host_s", time.perf_counter() - t0)
            return out
        return c.attend_on_device(self.i, self.part, q, k, v, step, mask, scale)


def probe_cpu_attention_bandwidth(batch: int, kv_heads: int, q_heads: int, head_dim: int, seq: int,
                                  dtype: torch.dtype = torch.float16, repeats: int = 3, quant_bits: int | None = None,
                                  quant_group_size: int = 64) -> float:
    """Cache bytes/s that decode attention computed on the CPU gets through: the kernel the
    offloaded KV cache runs (offload/cpu_attention), on its slot-major layout (4/8-bit with
    quant_bits), for one micro-batch of `batch` rows. The cache is sized past the last-level cache
    and several layers are cycled so that reads hit RAM."""
    from ..quant.kv import kv_quant
    from .cpu_attention import attend, bias_from_mask
    codec = kv_quant(quant_bits, quant_group_size, kv_heads, head_dim)
    if codec is None:
        make = lambda: torch.randn(seq, batch, kv_heads, head_dim).to(dtype)  # noqa: E731
    else:
        make = lambda: codec.encode(torch.randn(seq, batch, kv_heads * head_dim))  # noqa: E731
    first = make()
    per_layer = 2 * first.numel() * first.element_size()
    layers = max(2, min(16, (1 << 30) // max(per_layer, 1)))
    k = [first] + [make() for _ in range(layers - 1)]
    v = [make() for _ in range(layers)]
    q = torch.randn(batch, q_heads, 1, head_dim).to(dtype)
    bias = bias_from_mask(None, seq, batch, q_heads // kv_heads)
    for i in range(layers):  # the first call compiles the kernel, or loads it from Numba's cache
        attend(q, k[i], v[i], seq, bias, quant=codec)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(layers):
            attend(q, k[i], v[i], seq, bias, quant=codec)
        best = min(best, time.perf_counter() - t0)
    return layers * per_layer / best
