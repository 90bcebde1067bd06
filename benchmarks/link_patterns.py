"""Why the all-gather's copies move less than link_probe's: the host-to-device copy patterns of a
multi-GPU run, every GPU copying at once (one thread each), from the probe's down to ours.

With `--weight-fetch allgather` on N GPUs each rank copies its 1/N of every streamed layer from one
node-shared buffer (memory mapped from a memfd and registered with cudaHostRegister), in 64 MB
pieces (offload/pinned.copy_in_chunks), while link_probe copies 2 GiB at once from a buffer of
its own made by pin_memory(). On 4 H100s the copy-only pass moved 134-148 GB/s against the
probe's 155-171 (benchmarks/RESULTS.md, session 15). Each row changes one thing:

  probe                      own pin_memory() buffer (cudaHostAlloc), one copy of the whole share
  own pinned, a layer whole  the same buffer, a layer's share at a time, one copy each
  own pinned, 64 MB          the same buffer, a layer's share at a time in 64 MB pieces
  own registered, 64 MB      a private mapping registered with cudaHostRegister (offload/pinned.py)
  own registered, huge       the same with transparent huge pages asked for (madvise)
  shared, 1/N, whole         one shared mapping of whole layers (as the memfd is), each GPU its 1/N
                             of each layer, one copy a layer
  shared, 1/N, 64 MB         the same in 64 MB pieces: what an all-gather pass does
  shared, 1/N, 64 MB, huge   the same with huge pages asked for
  ranks: memfd per layer     as the ranks do it: one process per GPU (not a thread), one memfd per
                             layer made here and mapped and registered by every process
                             (distributed.shared_host_buffers), each its 1/N in 64 MB pieces
  ranks: own parts           one process per GPU, each copying from its own 1/N of every layer in
                             memory the driver allocated (cudaHostAlloc: offload/pinned.driver_pinned),
                             what the ranks of allgather and pool hold since session 16

4 KB pages may matter (a guess to test): where DMA goes through an IOMMU, as it may on a virtual
machine, four links at once walk four times the page translations. The huge page counters of /proc/meminfo are
printed after each mapping is made, to show whether the kernel gave any.

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
from offloadgen.distributed import map_shared_memory, shared_memory  # noqa: E402
from offloadgen.offload.pinned import copy_in_chunks, pin_tensors, unpin_tensors  # noqa: E402


def together(n: int, copy_on, repeats: int = 3) -> float:
    """Best wall time of n threads, thread i running copy_on(i) on GPU i, started at once."""
    best = float("inf")
    for _ in range(repeats + 1):  # one more than asked: the first pays for first use
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


def _rank(i, pid, fds, layer, share, layers, start, results, repeats):
    """One 'rank' of the ranks rows: with fds, map every layer's memfd, register it, and copy its
    1/N of each layer; without, copy from its own parts in driver-pinned memory (fresh, so its
    own allocation time is printed). Each repeat starts when the barrier opens; reports (repeat,
    start, end) on the system-wide clock."""
    from offloadgen.offload.pinned import driver_pinned
    torch.cuda.set_device(i)
    if fds:
        host = [map_shared_memory(pid, fd, layer) for fd in fds]
        if not all(pin_tensors(host)):
            results.put(None)
            return
        parts = [h[i * share:(i + 1) * share] for h in host]
    else:
        t0 = time.perf_counter()
        parts = [driver_pinned(share) for _ in range(layers)]
        if any(p is None for p in parts):
            results.put(None)
            return
        for p in parts:
            p.fill_(1)
        print(f"rank {i}: {len(parts)} parts of {share / 1e9:.2f} GB allocated and filled in "
              f"{time.perf_counter() - t0:.2f} s", flush=True)
    dst = torch.empty(share, dtype=torch.uint8, device=f"cuda:{i}")
    for r in range(repeats + 1):
        start.wait()
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process
        for p in parts:
            copy_in_chunks(dst, p)
        torch.cuda.synchronize(i)
        results.put((r, t0, time.perf_counter()))
    if fds:
        unpin_tensors(host)


def as_ranks(n: int, layer: int, share: int, layers: int, shared: bool, repeats: int = 3) -> float:
    """Best wall time of n processes copying as the ranks of an all-gather run do (see _rank),
    from one node-shared memfd per layer or from parts of their own."""
    import multiprocessing as mp
    fds = [shared_memory(layer, f"link-patterns-{l}") for l in range(layers)] if shared else []
    for fd in fds:
        t = map_shared_memory(os.getpid(), fd, layer)
        t.fill_(1)  # the owner fills before the ranks map, as shared_host_buffers does
        del t
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(i, os.getpid(), fds, layer, share, layers, start, results, repeats))
             for i in range(n)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=300) for _ in range(n * (repeats + 1))]
    for proc in procs:
        proc.join()
    for fd in fds:
        os.close(fd)
    if None in got:
        sys.exit("link_patterns: cudaHostRegister failed in a rank")
    spans = {}
    for r, t0, t1 in got:
        a, b = spans.get(r, (t0, t1))
        spans[r] = (min(a, t0), max(b, t1))
    return min(b - a for r, (a, b) in spans.items() if r > 0)  # the first pays for first use


def host_buffer(nbytes: int, shared: bool, huge: bool) -> tuple[torch.Tensor, mmap.mmap]:
    """A page-locked host buffer made as offloadgen makes one: mapped, touched, then registered."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
    if huge:
        region.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(region, dtype=torch.uint8)
    t.fill_(1)  # touch every page before registering, as the fill does
    if not all(pin_tensors([t])):
        sys.exit("link_patterns: cudaHostRegister failed")
    return t, region


