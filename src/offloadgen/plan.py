"""`offloadgen plan`: before any weight is loaded, where everything would go and how fast a decode
step would be, for a range of batch sizes (the step model of docs/performance.md, with this
machine's bandwidths). Each row is runtime.plan_run with the same settings a run would use, so the
placement shown is the placement a run gets.

    step = max(streamed bytes / host-to-device bandwidth,
               GPU memory traffic / device memory bandwidth) + per-layer launch overhead

GPU memory traffic per step: every layer's dense weights read once per micro-batch (plus, when
quantized, the dequantized copy written and read), and the KV cache read once.
"""
from __future__ import annotations

import math

import torch

from .config import RunConfig
from .errors import OffloadgenError
from .machine import Calibration, GiB, cpu_attention_file, save_cpu_attention
from .models import block_nbytes, blocks, param_count
from .models.moe import is_expert_streamable
from .runtime import plan_run

LAUNCH_OVERHEAD_S = 40e-6  # per layer and micro-batch: a dozen kernel launches from Python


def predict(cfg, placement, batch: int, micro_batch: int | None, prompt_len: int, gen_len: int, elem: int,
            quant, cal: Calibration, kv_model: dict | None = None) -> dict:
    """The predicted decode step. With the KV cache in CPU memory, the bus also carries the cache
    of the micro-batches that attend on the GPU, and the CPU reads the rest (kv_model, from
    plan_kv_offload); the step is the longer of the two."""
    n_micro = math.ceil(batch / (micro_batch or batch))
    dense = sum(block_nbytes(cfg, b, elem) for b in blocks(cfg) if isinstance(b, int))
    traffic = dense * n_micro + (2 * dense if quant is not None else 0) + placement.bytes["kv_cache"]
    bus = placement.bus_bytes_per_step / cal.h2d_bytes_s
    cpu = 0.0
    if kv_model and kv_model.get("predicted_bus_s") is not None:
        bus, cpu = kv_model["predicted_bus_s"], kv_model["predicted_cpu_attention_s"]
    gpu = traffic / cal.device_bytes_s
    step = max(bus, gpu, cpu) + cfg.n_layers * n_micro * LAUNCH_OVERHEAD_S
    bound = "bus" if bus >= max(gpu, cpu) else "CPU attention" if cpu >= gpu else "GPU memory"
    return {"step_s": step, "bus_s": bus, "gpu_s": gpu, "cpu_s": cpu, "bound": bound, "tokens_s": batch / step}


def cpu_attention_figure(cal: Calibration, config: RunConfig, model_cfg, dtype: torch.dtype, rows: int) -> str | None:
    """With an offloaded KV cache split by the step model: the CPU's attention bandwidth for the
    whole table, from this machine's saved figure, else probed once now (a second or two, on this
    model's shapes) and saved for the next plan; a run probes its own. Sets it in cal; returns
    the line that says it and where it came from (None where the plan needs none)."""
    if not config.kv_offload or config.kv_attention != "auto":
        return None
    bits = str(config.kv_quant_bits)
    source = f"saved in {cpu_attention_file()}"
    if bits not in cal.cpu_attention_bytes_s:
        cal.cpu_attention_bytes_s[bits] = _probe_cpu_attention(config, model_cfg, dtype, rows)
        save_cpu_attention(config.kv_quant_bits, cal.cpu_attention_bytes_s[bits])
        source = "probed now; " + source
    return f"CPU attention over the offloaded KV cache: {cal.cpu_attention_bytes_s[bits] / 1e9:.1f} GB/s ({source})"


def _probe_cpu_attention(config: RunConfig, model_cfg, dtype: torch.dtype, rows: int) -> float:
    from .models import family_of
    from .offload.kv_cache import probe_cpu_attention_bandwidth
    kv_heads, head_dim = family_of(model_cfg).kv_heads(model_cfg)
    quant = config.kv_quant() or (None, 64)
    seq = min(config.max_seq_len or 2048, model_cfg.max_position)
    return probe_cpu_attention_bandwidth(rows, kv_heads, model_cfg.n_heads, head_dim, seq, dtype, repeats=2,
                                         quant_bits=quant[0], quant_group_size=quant[1])


