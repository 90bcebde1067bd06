"""The links a multi-GPU run depends on, measured in one process: pinned host-to-device copies to
1, 2 and N GPUs at once (one thread per GPU, 2 GiB each), and device-to-device copies between GPU
0 and each other GPU (NVLink where there is one). Prints one JSON line (and writes it to $OUT).

    python benchmarks/link_probe.py
"""
import json
import os
import time

import torch
from link_patterns import together

GiB = 1 << 30


def h2d_together(n: int, nbytes: int = 2 * GiB, repeats: int = 3) -> float:
    """Total bytes/s when n GPUs each copy nbytes from their own pinned buffer at the same time."""
    srcs = [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in range(n)]
    dsts = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]
    return n * nbytes / together(n, lambda i: dsts[i].copy_(srcs[i], non_blocking=True), repeats)


def d2d(src: int, dst: int, nbytes: int = GiB, repeats: int = 5) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src}")
    b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst}")
    b.copy_(a)
    torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
    return repeats * nbytes / (time.perf_counter() - t0)


n = torch.cuda.device_count()
counts = sorted({1, 2, n} & set(range(1, n + 1)))
result = {"gpus": n, "h2d_total_bytes_s": {k: h2d_together(k) for k in counts},
          "d2d_from_0_bytes_s": {j: d2d(0, j) for j in range(1, n)}}
print(json.dumps(result))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "link_probe.json"), "w") as f:
        json.dump(result, f)
