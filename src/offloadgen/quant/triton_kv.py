"""KV cache rows (quant/kv.py's layout) on the GPU, one Triton kernel each way.

- decode: reads each code once and writes the dense keys or values of one layer and micro-batch
  into a workspace, so GPU attention never holds more than that in 16 bits. Rows may be strided
  (a micro-batch's columns of a slot-major cache), so programs address them as [slot, row] pairs.
- encode: quantizes new keys or values into rows, bit for bit as groupwise.quantize does. A
  decode step writes one token for 8 rows per layer and micro-batch: in PyTorch that is some 35
  small operations, and at batch 256 (32 micro-batches x 48 layers, twice) the host spent about
  2 s a step just issuing them (issue 17: 3.98 s a step against 1.48 s predicted). One launch here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(src_ptr, out_ptr, rows_b, stride_a, stride_b, features, codes_bytes, groups,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    a, b = pair // rows_b, pair % rows_b
    row = src_ptr + a * stride_a + b * stride_b
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # element index within the token's row
    keep = c < features
    if BITS == 8:
        code = tl.load(row + c, mask=keep, other=0).to(tl.float32)
    else:
        byte = tl.load(row + c // 2, mask=keep, other=0).to(tl.int32)
        code = ((byte >> ((c % 2) * 4)) & 0xF).to(tl.float32)
    g = c // GROUP
    params = (row + codes_bytes).to(tl.pointer_type(tl.float16))  # scales, then minimums
    scale = tl.load(params + g, mask=keep, other=0.0).to(tl.float32)
    low = tl.load(params + groups + g, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + pair * features + c, (code * scale + low).to(out_ptr.dtype.element_ty), mask=keep)


def decode_cuda(codec, rows: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows uint8 [A, B, row_bytes] (last axis contiguous) -> [A, B, features] in dtype."""
    a, b, _ = rows.shape
    if out is None:
        out = torch.empty(a, b, codec.features, dtype=dtype, device=rows.device)
    assert rows.stride(2) == 1 and out.is_contiguous() and out.shape == (a, b, codec.features)
    block = 1024
    grid = (a * b, triton.cdiv(codec.features, block))
    if a * b:
        _decode_kernel[grid](rows, out, b, rows.stride(0), rows.stride(1), codec.features, codec.codes_bytes,
                             codec.groups, BITS=codec.bits, GROUP=codec.group_size, BLOCK=block)
    return out


