"""`serve` across data-parallel ranks (torchrun, or --num-gpus-per-node N): rank 0 alone listens
and runs the HTTP app; every rank runs a continuous batcher over its own slots.

Every pass begins with one small all-gather of Python objects over the gloo control group
(distributed.control_group), which carries
- from rank 0, an Order: the requests that arrived since the last exchange, each dealt to the rank
  with the least outstanding work (ranks.request_cost summed over its unfinished requests), the
  cancellations, and whether to stop. Rank 0's own requests go through the Order too, so that a
  batcher changes only between exchanges, on its own rank's loop;
- from every rank, a Report of its last pass: each request's new tokens and finish, whether work
  is left, and the requests a failed pass ended (with the error).
Rank 0 hands the other ranks' tokens to the HTTP side's queues as it does its own rows'. With
whole layers (--weight-fetch whole) a rank with nothing to do skips the pass and only joins the
exchange; with allgather/pool every pass joins each layer's all-gather, so every rank runs the
pass (an empty one when idle) whenever any rank has work, as ranks.py does for jobs. While no rank
has work rank 0 sleeps until a request comes (at most HEARTBEAT_S) before the next exchange.
The last exchange says stop: every rank leaves its loop, and the processes exit.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

from .. import distributed
from ..ranks import LockstepClock, request_cost, sharded
from ..sampling import SamplingParams
from .worker import Event, Worker, recover

HEARTBEAT_S = 1.0  # the longest rank 0 lets the other ranks wait in an exchange while all is idle


@dataclass
class Order:
    new: list = field(default_factory=list)  # (rank, key, prompt ids, SamplingParams)
    cancel: list = field(default_factory=list)  # (rank, key)
    stop: bool = False


@dataclass
class Report:
    events: list = field(default_factory=list)  # (key, new token ids, finished, finish reason)
    busy: bool = False  # work left after the pass: rows, waiting or cancelled requests
    failed: list = field(default_factory=list)  # keys of the requests a failed pass ended
    error: str | None = None
    active: int = 0  # slots holding a request, after the pass
    queued: int = 0  # requests waiting for a slot, after the pass


@dataclass(eq=False)
class Placed:
    """A request as rank 0's worker holds it: the rank it was dealt to, and its expected work."""
    rank: int
    key: str
    cost: int


def apply_order(batcher, order: Order, rank: int, live: dict) -> None:
    """Submit and cancel what the order says for this rank; live: this rank's requests by key."""
    for r, key, ids, sampling in order.new:
        if r == rank:
            live[key] = batcher.submit(ids, sampling, request_id=key)
    for r, key in order.cancel:
        if r == rank and key in live:
            batcher.cancel(live[key])


def must_run(batcher, order: Order, reports: list, every_pass: bool) -> bool:
    """Whether this rank runs a pass now. Every rank decides alike from what all of them saw when
    the pass's collectives join every rank (every_pass: all-gathered weights)."""
    if every_pass:
        return bool(order.new or order.cancel) or any(r.busy for r in reports)
    return batcher.has_work()


def run_pass(batcher, live: dict, rank: int, run: bool) -> Report:
    """This rank's pass if it is to run one; what rank 0 should know of it. A failed pass ends this
    rank's requests (rank 0 answers them with the error) and rebuilds the batcher's rows."""
    if not run:
        return Report(busy=batcher.has_work(), active=batcher.active_slots, queued=batcher.queue_length)
    try:
        outputs = batcher.step()
    except Exception as e:  # noqa: BLE001 - the server outlives a failed pass
        traceback.print_exc(file=sys.stderr)
        failed = list(live)
        for req in live.values():
            batcher.cancel(req)
        recover(batcher)
        return Report(busy=batcher.has_work(), failed=failed, active=batcher.active_slots,
                      queued=batcher.queue_length, error=f"generation failed on rank {rank}: {type(e).__name__}: {e}")
    events = []
    for o in outputs:
        if o.finished:
            live.pop(o.request.id, None)
        if o.new_token_ids or o.finished:
            events.append((o.request.id, list(o.new_token_ids), o.finished, o.finish_reason))
    return Report(events, batcher.has_work(), active=batcher.active_slots, queued=batcher.queue_length)


def follow(batcher, world, group=None) -> Report:
    """A rank other than 0: pass after pass as rank 0's orders say, until one says stop. Signals
    are rank 0's to act on (it drains, then says stop); here they are noted and ignored. Returns
    the last report (its pass counts)."""
    every_pass = batcher.empty_passes = sharded(batcher.engine)
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    live: dict = {}
    report, dealt, clock = Report(), 0, LockstepClock()
    try:
        while True:
            t0 = time.perf_counter()
            every = distributed.gather((None, report), world, group)
            clock.exchange_s += time.perf_counter() - t0
            order = every[0][0]
            if order.stop:
                break
            apply_order(batcher, order, world.rank, live)
            dealt += sum(r == world.rank for r, *_ in order.new)
            run = must_run(batcher, order, [r for _, r in every], every_pass)
            t0 = time.perf_counter()
            report = run_pass(batcher, live, world.rank, run)
            clock.pass_s += time.perf_counter() - t0
            clock.passes += run
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    s = batcher.stats
    print(f"offloadgen: rank {world.rank} answered {dealt} requests ({s.output_tokens} tokens) in {s.passes} "
          f"passes, and ran {s.empty_passes} empty ones", file=sys.stderr, flush=True)
    clock.say(world.rank)
    return report


