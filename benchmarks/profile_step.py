"""Where a decode step's time goes: a few decode steps of one configuration under torch.profiler,
the top operations by host (CPU) time and by device (CUDA) time, one table each, printed last.

    python benchmarks/profile_step.py --model facebook/opt-30b --gpu-memory 16GiB --batch 256 \\
        --kv-offload --kv-quant-bits 4           # the 4-bit cache at batch 256 (issue 17)

The prompt pass is not profiled: the profiler starts once the first token is out (the engine's
on_prefill callback) and stops after --steps more. Dummy weights; weights in CPU RAM; micro-batches
of 8. With --trace FILE the Chrome trace is written too (large: tens of MB per step at batch 256).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import offloadgen  # noqa: E402
from offloadgen.config import parse_bytes  # noqa: E402
from offloadgen.sampling import SamplingParams  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/opt-30b")
    p.add_argument("--gpu-memory", default="16GiB")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="decode steps profiled")
    p.add_argument("--kv-offload", action="store_true")
    p.add_argument("--kv-quant-bits", type=int, default=None)
    p.add_argument("--quant-bits", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=25, help="operations shown per table")
    p.add_argument("--trace", default=None, help="also write the Chrome trace here")
    args = p.parse_args()

    t0 = time.perf_counter()
    on_gpu = torch.cuda.is_available()  # on a CPU-only machine (trying the script out) nothing streams
    llm = offloadgen.load(args.model, dummy=True, cpu_offload=on_gpu,
                          gpu_memory=parse_bytes(args.gpu_memory) if on_gpu else None,
                          kv_offload=args.kv_offload, kv_quant_bits=args.kv_quant_bits, quant_bits=args.quant_bits,
                          micro_batch_size=args.micro_batch_size, max_batch_size=args.batch,
                          max_seq_len=args.prompt_len + args.steps + 1, progress=False)
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ids = torch.randint(100, 1000, (args.batch, args.prompt_len))
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities)
    marks = {}

    def started():
        sync()
        marks["start"] = time.perf_counter()
        prof.start()

    with llm:
        llm.engine.generate(ids, torch.ones_like(ids), SamplingParams(max_new_tokens=args.steps + 1, ignore_eos=True),
                            set(), 0, on_prefill=started)
        sync()
        prof.stop()
        elapsed = time.perf_counter() - marks["start"]
        kv = llm.engine.offloaded_cache
        stats = dict(kv.stats) if kv is not None else {}
        gpu_parts = sorted(kv.gpu_parts) if kv is not None else []
        if kv is not None:
            print(f"KV cache: {kv.nbytes / 1e9:.1f} GB in CPU RAM, {kv.pinned_bytes / 1e9:.1f} GB of it pinned; "
                  f"split history {kv.split.history if kv.split else None}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(f"{args.steps} decode steps in {elapsed:.3f} s ({elapsed / args.steps:.3f} s a step); KV stats since start "
          f"(prefill included): {stats}; GPU parts {gpu_parts}")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
