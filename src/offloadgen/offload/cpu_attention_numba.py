"""Numba kernels for decode attention over the slot-major KV cache in CPU memory.

Why Numba: it installs from PyPI as a wheel on every platform CI and the GPU machines use (no
compiler needed, unlike a C++ extension built at set-up), compiles to native vector code for the
host CPU, and `prange` gives a thread pool without OpenMP plumbing. Its CPU target has no float16
type, so half-precision caches are read as their 16-bit patterns and widened in registers by the
two small LLVM intrinsics below (`vcvtph2ps` on x86 with F16C, `fcvt` on ARM), never through a
float32 copy of the cache.

The cache layout is [slots, rows, kv_heads, head_dim]: one slot of every row and head is one
contiguous block. Work is cut into units of (slot range) x (range of (row, kv head) items); a unit
walks its slots in order and, within each slot, its contiguous run of items, so every thread reads
long sequential runs (what lets the cores approach their plain read bandwidth; one (row, head)
per thread would read 256-byte pieces a slot apart). Item ranges are kept at several KB per slot;
where there are too few items for that (grouped-query heads, small micro-batches), units also
split the slots, and `merge` combines their partial results as flash-decoding does. Query heads
that share a KV head are computed together, so the cache is read once.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic, overload

# No nnan/ninf: masked keys are -inf and must stay -inf.
FAST = {"reassoc", "contract", "nsz", "arcp"}
# Offsets into the flat arrays are unsigned: a signed index makes Numba wrap negative values
# around per element, and the compiler then turns every contiguous row into gathers (5x slower).
U = np.uint64


@intrinsic
def _f16_bits_to_f32(typingctx, x):
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, x):
    if x != types.int16:
        return None

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.int16), codegen


def to_f32(x):
    """float32 of a cache element: float32 as is, uint16 as float16 bits, int16 as bfloat16 bits."""


@overload(to_f32, inline="always")
def _to_f32(x):
    if x == types.uint16:
        return lambda x: _f16_bits_to_f32(x)
    if x == types.int16:
        return lambda x: _bf16_bits_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


@intrinsic
def _i32_as_f32(typingctx, x):
    if x != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(fastmath=FAST, inline="always")
def _exp(x):
    """e**x for x <= 0 (a score less the maximum; -inf gives 0), within about 1e-7 relative, in
    plain arithmetic: the compiler vectorizes it, where math.exp is a scalar call into libm."""
    if x < np.float32(-87.0):
        return np.float32(0.0)
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # x - n ln 2, in two parts
    p = np.float32(1 / 720)
    for c in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = p * r + np.float32(c)
    return p * _i32_as_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


def widen(cache, row, h, heads, out, layout):
    """Key or value vector of kv head h in cache row `row` (= slot * rows + row of the micro-batch),
    as float32 into out [D]. The cache is a flat array; its dtype says how it is stored."""


@overload(widen, inline="always")
def _widen(cache, row, h, heads, out, layout):
    if cache.dtype in (types.float32, types.uint16, types.int16):  # dense [slots, B, Hkv, D]
        def dense(cache, row, h, heads, out, layout):
            dim = U(out.shape[0])
            at = U(row * heads + h) * dim
            for d in range(dim):
                out[d] = to_f32(cache[at + d])
        return dense
    if cache.dtype == types.uint8:
        return lambda cache, row, h, heads, out, layout: _quant_widen(cache, row, h, out, layout)
    return None


# -- 4- and 8-bit caches (quant/kv.py): one uint8 row of codes, scales and minimums per token --------
# layout = (bits, group size, row bytes, codes bytes); groups span whole heads when larger.

@njit(inline="always")
def _group_params(cache, base, layout, g):
    """float32 (scale, minimum) of group g in the row starting at byte `base`."""
    groups = (layout[2] - layout[3]) // 4
    p = base + U(layout[3] + 2 * g)
    q = p + U(2 * groups)
    scale = _f16_bits_to_f32(np.uint16(np.int64(cache[p]) | (np.int64(cache[p + U(1)]) << 8)))  # little-endian
    low = _f16_bits_to_f32(np.uint16(np.int64(cache[q]) | (np.int64(cache[q + U(1)]) << 8)))
    return scale, low


@njit(fastmath=FAST, inline="always")
def _quant_dot(x, at, cache, row, h, dim, layout):
    """x[at:at + D] . the dequantized vector of head h: per group, scale * (x . codes) +
    minimum * sum(x), so codes are only widened, never dequantized one by one."""
    base, seg = U(row) * U(layout[2]), min(layout[1], dim)
    total = np.float32(0)
    for j in range(dim // seg):
        e = h * dim + j * seg  # first element of this piece of a group
        scale, low = _group_params(cache, base, layout, e // layout[1])
        xs, dot, xsum = U(at + j * seg), np.float32(0), np.float32(0)
        if layout[0] == 8:
            for d in range(U(seg)):
                dot += x[xs + d] * np.float32(cache[base + U(e) + d])
        else:  # two codes a byte: walk the bytes, so that each is loaded once
            for i in range(U(seg // 2)):
                byte = cache[base + U(e // 2) + i]
                dot += x[xs + U(2) * i] * np.float32(byte & np.uint8(15))
                dot += x[xs + U(2) * i + U(1)] * np.float32(byte >> np.uint8(4))
        for d in range(U(seg)):
            xsum += x[xs + d]
        total += scale * dot + low * xsum
    return total


@njit(fastmath=FAST, inline="always")
def _quant_add(acc, at, p, cache, row, h, dim, layout):
    """acc[at:at + D] += p * the dequantized vector of head h."""
    base, seg = U(row) * U(layout[2]), min(layout[1], dim)
    for j in range(dim // seg):
        e = h * dim + j * seg
        scale, low = _group_params(cache, base, layout, e // layout[1])
        ps, pl, a = p * scale, p * low, U(at + j * seg)
        if layout[0] == 8:
            for d in range(U(seg)):
                acc[a + d] += ps * np.float32(cache[base + U(e) + d]) + pl
        else:
            for i in range(U(seg // 2)):
                byte = cache[base + U(e // 2) + i]
                acc[a + U(2) * i] += ps * np.float32(byte & np.uint8(15)) + pl
                acc[a + U(2) * i + U(1)] += ps * np.float32(byte >> np.uint8(4)) + pl


@njit(fastmath=FAST)
def _quant_widen(cache, row, h, out, layout):
    for d in range(U(out.shape[0])):
        out[d] = 0
    _quant_add(out, 0, np.float32(1.0), cache, row, h, out.shape[0], layout)


def dot_row(x, at, cache, row, h, heads, dim, layout):
    """x[at:at + D] . (key of kv head h in cache row `row`), reading the cache directly."""


@overload(dot_row, inline="always")
def _dot_row(x, at, cache, row, h, heads, dim, layout):
    if cache.dtype in (types.float32, types.uint16, types.int16):
        def dense(x, at, cache, row, h, heads, dim, layout):
            total = np.float32(0)
            at, c = U(at), U(row * heads + h) * U(dim)
            for d in range(U(dim)):
                total += x[at + d] * to_f32(cache[c + d])
            return total
        return dense
    if cache.dtype == types.uint8:
        return lambda x, at, cache, row, h, heads, dim, layout: _quant_dot(x, at, cache, row, h, dim, layout)
    return None


def add_row(acc, at, p, cache, row, h, heads, dim, layout):
    """acc[at:at + D] += p * (value of kv head h in cache row `row`), reading the cache directly."""


@overload(add_row, inline="always")
def _add_row(acc, at, p, cache, row, h, heads, dim, layout):
    if cache.dtype in (types.float32, types.uint16, types.int16):
        def dense(acc, at, p, cache, row, h, heads, dim, layout):
            at, c = U(at), U(row * heads + h) * U(dim)
            for d in range(U(dim)):
                acc[at + d] += p * to_f32(cache[c + d])
        return dense
    if cache.dtype == types.uint8:
        return lambda acc, at, p, cache, row, h, heads, dim, layout: _quant_add(acc, at, p, cache, row, h, dim, layout)
    return None


@njit(fastmath=FAST, inline="always")
def _dot(x, at, y):
    total = np.float32(0)
    at = U(at)
    for d in range(U(y.shape[0])):
        total += x[at + d] * y[d]
    return total


@njit(fastmath=FAST, inline="always")
def _scores(q, k, layout, bias, shape, s0, s1, i0, i1, row32, sc):
    """Pass 1, streaming the keys once: sc[slot, item, r] = q . k + bias (-inf where hidden), in
    the order the keys arrive, so that the scores too are written sequentially. Arrays are flat and
    indexed by hand: slicing out rows in a loop this hot costs reference counting, atomic and
    shared between threads."""
    batch, heads, queries, dim, mask_heads = shape
    at = U(0)
    for s in range(s0, s1):
        for it in range(i0, i1):  # one contiguous run of the slot's keys
            b, h = it // heads, it % heads
            if queries == 1:  # no query heads share the row: read it straight into the product
                add = bias[(s * batch + b) * mask_heads + (h if mask_heads > 1 else 0)]
                sc[at] = add if add == -np.inf else dot_row(q, it * dim, k, s * batch + b, h, heads, dim, layout) + add
                at += U(1)
                continue
            widen(k, s * batch + b, h, heads, row32, layout)  # once for every query head that shares it
            at_bias = ((s * batch + b) * mask_heads + (h if mask_heads > 1 else 0)) * queries
            for r in range(queries):
                add = bias[at_bias + r]
                sc[at] = add if add == -np.inf else _dot(q, (it * queries + r) * dim, row32) + add
                at += U(1)


@njit(fastmath=FAST, inline="always")
def _softmax(sc, n, pairs, m, l, at):
    """Per (item, query) pair, m[at + pair] = the max of its n scores, l[at + pair] = the sum of
    their exp, and the scores replaced by exp(score - max). Loops run along pairs, which are
    contiguous, so they vectorize."""
    at, pairs = U(at), U(pairs)
    for j in range(pairs):
        m[at + j] = -np.inf
        l[at + j] = 0
    for s in range(U(n)):
        for j in range(pairs):
            m[at + j] = max(m[at + j], sc[s * pairs + j])
    for s in range(U(n)):
        for j in range(pairs):
            top = m[at + j]
            e = _exp(sc[s * pairs + j] - (top if top != -np.inf else np.float32(0)))  # all hidden: 0
            sc[s * pairs + j] = e
            l[at + j] += e


@njit(fastmath=FAST, inline="always")
def _values(v, layout, shape, s0, s1, i0, i1, row32, sc, acc, acc_at):
    """Pass 2, streaming the values once: acc[item, r] += p * v."""
    batch, heads, queries, dim, _ = shape
    at = U(0)
    for s in range(s0, s1):
        for it in range(i0, i1):
            if queries == 1:
                p = sc[at]
                at += U(1)
                if p != 0:
                    add_row(acc, acc_at + it * dim, p, v, s * batch + it // heads, it % heads, heads, dim, layout)
                continue
            widen(v, s * batch + it // heads, it % heads, heads, row32, layout)
            for r in range(queries):
                p = sc[at]
                at += U(1)
                if p != 0:
                    o = U(acc_at + (it * queries + r) * dim)
                    for d in range(U(dim)):
                        acc[o + d] += p * row32[d]


@njit(parallel=True, fastmath=FAST, cache=True)
def attend(q, k, v, layout, shape, end, bias, item_splits, part_m, part_l, part_acc, scores, rows32):
    """q [B, Hkv, R, D] float32, already scaled; k, v: the cache (see widen), of which the first
    `end` slots are read; bias [end, B, 1 or Hkv, R] float32 (the additive mask, -inf for a hidden
    key); shape (B, Hkv, R, D, mask heads); all flat. Work units are slot ranges x ranges of
    (row, kv head) items; part_m, part_l [slot ranges, B, Hkv, R] and part_acc [..., D] get each
    slot range's partial result; scores [units, slots per unit * items per unit * R] and
    rows32 [units, D] are scratch.

    Two passes per unit, keys then values, rather than an online softmax: the exact maximum is
    known before any exp, so there is no rescaling and no branch per key, and each pass is a
    simple loop the compiler vectorizes."""
    batch, heads, queries, dim, _ = shape
    pairs = batch * heads * queries
    slot_splits = part_m.shape[0] // pairs
    per_s, per_i = (end + slot_splits - 1) // slot_splits, (batch * heads + item_splits - 1) // item_splits
    for w in prange(slot_splits * item_splits):
        c, i0 = w // item_splits, (w % item_splits) * per_i
        s0, s1, i1 = min(end, c * per_s), min(end, (c + 1) * per_s), min(batch * heads, i0 + per_i)
        at = c * pairs + i0 * queries  # this unit's first (row, kv head, query) in part_*
        _scores(q, k, layout, bias, shape, s0, s1, i0, i1, rows32[w], scores[w])
        _softmax(scores[w], s1 - s0, (i1 - i0) * queries, part_m, part_l, at)
        for d in range(U(at * dim), U((at + (i1 - i0) * queries) * dim)):
            part_acc[d] = 0
        _values(v, layout, shape, s0, s1, i0, i1, rows32[w], scores[w], part_acc, c * pairs * dim)


@njit(parallel=True, fastmath=FAST, cache=True)
def merge(part_m, part_l, part_acc, out, dim):
    """Combine the slot ranges' partial results ([slot ranges, pairs] and [..., D], flat) into out
    [pairs * D] float32, where a pair is one (row, kv head, query)."""
    pairs = out.shape[0] // dim
    n_chunks = part_m.shape[0] // pairs
    for j in prange(pairs):
        top = np.float32(-np.inf)
        for c in range(n_chunks):
            top = max(top, part_m[c * pairs + j])
        o = U(j * dim)
        for d in range(U(dim)):
            out[o + d] = 0
        if top == -np.inf:  # every key hidden: no attention (the engine never asks for this)
            continue
        total = np.float32(0)
        for c in range(n_chunks):
            w = _exp(part_m[c * pairs + j] - top)
            total += w * part_l[c * pairs + j]
            at = U((c * pairs + j) * dim)
            for d in range(U(dim)):
                out[o + d] += w * part_acc[at + d]
        for d in range(U(dim)):
            out[o + d] /= total


def set_threads(n: int) -> int:
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def splits(threads: int, end: int, items: int, item_bytes: int, run_bytes: int = 8192) -> tuple[int, int]:
    """(slot ranges, item ranges) for `threads` threads. Threads first split the items of a slot,
    as long as each still reads a run of at least `run_bytes` per slot (what the hardware
    prefetchers need to stream); the rest split the slots, which costs a merge of partial results."""
    item_splits = max(1, min(threads, items, items * item_bytes // run_bytes))
    return max(1, min(threads // item_splits, end)), item_splits
