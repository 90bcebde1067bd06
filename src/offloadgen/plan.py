"""`offloadgen plan`: before any weight is loaded, where everything would go and how fast a decode
step would be, for a range of batch sizes (the step model of docs/performance.md, with this
machine's bandwidths). Each row is runtime.plan_run with the same settings a run would use, so the
placement shown is the placement a run gets.

    step = max(streamed bytes / host-to-device bandwidth,
               GPU memory traffic / device memory bandwidth) + per-layer launch overhead

GPU memory traffic per step: every layer's dense weights read once per micro-batch (plus, when
quantized, the dequantized copy written and read), and the KV cache read once.

With N ranks (Links; docs/distributed.md) each link has its own term, and the two run at once
(host copies and all-gathers are on two CUDA streams, offload/streaming.py):

    PCIe:   bytes each rank copies / (all N host links' total / N)
    NVLink: (N - 1)/N x bytes gathered per rank / the all-gather rate (bytes a rank receives per second)
    step = max(PCIe, NVLink, GPU memory traffic, CPU attention) + per-layer launch overhead
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import RunConfig
from .errors import OffloadgenError
from .distributed import World
from .machine import Calibration, GiB, cpu_attention_file, load_link_figures, save_cpu_attention
from .models import block_nbytes, blocks, param_count
from .models.moe import is_expert_streamable
from .runtime import plan_run

LAUNCH_OVERHEAD_S = 40e-6  # per layer and micro-batch: a dozen kernel launches from Python


# The all-gather rate assumed where none was probed: on the node of 4 H100s (NVLink between every
# pair), the pooled fp16 copy-only pass received 44.4 GB per rank in 0.248 s with host copies and
# gathers on two queues, 179 GB/s (benchmarks/RESULTS.md, 2026-11-26 night, "Several GPUs").
ASSUMED_ALLGATHER_BYTES_S = 179e9


@dataclass
class Links:
    """The links a run of `ranks` GPUs fetches its weights over, as the step model takes them.
    h2d_aggregate_bytes_s: all host links together while every GPU copies at once; None: assumed
    to be ranks x the calibration's one-link figure. allgather_bytes_s: what an NCCL all-gather
    delivers to each rank per second; None: ASSUMED_ALLGATHER_BYTES_S. source, allgather_source:
    where the measured figures come from. gather: --weight-gather (copy: timed at the all-gather's rate)."""
    ranks: int = 1
    fetch: str = "whole"
    h2d_aggregate_bytes_s: float | None = None
    allgather_bytes_s: float | None = None
    source: str = ""
    allgather_source: str = ""
    gather: str = "nccl"

    @property
    def shards(self) -> int:
        """Parts each streamed block is copied in, one per rank's link (whole: 1, every rank copies all)."""
        return self.ranks if self.fetch != "whole" else 1

    def per_link_bytes_s(self, cal: Calibration) -> float:
        return self.h2d_aggregate_bytes_s / self.ranks if self.h2d_aggregate_bytes_s else cal.h2d_bytes_s

    def allgather_rate(self) -> float:
        return self.allgather_bytes_s or ASSUMED_ALLGATHER_BYTES_S

    def describe(self, cal: Calibration) -> str | None:
        """The line that says which figures the plan used, and which it assumed (None for one rank)."""
        if self.ranks == 1:
            return None
        if self.h2d_aggregate_bytes_s:
            host = f"host links {self.h2d_aggregate_bytes_s / 1e9:.1f} GB/s together ({self.source})"
        else:
            host = (f"host links assumed {self.ranks} x {cal.h2d_bytes_s / 1e9:.1f} GB/s (the one-link figure each; "
                    f"not measured with {self.ranks} copying at once)")
        if self.fetch == "whole":
            return f"{self.ranks} GPUs, --weight-fetch whole: each copies every streamed layer; {host}"
        nv = (f"all-gather {self.allgather_bytes_s / 1e9:.1f} GB/s received per GPU ({self.allgather_source})"
              if self.allgather_bytes_s else f"NVLink unmeasured: all-gather assumed {ASSUMED_ALLGATHER_BYTES_S / 1e9:.0f} "
                                             "GB/s received per GPU (4 H100s, benchmarks/RESULTS.md)")
        if self.gather == "copy":  # the step model has no figure of its own for the copy engines
            nv += "; --weight-gather copy: parts gathered by copies, timed here at the all-gather's rate"
        return f"{self.ranks} GPUs, --weight-fetch {self.fetch}: {host}; {nv}"


def link_bytes(placement, ranks: int, fetch: str) -> dict:
    """Weight bytes each rank moves per decode step over its host link (PCIe) and receives from its
    peers (NVLink): with allgather and pool a rank copies 1/N of each streamed block and gathers the
    other (N - 1)/N of every streamed and pooled block."""
    if placement is None:
        return {}
    shards = ranks if fetch != "whole" else 1
    gathered = placement.streamed_bytes + placement.bytes.get("pooled_per_rank", 0) * ranks
    return {"pcie_bytes_per_step_per_rank": placement.bus_bytes_per_step / shards, "pooled_blocks": len(placement.pooled),
            "nvlink_bytes_per_step_per_rank": (shards - 1) / shards * gathered if shards > 1 else 0}


def predict(cfg, placement, batch: int, micro_batch: int | None, prompt_len: int, gen_len: int, elem: int,
            quant, cal: Calibration, kv_model: dict | None = None, links: Links | None = None) -> dict:
    """The predicted decode step of one rank of `links.ranks` (batch: its rows; tokens_s: all
    ranks'). With the KV cache in CPU memory, the bus also carries the cache of the micro-batches
    that attend on the GPU, and the CPU reads the rest (kv_model, from plan_kv_offload)."""
    links = links or Links()
    n_micro = math.ceil(batch / (micro_batch or batch))
    dense = sum(block_nbytes(cfg, b, elem) for b in blocks(cfg) if isinstance(b, int))
    traffic = dense * n_micro + (2 * dense if quant is not None else 0) + placement.bytes["kv_cache"]
    moved = link_bytes(placement, links.ranks, links.fetch)
    pcie_bytes, cpu = moved["pcie_bytes_per_step_per_rank"], 0.0
    if kv_model and kv_model.get("predicted_bus_s") is not None:
        pcie_bytes += kv_model["gpu_parts"] / kv_model["parts"] * kv_model["cache_bytes_per_step"]
        cpu = kv_model["predicted_cpu_attention_s"]
    bus = pcie_bytes / links.per_link_bytes_s(cal)
    nvlink = moved["nvlink_bytes_per_step_per_rank"] / links.allgather_rate()
    gpu = traffic / cal.device_bytes_s
    step = max(bus, nvlink, gpu, cpu) + cfg.n_layers * n_micro * LAUNCH_OVERHEAD_S
    bound = max((bus, "bus"), (nvlink, "NVLink"), (cpu, "CPU attention"), (gpu, "GPU memory"), key=lambda t: t[0])[1]
    return {"step_s": step, "bus_s": bus, "nvlink_s": nvlink, "gpu_s": gpu, "cpu_s": cpu, "bound": bound,
            "tokens_s": links.ranks * batch / step, **moved}


def plan_links(ranks: int, fetch: str, allgather_override: float | None = None, gather: str = "nccl") -> Links:
    """What the plan knows of a run of `ranks` GPUs' links: the figures the last
    `bench --num-gpus-per-node N` on this machine saved (machine.save_link_figures), else
    assumptions that Links.describe names; --allgather-bandwidth overrides the all-gather rate."""
    saved = load_link_figures(ranks) if ranks > 1 else None
    links = Links(ranks, fetch, gather=gather)
    if saved:
        source = f"measured by bench: {saved.get('source', '?')}"
        links = Links(ranks, fetch, saved["h2d_aggregate_bytes_s"], saved["allgather_bytes_s"], source, source, gather)
    if allgather_override:
        links.allgather_bytes_s, links.allgather_source = allgather_override, "given with --allgather-bandwidth"
    return links


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


def plan_table(config: RunConfig, model_cfg, batches: list[int], cal: Calibration, host_available: int,
               links: Links | None = None) -> list[dict]:
    """One row per batch size (rows per rank): the run's plan (or why it cannot run) and its
    predicted step. With links of several ranks, each rank's plan, as rank 0 of such a run gets it
    (pooled layers, the node's CPU RAM shared)."""
    links = links or Links(fetch=config.weight_fetch)
    world = World(size=links.ranks, local_size=links.ranks)
    device = torch.device(config.device or "cuda")  # planned for a GPU even where there is none
    cpu_attention = cal.cpu_attention_bytes_s.get(str(config.kv_quant_bits))
    rows = []
    for batch in batches:
        row = {"batch": batch}
        try:
            plan = plan_run(config.replace(max_batch_size=batch), model_cfg, device, world, h2d_bytes_s=cal.h2d_bytes_s,
                            host_available=host_available, cpu_attention_bytes_s=cpu_attention)
        except OffloadgenError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        elem = torch.empty((), dtype=plan.dtype).element_size()
        row.update(placement=plan.placement, kv=plan.kv_model, moe=moe_columns(config, model_cfg, plan, batch),
                   **predict(model_cfg, plan.placement, batch, config.micro_batch_size, plan.max_prompt_len,
                             plan.max_seq_len - plan.max_prompt_len, elem, plan.quant, cal, plan.kv_model, links))
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
               dtype: torch.dtype, out, cpu_attention: str | None = None, links: Links | None = None) -> None:
    links = links or Links()
    kind = f"{str(dtype).removeprefix('torch.')} ({torch.empty((), dtype=dtype).element_size()} bytes a value)"
    weights = f"{quant.bits}-bit weights in groups of {quant.group_size}, computing in {kind}" if quant else kind
    print(f"{name}: {param_count(cfg) / 1e9:.1f}B parameters, {weights}; GPU budget {budget / GiB:.1f} GiB, "
          f"CPU RAM available {host_available / GiB:.1f} GiB", file=out)
    print(f"bandwidths: host-to-device {cal.h2d_bytes_s / 1e9:.1f} GB/s, device memory {cal.device_bytes_s / 1e12:.2f} TB/s "
          f"({cal.source})", file=out)
    if cpu_attention:
        print(cpu_attention, file=out)
    if links.ranks > 1:
        print(links.describe(cal), file=out)
    moe = any(r.get("moe") for r in rows)
    print(f"{'batch':>5s} {'resident':>8s} {'streamed':>8s} {'GB/step':>8s} {'KV GiB':>7s} {'step s':>7s} {'bound':>10s} "
          f"{'tokens/s':>9s}" + ("  whole layers / routed experts GB per step (*: chosen)" if moe else "")
          + (f" {'pooled':>6s} {'PCIe GB':>8s} {'NVLink GB':>9s} {'PCIe s':>7s} {'NVLink s':>8s}" if links.ranks > 1 else ""),
          file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:5d}  does not fit: {r['error']}", file=out)
            continue
        p = r["placement"]
        kv = f"{p.bytes['kv_host'] / GiB:5.1f}C" if "kv_host" in p.bytes else f"{p.bytes['kv_cache'] / GiB:6.2f}"
        print(f"{r['batch']:5d} {len(p.resident):8d} {len(p.streamed):8d} {p.bus_bytes_per_step / 1e9:8.2f} "
              f"{kv:>7s} {r['step_s']:7.3f} {r['bound']:>10s} {r['tokens_s']:9.2f}" + _moe_cell(r)
              + (_links_cells(r) if links.ranks > 1 else ""), file=out)
    fits = [r["batch"] for r in rows if "error" not in r]
    if fits:
        best = max((r for r in rows if "error" not in r), key=lambda r: r["tokens_s"])
        print(f"largest batch that fits: {max(fits)}; fastest: batch {best['batch']} at {best['tokens_s']:.1f} tokens/s",
              file=out)
    else:
        print("nothing fits: lower the batch size or prompt length, quantize, or raise --gpu-memory", file=out)
    if any("kv_host" in r["placement"].bytes for r in rows if "error" not in r):
        print("KV GiB ending in C: the cache in CPU RAM (--kv-offload)", file=out)
    if links.ranks > 1:
        print(f"per GPU: batch (its rows), resident, streamed, KV; tokens/s: all {links.ranks} GPUs together; PCIe GB and "
              f"NVLink GB: weight bytes each GPU copies and receives a step, in PCIe s and NVLink s (at once)", file=out)


def _links_cells(r: dict) -> str:
    return (f" {r['pooled_blocks']:6d} {r['pcie_bytes_per_step_per_rank'] / 1e9:8.2f} "
            f"{r['nvlink_bytes_per_step_per_rank'] / 1e9:9.2f} {r['bus_s']:7.3f} {r['nvlink_s']:8.3f}")


def _moe_cell(r: dict) -> str:
    if not r.get("moe"):
        return ""
    whole, routed = r["moe"]
    chosen = r["placement"].expert_streaming
    return (f"  {whole / 1e9:8.2f}{'' if chosen else '*'} / " +
            ("-" if routed is None else f"{routed / 1e9:.2f}{'*' if chosen else ''}"))
