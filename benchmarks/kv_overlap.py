"""CPU attention in lanes of its own (--kv-overlap, offload/cpu_side.py) against one thread
(the default, --no-kv-overlap), on one loaded model in one process, so that the two differ in nothing else:
the same weights, cache, pinned memory and machine minutes apart. Each variant runs one generation
from the same start of the CPU/GPU split (the plan's); the table is printed last. The prompts are
real (every key visible), unlike bench's padded reference batch.

    python benchmarks/kv_overlap.py --batch 256 --kv-quant-bits 4            # issue 17's 4-bit cache
    python benchmarks/kv_overlap.py --batch 96 --variants off,on,on:1,on:2:3 # the fp16 cache

Variants: "off" (one thread), "on" (two lanes, the default), "on:L" (L lanes), "on:L:S" (L lanes,
the attention thread's pool leaving S cores to the issuing threads instead of L).

OPT-30B dummy, weights in CPU RAM, 16 GiB of GPU, KV cache in CPU RAM (pinned, written back
asynchronously), prompt 512. decode tok/s counts the steps after the first token (as bench does);
"last 8" is the mean of the last 8 steps, after the split has settled. With $OUT set, one JSON
line per variant goes to $OUT/kv_overlap.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import offloadgen  # noqa: E402
from offloadgen.config import parse_bytes  # noqa: E402
from offloadgen.offload.cpu_side import CpuSide  # noqa: E402
from offloadgen.sampling import SamplingParams  # noqa: E402


def one_generation(llm, ids, gen_len: int, variant: str, first_split: int) -> dict:
    engine = llm.engine
    overlap, *shape = variant.split(":")
    if overlap not in ("on", "off") or len(shape) > 2 or (overlap == "off" and shape):
        raise SystemExit(f"a variant is off, on, on:LANES or on:LANES:SPARE_CORES, not {variant!r}")
    engine.kv_offload.overlap = overlap == "on"  # the cache holds the same KVOffload object
    if engine.cpu_side is not None:
        engine.cpu_side.close()
    engine.cpu_side = None  # off; on: made here, with the lanes and spare cores asked for
    if overlap == "on":
        lanes, spare = int(shape[0]) if shape else 2, int(shape[1]) if len(shape) > 1 else None
        engine.cpu_side = CpuSide(engine.device, lanes, spare)
    cache = engine.offloaded_cache
    if cache is not None and cache.split is not None:  # the same start for each variant
        cache.split.gpu, cache.split.history = first_split, []
        cache.gpu_parts = set(range(len(cache.parts) - first_split, len(cache.parts)))
    times, marks = [], {}

    def on_prefill():
        torch.cuda.synchronize()
        marks["stats"] = dict(engine.offloaded_cache.stats)
    engine.generate(ids, torch.ones_like(ids), SamplingParams(max_new_tokens=gen_len, ignore_eos=True), set(), 0,
                    on_prefill=on_prefill, on_token=lambda i: times.append(time.perf_counter()))
    # times[k]: when the host had token k, after pass k (pass 0 the prefill). The first decode
    # pass is left out as a warm-up.
    steps = [b - a for a, b in zip(times[:-1], times[1:])][1:]
    cache = engine.offloaded_cache
    per = {k: (cache.stats[k] - marks["stats"][k]) / (len(times) - 1) for k in cache.stats}  # every decode pass
    return {"variant": variant, "overlap": overlap == "on", "batch": ids.shape[0],
            "decode_tok_s": ids.shape[0] * len(steps) / sum(steps),
            "step_s": sum(steps) / len(steps), "last8_step_s": sum(steps[-8:]) / len(steps[-8:]),
            "steps_s": [round(s, 4) for s in steps], "split_history": list(cache.split.history) if cache.split else None,
            "parts": len(cache.parts), "per_step": per}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/opt-30b")
    p.add_argument("--gpu-memory", default="16GiB")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=24)
    p.add_argument("--kv-quant-bits", type=int, default=16)
    p.add_argument("--quant-bits", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--variants", default="off,on", help="comma-separated: off (one thread), on (two lanes), on:L, on:L:S "
                   "(see above)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_overlap.py compares two ways of driving a GPU; this machine has none")
    t0 = time.perf_counter()
    llm = offloadgen.load(args.model, dummy=True, cpu_offload=True, gpu_memory=parse_bytes(args.gpu_memory),
                          kv_offload=True, kv_quant_bits=args.kv_quant_bits, quant_bits=args.quant_bits,
                          micro_batch_size=args.micro_batch_size, max_batch_size=args.batch,
                          max_seq_len=args.prompt_len + args.gen_len, progress=False)
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ids = torch.randint(100, 1000, (args.batch, args.prompt_len))
    first_split = None
    rows = []
    with llm:
        for variant in args.variants.split(","):
            if first_split is None:
                opts = llm.engine.kv_offload
                first_split = opts.gpu_parts(len(llm.engine.micro_batches(args.batch)))
            r = one_generation(llm, ids, args.gen_len, variant, first_split)
            r.update(kv_quant_bits=args.kv_quant_bits, quant_bits=args.quant_bits, micro_batch_size=args.micro_batch_size)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
            if os.environ.get("OUT"):
                with open(os.path.join(os.environ["OUT"], "kv_overlap.jsonl"), "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(f"{'variant':>7} {'batch':>5} {'bits w/kv':>9} {'decode tok/s':>12} {'step s':>7} {'last 8 s':>8} "
          f"{'GPU parts (start->end)':>22} {'CPU attn s':>10} {'wait s':>7} {'host: CPU side s':>16} {'GPU attn issue s':>16}")
    for r in rows:
        h = r["split_history"] or [None]
        print(f"{r['variant']:>7} {r['batch']:5d} {r['quant_bits']:>4}/{r['kv_quant_bits']:<4} "
              f"{r['decode_tok_s']:12.1f} {r['step_s']:7.3f} {r['last8_step_s']:8.3f} "
              f"{str(h[0]) + '->' + str(h[-1]) + ' of ' + str(r['parts']):>22} "
              f"{r['per_step']['cpu_attention_s']:10.3f} {r['per_step']['wait_for_gpu_s']:7.3f} "
              f"{r['per_step']['cpu_side_host_s']:16.3f} {r['per_step']['gpu_attention_host_s']:16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
