"""Run by tests/test_kv_quant.py under TRITON_INTERPRET=1: the Triton KV decoder and encoder (the
GPU's path) against the PyTorch ones, on strided rows as a micro-batch's columns of the cache are.
On a GPU machine without TRITON_INTERPRET it checks the compiled kernels on the GPU the same way:
    PYTHONPATH=src python tests/kv_quant_triton_check.py
"""
import os

import torch

from offloadgen.quant import triton_kv
from offloadgen.quant.kv import KVQuant

DEV = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"

for bits in (4, 8):
    for heads, dim, group in [(3, 64, 32), (3, 64, 128), (4, 16, 16), (2, 128, 64), (5, 8, 4)]:
        codec = KVQuant(bits, group, heads, dim)
        x = torch.randn(7, 5, codec.features) * 3
        cache = torch.zeros(9, 6, codec.row_bytes, dtype=torch.uint8)
        cache[:7, :5] = codec.encode(x)
        rows = cache[:7, 1:4]
        for dtype in (torch.float32, torch.float16):
            ref = codec.decode(rows, dtype)
            out = triton_kv.decode_cuda(codec, rows.to(DEV), dtype).cpu()
            assert torch.equal(out, ref), (bits, heads, dim, group, dtype)
# The encoder, bit for bit against groupwise.quantize's rows, on values where rounding matters:
# exact grids (ties), constant groups, groups past the last feature, float16 and bfloat16 inputs.
for bits in (4, 8):
    for heads, dim, group in [(3, 64, 32), (3, 64, 128), (4, 16, 16), (2, 128, 64), (5, 8, 4), (1, 12, 6)]:
        codec = KVQuant(bits, group, heads, dim)
        g = torch.Generator().manual_seed(bits * 1000 + heads * 10 + group)
        x = torch.randn(4, 3, codec.features, generator=g) * 3
        x[0, 0] = torch.arange(codec.features) % 16 * 0.25  # an exact grid: ties everywhere
        x[0, 1] = 1.5  # constant groups
        x[1, 2, : codec.features // 2] = 0.0
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            xs = x.to(dtype)
            ref = codec.encode(xs)
            out = triton_kv.encode_cuda(codec, xs.to(DEV)).cpu()
            assert torch.equal(out, ref), (bits, heads, dim, group, dtype, (out != ref).nonzero()[:5])
        # a strided source, as keys [rows, heads, t, dim] permuted to slots
        k = x.to(torch.float16).view(4, 3, heads, dim).permute(1, 0, 2, 3)
        assert torch.equal(triton_kv.encode_cuda(codec, k.to(DEV).reshape(3, 4, -1)).cpu(),
                           codec.encode(k.reshape(3, 4, -1)))
print(f"all equal ({DEV})")
