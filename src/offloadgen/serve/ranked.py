"""`serve` across data-parallel ranks (torchrun, or --num-gpus-per-node N): rank 0 alone listens
and runs the HTTP app; every rank runs a continuous batcher over its own slots.

Every pass begins with one small all-gather of Python objects over the gloo control group
(distributed.control_group), which carries
- from rank 0, an Order: the requests that arrived since the last exchange, the cancellations, and
  whether to stop. Rank 0's own requests go through the Order too, so that a batcher changes only
  between exchanges, on its own rank's loop;
- from every rank, a Report of its last pass: each request's new tokens and finish, its free
  slots, whether work is left, and the requests a failed pass ended (with the error).
Waiting requests form one queue for all ranks (SharedQueue), kept alike on every rank: each adds
the Order's new requests and drops its cancellations, then deals waiting requests to the free
slots the Reports show, by the same rule, so every rank knows what it got without a second
message. A request thus waits for any rank's free slot, not for one rank's, and the ranks end a
burst together (dealing each request on arrival to one rank's queue left some ranks idle while
others still had a queue, 4-10 empty passes of 82 on 4 H100s).
Rank 0 hands the other ranks' tokens to the HTTP side's queues as it does its own rows'. With
whole layers (--weight-fetch whole) a rank with nothing to do skips the pass and only joins the
exchange; with allgather/pool every pass joins each layer's all-gather, so every rank runs the
pass (an empty one when idle) whenever any rank has work, as ranks.py does for jobs. While no rank
has work rank 0 sleeps until a request comes (at most HEARTBEAT_S) before the next exchange.
The last exchange says stop: every rank leaves its loop, and the processes exit.
"""
from __future__ import annotations

import bisect
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field, replace

from .. import distributed
from ..ranks import LockstepClock, request_cost, sharded
from ..sampling import SamplingParams
from ..scheduler import new_tokens_at_most
from .worker import Event, Worker, recover

HEARTBEAT_S = 1.0  # the longest rank 0 lets the other ranks wait in an exchange while all is idle


@dataclass
class Order:
    new: list = field(default_factory=list)  # (key, prompt ids, SamplingParams), in arrival order
    cancel: list = field(default_factory=list)  # keys
    stop: bool = False


@dataclass
class Report:
    events: list = field(default_factory=list)  # (key, new token ids, finished, finish reason)
    busy: bool = False  # work left after the pass: rows, waiting or cancelled requests
    failed: list = field(default_factory=list)  # keys of the requests a failed pass ended
    error: str | None = None
    active: int = 0  # slots holding a request, after the pass
    queued: int = 0  # requests waiting in this rank's batcher, after the pass
    free: int = 0  # slots the shared queue may fill at the next exchange
    work: int = 0  # passes this rank's requests still hold slots for, at most


def state(batcher, **report) -> Report:
    """A Report of the batcher as it is now (after a pass, or before the first)."""
    return Report(busy=batcher.has_work(), active=batcher.active_slots, queued=batcher.queue_length,
                  free=batcher.slots - batcher.active_slots - batcher.queue_length,
                  work=batcher.outstanding_passes(), **report)


class SharedQueue:
    """The requests waiting for a slot on any rank, alike on every rank: every rank adds and drops
    what each Order says and deals from the same Reports, so every rank deals the same."""

    def __init__(self, admission: str, max_len: int, prefill_chunk: int):
        self.admission, self.max_len, self.prefill_chunk = admission, max_len, prefill_chunk
        self.waiting: list = []  # (key, prompt ids, SamplingParams), in admission order

    def _longest_first(self, item) -> int:  # as the batcher orders its own queue
        _, ids, sampling = item
        return -new_tokens_at_most(len(ids), sampling, self.max_len)

    def add(self, new: list) -> None:
        for item in new:
            if self.admission == "longest":  # after those of its length already waiting: stable
                bisect.insort_right(self.waiting, item, key=self._longest_first)
            else:
                self.waiting.append(item)

    def drop(self, keys: list) -> None:
        """Remove the waiting requests of these keys (those dealt already are their rank's to cancel)."""
        gone = set(keys)
        self.waiting = [item for item in self.waiting if item[0] not in gone]

    def deal(self, reports: list) -> list:
        """(rank, key, prompt ids, SamplingParams) for as many waiting requests as the reports show
        free slots, in queue order, each to the rank with a free slot and the least outstanding
        work (ties: more free slots, then the lower rank), so that the ranks end a burst together."""
        free, work, dealt = [r.free for r in reports], [r.work for r in reports], []
        while self.waiting and max(free, default=0) > 0:
            rank = min((r for r in range(len(free)) if free[r] > 0), key=lambda r: (work[r], -free[r], r))
            key, ids, sampling = self.waiting.pop(0)
            free[rank] -= 1
            work[rank] += request_cost(len(ids), new_tokens_at_most(len(ids), sampling, self.max_len),
                                       self.prefill_chunk)
            dealt.append((rank, key, ids, sampling))
        return dealt


