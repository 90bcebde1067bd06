"""The job-level benchmark, as vLLM's throughput benchmark runs one: many requests, each with its
own prompt and output length, run through the continuous batcher; and, to compare, the same
requests as static batches (sorted by prompt length, batch = slots), each batch running until its
longest row ends.

    offloadgen bench --model facebook/opt-13b --dummy --cpu-offload --gpu-memory 8GiB --kv-offload \
        --batch-size 64 --workload synthetic --num-requests 256 --input-len 32:512 --output-len 8:256

With dummy weights each request is held to its output length (EOS ignored); with real ones a
request also ends at EOS, its output length being its max_tokens. Only tokens a request asked for
count, in both modes.
"""
from __future__ import annotations

import datetime
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OffloadgenError
from ..sampling import SamplingParams


@dataclass
class WorkItem:
    prompt_ids: list[int]
    output_len: int


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'32:512' (uniform in [32, 512]) or '128' (always 128)."""
    try:
        lo, _, hi = str(text).partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise OffloadgenError(f"{name} {text!r}: expected MIN:MAX or N, e.g. 32:512") from None
    if not 1 <= lo <= hi:
        raise OffloadgenError(f"{name} {text!r}: expected 1 <= MIN <= MAX")
    return lo, hi


def _random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(4, vocab_size) for _ in range(n)]  # clear of the usual special ids


def synthetic(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int,
              vocab_size: int) -> list[WorkItem]:
    """n requests with prompt and output lengths drawn uniformly; the prompt's tokens are random."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        p, o = rng.randint(*input_len), rng.randint(*output_len)
        items.append(WorkItem(_random_ids(rng, p, vocab_size), o))
    return items