class RankedWorker(Worker):
    """Rank 0's worker when the server's slots are spread over ranks: the HTTP side is Worker's;
    the thread that owns rank 0's device also runs the exchange with the other ranks."""

    def __init__(self, batcher, slots_per_rank: int, max_queue: int, world, metrics=None, group=None):
        super().__init__(batcher, slots_per_rank * world.size, max_queue, metrics)
        self.world, self.group = world, group
        self.every_pass = batcher.empty_passes = sharded(batcher.engine)
        self._order = Order()
        self._load = [0] * world.size  # expected passes of each rank's unfinished requests
        self._placed: dict[str, Placed] = {}
        self._busy = False  # whether any rank had work after its last pass
        self.failure: str | None = None  # set when the exchange itself failed (a rank is gone)
        self._seen: list[Report] = [Report() for _ in range(world.size)]  # each rank's latest report

    # --- the HTTP side (called under self._lock) ----------------------------------------------
    def _enqueue(self, key: str, prompt_ids: list[int], sampling: SamplingParams) -> Placed:
        self.batcher.check_prompt(prompt_ids)  # every rank's batcher holds the same length
        new = min(sampling.max_new_tokens, self.batcher.max_len - len(prompt_ids))
        cost = request_cost(len(prompt_ids), new, self.batcher.prefill_chunk)
        rank = min(range(self.world.size), key=lambda r: (self._load[r], r))
        self._load[rank] += cost
        placed = self._placed[key] = Placed(rank, key, cost)
        self._order.new.append((rank, key, list(prompt_ids), sampling))
        if self.metrics is not None:
            self.metrics.rank_requests.labels(str(rank)).inc()
        return placed

    def _cancel_request(self, request: Placed) -> None:
        self._order.cancel.append((request.rank, request.key))

    # --- the device side -----------------------------------------------------------------------
    def _run(self) -> None:
        live: dict = {}
        report, clock = Report(), LockstepClock()
        try:
            while True:
                self._end_grace_period()
                self._wait_while_idle()
                with self._lock:
                    order, self._order = self._order, Order()
                order.stop = self._stop
                start = time.perf_counter()
                every = distributed.gather((order, report), self.world, self.group)
                clock.exchange_s += time.perf_counter() - start
                reports = [r for _, r in every]
                tokens = sum(self._settle(rank, r) for rank, r in enumerate(reports) if rank > 0)
                self._seen[1:] = reports[1:]
                if order.stop:
                    clock.say(0)
                    return
                apply_order(self.batcher, order, 0, live)
                run = must_run(self.batcher, order, reports, self.every_pass)
                t0 = time.perf_counter()
                report = run_pass(self.batcher, live, 0, run)
                clock.pass_s += time.perf_counter() - t0
                clock.passes += run
                tokens += self._settle(0, report)
                self._seen[0] = report
                self._busy = any(r.busy for r in reports[1:]) or report.busy
                report = Report(busy=report.busy)  # its tokens are delivered already
                if self.metrics is not None and (tokens or any(r.busy for r in reports)):
                    self.metrics.observe_pass(time.perf_counter() - start, tokens)
        except Exception as e:  # noqa: BLE001 - an exchange failed: another rank is gone
            traceback.print_exc(file=sys.stderr)
            self._give_up(f"a rank of the server stopped: {type(e).__name__}: {e}")

    def batcher_stats(self) -> dict:
        """Rank 0's batcher's figures, but slots held and requests waiting summed over every rank
        (as of each rank's last pass)."""
        stats = super().batcher_stats()
        seen = list(self._seen)
        stats["active_slots"], stats["queue_length"] = sum(r.active for r in seen), sum(r.queued for r in seen)
        return stats

    def _wait_while_idle(self) -> None:
        """Sleep while no rank has work and nothing arrived; a submit, cancel or stop wakes it."""
        with self._lock:
            idle = not (self._busy or self._stop or self._order.new or self._order.cancel)
        if idle:
            self._wake.wait(HEARTBEAT_S)
            self._wake.clear()  # whatever set it is picked up by this exchange

    def _settle(self, rank: int, report: Report) -> int:
        """Hand one rank's report to the HTTP side: tokens to each request's queue, its error to each
        request a failed pass ended. Returns the tokens delivered."""
        tokens = 0
        with self._lock:
            for key, new_ids, finished, reason in report.events:
                tokens += len(new_ids)
                if finished and (placed := self._placed.pop(key, None)) is not None:
                    self._load[placed.rank] -= placed.cost
                handle = self._handles.pop(key, None) if finished else self._handles.get(key)
                if handle is not None:
                    handle.put(Event(list(new_ids), finished, reason))
            ended = [h for h in (self._handles.pop(k, None) for k in report.failed) if h is not None]
        for h in ended:
            h.put(Event([], True, "cancelled", error=report.error))
        if tokens and self.metrics is not None:
            self.metrics.rank_tokens.labels(str(rank)).inc(tokens)
        return tokens

    def _give_up(self, why: str) -> None:
        """No more passes: answer every request with the error, refuse new ones, stop the server."""
        self.failure = why
        self.draining = True
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            h.put(Event([], True, "cancelled", error=why))
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; serve exits 1 (failure is set)
