"""Decode attention computed on the CPU, over the offloaded KV cache where it lies.

The cache is slot-major, [slots, rows, kv_heads, head_dim] in float16, bfloat16 or float32. A
decode step is bound by reading it, so attention must read every key and value once, straight
from that layout, and keep up with the memory: the Numba kernel (cpu_attention_numba) does, in
float32, split over threads by slot ranges and (row, kv head) ranges as flash-decoding splits the
keys. PyTorch's SDPA on the same cache converted blocks of half-precision keys to float32 first and
got a third of the cores' read bandwidth on the H100 machine (issue 17).

Without Numba (an unusual platform, a version that fails to import) the same computation runs in
PyTorch below, an online softmax over blocks of slots, so that only one block at a time is ever
converted to float32.
Both take every family's additive mask, so ragged rows, sliding windows and ALiBi need nothing
special; tests/test_cpu_attention.py checks both against a float64 reference.

The kernel is not the fastest everywhere: with grouped-query heads each key meets several query
heads, the kernel becomes bound by arithmetic, and on the 16-core H100 machine PyTorch's SDPA over
the permuted cache read a Llama-2-70B-shaped cache 3x faster (30.3 against 10.2 GB/s), while for
OPT-30B's 56 plain heads the kernel was the faster (57.5 against 45.8). Which wins depends on the
CPU, its thread count and the shape, so for dense caches `attend` (impl None) times both on the
run's own first calls of each shape and keeps the faster (_Trial).

The same trial picks how the kernel's work is cut (slot ranges x (row, head) ranges, for dense and
quantized caches alike). On the H100 host (16 cores) the best cut of a call of 8 rows read 58.6
GB/s where the fixed rule's read 51.9, and the best differed by shape and cache (2 x 8 for a
float16 cache, 4 x 8 and 4 x 16 for 4-bit ones): the rule alone cannot know the machine.
"""
from __future__ import annotations

import functools
import math
import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

_workspaces: dict[tuple, list] = {}
_NO_LAYOUT = np.zeros(4, np.int64)  # the kernel's quantization layout argument, unused for dense caches
_NO_SUMS = np.zeros(0, np.float32)  # nor are the sums of q's pieces of a group
_NO_ORDER = np.zeros(0, np.int64)  # q and the output in the head's own order
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernel reads q as and writes out as
clock = time.perf_counter  # what the trials time with (tests give a fake one)


@functools.cache
def _numba():
    """The kernels, imported (and Numba with them) on first use; None where Numba is missing."""
    try:
        from .cpu_attention_numba import attend, merge, prepare_query, put_rows, set_threads, splits
    except ImportError:
        return None
    return SimpleNamespace(attend=attend, merge=merge, prepare_query=prepare_query, put_rows=put_rows,
                           set_threads=set_threads, splits=splits)


def available_impls() -> list[str]:
    """The kernel's implementations, for any cache; `attend` also takes "sdpa" for dense ones."""
    return (["numba"] if _numba() is not None else []) + ["torch"]


