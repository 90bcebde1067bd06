"""Several GPUs (or CPU processes) through torch.distributed: NCCL on GPUs, gloo on CPUs.

Processes are started by torchrun (`torchrun --nproc-per-node N -m offloadgen.cli bench ...`), or
by `offloadgen bench --num-gpus-per-node N`, which starts torchrun itself for one node. Every rank
runs the engine on its own slice of the batch; rank 0 gathers outputs and metrics and alone writes
logs and files. Collectives time out (OFFLOADGEN_DIST_TIMEOUT seconds, default 600) rather than
hang when a rank dies.

Two ways for the weights to reach each GPU (`--weight-fetch`):
- whole: every rank copies every streamed layer over its own host link (pure data parallelism);
- allgather: rank r copies only bytes [r/N, (r+1)/N) of a layer over its link and the GPUs
  all-gather the rest among themselves (what ZeRO stage 3 does). With NVLink much faster than
  PCIe this divides the host-link time per layer by N; see docs/distributed.md for the model.
Either way the streamed weights sit once per node, not once per rank: with whole in the node's
shared memory, with allgather (and pool) as each rank's own 1/N (offload/streaming.py).
"""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import OffloadgenError

# NVLink multicast (NVLS) stays off: on shared multi-GPU hosts a program that uses it can take the
# host's GPUs out of service;
# set for every process we start, whatever environment it was started from.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: object = None  # the process group, or None when not launched by torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.group is not None


def launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_s() -> int:
    return int(os.environ.get("OFFLOADGEN_DIST_TIMEOUT", "600"))


def init(device_type: str) -> World:
    """The process group when launched by torchrun (also for one process, so that world size 1
    runs the same code); a World of one otherwise."""
    if not launched():
        return World()
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise OffloadgenError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                  f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        extra = {"device_id": torch.device("cuda", local_rank)} if device_type == "cuda" else {}
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s()), **extra)
    global _used
    _used = True
    return World(rank, size, local_rank, local_size, dist.group.WORLD)


def device_for(world: World, device: torch.device) -> torch.device:
    if device.type == "cuda" and world.active:
        return torch.device("cuda", world.local_rank)
    return device


def local_rows(batch: int, world: World) -> slice:
    """This rank's contiguous slice of the batch; the batch must divide evenly."""
    if batch % world.size:
        raise OffloadgenError(uneven_batch_message(batch, world.size))
    share = batch // world.size
    return slice(world.rank * share, (world.rank + 1) * share)


def uneven_batch_message(batch: int, ranks: int) -> str:
    return (f"batch size {batch} does not divide by the world size {ranks}: each rank takes an equal share; "
            f"use a multiple of {ranks} (e.g. {batch + ranks - batch % ranks})")


def gather(obj, world: World, group=None) -> list:
    """Every rank's obj, in rank order (on every rank); over `group` if given (control_group)."""
    if not world.active:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=group)
    return out


def scatter(objs: list | None, world: World, group=None):
    """objs[r] (given on rank 0) to rank r; returns this rank's."""
    if not world.active:
        return objs[0]
    out = [None]
    dist.scatter_object_list(out, objs if world.is_main else None, src=0, group=group)
    return out[0]


def aggregate_h2d_rate(nbytes_each: int, ranks: int, slowest_s: float) -> float:
    """Host-to-device bytes/s of all links together, when each of `ranks` GPUs copied nbytes_each
    at once and the slowest took slowest_s (the others finished within that time)."""
    return ranks * nbytes_each / slowest_s


def allgather_receive_rate(gathered_bytes: int, ranks: int, seconds: float) -> float:
    """Bytes/s each rank receives in an all-gather of gathered_bytes in all: it sends its own
    1/ranks and receives the other (ranks - 1)/ranks. The step model divides the bytes a rank
    receives per step by this figure."""
    return (ranks - 1) / ranks * gathered_bytes / seconds


