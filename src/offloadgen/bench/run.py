"""run_generation, as the reference defines it (docs/reference-benchmark.md): fixed-length prompts,
`loops` timed generations, prefill timed apart from decode, the reference's metrics printed and
appended to a log file, plus a JSON record per run with what the reference does not say
(placement, bus limit, start-up). The run itself is built by runtime.build_runtime, as every
other command's is; this module only times it and writes down what happened.
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
from ..checkpoint import open_checkpoint
from ..config import RunConfig
from ..errors import OffloadgenError
from ..machine import (Calibration, GiB, cpu_read_bandwidth, dense_matmul_flops, device_memory_bandwidth,
                       h2d_bandwidth, node_memory_used, page_cache_bytes, peak_rss_bytes, save_link_figures)
from ..metrics import RunMetrics
from ..models import param_count
from ..offload import cpu_attention, kv_cache
from ..offload.pinned import copy_chunk, zero_copy_used
from ..plan import Links, link_bytes, predict
from ..runtime import Runtime, build_runtime, resolve_device
from ..sampling import SamplingParams
from .metrics import cache_bytes, hidden_bytes, log_filename, log_lines

PROMPT = "Paris is the capital city of"


@dataclass
class Workload:
    """What bench adds to a run's settings: the reference's workload and where results go."""
    batch_size: int = 1  # over all ranks; each takes an equal slice
    prompt_len: int = 512
    gen_len: int = 32
    loops: int = 2  # timed generations; metrics come from the last
    num_nodes: int = 1
    num_gpus_per_node: int = 1
    output_file: str = "auto"
    json_file: str | None = None  # default: the log file's name with .jsonl
    verbose: int = 2

    def check(self) -> None:
        for name in ("batch_size", "prompt_len", "gen_len", "loops", "num_nodes", "num_gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OffloadgenError(f"--{name.replace('_', '-')} must be at least 1; got {value!r}")
        if distributed.launched():
            size = int(os.environ["WORLD_SIZE"])
            asked = self.num_nodes * self.num_gpus_per_node
            if asked != 1 and asked != size:
                raise OffloadgenError(f"--num-nodes {self.num_nodes} x --num-gpus-per-node {self.num_gpus_per_node} = "
                                      f"{asked} processes asked for, but torchrun started {size}")
        elif self.num_nodes > 1:
            raise OffloadgenError("several nodes: start offloadgen on each node with torchrun (--nnodes, --node-rank, "
                                  "--rdzv-endpoint); --num-gpus-per-node alone starts one node")
        elif self.batch_size % self.num_gpus_per_node:
            raise OffloadgenError(distributed.uneven_batch_message(self.batch_size, self.num_gpus_per_node))


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


def bench_config(run: RunConfig, w: Workload, batch: int) -> RunConfig:
    """The run's settings planned for this rank's rows of the workload. The reference's KV-cache
    options are off unless asked for."""
    return run.replace(max_batch_size=batch, max_seq_len=w.prompt_len + w.gen_len, max_prompt_len=w.prompt_len,
                       pin_kv_cache=bool(run.pin_kv_cache), async_kv_offload=bool(run.async_kv_offload),
                       progress=run.progress and w.verbose > 0)


RANK_OVERHEAD_BYTES = int(2.5 * GiB)  # per rank, beside weights and cache (docs/distributed.md: 2-3 GiB)


def run_generation(run: RunConfig, w: Workload, out=None) -> dict | None:
    """Build the run, time `loops` generations, write the log lines and the JSON record (rank 0).
    Returns the record (None on other ranks)."""
    out = out or sys.stdout  # the stream of the call, not of the import (tests swap sys.stdout)
    w.check()
    run.validate()
    world = distributed.init(resolve_device(run).type)
    rows = distributed.local_rows(w.batch_size, world)
    config = bench_config(run, w, rows.stop - rows.start)
    device = resolve_device(config, world)
    t_start = time.perf_counter()
    node_before = node_memory_used()
    checkpoint = open_checkpoint(config.model, dummy=config.dummy)
    tokenizer = checkpoint.tokenizer()
    input_ids, mask = bench_inputs(tokenizer, rows.stop - rows.start, w.prompt_len)  # refused before loading
    bandwidth = h2d_bandwidth(device)
    links = _probe_links(world, device)
    rt = build_runtime(config, world, checkpoint, tokenizer, h2d_bytes_s=bandwidth and bandwidth["best"])
    if rt.engine.kv_offload is not None:
        # The CPU-RAM cache is made (and pinned) at start-up, as a job's batcher makes it: pinning
        # 67 GB took most of a first prefill's 33-52 s, where a second loop's took 4.8 s.
        t0 = time.perf_counter()
        rt.engine.new_cache(rows.stop - rows.start, w.prompt_len + w.gen_len)
        rt.timings["kv_cache_alloc_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the bandwidth probe's buffers are not ours to count
    rt.timings["startup_s"] = time.perf_counter() - t_start
    if w.verbose:
        print(f"model ready in {rt.timings['startup_s']:.1f} s ({rt.weights.timings}); {rt.plan.describe()}",
              file=sys.stderr)
    disk = rt.weights.disk
    disk_bw = disk.read_bandwidth() if disk is not None else None  # measured now, from the same files
    cached_before = page_cache_bytes()
    timed = _timed_generations(rt, input_ids, mask, w, world)
    node_during = node_memory_used()  # weights, cache and buffers all still held
    kv_record = _kv_record(rt, timed, w.gen_len)
    host = {"peak_rss_bytes": peak_rss_bytes(), "kv_host_bytes": kv_record["host_bytes"] if kv_record else 0,
            "weight_host_bytes": sum(t.numel() * t.element_size() for t in getattr(rt.weights, "host", {}).values()),
            # each rank its own 1/N of the streamed weights (allgather, pool), or one copy per node shared
            "weight_host_parts": bool(getattr(rt.weights, "host_parts", False)),
            "weight_host_driver_pinned": len(getattr(rt.weights, "driver_pinned", ()))}
    rt.engine.close()
    copy_only = rt.weights.copy_only_pass_s()
    rt.weights.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    mine = RunMetrics.measured(rows.stop - rows.start, w.prompt_len, w.gen_len, timed["prefills"][-1],
                               timed["totals"][-1], peak)
    per_rank = distributed.gather({"rank": world.rank, **mine.as_record(), **host,
                                   "disk_read_bytes": disk.stats["read_bytes"] if disk is not None else None}, world)
    m = RunMetrics.combined([RunMetrics(**{k: r[k] for k in mine.as_record()}) for r in per_rank])
    if not world.is_main:  # rank 0 alone prints, writes the log and the record
        distributed.finish(world)
        return None
    if w.verbose >= 2:
        texts = [tokenizer.decode(t) for t in timed["result"].tokens]
        for i in sorted({0, len(texts) // 2, len(texts) - 1}):
            print(f"Outputs {i}: {PROMPT}{texts[i]!r}", file=out)
        assert all(len(t) == w.gen_len for t in timed["result"].tokens), "every output must be prompt_len + gen_len long"
    disk_record = _disk_record(disk, disk_bw, cached_before, timed, m, w.gen_len)
    host_memory = host_memory_record(node_before, node_during, per_rank, world.local_size if world.active else 1)
    record = _record(rt, run, w, m, (bandwidth, links), copy_only, timed, kv_record, disk_record,
                     per_rank if world.active else None, out, host_memory)
    distributed.finish(world)
    if w.verbose:
        _print_summary(record, m, file=sys.stderr)
        h = record["host_memory"]
        if h["node_used_by_run_bytes"] is not None:
            print(f"host memory: the run took {h['node_used_by_run_bytes'] / GiB:.1f} GiB of the node's RAM against "
                  f"{h['model_bytes'] / GiB:.1f} GiB modelled ({h['weight_host_bytes'] / GiB:.1f} GiB of weights once, "
                  f"caches, {h['ranks_on_node']} x 2.5 GiB a rank; docs/distributed.md)", file=sys.stderr)
    return record


def _timed_generations(rt: Runtime, input_ids, mask, w: Workload, world) -> dict:
    """`loops` generations of gen_len greedy tokens, each timed whole and to the end of its prefill
    (the device synchronized at both marks, every rank starting together)."""
    device, engine, disk = rt.plan.device, rt.engine, rt.weights.disk
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    params = SamplingParams(max_new_tokens=w.gen_len, ignore_eos=True)
    totals, prefills, marks, result = [], [], {}, None
    for loop in range(w.loops):
        bar = tqdm(total=w.gen_len, desc=f"loop {loop + 1}/{w.loops}", unit="tok", file=sys.stderr, leave=False,
                   disable=None if w.verbose else True)

        def on_prefill():
            sync()
            marks["prefill"] = time.perf_counter()
            if disk is not None:
                marks["disk_read"] = disk.stats["read_bytes"]
            if engine.offloaded_cache is not None:
                marks["kv_stats"] = dict(engine.offloaded_cache.stats)
            marks["weights"] = dict(rt.weights.timings)  # bus_bytes, expert hits and misses so far

        sync()
        distributed.barrier(world)
        t0 = time.perf_counter()
        token_times = marks["token_times"] = []  # when each token's pass ended, as the host saw it

        def on_token(i):
            token_times.append(time.perf_counter())
            bar.update()
        result = engine.generate(input_ids, mask, params, set(), min(rt.tokenizer.eos_token_ids),
                                 on_prefill=on_prefill, on_token=on_token)
        sync()
        # the counters when the decode steps end: the copy-only pass measured after the loops moves
        # blocks through the same ring and counts them too (it added 3 passes to MoE's whole-layer bytes)
        marks["weights_end"] = dict(rt.weights.timings)
        totals.append(time.perf_counter() - t0)
        bar.close()
        prefills.append(marks["prefill"] - t0)
    return {"totals": totals, "prefills": prefills, "marks": marks, "result": result}


def host_memory_record(before: int | None, during: int | None, per_rank: list[dict], ranks_on_node: int) -> dict:
    """The node's memory the run took (MemTotal - MemAvailable while it ran, less before it
    started) against docs/distributed.md's model: the streamed weights once per node (one shared
    copy, or with allgather and pool each rank's 1/N), each rank's
    KV cache in CPU memory, and a few GiB a rank (CUDA context, Python, staging). Under torchrun
    every rank of the node started together, so `before` is the node's before any of them loaded."""
    node_ranks = per_rank[:ranks_on_node]  # rank order: the first node's ranks first
    parts = [r["weight_host_bytes"] for r in node_ranks]
    # each rank its own 1/N of the weights, or one shared copy mapped by each
    weights = sum(parts) if node_ranks[0].get("weight_host_parts") else max(parts)
    model = weights + sum(r["kv_host_bytes"] for r in node_ranks) + ranks_on_node * RANK_OVERHEAD_BYTES
    used = during - before if before is not None and during is not None else None
    return {"node_used_by_run_bytes": used, "model_bytes": model, "used_over_model": used / model if used else None,
            "weight_host_bytes": weights, "weight_host_parts": bool(node_ranks[0].get("weight_host_parts")),
            "ranks_on_node": ranks_on_node,
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in per_rank]}


