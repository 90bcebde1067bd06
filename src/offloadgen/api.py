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
                 micro_batch_size: int | None = None, progress: bool = True, tokenizer=None):
        self.checkpoint = checkpoint
        self.cfg = checkpoint.cfg
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer or checkpoint.tokenizer()
        self.weights = weights or ResidentWeights(checkpoint, device, dtype, progress=progress)
        self.engine = Engine(self.cfg, self.weights, device, dtype, micro_batch_size)

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

    def generate(self, prompts: list[str] | str, sampling: SamplingParams | None = None) -> list[Completion]:
        sampling = sampling or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        input_ids, mask = self.encode_batch(prompts)
        stop_fn = None
        if sampling.stop:
            def stop_fn(row, tokens):
                text = self.tokenizer.decode(tokens)
                return any(s in text for s in sampling.stop)
        out = self.engine.generate(input_ids, mask, sampling, self.tokenizer.eos_token_ids,
                                   self.tokenizer.pad_token_id, stop_fn=stop_fn)
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


def load(model: str | None = None, *, dummy: bool = False, device: str | torch.device | None = None,
         dtype: str | torch.dtype = "auto", micro_batch_size: int | None = None, progress: bool = True,
         quant_bits: int = 16, quant_group_size: int = 64, tokenizer=None) -> LLM:
    """Load a model folder, a GGUF file, a preset (dummy=True), or the embedded default (None).

    quant_bits 4 or 8 stores the decoder layers' linear weights group-wise quantized and
    dequantizes each layer just before it runs."""
    checkpoint = open_checkpoint(model, dummy=dummy)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadgenError("device 'cuda' asked for, but this machine has no CUDA GPU")
    dtype = resolve_dtype(dtype, device, checkpoint.cfg)
    weights = None
    if quant_bits != 16:
        from .offload.placement import all_resident
        from .offload.streaming import StreamingWeights
        from .quant import QuantConfig
        weights = StreamingWeights(checkpoint, device, dtype, all_resident(checkpoint.cfg), progress=progress,
                                   quant=QuantConfig(quant_bits, quant_group_size))
    return LLM(checkpoint, device, dtype, weights=weights, micro_batch_size=micro_batch_size, progress=progress,
               tokenizer=tokenizer)


def generate(llm: LLM, prompts: list[str] | str, sampling: SamplingParams | None = None) -> list[Completion]:
    return llm.generate(prompts, sampling)