def _whole(value, name: str) -> int:
    """A token count as JSON writes it: a whole number (not 3.7, which int() would cut to 3, nor true)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{name}' must be a whole number, got {value!r}")
    return value


def from_file(path: str, tokenizer, seed: int, vocab_size: int) -> list[WorkItem]:
    """JSON lines with 'prompt' (text) or 'input_len' (random tokens), and 'output_len'."""
    rng, items = random.Random(seed), []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise OffloadgenError(f"--workload {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out = _whole(rec["output_len"], "output_len")
            if "prompt" in rec and not isinstance(rec["prompt"], str):
                raise TypeError(f"'prompt' must be text, got {type(rec['prompt']).__name__}")
            ids = tokenizer.encode(rec["prompt"]) if "prompt" in rec else \
                _random_ids(rng, _whole(rec["input_len"], "input_len"), vocab_size)
        except (ValueError, KeyError, TypeError) as e:
            raise OffloadgenError(f"--workload {path}, line {n}: expected 'prompt' or 'input_len', and 'output_len' "
                                  f"({type(e).__name__}: {e})") from None
        if not ids or out < 1:
            raise OffloadgenError(f"--workload {path}, line {n}: empty prompt or output_len < 1")
        items.append(WorkItem(ids, out))
    if not items:
        raise OffloadgenError(f"--workload {path}: no requests")
    return items


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_continuous(llm, items: list[WorkItem], slots: int, prefill_chunk: int, ignore_eos: bool,
                   admission: str = "longest", world=None) -> dict:
    """Every request through one ContinuousBatcher; its cache is made before the clock starts.
    Under torchrun (world active) these are this rank's requests, run in lockstep with the other
    ranks' (ranks.run_in_lockstep); the record then counts occupancy over the lockstep passes and
    keeps each request's times for combine_ranks."""
    from .. import distributed
    from ..ranks import run_in_lockstep
    from ..scheduler import ContinuousBatcher
    max_len = max((len(it.prompt_ids) + it.output_len for it in items), default=1)
    batcher = ContinuousBatcher(llm, slots, max_len, prefill_chunk, admission=admission)
    kv = llm.engine.offloaded_cache
    kv_before = dict(kv.stats) if kv is not None else {}
    _sync(llm.device)
    distributed.barrier(world or distributed.World())  # every rank starts its clock together
    t0 = time.perf_counter()
    reqs = [batcher.submit(it.prompt_ids, SamplingParams(max_new_tokens=it.output_len, ignore_eos=ignore_eos))
            for it in items]
    if world is not None and world.active:
        lockstep = run_in_lockstep(batcher, world)
        passes = lockstep["passes"]
        lockstep["clock"].say(world.rank)
    else:
        while batcher.has_work():
            batcher.step()
        passes = batcher.stats.passes
    _sync(llm.device)
    elapsed = time.perf_counter() - t0
    ttft = sorted(r.first_token_at - r.submitted_at for r in reqs)
    latency = sorted(r.finished_at - r.submitted_at for r in reqs)
    s = batcher.stats
    record = {"elapsed_s": elapsed, "output_tokens": sum(len(r.output_ids) for r in reqs), "requests": len(reqs),
              "passes": passes, "pass_s": s.mean_pass_s, "empty_passes": s.empty_passes,
              "prompt_passes": s.prompt_passes, "prompt_pass_s": s.prompt_pass_s,
              "decode_only_pass_s": s.decode_only_pass_s,
              "slot_occupancy": s.busy_slots / (passes * slots) if passes else 0.0,
              "decode_occupancy": s.decode_rows / (passes * slots) if passes else 0.0,
              "mean_context": s.mean_context, "attended_context": s.attended_context, "decode_rows": s.decode_rows,
              "cache_alloc_s": batcher.cache_seconds, "prefill_chunk": prefill_chunk, "admission": admission}
    # Where a pass's time went with the KV cache in CPU RAM: per pass, CPU attention, the CPU
    # waiting for the GPU, and cache bytes over the bus (the fixed-batch bench records the same).
    if kv is not None:
        record.update({f"kv_{k}_per_pass": (v - kv_before.get(k, 0)) / max(passes, 1) for k, v in kv.stats.items()})
        record.update(kv_gpu_parts=len(kv.gpu_parts), kv_parts=len(kv.parts))  # where the split ended
        from ..offload import cpu_attention  # which kernel and cut (or SDPA) each shape's trial kept
        record["cpu_attention_impl"] = sorted({str(c) for c in cpu_attention.choices().values()})
    if ttft:
        record.update(ttft_s_p50=ttft[len(ttft) // 2], latency_s_p50=latency[len(latency) // 2],
                      latency_s_max=latency[-1])
    if world is not None and world.active:
        record.update(ttft_s=ttft, latency_s=latency)
    return record


def combine_ranks(per_rank: list[dict]) -> dict:
    """One record of the ranks' continuous runs: requests and tokens add up, the run took as long
    as the slowest rank, occupancy is the ranks' mean (their slots over the same lockstep passes),
    the context is weighted by decoded rows, percentiles are over every rank's requests."""
    ttft = sorted(t for r in per_rank for t in r["ttft_s"])
    latency = sorted(t for r in per_rank for t in r["latency_s"])
    rows = sum(r["decode_rows"] for r in per_rank)
    slowest = max(per_rank, key=lambda r: r["elapsed_s"])
    out = {**{k: v for k, v in slowest.items() if k not in ("ttft_s", "latency_s")},
           "requests": sum(r["requests"] for r in per_rank),
           "output_tokens": sum(r["output_tokens"] for r in per_rank), "decode_rows": rows,
           "empty_passes": sum(r["empty_passes"] for r in per_rank),
           "passes": max(r["passes"] for r in per_rank), "pass_s": slowest["elapsed_s"] / max(slowest["passes"], 1),
           "cache_alloc_s": max(r["cache_alloc_s"] for r in per_rank)}
    for key in ("slot_occupancy", "decode_occupancy"):
        out[key] = sum(r[key] for r in per_rank) / len(per_rank)
    for key in ("mean_context", "attended_context"):
        out[key] = sum(r[key] * r["decode_rows"] for r in per_rank) / rows if rows else 0.0
    out.update(ttft_s_p50=ttft[len(ttft) // 2], latency_s_p50=latency[len(latency) // 2], latency_s_max=latency[-1])
    out["per_rank"] = [{k: r[k] for k in ("requests", "output_tokens", "elapsed_s", "passes", "empty_passes",
                                          "slot_occupancy", "decode_occupancy")} for r in per_rank]
    return out


def static_batches(items: list[WorkItem], slots: int) -> list[list[WorkItem]]:
    """The static batches of a job: requests sorted by prompt length (a stable sort: equal lengths
    keep their order), `slots` at a time, the last batch holding what is left. The peers'
    job runs (benchmarks/peers/common.py) form theirs with this too, so both run the same batches."""
    order = sorted(items, key=lambda it: len(it.prompt_ids))
    return [order[i:i + slots] for i in range(0, len(order), slots)]


def run_static(llm, items: list[WorkItem], slots: int, ignore_eos: bool, part: tuple[int, int] = (1, 1)) -> dict:
    """Today's static batches: sorted by prompt length, `slots` at a time, left-padded; a batch
    runs until its longest row ends (rows that are done idle). The cache is made once, before the
    clock starts, as large as the largest batch needs, so only the batching differs. part (k, n):
    only the k-th of n runs of consecutive batches (a long job in several processes; sum them)."""
    engine, tok = llm.engine, llm.tokenizer
    batches = static_batches(items, slots)
    k, n = part
    batches = batches[(k - 1) * len(batches) // n:k * len(batches) // n]
    if engine.kv_offload is not None:  # the offloaded cache is kept and reused by later batches
        engine.new_cache(len(batches[0]), max(len(b[-1].prompt_ids) + max(it.output_len for it in b) for b in batches))
    _sync(llm.device)
    t0, tokens, passes = time.perf_counter(), 0, 0
    for batch in batches:
        width = len(batch[-1].prompt_ids)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, it in enumerate(batch):
            ids[r, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)
            mask[r, width - len(it.prompt_ids):] = 1
        wanted = [it.output_len for it in batch]
        params = SamplingParams(max_new_tokens=max(wanted), ignore_eos=ignore_eos)
        out = engine.generate(ids, mask, params, tok.eos_token_ids, tok.pad_token_id,
                              stop_fn=lambda row, got: len(got) >= wanted[row])
        tokens += sum(min(len(t), w) for t, w in zip(out.tokens, wanted))
        passes += max(len(t) for t in out.tokens)  # the prefill, then a pass per token after the first
    _sync(llm.device)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tokens": tokens, "passes": passes, "batches": len(batches),
            "part": f"{k}/{n}", "prompt_tokens": sum(len(it.prompt_ids) for b in batches for it in b),
            "requests": sum(len(b) for b in batches)}


def parse_part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise OffloadgenError(f"--static-part {text!r}: expected K/N, e.g. 1/2") from None
    if not 1 <= k <= n:
        raise OffloadgenError(f"--static-part {text!r}: expected 1 <= K <= N")
    return k, n


def _rates(run: dict, prompt_tokens: int, n: int) -> dict:
    e = run["elapsed_s"]
    return {"requests_per_s": n / e, "output_throughput": run["output_tokens"] / e,
            "total_throughput": (prompt_tokens + run["output_tokens"]) / e}


def run_workload(llm, items: list[WorkItem], slots: int, prefill_chunk: int, ignore_eos: bool,
                 modes: tuple[str, ...] = ("continuous",), static_part: tuple[int, int] = (1, 1),
                 admission: str = "longest", world=None) -> dict | None:
    """The record: the workload, then each mode's figures (static ones prefixed static_). Under
    torchrun every rank runs its share of items (dealt as jobs deal them, ranks.deal) in `slots`
    slots of its own, and rank 0 alone gets the combined record (None elsewhere)."""
    from .. import distributed
    from ..ranks import deal, request_cost
    prompt_tokens = sum(len(it.prompt_ids) for it in items)
    record = {"requests": len(items), "prompt_tokens": prompt_tokens,
              "requested_output_tokens": sum(it.output_len for it in items), "slots": slots}
    if world is not None and world.active:
        costs = [request_cost(len(it.prompt_ids), it.output_len, prefill_chunk) for it in items]
        mine = [items[i] for i in deal(costs, world.size)[world.rank]]
        run = run_continuous(llm, mine, slots, prefill_chunk, ignore_eos, admission, world)
        per_rank = distributed.gather(run, world, distributed.control_group(world))
        if not world.is_main:
            return None
        run = combine_ranks(per_rank)
        record.update(run, slots=slots * world.size, slots_per_rank=slots, world_size=world.size,
                      **_rates(run, prompt_tokens, len(items)))
        return record
    if "continuous" in modes:
        run = run_continuous(llm, items, slots, prefill_chunk, ignore_eos, admission)
        record.update(run, **_rates(run, prompt_tokens, len(items)))
    if "static" in modes:
        run = run_static(llm, items, slots, ignore_eos, static_part)
        rates = _rates(run, run["prompt_tokens"], run["requests"])
        record.update({f"static_{k}": v for k, v in {**run, **rates}.items()})
    if "continuous" in modes and "static" in modes:
        record["output_throughput_over_static"] = record["output_throughput"] / record["static_output_throughput"]
    return record


def build_llm(args, slots: int, max_seq_len: int, max_prompt_len: int, checkpoint, tokenizer, world=None):
    """The model, placed for `slots` sequences of `max_seq_len` tokens, from the bench flags (the
    reference's defaults: the KV cache pinned and written back asynchronously only if asked)."""
    from ..api import load
    from ..flags import config_from_args
    config = config_from_args(args, max_batch_size=slots, max_seq_len=max_seq_len, max_prompt_len=max_prompt_len,
                              pin_kv_cache=bool(args.pin_kv_cache), async_kv_offload=bool(args.async_kv_offload),
                              progress=args.verbose > 0)
    return load(config=config.validate(), checkpoint=checkpoint, tokenizer=tokenizer, world=world)


def cmd_workload(args, out=None) -> dict | None:
    """`offloadgen bench --workload ...`: build, run the modes asked for, print and record (rank 0).
    Under torchrun --batch-size is the slots of all ranks together, an equal share each."""
    from .. import __version__, distributed
    from ..checkpoint import open_checkpoint
    from ..flags import config_from_args
    from ..runtime import resolve_device
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)
    cfg, tokenizer = checkpoint.cfg, checkpoint.tokenizer()
    if args.workload == "synthetic":
        items = synthetic(args.num_requests, parse_range(args.input_len, "--input-len"),
                          parse_range(args.output_len, "--output-len"), args.workload_seed, cfg.vocab_size)
    else:
        items = from_file(args.workload, tokenizer, args.workload_seed, cfg.vocab_size)
    max_seq_len = max(len(it.prompt_ids) + it.output_len for it in items)
    if max_seq_len > cfg.max_position:
        raise OffloadgenError(f"a request needs {max_seq_len} tokens; the model's context is {cfg.max_position}")
    modes = ("static",) if args.static_only else ("continuous", "static") if args.compare_static else ("continuous",)
    world = distributed.init(resolve_device(config_from_args(args)).type)
    if world.active and "static" in modes:
        raise OffloadgenError("static batches run in one process (their ranks would not take the same number of "
                              "passes): drop --compare-static / --static-only with several ranks, or run them with "
                              "--static-part K/N in separate processes")
    slots = distributed.local_rows(args.batch_size, world)
    slots = slots.stop - slots.start
    # Continuous batching prefills one row's chunk at a time; static batches whole prompts.
    longest = max(len(it.prompt_ids) for it in items)
    max_prompt_len = longest if "static" in modes else min(longest, args.prefill_chunk)
    t0 = time.perf_counter()
    llm = build_llm(args, slots, max_seq_len, max_prompt_len, checkpoint, tokenizer, world)
    startup = time.perf_counter() - t0
    with llm:
        record = run_workload(llm, items, slots, args.prefill_chunk, ignore_eos=args.dummy, modes=modes,
                              static_part=parse_part(args.static_part), admission=args.admission, world=world)
    if record is None:  # another rank: rank 0 reports for all
        distributed.finish(world)
        return None
    record = {"system": "offloadgen", "kind": "workload", "version": __version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "model": args.model, "dummy": args.dummy, "workload": args.workload, "input_len": args.input_len,
              "output_len": args.output_len, "workload_seed": args.workload_seed, "kv_offload": args.kv_offload,
              "quant_bits": args.quant_bits, "kv_quant_bits": args.kv_quant_bits, "micro_batch_size": args.micro_batch_size,
              "gpu_budget_bytes": args.gpu_memory, "startup_s": startup,
              "weight_fetch": args.weight_fetch, "world_size": world.size, "weight_gather": args.weight_gather,
              # the copies' direction where they ran (bench/run.py's record says the same)
              "peer_copy": getattr(getattr(llm.weights, "peers", None), "mode", None),
              "device": torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu",
              # the process's peak (start-up included), as the peers record theirs against the same budget
              "peak_gpu_mem_bytes": torch.cuda.max_memory_allocated(llm.device) if llm.device.type == "cuda" else None,
              **record}
    print(summary(record), file=out or sys.stdout)
    path = Path(args.json_file or f"workload-{Path(args.model).name}-slots{args.batch_size}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    distributed.finish(world)
    return record


def summary(r: dict) -> str:
    ranks = r.get("world_size", 1)
    lines = [f"workload: {r['requests']} requests, {r['prompt_tokens']} prompt tokens, "
             f"{r['requested_output_tokens']} output tokens asked for, {r['slots']} slots"
             + (f" ({ranks} ranks of {r['slots_per_rank']}, {r.get('weight_fetch', 'whole')} weights)"
                if ranks > 1 else "")]
    if "elapsed_s" in r:
        lines.append(f"continuous: {r['elapsed_s']:.1f} s, {r['output_throughput']:.1f} output tokens/s, "
                     f"{r['total_throughput']:.1f} total tokens/s, {r['requests_per_s']:.2f} requests/s; "
                     f"{r['passes']} passes of {r['pass_s']:.3f} s, slot occupancy {r['slot_occupancy']:.1%} "
                     f"({r.get('admission', 'fifo')} first), "
                     f"mean context {r['mean_context']:.0f}; cache made in {r['cache_alloc_s']:.1f} s")
    if "static_elapsed_s" in r:
        lines.append(f"static:     {r['static_elapsed_s']:.1f} s, {r['static_output_throughput']:.1f} output tokens/s, "
                     f"{r['static_total_throughput']:.1f} total tokens/s; {r['static_passes']} passes in "
                     f"{r['static_batches']} batches (part {r['static_part']} of the static batches)")
    if "output_throughput_over_static" in r:
        lines.append(f"continuous / static output throughput: {r['output_throughput_over_static']:.2f}x")
    return "\n".join(lines)
