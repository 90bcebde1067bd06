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
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class CpuSide:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        # On a CPU device (tests) the thread alone: there is no stream to order.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cpu-attention")
        self.layers = 0  # layers run with a CPU side (for the record)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def run_layer(self, on_cpu: list[int], on_gpu: list[int], hidden: list, run: Callable[[int], torch.Tensor]) -> None:
        """hidden[j] = run(j) for every j of both lists: on_cpu's in the worker thread on the side
        stream, on_gpu's here, at the same time."""
        cuda = self.stream is not None
        if cuda:
            compute = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event()
            start.record(compute)
            for j in on_cpu:
                # Made on the compute stream by the embedding, or by an MoE layer (those run there):
                # freed only once the side stream has read it. Every layer, as MoE and dense layers mix.
                hidden[j].record_stream(self.stream)
        inference, grad, threads = torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.get_num_threads()

        def side() -> dict:
            # The current stream, inference and grad mode, and OpenMP's thread count are each per
            # thread. The CPU kernel sizes its pool from the last: one core fewer than the caller's,
            # which is the core the caller's thread issues on. With every core in the pool, one of
            # its threads shared a core with it and the whole pool waited for that one: CPU
            # attention took 2.21 s a step against 1.56 s on one thread (2 x H100 host, 32 cores).
            if torch.get_num_threads() != max(1, threads - 1):
                torch.set_num_threads(max(1, threads - 1))
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                if not cuda:
                    return {j: run(j) for j in on_cpu}
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(start)
                    return {j: run(j) for j in on_cpu}
        pending = self.pool.submit(side)
        try:
            for j in on_gpu:
                hidden[j] = run(j)
        finally:
            done = pending.result()  # the worker's error, if any, comes out here
        for j, h in done.items():
            hidden[j] = h
        if cuda:
            finished = torch.cuda.Event()
            finished.record(self.stream)
            compute.wait_event(finished)
        self.layers += 1


def cpu_side_batches(batches: list, cache) -> list[int]:
    """Indices of the micro-batches that may run on the CPU side in this pass (see the module)."""
    parts: dict[int, int] = {}
    for mb in batches:
        parts[mb.part] = parts.get(mb.part, 0) + 1
    return [j for j, mb in enumerate(batches) if parts[mb.part] == 1 and cache.attends_on_cpu(mb.part, mb.rows, mb.step)]
