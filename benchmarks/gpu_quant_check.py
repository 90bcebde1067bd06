"""On a GPU: the Triton dequantizer equals the PyTorch one bit for bit on awkward shapes, and its
speed on an OPT-30B MLP weight (7168 x 28672) against the bytes it must move."""
import sys

import torch
import triton.testing

sys.path.insert(0, "src")
from offloadgen.quant import QuantConfig, dequantize, quantize  # noqa: E402

ok = True
for bits in (4, 8):
    for group in (32, 64, 128):
        for rows, cols in ((7, 200), (1, 5), (300, 1000), (64, 4096)):
            w = torch.randn(rows, cols) * 0.05
            qt = quantize(w.cuda(), QuantConfig(bits, group))
            gpu = dequantize(qt, torch.float16)
            cpu_qt = type(qt)(qt.packed.cpu(), qt.scale.cpu(), qt.min.cpu(), qt.shape, qt.config)
            cpu = dequantize(cpu_qt, torch.float16)
            same = torch.equal(gpu.cpu(), cpu)
            ok &= same
            if not same:
                print(f"MISMATCH bits={bits} group={group} shape={rows}x{cols}")
print(f"triton dequantizer equals the PyTorch one on 24 shape/config cases: {ok}")
for bits in (4, 8):
    w = torch.randn(28672, 7168, device="cuda", dtype=torch.float16) * 0.02
    qt = quantize(w, QuantConfig(bits, 64))
    out = torch.empty_like(w)
    ms = triton.testing.do_bench(lambda: dequantize(qt, torch.float16, out=out), warmup=25, rep=200, return_mode="median")
    moved = out.numel() * 2 + qt.packed.numel() + qt.scale.numel() * 4
    print(f"dequantize {bits}-bit 28672x7168: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s moved "
          f"(vs its {qt.packed.numel() / 1e9 * 1e3 / 50:.1f} ms on a 50 GB/s bus)")
sys.exit(0 if ok else 1)
