"""Continuous batching across data-parallel ranks (torchrun): jobs and the workload bench.

Each rank runs its own ContinuousBatcher over its own slots and its own share of the requests.
- The deal: requests go to ranks by expected work (passes a request holds a slot for: its max
  tokens plus its prompt's prefill chunks), the largest first, each to the rank with the least
  work so far (the longest-processing-time rule), so that the ranks end together. It is the same
  on every rank given the same requests, so the workload bench needs no message to deal.
- The lockstep: before every pass the ranks exchange, over a small CPU (gloo) collective, whether
  each still has work and what finished in its last pass. All ranks then run the pass, or all
  stop. With --weight-fetch allgather or pool every pass joins each layer's all-gather, so a rank
  with nothing left runs passes with no rows (empty passes: its 1/N of every layer still crosses
  its link and goes to the others) until every rank is done. With whole layers a rank with nothing
  to do skips the pass and only joins the exchange.
- A stop asked on any rank (a signal) stops admission on every rank; the rows in flight finish.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from . import distributed
from .distributed import World


def request_cost(prompt_tokens: int, new_tokens: int, prefill_chunk: int) -> int:
    """Passes a request holds a slot for at most: its prompt's prefill chunks, then a token a pass."""
    return -(-prompt_tokens // prefill_chunk) + new_tokens


def deal(costs: list[int], ranks: int) -> list[list[int]]:
    """Indices of costs per rank (ascending): the largest first, each to the rank with the least
    total so far (ties: fewer requests, then the lower rank). Deterministic."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += costs[i]
    return [sorted(s) for s in shares]


@dataclass
class LockstepClock:
    """Where one rank's time went in lockstep: in the exchanges (which wait for the slowest rank
    to arrive) and in its own passes. A rank whose passes are slow makes the others wait at the
    exchange; every rank's passes slow alike shows in pass time everywhere."""
    exchange_s: float = 0.0
    pass_s: float = 0.0
    passes: int = 0
    cpu_start: float = field(default_factory=time.thread_time)  # this thread's CPU time when made

    def say(self, rank: int) -> None:
        """One line on stderr; the CPU time is the calling thread's since the clock was made."""
        mean = self.pass_s / self.passes if self.passes else 0.0
        print(f"offloadgen: rank {rank}: {self.passes} passes of {mean:.3f} s, {self.pass_s:.1f} s in passes, "
              f"{self.exchange_s:.1f} s at the exchanges, {time.thread_time() - self.cpu_start:.1f} s of CPU",
              file=sys.stderr, flush=True)


def sharded(engine) -> bool:
    """Whether every pass joins collectives (each rank fetches 1/N of a layer and all-gathers)."""
    return getattr(engine.weights, "shards", 1) > 1


def run_in_lockstep(batcher, world: World, step: Callable | None = None, report: Callable | None = None,
                    on_gathered: Callable | None = None, stopping: Callable = lambda: None) -> dict:
    """Step this rank's batcher together with the other ranks' until none has work.

    step(): one pass (default batcher.step), returning its RequestOutputs; report(outputs): what
    rank 0 should get of them (picklable; None: nothing); on_gathered(list): rank 0 gets every
    rank's reports of a pass, in rank order, before the next pass starts. stopping(): a signal
    number once this rank is asked to stop, else None; the first one asked stops every rank's
    admission. Returns {"passes": passes run (the same on every rank), "stopped_by": the signal,
    "clock": this rank's LockstepClock}."""
    group = distributed.control_group(world)
    batcher.empty_passes = sharded(batcher.engine)
    step = step or batcher.step
    sent, stopped_by, clock = None, None, LockstepClock()
    while True:
        mine = (batcher.has_work(), batcher.active_slots > 0, stopping(), sent)
        t0 = time.perf_counter()
        every = distributed.gather(mine, world, group)
        clock.exchange_s += time.perf_counter() - t0
        if on_gathered is not None and world.is_main:
            on_gathered([m[3] for m in every if m[3] is not None])
        asked = [m[2] for m in every if m[2] is not None]
        if asked and stopped_by is None:
            stopped_by = asked[0]
            batcher.stop_admitting()
        # a stop agreed now leaves waiting requests waiting: then only rows in flight are work
        busy = any(m[1] for m in every) if stopped_by is not None else any(m[0] for m in every)
        if not busy:
            return {"passes": clock.passes, "stopped_by": stopped_by, "clock": clock}
        t0 = time.perf_counter()
        outputs = step()
        sent = report(outputs) if report is not None else None
        clock.pass_s += time.perf_counter() - t0
        clock.passes += 1
