"""One settings object for a run: every knob once, validated in one place.

`RunConfig` says what to run and where everything lives; `runtime.py` turns it into a planned
placement, a weight source, a KV cache and an engine. `load()`, `offloadgen generate`, `bench`,
`plan` and `serve` all build their runs from it, so a flag means the same thing everywhere.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from .errors import OffloadgenError

KV_ATTENTION = ("auto", "cpu", "gpu")
WEIGHT_FETCH = ("whole", "allgather", "pool")
WEIGHT_GATHER = ("nccl", "copy")
RESIDENT_LAYERS = ("spread", "last")
EXPERT_STREAMING = ("auto", "on", "off")
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
MAX_GPU_MEMORY = 1 << 50  # 1 PiB: anything larger is a typo, not a GPU


@dataclass
class RunConfig:
    # -- what to run ----------------------------------------------------------------------------------
    model: str | None = None  # a folder, a .gguf file, a preset name with dummy=True; None: the embedded default
    dummy: bool = False  # made-up weights from a built-in config
    device: str | None = None  # "cpu", "cuda" or "cuda:N"; None: cuda when there is one
    dtype: str = "auto"  # auto: float32 on the CPU, the checkpoint's 16-bit type on a GPU
    # -- where the weights live -----------------------------------------------------------------------
    cpu_offload: bool = False  # weights in CPU RAM, streamed to the GPU block by block
    disk_offload: bool = False  # weights on disk (offload_dir), read block by block
    offload_dir: str = "~/offload_dir"
    gpu_memory: int | None = None  # bytes the run may use on the GPU; None: the card's free memory less a margin
    pin_memory: bool = True  # streamed weights in page-locked memory (else staged through pinned buffers)
    prefetch_depth: int = 1  # streamed blocks in flight ahead of the one computing
    # layers kept on the GPU when not all fit: spread evenly through the pass, so the bus copies the
    # streamed layers while they compute, or last, as one run at the end (offload/placement.py)
    resident_layers: str = "spread"
    # MoE models streamed from CPU RAM: each layer's trunk ahead, then only its routed experts, with
    # an expert cache in what the budget leaves (docs/moe-streaming.md). auto: where the plan
    # expects fewer bytes per decode step than streaming whole layers; off: whole layers
    expert_streaming: str = "auto"
    # -- weight quantization --------------------------------------------------------------------------
    quant_bits: int = 16  # 4 or 8: the decoder layers' linear weights, group-wise; 16: none
    quant_group_size: int = 64
    # -- the KV cache ---------------------------------------------------------------------------------
    kv_offload: bool = False  # the KV cache in CPU RAM
    pin_kv_cache: bool | None = None  # None: the command's default (on for generate, off for bench)
    async_kv_offload: bool | None = None  # likewise
    kv_attention: str = "auto"  # with kv_offload: where decode attention runs
    kv_overlap: bool = False  # with kv_offload on a GPU: CPU attention in a thread of its own (offload/cpu_side.py)
    kv_quant_bits: int = 16  # 4 or 8: keys and values kept group-wise quantized (quant/kv.py); 16: none
    kv_quant_group_size: int = 64
    # -- what the GPU memory is planned for ------------------------------------------------------------
    max_batch_size: int = 16  # rows one engine runs at once
    max_seq_len: int | None = None  # longest prompt + new tokens; None: the model's context
    max_prompt_len: int | None = None  # longest prefill; None: max_seq_len
    micro_batch_size: int | None = None  # rows per layer pass (shrinks activations); None: the whole batch
    # -- several processes (torchrun) -----------------------------------------------------------------
    # whole: each rank copies whole blocks; allgather: 1/N each and all-gather the rest; pool: the
    # ranks also pool their GPU memory (each keeps 1/N of as many layers as fit, gathered every pass)
    weight_fetch: str = "whole"
    # how the ranks gather a block's parts (allgather, pool): NCCL's all-gather, or copies from the other
    # ranks' GPU memory by the copy engines, which leave the SMs to the layers (offload/peer_copy.py)
    weight_gather: str = "nccl"
    # allgather, pool: buffers of 1/N layer that a rank's host copies land in before the gathers, so
    # that its PCIe copies run this many layers ahead of them; None: 1.5 x N with allgather (6 on 4
    # ranks), one per ring slot with pool (offload/placement.py, allgather_landings)
    landing_buffers: int | None = None
    # -- output -----------------------------------------------------------------------------------------
    progress: bool = True

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def offloaded(self) -> bool:
        """Weights live off the GPU (RAM or disk) and stream to it."""
        return self.cpu_offload or self.disk_offload

    def kv_pinned(self) -> bool:
        return True if self.pin_kv_cache is None else self.pin_kv_cache

    def kv_async(self) -> bool:
        return True if self.async_kv_offload is None else self.async_kv_offload

    def kv_quant(self) -> tuple[int, int] | None:
        """(bits, group size) of a quantized KV cache, None for a 16-bit one."""
        return None if self.kv_quant_bits == 16 else (self.kv_quant_bits, self.kv_quant_group_size)

    def validate(self) -> "RunConfig":
        """Refuse bad values with one line that says what is needed and what was found."""
        _whole("max_batch_size", self.max_batch_size, 1)
        _whole("prefetch_depth", self.prefetch_depth, 1)
        _whole("quant_group_size", self.quant_group_size, 1)
        for name in ("max_seq_len", "max_prompt_len", "micro_batch_size", "landing_buffers"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        if self.max_prompt_len is not None and self.max_seq_len is not None and self.max_prompt_len > self.max_seq_len:
            raise OffloadgenError(f"max_prompt_len ({self.max_prompt_len}) is longer than max_seq_len ({self.max_seq_len})")
        if self.kv_quant_bits not in (4, 8, 16):
            raise OffloadgenError(f"kv_quant_bits must be 4, 8 or 16 (16: no quantization); got {self.kv_quant_bits!r}")
        _whole("kv_quant_group_size", self.kv_quant_group_size, 1)
        if self.quant_bits not in (4, 8, 16):
            raise OffloadgenError(f"quant_bits must be 4, 8 or 16 (16: no quantization); got {self.quant_bits!r}")
        if self.gpu_memory is not None:
            _whole("gpu_memory", self.gpu_memory, 1)
            if self.gpu_memory > MAX_GPU_MEMORY:
                raise OffloadgenError(f"gpu_memory of {self.gpu_memory:.3g} bytes is not a GPU's; give e.g. 16GiB")
        _choice("kv_attention", self.kv_attention, KV_ATTENTION)
        _choice("weight_fetch", self.weight_fetch, WEIGHT_FETCH)
        _choice("weight_gather", self.weight_gather, WEIGHT_GATHER)
        _choice("resident_layers", self.resident_layers, RESIDENT_LAYERS)
        if self.weight_gather != "nccl" and self.weight_fetch == "whole":
            raise OffloadgenError(f"--weight-gather {self.weight_gather} gathers the parts of a block that "
                                  "--weight-fetch allgather or pool splits over the ranks; with --weight-fetch whole "
                                  "each rank copies whole blocks and gathers nothing")
        if self.landing_buffers is not None and self.weight_fetch == "whole":
            raise OffloadgenError("--landing-buffers sizes where --weight-fetch allgather or pool lands each rank's "
                                  "part of a layer; with --weight-fetch whole each rank copies whole layers into its ring")
        _choice("expert_streaming", self.expert_streaming, EXPERT_STREAMING)
        if self.expert_streaming == "on" and (self.disk_offload or not self.pin_memory or self.weight_fetch != "whole"):
            raise OffloadgenError("--expert-streaming on copies experts from pinned CPU memory: it cannot be combined "
                                  "with --disk-offload, --pin-memory 0 or --weight-fetch allgather/pool")
        _choice("dtype", str(self.dtype).replace("torch.", ""), DTYPES)
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise OffloadgenError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if (self.pin_kv_cache or self.async_kv_offload) and not self.kv_offload:
            raise OffloadgenError("pinning the KV cache and writing it back asynchronously apply to an offloaded "
                                  "KV cache: add --kv-offload")
        if self.kv_attention != "auto" and not self.kv_offload:
            raise OffloadgenError(f"--kv-attention {self.kv_attention} chooses where attention over an offloaded KV "
                                  "cache runs: add --kv-offload")
        if self.kv_overlap and not self.kv_offload:
            raise OffloadgenError("--kv-overlap attends over an offloaded KV cache on the CPU in a thread of its own: "
                                  "add --kv-offload")
        if self.kv_overlap and self.kv_attention == "gpu":
            raise OffloadgenError("--kv-overlap runs CPU-attended micro-batches in a thread of its own; with "
                                  "--kv-attention gpu none attends on the CPU (drop one of the two)")
        if self.weight_fetch != "whole" and (self.disk_offload or not self.pin_memory):
            raise OffloadgenError(f"--weight-fetch {self.weight_fetch} streams from pinned CPU memory: it cannot be "
                                  "combined with --disk-offload or --pin-memory 0")
        if self.weight_fetch == "pool" and not self.cpu_offload:
            raise OffloadgenError("--weight-fetch pool places what the ranks' GPUs cannot hold in CPU RAM: add "
                                  "--cpu-offload")
        return self


def _whole(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OffloadgenError(f"{name} must be a whole number of at least {least}; got {value!r}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise OffloadgenError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


_UNITS = {"B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "KI": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20, "MI": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "GI": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40, "TI": 2**40}


def parse_bytes(text: str) -> int:
    """'16GiB', '12GB', '8e9' -> bytes. Refuses what is not a finite, positive size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.I)
    if not m and str(text).strip().startswith("-"):
        raise ValueError(f"{text!r} is negative: a size must be positive, e.g. 16GiB")
    if not m:
        raise ValueError(f"{text!r} is not a size like 16GiB, 12GB or 8e9")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value == 0:
        raise ValueError(f"{text!r} is zero: a size must be positive, e.g. 16GiB")
    if not math.isfinite(value) or value < 1 or value > MAX_GPU_MEMORY * 1024:
        raise ValueError(f"{text!r} is not a usable size (give e.g. 16GiB)")
    return int(value)