def _kv_record(rt: Runtime, timed: dict, gen_len: int) -> dict | None:
    cache = rt.engine.offloaded_cache
    if cache is None:
        return None
    kv, before = rt.plan.kv, timed["marks"]["kv_stats"]
    decode = {k: (cache.stats[k] - before[k]) / max(gen_len - 1, 1) for k in cache.stats}
    model = dict(rt.plan.kv_model or {})
    if rt.plan.device.type == "cuda":
        model["cpu_read_bytes_s"] = cpu_read_bandwidth()
    # gpu_parts: where the split ended; the predictions above are for the plan's count (a pageable
    # cache's plan puts every part on the CPU, and the split may move some)
    return {**model, "attention": kv.attention, "pinned": kv.pinned, "async_write": kv.async_write,
            "planned_gpu_parts": model.get("gpu_parts"),
            "gpu_parts": len(cache.gpu_parts), "parts": len(cache.parts), "host_bytes": cache.nbytes,
            "pinned_bytes": cache.pinned_bytes, "split_history": cache.split.history if cache.split else None,
            "gpu_decode_attention": "triton" if kv_cache.TRITON_DECODE_ATTENTION else "sdpa",
            "overlap": kv.overlap, "cpu_side_layers": rt.engine.cpu_side.layers if rt.engine.cpu_side else 0,
            "per_decode_step": decode, "zero_copy_output": zero_copy_used(),
            # which CPU attention each shape of call ran (a dense cache's first calls time the Numba
            # kernel against SDPA): batch 96 on one lease read 29.5 GB/s of slots with parts of 8,
            # about SDPA's rate, and 183.8 with parts of 16, the kernel skipping masked padding;
            # which one ran was not recorded then
            "cpu_attention_impl": sorted({str(c) for c in cpu_attention.choices().values()})}