class _Trial:
    """Which implementation one shape of call runs. Its first calls try the candidates one after
    the other, `rounds` + 1 calls each: the first untimed (Numba compiles or loads the kernel,
    buffers are made, and the other candidate's thread pool, still spinning, is waited out), then
    `rounds` timed, per slot read since the context grows between decode steps. Afterwards the
    fastest stays. The calls are the run's own (each returns its real output), so the trial costs
    a few calls at the slower speed and measures the data as the run reads it: consecutive calls
    are different layers, from RAM."""

    def __init__(self, candidates: list[str], rounds: int = 3):
        self.candidates, self.rounds, self.calls = candidates, rounds, 0
        self.best = dict.fromkeys(candidates, math.inf)
        self.chosen: str | None = None

    def next(self) -> str:
        return self.chosen or self.candidates[self.calls // (1 + self.rounds)]

    def record(self, impl: str, seconds_per_slot: float) -> None:
        if self.calls % (1 + self.rounds):
            self.best[impl] = min(self.best[impl], seconds_per_slot)
        self.calls += 1
        if self.calls == len(self.candidates) * (1 + self.rounds):
            self.chosen = min(self.candidates, key=self.best.get)


_trials: dict[tuple, _Trial] = {}


def choices() -> dict[tuple, str | None]:
    """Per shape of call so far ((B, Hkv, R, D, mask heads, cache dtype or "N-bit", q dtype,
    threads)), the implementation and cut its trial chose (None while it runs): for logs and
    benchmarks."""
    return {key: trial.chosen for key, trial in _trials.items()}


def kernel_cuts(threads: int) -> list[str]:
    """The kernel's candidate cuts for the trial: "numba" (cpu_attention_numba.splits' rule) and
    "numba SxI" (S slot ranges x I item ranges, clamped to the call's slots and items)."""
    cuts = [(2, threads // 2), (4, threads // 4), (4, threads // 2), (4, threads)]
    return ["numba"] + list(dict.fromkeys(f"numba {s}x{i}" for s, i in cuts if i >= 1))


def _cut(impl: str, end: int, items: int) -> tuple[int, int] | None:
    if impl == "numba":
        return None
    cut = re.fullmatch(r"numba (\d+)x(\d+)", impl)
    if cut is None:
        raise ValueError(f"unknown CPU attention implementation {impl!r} (a cut is written \"numba 2x8\")")
    s, i = int(cut[1]), int(cut[2])
    return max(1, min(s, end)), max(1, min(i, items))


def _run(impl, q, k, v, end, bias, scale, quant, out):
    """[B, H, t, D] in out (or a new tensor of q's dtype)."""
    if impl.startswith("numba"):
        items = q.shape[0] * (k.shape[2] if quant is None else quant.kv_heads)
        return _attend_numba(q, k, v, end, bias, scale, splits=_cut(impl, end, items), quant=quant, out=out)
    if impl == "torch":
        result = _attend_torch(_scaled_query(q, k, scale, quant), k, v, end, bias, quant=quant)
    elif impl == "sdpa":
        if quant is not None:
            raise ValueError("the sdpa implementation reads dense caches, not a 4/8-bit one")
        result = _attend_sdpa(q, k, v, end, bias, scale)
    else:
        raise ValueError(f"unknown CPU attention implementation {impl!r}")
    result = result.reshape(q.shape)
    return result.to(q.dtype) if out is None else out.copy_(result)


def _scaled_query(q, k, scale, quant):
    """q [B, H, t, D] as float32 [B, Hkv, R, D], scaled (query heads that share a KV head folded
    into R, as layers.grouped_mask folds them)."""
    b, h, t, d = q.shape
    h_kv = k.shape[2] if quant is None else quant.kv_heads
    return (q.float() * scale).reshape(b, h_kv, (h // h_kv) * t, d).contiguous()


def _chosen_run(q, k, v, end, bias, scale, quant, out):
    """impl None: the Numba kernel cut the way this shape's trial found fastest, or for dense
    caches SDPA if that was faster still; the PyTorch fallback where Numba does not import."""
    kernel = available_impls()[0]
    candidates = kernel_cuts(torch.get_num_threads()) if kernel == "numba" else [kernel]
    if quant is None:
        candidates = candidates + ["sdpa"]
    if len(candidates) == 1:
        return _run(kernel, q, k, v, end, bias, scale, quant, out)
    b, h, t, d = q.shape
    h_kv = k.shape[2] if quant is None else quant.kv_heads
    key = (b, h_kv, (h // h_kv) * t, d, bias.shape[2], k.dtype if quant is None else f"{quant.bits}-bit",
           q.dtype, torch.get_num_threads())
    trial = _trials.setdefault(key, _Trial(candidates))
    if trial.chosen is not None:
        return _run(trial.chosen, q, k, v, end, bias, scale, quant, out)
    impl = trial.next()
    t0 = clock()
    result = _run(impl, q, k, v, end, bias, scale, quant, out)
    trial.record(impl, (clock() - t0) / max(end, 1))
    return result


def put_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """cache[slots[n], rows[n]] = new[rows[n]] for every n: one new slot of some rows of the
    slot-major cache [slots, rows, ...] from new [rows, ...] (both on the CPU, same dtype). In
    Numba where it imports, so that no PyTorch parallel region runs just before an attention call
    (cpu_attention_numba.put_rows says why); else PyTorch's indexed assignment."""
    if len(slots) == 0:
        return
    slots, rows = slots.to(torch.int64), rows.to(torch.int64)
    if slots.shape != rows.shape or not (0 <= int(slots.min()) and int(slots.max()) < cache.shape[0]
                                         and 0 <= int(rows.min()) and int(rows.max()) < cache.shape[1]):
        # the Numba kernel does not check its indices: out of range would write past the cache
        raise ValueError(f"slots {slots.tolist()} and rows {rows.tolist()} must index the cache's "
                         f"{cache.shape[0]} slots and {cache.shape[1]} rows, one slot per row")
    if new.shape[1:] != cache.shape[2:] or new.shape[0] != cache.shape[1] or new.dtype != cache.dtype:
        raise ValueError(f"new rows {tuple(new.shape)} {new.dtype} do not fit the cache {tuple(cache.shape)} {cache.dtype}")
    nb = _numba()
    if nb is None or not (cache.is_contiguous() and new.is_contiguous()):
        cache[slots, rows] = new[rows]
        return
    row_bytes = cache[0, 0].numel() * cache.element_size()
    nb.put_rows(cache.view(-1).view(torch.uint8).numpy(), row_bytes, cache.shape[1],
                slots.numpy(), rows.numpy(), new.reshape(-1).view(torch.uint8).numpy())


def bias_from_mask(mask: torch.Tensor | None, end: int, batch: int = 1, queries: int = 1) -> torch.Tensor:
    """The additive mask [B, 1 or Hkv, R, S] (query heads that share a KV head folded into R, as
    layers.grouped_mask does) in the order the kernel walks it: float32 [end, B, 1 or Hkv, R] on
    the CPU. It is the same for every layer of a pass, so callers keep it for the pass."""
    if mask is None:
        return torch.zeros(end, batch, 1, queries)
    return mask[..., :end].to("cpu", torch.float32).permute(3, 0, 1, 2).contiguous()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, bias: torch.Tensor,
           scale: float | None = None, impl: str | None = None, quant=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, H, t, D] over slots [:end] of k, v [slots, B, Hkv, D] (CPU tensors), or
    with quant (a quant.kv.KVQuant) of the 4/8-bit cache k, v uint8 [slots, B, row bytes], with
    bias from bias_from_mask. Returns [B, H, t, D] in q's dtype. impl: "numba", "torch" or "sdpa"
    (dense caches); None takes Numba where it imports (else "torch"), cut, and for a dense cache
    chosen against SDPA, by what was fastest on this shape's first calls (_Trial). out: where to
    put the result (q's shape and dtype; a pinned buffer bound for the GPU), which the kernel
    writes directly: no new tensor, on each of a step's 1,536 calls at OPT-30B batch 256."""
    b, h, t, d = q.shape
    h_kv = k.shape[2] if quant is None else quant.kv_heads
    if h % h_kv:  # the kernel folds q into [B, Hkv, R, D] unchecked: a remainder wrote past its buffer
        raise ValueError(f"query heads must be a multiple of the {h_kv} KV heads, not {h}")
    # The kernel indexes the cache by q's rows and head size: a larger q read past it, where
    # PyTorch's paths broadcast one cache row over every query row without a word.
    row = (h_kv, d) if quant is None else (quant.row_bytes,)
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[1:]) != (b, *row):
            raise ValueError(f"{name} must be [slots, {b} rows (q's), {', '.join(map(str, row))}], not {list(x.shape)}")
    if bias.shape[1] != b:
        raise ValueError(f"bias must have q's {b} rows, not {bias.shape[1]}")
    if not 0 < end <= min(k.shape[0], v.shape[0], bias.shape[0]):  # the kernel would read past the arrays
        raise ValueError(f"end must be 1 to the cache's {min(k.shape[0], v.shape[0])} slots and the bias's "
                         f"{bias.shape[0]}; got {end}")
    if bias.shape[3] != (h // h_kv) * t:  # the kernel reads R entries a row: fewer is reading past the bias
        raise ValueError(f"bias must have {(h // h_kv) * t} query rows per KV head ({h // h_kv} query heads x {t} "
                         f"tokens, folded as layers.grouped_mask does), not {bias.shape[3]}")
    if bias.shape[2] not in (1, h_kv):
        raise ValueError(f"mask heads must be 1 or the {h_kv} KV heads, not {bias.shape[2]}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype}, not {tuple(out.shape)} {out.dtype}")
    scale = d ** -0.5 if scale is None else scale
    if impl is None:
        return _chosen_run(q, k, v, end, bias, scale, quant, out)
    return _run(impl, q, k, v, end, bias, scale, quant, out)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, bias: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """PyTorch's SDPA over the permuted dense cache, in the cache's dtype (what the offloaded cache
    ran before the kernel). Query heads that share a KV head are folded into the query axis, as
    layers.sdpa does, so the cache is not repeated. Unlike the kernel, a query whose keys are all
    hidden gets NaN (the engine never asks for one)."""
    b, h, t, d = q.shape
    h_kv = k.shape[2]
    keys, values = k[:end].permute(1, 2, 0, 3), v[:end].permute(1, 2, 0, 3)
    mask = bias[:end].permute(1, 2, 3, 0).to(k.dtype)
    qg = q.to(k.dtype).reshape(b, h_kv, (h // h_kv) * t, d)
    return F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)


def _as_numpy(x: torch.Tensor):
    """A view the kernel can read: half-precision caches as their 16-bit patterns (Numba has no
    float16), uint16 for float16 and int16 for bfloat16, so the kernel's types tell them apart."""
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().view("uint16")
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy()
    if x.dtype in (torch.float32, torch.uint8):  # uint8: a quantized cache's rows
        return x.numpy()
    raise TypeError(f"CPU attention reads float16, bfloat16 or float32 caches, not {x.dtype}")


def _workspace(slot_splits: int, item_splits: int, end: int, b: int, h: int, r: int, d: int,
               per_i: int | None = None) -> list:
    """Partial results per slot range and the work units' scratch, as numpy arrays, kept between
    calls: fresh buffers of a few MB per layer would cost page faults on every call. per_i: the
    most items a range holds (default: an even split)."""
    units, per_s = slot_splits * item_splits, -(-end // slot_splits)
    per_i = per_i or -(-(b * h) // item_splits)
    # Per thread: the cpu_side worker and the engine's own thread may attend micro-batches of one
    # shape at once (a part with a prompt chunk stays on the engine's thread), and shared buffers
    # mixed their results.
    key = (threading.get_ident(), slot_splits, item_splits, per_s, per_i, b, h, r, d)
    if key not in _workspaces:
        if len(_workspaces) > 16:
            _workspaces.clear()
        shapes = [(slot_splits * b * h * r,), (slot_splits * b * h * r,), (slot_splits * b * h * r * d,),
                  (units, per_s * per_i * r), (units, d),
                  (b * h * r * d,), (b * h * r * d,), (b * h * r * d,)]  # the query, its pieces' sums, the result
        _workspaces[key] = [torch.empty(s).numpy() for s in shapes]
    return _workspaces[key]


def _attend_numba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, bias: torch.Tensor, scale: float,
                  splits: tuple[int, int] | None = None, quant=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, H, t, D] (float16, bfloat16 or float32) into out (q's shape; float16,
    bfloat16 or float32; a new tensor of q's dtype if None). splits: (slot ranges, item ranges),
    chosen for the thread count unless given (tests). No PyTorch operation runs on the way: the
    query is scaled and widened, and the result narrowed into out, by the Numba kernels (see
    cpu_attention_numba.prepare_query for why)."""
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("the CPU kernel reads whole contiguous caches (a strided view would be copied)")
    nb = _numba()
    wanted = torch.get_num_threads()  # the pool size PyTorch was given (OMP_NUM_THREADS, a rank's share)
    threads = nb.set_threads(wanted)
    b, h, t, d = q.shape
    h_kv = k.shape[2] if quant is None else quant.kv_heads
    grouped = (b, h_kv, (h // h_kv) * t, d)  # query heads that share a KV head folded, as layers.grouped_mask does
    item_bytes = 2 * d * k.element_size() if quant is None else 2 * quant.row_bytes // quant.kv_heads
    slot_splits, item_splits = splits or nb.splits(threads, end, b * h_kv, item_bytes)
    bias_np = bias.float().contiguous().numpy()
    bounds, ends, widest = _item_ranges_for(bias, bias_np, h_kv, item_splits)
    *work, qk, qsum, out32 = _workspace(slot_splits, item_splits, end, *grouped, per_i=widest)
    layout, order, seg = _NO_LAYOUT, _NO_ORDER, 0
    if quant is not None:
        layout, order = kernel_layout(quant), _kernel_order(quant)
        seg = int(layout[1])
    q_in = q if q.dtype in _KERNEL_DTYPES else q.float()
    nb.prepare_query(_as_numpy(q_in.contiguous()).reshape(-1), np.float32(scale), d, seg, order, qk, qsum)
    flat = lambda x: x.reshape(-1)  # noqa: E731  (views: the caller's tensors are contiguous)
    nb.attend(qk, qsum, flat(_as_numpy(k)), flat(_as_numpy(v)), layout, np.array([*grouped, bias.shape[2]], np.int64),
              end, flat(bias_np), bounds, ends, *work)
    # The kernel writes float16, bfloat16 or float32, and only contiguously: anything else (a
    # float64 query, a strided out) gets a float32 or contiguous result, converted after.
    wanted_dtype = q.dtype if out is None else out.dtype
    direct = out is not None and out.is_contiguous() and out.dtype in _KERNEL_DTYPES
    target = out if direct else torch.empty(q.shape, dtype=wanted_dtype if wanted_dtype in _KERNEL_DTYPES else torch.float32)
    nb.merge(*work[:3], out32, d, order, flat(_as_numpy(target)))
    if torch.get_num_threads() != wanted:
        # Numba's OpenMP pool, started by its first parallel call, sets this thread's OpenMP count to
        # all the machine's cores: PyTorch's CPU work, and every later call here, would then use
        # them all, in every rank of a node (4 ranks x 64 threads on 64 cores).
        torch.set_num_threads(wanted)
    if out is None:
        return target.to(wanted_dtype)  # the same tensor unless q was float64
    return target if target is out else out.copy_(target)


_ranges_memo: dict = {}  # (id, heads, splits) -> (bias, bounds, ends, widest)


def _item_ranges_for(bias: torch.Tensor, bias_np: np.ndarray, heads: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """item_ranges of this bias, and the most items a range holds, worked out once: a pass uses one
    bias for all its layers and micro-batches (bias_from_mask), and at 48 layers x 32 micro-batches
    the numpy work of every call was a tenth of a millisecond each. The entry holds the bias, so its id is not reused while kept.
    A bias is never changed in place (bias_from_mask makes a new one; inference tensors, which the
    engine's are, keep no version counter to check it by)."""
    key = (id(bias), heads, n)
    hit = _ranges_memo.get(key)
    if hit is not None and hit[0] is bias:
        return hit[1:]
    bounds, ends = item_ranges(row_ends(bias_np), heads, n)
    if len(_ranges_memo) >= 64:  # a pass has a bias per micro-batch: 12 at batch 96 in parts of 8
        _ranges_memo.clear()
    _ranges_memo[key] = (bias, bounds, ends, int(np.diff(bounds).max()))
    return _ranges_memo[key][1:]


def row_ends(bias: np.ndarray) -> np.ndarray:
    """Per row of bias [end, B, mask heads, R]: one past its last slot that some query sees (0 if
    none): how far the kernel must read that row."""
    seen = (bias > -np.inf).any(axis=(2, 3))  # [end, B]
    last = seen.shape[0] - np.argmax(seen[::-1], axis=0)
    return np.where(seen.any(axis=0), last, 0).astype(np.int64)


def item_ranges(ends: np.ndarray, heads: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n ranges of (row, head) items, as bounds [n + 1], and the slots each range reads [n]. Rows
    of one length (a static batch) are split into equal counts, as before; rows of different
    lengths into ranges of about equal work (slots to read), so that threads end together."""
    items = ends.shape[0] * heads
    work = np.repeat(ends, heads)
    if ends.min() == ends.max():
        per = -(-items // n)
        bounds = np.minimum(np.arange(n + 1) * per, items)
    else:
        cum = np.cumsum(work)
        targets = cum[-1] * np.arange(1, n) / n
        at = np.searchsorted(cum, targets, side="left")  # the item that crosses each target
        before = np.where(at > 0, cum[np.maximum(at - 1, 0)], 0)  # work up to it, without it
        with_it = cum[np.minimum(at, items - 1)]
        cut = np.where(targets - before <= with_it - targets, at, at + 1)  # the nearer side of it
        bounds = np.maximum.accumulate(np.minimum(np.concatenate([[0], cut, [items]]), items))
    # Runs on every layer of a pass: no Python loop. Non-empty ranges are contiguous, so each
    # reduces up to the next one's start (the last one up to the end).
    filled = bounds[1:] > bounds[:-1]
    top = np.zeros(n, np.int64)
    top[filled] = np.maximum.reduceat(work, bounds[:-1][filled])
    return bounds.astype(np.int64), top


@functools.cache
def kernel_layout(quant) -> np.ndarray:
    """What the kernel needs to read a quantized row (cpu_attention_numba): bits, piece size
    (a group, or one head's share of a group larger than a head), pieces per head, row bytes,
    bytes from a scale to its minimum, then the byte of each (kv head, piece)'s scale in the row."""
    d, seg = quant.head_dim, min(quant.group_size, quant.head_dim)
    scale_at = [quant.codes_bytes + 2 * ((h * d + j * seg) // quant.group_size)
                for h in range(quant.kv_heads) for j in range(d // seg)]
    return np.array([quant.bits, seg, d // seg, quant.row_bytes, 2 * quant.groups, *scale_at], np.int64)


@functools.cache
def _kernel_order(quant) -> np.ndarray:
    """For a 4-bit cache, the position in the kernel's order of each element of a head
    (cpu_attention_numba: per piece of a group, the even elements, read from the low nibbles,
    then the odd ones); empty for 8 bits, whose order is the head's."""
    if quant.bits != 4:
        return _NO_ORDER
    d, seg = quant.head_dim, min(quant.group_size, quant.head_dim)
    e = np.arange(d)
    return (e - e % seg + (e % seg) // 2 + (e % 2) * (seg // 2)).astype(np.int64)


def _attend_torch(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int, bias: torch.Tensor,
                  block: int = 64, quant=None) -> torch.Tensor:
    """The kernel's computation in PyTorch: online softmax over blocks of `block` slots."""
    b, h, r, d = qf.shape
    load = (lambda x: x.float()) if quant is None else \
        (lambda x: quant.decode(x, torch.float32).unflatten(-1, (h, d)))  # noqa: E731
    m = torch.full((b, h, r), float("-inf"))
    l, acc = torch.zeros(b, h, r), torch.zeros(b, h, r, d)
    for s0 in range(0, end, block):
        s1 = min(end, s0 + block)
        scores = torch.einsum("bhrd,sbhd->bhrs", qf, load(k[s0:s1])) + bias[s0:s1].permute(1, 2, 3, 0)
        top = torch.maximum(m, scores.amax(-1))
        safe = torch.where(top == float("-inf"), 0.0, top)  # no -inf - -inf while all keys so far are hidden
        alpha, p = torch.exp(m - safe), torch.exp(scores - safe[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhrs,sbhd->bhrd", p, load(v[s0:s1]))
        m = top
    return torch.where(l[..., None] > 0, acc / l.clamp(min=1e-30)[..., None], 0.0)
