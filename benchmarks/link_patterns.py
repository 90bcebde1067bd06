"""Why the all-gather's copies move less than link_probe's: the host-to-device copy patterns of a
multi-GPU run, every GPU copying at once (one thread each), from the probe's down to ours.

With `--weight-fetch allgather` on N GPUs each rank copies its 1/N of every streamed layer from one
node-shared buffer (memory mapped from a memfd and registered with cudaHostRegister), in 64 MB
pieces (offload/pinned.copy_in_chunks), while link_probe copies 2 GiB at once from a buffer of
its own made by pin_memory(). On 4 H100s the copy-only pass moved 134-148 GB/s against the
probe's 155-171 (benchmarks/RESULTS.md, session 15). Each row changes one thing:

  probe            own pin_memory() buffer, one copy of the whole share
  own, 64 MB       the same buffer, in 64 MB pieces
  shared, 1/N      one registered shared buffer of whole layers, each GPU its 1/N of each layer, one copy a layer
  shared, 1/N, 64 MB   the same in 64 MB pieces: what a pass does

    python benchmarks/link_patterns.py [--layer-gib 1.15] [--layers 12]

Prints aggregate GB/s per pattern (best of 3), then writes them to $OUT/link_patterns.json.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from offloadgen.offload.pinned import copy_in_chunks, pin_tensors, unpin_tensors  # noqa: E402


def together(n: int, copy_on, repeats: int = 3) -> float:
    """Best wall time of n threads, thread i running copy_on(i) on GPU i, started at once."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        barrier = threading.Barrier(n + 1)

        def run(i):
            torch.cuda.set_device(i)
            barrier.wait()
            copy_on(i)
            torch.cuda.synchronize(i)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layer-gib", type=float, default=1.15)  # an OPT-30B layer in fp16
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    n = torch.cuda.device_count()
    if n == 0:
        sys.exit("link_patterns: needs CUDA GPUs")
    layer = int(args.layer_gib * (1 << 30)) // (n * 4096) * (n * 4096)  # whole pages per share
    share = layer // n
    per_gpu = share * args.layers
    dsts = [torch.empty(share, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]

    own = [torch.empty(per_gpu, dtype=torch.uint8).pin_memory() for _ in range(n)]
    results = {}

    own_dst = [torch.empty(per_gpu, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]

    def own_whole(i):
        own_dst[i].copy_(own[i], non_blocking=True)
    results["probe"] = together(n, own_whole)
    del own_dst
    torch.cuda.empty_cache()

    def own_chunks(i):
        for layer_index in range(args.layers):
            copy_in_chunks(dsts[i], own[i][layer_index * share:(layer_index + 1) * share])
    results["own, 64 MB"] = together(n, own_chunks)
    del own

    region = mmap.mmap(-1, layer * args.layers, flags=mmap.MAP_SHARED)  # as a memfd mapping is
    shared = torch.frombuffer(region, dtype=torch.uint8)
    shared.fill_(1)  # touch every page before registering, as the fill does
    if not all(pin_tensors([shared])):
        sys.exit("link_patterns: cudaHostRegister failed on the shared buffer")

    def part(i, layer_index):
        start = layer_index * layer + i * share
        return shared[start:start + share]

    def shared_whole(i):
        for layer_index in range(args.layers):
            dsts[i].copy_(part(i, layer_index), non_blocking=True)
    results["shared, 1/N"] = together(n, shared_whole)

    def shared_chunks(i):
        for layer_index in range(args.layers):
            copy_in_chunks(dsts[i], part(i, layer_index))
    results["shared, 1/N, 64 MB"] = together(n, shared_chunks)
    unpin_tensors([shared])

    table = {k: n * per_gpu / t for k, t in results.items()}
    print(f"{n} GPUs, {per_gpu / 1e9:.2f} GB each ({args.layers} layers of {layer / 1e9:.2f} GB, 1/{n} each)")
    for k, rate in table.items():
        print(f"  {k:<20} {rate / 1e9:7.1f} GB/s together ({rate / n / 1e9:5.1f} a GPU)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "link_patterns.json").write_text(json.dumps({"gpus": n, "bytes_per_gpu": per_gpu,
                                                                             "bytes_s": table}))


if __name__ == "__main__":
    main()
