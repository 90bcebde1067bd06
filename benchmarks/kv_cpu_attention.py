"""CPU decode attention over the offloaded KV cache, against the cores' plain read bandwidth.

    python benchmarks/kv_cpu_attention.py            # on the GPU machine (16 cores): under 4 minutes
    python benchmarks/kv_cpu_attention.py --gb 0.5   # a smaller cache, for a small machine
    python benchmarks/kv_cpu_attention.py --gb 0.5 --rounds 10   # a small machine others are using

For each shape, one decode step's attention for one micro-batch of 8 rows at context 512 + 32,
over the cache as the offloaded KV cache lays it out (slot-major [slots, rows, kv_heads,
head_dim]), cycling over enough layers (about --gb GB) that every read comes from RAM:
  - the cores' plain read bandwidth: a PyTorch sum over a 2 GB buffer (the physical limit);
  - "sdpa": what the offloaded cache ran before, PyTorch SDPA over the permuted cache;
  - "kernel": offload/cpu_attention's Numba kernel (float16, bfloat16, 8-bit and 4-bit caches);
  - "chosen": what the run calls for a dense cache (impl None): whichever of the kernel and SDPA
    its first calls of the shape timed faster (the trial runs in the warm-up);
  - "fallback": the same computation in PyTorch, used where Numba does not import;
  - "start-up probe": offload/kv_cache's probe_cpu_attention_bandwidth on the same shape, what the
    run's CPU/GPU attention split starts from (it should agree with the kernel's row);
  - "runs N KB" / "slots only": the kernel with its work cut for runs of at least N KB per slot
    (the default cut asks for 8 KB), or with every thread on a range of slots (whole slots are one
    run; partial results are merged). The H100 host read 25.7 / 42.3 / 59.3 GB/s with 4 / 8 / 16
    rows a call, i.e. runs of 3.5 / 7 / 14 KB: these rows say whether longer runs are the cure.
GB/s counts the cache bytes read (packed codes, scales and minimums for the quantized caches);
"fp16-eq" is the float16 cache's bytes for the same context over the same time, so variants
compare by how fast they get through a context. A quantized cache is a half or a quarter of the
bytes, so its kernel is bound by arithmetic (widening codes, scales) rather than by memory: its goal
is an fp16-eq at least the float16 kernel's. Variants are timed in turn, round after round (best
of --rounds), so that a machine busy for a while slows all of them alike. On a GPU machine it also checks the Triton KV
dequantizer (GPU attention's path) against PyTorch's and times it.
The table is printed last; with $OUT set, the same rows go to $OUT/kv_cpu_attention.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from offloadgen.machine import cpu_read_bandwidth  # noqa: E402
from offloadgen.models.layers import sdpa  # noqa: E402
from offloadgen.offload import cpu_attention  # noqa: E402
from offloadgen.offload.kv_cache import probe_cpu_attention_bandwidth  # noqa: E402
from offloadgen.quant.kv import KVQuant  # noqa: E402

SHAPES = {  # name: (q heads, kv heads, head_dim)
    "OPT-30B (56 heads)": (56, 56, 128),
    "GQA 64/8 (Llama-2-70B)": (64, 8, 128),
}
ROWS, CONTEXT = 8, 512 + 32  # ROWS: --rows
WARMUP_CALLS = 8  # covers cpu_attention._Trial: one untimed and three timed calls of each of two candidates


def caches(kv_heads, head_dim, dtype, quant, gb):
    """Enough layers of (k, v) for one micro-batch to make about `gb` GB, and their bytes. Layers
    are copies of one random layer: what matters is that every read comes from RAM."""
    shape = (CONTEXT, ROWS, kv_heads, head_dim)
    make = (lambda: torch.randn(shape).to(dtype)) if quant is None else \
        (lambda: quant.encode(torch.randn(shape[:2] + (kv_heads * head_dim,)).to(dtype)))
    first = (make(), make())
    per_layer = sum(t.numel() * t.element_size() for t in first)
    layers = max(2, min(1024, int(gb * 1e9 // per_layer)))
    return [first] + [(first[0].clone(), first[1].clone()) for _ in range(layers - 1)], per_layer


def measure(runs, rounds):
    """Best seconds per sweep over each run's layers, the runs taken in turn in every round (not one
    after the other), so that a machine busy for a while slows every variant alike."""
    for run, layers in runs:  # compile (or load from Numba's cache), warm up, and let impl None's trial finish
        for i in range(WARMUP_CALLS):
            run(*layers[i % len(layers)])
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, (run, layers) in enumerate(runs):
            t0 = time.perf_counter()
            for k, v in layers:
                run(k, v)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def variants(q_heads, kv_heads):
    """(name, cache dtype, quantization or None, function of (q, bias, mask) -> run(k, v))."""
    kernel = lambda quant, impl="numba": lambda q, bias, mask: lambda k, v: cpu_attention.attend(  # noqa: E731
        q, k, v, CONTEXT, bias, quant=quant, impl=impl)
    out = [("sdpa (before)", torch.float16, None,
            lambda q, bias, mask: lambda k, v: sdpa(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), mask)),
           ("kernel fp16", torch.float16, None, kernel(None)),
           ("chosen fp16 (impl None)", torch.float16, None, kernel(None, None)),
           ("kernel bf16", torch.bfloat16, None, kernel(None))]
    for bits in (8, 4):
        codec = KVQuant(bits, 64, kv_heads, 128)
        out.append((f"kernel {bits}-bit g64", torch.float16, codec, kernel(codec)))
    four = KVQuant(4, 64, kv_heads, 128)
    for run_kb in (32, 128, None):
        label = f"runs {run_kb} KB" if run_kb else "slots only"
        out.append((f"kernel fp16 {label}", torch.float16, None, cut(q_heads, kv_heads, None, run_kb)))
        out.append((f"kernel 4-bit {label}", torch.float16, four, cut(q_heads, kv_heads, four, run_kb)))
    out.append(("fallback fp16 (PyTorch)", torch.float16, None, lambda q, bias, mask: lambda k, v: cpu_attention.attend(
        q, k, v, CONTEXT, bias, impl="torch")))
    return out


def cut(q_heads, kv_heads, quant, run_kb):
    """The Numba kernel with its work cut for runs of at least run_kb KB per slot (None: slots only),
    called as cpu_attention.attend calls it."""
    from offloadgen.offload import cpu_attention_numba
    threads = torch.get_num_threads()
    item_bytes = 2 * 128 * 2 if quant is None else 2 * quant.row_bytes // quant.kv_heads
    run_bytes = run_kb * 1024 if run_kb else 1 << 62
    splits = cpu_attention_numba.splits(threads, CONTEXT, ROWS * kv_heads, item_bytes, run_bytes=run_bytes)

    def make(q, bias, mask):
        return lambda k, v: cpu_attention._attend_numba(q, k, v, CONTEXT, bias, 128 ** -0.5, splits=splits, quant=quant)
    return make


def choice(group, head_dim):
    found = {c for (b, h_kv, r, d, *_), c in cpu_attention.choices().items() if (b, r, d) == (ROWS, group, head_dim)}
    return "/".join(sorted(str(c) for c in found))


def gpu_decode_check():
    """GPU attention over a 4/8-bit cache dequantizes one layer and micro-batch at a time with
    quant/triton_kv.py: compare it with the PyTorch decoder and time it (OPT-30B, 8 rows)."""
    for bits in (8, 4):
        codec = KVQuant(bits, 64, 56, 128)
        rows = codec.encode(torch.randn(CONTEXT, ROWS, codec.features, device="cuda", dtype=torch.float16))
        out = codec.decode(rows, torch.float16)
        ref = codec.decode(rows.cpu(), torch.float16)
        diff = (out.cpu().float() - ref.float()).abs().max().item()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            codec.decode(rows, torch.float16, out=out)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / 20
        print(f"GPU {bits}-bit KV decode (Triton) vs PyTorch: max |diff| {diff:.2e}; {ms:.3f} ms per layer of 8 rows "
              f"({(rows.numel() + out.numel() * 2) / ms / 1e6:.0f} GB/s)", flush=True)


def main():
    global ROWS
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=2.0, help="cache bytes cycled per measurement")
    p.add_argument("--rounds", type=int, default=3, help="sweeps per variant, taken in turn; the best counts")
    p.add_argument("--rows", type=int, default=8, help="rows of the micro-batch (a call)")
    args = p.parse_args()
    ROWS = args.rows
    threads = torch.get_num_threads()
    if torch.cuda.is_available():
        gpu_decode_check()
    read = cpu_read_bandwidth()
    rows = []
    for shape, (q_heads, kv_heads, head_dim) in SHAPES.items():
        q = torch.randn(ROWS, q_heads, 1, head_dim).half()
        mask = torch.zeros(ROWS, 1, q_heads // kv_heads, CONTEXT, dtype=torch.float16)
        bias = cpu_attention.bias_from_mask(mask, CONTEXT)
        chosen = variants(q_heads, kv_heads)
        stores = {}  # one set of layers per stored form, shared by the variants that read it
        for _, dtype, quant, _ in chosen:
            if (dtype, quant) not in stores:
                stores[dtype, quant] = caches(kv_heads, head_dim, dtype, quant, args.gb)
        runs = [(make_run(q.to(dtype), bias, mask.to(dtype)), stores[dtype, quant][0])
                for _, dtype, quant, make_run in chosen]
        for (name, dtype, quant, _), seconds in zip(chosen, measure(runs, args.rounds)):
            layers, per_layer = stores[dtype, quant]
            bw = len(layers) * per_layer / seconds
            fp16_eq = 2 * CONTEXT * ROWS * kv_heads * head_dim * 2 * len(layers) / seconds
            if name.startswith("chosen"):  # what its trial (the first calls of the first round) chose
                name = f"chosen fp16 ({choice(q_heads // kv_heads, head_dim)})"
            rows.append((shape, name, per_layer / 1e6, seconds / len(layers) * 1e3, bw / 1e9, bw / read, fp16_eq / 1e9))
            print(f"{shape:24s} {name:24s} {bw / 1e9:6.1f} GB/s", flush=True)
        del stores, runs
        for bits in (None, 8, 4):  # what the run's CPU/GPU split is decided from, on the same shape
            bw = probe_cpu_attention_bandwidth(ROWS, kv_heads, q_heads, head_dim, CONTEXT, torch.float16,
                                               quant_bits=bits)
            per_byte = 1.0 if bits is None else KVQuant(bits, 64, kv_heads, head_dim).row_bytes / (kv_heads * head_dim * 2)
            name = f"start-up probe {bits or 16}-bit"
            rows.append((shape, name, float("nan"), float("nan"), bw / 1e9, bw / read, bw / per_byte / 1e9))
            print(f"{shape:24s} {name:24s} {bw / 1e9:6.1f} GB/s", flush=True)
    import numba
    print(f"\nCPU decode attention, micro-batch {ROWS} rows x context {CONTEXT}, {threads} threads "
          f"({platform.processor() or platform.machine()}, numba {numba.__version__} "
          f"{numba.threading_layer()} layer), torch {torch.__version__}")
    print(f"plain read bandwidth (sum over 2 GB): {read / 1e9:.1f} GB/s")
    print(f"{'shape':24s} {'variant':24s} {'MB/layer':>8s} {'ms/layer':>8s} {'GB/s':>7s} {'of read':>7s} {'fp16-eq':>7s}")
    for shape, name, mb, ms, gbs, ratio, eq in rows:
        print(f"{shape:24s} {name:24s} {mb:8.1f} {ms:8.2f} {gbs:7.1f} {ratio:7.0%} {eq:7.1f}")
    if os.environ.get("OUT"):  # the records, for benchmarks/RESULTS.md
        keys = ("shape", "variant", "mb_per_layer", "ms_per_layer", "gb_s", "of_read", "fp16_eq_gb_s")
        record = {"threads": threads, "read_gb_s": read / 1e9, "rows": ROWS, "context": CONTEXT,
                  "results": [dict(zip(keys, row)) for row in rows]}
        with open(os.path.join(os.environ["OUT"], "kv_cpu_attention.json"), "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
