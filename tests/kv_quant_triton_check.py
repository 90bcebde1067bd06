"""Run by tests/test_kv_quant.py under TRITON_INTERPRET=1: the Triton KV decoder, encoder and decode attention (the
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
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ref = codec.decode(rows, dtype)
            out = triton_kv.decode_cuda(codec, rows.to(DEV), dtype).cpu()
            if dtype == torch.bfloat16 and DEV == "cpu":
                # the interpreter casts float32 to bfloat16 by truncation, a GPU to nearest: one unit apart
                exact = codec.decode(rows, torch.float32)
                assert ((out.float() - exact).abs() <= exact.abs() * 2 ** -7).all(), (bits, heads, dim, group)
                continue
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

# Decode attention straight from the quantized cache, against attention in float64 over the
# decoded cache: MHA and grouped heads, head sizes that are not powers of two, slots hidden by the
# mask, a per-head additive mask (ALiBi's kind), strided columns of a slot-major cache.
def reference(q, k, v, mask, scale):
    b, h, _, d = q.shape
    h_kv = k.shape[2]
    keys, values = k.permute(1, 2, 0, 3).double(), v.permute(1, 2, 0, 3).double()
    qg = q.double().reshape(b, h_kv, h // h_kv, d)
    scores = qg @ keys.transpose(-1, -2) * scale + mask.double()
    return (scores.softmax(-1) @ values).reshape(b, h, 1, d)


for bits in (4, 8):
    for heads, kv_heads, dim, group, end, per_head in [(4, 4, 16, 16, 37, False), (8, 2, 32, 32, 70, True),
                                                      (6, 3, 24, 8, 33, False), (2, 1, 64, 64, 5, True)]:
        codec = KVQuant(bits, group, kv_heads, dim)
        g = torch.Generator().manual_seed(bits * 100 + heads + end)
        b = 3
        k = torch.randn(end, b, kv_heads, dim, generator=g)
        v = torch.randn(end, b, kv_heads, dim, generator=g)
        cache_k = torch.zeros(end + 4, b + 2, codec.row_bytes, dtype=torch.uint8)
        cache_v = torch.zeros_like(cache_k)
        cache_k[:end, 1:b + 1] = codec.encode(k.reshape(end, b, -1))
        cache_v[:end, 1:b + 1] = codec.encode(v.reshape(end, b, -1))
        k_rows, v_rows = cache_k[:end, 1:b + 1], cache_v[:end, 1:b + 1]
        q = torch.randn(b, heads, 1, dim, generator=g)
        group_q = heads // kv_heads
        mask = torch.zeros(b, kv_heads if per_head else 1, group_q, end)
        if per_head:  # a different slope per kv head
            mask += torch.arange(end) * -0.05 * (1 + torch.arange(mask.shape[1]))[None, :, None, None]
        mask[0, ..., : end // 3] = float("-inf")  # row 0 is left-padded
        scale = dim ** -0.5
        dk = codec.decode(k_rows, torch.float32).view(end, b, kv_heads, dim)
        dv = codec.decode(v_rows, torch.float32).view(end, b, kv_heads, dim)
        ref = reference(q, dk, dv, mask, scale)
        for dtype in (torch.float32, torch.float16):
            out = triton_kv.attend_cuda(codec, q.to(DEV, dtype), k_rows.to(DEV), v_rows.to(DEV),
                                        mask.to(DEV, dtype), scale).cpu().double()
            tol = 1e-4 if dtype == torch.float32 else 3e-3
            err = (out - ref).abs().max().item()
            assert err <= tol * ref.abs().max().item(), (bits, heads, kv_heads, dim, group, end, dtype, err)

# What the wrapper must take as SDPA would, or refuse: no slot at all (zeros, not whatever the
# buffer held), a mask of one row for the whole batch (its stride is not 0, and was followed past
# its end), and masks in a layout the kernel does not read (boolean; one per query head).
codec = KVQuant(8, 16, 2, 16)
b, heads, end = 3, 4, 6
g = torch.Generator().manual_seed(7)
k, v = torch.randn(end, b, codec.features, generator=g), torch.randn(end, b, codec.features, generator=g)
k_rows, v_rows = codec.encode(k), codec.encode(v)
q = torch.randn(b, heads, 1, 16, generator=g)
empty = triton_kv.attend_cuda(codec, q.to(DEV), k_rows[:0].to(DEV), v_rows[:0].to(DEV), None).cpu()
assert torch.equal(empty, torch.zeros_like(q)), "no slot: zeros, as SDPA gives"
one_row = torch.zeros(1, 1, 2, end)
one_row[..., :2] = float("-inf")
dk = codec.decode(k_rows, torch.float32).view(end, b, 2, 16)
dv = codec.decode(v_rows, torch.float32).view(end, b, 2, 16)
ref = reference(q, dk, dv, one_row.expand(b, 1, 2, end), 16 ** -0.5)
out = triton_kv.attend_cuda(codec, q.to(DEV), k_rows.to(DEV), v_rows.to(DEV), one_row.to(DEV)).cpu().double()
assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), "a mask of one row for every row"
for bad in (torch.ones(b, 1, 2, end, dtype=torch.bool), torch.zeros(b, heads, 1, end)):
    try:
        triton_kv.attend_cuda(codec, q.to(DEV), k_rows.to(DEV), v_rows.to(DEV), bad.to(DEV))
    except AssertionError:
        continue
    raise AssertionError(f"a {bad.dtype} mask of {tuple(bad.shape)} was taken")

# A wide cache: a slot's stride times the slot passes 2**31 bytes (batch 256 of OPT-30B's 8-bit
# rows does past slot 1100), so the kernel's addresses must be 64-bit. One buffer of 2.4 GB,
# untouched but for the rows written (the keys in column 0, the values in column 1).
end, stride = 40, 60_000_000
wide = torch.empty(end * stride, dtype=torch.uint8, device=DEV)
rows = wide.as_strided((end, 2, codec.row_bytes), (stride, codec.row_bytes, 1))
rows.copy_(codec.encode(torch.randn(end, 2, codec.features, generator=g)).to(DEV))
k_wide, v_wide = rows[:, :1], rows[:, 1:]
dk = codec.decode(k_wide.cpu(), torch.float32).view(end, 1, 2, 16)
dv = codec.decode(v_wide.cpu(), torch.float32).view(end, 1, 2, 16)
mask = torch.zeros(1, 1, 2, end)
ref = reference(q[:1], dk, dv, mask, 16 ** -0.5)
out = triton_kv.attend_cuda(codec, q[:1].to(DEV), k_wide, v_wide, None).cpu().double()
assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), "slots past 2**31 bytes"
del wide, rows, k_wide, v_wide
print(f"all equal ({DEV})")
