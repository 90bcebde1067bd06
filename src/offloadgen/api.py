"""The Python API: load a model once, generate for many prompts.

    llm = offloadgen.load()                    # the embedded SmolLM2-135M
    llm = offloadgen.load("path/to/folder")    # or a .gguf file, or load("opt-30b", dummy=True)
    for c in llm.generate(["Paris is"], SamplingParams(max_new_tokens=20)):
        print(c.text)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import open_checkpoint
from .engine import Engine
from .errors import OffloadgenError
from .models import parse_dtype
from .offload import ResidentWeights
from .sampling import SamplingParams


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, cfg) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    if device.type == "cpu":
        return torch.float32  # half precision matmuls on CPUs are slow and less exact
    stored = parse_dtype(cfg.dtype) if cfg.dtype in ("float16", "bfloat16") else torch.float16
    return stored


def encode_prompts(tokenizer, cfg, prompts: list[str], names: list | None = None) -> list[list[int]]:
    """Token ids of each prompt, refusing empty ones and ones that fill the whole context."""
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        name = names[i] if names else i
        if not ids:
            raise OffloadgenError(f"prompt {name} is empty")
        if len(ids) >= cfg.max_position:
            raise OffloadgenError(f"prompt {name} has {len(ids)} tokens; the model's context is "
                                  f"{cfg.max_position} tokens")
    return encoded


class LLM:
    def __init__(self, checkpoint, device: torch.device, dtype: torch.dtype, weights=None,
                 micro_batch_size: int | None = None, progress: bool = True, tokenizer=None,
                 limits: tuple[int, int] | None = None, kv_offload=None):
        self.limits = limits  # (max batch, max sequence length) the GPU placement was planned for
        self.checkpoint = checkpoint
        self.cfg = checkpoint.cfg
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer or checkpoint.tokenizer()
        self.weights = weights or ResidentWeights(checkpoint, device, dtype, progress=progress)
        self.engine = Engine(self.cfg, self.weights, device, dtype, micro_batch_size, kv_offload=kv_offload)
        self._batcher = None

    def close(self) -> None:
        """Stop the weight source's threads, unpin its memory and the KV cache's. A streamed model
        holds threads and page-locked memory until this is called (or the process ends)."""
        self._batcher = None
        self.engine.close()
        if hasattr(self.weights, "close"):
            self.weights.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and left-pad; the prompt length may not exceed the model's context."""
        encoded = encode_prompts(self.tokenizer, self.cfg, prompts)
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        return input_ids, mask

    def _check_limits(self, batch: int, longest: int, new_tokens: int) -> None:
        if self.limits is not None:
            max_batch, max_len = self.limits
            if batch > max_batch or longest + new_tokens > max_len:
                raise OffloadgenError(
                    f"this model was placed on the GPU for batches of at most {max_batch} and sequences of at most "
                    f"{max_len} tokens; got {batch} prompts of up to {longest} tokens + "
                    f"{new_tokens} new: load with larger max_batch_size / max_seq_len")
        if longest + new_tokens > self.cfg.max_position:
            raise OffloadgenError(f"prompt of {longest} tokens + {new_tokens} new tokens exceeds "
                                  f"the model's context of {self.cfg.max_position} tokens")

    def batcher(self, slots: int, max_len: int, prefill_chunk: int = 512):
        """The model's continuous batcher: made once and kept while it fits, so its KV cache is
        allocated (and pinned) once, not per call."""
        from .scheduler import ContinuousBatcher
        b = self._batcher
        if b is None or b.slots != slots or b.max_len < max_len or b.has_work():
            self._batcher = None  # the old cache goes before the new one is made
            b = self._batcher = ContinuousBatcher(self, slots, max_len, prefill_chunk)
        b.prefill_chunk = prefill_chunk
        return b

    def generate(self, prompts: list[str] | str, sampling: SamplingParams | None = None, *,
                 batch_size: int | None = None, prefill_chunk: int = 512, static: bool = False) -> list[Completion]:
        """Completions in prompt order. Prompts run through the continuous batcher in `batch_size`
        slots (default: the batch the model was placed for, or all prompts at once); a row that
        ends frees its slot for the next prompt. static=True runs them as one left-padded batch."""
        sampling = sampling or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        if static:
            return self._generate_static(prompts, sampling)
        encoded = encode_prompts(self.tokenizer, self.cfg, prompts)
        slots = min(len(prompts), batch_size or (self.limits[0] if self.limits else len(prompts)))
        longest = max(len(ids) for ids in encoded)
        self._check_limits(slots, longest, sampling.max_new_tokens)
        batcher = self.batcher(slots, longest + sampling.max_new_tokens, prefill_chunk)
        requests = [batcher.submit(ids, sampling) for ids in encoded]
        while batcher.has_work():
            batcher.step()
        return [Completion(p, r.text, r.output_ids, r.finish_reason) for p, r in zip(prompts, requests)]

    def _generate_static(self, prompts: list[str], sampling: SamplingParams) -> list[Completion]:
        input_ids, mask = self.encode_batch(prompts)
        self._check_limits(len(prompts), input_ids.shape[1], sampling.max_new_tokens)

        def ends_in_stop_string(row, tokens):
            text = self.tokenizer.decode(tokens)
            return any(s in text for s in sampling.stop)
        out = self.engine.generate(input_ids, mask, sampling, self.tokenizer.eos_token_ids,
                                   self.tokenizer.pad_token_id,
                                   stop_fn=ends_in_stop_string if sampling.stop else None)
        completions = []
        for prompt, tokens, reason in zip(prompts, out.tokens, out.finish_reasons):
            if not sampling.ignore_eos and tokens and tokens[-1] in self.tokenizer.eos_token_ids:
                tokens = tokens[:-1]
            text = self.tokenizer.decode(tokens)
            for s in sampling.stop:
                if s in text:
                    text = text[:text.index(s)]
            completions.append(Completion(prompt, text, tokens, reason))
        return completions


