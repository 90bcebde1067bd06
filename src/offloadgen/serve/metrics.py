"""Prometheus metrics of a running server. Counters and histograms are updated as passes and
requests end; gauges (queue, slots, tokens/s, bus share) are read from the live state at scrape
time, so a scrape never sees a stale value."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


def batcher_stats(batcher) -> dict:
    """The batcher's own figures: passes, pass_s, slot_occupancy, queue_length, active_slots, ..."""
    return dict(batcher.snapshot())


class ServeMetrics:
    def __init__(self, slots: int, bus_seconds_per_pass: float | None = None, window_s: float = 10.0):
        """bus_seconds_per_pass: the streamed bytes of a pass over the measured bus bandwidth, where
        weights stream to a GPU; the bus share is that over the measured pass time."""
        self.registry = CollectorRegistry()
        self.slots = slots
        self.bus_seconds_per_pass = bus_seconds_per_pass
        self.window_s = window_s
        self._recent: collections.deque = collections.deque()  # (end time, seconds, tokens) of recent passes
        self._lock = threading.Lock()
        self.worker = None  # set once the worker exists; gauges read it
        r = self.registry
        self.passes = Counter("offloadgen_passes", "Passes over the weights", registry=r)
        self.tokens = Counter("offloadgen_generation_tokens", "Tokens generated", registry=r)
        self.pass_seconds = Histogram("offloadgen_pass_seconds", "Duration of one pass over the weights",
                                      buckets=PASS_BUCKETS, registry=r)
        self.ttft = Histogram("offloadgen_time_to_first_token_seconds", "From admission to the first token",
                              buckets=PASS_BUCKETS, registry=r)
        self.requests = Counter("offloadgen_requests", "Requests answered, by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=r)
        self.rejected = Counter("offloadgen_requests_rejected", "Requests refused, by HTTP status", ["status"],
                                registry=r)
        r.register(_LiveGauges(self))

    def observe_pass(self, seconds: float, tokens: int) -> None:
        self.passes.inc()
        self.tokens.inc(tokens)
        self.pass_seconds.observe(seconds)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, seconds, tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def recent(self) -> tuple[float, float | None]:
        """(tokens/s over the window, mean pass seconds over the window or None)."""
        now = time.monotonic()
        with self._lock:
            recent = [r for r in self._recent if r[0] >= now - self.window_s]
        if not recent:
            return 0.0, None
        span = max(now - (recent[0][0] - recent[0][1]), 1e-9)
        return sum(r[2] for r in recent) / span, sum(r[1] for r in recent) / len(recent)


class _LiveGauges:
    def __init__(self, metrics: ServeMetrics):
        self.m = metrics

    def collect(self):
        m = self.m
        worker = m.worker
        stats = batcher_stats(worker.batcher) if worker is not None else {}
        in_flight = worker.in_flight() if worker is not None else 0
        active = stats.get("active_slots", 0)
        queued = stats.get("queue_length", 0)
        tokens_s, pass_s = m.recent()
        yield _gauge("offloadgen_slots", "Sequence slots (the batch)", m.slots)
        yield _gauge("offloadgen_active_slots", "Slots holding a request", active)
        yield _gauge("offloadgen_queue_length", "Requests waiting for a slot", queued)
        yield _gauge("offloadgen_requests_in_flight", "Requests admitted and not yet answered", in_flight)
        if "slot_occupancy" in stats:
            yield _gauge("offloadgen_slot_occupancy", "Mean share of slots busy per pass, since start",
                         stats["slot_occupancy"])
        yield _gauge("offloadgen_tokens_per_second", f"Generated tokens/s over the last {m.window_s:g} s", tokens_s)
        if pass_s is not None:
            yield _gauge("offloadgen_recent_pass_seconds", f"Mean pass time over the last {m.window_s:g} s", pass_s)
            if m.bus_seconds_per_pass:
                yield _gauge("offloadgen_bus_share", "Share of a pass the weight copies need at the measured bus "
                             "bandwidth (1 = bound by the bus)", m.bus_seconds_per_pass / pass_s)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g
