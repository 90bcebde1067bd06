"""The fixed cost of one CPU attention call over a 4-bit cache, apart from reading the cache: one
micro-batch of OPT-30B's shape (8 rows x 56 heads x 128) at context 1, best of 30 rounds of 50
calls. A decode step with the cache in CPU RAM makes one call per layer and CPU micro-batch (48 x
32 at batch 256), so a tenth of a millisecond here is 0.15 s a step.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/cpu_call_overhead.py [--end 1]
"""
import argparse
import time

import torch

from offloadgen.offload.cpu_attention import attend, bias_from_mask
from offloadgen.quant.kv import kv_quant

ap = argparse.ArgumentParser()
ap.add_argument("--end", type=int, default=1, help="slots attended (1: the call's fixed cost)")
ap.add_argument("--bits", type=int, default=4)
args = ap.parse_args()
b, h, d, end = 8, 56, 128, args.end
codec = kv_quant(args.bits, 64, h, d)
q = torch.randn(b, h, 1, d, dtype=torch.float16)
x = torch.randn(end, b, h * d, dtype=torch.float16)
k, v = codec.encode(x), codec.encode(x)
bias = bias_from_mask(torch.zeros(b, 1, 1, end), end)
for _ in range(20):
    attend(q, k, v, end, bias, None, quant=codec)
best = float("inf")
for _ in range(30):
    t0 = time.perf_counter()
    for _ in range(50):
        attend(q, k, v, end, bias, None, quant=codec)
    best = min(best, (time.perf_counter() - t0) / 50)
print(f"{args.bits}-bit cache, batch {b} x {h} heads x {d}, context {end}, {torch.get_num_threads()} threads: "
      f"{best * 1e3:.4f} ms a call (best of 30 x 50)")
