"""Facts about this machine that plans and defaults come from: memory, link bandwidths, folders.

The lowest layer of the package: it imports nothing of offloadgen's but errors, so every other
module may ask it. Probes are quick (well under a second each) and are taken in the same run as
whatever they are compared with, because a lent machine's links vary between leases
(docs/performance.md records how much).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GiB = 1 << 30


def cache_root() -> Path:
    """Where converted GGUF models, quantized blocks and the bandwidth calibration are kept."""
    return Path(os.environ.get("OFFLOADGEN_CACHE", Path.home() / ".cache" / "offloadgen"))


def meminfo(field: str) -> int | None:
    """A field of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_host_memory() -> int:
    """MemAvailable (what can be allocated without swapping)."""
    available = meminfo("MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def node_memory_used() -> int | None:
    """MemTotal - MemAvailable: what this node's processes hold, shared memory (/dev/shm) included,
    counted once however many processes map it (None where there is no /proc/meminfo)."""
    total, available = meminfo("MemTotal"), meminfo("MemAvailable")
    return None if total is None or available is None else total - available


def peak_rss_bytes() -> int:
    """This process's peak resident set (shared pages it touched included)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def page_cache_bytes() -> int | None:
    """The kernel's page cache (Cached), to show that weights read from disk did not land in it."""
    return meminfo("Cached")


def default_gpu_budget(device: torch.device) -> int | None:
    """The card's free memory less a margin for the CUDA context's own growth and fragmentation;
    None off the GPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free - max(1 * GiB, 0.05 * free))


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


def device_memory_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize(device)
    rate = 2 * repeats * nbytes / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return rate


def dense_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float16, n: int = 8192,
                       repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul on the device: what a compute-bound prefill can reach."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    rate = 2 * n ** 3 * repeats / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return rate


def cpu_read_bandwidth(nbytes: int = 2 << 30, repeats: int = 3) -> float:
    """Bytes/s that the CPU cores together read from RAM (a sum over a buffer far larger than the
    caches): the physical limit of attention computed on the CPU."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


@dataclass
class Calibration:
    """The bandwidths the step model needs, and where they came from. cpu_attention_bytes_s: what
    decode attention on this machine's CPU reads per second from an offloaded KV cache, by the
    cache's bits ("16", "8", "4"): probed once per machine (plan.cpu_attention_figure) and kept in
    cpu_attention_file(), apart from the GPU figures, which may come from another machine."""
    h2d_bytes_s: float
    device_bytes_s: float
    source: str
    cpu_attention_bytes_s: dict = field(default_factory=dict)


def calibration_file() -> Path:
    return cache_root() / "calibration.json"


def cpu_attention_file() -> Path:
    return cache_root() / "cpu_attention.json"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else


def save_cpu_attention(bits: int, bytes_s: float) -> None:
    figures = _read_json(cpu_attention_file())
    figures = figures if isinstance(figures, dict) else {}
    _write_json(cpu_attention_file(), {**figures, str(bits): bytes_s})


def links_file() -> Path:
    return cache_root() / "links.json"


def save_link_figures(ranks: int, h2d_aggregate_bytes_s: float, allgather_bytes_s: float, source: str) -> None:
    """Keep what a run of `ranks` GPUs measured of its links (distributed.probe_links, from
    `bench --num-gpus-per-node N`), so that `offloadgen plan`, one process, can predict such a run."""
    figures = _read_json(links_file())
    figures = figures if isinstance(figures, dict) else {}
    figures[str(ranks)] = {"h2d_aggregate_bytes_s": h2d_aggregate_bytes_s, "allgather_bytes_s": allgather_bytes_s,
                           "source": source}
    _write_json(links_file(), figures)


def load_link_figures(ranks: int) -> dict | None:
    """The last figures saved for `ranks` GPUs, or None (also for a file that is not what
    save_link_figures writes: json reads Infinity and true as numbers, which would make a step of 0 s)."""
    figures = _read_json(links_file())
    mine = figures.get(str(ranks)) if isinstance(figures, dict) else None
    if not isinstance(mine, dict) or not all(_a_rate(mine.get(k)) for k in ("h2d_aggregate_bytes_s", "allgather_bytes_s")):
        return None
    return mine


def _a_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def measure_calibration(device: torch.device) -> Calibration:
    """Measure both links now and save them, so that planning on a machine without a GPU can use
    the last GPU machine's figures."""
    cal = Calibration(h2d_bandwidth(device)["best"], device_memory_bandwidth(device),
                      f"measured on {torch.cuda.get_device_name(device)} at {time.strftime('%Y-%m-%d %H:%M')}")
    _write_json(calibration_file(), {k: v for k, v in asdict(cal).items() if k != "cpu_attention_bytes_s"})
    return cal


def load_calibration(h2d_override: float | None = None) -> Calibration:
    """Measured on this GPU; else the saved figures of the last GPU run; else an assumption that
    says it is one (PCIe Gen4 x16, 2 TB/s). With this machine's saved CPU attention figures."""
    cal = None
    if torch.cuda.is_available():
        cal = measure_calibration(torch.device("cuda"))
    elif calibration_file().is_file():
        try:
            cal = Calibration(**_read_json(calibration_file()))
            cal.source = f"{calibration_file()} ({cal.source})"
        except TypeError:
            cal = None
    if cal is None:
        cal = Calibration(25e9, 2e12, "assumed: PCIe Gen4 x16 and 2 TB/s device memory (no GPU here, no calibration "
                                      "file; run `offloadgen plan` once on the GPU machine to measure)")
    if h2d_override:
        cal = Calibration(h2d_override, cal.device_bytes_s, "given with --h2d-bandwidth")
    figures = _read_json(cpu_attention_file())
    cal.cpu_attention_bytes_s = {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and v > 0} \
        if isinstance(figures, dict) else {}
    return cal