def place_weights(checkpoint, device: torch.device, dtype: torch.dtype, *, cpu_offload: bool = False,
                  gpu_memory: int | None = None, pin_memory: bool = True, max_batch_size: int = 16,
                  max_seq_len: int | None = None, micro_batch_size: int | None = None, quant_bits: int = 16,
                  quant_group_size: int = 64, progress: bool = True, kv_offload=None, offload_dir: str | None = None):
    """The weight source for a run: resident, quantized, or streamed from CPU memory under a GPU
    budget planned for `max_batch_size` sequences of `max_seq_len` tokens; with kv_offload (a
    KVOffload) the KV cache is planned in CPU memory; with offload_dir the streamed weights are
    read from disk there instead of held in RAM. Returns (weights, limits, kv_offload resolved)."""
    from .offload.placement import all_resident, plan_placement
    from .offload.streaming import StreamingWeights
    from .plan import check_host_memory
    from .quant import QuantConfig
    cfg = checkpoint.cfg
    quant = QuantConfig(quant_bits, quant_group_size) if quant_bits != 16 else None
    cpu_offload = cpu_offload or offload_dir is not None
    if offload_dir is not None and device.type != "cuda":  # a CPU run: layers stream from disk into RAM buffers
        from .offload.placement import disk_placement_on_cpu
        placement = disk_placement_on_cpu(cfg, 1, torch.empty((), dtype=dtype).element_size())
        placement.bytes["weights_on_disk"] = True
        return (StreamingWeights(checkpoint, device, dtype, placement, progress=progress, quant=quant,
                                 offload_dir=offload_dir), None, kv_offload)
    if (cpu_offload or kv_offload is not None) and device.type == "cuda":
        from .bench.run import default_budget
        max_len = min(max_seq_len or cfg.max_position, cfg.max_position)
        elem = torch.empty((), dtype=dtype).element_size()
        budget = gpu_memory or default_budget(device)
        if kv_offload is not None:
            from .bench.hardware import h2d_bandwidth
            from .offload.placement import plan_kv_offload
            placement, kv_offload, _ = plan_kv_offload(cfg, elem, budget, max_batch_size, max_len, 0, micro_batch_size,
                                                       1, quant, kv_offload, h2d_bandwidth(device)["best"], dtype,
                                                       offload=cpu_offload)
        else:
            placement = plan_placement(cfg, elem, budget, max_batch_size, max_len, 0, micro_batch_size, offload=True,
                                       quant=quant)
        if offload_dir is not None:
            placement.bytes["weights_on_disk"] = True
        check_host_memory(placement, quantized=quant is not None)
        if placement.streamed or quant is not None:
            weights = StreamingWeights(checkpoint, device, dtype, placement, pinned=pin_memory, progress=progress,
                                       quant=quant, offload_dir=offload_dir)
        else:
            weights = ResidentWeights(checkpoint, device, dtype, progress=progress)
        return weights, (max_batch_size, max_len), kv_offload
    if cpu_offload:
        raise OffloadgenError("--cpu-offload streams weights to a GPU; this run is on the CPU, where the "
                              "weights already are (drop --cpu-offload)")
    if quant is not None:
        return (StreamingWeights(checkpoint, device, dtype, all_resident(cfg), progress=progress, quant=quant), None,
                kv_offload)
    return ResidentWeights(checkpoint, device, dtype, progress=progress), None, kv_offload


