"""Where a CPU attention call's time goes, apart from reading the cache (issues 16, 17).

The H100 host's kernel probe fits "a fixed cost per call plus the cache at the cores' read rate":
OPT-30B's shape read 25.7 / 42.3 / 59.3 GB/s at 4 / 8 / 16 rows a call, and a Llama-2-70B-shaped
call of 17.8 MB took 1.7 ms. This script takes one call apart, on the machine it runs on:
  - "launch": an empty Numba parallel loop over the threads (the thread pool's wake-up and join);
  - "call, context 1": cpu_attention.attend over one slot (every fixed cost: the argument checks,
    the bias's ranges, the query's preparation, the launch, the merge into the output's dtype);
  - "kernel only": cpu_attention_numba.attend with its arguments made once (no PyTorch at all);
  - the same at context 544 over layers cycled from RAM (about --gb GB), in GB/s of cache read,
    and the kernel alone with the work cut several ways (slot ranges x item ranges);
  - the cores' plain read bandwidth.
With --matrix it runs itself once per setting of the environment that decides how OpenMP and
Numba's pool behave (OMP_WAIT_POLICY, OMP_PROC_BIND, NUMBA_THREADING_LAYER) and prints one table.

    PYTHONPATH=src python benchmarks/cpu_call_overhead.py               # the GPU host: under a minute
    PYTHONPATH=src python benchmarks/cpu_call_overhead.py --matrix      # 5 settings, up to 2 minutes each
    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/cpu_call_overhead.py --gb 0.3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from offloadgen.machine import cpu_read_bandwidth  # noqa: E402
from offloadgen.offload import cpu_attention  # noqa: E402
from offloadgen.quant.kv import kv_quant  # noqa: E402

HEADS, DIM, CONTEXT = 56, 128, 544
SETTINGS = {  # name: environment added to the parent's
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "OMP_PROC_BIND=close": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "numba workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
}


def best_ms(fn, calls=50, rounds=20):
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def layers_of(rows, bits, gb, end):
    """Enough layers of (k, v) for one micro-batch to be read from RAM, and one layer's bytes."""
    if bits == 16:
        make = lambda: torch.randn(end, rows, HEADS, DIM).half()  # noqa: E731
        codec = None
    else:
        codec = kv_quant(bits, 64, HEADS, DIM)
        make = lambda: codec.encode(torch.randn(end, rows, HEADS * DIM).half())  # noqa: E731
    first = (make(), make())
    per_layer = sum(t.numel() * t.element_size() for t in first)
    n = max(2, int(gb * 1e9 // per_layer))
    return [first] + [(first[0].clone(), first[1].clone()) for _ in range(n - 1)], per_layer, codec


def kernel_args(q, k, v, end, bias, codec, splits):
    """cpu_attention._attend_numba's call of the kernel, its arguments made once."""
    nb = cpu_attention._numba()
    b, h, _, d = q.shape
    bias_np = bias.float().contiguous().numpy()
    bounds, ends, widest = cpu_attention._item_ranges_for(bias, bias_np, h, splits[1])
    *work, qk, qsum, _ = cpu_attention._workspace(*splits, end, b, h, 1, d, per_i=widest)
    shape = np.array([b, h, 1, d, bias.shape[2]], np.int64)
    layout, order, seg = cpu_attention._NO_LAYOUT, cpu_attention._NO_ORDER, 0
    if codec is not None:
        layout, order = cpu_attention.kernel_layout(codec), cpu_attention._kernel_order(codec)
        seg = int(layout[1])
    nb.prepare_query(cpu_attention._as_numpy(q).reshape(-1), np.float32(d ** -0.5), d, seg, order, qk, qsum)
    np_cache = lambda x: cpu_attention._as_numpy(x).reshape(-1)  # noqa: E731
    return lambda kk, vv: nb.attend(qk, qsum, np_cache(kk), np_cache(vv), layout, shape, end,
                                    bias_np.reshape(-1), bounds, ends, *work)


def one_setting(gb):
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def empty(x):
        for i in prange(x.shape[0]):
            x[i] += 1.0

    threads = torch.get_num_threads()
    nb = cpu_attention._numba()
    rec = {"threads": threads}
    pad = np.zeros(threads)
    empty(pad)
    rec["layer"] = numba.threading_layer()
    rec["launch_ms"] = best_ms(lambda: empty(pad), calls=200)
    torch.set_num_threads(threads)
    rows_cases = []
    for rows, bits in ((8, 16), (16, 16), (8, 4), (32, 4)):
        q = torch.randn(rows, HEADS, 1, DIM).half()
        tiny_layers, _, codec = layers_of(rows, bits, 0, 1)
        bias1 = cpu_attention.bias_from_mask(torch.zeros(rows, 1, 1, 1), 1)
        k1, v1 = tiny_layers[0]
        case = {"rows": rows, "bits": bits}
        case["call_ctx1_ms"] = best_ms(lambda: cpu_attention.attend(q, k1, v1, 1, bias1, impl="numba", quant=codec))
        item_bytes = 2 * DIM * 2 if codec is None else 2 * codec.row_bytes // HEADS
        default = nb.splits(threads, 1, rows * HEADS, item_bytes)
        raw1 = kernel_args(q, k1, v1, 1, bias1, codec, default)
        case["kernel_ctx1_ms"] = best_ms(lambda: raw1(k1, v1))
        layers, per_layer, codec = layers_of(rows, bits, gb, CONTEXT)
        bias = cpu_attention.bias_from_mask(torch.zeros(rows, 1, 1, CONTEXT), CONTEXT)

        def sweep(fn):
            return best_ms(lambda: [fn(k, v) for k, v in layers], calls=1, rounds=5) / len(layers)
        case["mb_per_layer"] = per_layer / 1e6
        case["call_ms"] = sweep(lambda k, v: cpu_attention.attend(q, k, v, CONTEXT, bias, impl="numba", quant=codec))
        default = nb.splits(threads, CONTEXT, rows * HEADS, item_bytes)
        cuts = {"default %dx%d" % default: default}
        for s in (1, 2, 4):
            for units in (threads, 2 * threads, 4 * threads):
                if units % s == 0 and units // s <= rows * HEADS:
                    cuts.setdefault(f"{s}x{units // s}", (s, units // s))
        case["kernel_ms"] = {name: sweep(kernel_args(q, *layers[0], CONTEXT, bias, codec, cut))
                             for name, cut in cuts.items()}
        rows_cases.append(case)
        del layers
    rec["cases"] = rows_cases
    rec["read_gb_s"] = cpu_read_bandwidth() / 1e9
    return rec


def print_table(results, header=True):
    if header:
        print(f"\nOne CPU attention call, OPT-30B's heads ({HEADS} x {DIM}); ms a call, GB/s of cache at context {CONTEXT}")
        print(f"{'setting':26s} {'layer':9s} {'thr':>3s} {'read':>6s} {'launch':>7s} {'rows':>4s} {'bits':>4s} "
              f"{'call@1':>7s} {'kern@1':>7s} {'call':>7s} {'GB/s':>6s} {'best cut':>12s} {'GB/s':>6s} {'default':>7s}")
    for name, rec in results.items():
        if "error" in rec:
            print(f"{name:26s} failed: {rec['error']}")
            continue
        for c in rec["cases"]:
            cut, ms = min(c["kernel_ms"].items(), key=lambda kv: kv[1])
            dflt = next(v for k, v in c["kernel_ms"].items() if k.startswith("default"))
            gbs = lambda t: c["mb_per_layer"] / t  # noqa: E731  (MB per ms = GB/s)
            print(f"{name:26s} {rec['layer']:9s} {rec['threads']:3d} {rec['read_gb_s']:6.1f} {rec['launch_ms']:7.3f} "
                  f"{c['rows']:4d} {c['bits']:4d} {c['call_ctx1_ms']:7.3f} {c['kernel_ctx1_ms']:7.3f} "
                  f"{c['call_ms']:7.3f} {gbs(c['call_ms']):6.1f} {cut:>12s} {gbs(ms):6.1f} {gbs(dflt):7.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.5, help="cache bytes cycled per measurement (from RAM)")
    ap.add_argument("--matrix", action="store_true", help="once per environment setting, each in its own process")
    ap.add_argument("--timeout", type=float, default=120, help="--matrix: seconds per setting")
    ap.add_argument("--json", help=argparse.SUPPRESS)  # a child of --matrix writes its record here
    args = ap.parse_args()
    if not args.matrix:
        with torch.inference_mode():
            rec = one_setting(args.gb)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rec, f)
        else:
            print_table({"this process": rec})
        return
    results = {}
    for n, (name, env) in enumerate(SETTINGS.items()):  # each setting's rows as it ends: a call cut short keeps them
        path = f"/tmp/cpu_call_overhead_{os.getpid()}.json"
        try:
            done = subprocess.run([sys.executable, __file__, "--gb", str(args.gb), "--json", path],
                                  env={**os.environ, **env}, timeout=args.timeout)
            results[name] = json.load(open(path)) if done.returncode == 0 else {"error": f"exit {done.returncode}"}
        except subprocess.TimeoutExpired:  # the child is killed by run() before this
            results[name] = {"error": f"over {args.timeout} s"}
        print_table({name: results[name]}, header=n == 0)
    print_table(results)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cpu_call_overhead.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
