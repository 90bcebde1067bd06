"""Prefill and decode over the layer-major loop.

For every forward pass the engine walks the blocks in order and runs each block over every
micro-batch before moving on, so a block's weights are fetched once per pass however large the
batch (FlexGen's zig-zag schedule). Where the weights come from is the weight source's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import OffloadgenError
from .models import blocks, family_of
from .models.layers import StepInputs
from .offload.cpu_side import CpuSide, cpu_side_batches
from .offload.kv_cache import KVCache, KVOffload, OffloadedKVCache
from .offload.weights import WeightSource
from .sampling import SamplingParams, sample


@dataclass
class MicroBatch:
    """One micro-batch of a pass: new tokens ids [b, t] of cache rows `rows` (inside cache part
    `part`), with their StepInputs. A pass's micro-batches may differ in rows and token counts (a
    continuous batch decodes some rows and prefills a prompt chunk of another in the same pass)."""
    ids: torch.Tensor
    step: StepInputs
    part: int
    rows: slice
    logits: bool = True  # run the head on the last position (a prompt chunk before the last needs none)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per row, without padding after a stop
    finish_reasons: list[str]  # "stop" (EOS or stop string) or "length"
    last_logits: torch.Tensor  # [B, V] float32, the logits the last token was chosen from


class Engine:
    def __init__(self, cfg, weights: WeightSource, device: torch.device, dtype: torch.dtype,
                 micro_batch_size: int | None = None, kv_offload: KVOffload | None = None,
                 kv_quant: tuple[int, int] | None = None, prefill_tokens: int | None = None):
        self.cfg = cfg
        self.kv_offload = kv_offload
        self.kv_quant = kv_quant  # (bits, group size) of the cache on the device; KVOffload has its own
        self.offloaded_cache: OffloadedKVCache | None = None  # kept between generations: pinning is slow
        self.cpu_side: CpuSide | None = None  # made on the first pass that has CPU-attended micro-batches
        self.family = family_of(cfg)
        self.weights = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch_size = micro_batch_size
        # prompt tokens a prefill part may hold (Placement.prefill_tokens): the plan sized the
        # activations for one part, and left the rest of the budget to weights
        self.prefill_tokens = prefill_tokens
        self.blocks = blocks(cfg)
        # A family whose cached keys go stale at some length (Phi-3's LongRoPE switching to its long
        # factors) names the slot; the pass that writes it recomputes the whole cache, as transformers does.
        self.recompute_at = getattr(self.family, "recompute_cache_at", lambda cfg: None)(cfg)

    def micro_batches(self, batch: int, tokens: int = 1) -> list[slice]:
        """Row ranges of a pass of `batch` rows of `tokens` new tokens each: micro-batches, and with
        a device KV cache a prompt pass in parts of at most prefill_tokens tokens."""
        size = self.micro_batch_size or batch
        if tokens > 1 and self.prefill_tokens and self.kv_offload is None:
            size = min(size, max(1, self.prefill_tokens // tokens))
        return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]

    def new_cache(self, batch: int, max_len: int) -> KVCache | OffloadedKVCache:
        heads, head_dim = self.family.kv_heads(self.cfg)
        if self.kv_offload is None:
            return KVCache(self.cfg.n_layers, batch, max_len, heads, head_dim, self.dtype, self.device,
                           *(self.kv_quant or (None,)))
        parts = self.micro_batches(batch)
        old = self.offloaded_cache
        if old is not None and old.fits(parts, max_len, self.kv_offload):
            return old
        if old is not None:
            old.close()
            self.offloaded_cache = None
        self.offloaded_cache = OffloadedKVCache(self.cfg.n_layers, parts, max_len, heads, head_dim, self.dtype,
                                                self.device, self.kv_offload)
        return self.offloaded_cache

    def close(self) -> None:
        if self.cpu_side is not None:
            self.cpu_side.close()
            self.cpu_side = None
        if self.offloaded_cache is not None:
            self.offloaded_cache.close()
            self.offloaded_cache = None

    def forward(self, ids: torch.Tensor, steps: list[StepInputs], cache: KVCache) -> torch.Tensor:
        """One pass over new tokens ids [B, t]; returns the last position's logits [B, V] in float32."""
        try:
            return self._forward(ids, steps, cache)
        except BaseException:
            # A pass that stops midway leaves a streaming source mid-schedule; put it back at the start
            # so that a retry (e.g. with smaller micro-batches after running out of memory) works.
            self.weights.reset()
            raise

    def _forward(self, ids: torch.Tensor, steps: list[StepInputs], cache: KVCache) -> torch.Tensor:
        parts = self.micro_batches(*ids.shape)  # as _steps split them
        batches = [MicroBatch(ids[rows], steps[j], j, rows) for j, rows in enumerate(parts)]
        return torch.cat(self._run(batches, cache))[:, -1].float()

    def run_pass(self, batches: list[MicroBatch], cache) -> list[torch.Tensor | None]:
        """One pass over the weights for every micro-batch; per micro-batch, its last position's
        logits [b, V] in float32 (None where logits=False)."""
        try:
            out = self._run(batches, cache)
        except BaseException:
            self.weights.reset()  # as in forward
            raise
        return [None if x is None else x[:, -1].float() for x in out]

    def _run(self, batches: list[MicroBatch], cache) -> list[torch.Tensor | None]:
        cfg, fam, w = self.cfg, self.family, self.weights
        block = w.get("embed")
        hidden = [fam.embed(cfg, block, mb.ids, mb.step) for mb in batches]
        w.done("embed")
        first = next((mb for mb in batches if mb.part == 0), None)
        if first is not None and isinstance(cache, OffloadedKVCache):
            # the CPU/GPU attention split for this pass; one that also prefills is not a decode step's time
            cache.begin_pass(first.step, prefills=any(mb.step.length > 1 for mb in batches))
        on_cpu = cpu_side_batches(batches, cache) if self._cpu_side_for(cache) else []
        on_gpu = [j for j in range(len(batches)) if j not in on_cpu]
        for i in range(cfg.n_layers):
            block = w.get(i)
            if hasattr(fam, "pre_experts") and "router" in block:
                hidden = self._moe_layer(i, block, batches, hidden, cache)
                w.done(i)
                continue

            def run(j, i=i, block=block):
                mb = batches[j]
                return fam.layer(cfg, block, hidden[j], mb.step, cache.layer(i, mb.part, mb.rows))
            if on_cpu:
                self.cpu_side.run_layer(on_cpu, on_gpu, hidden, run)
            else:
                # In list order: a continuous batch puts its decode micro-batches before prompt chunks.
                for j in range(len(batches)):
                    hidden[j] = run(j)
            w.done(i)
        block = w.get("head")
        logits = [fam.head(cfg, block, h[:, -1:]) if mb.logits else None for h, mb in zip(hidden, batches)]
        w.done("head")
        return logits

    def _cpu_side_for(self, cache) -> bool:
        """Whether CPU-attended micro-batches get a thread of their own (offload/cpu_side.py)."""
        if not (isinstance(cache, OffloadedKVCache) and cache.cuda and cache.opts.overlap):
            if isinstance(cache, OffloadedKVCache):
                cache.use_cpu_side(None)  # overlap turned off between runs (benchmarks/kv_overlap.py)
            return False
        if self.cpu_side is None:
            self.cpu_side = CpuSide(self.device)
        cache.use_cpu_side(self.cpu_side)  # every CPU kernel in its one attention thread
        return True

    def _moe_layer(self, i: int, block: dict, batches: list[MicroBatch], hidden: list, cache) -> list:
        """An MoE layer in two halves: attention and routing for every micro-batch, then the experts
        they routed to, asked of the weight source at once (it copies only those it lacks), then
        the experts for every micro-batch."""
        fam, cfg = self.family, self.cfg
        routed = [fam.pre_experts(cfg, block, hidden[j], mb.step, cache.layer(i, mb.part, mb.rows))
                  for j, mb in enumerate(batches)]
        ids = torch.unique(torch.cat([r.experts.flatten() for r in routed])).tolist()  # one host sync
        experts = self.weights.get_experts(i, ids)
        if experts:
            experts.update({k: v for k, v in block.items() if k not in experts})
            block = experts  # keeps its arrival events: each expert waits for its own copy
        return [fam.post_experts(cfg, block, r) for r in routed]

    def prepare(self, step: StepInputs) -> StepInputs:
        """Build a step's per-pass tensors (mask, rope, alibi) as the model family wants them."""
        self.family.prepare(self.cfg, step, self.dtype)
        return step

    def _steps(self, start: int, positions: torch.Tensor, key_valid: torch.Tensor) -> list[StepInputs]:
        steps = []
        for rows in self.micro_batches(*positions.shape):
            step = StepInputs(start=start, positions=positions[rows], key_valid=key_valid[rows])
            self.family.prepare(self.cfg, step, self.dtype)
            steps.append(step)
        return steps

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                 eos_token_ids: set[int], pad_token_id: int,
                 stop_fn: Callable[[int, list[int]], bool] | None = None,
                 on_prefill: Callable[[], None] | None = None,
                 on_token: Callable[[int], None] | None = None) -> GenerationOutput:
        """Left-padded input_ids [B, P] with attention_mask [B, P] (1 = real token).

        stop_fn(row, tokens) says whether a row's new tokens end in a stop string; on_prefill is
        called once the prompt pass is done (benchmarks time it there), on_token after each token.
        """
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).bool()
        batch, prompt_len = ids.shape
        max_len = prompt_len + params.max_new_tokens
        if max_len > self.cfg.max_position:
            raise OffloadgenError(f"prompt of {prompt_len} tokens + {params.max_new_tokens} new tokens exceeds "
                                  f"the model's context of {self.cfg.max_position} tokens")
        cache = self.new_cache(batch, max_len)
        key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        key_valid[:, :prompt_len] = mask
        n_real = mask.long().sum(-1)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)

        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.forward(ids, self._steps(0, positions, key_valid[:, :prompt_len]), cache)
        if on_prefill:
            on_prefill()

        eos = torch.tensor(sorted(eos_token_ids) or [-1], device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        new_tokens = []
        for i in range(params.max_new_tokens):
            token = sample(logits, params, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if on_token:
                on_token(i)
            if not params.ignore_eos:
                finished |= torch.isin(token, eos)
            if stop_fn is not None:
                so_far = torch.stack(new_tokens, 1).tolist()
                for row in range(batch):
                    if not finished[row] and stop_fn(row, so_far[row]):
                        finished[row] = True
            if i == params.max_new_tokens - 1 or bool(finished.all()):
                break
            slot = prompt_len + i
            key_valid[:, slot] = True
            if slot == self.recompute_at:  # the cached keys are stale: one pass over everything so far
                seen = torch.cat([ids, torch.stack(new_tokens, 1)], 1)
                valid = key_valid[:, :slot + 1]
                logits = self.forward(seen, self._steps(0, (valid.long().cumsum(-1) - 1).clamp(min=0), valid), cache)
                continue
            steps = self._steps(slot, (n_real + i)[:, None], key_valid[:, :slot + 1])
            logits = self.forward(token[:, None], steps, cache)

        tokens = torch.stack(new_tokens, 1).tolist()
        out, reasons = [], []
        for row in tokens:
            cut = next((j + 1 for j, t in enumerate(row) if t in eos_token_ids), None) if not params.ignore_eos else None
            out.append(row[:cut] if cut else row)
            reasons.append("stop" if cut else "length")
        if stop_fn is not None:
            reasons = ["stop" if r == "length" and stop_fn(i, out[i]) else r for i, r in enumerate(reasons)]
        return GenerationOutput(out, reasons, logits)