def apply_order(batcher, order: Order, rank: int, live: dict, queue: SharedQueue, reports: list) -> list:
    """The order's changes to the shared queue, then this exchange's deal from the reports' free
    slots: this rank submits what it was dealt and cancels its own cancelled requests. live: this
    rank's requests by key. Returns the whole deal (every rank's)."""
    queue.add(order.new)
    queue.drop(order.cancel)
    for key in order.cancel:
        if key in live:
            batcher.cancel(live[key])
    dealt = queue.deal(reports)
    for r, key, ids, sampling in dealt:
        if r == rank:
            live[key] = batcher.submit(ids, sampling, request_id=key)
    return dealt


def must_run(batcher, dealt: list, order: Order, reports: list, every_pass: bool) -> bool:
    """Whether this rank runs a pass now. Every rank decides alike from what all of them saw when
    the pass's collectives join every rank (every_pass: all-gathered weights)."""
    if every_pass:
        return bool(dealt or order.cancel) or any(r.busy for r in reports)
    return batcher.has_work()


class PassFailedApart(Exception):
    """A pass failed on one rank where every pass joins the others' collectives (all-gathered
    weights): the other ranks are inside that pass's all-gathers, waiting for this rank's part,
    and no rank can go on alone. The server stops, at once, rather than hang until the collective
    timeout (OFFLOADGEN_DIST_TIMEOUT, 600 s)."""


def run_pass(batcher, live: dict, rank: int, run: bool, every_pass: bool = False) -> Report:
    """This rank's pass if it is to run one; what rank 0 should know of it. A failed pass ends this
    rank's requests (rank 0 answers them with the error) and rebuilds the batcher's rows; where
    every pass joins the other ranks' (every_pass) it raises PassFailedApart instead."""
    if not run:
        return state(batcher)
    try:
        outputs = batcher.step()
    except Exception as e:  # noqa: BLE001 - the server outlives a failed pass
        if not (every_pass and distributed.peer_ended_message(e, str(rank))):  # that rank says why
            traceback.print_exc(file=sys.stderr)
        if every_pass:
            raise PassFailedApart(f"generation failed on rank {rank}: {type(e).__name__}: {e}; with all-gathered "
                                  "weights every rank's pass joins the others', so the server stops") from e
        failed = list(live)
        for req in live.values():
            batcher.cancel(req)
        recover(batcher)
        return state(batcher, failed=failed, error=f"generation failed on rank {rank}: {type(e).__name__}: {e}")
    events = []
    for o in outputs:
        if o.finished:
            live.pop(o.request.id, None)
        if o.new_token_ids or o.finished:
            events.append((o.request.id, list(o.new_token_ids), o.finished, o.finish_reason))
    return state(batcher, events=events)


def _why_apart(e: PassFailedApart, rank: int) -> str:
    """What a rank whose sharded pass failed says: its own failure, or that another rank's process
    ended inside the pass's collective (that rank says why)."""
    if distributed.peer_ended_message(e.__cause__, str(rank)) is not None:
        return "another rank of the server stopped during a pass (its own message says why); the server stops"
    return str(e)


