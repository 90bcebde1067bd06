"""Gathering a block's parts from the other ranks' memory with copies, in place of NCCL's all-gather
(--weight-gather copy).

NCCL moves an all-gather's bytes with kernels, and those kernels take SMs from the layers computing
beside them: on 4 H100s, a pooled OPT-30B step took 1.54x its copy-only pass; held to 8 NCCL
channels it took 1.18x, but the gathers then ran at half the rate. A GPU's copy engines move bytes
over NVLink without SMs. So each rank keeps one arena of GPU memory (its parts of the pooled blocks,
then its landing buffers) and opens every other rank's arena through CUDA IPC; a gather is N
copies, one from each rank's arena, each on a queue of its own so that the links work at once.

Which copy engines: by default ("push") each other rank's arena is opened on its own GPU, so a
copy runs on that GPU's queue, in a context this process opens there (measured on 4 H100s: correct,
but the copy-only pass took 0.253 s against NCCL's 0.213). OFFLOADGEN_PEER_COPY=pull opens the
other arenas in this GPU's own context instead (CUDA maps them over NVLink, as
cudaIpcMemLazyEnablePeerAccess allows), so the copies are this GPU's reads on its own queues and no
process opens a context on another GPU. Not yet run on a GPU: `multi_gpu.sh poolpull` is the A/B.

On CPUs (gloo ranks: the tests) the arenas are anonymous shared memory that every rank of the node maps,
and the copies are plain copies: the same layout and the same synchronization, on the CPU.

Pooled parts never change after start-up: gathering them needs no synchronization. A landing buffer
is refilled every pass, so a gather from landing buffers is fenced by two one-element all-reduces on
the gather queue: before its copies, every rank's part has landed; after them, every rank has read
what it needed, and the buffers may be refilled. The fences are ordered on the GPU, so the host never
waits for them; they take a few microseconds of one SM, not the whole transfer's.
"""
from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist


def check_peer_copy(world) -> str:
    """The direction of the copies (push or pull), or a clear refusal: of ranks on several nodes
    (runtime.plan_run asks before any weight is placed) and of an unknown OFFLOADGEN_PEER_COPY."""
    from ..errors import OffloadgenError
    mode = os.environ.get("OFFLOADGEN_PEER_COPY", "push")
    if mode not in ("push", "pull"):  # else a typo ran push, and the bench record said the typo
        raise OffloadgenError(f"OFFLOADGEN_PEER_COPY must be push or pull; got {mode!r}")
    if world.local_size != world.size:
        raise OffloadgenError(f"--weight-gather copy reads the other ranks' memory, so every rank must be on "
                              f"one node: found {world.size} ranks, {world.local_size} on this node (use "
                              "--weight-gather nccl across nodes)")
    return mode