@triton.jit
def _encode_kernel(x_ptr, out_ptr, stride_x, row_bytes, features, codes_bytes, groups,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_G: tl.constexpr):
    """One token row, BLOCK_G groups of it; each group as its even and odd elements (the two
    nibbles of a 4-bit byte). Past the last feature the last one repeats, as groupwise pads."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)[:, None]
    k = tl.arange(0, HALF)[None, :]
    ok = (g < groups) & (k < GROUP // 2)
    even = g * GROUP + 2 * k
    src = x_ptr + row * stride_x
    xe = tl.load(src + tl.minimum(even, features - 1), mask=ok, other=0.0).to(tl.float32)
    xo = tl.load(src + tl.minimum(even + 1, features - 1), mask=ok, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(ok, tl.minimum(xe, xo), float("inf")), axis=1)
    hi = tl.max(tl.where(ok, tl.maximum(xe, xo), float("-inf")), axis=1)
    # float16 minimum and scale rounded to nearest, then one ulp outward where that fell inside
    # the range (groupwise.quantize's torch.nextafter), by their bits.
    lo16 = lo.to(tl.float16)
    bits = lo16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    down = tl.where(bits == 0, 0x8001, tl.where(bits >= 0x8000, bits + 1, bits - 1))
    lo16 = tl.where(lo16.to(tl.float32) > lo, down.to(tl.int16).to(tl.float16, bitcast=True), lo16)
    levels = (1 << BITS) - 1
    scale = tl.math.div_rn(hi - lo16.to(tl.float32), levels * 1.0)
    scale16 = scale.to(tl.float16)
    bits = scale16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    up = tl.where(bits == 0x8000, 1, tl.where(bits >= 0x8000, bits - 1, bits + 1))
    scale16 = tl.where(scale16.to(tl.float32) < scale, up.to(tl.int16).to(tl.float16, bitcast=True), scale16)
    scale16 = tl.where(scale16 > 0, scale16, 1.0)
    low, step = lo16.to(tl.float32)[:, None], scale16.to(tl.float32)[:, None]
    qe = _round_half_even(tl.math.div_rn(xe - low, step))
    qo = _round_half_even(tl.math.div_rn(xo - low, step))
    qe = tl.minimum(tl.maximum(qe, 0.0), levels).to(tl.uint8)
    qo = tl.minimum(tl.maximum(qo, 0.0), levels).to(tl.uint8)
    dst = out_ptr + row * row_bytes
    if BITS == 4:
        tl.store(dst + g * (GROUP // 2) + k, qe | (qo << 4), mask=ok)
    else:
        tl.store(dst + even, qe, mask=ok)
        tl.store(dst + even + 1, qo, mask=ok)
    params = (dst + codes_bytes).to(tl.pointer_type(tl.float16))
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(params + gs, scale16, mask=gs < groups)
    tl.store(params + groups + gs, lo16, mask=gs < groups)


@triton.jit
def _round_half_even(v):
    """torch.round's rounding (ties to even) from floor: libdevice's rint has no interpreter
    implementation, and the check of this kernel runs in the interpreter on the CPU."""
    f = tl.floor(v)
    d = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


def encode_cuda(codec, x: torch.Tensor) -> torch.Tensor:
    """x [..., features] (float16, bfloat16 or float32) -> uint8 [..., row_bytes]."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, codec.features)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], codec.row_bytes, dtype=torch.uint8, device=x.device)
    half = triton.next_power_of_2(codec.group_size // 2)
    block_g = max(1, min(triton.next_power_of_2(codec.groups), 4096 // (2 * half)))
    if flat.shape[0]:
        grid = (flat.shape[0], triton.cdiv(codec.groups, block_g))
        _encode_kernel[grid](flat, out, flat.stride(0), codec.row_bytes, codec.features, codec.codes_bytes,
                             codec.groups, BITS=codec.bits, GROUP=codec.group_size, HALF=half, BLOCK_G=block_g)
    return out.view(*lead, codec.row_bytes)


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, end, rows_b,
                   stride_ks, stride_kb, stride_vs, stride_vb,
                   stride_mb, stride_mh, stride_mr, stride_ms, codes_bytes, groups, kv_heads,
                   R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row, kv head): its R grouped queries over slots [:end], keys and values dequantized in
    registers block by block, online softmax (flash-decoding's arithmetic, one program per pair)."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, R_PAD)
    d = tl.arange(0, D_PAD)
    r_ok, d_ok = r < R, d < D
    pair = b * kv_heads + hk
    q = tl.load(q_ptr + (pair * R + r[:, None]) * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    feature = hk * D + d  # this head's elements in the token's row
    group = feature // GROUP
    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, D_PAD], tl.float32)
    mask_row = mask_ptr + b * stride_mb + hk * stride_mh + r[:, None] * stride_mr
    for start in range(0, end, BLOCK_N):
        # in 64 bits: slot x slot stride passes 2**31 bytes in a wide cache (a batch of 256 rows of
        # OPT-30B's 7.4 KiB 8-bit rows is 1.9 MB a slot: past slot 1100)
        s = start + tl.arange(0, BLOCK_N).to(tl.int64)
        s_ok = s < end
        ok = s_ok[:, None] & d_ok[None, :]
        k = _dequant_block(k_ptr + s[:, None] * stride_ks + b * stride_kb, feature, group, ok, codes_bytes, groups,
                           BITS)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [R_PAD, BLOCK_N]
        add = tl.load(mask_row + s[None, :] * stride_ms, mask=r_ok[:, None] & s_ok[None, :], other=float("-inf"))
        scores = scores + add.to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far hidden: nothing to scale
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _dequant_block(v_ptr + s[:, None] * stride_vs + b * stride_vb, feature, group, ok, codes_bytes, groups,
                           BITS)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (pair * R + r[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _dequant_block(rows, feature, group, ok, codes_bytes, groups, BITS: tl.constexpr):
    """[BLOCK_N, D_PAD] float32 of one head from BLOCK_N token rows (row pointers [BLOCK_N, 1])."""
    if BITS == 8:
        code = tl.load(rows + feature[None, :], mask=ok, other=0).to(tl.float32)
    else:
        byte = tl.load(rows + feature[None, :] // 2, mask=ok, other=0).to(tl.int32)
        code = ((byte >> ((feature[None, :] % 2) * 4)) & 0xF).to(tl.float32)
    params = (rows + codes_bytes).to(tl.pointer_type(tl.float16))
    scale = tl.load(params + group[None, :], mask=ok, other=0.0).to(tl.float32)
    low = tl.load(params + groups + group[None, :], mask=ok, other=0.0).to(tl.float32)
    return code * scale + low


def attend_cuda(codec, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None = None) -> torch.Tensor:
    """Decode attention straight from the 4/8-bit cache: q [B, H, 1, D]; k_rows, v_rows uint8
    [end, B, row_bytes] (slot-major, a micro-batch's columns: any strides but the last); mask the
    additive [B, 1 or Hkv, H/Hkv, end] that sdpa would take (None: every slot). Returns [B, H, 1, D]
    in q's dtype. No dequantized copy of the cache is made: one program per (row, kv head) reads
    each code once."""
    b, h, t, d = q.shape
    end = k_rows.shape[0]
    h_kv = codec.kv_heads
    assert t == 1 and d == codec.head_dim and h % h_kv == 0, (q.shape, codec)
    assert k_rows.stride(2) == 1 and v_rows.stride(2) == 1 and k_rows.shape[:2] == (end, b)
    r = h // h_kv
    scale = d ** -0.5 if scale is None else scale
    qf = (q.float() * scale).reshape(b, h_kv, r, d).contiguous()
    # zeros where there is nothing to attend to (no slot), as SDPA gives: no program writes them
    out = (torch.empty if end else torch.zeros)(b, h_kv, r, d, dtype=q.dtype, device=q.device)
    if mask is None:
        mask = torch.zeros(1, 1, 1, end, dtype=torch.float32, device=q.device).expand(b, 1, r, end)
    # Only the additive, grouped layout: a boolean mask would be added as 0/1, a [B, H, 1, end]
    # one read per kv head, and a broadcast row of one past its end.
    assert mask.is_floating_point() and mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] in (1, h_kv) \
        and mask.shape[2] in (1, r) and mask.shape[3] == end, (mask.shape, mask.dtype, (b, h_kv, r, end))
    mb, mh, mr, ms = (0 if n == 1 else st for n, st in zip(mask.shape, mask.stride()))
    if b and end:
        _attend_kernel[(b, h_kv)](qf, k_rows, v_rows, mask, out, end, b,
                                  k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
                                  mb, mh, mr, ms, codec.codes_bytes, codec.groups, h_kv,
                                  R=r, R_PAD=max(triton.next_power_of_2(r), 2), D=d, D_PAD=triton.next_power_of_2(d),
                                  BITS=codec.bits, GROUP=codec.group_size, BLOCK_N=32)
    return out.reshape(b, h, 1, d)