def _disk_record(disk, disk_bw, cached_before, timed: dict, m: RunMetrics, gen_len: int) -> dict | None:
    if disk is None:
        return None
    read_per_step = (disk.stats["read_bytes"] - timed["marks"]["disk_read"]) / max(gen_len - 1, 1)
    cached_after = page_cache_bytes()
    return {"dir": str(disk.path), "o_direct": disk.direct, "read_bandwidth_bytes_s": disk_bw,
            "read_bytes_per_decode_step": read_per_step, "stored_bytes": disk.nbytes,
            "limit_decode_step_s": read_per_step / disk_bw,
            "decode_step_over_disk_limit": m.decode_step_s / (read_per_step / disk_bw),
            "page_cache_growth_bytes": None if cached_before is None else cached_after - cached_before,
            "bytes_read_during_run": disk.stats["read_bytes"]}


def _record(rt: Runtime, run: RunConfig, w: Workload, m: RunMetrics, probes, copy_only, timed, kv_record,
            disk_record, per_rank, out, host_memory: dict | None = None) -> dict:
    """Append the reference's four log lines and our JSON record; print the lines. probes: this
    run's one-link figure (h2d_bandwidth) and, with several ranks, both links' (_probe_links)."""
    bandwidth, links = probes
    plan, cfg = rt.plan, rt.plan.model_cfg
    seq = w.prompt_len + w.gen_len
    model_bytes = param_count(cfg) * 2
    cache, hidden = cache_bytes(w.batch_size, seq, cfg.n_layers, cfg.hidden_size), hidden_bytes(w.batch_size, seq, cfg.hidden_size)
    lines = log_lines(model_bytes, cache, hidden, m)
    if w.verbose >= 1:
        print(lines, end="", file=out)
    kind = "disk" if run.disk_offload else "cpu" if run.cpu_offload else "gpu"
    log_path = Path(w.output_file if w.output_file != "auto" else
                    log_filename(run.model or "smollm2", w.batch_size, w.prompt_len, w.gen_len, w.num_nodes,
                                 w.num_gpus_per_node, kind, run.kv_offload, run.quant_bits))
    with open(log_path, "a") as f:
        f.write(lines)
    p = plan.placement
    streamed = p.bus_bytes_per_step if p is not None else 0  # predicted; with experts on demand, expected
    bus_limit = streamed / bandwidth["best"] if bandwidth and streamed else None  # at the probe's best
    device = plan.device
    record = {
        "system": "offloadgen", "version": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "model": run.model, "dummy": run.dummy, "batch_size": w.batch_size,
        "prompt_len": w.prompt_len, "gen_len": w.gen_len, "loops": w.loops, "cpu_offload": run.cpu_offload,
        "pin_memory": int(run.pin_memory), "quant_bits": run.quant_bits, "quant_group_size": run.quant_group_size,
        "kv_offload": run.kv_offload, "kv_quant_bits": run.kv_quant_bits, "kv_quant_group_size": run.kv_quant_group_size,
        "dtype": str(plan.dtype),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "gpu_budget_bytes": plan.budget,
        # the attention kernels depend on it (models/layers.py: cuDNN's is left out)
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "copy_chunk_bytes": copy_chunk(),  # the pieces host-to-device copies are issued in
        "placement": None if p is None else {**p.bytes, "resident_blocks": len(p.resident),
                                             "streamed_blocks": len(p.streamed), "prefill_tokens": p.prefill_tokens,
                                             "resident_layers": [b for b in p.resident if isinstance(b, int)]},
        "h2d_bandwidth_bytes_s": bandwidth and bandwidth["best"],
        "h2d_bandwidth_median_bytes_s": bandwidth and bandwidth["median"],
        "bus_limit_decode_step_s": bus_limit, "copy_only_step_s": copy_only,
        "decode_step_over_copy_only": m.decode_step_s / copy_only if copy_only else None,
        "streamed_bytes_per_step": streamed, **link_bytes(p, plan.world.size, run.weight_fetch),
        "model_bytes": model_bytes, "cache_bytes": cache, "hidden_bytes": hidden,
        **m.as_record(),
        "decode_step_over_bus_limit": m.decode_step_s / bus_limit if bus_limit else None,
        "startup_s": rt.timings["startup_s"], "weights_load_s": rt.timings["weights_load_s"],
        "kv_cache_alloc_s": rt.timings.get("kv_cache_alloc_s"), **_prefill_rate(rt, w, m),
        "weights_timings": rt.weights.timings, "all_totals_s": timed["totals"], "all_prefills_s": timed["prefills"],
        "decode_steps_s": [round(b - a, 4) for a, b in zip(timed["marks"]["token_times"], timed["marks"]["token_times"][1:])],
        "log_file": str(log_path), "kv": kv_record, "world_size": plan.world.size, "weight_fetch": run.weight_fetch,
        # the copies' direction where they ran (None where nothing was gathered: one rank, no streaming)
        "weight_gather": run.weight_gather, "peer_copy": getattr(getattr(rt.weights, "peers", None), "mode", None),
        "prefetch_depth": run.prefetch_depth,
        "resident_at": None if run.weight_fetch == "pool" else run.resident_layers,  # pool keeps no layer whole
        "landing_buffers": None if p is None or not p.bytes.get("landing") else p.landings,
        "nccl_max_nchannels": os.environ.get("NCCL_MAX_NCHANNELS"),
        "nccl_cta_policy": os.environ.get("NCCL_CTA_POLICY"),
        "per_rank": per_rank, "disk_offload": run.disk_offload, "disk": disk_record, "host_memory": host_memory,
        "experts": _expert_record(rt, timed, w.gen_len, m), **_prediction(rt, run, bandwidth, links, m),
    }
    json_path = Path(w.json_file) if w.json_file else log_path.with_suffix(".jsonl")
    with open(json_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _prefill_rate(rt: Runtime, w: Workload, m: RunMetrics) -> dict:
    """The prefill's matmul FLOP/s (2 x parameters x prompt tokens, attention left out) against
    the GPU's dense matmul rate in the model's dtype, measured now: how close a prefill, which
    is compute-bound at large batches, comes to the chip."""
    device = rt.plan.device
    if device.type != "cuda" or not m.prefill_latency_s:
        return {}
    flops = 2 * param_count(rt.engine.cfg) * (m.batch // rt.plan.world.size) * w.prompt_len  # one GPU's rows
    dense = dense_matmul_flops(device, rt.engine.dtype)
    return {"prefill_flops": flops, "prefill_flops_s": flops / m.prefill_latency_s, "gpu_dense_flops_s": dense,
            "prefill_over_dense": flops / m.prefill_latency_s / dense}


def _expert_record(rt: Runtime, timed: dict, gen_len: int, m: RunMetrics) -> dict | None:
    """An MoE run's weight bytes per decode step as measured (the weight source's counters over the
    decode steps of the last loop), against the bytes of every streamed layer whole."""
    p, before, now = rt.plan.placement, timed["marks"].get("weights", {}), timed["marks"].get("weights_end", {})
    if p is None or "bus_bytes" not in now or not getattr(rt.plan.model_cfg, "n_experts", 0):
        return None
    steps = max(gen_len - 1, 1)
    per = {k: (now[k] - before.get(k, 0)) / steps for k in ("bus_bytes", "expert_bytes", "expert_hits", "expert_misses")}
    whole = p.streamed_bytes
    return {"expert_streaming": p.expert_streaming, "expert_slots": p.expert_slots, "bus_bytes_per_step": per["bus_bytes"],
            "expert_bytes_per_step": per["expert_bytes"], "hits_per_step": per["expert_hits"],
            "misses_per_step": per["expert_misses"], "whole_layers_bytes_per_step": whole,
            "predicted_bytes_per_step": p.bus_bytes_per_step,
            "fewer_bytes_than_whole": whole / per["bus_bytes"] if per["bus_bytes"] else None,
            "bus_gb_s": per["bus_bytes"] / m.decode_step_s / 1e9 if m.decode_step_s else None}


def _probe_links(world, device: torch.device) -> dict:
    """With several ranks, both links measured together (distributed.probe_links), kept for
    `offloadgen plan --num-gpus-per-node N` by rank 0; what the record says where none ran."""
    if world.size < 2:
        return {}
    probe = distributed.probe_links(world, device)
    if probe is None:
        return {"links_probed": None, "link_probe_skipped": "no CUDA: ranks on CPUs (gloo) have no PCIe or NVLink "
                                                            "to measure"}
    if world.is_main:
        save_link_figures(world.size, probe["h2d_aggregate_bytes_s"], probe["nvlink_allgather_bytes_s"],
                          f"{torch.cuda.get_device_name(device)} x {world.size}, "
                          f"{datetime.datetime.now().isoformat(timespec='minutes')}")
    return probe


def _prediction(rt: Runtime, run: RunConfig, bandwidth, links: dict, m: RunMetrics) -> dict:
    """The step `offloadgen plan` predicts for this run (plan.predict), from the links measured in
    this run: one host link alone, and with several ranks both links together. None on a CPU."""
    plan, world = rt.plan, rt.plan.world
    record = {"h2d_aggregate_bytes_s": None, "nvlink_allgather_bytes_s": None, **links, "predicted_step_s": None}
    if plan.device.type != "cuda" or plan.placement is None or not bandwidth:
        return {**record, "prediction_skipped": "a CPU run: the step model predicts a GPU's"}
    measured = Links(world.size, run.weight_fetch, record["h2d_aggregate_bytes_s"], record["nvlink_allgather_bytes_s"])
    cal = Calibration(bandwidth["best"], device_memory_bandwidth(plan.device), "measured in this run")
    elem = torch.empty((), dtype=plan.dtype).element_size()
    p = predict(plan.model_cfg, plan.placement, plan.config.max_batch_size, plan.config.micro_batch_size,
                plan.max_prompt_len, plan.max_seq_len - plan.max_prompt_len, elem, plan.quant, cal, plan.kv_model,
                measured)
    return {**record, "predicted_step_s": p["step_s"], "predicted_bound": p["bound"], "predicted_pcie_s": p["bus_s"],
            "predicted_nvlink_s": p["nvlink_s"], "predicted_gpu_memory_s": p["gpu_s"],
            "predicted_cpu_attention_s": p["cpu_s"], "device_memory_bytes_s": cal.device_bytes_s,
            "decode_step_over_predicted": m.decode_step_s / p["step_s"]}


def _print_summary(r: dict, m: RunMetrics, file) -> None:
    """The step against its physical limits, on standard error."""
    bus, copy_only, streamed = r["bus_limit_decode_step_s"], r["copy_only_step_s"], r["streamed_bytes_per_step"]
    if bus:
        print(f"decode step {m.decode_step_s:.3f} s = {streamed / m.decode_step_s / 1e9:.1f} GB/s of streamed weights; "
              f"bus limit {bus:.3f} s ({streamed / 1e9:.2f} GB at the probe's best "
              f"{r['h2d_bandwidth_bytes_s'] / 1e9:.1f} GB/s, median {r['h2d_bandwidth_median_bytes_s'] / 1e9:.1f}): "
              f"{bus / m.decode_step_s:.1%} of the bus"
              + (f"; copy-only pass {copy_only:.3f} s: step = {m.decode_step_s / copy_only:.3f}x copy-only"
                 if copy_only else ""), file=file)
    if r.get("predicted_step_s"):
        print(_prediction_line(r, m), file=file)
    elif r.get("link_probe_skipped"):
        print(f"links not probed: {r['link_probe_skipped']}", file=file)
    if r.get("prefill_over_dense"):
        print(f"prefill {m.prefill_latency_s:.2f} s: {r['prefill_flops_s'] / 1e12:.0f} TFLOP/s of matmuls, "
              f"{r['prefill_over_dense']:.0%} of the GPU's dense rate measured now "
              f"({r['gpu_dense_flops_s'] / 1e12:.0f} TFLOP/s)"
              + (f"; KV cache made at start-up in {r['kv_cache_alloc_s']:.1f} s" if r.get("kv_cache_alloc_s") else ""),
              file=file)


    x = r.get("experts")
    if x and x["bus_bytes_per_step"]:
        print(f"MoE ({'experts on demand, cache of ' + str(x['expert_slots']) if x['expert_streaming'] else 'whole layers'}): "
              f"{x['bus_bytes_per_step'] / 1e9:.2f} GB over the bus per decode step ({x['expert_bytes_per_step'] / 1e9:.2f} "
              f"GB of experts, {x['hits_per_step']:.0f} hits, {x['misses_per_step']:.0f} misses), "
              f"{x['fewer_bytes_than_whole']:.2f}x fewer than every streamed layer whole "
              f"({x['whole_layers_bytes_per_step'] / 1e9:.2f} GB); {x['bus_gb_s']:.1f} GB/s", file=file)
    d = r["disk"]
    if d:
        growth = d["page_cache_growth_bytes"]
        print(f"weights on disk ({'O_DIRECT' if d['o_direct'] else 'buffered reads, dropped from the page cache'}): "
              f"{d['read_bytes_per_decode_step'] / 1e9:.2f} GB read per decode step; disk probe "
              f"{d['read_bandwidth_bytes_s'] / 1e9:.2f} GB/s -> limit {d['limit_decode_step_s']:.3f} s; step "
              f"{m.decode_step_s:.3f} s = {d['decode_step_over_disk_limit']:.3f}x the disk limit; page cache grew "
              + ("?" if growth is None else f"{growth / 1e9:.2f} GB") + f" while {d['bytes_read_during_run'] / 1e9:.1f} GB "
              f"were read", file=file)
    kv = r["kv"]
    if kv:
        d, cpu_bw = kv["per_decode_step"], kv.get("cpu_attention_bytes_s")
        seen = d.get("cpu_cache_visible_bytes", d["cpu_cache_read_bytes"])  # what the kernel reads
        print(f"KV cache in CPU memory ({kv['host_bytes'] / GiB:.1f} GiB, {kv['gpu_parts']} of {kv['parts']} "
              f"micro-batches attending on the GPU); per decode step: CPU attention {d['cpu_attention_s']:.3f} s over "
              f"{d['cpu_cache_read_bytes'] / 1e9:.2f} GB of slots, {seen / 1e9:.2f} GB of them unmasked "
              f"({'/'.join(kv.get('cpu_attention_impl') or ['-'])}), waiting for "
              f"the GPU {d['wait_for_gpu_s']:.3f} s"
              + (f" ({seen / max(d['cpu_attention_s'], 1e-9) / 1e9:.1f} GB/s unmasked; probe "
                 f"{cpu_bw / 1e9:.1f} GB/s, CPU memory read {kv.get('cpu_read_bytes_s', 0) / 1e9:.1f} GB/s)"
                 if cpu_bw else "")
              + f", cache over the bus {d['h2d_cache_bytes'] / 1e9:.2f} GB in, {d['d2h_cache_bytes'] / 1e6:.1f} MB out"
              + (f"; host time: CPU side {d['cpu_side_host_s']:.3f} s, issuing GPU attention "
                 f"{d['gpu_attention_host_s']:.3f} s" if "cpu_side_host_s" in d else ""),
              file=file)


def _prediction_line(r: dict, m: RunMetrics) -> str:
    """The plan's step beside the measured one, with the link figures it came from."""
    ranks = r["world_size"]
    if r.get("links_probed"):
        links = (f"host links {r['h2d_aggregate_bytes_s'] / 1e9:.1f} GB/s together, all-gather "
                 f"{r['nvlink_allgather_bytes_s'] / 1e9:.1f} GB/s received per GPU, probed on {ranks} GPUs at once")
    else:
        links = f"one host link {r['h2d_bandwidth_bytes_s'] / 1e9:.1f} GB/s" + \
            (" each, all-gather assumed (not probed)" if ranks > 1 else "")
    nvlink = f"NVLink {r['predicted_nvlink_s']:.3f} s, " if ranks > 1 else ""
    return (f"predicted step {r['predicted_step_s']:.3f} s, {r['predicted_bound']}-bound (PCIe {r['predicted_pcie_s']:.3f} s, "
            f"{nvlink}GPU memory {r['predicted_gpu_memory_s']:.3f} s, CPU attention "
            f"{r['predicted_cpu_attention_s']:.3f} s; {links}); measured {m.decode_step_s:.3f} s = "
            f"{r['decode_step_over_predicted']:.2f}x predicted")
