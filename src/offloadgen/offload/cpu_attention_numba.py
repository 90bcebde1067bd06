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
that share a KV head are computed together, so the cache is read once. A dense cache is walked
SLOTS slots at a time (item by item within the group: SLOTS sequential streams; a quantized
cache too, where its pieces are 64 elements, the default group), so that each
item's query and accumulator are loaded once per group and its SLOTS products run side by side:
one key at a time, a core was bound by its own arithmetic at half its plain read rate.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
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
def _f32_to_f16_bits(typingctx, x):
    """The float16 nearest a float32, as its 16-bit pattern (`vcvtps2ph` with F16C)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def _bitcast(source, target, target_ir):
    """An intrinsic reading a `source` scalar's bits as a `target` one (no conversion)."""
    @intrinsic
    def cast(typingctx, x):
        if x != source:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], target_ir)
        return target(source), codegen
    return cast


_f32_bits = _bitcast(types.float32, types.uint32, ir.IntType(32))
_i32_as_f32 = _bitcast(types.int32, types.float32, ir.FloatType())


def from_f32(x, like):
    """x (float32) stored as `like`'s dtype: float32 as is, uint16 as float16 bits, int16 as
    bfloat16 bits (rounded to nearest even, as PyTorch rounds)."""


@overload(from_f32, inline="always")
def _from_f32(x, like):
    if like == types.uint16:
        return lambda x, like: _f32_to_f16_bits(x)
    if like == types.int16:
        def bf16(x, like):
            bits = _f32_bits(x)
            if x != x:  # NaN stays NaN (rounding could carry it into infinity)
                return np.int16(0x7FC0)
            rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return np.int16(np.uint16(rounded >> np.uint32(16)))
        return bf16
    if like == types.float32:
        return lambda x, like: x
    return None


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
# The quantized paths are compute-bound where the dense ones are bound by memory (a 4-bit row is a
# quarter of the bytes), so they are written for the vectorizer: each loop runs along contiguous
# bytes, with no per-element branch, scale, shuffle or division. A group is read in pieces of
# `seg` = min(group, head_dim) elements, one head's share of it. A 4-bit byte holds elements 2i
# (low nibble) and 2i + 1 (high nibble) of its piece; rather than interleave, the kernel works in
# "kernel order", where each piece lists its even elements first and then its odd ones
# (cpu_attention permutes q in and the output back, once a call): the low nibbles of a run of
# bytes then meet one contiguous run of q, the high ones the next.
#
# layout (int64, from cpu_attention.kernel_layout): [bits, seg, pieces per head, row bytes,
# bytes from a scale to its minimum, then per (kv head, piece) the byte of its scale in the row],
# so that no group index is divided out per key.
_BITS, _SEG, _PIECES, _ROW, _TO_MIN, _SCALE_AT = 0, 1, 2, 3, 4, 5


@intrinsic
def _load_f16(typingctx, cache, at):
    """float32 of the float16 stored at byte `at` of the uint8 array (one unaligned load)."""
    if not (isinstance(cache, types.Array) and cache.dtype == types.uint8 and at == types.uint64):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        half = builder.load(builder.gep(data, [args[1]]), align=1, typ=ir.HalfType())
        return builder.fpext(half, ir.FloatType())
    return types.float32(cache, types.uint64), codegen


@intrinsic
def _nibble(typingctx, byte, high):
    """float32 of the low or high (high=True) 4 bits of a uint8. Numba's own `&` and `>>` widen a
    uint8 to int64 first, and the vectorizer then converts 8 lanes at a time instead of 16."""
    if byte != types.uint8 or not isinstance(high, types.BooleanLiteral):
        return None

    def codegen(context, builder, sig, args):
        four_bits = (builder.lshr(args[0], ir.Constant(ir.IntType(8), 4)) if high.literal_value
                     else builder.and_(args[0], ir.Constant(ir.IntType(8), 15)))
        return builder.uitofp(four_bits, ir.FloatType())
    return types.float32(byte, high), codegen


@njit(inline="always")
def _piece_at(row, h, j, dim, layout):
    """(first code byte, byte of the scale) of piece j of head h in cache row `row`."""
    base, seg = U(row) * U(layout[_ROW]), U(layout[_SEG])
    first = (U(h) * U(dim) + U(j) * seg) * U(layout[_BITS]) >> U(3)  # its first element's byte
    return base + first, base + U(layout[U(_SCALE_AT) + U(h) * U(layout[_PIECES]) + U(j)])


@njit(inline="always")
def _piece(cache, row, h, j, dim, layout):
    """(first code byte, scale, minimum) of piece j of head h in cache row `row`."""
    c, at = _piece_at(row, h, j, dim, layout)
    return c, _load_f16(cache, at), _load_f16(cache, at + U(layout[_TO_MIN]))


