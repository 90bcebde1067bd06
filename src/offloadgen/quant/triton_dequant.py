"""Dequantization on the GPU: Triton kernels, memory-bound (they read 0.5 or 1 byte and write 2
bytes per weight). Programs tile [rows, columns] in 2-D so that all index arithmetic inside a row
is 32-bit, and 4-bit programs read each packed byte once and write both of its values together.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant4_kernel(packed_ptr, scale_ptr, min_ptr, out_ptr, cols, packed_cols, n_groups,
                     GROUP: tl.constexpr, BLOCK_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # packed byte index within the row
    byte = tl.load(packed_ptr + row * packed_cols + b, mask=b < packed_cols, other=0).to(tl.int32)
    g = (2 * b) // GROUP  # both values of a byte share a group (GROUP is even)
    s = tl.load(scale_ptr + row * n_groups + g, mask=g < n_groups, other=0.0).to(tl.float32)
    m = tl.load(min_ptr + row * n_groups + g, mask=g < n_groups, other=0.0).to(tl.float32)
    lo = (byte & 0xF).to(tl.float32) * s + m
    hi = (byte >> 4).to(tl.float32) * s + m
    vals = tl.reshape(tl.join(lo, hi), (2 * BLOCK_B,))  # [lo0, hi0, lo1, hi1, ...]
    c = tl.program_id(1) * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
    tl.store(out_ptr + row * cols + c, vals.to(out_ptr.dtype.element_ty), mask=c < cols)


@triton.jit
def _dequant8_kernel(packed_ptr, scale_ptr, min_ptr, out_ptr, cols, packed_cols, n_groups,
                     GROUP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    q = tl.load(packed_ptr + row * packed_cols + c, mask=mask, other=0).to(tl.float32)
    g = c // GROUP
    s = tl.load(scale_ptr + row * n_groups + g, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(min_ptr + row * n_groups + g, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * cols + c, (q * s + m).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_cuda(qt, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    rows, cols = qt.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=qt.packed.device)
    packed_cols, n_groups = qt.packed.shape[1], qt.scale.shape[1]
    if qt.config.bits == 4:
        block_b = 512
        grid = (rows, triton.cdiv(packed_cols, block_b))
        _dequant4_kernel[grid](qt.packed, qt.scale, qt.min, out, cols, packed_cols, n_groups,
                               GROUP=qt.config.group_size, BLOCK_B=block_b)
    else:
        block = 1024
        grid = (rows, triton.cdiv(cols, block))
        _dequant8_kernel[grid](qt.packed, qt.scale, qt.min, out, cols, packed_cols, n_groups,
                               GROUP=qt.config.group_size, BLOCK=block)
    return out
