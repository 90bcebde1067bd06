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


def cpu_read_bandwidth(nbytes: int = 2 << 30, repeats: int = 3) -> float:
    """Bytes/s that the CPU cores together read from RAM (a sum over a buffer far larger than the
    caches): the physical limit of attention computed on the CPU."""
    import time
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def cpu_attention_bandwidth(batch: int, kv_heads: int, q_heads: int, head_dim: int, seq: int,
                            dtype: torch.dtype = torch.float16, repeats: int = 3, quant_bits: int | None = None,
                            quant_group_size: int = 64) -> float:
    """Cache bytes/s that decode attention computed on the CPU gets through: the kernel the
    offloaded KV cache runs (offload/cpu_attention), on its slot-major layout (4/8-bit with
    quant_bits), for one micro-batch of `batch` rows. The cache is sized past the last-level cache
    and several layers are cycled so that reads hit RAM."""
    import time

    from ..offload.cpu_attention import attend, bias_from_mask
    from ..quant.kv import kv_quant
    codec = kv_quant(quant_bits, quant_group_size, kv_heads, head_dim)
    if codec is None:
        make = lambda: torch.randn(seq, batch, kv_heads, head_dim).to(dtype)  # noqa: E731
    else:
        make = lambda: codec.encode(torch.randn(seq, batch, kv_heads * head_dim))  # noqa: E731
    first = make()
    per_layer = 2 * first.numel() * first.element_size()
    layers = max(2, min(16, (1 << 30) // max(per_layer, 1)))
    k = [first] + [make() for _ in range(layers - 1)]
    v = [make() for _ in range(layers)]
    q = torch.randn(batch, q_heads, 1, head_dim).to(dtype)
    bias = bias_from_mask(None, seq, batch, q_heads // kv_heads)
    for i in range(layers):  # the first call compiles the kernel, or loads it from Numba's cache
        attend(q, k[i], v[i], seq, bias, quant=codec)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(layers):
            attend(q, k[i], v[i], seq, bias, quant=codec)
        best = min(best, time.perf_counter() - t0)
    return layers * per_layer / best
