"""The one thread that owns the device: it runs the continuous batcher's passes back to back and
hands each request's new tokens to its asyncio queue. The HTTP side only submits and cancels
(both thread-safe, neither waits for a pass), so a slow pass never blocks the event loop and a
busy event loop never delays a pass."""
from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..sampling import SamplingParams


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at --max-queue."""


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


@dataclass
class Event:
    new_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # the batcher's: "stop", "length", "cancelled"
    error: str | None = None  # the pass failed; the request is over


@dataclass(eq=False)
class Handle:
    """A request on its way: the batcher's Request and the queue its tokens arrive on."""
    key: str
    request: object
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)

    def put(self, event: Event) -> None:
        # called from the worker thread: the queue belongs to the event loop
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Worker:
    def __init__(self, batcher, slots: int, max_queue: int, metrics=None, idle_wait_s: float = 0.05):
        self.batcher, self.slots, self.max_queue = batcher, slots, max_queue
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._handles: dict[str, Handle] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        # set from a signal handler, so plain attributes only (a lock there could deadlock)
        self.draining = False
        self.drain_deadline: float | None = None

    # --- the HTTP side -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> Handle:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.draining:
                raise Draining()
            if len(self._handles) >= self.slots + self.max_queue:
                raise QueueFull()
            key = f"r{next(self._keys)}"
            # registered under the lock, so the worker cannot deliver a pass's tokens before the
            # handle exists
            handle = Handle(key, self._enqueue(key, prompt_ids, sampling), loop)
            self._handles[key] = handle
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a request (client gone, stop string found); the batcher frees its slot at the next pass."""
        with self._lock:
            if self._handles.pop(handle.key, None) is None:
                return  # already finished
            self._cancel_request(handle.request)
        self._wake.set()

    def _enqueue(self, key: str, prompt_ids: list[int], sampling: SamplingParams):
        """Hand a request to a batcher (called under the lock); what cancel() later gets back."""
        return self.batcher.submit(prompt_ids, sampling, request_id=key)

    def _cancel_request(self, request) -> None:
        self.batcher.cancel(request)

    def batcher_stats(self) -> dict:
        """The batcher's figures for /metrics (passes, slot_occupancy, active_slots, queue_length, ...)."""
        return dict(self.batcher.snapshot())

    def in_flight(self) -> int:
        with self._lock:
            return len(self._handles)

    def begin_drain(self, grace_s: float) -> None:
        """Admit nothing new; requests still running after grace_s are cancelled. Signal-safe."""
        self.draining = True
        self.drain_deadline = time.monotonic() + grace_s
        self._wake.set()

    # --- the device side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="offloadgen-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is left and end the thread (after its pass in progress)."""
        self._cancel_all("the server is shutting down")
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop:
            self._end_grace_period()
            if not self.batcher.has_work():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()  # has_work() is asked again before sleeping, so no submit is missed
                continue
            start = time.perf_counter()
            try:
                outputs = self.batcher.step()
            except Exception as e:  # noqa: BLE001 - the server outlives a failed pass
                traceback.print_exc(file=sys.stderr)
                self._cancel_all(f"generation failed: {type(e).__name__}: {e}")
                self._recover()
                continue
            elapsed = time.perf_counter() - start
            self._deliver(outputs)
            if self.metrics is not None:
                self.metrics.observe_pass(elapsed, sum(len(o.new_token_ids) for o in outputs))

    def _end_grace_period(self) -> None:
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self._cancel_all("the server is shutting down; the grace period ended before this answer")
            self.drain_deadline = None

    def _recover(self) -> None:
        recover(self.batcher)

    def _deliver(self, outputs) -> None:
        with self._lock:
            for o in outputs:
                key = getattr(o.request, "id", None)
                handle = self._handles.get(key)
                if handle is None:
                    continue  # cancelled by the HTTP side: nobody waits for it
                if o.finished:
                    del self._handles[key]
                if o.new_token_ids or o.finished:
                    handle.put(Event(list(o.new_token_ids), o.finished, o.finish_reason))

    def _cancel_all(self, why: str) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
            for h in handles:
                self._cancel_request(h.request)
        for h in handles:
            h.put(Event([], True, "cancelled", error=why))


def recover(batcher) -> None:
    """After a failed pass the batcher's rows are in an unknown state: rebuild them (the requests,
    all cancelled by the caller, then leave at the next pass)."""
    restart = getattr(batcher, "restart", None)
    if restart is not None:
        try:
            restart()
        except Exception:  # noqa: BLE001 - still serving: the next pass reports what is wrong
            traceback.print_exc(file=sys.stderr)
