"""`offloadgen plan`: before any weight is loaded, where everything would go and how fast a decode
step would be, for a range of batch sizes (DESIGN.md's model with this machine's bandwidths).

    step = max(streamed bytes / host-to-device bandwidth,
               GPU memory traffic / device memory bandwidth) + per-layer launch overhead

GPU memory traffic per step: every layer's dense weights read once per micro-batch (plus, when
quantized, the dequantized copy written and read), and the KV cache read once.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import OffloadgenError
from .models import block_nbytes, blocks, param_count
from .offload.placement import GiB, plan_placement

LAUNCH_OVERHEAD_S = 40e-6  # per layer and micro-batch: a dozen kernel launches from Python


@dataclass
class Calibration:
    h2d_bytes_s: float
    device_bytes_s: float
    source: str


def calibration_file() -> Path:
    from .checkpoint.gguf import cache_root
    return cache_root() / "calibration.json"


def measure_calibration(device: torch.device) -> Calibration:
    from .bench.hardware import h2d_bandwidth
    h2d = h2d_bandwidth(device)["best"]
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    dev = 2 * 10 * a.numel() / (time.perf_counter() - t0)  # bytes read + written
    del a, b
    torch.cuda.empty_cache()
    cal = Calibration(h2d, dev, f"measured on {torch.cuda.get_device_name(device)} at {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        calibration_file().parent.mkdir(parents=True, exist_ok=True)
        calibration_file().write_text(json.dumps(asdict(cal)))
    except OSError:
        pass
    return cal


def load_calibration(h2d_override: float | None = None) -> Calibration:
    if torch.cuda.is_available():
        cal = measure_calibration(torch.device("cuda"))
    elif calibration_file().is_file():
        cal = Calibration(**json.loads(calibration_file().read_text()))
        cal.source = f"{calibration_file()} ({cal.source})"
    else:
        cal = Calibration(25e9, 2e12, "assumed: PCIe Gen4 x16 and 2 TB/s device memory (no GPU here, no calibration "
                                      "file; run `offloadgen plan` once on the GPU machine to measure)")
    if h2d_override:
        cal = Calibration(h2d_override, cal.device_bytes_s, "given with --h2d-bandwidth")
    return cal


def meminfo(field: str) -> int | None:
    """A field of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    available = meminfo("MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_host_memory(placement, available: int | None = None, quantized: bool = False) -> None:
    """Streamed blocks (and an offloaded KV cache) live in CPU RAM: refuse before loading if they
    cannot fit."""
    kv = placement.bytes.get("kv_host", 0)
    weights = 0 if placement.bytes.get("weights_on_disk") else placement.streamed_bytes
    need = weights + kv + GiB  # and a little for buffers and Python
    available = available if available is not None else available_host_memory()
    if need > available:
        if kv:
            raise OffloadgenError(f"the offloaded KV cache needs {kv / GiB:.1f} GiB of CPU RAM and the streamed weights "
                                  f"{weights / GiB:.1f} GiB, {need / GiB:.1f} GiB in all; {available / GiB:.1f} GiB is "
                                  f"available: lower the batch size, or the prompt or generation length")
        hint = "" if quantized else "quantize (--quant-bits 4), "
        raise OffloadgenError(f"the streamed weights need {need / GiB:.1f} GiB of CPU RAM, {available / GiB:.1f} GiB "
                              f"is available: {hint}give the GPU a larger budget, or free memory")


def predict(cfg, placement, batch: int, micro_batch: int | None, prompt_len: int, gen_len: int, elem: int,
            quant, cal: Calibration) -> dict:
    n_micro = math.ceil(batch / (micro_batch or batch))
    dense = sum(block_nbytes(cfg, b, elem) for b in blocks(cfg) if isinstance(b, int))
    traffic = dense * n_micro + (2 * dense if quant is not None else 0) + placement.bytes["kv_cache"]
    bus = placement.streamed_bytes / cal.h2d_bytes_s
    gpu = traffic / cal.device_bytes_s
    step = max(bus, gpu) + cfg.n_layers * n_micro * LAUNCH_OVERHEAD_S
    return {"step_s": step, "bus_s": bus, "gpu_s": gpu, "bound": "bus" if bus >= gpu else "GPU memory",
            "tokens_s": batch / step}


def plan_table(cfg, budget: int, batches: list[int], prompt_len: int, gen_len: int, elem: int, quant,
               micro_batch: int | None, cal: Calibration, host_available: int, offload: bool = True) -> list[dict]:
    rows = []
    for batch in batches:
        row = {"batch": batch}
        try:
            p = plan_placement(cfg, elem, budget, batch, prompt_len, gen_len, micro_batch, offload=offload, quant=quant)
            check_host_memory(p, host_available, quantized=quant is not None)
        except OffloadgenError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row.update(placement=p, **predict(cfg, p, batch, micro_batch, prompt_len, gen_len, elem, quant, cal))
        rows.append(row)
    return rows


def print_plan(cfg, name: str, rows: list[dict], cal: Calibration, budget: int, host_available: int, quant, out) -> None:
    bits = f"{quant.bits}-bit, group {quant.group_size}" if quant else "16-bit"
    print(f"{name}: {param_count(cfg) / 1e9:.1f}B parameters, {bits}; GPU budget {budget / GiB:.1f} GiB, "
          f"CPU RAM available {host_available / GiB:.1f} GiB", file=out)
    print(f"bandwidths: host-to-device {cal.h2d_bytes_s / 1e9:.1f} GB/s, device memory {cal.device_bytes_s / 1e12:.2f} TB/s "
          f"({cal.source})", file=out)
    print(f"{'batch':>5s} {'resident':>8s} {'streamed':>8s} {'GB/step':>8s} {'KV GiB':>7s} {'step s':>7s} {'bound':>10s} "
          f"{'tokens/s':>9s}", file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:5d}  does not fit: {r['error']}", file=out)
            continue
        p = r["placement"]
        print(f"{r['batch']:5d} {len(p.resident):8d} {len(p.streamed):8d} {p.streamed_bytes / 1e9:8.2f} "
              f"{p.bytes['kv_cache'] / GiB:7.2f} {r['step_s']:7.3f} {r['bound']:>10s} {r['tokens_s']:9.2f}", file=out)
    fits = [r["batch"] for r in rows if "error" not in r]
    if fits:
        best = max((r for r in rows if "error" not in r), key=lambda r: r["tokens_s"])
        print(f"largest batch that fits: {max(fits)}; fastest: batch {best['batch']} at {best['tokens_s']:.1f} tokens/s",
              file=out)
    else:
        print("nothing fits: lower the batch size or prompt length, quantize, or raise --gpu-memory", file=out)