class PeerArenas:
    """This rank's arena (`own`, nbytes of GPU or shared host memory) and every rank's, open in this
    process (`arenas[r]`; arenas[rank] is own). Every rank of the world must be on this node."""

    def __init__(self, nbytes: int, world, device: torch.device):
        mode = check_peer_copy(world)
        self.world, self.device, self.nbytes = world, device, nbytes
        self.cuda = device.type == "cuda"
        self.mode = mode if self.cuda else "shared memory"  # what the bench record says ran
        self.flag = torch.zeros(1, device=device)  # the fences' all-reduce
        if self.cuda:
            self.own = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            self.arenas = _open_over_ipc(self.own, world, mode == "pull")
            # A cross-device copy runs on the source device's current queue in this process, with
            # barriers to the destination's current queue: one pair of queues per rank, so that the
            # copies from different ranks do not wait for each other. Pulled, every arena is on this
            # device and one queue per rank is enough.
            self.recv = [torch.cuda.Stream(device) for _ in range(world.size)]
            self.send = [torch.cuda.Stream(a.device) if a.device != device else None for a in self.arenas]
        else:
            self.arenas = _open_shared_files(nbytes, world)
            self.own = self.arenas[world.rank]

    def view(self, rank: int, offset: int, n: int) -> torch.Tensor:
        return self.arenas[rank][offset:offset + n]

    def ready(self) -> None:
        """After every rank has filled its arena's fixed part (the pooled parts): from here on
        any rank may read any other's."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.world.group)

    def fence(self) -> None:
        """Every rank has reached this point of its gather queue (on CUDA: ordered on the current
        queue; the host goes on)."""
        if self.cuda:
            dist.all_reduce(self.flag, group=self.world.group, async_op=True).wait()
        else:
            dist.all_reduce(self.flag, group=self.world.group)

    def gather(self, dst: torch.Tensor, offset: int, part: int, fenced: bool):
        """dst[r * part:(r + 1) * part] = rank r's arena[offset:offset + part], for every rank r.
        On CUDA, ordered after what the current queue holds (the caller makes it wait for its own
        events first); returns (ready, released): the events after which dst may be read and, for
        a fenced gather, after which every rank has read this rank's part. None on the CPU,
        where the copies are done when this returns."""
        n = self.world.size
        if fenced:
            self.fence()
        if not self.cuda:
            for r in range(n):
                dst[r * part:(r + 1) * part].copy_(self.view(r, offset, part))
            if fenced:
                self.fence()
            return None, None
        queue = torch.cuda.current_stream(self.device)
        start = torch.cuda.Event()
        start.record(queue)
        for r in range(n):
            recv = self.recv[r]
            recv.wait_event(start)
            with torch.cuda.stream(recv):
                piece = dst[r * part:(r + 1) * part]
                if self.send[r] is None:  # this rank's own part, or a pulled one
                    piece.copy_(self.view(r, offset, part), non_blocking=True)
                else:
                    with torch.cuda.stream(self.send[r]):  # the peer's queue in this process
                        piece.copy_(self.view(r, offset, part), non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(recv)
            queue.wait_event(arrived)
        ready = torch.cuda.Event()
        ready.record(queue)
        if not fenced:
            return ready, None
        self.fence()
        released = torch.cuda.Event()
        released.record(queue)
        return ready, released

    def close(self) -> None:
        """Drop the other ranks' arenas before this rank's own goes (CUDA IPC keeps an exporting
        allocation alive while others hold it open)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.arenas = [self.own]


def _open_over_ipc(own: torch.Tensor, world, pull: bool) -> list[torch.Tensor]:
    """Every rank's arena: each rank exports its allocation's IPC handle (the way
    torch.multiprocessing passes CUDA tensors between processes), the ranks exchange them over
    the gloo control group, and each opens the others': on their own GPUs, or with pull on this
    one (the handle is then opened in this GPU's context)."""
    from torch.multiprocessing.reductions import reduce_tensor

    from ..distributed import control_group, gather
    shared = gather(reduce_tensor(own), world, group=control_group(world))
    arenas = []
    for r, (rebuild, args) in enumerate(shared):
        if r == world.rank:
            arenas.append(own)
            continue
        if pull:
            args = list(args)
            args[list(inspect.signature(rebuild).parameters).index("storage_device")] = own.device.index
        arenas.append(rebuild(*args))
    return arenas


def _open_shared_files(nbytes: int, world) -> list[torch.Tensor]:
    """Every rank's arena as anonymous shared memory (distributed.shared_memory), mapped by every
    rank of the node: each rank makes its own, the ranks exchange their (pid, descriptor), map every
    one and close their own once all have mapped. No arena has a name in /dev/shm, so a rank that
    dies at any point, SIGKILLed included, leaves none behind."""
    from ..distributed import barrier, gather, map_shared_memory, shared_memory
    fd = shared_memory(nbytes, f"offloadgen-arena-{world.rank}")
    try:
        where = gather((os.getpid(), fd), world)
        arenas = [map_shared_memory(pid, theirs, nbytes) for pid, theirs in where]
        barrier(world)  # every rank has mapped every arena: the descriptors may go
    finally:
        os.close(fd)
    return arenas
