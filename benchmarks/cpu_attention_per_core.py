"""Is the CPU attention kernel bound by memory or by each core's arithmetic? (issue 17)

For OPT-30B's shape (56 heads x 128, float16 cache) and 1..N threads, in GB/s of cache read:
  - "plain": the same threads summing the same layers' bytes (a Numba prange sum of 64-bit words),
    what the kernel could read at best;
  - "kernel": the Numba kernel alone (arguments made once) over layers cycled from RAM (--gb GB),
    context 544, each thread count's default cut;
  - "hot": the kernel over one layer of context --hot-context, read again and again, so that it
    comes from the last-level cache: the cores' arithmetic rate with memory out of the way. Where
    "kernel" is close to "hot" and well below "plain", the kernel is bound by arithmetic and a
    faster inner loop raises it; where "hot" is far above "kernel", memory is the limit.
Variants are timed in turn, round after round (best of --rounds), so a machine busy for a while
slows all alike; the spread (worst/best of the rounds) is printed as noise.

    PYTHONPATH=src python benchmarks/cpu_attention_per_core.py --threads 1 2 --gb 0.3 --baseline c7170bf  # 2 cores: ~1 min
    PYTHONPATH=src python benchmarks/cpu_attention_per_core.py --threads 1 4 16 --gb 1.0   # H100 host: ~1 min
    PYTHONPATH=src python benchmarks/cpu_attention_per_core.py --threads 1 --rows 8 32 --kv-bits 4 --baseline fd56acc
        # a 4-bit cache: GB/s of packed bytes, plain reading the same packed bytes
    PYTHONPATH=src python benchmarks/cpu_attention_per_core.py --threads 2 --rows 8 --visible 60 --baseline c7170bf c2db9ab
        # bench's left-padded prompts: the slots past the padding only
With $OUT set, the rows also go to $OUT/cpu_attention_per_core.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numba
import numpy as np
import torch
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from cpu_call_overhead import DIM, HEADS  # noqa: E402
from offloadgen.offload import cpu_attention  # noqa: E402
from offloadgen.quant.kv import kv_quant  # noqa: E402

CONTEXT = 544


@njit(parallel=True, cache=True)
def plain_sum(x, chunks):
    """Sum of x (uint64 words), read by prange over `chunks` contiguous pieces (one per thread).
    Indices are unsigned and each piece's sum is stored, not reduced by prange: either a signed
    index or a prange reduction kept the loop from vectorizing (5 GB/s a core instead of 25)."""
    n = np.uint64(x.shape[0])
    per = (n + np.uint64(chunks) - np.uint64(1)) // np.uint64(chunks)
    sums = np.zeros(chunks, np.uint64)
    for c in prange(chunks):
        s = np.uint64(0)
        lo = np.uint64(c) * per
        for i in range(lo, min(n, lo + per)):
            s += x[i]
        sums[c] = s
    return sums.sum()


def layers_of(rows, context, gb, codec=None):
    """Layers of k, v: float16 [context, rows, HEADS, DIM], or with codec (a quant.kv.KVQuant)
    its packed rows uint8 [context, rows, row bytes], made by the project's own quantizer."""
    first = tuple(torch.randn(context, rows, HEADS, DIM).half() for _ in range(2))
    if codec is not None:
        first = tuple(codec.encode(x.reshape(context, rows, HEADS * DIM)) for x in first)
    per_layer = 2 * first[0].numel() * first[0].element_size()
    n = max(1, int(gb * 1e9 // per_layer))
    return [first] + [(first[0].clone(), first[1].clone()) for _ in range(n - 1)], per_layer


def timed(runs, rounds):
    """Per run, (best, worst) seconds, the runs taken in turn in every round."""
    for fn in runs:
        fn()
        fn()
    times = [[] for _ in runs]
    for _ in range(rounds):
        for i, fn in enumerate(runs):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [(min(t), max(t)) for t in times]


def load_kernels(rev):
    """cpu_attention_numba as it was at git revision `rev`, as its own module (its own compiled
    cache), to time against the working tree's in the same process and rounds."""
    import importlib.util
    import subprocess
    import tempfile
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    src = subprocess.run(["git", "show", f"{rev}:src/offloadgen/offload/cpu_attention_numba.py"], cwd=root,
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="kernels_"), f"cpu_attention_numba_{rev.replace('/', '_')}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_sweep(nb, q, layers, end, threads, visible=None, codec=None):
    """A callable reading every layer once with `nb`'s kernel (its arguments made once, as
    cpu_attention._attend_numba makes them), the work cut by nb.splits for `threads` threads.
    visible: only each row's last `visible` slots unmasked (left padding, as bench's prompts).
    codec: the layers are that 4/8-bit cache's packed rows."""
    rows, heads, _, dim = q.shape
    layout, order, seg = cpu_attention._NO_LAYOUT, cpu_attention._NO_ORDER, 0
    item_bytes = 2 * dim * 2
    if codec is not None:
        layout, order = cpu_attention.kernel_layout(codec), cpu_attention._kernel_order(codec)
        seg, item_bytes = int(layout[1]), 2 * codec.row_bytes // codec.kv_heads
    mask = torch.zeros(rows, 1, 1, end)
    if visible is not None:
        mask[..., :end - visible] = -torch.inf
    bias = cpu_attention.bias_from_mask(mask, end)
    bias_np = bias.float().contiguous().numpy()
    cut = nb.splits(threads, end, rows * heads, item_bytes)
    bounds, ends, widest = cpu_attention._item_ranges_for(bias, bias_np, heads, cut[1])
    *work, qk, qsum, _ = [x.copy() for x in cpu_attention._workspace(*cut, end, rows, heads, 1, dim, per_i=widest)]
    shape = np.array([rows, heads, 1, dim, 1], np.int64)
    nb.prepare_query(cpu_attention._as_numpy(q).reshape(-1), np.float32(dim ** -0.5), dim, seg, order, qk, qsum)
    flat = [tuple(cpu_attention._as_numpy(x).reshape(-1) for x in kv) for kv in layers]
    return lambda: [nb.attend(qk, qsum, k, v, layout, shape, end, bias_np.reshape(-1),
                              bounds, ends, *work) for k, v in flat]


def one(rows, threads, gb, hot_context, rounds, kernels, visible=None, codec=None):
    """GB/s of each variant for `rows` rows on `threads` threads; kernels: {name: module}."""
    numba.set_num_threads(threads)
    q = torch.randn(rows, HEADS, 1, DIM).half()
    layers, per_layer = layers_of(rows, CONTEXT, gb, codec)
    hot_layer, hot_bytes = layers_of(rows, hot_context, 0, codec)
    hot_layer = hot_layer[:1]
    hot_reps = max(1, int(0.2e9 // hot_bytes))
    words = [tuple(x.reshape(-1).view(torch.int64).numpy().view(np.uint64) for x in kv) for kv in layers]
    runs = {"plain": (per_layer * len(layers), lambda: [plain_sum(a, threads) + plain_sum(b, threads) for a, b in words])}
    for name, nb in kernels.items():
        runs[name] = (per_layer * len(layers), kernel_sweep(nb, q, layers, CONTEXT, threads, visible, codec))
        hot = kernel_sweep(nb, q, hot_layer, hot_context, threads, codec=codec)
        runs["hot " + name] = (hot_bytes * hot_reps, lambda hot=hot: [hot() for _ in range(hot_reps)])
    times = timed([fn for _, fn in runs.values()], rounds)
    return {"rows": rows, "threads": threads,
            "gb_s": {name: nbytes / t[0] / 1e9 for (name, (nbytes, _)), t in zip(runs.items(), times)},
            "noise": {name: t[1] / t[0] for name, t in zip(runs, times)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, numba.config.NUMBA_NUM_THREADS])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--gb", type=float, default=0.5, help="cache bytes cycled per measurement (from RAM)")
    ap.add_argument("--hot-context", type=int, default=32, help="context of the cache-resident layer")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--baseline", nargs="*", default=[], help="git revisions whose kernels are timed beside the working tree's")
    ap.add_argument("--visible", type=int, help="mask all but each row's last N slots, as bench's left-padded "
                    "prompts (~60 of 544): a kernel that skips hidden keys reads a tenth of the slots, so its "
                    "'GB/s' (of slots, hidden or not) far exceeds plain; one that reads them stays near it")
    ap.add_argument("--kv-bits", type=int, choices=[4, 8], help="a 4- or 8-bit cache (groups of --group-size), "
                    "GB/s then of its packed bytes, plain reading the same packed bytes")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    codec = kv_quant(args.kv_bits, args.group_size, HEADS, DIM)
    torch.set_num_threads(1)
    kernels = {"kernel": cpu_attention._numba()}
    for rev in args.baseline:
        kernels[f"kernel@{rev}"] = load_kernels(rev)
    recs = []
    with torch.inference_mode():
        for rows in args.rows:
            for t in args.threads:
                recs.append(one(rows, t, args.gb, args.hot_context, args.rounds, kernels, args.visible, codec))
                print(f"rows {rows} threads {t}: " + ", ".join(f"{k} {v:.1f}" for k, v in recs[-1]["gb_s"].items()),
                      flush=True)
    names = list(recs[0]["gb_s"])
    cache = "fp16 cache" if codec is None else f"{codec.bits}-bit cache, groups of {codec.group_size}, packed bytes"
    print(f"\nCPU attention per core, OPT-30B ({HEADS} x {DIM}, {cache}), context {CONTEXT} from RAM, "
          f"\"hot\": context {args.hot_context} from cache; GB/s of cache read (best of {args.rounds}), "
          f"(per thread, share of plain); noise: worst/best round")
    print(f"{'rows':>4s} {'thr':>3s} " + " ".join(f"{n:>24s}" for n in names) + "  noise")
    for r in recs:
        cells = [f"{r['gb_s'][n]:6.1f} ({r['gb_s'][n] / r['threads']:5.1f}, {r['gb_s'][n] / r['gb_s']['plain']:4.0%})"
                 for n in names]
        print(f"{r['rows']:4d} {r['threads']:3d} " + " ".join(f"{c:>24s}" for c in cells) + "  "
              + "/".join(f"{r['noise'][n]:.2f}" for n in names))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cpu_attention_per_core.json"), "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
