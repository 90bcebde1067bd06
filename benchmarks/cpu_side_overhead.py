"""Where the host's time goes in one CPU-attended decode call, apart from the attention kernel.

With the KV cache in CPU RAM a decode step makes one CPU attention call per layer and CPU-attended
micro-batch (48 layers x 32 parts at OPT-30B batch 256, micro-batch 8). On the H100 the host spent
2.24 s a step in them, 1.42 s of it in attention (benchmarks/RESULTS.md, issue 17): the rest is
per-call work around the kernel. This drives OffloadedKVCache's decode path for a CPU-attended
micro-batch on a CPU device (OffloadedLayerKV.attend -> attend_on_cpu, as tests/test_kv_offload.py
does), at OPT-30B's head shape, and splits each call's host time into:

  kernel    the Numba kernels themselves (prepare_query, attend, merge)
  wrapper   the rest of cpu_attention.attend: q's scaling, the mask's ranges, buffers, the output's dtype
  encode    the new k/v into the cache's layout (_stored). On CUDA it is one GPU kernel (4/8-bit) or a
            permute-copy: there the host only launches it, so this line does not carry over
  around    everything else in the call: slot writes, the mask's bias, counters, Python

A CUDA run also stages q, k, v through pinned buffers and brings the output back (copies that only
a GPU can run); those are not here.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/cpu_side_overhead.py [--out DIR] [--compare REF]

--compare REF runs the same measurement on git revision REF's src/ too, in alternating child
processes (same machine, same minute), and prints both. Records: DIR/cpu_side_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("kernel", "wrapper", "encode", "around")


def measure(args) -> dict:
    """Per-call seconds of each part, median over rounds, for each cache kind in args.caches."""
    import torch

    from offloadgen.models.layers import StepInputs, attention_mask
    from offloadgen.offload import cpu_attention
    from offloadgen.offload.kv_cache import KVOffload, OffloadedKVCache, OffloadedLayerKV

    torch.manual_seed(0)
    clock = time.perf_counter
    spent = dict.fromkeys(("kernel", "encode"), 0.0)

    def timed(fn, into):
        def wrapper(*a, **kw):
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                spent[into] += clock() - t0
        return wrapper

    nb = cpu_attention._numba()
    if nb is None:
        raise SystemExit("Numba is needed: the kernel is what a CUDA run uses")
    for name in ("attend", "merge", "prepare_query"):
        setattr(nb, name, timed(getattr(nb, name), "kernel"))

    b, h, d, ctx, layers, parts = args.rows, args.heads, args.head_dim, args.context, args.layers, args.parts
    results = {}
    for kind in args.caches:
        bits = None if kind == "fp16" else int(kind.removeprefix("q"))
        part_slices = [slice(p * b, (p + 1) * b) for p in range(parts)]
        cache = OffloadedKVCache(layers, part_slices, ctx + 1, h, d, torch.float16, torch.device("cpu"),
                                 KVOffload(attention="cpu", quant_bits=bits))
        for t in (t for layer in cache.k + cache.v for t in layer):  # a filled cache, read from RAM
            t.copy_(torch.randint(0, 255, t.shape, dtype=torch.uint8).view(t.dtype) if bits else
                    torch.randn(t.shape).to(t.dtype))
        cache._stored = timed(cache._stored, "encode")
        start = ctx - 1  # the step that writes the last slot and attends over all ctx
        step = StepInputs(start=start, positions=torch.full((b, 1), start),
                          key_valid=torch.ones(b, ctx, dtype=torch.bool))
        step.mask = attention_mask(step, torch.float16)
        qkv = [[torch.randn(b, 1, h, d).to(torch.float16).transpose(1, 2) for _ in range(3)] for _ in range(4)]
        calls = [(i, j) for i in range(layers) for j in range(parts)]
        per_round = {p: [] for p in (*PARTS, "total")}
        for r in range(args.warmup + args.rounds):
            step.extras.clear()  # a new pass: its bias is made once, on its first call
            for name in spent:
                spent[name] = 0.0
            stats0 = dict(cache.stats)
            t0 = clock()
            for n, (i, j) in enumerate(calls):
                q, k, v = qkv[n % len(qkv)]
                OffloadedLayerKV(cache, i, j).attend(q, k, v, step, step.mask)
            total = clock() - t0
            if r < args.warmup:
                continue
            attention = cache.stats["cpu_attention_s"] - stats0["cpu_attention_s"]
            split = dict(kernel=spent["kernel"], wrapper=attention - spent["kernel"], encode=spent["encode"],
                         around=total - attention - spent["encode"], total=total)
            for p, s in split.items():
                per_round[p].append(s / len(calls))
        results[kind] = {p: statistics.median(v) for p, v in per_round.items()}
        results[kind]["calls_per_round"] = len(calls)
        cache.close()
    return results


def child(args, src: str) -> dict:
    """measure() in a fresh process importing offloadgen from `src`."""
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    cmd = [c for c in cmd if c != "--compare"]
    if args.compare:
        cmd = [c for c in cmd if c != args.compare]
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkout_src(ref: str, into: Path) -> str:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=Path(__file__).parent,
                          check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into / "src")


def table(runs: dict[str, dict]) -> str:
    lines = ["| code | cache | " + " | ".join(PARTS) + " | total | all but kernel |",
             "| --- | --- | " + " | ".join("---" for _ in PARTS) + " | --- | --- |"]
    for label, res in runs.items():
        for kind, r in res.items():
            cells = [f"{r[p] * 1e3:.3f}" for p in PARTS]
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) +
                         f" | {r['total'] * 1e3:.3f} | {(r['total'] - r['kernel']) * 1e3:.3f} |")
    return "\n".join(lines) + "\n(ms per call, median over rounds)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rows of a micro-batch")
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=544, help="slots attended (prompt 512 + 32 new)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--parts", type=int, default=4, help="CPU-attended micro-batches per layer")
    ap.add_argument("--caches", nargs="+", default=["fp16", "q4"], help="fp16, q4, q8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compare", metavar="REF", help="also measure git revision REF's src/, alternating")
    ap.add_argument("--repeats", type=int, default=3, help="with --compare: child runs per side")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for cpu_side_overhead.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    import torch
    here = str(Path(__file__).resolve().parent.parent / "src")
    if args.compare:
        with tempfile.TemporaryDirectory() as tmp:
            sides = {args.compare: checkout_src(args.compare, Path(tmp)), "this tree": here}
            got = {label: [] for label in sides}
            for _ in range(args.repeats):  # alternating, so that the machine's load falls on both
                for label, src in sides.items():
                    got[label].append(child(args, src))
        runs = {label: {kind: {p: min(run[kind][p] for run in rs) for p in rs[0][kind]} for kind in rs[0]}
                for label, rs in got.items()}  # best of the child runs, per part
    else:
        runs = {"this tree": child(args, here)}
    record = dict(bench="cpu_side_overhead", time=time.strftime("%Y-%m-%dT%H:%M:%S"), threads=torch.get_num_threads(),
                  args={k: v for k, v in vars(args).items() if k not in ("child", "out")}, runs=runs)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "cpu_side_overhead.json", "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"{args.rows} rows x {args.heads} heads x {args.head_dim}, context {args.context}, "
          f"{args.layers} layers x {args.parts} parts, {torch.get_num_threads()} threads")
    print(table(runs))


if __name__ == "__main__":
    main()
