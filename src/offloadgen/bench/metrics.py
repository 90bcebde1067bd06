"""The reference's sizes, log lines and log file names, exactly (docs/reference-benchmark.md); the
metrics themselves are offloadgen.metrics.RunMetrics."""
from __future__ import annotations

from ..metrics import RunMetrics

GB = 1 << 30  # the reference divides by 2^30 and calls it GB


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


def log_lines(model_bytes: int, cache: int, hidden: int, m: RunMetrics) -> str:
    return (f"model size: {model_bytes / GB:.3f} GB\tcache size: {cache / GB:.3f} GB\thidden size (p): {hidden / GB:.3f} GB\n"
            f"peak gpu mem: {m.peak_gpu_mem_bytes / GB:.3f} GB\tprefill latency: {m.prefill_latency_s:.3f} s\t"
            f"prefill throughput: {m.prefill_throughput:.3f} token/s\n"
            f"decode latency: {m.decode_latency_s:.3f} s\tdecode throughput: {m.decode_throughput:.3f} token/s\n"
            f"total latency: {m.total_latency_s:.3f} s\ttotal throughput: {m.total_throughput:.3f} token/s\n")
