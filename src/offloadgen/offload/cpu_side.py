"""The micro-batches that attend on the CPU, run in a thread and on a CUDA stream of their own.

With the KV cache in CPU RAM, a decode pass runs each layer over every micro-batch in turn. One
that attends on the CPU waits for its q, k and v to come back, attends (milliseconds over its
cache), and only then issues its output projection and MLP; one that attends on the GPU is some
sixty small launches. On one host thread these add up: at batch 256 with a 4-bit cache the host
spent the whole step issuing and attending while the GPU waited (issue 17: the CPU "waited for the
GPU" 0.03 s of a 2.1-2.7 s step, and the bus was busy a third of it). So the engine hands a
layer's CPU-attended micro-batches to one worker thread, which issues their work on a side
stream, while its own thread issues the GPU-attended ones on the compute stream:

    compute stream   [weights i ready] --E-> GPU parts of layer i ------------------> wait S -> done(i)
    side stream S                       E -> CPU parts' q,k,v | (CPU attends) | out + MLP ->

The side stream starts the layer from event E (the weights have arrived and, with 4-bit weights,
been dequantized) and the compute stream waits for the side stream before the layer's buffer is
released. The CPU attention kernel (Numba, nogil) and the waits release the GIL, so the two
threads run at once. Within a pass the same micro-batches stay on the CPU (the split moves only
between passes, in begin_pass), so each one's hidden state stays on one stream.

Only whole-part decode micro-batches whose part has no other micro-batch in the pass go to the
thread: a prompt chunk's rows of the same part write host slots that the CPU side would read.

Two lanes, one attention thread. One worker running its micro-batches one after the other left the
cores idle between kernels: each micro-batch waits for its q from the GPU, attends, then issues its
output projection and MLP, and only then the next one's q, k and v. On the H100 host (16 cores) a
pass over real prompts at batch 96 took 2.0 s where its CPU attention took 1.0 s and its weights
0.87 s of bus. So the CPU-attended micro-batches of a layer go to two lanes, alternately, on the
same side stream: while one lane's micro-batch attends, the other issues its projections and waits
for its q, and attends as soon as the first is done. The kernels of both lanes run in one
attention thread, one at a time (`attend`): an OpenMP pool belongs to the thread that starts it,
so two calling threads would each keep a pool of their own, spinning on the same cores. The pool
leaves a core to each lane.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch


class CpuSide:
    def __init__(self, device: torch.device, lanes: int = 2, spare_cores: int | None = None):
        if lanes < 1:
            raise ValueError(f"a CPU side needs at least one lane, not {lanes}")
        self.device = torch.device(device)
        # On a CPU device (tests) the threads alone: there is no stream to order.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.lanes = lanes
        # cores the attention thread's pool leaves to the threads that issue (one a lane unless
        # told otherwise: benchmarks/kv_overlap.py compares)
        self.spare_cores = lanes if spare_cores is None else spare_cores
        self.pool = ThreadPoolExecutor(lanes, thread_name_prefix="cpu-side")
        self.kernels = ThreadPoolExecutor(1, thread_name_prefix="cpu-attention")
        self.layers = 0  # layers run with a CPU side (for the record)
        self.threads = torch.get_num_threads()  # the engine thread's, as of its last layer
        self._here = threading.local()  # .lane: set in the lanes' threads (in_lane)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.kernels.shutdown(wait=True)

    def in_lane(self) -> bool:
        """Whether the calling thread is a lane: its kernels run beside the other lane's host work."""
        return getattr(self._here, "lane", False)

    def attend(self, kernel: Callable[[], object]) -> object:
        """kernel() run in the attention thread, after any other lane's (see the module); its
        result. Its OpenMP pool leaves a core to each lane (see run_layer)."""
        threads = max(1, self.threads - self.spare_cores)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def run() -> object:
            # OpenMP's thread count is per thread, and the kernel sizes its pool from it; so are
            # inference and grad mode: the kernel writes the caller's pinned inference tensors
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return kernel()
        # waited for through a Ctrl-C too (an MoE layer's kernels are called from the engine's
        # thread): the kernel writes the part's pinned output, which a retry would reuse
        done, error = _drain([self.kernels.submit(run)])
        if error is not None:
            raise error
        return done[0]

    def run_layer(self, on_cpu: list[int], on_gpu: list[int], hidden: list, run: Callable[[int], torch.Tensor]) -> None:
        """hidden[j] = run(j) for every j of both lists: on_cpu's in the lanes on the side stream,
        alternately, on_gpu's here, all at the same time."""
        cuda = self.stream is not None
        if cuda:
            compute = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event()
            start.record(compute)
            for j in on_cpu:
                # Made on the compute stream by the embedding, or by an MoE layer (those run there):
                # freed only once the side stream has read it. Every layer, as MoE and dense layers mix.
                hidden[j].record_stream(self.stream)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        self.threads = torch.get_num_threads()

        def lane(mine: list[int]) -> dict:
            # The current stream, inference and grad mode, and OpenMP's thread count are each per
            # thread. A lane issues GPU work and runs no CPU kernel: one thread, and a core of its
            # own beside the attention thread's pool. With every core in the pool, one of its
            # threads shared a core with the issuing thread and the whole pool waited for that
            # one: CPU attention took 2.21 s a step against 1.56 s on one thread (2 x H100 host,
            # 32 cores).
            if torch.get_num_threads() != 1:
                torch.set_num_threads(1)
            self._here.lane = True
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                if not cuda:
                    return {j: run(j) for j in mine}
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(start)
                    return {j: run(j) for j in mine}
        shares = [on_cpu[k::self.lanes] for k in range(self.lanes) if on_cpu[k::self.lanes]]
        pending = []
        try:
            for mine in shares:
                pending.append(self.pool.submit(lane, mine))
            for j in on_gpu:
                hidden[j] = run(j)
        finally:
            done, error = _drain(pending)
        if error is not None:  # here, not in the finally: an error of this thread's own goes first
            raise error
        for results in done:
            for j, h in results.items():
                hidden[j] = h
        if cuda:
            finished = torch.cuda.Event()
            finished.record(self.stream)
            compute.wait_event(finished)
        self.layers += 1


def _drain(pending: list) -> tuple[list, BaseException | None]:
    """Every lane's result once all are done, and the first error (an interrupt first). Every lane
    done before the layer ends, even when one failed or Ctrl-C came while waiting: a lane left
    running would go on writing the cache and issuing on the side stream under the next pass."""
    interrupted = None
    while True:
        try:
            wait(pending)
            break
        except BaseException as error:  # noqa: B036 (KeyboardInterrupt: kept, raised once the lanes are done)
            interrupted = interrupted or error
    done, errors = [], [] if interrupted is None else [interrupted]
    for p in pending:
        if p.exception() is None:
            done.append(p.result())
        else:
            errors.append(p.exception())
    return done, errors[0] if errors else None


def cpu_side_batches(batches: list, cache) -> list[int]:
    """Indices of the micro-batches that may run on the CPU side in this pass (see the module)."""
    parts: dict[int, int] = {}
    for mb in batches:
        parts[mb.part] = parts.get(mb.part, 0) + 1
    return [j for j, mb in enumerate(batches) if parts[mb.part] == 1 and cache.attends_on_cpu(mb.part, mb.rows, mb.step)]
