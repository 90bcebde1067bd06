"""run_generation, as the reference defines it: fixed-length prompts, `loops` timed generations,
prefill timed apart from decode, the reference's metrics printed and appended to a log file,
plus a JSON record per run with what the reference does not say (placement, bus limit, start-up).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__, distributed
from ..api import resolve_dtype
from ..checkpoint import open_checkpoint
from ..engine import Engine
from ..errors import OffloadgenError
from ..models import param_count
from ..offload import ResidentWeights
from ..offload import pinned as pinned_mod
from ..offload.kv_cache import KVOffload
from ..offload.disk import page_cache_bytes
from ..offload.placement import GiB, all_resident, disk_placement_on_cpu, plan_kv_offload, plan_placement
from ..plan import check_host_memory
from ..quant import QuantConfig
from ..offload.streaming import StreamingWeights
from ..sampling import SamplingParams
from .hardware import cpu_read_bandwidth, h2d_bandwidth
from .metrics import Metrics, SummedMetrics, cache_bytes, hidden_bytes, log_filename, log_lines

PROMPT = "Paris is the capital city of"


@dataclass
class BenchArgs:
    model: str = "facebook/opt-1.3b"
    dummy: bool = False
    batch_size: int = 1
    prompt_len: int = 512
    gen_len: int = 32
    cpu_offload: bool = False
    disk_offload: bool = False
    offload_dir: str = "~/offload_dir"
    kv_offload: bool = False
    pin_kv_cache: bool = False
    async_kv_offload: bool = False
    kv_attention: str = "auto"  # where decode attention over an offloaded cache runs: auto, cpu, gpu
    quant_bits: int = 16
    quant_group_size: int = 64
    pin_memory: int = 1
    num_nodes: int = 1
    num_gpus_per_node: int = 1
    output_file: str = "auto"
    verbose: int = 2
    loops: int = 2
    gpu_memory: int | None = None  # bytes; None: what the card has free, less a margin
    micro_batch_size: int | None = None
    prefetch_depth: int = 1
    device: str | None = None
    dtype: str = "float16"
    json_file: str | None = None  # default: the log file's name with .jsonl
    weight_fetch: str = "whole"  # several ranks: each copies whole layers, or 1/N and all-gathers


def check_supported(a: BenchArgs) -> None:
    """Flags whose work lands in later issues are refused clearly, never silently ignored."""
    if (a.pin_kv_cache or a.async_kv_offload) and not a.kv_offload:
        raise OffloadgenError("--pin-kv-cache and --async-kv-offload apply to an offloaded KV cache: add --kv-offload")
    if distributed.launched():
        size = int(os.environ["WORLD_SIZE"])
        asked = a.num_nodes * a.num_gpus_per_node
        if asked != 1 and asked != size:
            raise OffloadgenError(f"--num-nodes {a.num_nodes} x --num-gpus-per-node {a.num_gpus_per_node} = {asked} "
                                  f"processes asked for, but torchrun started {size}")
    elif a.num_nodes > 1:
        raise OffloadgenError("several nodes: start offloadgen on each node with torchrun (--nnodes, --node-rank, "
                              "--rdzv-endpoint); --num-gpus-per-node alone starts one node")
    for name in ("batch_size", "prompt_len", "gen_len", "loops"):
        if getattr(a, name) < 1:
            raise OffloadgenError(f"--{name.replace('_', '-')} must be at least 1")


def bench_inputs(tokenizer, batch: int, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's workload: its sentence, left-padded with EOS to exactly prompt_len tokens.
    Dummy weights have no vocabulary to honour, and their byte-level sentence (28 tokens) is longer
    than a real tokenizer's (OPT's: 8): it is cut to its last prompt_len tokens, so every
    --prompt-len the reference accepts is accepted."""
    from ..tokenizer import ByteTokenizer
    ids = tokenizer.encode(PROMPT)
    if isinstance(tokenizer, ByteTokenizer):
        ids = ids[-prompt_len:]
    if len(ids) > prompt_len:
        raise OffloadgenError(f"--prompt-len {prompt_len} is shorter than the prompt ({len(ids)} tokens)")
    eos = min(tokenizer.eos_token_ids)
    row = [eos] * (prompt_len - len(ids)) + ids
    mask = [0] * (prompt_len - len(ids)) + [1] * len(ids)
    return torch.tensor([row] * batch), torch.tensor([mask] * batch)


def default_budget(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free - max(1 * GiB, 0.05 * free))  # room for the CUDA context's own growth and fragmentation