def huge_pages_in_use() -> str:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return ", ".join(f"{k} {info[k].strip()}" for k in ("AnonHugePages", "ShmemHugePages") if k in info)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layer-gib", type=float, default=1.15)  # an OPT-30B layer in fp16
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    n = torch.cuda.device_count()
    if n == 0:
        sys.exit("link_patterns: needs CUDA GPUs")
    for name in ("enabled", "shmem_enabled"):
        f = Path("/sys/kernel/mm/transparent_hugepage", name)
        print(f"transparent huge pages, {name}: {f.read_text().strip() if f.exists() else 'unknown'}")
    layer = int(args.layer_gib * (1 << 30)) // (n * 4096) * (n * 4096)  # whole pages per share
    share = layer // n
    per_gpu = share * args.layers
    dsts = [torch.empty(share, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]
    results = {}

    def per_layer(sources, chunked: bool):  # GPU i copies sources(i, l) for every layer l
        def copy_on(i):
            for layer_index in range(args.layers):
                src = sources(i, layer_index)
                copy_in_chunks(dsts[i], src) if chunked else dsts[i].copy_(src, non_blocking=True)
        return copy_on

    own = [torch.empty(per_gpu, dtype=torch.uint8).pin_memory() for _ in range(n)]
    whole_dst = [torch.empty(per_gpu, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]
    results["probe"] = together(n, lambda i: whole_dst[i].copy_(own[i], non_blocking=True))
    del whole_dst
    torch.cuda.empty_cache()
    own_share = lambda i, l: own[i][l * share:(l + 1) * share]  # noqa: E731
    results["own pinned, a layer whole"] = together(n, per_layer(own_share, False))
    results["own pinned, 64 MB"] = together(n, per_layer(own_share, True))
    del own

    for huge in (False, True):
        bufs = [host_buffer(per_gpu, shared=False, huge=huge) for _ in range(n)]
        print(f"own registered{', huge' if huge else ''}: {huge_pages_in_use()}")
        results[f"own registered, 64 MB{', huge' if huge else ''}"] = together(
            n, per_layer(lambda i, l: bufs[i][0][l * share:(l + 1) * share], True))
        unpin_tensors([b[0] for b in bufs])
        del bufs

    for huge in (False, True):
        shared, region = host_buffer(layer * args.layers, shared=True, huge=huge)
        print(f"shared{', huge' if huge else ''}: {huge_pages_in_use()}")
        part = lambda i, l: shared[l * layer + i * share:l * layer + (i + 1) * share]  # noqa: E731
        if not huge:
            results["shared, 1/N, whole"] = together(n, per_layer(part, False))
        results[f"shared, 1/N, 64 MB{', huge' if huge else ''}"] = together(n, per_layer(part, True))
        unpin_tensors([shared])
        del shared, part

    results["ranks: memfd per layer"] = as_ranks(n, layer, share, args.layers, shared=True)
    results["ranks: own parts"] = as_ranks(n, layer, share, args.layers, shared=False)

    table = {k: n * per_gpu / t for k, t in results.items()}
    print(f"{n} GPUs, {per_gpu / 1e9:.2f} GB each ({args.layers} layers of {layer / 1e9:.2f} GB, 1/{n} each)")
    for k, rate in table.items():
        print(f"  {k:<28} {rate / 1e9:7.1f} GB/s together ({rate / n / 1e9:5.1f} a GPU)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "link_patterns.json").write_text(json.dumps({"gpus": n, "bytes_per_gpu": per_gpu,
                                                                             "bytes_s": table}))


if __name__ == "__main__":
    main()