def plan_table(config: RunConfig, model_cfg, batches: list[int], cal: Calibration, host_available: int) -> list[dict]:
    """One row per batch size: the run's plan (or why it cannot run) and its predicted step."""
    device = torch.device(config.device or "cuda")  # planned for a GPU even where there is none
    cpu_attention = cal.cpu_attention_bytes_s.get(str(config.kv_quant_bits))
    rows = []
    for batch in batches:
        row = {"batch": batch}
        try:
            plan = plan_run(config.replace(max_batch_size=batch), model_cfg, device, h2d_bytes_s=cal.h2d_bytes_s,
                            host_available=host_available, cpu_attention_bytes_s=cpu_attention)
        except OffloadgenError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        elem = torch.empty((), dtype=plan.dtype).element_size()
        row.update(placement=plan.placement, kv=plan.kv_model, moe=moe_columns(config, model_cfg, plan, batch),
                   **predict(model_cfg, plan.placement, batch, config.micro_batch_size, plan.max_prompt_len,
                             plan.max_seq_len - plan.max_prompt_len, elem, plan.quant, cal, plan.kv_model))
        rows.append(row)
    return rows


def moe_columns(config: RunConfig, model_cfg, plan, batch: int) -> tuple[int, int] | None:
    """An MoE model's bytes per decode step both ways, whichever the plan chose: whole layers, and
    trunks plus the routed experts the expert cache misses (None for other models, or where
    nothing streams)."""
    p = plan.placement
    if not is_expert_streamable(model_cfg) or p is None or not p.streamed:
        return None
    if p.expert_streaming:
        return p.bytes["whole_per_step"], p.bytes["routed_per_step"]
    other = plan_run(config.replace(max_batch_size=batch, expert_streaming="on"), model_cfg, plan.device,
                     h2d_bytes_s=(plan.kv_model or {}).get("h2d_bytes_s"), host_available=1 << 60).placement
    return p.streamed_bytes, other.bus_bytes_per_step if other.expert_streaming else None


def print_plan(cfg, name: str, rows: list[dict], cal: Calibration, budget: int, host_available: int, quant,
               dtype: torch.dtype, out, cpu_attention: str | None = None) -> None:
    kind = f"{str(dtype).removeprefix('torch.')} ({torch.empty((), dtype=dtype).element_size()} bytes a value)"
    weights = f"{quant.bits}-bit weights in groups of {quant.group_size}, computing in {kind}" if quant else kind
    print(f"{name}: {param_count(cfg) / 1e9:.1f}B parameters, {weights}; GPU budget {budget / GiB:.1f} GiB, "
          f"CPU RAM available {host_available / GiB:.1f} GiB", file=out)
    print(f"bandwidths: host-to-device {cal.h2d_bytes_s / 1e9:.1f} GB/s, device memory {cal.device_bytes_s / 1e12:.2f} TB/s "
          f"({cal.source})", file=out)
    if cpu_attention:
        print(cpu_attention, file=out)
    moe = any(r.get("moe") for r in rows)
    print(f"{'batch':>5s} {'resident':>8s} {'streamed':>8s} {'GB/step':>8s} {'KV GiB':>7s} {'step s':>7s} {'bound':>10s} "
          f"{'tokens/s':>9s}" + ("  whole layers / routed experts GB per step (*: chosen)" if moe else ""), file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:5d}  does not fit: {r['error']}", file=out)
            continue
        p = r["placement"]
        kv = f"{p.bytes['kv_host'] / GiB:5.1f}C" if "kv_host" in p.bytes else f"{p.bytes['kv_cache'] / GiB:6.2f}"
        print(f"{r['batch']:5d} {len(p.resident):8d} {len(p.streamed):8d} {p.bus_bytes_per_step / 1e9:8.2f} "
              f"{kv:>7s} {r['step_s']:7.3f} {r['bound']:>10s} {r['tokens_s']:9.2f}" + _moe_cell(r), file=out)
    fits = [r["batch"] for r in rows if "error" not in r]
    if fits:
        best = max((r for r in rows if "error" not in r), key=lambda r: r["tokens_s"])
        print(f"largest batch that fits: {max(fits)}; fastest: batch {best['batch']} at {best['tokens_s']:.1f} tokens/s",
              file=out)
    else:
        print("nothing fits: lower the batch size or prompt length, quantize, or raise --gpu-memory", file=out)
    if any("kv_host" in r["placement"].bytes for r in rows if "error" not in r):
        print("KV GiB ending in C: the cache in CPU RAM (--kv-offload)", file=out)


def _moe_cell(r: dict) -> str:
    if not r.get("moe"):
        return ""
    whole, routed = r["moe"]
    chosen = r["placement"].expert_streaming
    return (f"  {whole / 1e9:8.2f}{'' if chosen else '*'} / " +
            ("-" if routed is None else f"{routed / 1e9:.2f}{'*' if chosen else ''}"))