def load(model: str | None = None, *, dummy: bool = False, device: str | torch.device | None = None,
         dtype: str | torch.dtype = "auto", micro_batch_size: int | None = None, progress: bool = True,
         quant_bits: int = 16, quant_group_size: int = 64, tokenizer=None, cpu_offload: bool = False,
         gpu_memory: int | None = None, pin_memory: bool = True, max_batch_size: int = 16,
         max_seq_len: int | None = None, kv_offload: bool = False, pin_kv_cache: bool = True,
         async_kv_offload: bool = True, kv_attention: str = "auto", offload_dir: str | None = None) -> LLM:
    """Load a model folder, a GGUF file, a preset (dummy=True), or the embedded default (None).

    quant_bits 4 or 8 stores the decoder layers' linear weights group-wise quantized and
    dequantizes each layer just before it runs. cpu_offload keeps weights in CPU memory and
    streams them to the GPU layer by layer, with the layers that fit `gpu_memory` (bytes) kept
    resident; the placement is planned for `max_batch_size` prompts of `max_seq_len` tokens.
    kv_offload keeps the KV cache in CPU memory (pinned, written back asynchronously by default),
    with decode attention on the CPU, the GPU, or split between them (kv_attention). offload_dir
    keeps the streamed weights on disk there (written once), for models larger than CPU RAM."""
    from .offload.kv_cache import KVOffload
    checkpoint = open_checkpoint(model, dummy=dummy)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadgenError("device 'cuda' asked for, but this machine has no CUDA GPU")
    dtype = resolve_dtype(dtype, device, checkpoint.cfg)
    kv = KVOffload(pinned=pin_kv_cache, async_write=async_kv_offload, attention=kv_attention) if kv_offload else None
    weights, limits, kv = place_weights(checkpoint, device, dtype, cpu_offload=cpu_offload, gpu_memory=gpu_memory,
                                        pin_memory=pin_memory, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                        micro_batch_size=micro_batch_size, quant_bits=quant_bits,
                                        quant_group_size=quant_group_size, progress=progress, kv_offload=kv,
                                        offload_dir=offload_dir)
    return LLM(checkpoint, device, dtype, weights=weights, micro_batch_size=micro_batch_size, progress=progress,
               tokenizer=tokenizer, limits=limits, kv_offload=kv)


def generate(llm: LLM, prompts: list[str] | str, sampling: SamplingParams | None = None) -> list[Completion]:
    return llm.generate(prompts, sampling)