def follow(batcher, world, group=None) -> Report:
    """A rank other than 0: pass after pass as rank 0's orders say, until one says stop. Signals
    are rank 0's to act on (it drains, then says stop); here they are noted and ignored. Returns
    the last report (its pass counts)."""
    every_pass = batcher.empty_passes = sharded(batcher.engine)
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    live: dict = {}
    queue = SharedQueue(batcher.admission, batcher.max_len, batcher.prefill_chunk)
    report, answered, clock = state(batcher), 0, LockstepClock()
    try:
        while True:
            t0 = time.perf_counter()
            every = distributed.gather((None, report), world, group)
            clock.exchange_s += time.perf_counter() - t0
            order = every[0][0]
            if order.stop:
                break
            reports = [r for _, r in every]
            dealt = apply_order(batcher, order, world.rank, live, queue, reports)
            answered += sum(r == world.rank for r, *_ in dealt)
            run = must_run(batcher, dealt, order, reports, every_pass)
            t0 = time.perf_counter()
            try:
                report = run_pass(batcher, live, world.rank, run, every_pass)
            except PassFailedApart as e:  # rank 0's collective then fails too, and it answers every request
                print(f"offloadgen: rank {world.rank}: {_why_apart(e, world.rank)}", file=sys.stderr)
                distributed.exit_process(1)
            clock.pass_s += time.perf_counter() - t0
            clock.passes += run
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    s = batcher.stats
    print(f"offloadgen: rank {world.rank} answered {answered} requests ({s.output_tokens} tokens) in {s.passes} "
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
        self._queue = SharedQueue(batcher.admission, batcher.max_len, batcher.prefill_chunk)  # the batcher thread's
        self._busy = False  # whether any rank had work after its last pass
        self.failure: str | None = None  # set when the exchange itself failed (a rank is gone)
        self._seen: list[Report] = [state(batcher) for _ in range(world.size)]  # each rank's latest report

    # --- the HTTP side (called under self._lock) ----------------------------------------------
    def _enqueue(self, key: str, prompt_ids: list[int], sampling: SamplingParams) -> str:
        self.batcher.check_prompt(prompt_ids)  # every rank's batcher holds the same length
        self._order.new.append((key, list(prompt_ids), sampling))
        return key  # what cancel() hands back: the shared queue and the ranks know requests by key

    def _cancel_request(self, key: str) -> None:
        self._order.cancel.append(key)

    # --- the device side -----------------------------------------------------------------------
    def _run(self) -> None:
        live: dict = {}
        report, clock = state(self.batcher), LockstepClock()
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
                    return
                dealt = self._count_deal(apply_order(self.batcher, order, 0, live, self._queue, reports))
                run = must_run(self.batcher, dealt, order, reports, self.every_pass)
                t0 = time.perf_counter()
                report = run_pass(self.batcher, live, 0, run, self.every_pass)
                clock.pass_s += time.perf_counter() - t0
                clock.passes += run
                tokens += self._settle(0, report)
                self._seen[0] = report
                # the shared queue is work too: requests rank 0 got and finished in this one pass
                # (max_tokens 1, an EOS first) leave every report idle while others still wait
                # the other ranks' reports predate this deal: what it gave them is their work now
                self._busy = (any(r.busy for r in reports[1:]) or report.busy or bool(self._queue.waiting)
                              or any(rank > 0 for rank, *_ in dealt))
                report = replace(report, events=[], failed=[], error=None)  # delivered already
                if self.metrics is not None and (tokens or any(r.busy for r in reports)):
                    self.metrics.observe_pass(time.perf_counter() - start, tokens)
        except PassFailedApart as e:  # run_pass has printed the traceback of a failure of its own
            why = _why_apart(e, 0)
            print(f"offloadgen: rank 0: {why}", file=sys.stderr, flush=True)
            self._give_up(why)
        except Exception as e:  # noqa: BLE001 - an exchange failed: another rank is gone
            traceback.print_exc(file=sys.stderr)
            self._give_up(f"a rank of the server stopped: {type(e).__name__}: {e}")
        finally:  # however the loop ended, where its time went
            clock.say(0)

    def _count_deal(self, dealt: list) -> list:
        """Count this exchange's deal in /metrics' requests per rank."""
        if self.metrics is not None:
            for rank, *_ in dealt:
                self.metrics.rank_requests.labels(str(rank)).inc()
        return dealt

    def batcher_stats(self) -> dict:
        """Rank 0's batcher's figures, but slots held summed over every rank (as of each rank's
        last pass) and requests waiting: in the shared queue, or arrived since the last exchange
        (a burst during a pass of seconds is waiting too, as one process counts it at once)."""
        stats = super().batcher_stats()
        seen = list(self._seen)
        with self._lock:
            arrived, gone = [key for key, *_ in self._order.new], set(self._order.cancel)
        waiting = [key for key, *_ in list(self._queue.waiting)] + arrived
        stats["active_slots"] = sum(r.active for r in seen)
        stats["queue_length"] = sum(r.queued for r in seen) + sum(key not in gone for key in waiting)
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
