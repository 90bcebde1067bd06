"""A Triton copy kernel that reads page-locked host memory from the GPU (zero-copy); see
pinned.to_device_zero_copy for why."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=keep), mask=keep)


def copy_from_host(src, dst: torch.Tensor, n: int, block: int = 4096) -> None:
    _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
