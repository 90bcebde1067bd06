"""A stand-in ContinuousBatcher with the scheduler's interface, used only while the real one
(src/offloadgen/scheduler.py) is being written. It recomputes every active row from scratch each
pass (no KV cache kept): slow, but its greedy tokens are the engine's, one per row per pass."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from offloadgen.sampling import SamplingParams, sample


@dataclass(eq=False)
class Request:
    id: object
    prompt_ids: list[int]
    sampling: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None


@dataclass
class RequestOutput:
    request: Request
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class ContinuousBatcher:
    def __init__(self, llm, slots: int, max_len: int, prefill_chunk: int = 64):
        self.llm, self.slots, self.max_len = llm, slots, max_len
        self.lock = threading.Lock()
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self.cancelled: set[int] = set()
        self.passes, self.pass_seconds = 0, 0.0
        self._ids = itertools.count()

    def submit(self, prompt_ids, sampling, request_id=None) -> Request:
        r = Request(request_id if request_id is not None else next(self._ids), list(prompt_ids), sampling)
        if sampling.seed is not None:
            r.generator = torch.Generator().manual_seed(sampling.seed)
        with self.lock:
            self.waiting.append(r)
        return r

    def cancel(self, request) -> None:
        with self.lock:
            self.cancelled.add(id(request))

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.active)

    def snapshot(self) -> dict:
        with self.lock:
            return {"passes": self.passes, "pass_s": self.pass_seconds / max(self.passes, 1),
                    "queue_length": len(self.waiting), "active_slots": len(self.active)}

    def _admit(self) -> list[RequestOutput]:
        out = []
        with self.lock:
            for r in [r for r in self.waiting + self.active if id(r) in self.cancelled]:
                r.finished, r.finish_reason = True, "cancelled"
                out.append(RequestOutput(r, [], True, "cancelled"))
            self.waiting = [r for r in self.waiting if not r.finished]
            self.active = [r for r in self.active if not r.finished]
            self.cancelled.clear()
            while self.waiting and len(self.active) < self.slots:
                self.active.append(self.waiting.pop(0))
            return out

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        out = self._admit()
        rows = list(self.active)
        if not rows:
            return out
        seqs = [r.prompt_ids + r.output_ids for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), self.llm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        engine = self.llm.engine
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = engine.forward(ids, engine._steps(0, positions, mask.bool()), engine.new_cache(len(rows), width))
        eos = self.llm.tokenizer.eos_token_ids
        for i, r in enumerate(rows):
            token = int(sample(logits[i:i + 1], r.sampling, r.generator)[0])
            r.output_ids.append(token)
            text = self.llm.tokenizer.decode(r.output_ids) if r.sampling.stop else ""
            if token in eos and not r.sampling.ignore_eos or any(s in text for s in r.sampling.stop):
                r.finished, r.finish_reason = True, "stop"
            elif len(r.output_ids) >= r.sampling.max_new_tokens:
                r.finished, r.finish_reason = True, "length"
            out.append(RequestOutput(r, [token], r.finished, r.finish_reason))
        with self.lock:
            self.active = [r for r in self.active if not r.finished]
            self.passes += 1
            self.pass_seconds += time.perf_counter() - start
        return out