def probe_links(world: World, device: torch.device, nbytes: int = 1 << 30, repeats: int = 3) -> dict | None:
    """Both links of a run of N ranks, measured together, every rank at once (a collective: every
    rank calls it at the same point): each copies nbytes from pinned memory to its GPU (the host
    links' total = N x nbytes / the slowest rank's time), then the ranks all-gather nbytes in all
    with NCCL, as the weight fetch does a layer (bytes each rank receives per second). Best of
    `repeats` after a warm-up. None without CUDA (gloo ranks on CPUs have neither link) or with
    one rank."""
    if not world.active or world.size < 2 or device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy_s = _slowest_rank_time(lambda: dst.copy_(src, non_blocking=True), world, device, repeats)
    del src, dst
    part = -(-nbytes // world.size)
    gathered = torch.empty(part * world.size, dtype=torch.uint8, device=device)
    mine = gathered[world.rank * part:(world.rank + 1) * part]
    gather_s = _slowest_rank_time(lambda: dist.all_gather_into_tensor(gathered, mine, group=world.group),
                                  world, device, repeats)
    del gathered, mine
    torch.cuda.empty_cache()
    return {"h2d_aggregate_bytes_s": aggregate_h2d_rate(nbytes, world.size, copy_s),
            "nvlink_allgather_bytes_s": allgather_receive_rate(part * world.size, world.size, gather_s),
            "links_probed": world.size}


def _slowest_rank_time(work, world: World, device: torch.device, repeats: int) -> float:
    """The slowest rank's seconds for work(), best of `repeats` after a warm-up; the ranks start
    together (a barrier, then each waits for its GPU to have passed it)."""
    best = float("inf")
    for i in range(repeats + 1):
        torch.cuda.synchronize(device)
        dist.barrier(group=world.group)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=world.group)
        if i:  # the first warms up (pinning, NCCL's buffers)
            best = min(best, seconds.item())
    return best


_control: dict = {}


