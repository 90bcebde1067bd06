"""The Python API: load a model once, generate for many prompts.

    llm = offloadgen.load()                    # the embedded SmolLM2-135M
    llm = offloadgen.load("path/to/folder")    # or a .gguf file, or load("opt-30b", dummy=True)
    for c in llm.generate(["Paris is"], SamplingParams(max_new_tokens=20)):
        print(c.text)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RunConfig
from .errors import OffloadgenError
from .runtime import Runtime, build_runtime
from .sampling import SamplingParams


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def encode_prompts(tokenizer, cfg, prompts: list[str], names: list | None = None) -> list[list[int]]:
    """Token ids of each prompt, refusing empty ones and ones that fill the whole context."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):  # the tokenizer would fail on it with an AttributeError
            raise OffloadgenError(f"prompt {names[i] if names else i} must be a string; got {type(p).__name__}")
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
    """A loaded model: its runtime (runtime.Runtime) and generation over lists of prompts."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.plan = runtime.plan
        self.checkpoint = runtime.checkpoint
        self.cfg = runtime.checkpoint.cfg
        self.device = runtime.plan.device
        self.dtype = runtime.plan.dtype
        self.tokenizer = runtime.tokenizer
        self.weights = runtime.weights
        self.engine = runtime.engine
        self.limits = runtime.plan.limits  # (max batch, max sequence length) the GPU placement was planned for
        self._batcher = None  # the continuous batcher, kept while it fits (its cache is made once)

    def shrink_micro_batch(self, rows: int) -> int:
        """Halve the rows per layer pass of a batch of `rows` (after running out of GPU memory): the
        placement, planned for larger micro-batches, stays valid for smaller ones. Returns the new size."""
        current = self.engine.micro_batch_size or rows
        if current <= 1:
            raise OffloadgenError("out of GPU memory even with micro-batches of 1 prompt; lower "
                                  "--batch-size or --max-new-tokens, or free GPU memory")
        self.engine.micro_batch_size = max(1, current // 2)
        return self.engine.micro_batch_size

    def close(self) -> None:
        """Stop the weight source's threads, unpin its memory and the KV cache's. A streamed model
        holds threads and page-locked memory until this is called (or the process ends)."""
        self._batcher = None
        self.runtime.close()

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

    def batcher(self, slots: int, max_len: int, prefill_chunk: int = 512, admission: str = "longest"):
        """The model's continuous batcher: made once and kept while it fits, so its KV cache is
        allocated (and pinned) once, not per call. Offline work (a list of prompts, a job) admits
        the longest max_new_tokens first: see scheduler's note."""
        from .scheduler import ContinuousBatcher
        b = self._batcher
        if b is None or b.slots != slots or b.max_len < max_len or b.active_slots or b.queue_length:
            self._batcher = None  # the old cache goes before the new one is made
            b = self._batcher = ContinuousBatcher(self, slots, max_len, prefill_chunk, admission=admission)
        b.prefill_chunk, b.admission = prefill_chunk, admission
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
        if batch_size is not None and batch_size < 1:  # 0 would otherwise mean "the default"
            raise OffloadgenError(f"batch_size must be at least 1; got {batch_size}")
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


def load(model: str | None = None, *, tokenizer=None, offload_dir: str | None = None, config: RunConfig | None = None,
         checkpoint=None, world=None, **settings) -> LLM:
    """Load a model folder, a GGUF file, a preset (dummy=True), or the embedded default (None).

    `settings` are RunConfig's fields (config.py says what each does), e.g.
        load("opt-30b", dummy=True, cpu_offload=True, gpu_memory=16 << 30, max_batch_size=16, quant_bits=4)
        load("opt-30b", dummy=True, cpu_offload=True, kv_offload=True, max_batch_size=64, micro_batch_size=8)
    quant_bits 4 or 8 stores the decoder layers' linear weights group-wise quantized; cpu_offload
    streams weights from CPU RAM to the GPU, keeping resident what fits gpu_memory, planned for
    max_batch_size prompts of max_seq_len tokens; kv_offload keeps the KV cache in CPU RAM;
    offload_dir (or disk_offload=True) keeps the streamed weights on disk there. A command that
    has already opened the checkpoint (to check its input first) or joined torchrun's process
    group passes them in."""
    if offload_dir is not None:
        settings.update(disk_offload=True, offload_dir=offload_dir)
    for key in ("device", "dtype"):  # torch.device / torch.dtype objects are welcome too
        if settings.get(key) is not None and not isinstance(settings[key], str):
            settings[key] = str(settings[key]).replace("torch.", "")
    try:
        config = (config or RunConfig()).replace(model=model if model is not None else (config and config.model),
                                                 **settings)
    except TypeError as e:
        raise OffloadgenError(f"load(): {e} (settings are RunConfig's fields)") from None
    return LLM(build_runtime(config, world, checkpoint=checkpoint, tokenizer=tokenizer))


def generate(llm: LLM, prompts: list[str] | str, sampling: SamplingParams | None = None) -> list[Completion]:
    return llm.generate(prompts, sampling)