def run_generation(a: BenchArgs, out=sys.stdout) -> dict:
    check_supported(a)
    offload = a.cpu_offload or a.disk_offload
    device = torch.device(a.device) if a.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = distributed.init(device.type)
    device = distributed.device_for(world, device)
    rows = distributed.local_rows(a.batch_size, world)
    batch = rows.stop - rows.start  # this rank's share of the batch
    t_start = time.perf_counter()
    checkpoint = open_checkpoint(a.model, dummy=a.dummy)
    cfg = checkpoint.cfg
    dtype = resolve_dtype(a.dtype, device, cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    tokenizer = checkpoint.tokenizer()
    input_ids, mask = bench_inputs(tokenizer, batch, a.prompt_len)

    bandwidth = h2d_bandwidth(device) if device.type == "cuda" else None
    quant = QuantConfig(a.quant_bits, a.quant_group_size) if a.quant_bits != 16 else None
    budget = a.gpu_memory or default_budget(device)
    placement, kv_opts, kv_model = None, None, None
    if a.kv_offload:
        kv_opts = KVOffload(pinned=a.pin_kv_cache, async_write=a.async_kv_offload, attention=a.kv_attention)
        if budget is not None:
            placement, kv_opts, kv_model = plan_kv_offload(
                cfg, elem, budget, batch, a.prompt_len, a.gen_len, a.micro_batch_size, a.prefetch_depth, quant,
                kv_opts, bandwidth and bandwidth["best"], dtype, offload=offload)
            kv_model["cpu_read_bytes_s"] = cpu_read_bandwidth()
    elif budget is not None:
        placement = plan_placement(cfg, elem, budget, batch, a.prompt_len, a.gen_len, a.micro_batch_size,
                                   a.prefetch_depth, offload=offload, quant=quant)
    if a.disk_offload and placement is None:  # a CPU run: layers stream from disk into RAM buffers
        placement = disk_placement_on_cpu(cfg, a.prefetch_depth, elem)
    if placement is not None and a.disk_offload:
        placement.bytes["weights_on_disk"] = True
    if placement is not None and (placement.streamed or a.kv_offload):
        # a node holds the streamed weights once (shared) and each of its ranks' KV caches
        node = dict(placement.bytes, kv_host=placement.bytes.get("kv_host", 0) * world.local_size)
        check_host_memory(type(placement)(placement.resident, placement.streamed, placement.ring_slots, node),
                          quantized=quant is not None)
    t_load = time.perf_counter()
    if quant is not None or (placement is not None and placement.streamed):
        weights = StreamingWeights(checkpoint, device, dtype, placement or all_resident(cfg),
                                   pinned=bool(a.pin_memory), progress=a.verbose > 0, quant=quant,
                                   offload_dir=a.offload_dir if a.disk_offload else None, world=world,
                                   fetch=a.weight_fetch)
    else:
        weights = ResidentWeights(checkpoint, device, dtype, progress=a.verbose > 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # the bandwidth probe's buffers are not ours to count
    startup = time.perf_counter() - t_start
    load_s = time.perf_counter() - t_load
    if a.verbose:
        where = placement.describe() if placement is not None else "all weights on the CPU"
        print(f"model ready in {startup:.1f} s ({getattr(weights, 'timings', {})}); {where}", file=sys.stderr)

    disk = getattr(weights, "disk", None)
    disk_bw = disk.read_bandwidth() if disk is not None else None  # measured now, from the same files
    cached_before = page_cache_bytes()
    engine = Engine(cfg, weights, device, dtype, a.micro_batch_size, kv_offload=kv_opts)
    params = SamplingParams(max_new_tokens=a.gen_len, ignore_eos=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    totals, prefills = [], []
    for loop in range(a.loops):
        bar = tqdm(total=a.gen_len, desc=f"loop {loop + 1}/{a.loops}", unit="tok", file=sys.stderr, leave=False,
                   disable=None if a.verbose else True)
        marks = {}

        def on_prefill():
            sync()
            marks["prefill"] = time.perf_counter()
            if disk is not None:
                marks["disk_read"] = disk.stats["read_bytes"]
            if engine.offloaded_cache is not None:
                marks["kv_stats"] = dict(engine.offloaded_cache.stats)

        sync()
        distributed.barrier(world)  # every rank starts the timed generation together
        t0 = time.perf_counter()
        result = engine.generate(input_ids, mask, params, set(), min(tokenizer.eos_token_ids),
                                 on_prefill=on_prefill, on_token=lambda i: bar.update())
        sync()
        t1 = time.perf_counter()
        bar.close()
        totals.append(t1 - t0)
        prefills.append(marks["prefill"] - t0)
    kv_record = None
    if engine.offloaded_cache is not None:
        cache = engine.offloaded_cache
        steps = a.gen_len - 1
        decode = {k: (cache.stats[k] - marks["kv_stats"][k]) / max(steps, 1) for k in cache.stats}
        kv_record = {**(kv_model or {}), "attention": kv_opts.attention, "pinned": kv_opts.pinned,
                     "async_write": kv_opts.async_write, "gpu_parts": len(cache.gpu_parts), "parts": len(cache.parts),
                     "host_bytes": cache.nbytes, "per_decode_step": decode,
                     "zero_copy_output": pinned_mod._zero_copy_ok}
    engine.close()
    copy_only = weights.copy_only_pass_s() if hasattr(weights, "copy_only_pass_s") else None
    if hasattr(weights, "close"):
        weights.close()

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    m = Metrics(batch, a.prompt_len, a.gen_len, prefills[-1], totals[-1], peak)
    per_rank = distributed.gather({"rank": world.rank, "prefill_latency_s": m.prefill_latency,
                                   "decode_latency_s": m.decode_latency, "total_latency_s": m.total_latency,
                                   "decode_step_s": m.decode_step, "prefill_throughput": m.prefill_throughput,
                                   "decode_throughput": m.decode_throughput, "total_throughput": m.total_throughput,
                                   "peak_gpu_mem_bytes": peak, "batch": batch,
                                   "disk_read_bytes": disk.stats["read_bytes"] if disk is not None else None}, world)
    if world.active:
        m = SummedMetrics.of(distributed.combine_metrics(per_rank))
    if not world.is_main:  # rank 0 alone prints, writes the log and the record
        distributed.finish(world)
        return None
    seq = a.prompt_len + a.gen_len
    model_bytes = param_count(cfg) * 2
    cache, hidden = cache_bytes(a.batch_size, seq, cfg.n_layers, cfg.hidden_size), hidden_bytes(a.batch_size, seq, cfg.hidden_size)

    if a.verbose >= 2:
        texts = [tokenizer.decode(t) for t in result.tokens]
        for i in sorted({0, len(texts) // 2, len(texts) - 1}):
            print(f"Outputs {i}: {PROMPT}{texts[i]!r}", file=out)
        assert all(len(t) == a.gen_len for t in result.tokens), "every output must be prompt_len + gen_len long"
    lines = log_lines(model_bytes, cache, hidden, m)
    if a.verbose >= 1:
        print(lines, end="", file=out)

    disk_record = None
    if disk is not None:
        read_per_step = (disk.stats["read_bytes"] - marks["disk_read"]) / max(a.gen_len - 1, 1)
        cached_after = page_cache_bytes()
        disk_record = {"dir": str(disk.path), "o_direct": disk.direct, "read_bandwidth_bytes_s": disk_bw,
                       "read_bytes_per_decode_step": read_per_step, "stored_bytes": disk.nbytes,
                       "limit_decode_step_s": read_per_step / disk_bw,
                       "decode_step_over_disk_limit": m.decode_step / (read_per_step / disk_bw),
                       "page_cache_growth_bytes": None if cached_before is None else cached_after - cached_before,
                       "bytes_read_during_run": disk.stats["read_bytes"]}
    kind = "disk" if a.disk_offload else "cpu" if a.cpu_offload else "gpu"
    log_path = Path(a.output_file if a.output_file != "auto" else
                    log_filename(a.model, a.batch_size, a.prompt_len, a.gen_len, a.num_nodes, a.num_gpus_per_node,
                                 kind, a.kv_offload, a.quant_bits))
    with open(log_path, "a") as f:
        f.write(lines)
    streamed = placement.streamed_bytes if placement is not None else 0
    # The bus limit of a step: the streamed bytes over the best pinned bandwidth the probe saw.
    bus_limit_step = streamed / bandwidth["best"] if bandwidth and streamed else None
    record = {
        "system": "offloadgen", "version": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "model": a.model, "dummy": a.dummy, "batch_size": a.batch_size,
        "prompt_len": a.prompt_len, "gen_len": a.gen_len, "loops": a.loops, "cpu_offload": a.cpu_offload,
        "pin_memory": a.pin_memory, "quant_bits": a.quant_bits, "quant_group_size": a.quant_group_size, "kv_offload": a.kv_offload, "dtype": str(dtype),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "gpu_budget_bytes": budget,
        "placement": None if placement is None else {**placement.bytes, "resident_blocks": len(placement.resident),
                                                     "streamed_blocks": len(placement.streamed)},
        "h2d_bandwidth_bytes_s": bandwidth and bandwidth["best"], "h2d_bandwidth_median_bytes_s": bandwidth and bandwidth["median"],
        "bus_limit_decode_step_s": bus_limit_step, "copy_only_step_s": copy_only,
        "decode_step_over_copy_only": m.decode_step / copy_only if copy_only else None,
        "streamed_bytes_per_step": streamed,
        "model_bytes": model_bytes, "cache_bytes": cache, "hidden_bytes": hidden,
        "prefill_latency_s": m.prefill_latency, "prefill_throughput": m.prefill_throughput,
        "decode_latency_s": m.decode_latency, "decode_throughput": m.decode_throughput,
        "decode_step_s": m.decode_step, "total_latency_s": m.total_latency, "total_throughput": m.total_throughput,
        "decode_step_over_bus_limit": m.decode_step / bus_limit_step if bus_limit_step else None,
        "peak_gpu_mem_bytes": m.peak_gpu_mem, "startup_s": startup, "weights_load_s": load_s,
        "weights_timings": getattr(weights, "timings", {}), "all_totals_s": totals, "all_prefills_s": prefills,
        "log_file": str(log_path), "kv": kv_record, "world_size": world.size, "weight_fetch": a.weight_fetch,
        "per_rank": per_rank if world.active else None, "disk_offload": a.disk_offload, "disk": disk_record,
    }
    json_path = Path(a.json_file) if a.json_file else log_path.with_suffix(".jsonl")
    with open(json_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if a.verbose and bus_limit_step:
        print(f"decode step {m.decode_step:.3f} s = {streamed / m.decode_step / 1e9:.1f} GB/s of streamed weights; "
              f"bus limit {bus_limit_step:.3f} s ({streamed / 1e9:.2f} GB at the probe's best {bandwidth['best'] / 1e9:.1f} GB/s, "
              f"median {bandwidth['median'] / 1e9:.1f}): {bus_limit_step / m.decode_step:.1%} of the bus"
              + (f"; copy-only pass {copy_only:.3f} s: step = {m.decode_step / copy_only:.3f}x copy-only" if copy_only else ""),
              file=sys.stderr)
    distributed.finish(world)
    if a.verbose and disk_record:
        d = disk_record
        growth = d["page_cache_growth_bytes"]
        print(f"weights on disk ({'O_DIRECT' if d['o_direct'] else 'buffered reads, dropped from the page cache'}): "
              f"{d['read_bytes_per_decode_step'] / 1e9:.2f} GB read per decode step; disk probe "
              f"{d['read_bandwidth_bytes_s'] / 1e9:.2f} GB/s -> limit {d['limit_decode_step_s']:.3f} s; step "
              f"{m.decode_step:.3f} s = {d['decode_step_over_disk_limit']:.3f}x the disk limit; page cache grew "
              + ("?" if growth is None else f"{growth / 1e9:.2f} GB") + f" while {d['bytes_read_during_run'] / 1e9:.1f} GB "
              f"were read", file=sys.stderr)
    if a.verbose and kv_record:
        d = kv_record["per_decode_step"]
        cpu_bw = kv_record.get("cpu_attention_bytes_s")
        print(f"KV cache in CPU memory ({kv_record['host_bytes'] / GiB:.1f} GiB, {kv_record['gpu_parts']} of "
              f"{kv_record['parts']} micro-batches attending on the GPU); per decode step: CPU attention "
              f"{d['cpu_attention_s']:.3f} s over {d['cpu_cache_read_bytes'] / 1e9:.2f} GB, waiting for the GPU "
              f"{d['wait_for_gpu_s']:.3f} s"
              + (f" ({d['cpu_cache_read_bytes'] / max(d['cpu_attention_s'], 1e-9) / 1e9:.1f} GB/s; probe "
                 f"{cpu_bw / 1e9:.1f} GB/s, CPU memory read {kv_record['cpu_read_bytes_s'] / 1e9:.1f} GB/s)" if cpu_bw else "")
              + f", cache over the bus {d['h2d_cache_bytes'] / 1e9:.2f} GB in, {d['d2h_cache_bytes'] / 1e6:.1f} MB out",
              file=sys.stderr)
    return record
