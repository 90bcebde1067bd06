"""Quick measurements of the links, taken in the same run as the benchmark they are compared with."""
from __future__ import annotations

import torch


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> dict | None:
    """Host-to-device bytes/s from pinned memory: median and best of `repeats` copies after a
    warm-up; None without CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i:  # the first copy warms up
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return {"median": nbytes / times[len(times) // 2], "best": nbytes / times[0]}
