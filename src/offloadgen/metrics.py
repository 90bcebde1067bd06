"""One record of a timed generation, with the reference benchmark's formulas: used by `bench`,
by the distributed combiner (ranks seen as one run) and by the peer scripts in benchmarks/."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RunMetrics:
    batch: int
    prefill_latency_s: float
    decode_latency_s: float
    total_latency_s: float
    decode_step_s: float
    prefill_throughput: float  # prompt tokens/s
    decode_throughput: float  # new tokens after the first, per second of decode
    total_throughput: float  # new tokens per second of the whole generation
    peak_gpu_mem_bytes: int

    @classmethod
    def measured(cls, batch: int, prompt_len: int, gen_len: int, prefill_s: float, total_s: float,
                 peak_gpu_mem: int) -> "RunMetrics":
        """The reference's definitions: decode is everything after the prefill, and its first
        token came from the prefill, so decode makes gen_len - 1 tokens per row."""
        decode = total_s - prefill_s
        return cls(batch, prefill_s, decode, total_s, decode / max(gen_len - 1, 1),
                   batch * prompt_len / prefill_s, batch * (gen_len - 1) / max(decode, 1e-10),
                   batch * gen_len / total_s, peak_gpu_mem)

    @classmethod
    def combined(cls, ranks: list["RunMetrics"]) -> "RunMetrics":
        """Several ranks as one run: throughputs and rows summed, latencies the slowest rank's, peak
        memory the largest card's."""
        return cls(sum(r.batch for r in ranks), max(r.prefill_latency_s for r in ranks),
                   max(r.decode_latency_s for r in ranks), max(r.total_latency_s for r in ranks),
                   max(r.decode_step_s for r in ranks), sum(r.prefill_throughput for r in ranks),
                   sum(r.decode_throughput for r in ranks), sum(r.total_throughput for r in ranks),
                   max(r.peak_gpu_mem_bytes for r in ranks))

    def as_record(self) -> dict:
        return asdict(self)
