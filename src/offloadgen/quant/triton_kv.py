"""Dequantization of KV cache rows (quant/kv.py's layout) on the GPU: one Triton kernel that reads
each code once and writes the dense keys or values of one layer and micro-batch into a workspace,
so GPU attention never holds more than that in 16 bits. Rows may be strided (a micro-batch's
columns of a slot-major cache), so programs address them as [slot, row] pairs.
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
