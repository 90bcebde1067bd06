"""Flags of the reference's run_model.py, in both its spellings (--quant_bits and --quant-bits)."""
from __future__ import annotations

import argparse
import re



def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 16GiB, 12GB or 8e9")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "KI": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20, "MI": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "GI": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _flag(p, name, **kw):
    """Add --a-b and its underscore spelling --a_b."""
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    p.add_argument(*names, **kw)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="the reference's run_generation benchmark",
                       description="Benchmark generation as DeepSpeed ZeRO-Inference's run_model.py does: its flags, "
                                   "metrics and log file; plus a JSON record per run.")
    _flag(p, "--model", default="facebook/opt-1.3b", help="folder, .gguf, or preset name with --dummy")
    _flag(p, "--dummy", action="store_true", help="made-up weights from a built-in config (no download)")
    _flag(p, "--batch-size", type=int, default=1)
    _flag(p, "--prompt-len", type=int, default=512)
    _flag(p, "--gen-len", type=int, default=32)
    _flag(p, "--local-rank", type=int, default=0, help="accepted for the reference's launcher")
    _flag(p, "--pin-memory", type=int, default=1, choices=[0, 1],
          help="1: offloaded weights in pinned CPU memory (default); 0: pageable, staged through pinned buffers")
    _flag(p, "--cpu-offload", action="store_true", help="weights in CPU memory, streamed to the GPU layer by layer")
    _flag(p, "--disk-offload", action="store_true")
    _flag(p, "--offload-dir", default="~/offload_dir")
    _flag(p, "--kv-offload", action="store_true", help="KV cache in CPU memory; the GPU holds only what a layer needs")
    _flag(p, "--kv-attention", default="auto", choices=["auto", "cpu", "gpu"],
          help="with --kv-offload: where decode attention runs (auto: split by the step model)")
    p.add_argument("--log-file", "--log_file", "--output-file", "--output_file", dest="output_file", default="auto",
                   help="log file, appended (auto: named from the model and configuration as the reference does)")
    _flag(p, "--verbose", type=int, default=2, choices=[0, 1, 2])
    _flag(p, "--quant-bits", type=int, default=16, choices=[4, 8, 16])
    _flag(p, "--quant-group-size", type=int, default=64)
    _flag(p, "--pin-kv-cache", action="store_true")
    _flag(p, "--async-kv-offload", action="store_true")
    _flag(p, "--loops", type=int, default=2, help="timed generations; metrics come from the last")
    _flag(p, "--num-nodes", type=int, default=1)
    _flag(p, "--num-gpus-per-node", type=int, default=1,
          help="ranks on this node; more than 1 starts torchrun (or run under torchrun yourself)")
    _flag(p, "--weight-fetch", default="whole", choices=["whole", "allgather"],
          help="several ranks: each copies whole layers over its own link, or 1/N and all-gathers the rest")
    _flag(p, "--gpu-memory", type=parse_bytes, default=None,
          help="GPU memory budget, e.g. 16GiB (default: the card's free memory less a margin)")
    _flag(p, "--micro-batch-size", type=int, default=None)
    _flag(p, "--prefetch-depth", type=int, default=1, help="layers copied ahead of the one computing")
    _flag(p, "--device", default=None)
    _flag(p, "--dtype", default="float16")
    _flag(p, "--json-file", default=None, help="JSON record (one line per run; default: the log's name, .jsonl)")
    # The job-level benchmark (bench/workload.py): --batch-size is the number of slots.
    _flag(p, "--workload", default=None, help="'synthetic' or a JSONL file ('prompt' or 'input_len', and 'output_len' "
                                              "per line): a job through the continuous batcher instead")
    _flag(p, "--num-requests", type=int, default=256, help="synthetic workload: requests")
    _flag(p, "--input-len", default="32:512", help="synthetic workload: prompt tokens, MIN:MAX (uniform)")
    _flag(p, "--output-len", default="8:256", help="synthetic workload: new tokens, MIN:MAX (uniform)")
    _flag(p, "--workload-seed", type=int, default=0)
    _flag(p, "--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per pass, at most")
    _flag(p, "--compare-static", action="store_true", help="also run the workload as static batches")
    _flag(p, "--static-only", action="store_true", help="run the workload as static batches only")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.workload:
        from .workload import cmd_workload
        cmd_workload(args)
        return 0
    from .. import distributed
    from .run import BenchArgs, run_generation
    ranks = args.num_nodes * args.num_gpus_per_node
    if ranks > 1 and args.num_nodes == 1 and not distributed.launched():
        return distributed.relaunch(args.argv, args.num_gpus_per_node)
    fields = BenchArgs.__dataclass_fields__
    run_generation(BenchArgs(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0
