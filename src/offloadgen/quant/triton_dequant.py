"""Dequantization on the GPU: one elementwise Triton kernel, memory-bound (it reads ~0.5-1 byte
and writes 2 bytes per weight, so a 1 GB layer takes about a millisecond on an H100)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(packed_ptr, scale_ptr, min_ptr, out_ptr, total, cols, packed_cols, n_groups,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    row = offs // cols
    col = offs % cols
    if BITS == 4:
        byte = tl.load(packed_ptr + row * packed_cols + col // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((col % 2) * 4).to(tl.int32)) & 0xF
    else:
        q = tl.load(packed_ptr + row * packed_cols + col, mask=mask, other=0).to(tl.int32)
    g = row * n_groups + col // GROUP
    s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(min_ptr + g, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (q.to(tl.float32) * s + m).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_cuda(qt, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    rows, cols = qt.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=qt.packed.device)
    total = rows * cols
    block = 1024
    _dequant_kernel[(triton.cdiv(total, block),)](
        qt.packed, qt.scale, qt.min, out, total, cols, qt.packed.shape[1], qt.scale.shape[1],
        BITS=qt.config.bits, GROUP=qt.config.group_size, BLOCK=block)
    return out