# -- four slots of one piece of 64 at a time, written as vector IR --------------------------------
# One key of a 4-bit cache left to the vectorizer read about 3 GB/s of packed bytes on a core of
# the 2-core development machine, whose plain read is 25: a piece's 32 code bytes are fewer than
# the 128 elements its main vector loop takes, so every piece ran the narrow remainder loop, with
# a horizontal reduction, for each key. These intrinsics state the vector code instead: a piece's
# bytes are one load, unpacked by a vector mask and shift and widened lane-wise, against q (or
# the accumulator) loaded once for the 4 slots, and each slot's key reduced once per head rather
# than once per piece. LLVM lowers the vector types to the host's own width (AVX-512, AVX2, NEON),
# so nothing here is tied to one instruction set. The same core then reads about 6 GB/s of 4-bit
# cache from its own cache, 8 with prefetching from RAM (below): still bound by arithmetic, as
# every 16 codes cost a widening, a mask or shift, a conversion and an FMA, each pass.
_FAST_FLAGS = tuple(sorted(FAST))


def _splat(builder, value, lanes):
    vector = builder.insert_element(ir.Constant(ir.VectorType(value.type, lanes), None), value,
                                    ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _vector_at(context, builder, arytype, ary, at, lanes):
    """Pointer to `lanes` elements of the flat array from element `at`, as one vector."""
    data = context.make_array(arytype)(context, builder, ary).data
    vt = ir.VectorType(context.get_data_type(arytype.dtype), lanes)
    return builder.bitcast(builder.gep(data, [at]), vt.as_pointer()), vt


def _piece_codes(context, builder, arytype, cache, at, bits, seg):
    """The codes of a piece of `seg` elements from byte `at`, as float vectors, each with its
    first element's offset in kernel order: for 4 bits the low nibbles, then the high ones. Bytes
    are widened to 32-bit lanes first and the nibbles split there: one widening per byte rather
    than one per nibble. Signed conversion: codes are small and positive, and x86 before
    AVX-512 has no unsigned one."""
    lanes = seg if bits == 8 else seg // 2
    ptr, vt = _vector_at(context, builder, arytype, cache, at, lanes)
    wide_t = ir.VectorType(ir.IntType(32), lanes)
    wide = builder.zext(builder.load(ptr, typ=vt, align=1), wide_t)
    f = ir.VectorType(ir.FloatType(), lanes)
    if bits == 8:
        return [(0, builder.sitofp(wide, f))]
    low = builder.and_(wide, ir.Constant(wide_t, [15] * lanes))
    high = builder.lshr(wide, ir.Constant(wide_t, [4] * lanes))
    return [(0, builder.sitofp(low, f)), (lanes, builder.sitofp(high, f))]


@intrinsic
def _prefetch(typingctx, cache, at):
    """Ask for the line holding byte `at` of the uint8 array ahead of its use (a hint: never
    faults, even past the array)."""
    if not (isinstance(cache, types.Array) and cache.dtype == types.uint8 and at == types.uint64):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(cache, types.uint64), codegen


def _uint8_flat(cache):
    return isinstance(cache, types.Array) and cache.dtype == types.uint8 and cache.ndim == 1


def _fold(builder, v, lanes):
    """v (a float vector) summed down to `lanes` lanes, halves added."""
    while v.type.count > lanes:
        n = v.type.count // 2
        mask = lambda at: ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(at, at + n)))  # noqa: E731
        v = builder.fadd(builder.shuffle_vector(v, v, mask(0)), builder.shuffle_vector(v, v, mask(n)), flags=_FAST_FLAGS)
    return v


def _sums4(builder, vectors):
    """The sums of 4 float vectors of 16 lanes, as 4 floats: the 4 horizontal reductions done
    together by shuffles that transpose as they add (5 adds in all rather than 4 x 4)."""
    a, b, c, d = vectors
    i32 = ir.IntType(32)

    def add(x, y, lo, hi):
        return builder.fadd(builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, len(lo)), lo)),
                            builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, len(hi)), hi)), flags=_FAST_FLAGS)
    # 16 + 16 lanes -> 16: lanes 0-7 a's partial sums, 8-15 b's
    ab = add(a, b, list(range(0, 8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32)))
    cd = add(c, d, list(range(0, 8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32)))
    # -> 16: 4 lanes each of a, b, c, d
    lo = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    abcd = add(ab, cd, lo, [i + 4 for i in lo])
    two = add(abcd, abcd, [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15])  # 2 lanes each
    one = add(two, two, [0, 2, 4, 6], [1, 3, 5, 7])
    return [builder.extract_element(one, ir.Constant(i32, j)) for j in range(4)]


