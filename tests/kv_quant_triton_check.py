"""Run by tests/test_kv_quant.py under TRITON_INTERPRET=1: the Triton KV decoder (the GPU's path)
against the PyTorch one, on strided rows as a micro-batch's columns of the cache are."""
import torch

from offloadgen.quant import triton_kv
from offloadgen.quant.kv import KVQuant

for bits in (4, 8):
    for heads, dim, group in [(3, 64, 32), (3, 64, 128), (4, 16, 16), (2, 128, 64), (5, 8, 4)]:
        codec = KVQuant(bits, group, heads, dim)
        x = torch.randn(7, 5, codec.features) * 3
        cache = torch.zeros(9, 6, codec.row_bytes, dtype=torch.uint8)
        cache[:7, :5] = codec.encode(x)
        rows = cache[:7, 1:4]
        for dtype in (torch.float32, torch.float16):
            ref = codec.decode(rows, dtype)
            out = triton_kv.decode_cuda(codec, rows, dtype)
            assert torch.equal(out, ref), (bits, heads, dim, group, dtype)
print("all equal")