def control_group(world: World):
    """A gloo group of all ranks for small Python objects passed every pass (who still has work,
    finished records): on the CPU, so that passing them neither waits for the GPU's queued
    all-gathers nor takes NCCL's stream. The world's own group where that is gloo already. Every
    rank must make it at the same point (it is a collective the first time)."""
    if not world.active:
        return None
    if dist.get_backend(world.group) == "gloo":
        return world.group
    if "group" not in _control:
        _control["group"] = dist.new_group(backend="gloo")
    return _control["group"]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def relaunch(argv: list[str], nproc: int) -> int:
    """Start this command again under torchrun with nproc processes on this node."""
    # torchrun through launcher.py: a SIGTERM or Ctrl-C goes to rank 0, which stops as one process
    # does, and the exit status is the ranks' (0 for a server stopped on purpose), without
    # torchrun's traceback
    cmd = [sys.executable, "-m", "offloadgen.launcher", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "offloadgen.cli", *argv]
    # torchrun gives every rank OMP_NUM_THREADS=1 unless it is set; a rank that attends over an
    # offloaded KV cache on the CPU then reads it on one core (4 ranks of 64 cores read 4 GB/s
    # each on the 4-GPU H100 machine). Each rank gets its share of the cores instead.
    threads = str(max(1, (os.cpu_count() or nproc) // nproc))
    env = {"OMP_NUM_THREADS": threads, **os.environ, **NCCL_ENV, "OFFLOADGEN_RELAUNCHED": "1"}
    # torchrun runs in a session of its own, so that a Ctrl-C reaches it once, from here: it then
    # passes it to rank 0 and waits for the ranks (a server drains, a job's ranks finish the
    # requests in flight). Without this the terminal's SIGINT would also reach every rank at once.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        proc.send_signal(signum)
    in_main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        # launcher.py exits as one process would have (128 + a signal that ended it); a signal that
        # came before its handlers were set (while it imports torch) ends it, and Popen says -signal
        code = proc.wait()
        return 128 - code if code < 0 else code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def shared_host_buffers(sizes: dict, world: World, tag: str, fill) -> dict:
    """One host buffer per block, shared by the ranks of a node: local rank 0 makes each an
    anonymous shared-memory file and fills it (fill(block, tensor)), every rank maps it; see
    shared_memory for why no rank's end, a SIGKILL included, can leave one behind."""
    owner = world.local_rank == 0
    mine = {b: shared_memory(n, f"offloadgen-{tag}-{b}") for b, n in sizes.items()} if owner else {}
    try:
        pid, fds = gather((os.getpid(), mine), world)[world.rank - world.local_rank]  # the node's local rank 0
        host = {b: map_shared_memory(pid, fds[b], n) for b, n in sizes.items()}
        if owner:
            fill_in_parallel(host, fill)
        barrier(world)  # every rank has mapped and the owner has filled
    finally:
        for fd in mine.values():
            os.close(fd)
    return host


def shared_memory(nbytes: int, name: str) -> int:
    """A file of nbytes in shared memory with no name in any folder (memfd_create; `name` is what
    /proc/PID/fd shows), open as the returned descriptor. The other ranks of the node map it through
    /proc/PID/fd/FD (map_shared_memory) while this process holds it open; the memory then lives while
    any mapping does and goes with the last process, however every one ends. A file in /dev/shm
    stayed, taking its RAM, when a rank was SIGKILLed before it was unlinked."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shared_memory(pid: int, fd: int, nbytes: int) -> torch.Tensor:
    """The shared memory that process pid (of this node) holds open as fd, mapped here as uint8."""
    try:
        return torch.from_file(f"/proc/{pid}/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)
    except RuntimeError as e:
        raise OffloadgenError(f"the ranks of a node share host memory through /proc/PID/fd, and this rank "
                              f"cannot open /proc/{pid}/fd/{fd} ({e}); run every rank as one user with /proc "
                              f"readable (not mounted hidepid)") from None


def fill_in_parallel(host: dict, fill, threads: int | None = None) -> None:
    """fill(block, buffer) for every block, from several threads: making or reading weights and
    faulting in fresh pages is per-core work (PyTorch's copies release the GIL), and one thread
    filling 60 GB took 18-26 s of a 35 s start-up."""
    from concurrent.futures import ThreadPoolExecutor
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="offloadgen-fill") as pool:
        list(pool.map(lambda item: fill(*item), host.items()))


# What a collective says when the process of a rank it waits for has ended (gloo's TCP pair; NCCL's
# remote error): this rank's own work is not at fault, and the rank that ended says why itself (or
# torchrun reports the signal that ended it).
_PEER_ENDED = ("Connection closed by peer", "Connection reset by peer", "remote process exited")
PEER_ENDED_EXIT = 1  # the exit status of a rank that stops because another ended: the run did fail


def peer_ended_message(error: BaseException, rank: str) -> str | None:
    """The one line a rank says when a collective failed because another rank's process had ended
    (rank 0 closed by a broken pipe, or failing with an error it has said), or None for any other
    error, which keeps its traceback: a timeout (a rank that hangs), a bad tensor, a bug here."""
    if not isinstance(error, RuntimeError) or not any(m in str(error) for m in _PEER_ENDED):
        return None
    return f"offloadgen: rank {rank}: another rank ended before this one (its own message says why); stopping"


def finish(world: World) -> None:
    """Leave the process group in order (gloo aborts at exit if its threads are left running).
    When another rank has ended without it, the barrier fails at once (cli.main says so in one line)."""
    if world.active and dist.is_initialized():
        barrier(world)
        dist.destroy_process_group()


_used = False  # set once this process joined a process group


def exit_process(code: int) -> None:
    """Exit a process that ran under torchrun without the interpreter's teardown: with gloo, a
    background thread still joinable at teardown aborts the process ('terminate called without an
    active exception', pytorch/pytorch#190489) after all work is done and written."""
    if _used:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