def _make_head_dots4(bits, seg=64):
    @intrinsic
    def head_dots4(typingctx, x, xs, xsum, xsum_at, cache, c, sa, to_min, gap, pieces):
        """x[xs:xs + pieces * seg] . the dequantized keys of one head in 4 slots, its pieces of
        `seg` from byte c (codes, `seg * bits / 8` bytes a piece) with their float16 scales from
        byte sa (2 bytes a piece) and minimums `to_min` bytes on, slot j at + j * gap: 4 float32
        sums. Per piece scale * (x . codes) is added up lane-wise, and each slot's lanes are
        reduced once at the end of the head; the minimums meet xsum[xsum_at + piece]."""
        u64 = types.uint64
        if not (_uint8_flat(cache) and isinstance(x, types.Array) and x.dtype == types.float32
                and isinstance(xsum, types.Array) and xsum.dtype == types.float32
                and all(a == u64 for a in (xs, xsum_at, c, sa, to_min, gap, pieces))):
            return None

        def codegen(context, builder, sig, args):
            x, xs, xsum, xsum_at, cache, c, sa, to_min, gap, pieces = args
            lanes = seg if bits == 8 else seg // 2
            f, u = ir.VectorType(ir.FloatType(), lanes), ir.IntType(64)
            half_t = ir.HalfType()
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f, [0.0] * lanes)) for _ in range(SLOTS)]
            lows = [cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0)) for _ in range(SLOTS)]
            cache_data = context.make_array(sig.args[4])(context, builder, cache).data
            xsum_data = context.make_array(sig.args[2])(context, builder, xsum).data

            def f16(at):
                return builder.fpext(builder.load(builder.bitcast(builder.gep(cache_data, [at]), half_t.as_pointer()),
                                                  typ=half_t, align=1), ir.FloatType())
            with cgutils.for_range(builder, pieces) as loop:
                j = loop.index
                cj = builder.add(c, builder.mul(j, ir.Constant(u, seg * bits // 8)))
                sj = builder.add(sa, builder.mul(j, ir.Constant(u, 2)))
                xj = builder.add(xs, builder.mul(j, ir.Constant(u, seg)))
                xsum_j = builder.load(builder.gep(xsum_data, [builder.add(xsum_at, j)]), typ=ir.FloatType())
                xv = None
                for slot in range(SLOTS):
                    parts = _piece_codes(context, builder, sig.args[4], cache, cj, bits, seg)
                    if xv is None:
                        xv = []
                        for offset, codes in parts:
                            ptr, vt = _vector_at(context, builder, sig.args[0], x,
                                                 builder.add(xj, ir.Constant(u, offset)), codes.type.count)
                            xv.append(builder.load(ptr, typ=vt, align=4))
                    prod = None
                    for xp, (_, codes) in zip(xv, parts):
                        term = builder.fmul(xp, codes, flags=_FAST_FLAGS)
                        prod = term if prod is None else builder.fadd(prod, term, flags=_FAST_FLAGS)
                    scaled = builder.fmul(_splat(builder, f16(sj), lanes), prod, flags=_FAST_FLAGS)
                    acc = builder.fadd(builder.load(accs[slot], typ=f), scaled, flags=_FAST_FLAGS)
                    builder.store(acc, accs[slot])
                    low = builder.fmul(f16(builder.add(sj, to_min)), xsum_j, flags=_FAST_FLAGS)
                    builder.store(builder.fadd(builder.load(lows[slot], typ=ir.FloatType()), low, flags=_FAST_FLAGS),
                                  lows[slot])
                    cj, sj = builder.add(cj, gap), builder.add(sj, gap)
            sums = _sums4(builder, [_fold(builder, builder.load(a, typ=f), 16) for a in accs])
            sums = [builder.fadd(t, builder.load(low, typ=ir.FloatType()), flags=_FAST_FLAGS) for t, low in zip(sums, lows)]
            return context.make_tuple(builder, sig.return_type, sums)
        return types.UniTuple(types.float32, SLOTS)(x, xs, xsum, xsum_at, cache, c, sa, to_min, gap, pieces), codegen
    return head_dots4


def _make_axpy4(bits, seg):
    @intrinsic
    def axpy4(typingctx, acc, a, cache, c, gap, w0, w1, w2, w3, low):
        """acc[a:a + seg] += sum over j < 4 of wj * (the codes of the piece at byte c + j * gap)
        + low: the accumulator loaded and stored once for the 4 slots."""
        if not (_uint8_flat(cache) and isinstance(acc, types.Array) and acc.dtype == types.float32
                and a == types.uint64 and c == types.uint64 and gap == types.uint64
                and all(w == types.float32 for w in (w0, w1, w2, w3, low))):
            return None

        def codegen(context, builder, sig, args):
            acc, a, cache, c, gap, *weights, low = args
            total, ptrs, at = None, [], c
            for j, w in enumerate(weights):
                if j:
                    at = builder.add(at, gap)
                parts = _piece_codes(context, builder, sig.args[2], cache, at, bits, seg)
                if total is None:
                    total = []
                    for offset, codes in parts:
                        ptr, vt = _vector_at(context, builder, sig.args[0], acc,
                                             builder.add(a, ir.Constant(a.type, offset)), codes.type.count)
                        ptrs.append((ptr, vt))
                        start = builder.fadd(builder.load(ptr, typ=vt, align=4), _splat(builder, low, vt.count),
                                             flags=_FAST_FLAGS)
                        total.append(start)
                wv = _splat(builder, w, parts[0][1].type.count)
                total = [builder.fadd(t, builder.fmul(wv, codes, flags=_FAST_FLAGS), flags=_FAST_FLAGS)
                         for t, (_, codes) in zip(total, parts)]
            for t, (ptr, _) in zip(total, ptrs):
                builder.store(t, ptr, align=4)
            return context.get_dummy_value()
        return types.none(acc, a, cache, c, gap, w0, w1, w2, w3, low), codegen
    return axpy4


_head_dots4_4bit, _head_dots4_8bit = _make_head_dots4(4), _make_head_dots4(8)
_axpy4_4bit, _axpy4_8bit = _make_axpy4(4, 64), _make_axpy4(8, 64)


# Pieces of 64 (the default group size) are written by loops whose trip count the compiler knows:
# no remainder loop, no trip-count checks (measured 1.3x on the value pass). The loops run once or
# twice per head and key, so their set-up costs as much as their body. Not for the dot products:
# a known trip count has a reduction fully unrolled before the vectorizer sees it, 3x slower.
_COMMON_SEG = 64


@njit(fastmath=FAST, inline="always")
def _codes_dot(x, xs, cache, c, seg, bits):
    """x[xs:xs + seg] . the codes of a piece from byte c (unscaled)."""
    dot = np.float32(0)
    if bits == 8:
        for d in range(seg):
            dot += x[xs + d] * np.float32(cache[c + d])
    else:
        half = seg >> U(1)
        for i in range(half):
            byte = cache[c + i]
            dot += x[xs + i] * _nibble(byte, False) + x[xs + half + i] * _nibble(byte, True)
    return dot


@njit(fastmath=FAST, inline="always")
def _codes_axpy(acc, a, scale, low, cache, c, seg, bits, add):
    """acc[a:a + seg] (+= if add, else =) scale * codes + low."""
    if bits == 8:
        for d in range(seg):
            y = scale * np.float32(cache[c + d]) + low
            acc[a + d] = acc[a + d] + y if add else y
    else:
        half = seg >> U(1)
        for i in range(half):
            byte = cache[c + i]
            y0, y1 = scale * _nibble(byte, False) + low, scale * _nibble(byte, True) + low
            acc[a + i] = acc[a + i] + y0 if add else y0
            acc[a + half + i] = acc[a + half + i] + y1 if add else y1


@njit(fastmath=FAST, inline="always")
def _quant_dot(x, at, xsum, pair, cache, row, h, dim, layout):
    """x[at:at + D] (kernel order) . the dequantized vector of head h: per piece, scale *
    (x . codes) + minimum * sum(x), the sums of x given in xsum [pairs, pieces] (hoisted out of
    the loop over keys), so codes are only widened, never dequantized one by one."""
    seg, pieces, bits = U(layout[_SEG]), U(layout[_PIECES]), layout[_BITS]
    total = np.float32(0)
    for j in range(pieces):
        c, scale, low = _piece(cache, row, h, j, dim, layout)
        dot = _codes_dot(x, U(at) + j * seg, cache, c, seg, bits)  # not _COMMON_SEG: see there
        total += scale * dot + low * xsum[U(pair) * pieces + j]
    return total


@njit(fastmath=FAST, inline="always")
def _quant_add(acc, at, p, cache, row, h, dim, layout):
    """acc[at:at + D] (kernel order) += p * the dequantized vector of head h."""
    seg, bits = U(layout[_SEG]), layout[_BITS]
    for j in range(U(layout[_PIECES])):
        c, scale, low = _piece(cache, row, h, j, dim, layout)
        if seg == U(_COMMON_SEG):
            _codes_axpy(acc, U(at) + j * seg, p * scale, p * low, cache, c, U(_COMMON_SEG), bits, True)
        else:
            _codes_axpy(acc, U(at) + j * seg, p * scale, p * low, cache, c, seg, bits, True)


@njit(fastmath=FAST, inline="always")
def _quant_widen(cache, row, h, out, layout):
    """out [D] = the dequantized vector of head h, in kernel order."""
    dim, seg, bits = out.shape[0], U(layout[_SEG]), layout[_BITS]
    for j in range(U(layout[_PIECES])):
        c, scale, low = _piece(cache, row, h, j, dim, layout)
        if seg == U(_COMMON_SEG):
            _codes_axpy(out, j * seg, scale, low, cache, c, U(_COMMON_SEG), bits, False)
        else:
            _codes_axpy(out, j * seg, scale, low, cache, c, seg, bits, False)


def dot_row(x, at, xsum, pair, cache, row, h, heads, dim, layout):
    """x[at:at + D] . (key of kv head h in cache row `row`), reading the cache directly; xsum
    and pair: the sums of x's pieces that a quantized cache needs (see _quant_dot)."""


@overload(dot_row, inline="always")
def _dot_row(x, at, xsum, pair, cache, row, h, heads, dim, layout):
    if cache.dtype in (types.float32, types.uint16, types.int16):
        def dense(x, at, xsum, pair, cache, row, h, heads, dim, layout):
            total = np.float32(0)
            at, c = U(at), U(row * heads + h) * U(dim)
            for d in range(U(dim)):
                total += x[at + d] * to_f32(cache[c + d])
            return total
        return dense
    if cache.dtype == types.uint8:
        return lambda x, at, xsum, pair, cache, row, h, heads, dim, layout: _quant_dot(
            x, at, xsum, pair, cache, row, h, dim, layout)
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


# Dense caches are read SLOTS slots at a time: for one (row, kv head) item, its key (or value)
# in each of SLOTS consecutive slots. The item's q (or accumulator) is then loaded once per group
# rather than once per key, and the SLOTS dot products are independent sums the vector units work
# on together instead of waiting on one reduction at a time. One key per pass read 10.6 GB/s on
# one core of the 2-core development machine, whose plain read is 25 (benchmarks/cpu_attention_per_core.py).
SLOTS = 4  # score_rows and add_rows are written out for 4


def slots_per_pass(cache):
    """How many slots a pass reads together from this cache: SLOTS for every cache (a quantized
    one with pieces other than 64 reads the group's slots one key after the other)."""


@overload(slots_per_pass, inline="always")
def _slots_per_pass(cache):
    return lambda cache: SLOTS


def score_rows(x, at, xsum, pair, cache, row, step, h, heads, dim, layout, bias, bias_at, bias_step, sc, sc_at, gap):
    """For j < SLOTS (the same item in SLOTS consecutive slots): sc[sc_at + j * gap] =
    x[at:at + D] . (key of kv head h in cache row row + j * step) + bias[bias_at + j * bias_step],
    or -inf where that bias is -inf (a hidden key may be any bits: its product is never added)."""


@overload(score_rows, inline="always")
def _score_rows(x, at, xsum, pair, cache, row, step, h, heads, dim, layout, bias, bias_at, bias_step, sc, sc_at, gap):
    if cache.dtype in (types.float32, types.uint16, types.int16):
        def dense(x, at, xsum, pair, cache, row, step, h, heads, dim, layout, bias, bias_at, bias_step, sc, sc_at, gap):
            t0 = t1 = t2 = t3 = np.float32(0)
            at, dim = U(at), U(dim)
            c0 = U(row * heads + h) * dim
            c_gap = U(step * heads) * dim
            c1, c2, c3 = c0 + c_gap, c0 + c_gap + c_gap, c0 + c_gap + c_gap + c_gap
            for d in range(dim):  # one load of x for the 4 keys; 4 sums the vector units interleave
                xd = x[at + d]
                t0 += xd * to_f32(cache[c0 + d])
                t1 += xd * to_f32(cache[c1 + d])
                t2 += xd * to_f32(cache[c2 + d])
                t3 += xd * to_f32(cache[c3 + d])
            for j, t in enumerate((t0, t1, t2, t3)):
                add = bias[bias_at + j * bias_step]
                sc[U(sc_at) + U(j) * U(gap)] = add if add == -np.inf else t + add
        return dense
    if cache.dtype == types.uint8:
        def quant(x, at, xsum, pair, cache, row, step, h, heads, dim, layout, bias, bias_at, bias_step, sc, sc_at, gap):
            if U(layout[_SEG]) != U(_COMMON_SEG):  # one key at a time, as the vector code is written for 64
                for j in range(SLOTS):
                    add = bias[bias_at + j * bias_step]
                    sc[U(sc_at) + U(j) * U(gap)] = add if add == -np.inf else \
                        dot_row(x, at, xsum, pair, cache, row + j * step, h, heads, dim, layout) + add
                return
            t0, t1, t2, t3 = _quant_dots4(x, at, xsum, pair, cache, row, step, h, dim, layout)
            for j, t in enumerate((t0, t1, t2, t3)):
                add = bias[bias_at + j * bias_step]
                sc[U(sc_at) + U(j) * U(gap)] = add if add == -np.inf else t + add
        return quant
    return None


# How far ahead of the item being read its slots' codes, scales and minimums are asked for. A
# quantized row is three runs (codes, scales, minimums), so a group of 4 slots is 12 streams, more
# than the hardware prefetchers follow: from RAM the kernel read a third below its rate on
# cache-resident data.
# Codes: 8 heads ahead, each of their lines; scales and minimums: a line ahead (16 heads of 2
# pieces a line).
_AHEAD_HEADS, _AHEAD_SCALES, _LINE = 8, 64, 64


@njit(inline="always")
def _prefetch4(cache, c, sa, to_min, gap, head_bytes, h):
    """Prefetch for 4 slots, `gap` bytes apart, of head h: the codes 8 heads on, and every 8th
    head the scales and minimums a line on (on a cache-resident layer each hint costs time)."""
    ahead = U(_AHEAD_HEADS) * head_bytes
    for j in range(SLOTS):
        at = U(j) * gap
        _prefetch(cache, c + at + ahead)
        if head_bytes > U(_LINE):  # 8 bits: a head of 128 is two lines (more are left to the hardware)
            _prefetch(cache, c + at + ahead + U(_LINE))
        if h & 7 == 0:
            _prefetch(cache, sa + at + U(_AHEAD_SCALES))
            _prefetch(cache, sa + to_min + at + U(_AHEAD_SCALES))


@njit(fastmath=FAST, inline="always")
def _quant_dots4(x, at, xsum, pair, cache, row, step, h, dim, layout):
    """x[at:at + D] (kernel order) . the dequantized keys of head h in cache rows row + j * step,
    j < 4, pieces of 64: per piece, scale * (x . codes) + minimum * sum(x), as _quant_dot."""
    pieces, to_min = U(layout[_PIECES]), U(layout[_TO_MIN])
    row_gap = U(step) * U(layout[_ROW])
    c, sa = _piece_at(row, h, 0, dim, layout)
    _prefetch4(cache, c, sa, to_min, row_gap, U(dim) * U(layout[_BITS]) >> U(3), h)
    if layout[_BITS] == 4:
        t0, t1, t2, t3 = _head_dots4_4bit(x, U(at), xsum, U(pair) * pieces, cache, c, sa, to_min, row_gap, pieces)
    else:
        t0, t1, t2, t3 = _head_dots4_8bit(x, U(at), xsum, U(pair) * pieces, cache, c, sa, to_min, row_gap, pieces)
    return t0, t1, t2, t3


def add_rows(acc, at, p0, p1, p2, p3, cache, row, step, h, heads, dim, layout):
    """acc[at:at + D] += sum over j < SLOTS of pj * (value of kv head h in cache row row + j * step)."""


@overload(add_rows, inline="always")
def _add_rows(acc, at, p0, p1, p2, p3, cache, row, step, h, heads, dim, layout):
    if cache.dtype in (types.float32, types.uint16, types.int16):
        def dense(acc, at, p0, p1, p2, p3, cache, row, step, h, heads, dim, layout):
            at, dim = U(at), U(dim)
            c0 = U(row * heads + h) * dim
            gap = U(step * heads) * dim
            c1, c2, c3 = c0 + gap, c0 + gap + gap, c0 + gap + gap + gap
            for d in range(dim):
                acc[at + d] += (p0 * to_f32(cache[c0 + d]) + p1 * to_f32(cache[c1 + d])
                                + p2 * to_f32(cache[c2 + d]) + p3 * to_f32(cache[c3 + d]))
        return dense
    if cache.dtype == types.uint8:
        def quant(acc, at, p0, p1, p2, p3, cache, row, step, h, heads, dim, layout):
            if U(layout[_SEG]) != U(_COMMON_SEG):
                for j, p in enumerate((p0, p1, p2, p3)):
                    add_row(acc, at, p, cache, row + j * step, h, heads, dim, layout)
                return
            _quant_add4(acc, at, p0, p1, p2, p3, cache, row, step, h, dim, layout)
        return quant
    return None


@njit(fastmath=FAST, inline="always")
def _quant_add4(acc, at, p0, p1, p2, p3, cache, row, step, h, dim, layout):
    """acc[at:at + D] (kernel order) += sum over j < 4 of pj * the dequantized value of head h in
    cache row row + j * step, pieces of 64: each piece of the accumulator loaded and stored once."""
    to_min = U(layout[_TO_MIN])
    row_gap = U(step) * U(layout[_ROW])
    c, sa = _piece_at(row, h, 0, dim, layout)
    _prefetch4(cache, c, sa, to_min, row_gap, U(dim) * U(layout[_BITS]) >> U(3), h)
    for j in range(U(layout[_PIECES])):
        c, sa = _piece_at(row, h, j, dim, layout)
        s1, s2 = sa + row_gap, sa + row_gap + row_gap
        s3 = s2 + row_gap
        w0, w1 = p0 * _load_f16(cache, sa), p1 * _load_f16(cache, s1)
        w2, w3 = p2 * _load_f16(cache, s2), p3 * _load_f16(cache, s3)
        low = (p0 * _load_f16(cache, sa + to_min) + p1 * _load_f16(cache, s1 + to_min)
               + p2 * _load_f16(cache, s2 + to_min) + p3 * _load_f16(cache, s3 + to_min))
        a = U(at) + j * U(_COMMON_SEG)
        if layout[_BITS] == 4:
            _axpy4_4bit(acc, a, cache, c, row_gap, w0, w1, w2, w3, low)
        else:
            _axpy4_8bit(acc, a, cache, c, row_gap, w0, w1, w2, w3, low)


@njit(fastmath=FAST, inline="always")
def _dot(x, at, y):
    total = np.float32(0)
    at = U(at)
    for d in range(U(y.shape[0])):
        total += x[at + d] * y[d]
    return total


@njit(fastmath=FAST, inline="always")
def _scores(q, qsum, k, layout, bias, shape, s0, s1, i0, i1, row32, sc):
    """Pass 1, streaming the keys once: sc[slot, item, r] = q . k + bias (-inf where hidden).
    Slots are read in groups (slots_per_pass), within a group item by item, so that every slot
    of the group is a sequential stream. Arrays are flat and indexed by hand: slicing out rows in
    a loop this hot costs reference counting, atomic and shared between threads."""
    batch, heads, queries, dim, mask_heads = shape
    group, items = slots_per_pass(k), i1 - i0
    for g in range(s0, s1, group):
        n = min(group, s1 - g)
        b, h = i0 // heads, i0 % heads  # of item it, counted along rather than divided out per key
        for it in range(i0, i1):  # one contiguous run of each slot's keys
            mask_h = h if mask_heads > 1 else 0
            hidden = -1  # how many of the group's slots are hidden; -1: not read as a group
            if queries == 1 and n == SLOTS:
                row = g * batch + b
                bias_at, bias_step = row * mask_heads + mask_h, batch * mask_heads
                hidden = 0
                for j in range(SLOTS):
                    hidden += bias[bias_at + j * bias_step] == -np.inf
                if hidden == 0:
                    score_rows(q, it * dim, qsum, it, k, row, batch, h, heads, dim, layout,
                               bias, bias_at, bias_step, sc, (g - s0) * items + it - i0, items)
                elif hidden == SLOTS:  # left padding, a window's past: never read, as one key at a time never was
                    for j in range(SLOTS):
                        sc[U((g - s0 + j) * items + it - i0)] = -np.inf
            if 0 < hidden < SLOTS or hidden == -1:  # one key at a time, each hidden key skipped
                for s in range(g, g + n):
                    row = s * batch + b
                    at = U(((s - s0) * items + it - i0) * queries)
                    if queries == 1:  # no query heads share the row: read it straight into the product
                        add = bias[row * mask_heads + mask_h]
                        sc[at] = add if add == -np.inf else dot_row(q, it * dim, qsum, it, k, row, h, heads, dim, layout) + add
                    else:
                        widen(k, row, h, heads, row32, layout)  # once for every query head that shares it
                        at_bias = (row * mask_heads + mask_h) * queries
                        for r in range(queries):
                            add = bias[at_bias + r]
                            sc[at + U(r)] = add if add == -np.inf else _dot(q, (it * queries + r) * dim, row32) + add
            h += 1
            if h == heads:
                b, h = b + 1, 0


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
    """Pass 2, streaming the values once, in the order of pass 1: acc[item, r] += p * v."""
    batch, heads, queries, dim, _ = shape
    group, items = slots_per_pass(v), i1 - i0
    for g in range(s0, s1, group):
        n = min(group, s1 - g)
        b, h = i0 // heads, i0 % heads
        for it in range(i0, i1):
            grouped = False
            if queries == 1 and n == SLOTS:
                at, gap = U((g - s0) * items + it - i0), U(items)
                p0, p1, p2, p3 = sc[at], sc[at + gap], sc[at + gap + gap], sc[at + gap + gap + gap]
                # a hidden key (p = 0) may be any bits, NaN included: it must not be multiplied in
                grouped = p0 != 0 and p1 != 0 and p2 != 0 and p3 != 0
                if grouped:
                    add_rows(acc, acc_at + it * dim, p0, p1, p2, p3, v, g * batch + b, batch, h, heads, dim, layout)
            if not grouped:
                for s in range(g, g + n):
                    row = s * batch + b
                    at = U(((s - s0) * items + it - i0) * queries)
                    if queries == 1:
                        p = sc[at]
                        if p != 0:
                            add_row(acc, acc_at + it * dim, p, v, row, h, heads, dim, layout)
                    else:
                        widen(v, row, h, heads, row32, layout)
                        for r in range(queries):
                            p = sc[at + U(r)]
                            if p != 0:
                                o = U(acc_at + (it * queries + r) * dim)
                                for d in range(U(dim)):
                                    acc[o + d] += p * row32[d]
            h += 1
            if h == heads:
                b, h = b + 1, 0


@njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
def attend(q, qsum, k, v, layout, shape, end, bias, item_bounds, item_ends, part_m, part_l, part_acc, scores, rows32):
    """q [B, Hkv, R, D] float32, already scaled (in kernel order for a 4-bit cache); qsum
    [B, Hkv, R, D / piece] the sums of q's pieces of a quantization group (empty for a dense
    cache); k, v: the cache (see widen), of which the first `end` slots are read; bias [end, B, 1 or Hkv, R] float32 (the additive mask, -inf for a hidden
    key); shape (B, Hkv, R, D, mask heads); all flat. Work units are slot ranges x ranges of
    (row, kv head) items; part_m, part_l [slot ranges, B, Hkv, R] and part_acc [..., D] get each
    slot range's partial result; scores [units, slots per unit * items per unit * R] and
    rows32 [units, D] are scratch.

    Two passes per unit, keys then values, rather than an online softmax: the exact maximum is
    known before any exp, so there is no rescaling and no branch per key, and each pass is a
    simple loop the compiler vectorizes.

    item_bounds [item ranges + 1]: where each range of (row, kv head) items starts; item_ends
    [item ranges]: the slots a range reads at most (its longest row). Rows of different lengths
    (continuous batching) get ranges of equal work rather than equal items, and no unit walks the
    slots past its own rows' ends: otherwise the thread holding the longest row sets the time."""
    batch, heads, queries, dim, _ = shape
    pairs = batch * heads * queries
    slot_splits = part_m.shape[0] // pairs
    item_splits = item_bounds.shape[0] - 1
    per_s = (end + slot_splits - 1) // slot_splits
    for w in prange(slot_splits * item_splits):
        c, r = w // item_splits, w % item_splits
        i0, i1 = item_bounds[r], item_bounds[r + 1]
        s0 = min(end, c * per_s)
        s1 = max(s0, min(end, (c + 1) * per_s, item_ends[r]))
        at = c * pairs + i0 * queries  # this unit's first (row, kv head, query) in part_*
        _scores(q, qsum, k, layout, bias, shape, s0, s1, i0, i1, rows32[w], scores[w])
        _softmax(scores[w], s1 - s0, (i1 - i0) * queries, part_m, part_l, at)
        for d in range(U(at * dim), U((at + (i1 - i0) * queries) * dim)):
            part_acc[d] = 0
        _values(v, layout, shape, s0, s1, i0, i1, rows32[w], scores[w], part_acc, c * pairs * dim)


@njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
def merge(part_m, part_l, part_acc, out32, dim, order, out):
    """Combine the slot ranges' partial results ([slot ranges, pairs] and [..., D], flat) into out
    [pairs * D], where a pair is one (row, kv head, query), in out's dtype (float32, or float16 /
    bfloat16 as uint16 / int16 bits: the caller's tensor, often the pinned buffer bound for the
    GPU, so no PyTorch conversion follows). out32 [pairs * D] float32 is scratch. order: empty, or
    for a 4-bit cache the position in kernel order of each element of a head (the results are in
    that order)."""
    pairs = out.shape[0] // dim
    n_chunks = part_m.shape[0] // pairs
    for j in prange(pairs):
        top = np.float32(-np.inf)
        for c in range(n_chunks):
            top = max(top, part_m[c * pairs + j])
        o = U(j * dim)
        for d in range(U(dim)):
            out32[o + d] = 0
        if top != -np.inf:  # else every key is hidden: no attention (the engine never asks for this)
            total = np.float32(0)
            for c in range(n_chunks):
                w = _exp(part_m[c * pairs + j] - top)
                total += w * part_l[c * pairs + j]
                at = U((c * pairs + j) * dim)
                if order.shape[0]:
                    for d in range(U(dim)):
                        out32[o + d] += w * part_acc[at + U(order[d])]
                else:
                    for d in range(U(dim)):
                        out32[o + d] += w * part_acc[at + d]
            inv = np.float32(1) / total
            for d in range(U(dim)):
                out32[o + d] *= inv
        for d in range(U(dim)):
            out[o + d] = from_f32(out32[o + d], out[0])


@njit(parallel=True, fastmath=FAST, cache=True, nogil=True)
def prepare_query(q, scale, dim, seg, order, q_out, sums):
    """q [pairs * D] (float32, or float16 / bfloat16 bits) times scale, as float32, as the kernel
    reads it, into q_out: for a 4-bit cache in kernel order (order: the position in kernel order of
    each element of a head; empty: the head's own order), and for a quantized cache (seg > 0) the
    sums of its pieces of `seg` elements into sums [pairs * D / seg]. Here rather than in PyTorch:
    a PyTorch operation before each call wakes PyTorch's own OpenMP pool (Numba's runs on another
    OpenMP runtime), whose threads then spin on the cores the kernel needs (issue 17)."""
    for p in prange(q.shape[0] // dim):
        o = p * dim
        if order.shape[0]:
            for d in range(dim):
                q_out[o + order[d]] = to_f32(q[o + d]) * scale
        else:
            for d in range(dim):
                q_out[o + d] = to_f32(q[o + d]) * scale
        if seg > 0:  # kernel order permutes within a piece, so q_out's pieces have q's sums
            for j in range(dim // seg):
                total = np.float32(0)
                for i in range(seg):
                    total += q_out[o + j * seg + i]
                sums[p * (dim // seg) + j] = total


@njit(cache=True, nogil=True)
def put_rows(cache, row_bytes, rows_per_slot, slots, rows, new):
    """cache (the slot-major cache's bytes, flat) at (slots[n], rows[n]) = new's row rows[n] (the
    new keys or values [rows, row_bytes], flat), for every n. A decode step writes one slot of each
    row this way before its attention call: in PyTorch that is an indexed assignment, a parallel
    region of PyTorch's OpenMP pool, which then spins on the cores the kernel's pool needs (see
    prepare_query). A few rows of kilobytes: one thread."""
    for n in range(slots.shape[0]):
        at, src = (slots[n] * rows_per_slot + rows[n]) * row_bytes, rows[n] * row_bytes
        cache[at:at + row_bytes] = new[src:src + row_bytes]


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
