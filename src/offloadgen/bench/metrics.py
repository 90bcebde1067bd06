"""The reference's metrics, sizes, log lines and log file names, exactly (DESIGN.md)."""
from __future__ import annotations

from dataclasses import dataclass

GB = 1 << 30  # the reference divides by 2^30 and calls it GB


@dataclass
class Metrics:
    batch: int
    prompt_len: int
    gen_len: int
    prefill_latency: float
    total_latency: float
    peak_gpu_mem: int

    @property
    def decode_latency(self) -> float:
        return self.total_latency - self.prefill_latency

    @property
    def prefill_throughput(self) -> float:
        return self.batch * self.prompt_len / self.prefill_latency

    @property
    def decode_throughput(self) -> float:
        return self.batch * (self.gen_len - 1) / max(self.decode_latency, 1e-10)

    @property
    def total_throughput(self) -> float:
        return self.batch * self.gen_len / self.total_latency

    @property
    def decode_step(self) -> float:
        return self.decode_latency / max(self.gen_len - 1, 1)


@dataclass
class SummedMetrics:
    """Several ranks seen as one run: throughputs summed, latencies the slowest rank's."""
    prefill_latency: float
    decode_latency: float
    total_latency: float
    decode_step: float
    prefill_throughput: float
    decode_throughput: float
    total_throughput: float
    peak_gpu_mem: int

    @classmethod
    def of(cls, d: dict) -> "SummedMetrics":
        return cls(d["prefill_latency_s"], d["decode_latency_s"], d["total_latency_s"], d["decode_step_s"],
                   d["prefill_throughput"], d["decode_throughput"], d["total_throughput"], d["peak_gpu_mem_bytes"])


def cache_bytes(batch: int, seq: int, n_layers: int, hidden: int) -> int:
    return 2 * batch * seq * n_layers * hidden * 2


def hidden_bytes(batch: int, seq: int, hidden: int) -> int:
    return batch * seq * hidden * 2


def log_filename(model: str, batch: int, prompt_len: int, gen_len: int, nodes: int, gpus: int, placement: str,
                 kv_offload: bool, quant_bits: int) -> str:
    name = f"ds-{model.rstrip('/').split('/')[-1]}-bs{batch}-prompt{prompt_len}-gen{gen_len}-n{nodes}x{gpus}-{placement}"
    if kv_offload:
        name += "-kv_offload"
    if quant_bits != 16:
        name += "-w_quant"
    return name + ".log"


def log_lines(model_bytes: int, cache: int, hidden: int, m: Metrics) -> str:
    return (f"model size: {model_bytes / GB:.3f} GB\tcache size: {cache / GB:.3f} GB\thidden size (p): {hidden / GB:.3f} GB\n"
            f"peak gpu mem: {m.peak_gpu_mem / GB:.3f} GB\tprefill latency: {m.prefill_latency:.3f} s\t"
            f"prefill throughput: {m.prefill_throughput:.3f} token/s\n"
            f"decode latency: {m.decode_latency:.3f} s\tdecode throughput: {m.decode_throughput:.3f} token/s\n"
            f"total latency: {m.total_latency:.3f} s\ttotal throughput: {m.total_throughput:.3f} token/s\n")
