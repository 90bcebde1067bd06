"""Continuous batching over streamed weights: a fixed pool of sequence slots, refilled as rows end.

A pass over the weights costs about the same whatever it computes, so every pass should carry a
full batch. The batch is a pool of `slots` rows of one KV cache, made (and, in CPU memory, pinned)
once. Each step() is one pass: the decode step of every row that has a prompt in its cache, plus
prompt chunks of newly admitted requests, at most `prefill_chunk` prompt tokens per pass so that
the extra compute hides behind the weight copies. A row that ends (EOS, a stop string, its
max_new_tokens, or the cache's length) frees its slot, and the next waiting request takes it at the
next pass.

Rows sit at different lengths: row r holds its tokens at slots 0..len-1 (no padding), writes its
next token at slot len and attends over its own keys (StepInputs.write_slots). A decode micro-batch
is a whole cache part; rows of it with nothing to decode are parked on the cache's spare last slot.
In every layer the decode micro-batches run before the prompt chunks.

Admission order: "fifo" (a server: first come, first served) or "longest" (an offline job, whose
requests are all known: the longest max_new_tokens first). Longest-first is the classic
makespan heuristic: the short requests fill the slots the long ones leave at the end, instead of
the end of the job running on a few long rows with the other slots empty. With uniform output
lengths 8:256 over 256 requests and 64 slots it keeps about 98% of slots busy against 78% FIFO
(simulated; benchmarks/RESULTS.md has the measured figures).

submit() and cancel() may be called from any thread; step() from the one thread that owns the device.
"""
from __future__ import annotations

import bisect
import itertools
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import MicroBatch
from .errors import OffloadgenError
from .models.layers import StepInputs
from .sampling import SamplingParams, sample

_next_id = itertools.count()
ADMISSION_ORDERS = ("fifo", "longest")


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    id: object = None
    output_ids: list[int] = field(default_factory=list)  # new tokens, without an ending EOS
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    text: str | None = None  # once finished, with a tokenizer: the text, cut before a stop string
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    slot: int | None = None  # the batcher's: the cache row it holds
    prefilled: int = 0  # the batcher's: tokens of fill_ids in the cache so far
    refill: list[int] | None = None  # the batcher's: every token so far, while its cache is recomputed
    generator: torch.Generator | None = None  # its own random stream when sampling.seed is set


def new_tokens_at_most(prompt_tokens: int, sampling: SamplingParams, max_len: int) -> int:
    """The tokens a request may generate: its max_new_tokens, or what a slot of max_len leaves."""
    return min(sampling.max_new_tokens, max_len - prompt_tokens)


def fill_ids(req: Request) -> list[int]:
    """The tokens a row prefills: its prompt, or everything so far when its cache is recomputed."""
    return req.refill if req.refill is not None else req.prompt_ids


@dataclass
class RequestOutput:
    request: Request
    new_token_ids: list[int]  # produced this pass (empty when an EOS or a cancel ended it)
    finished: bool
    finish_reason: str | None


@dataclass
class BatcherStats:
    slots: int
    passes: int = 0
    pass_seconds: float = 0.0
    busy_slots: int = 0  # summed over passes: slots holding a request
    decode_rows: int = 0  # summed over passes: rows that decoded
    context_tokens: int = 0  # summed over passes and decoding rows: the row's length
    attended_tokens: int = 0  # the same, but the longest row's length in the row's part: what attention reads
    prompt_tokens: int = 0  # prefilled
    output_tokens: int = 0
    empty_passes: int = 0  # passes with nothing to compute, run to join the other ranks' collectives
    prompt_passes: int = 0  # passes that prefilled prompt chunks beside the decode step
    prompt_pass_seconds: float = 0.0

    @property
    def mean_pass_s(self) -> float:
        return self.pass_seconds / self.passes if self.passes else 0.0

    @property
    def decode_only_pass_s(self) -> float:
        """Mean time of the passes that prefilled nothing: against a pure decode step, what the
        continuous batch's own bookkeeping and its rows' ragged lengths cost."""
        n = self.passes - self.prompt_passes
        return (self.pass_seconds - self.prompt_pass_seconds) / n if n else 0.0

    @property
    def prompt_pass_s(self) -> float:
        return self.prompt_pass_seconds / self.prompt_passes if self.prompt_passes else 0.0

    @property
    def slot_occupancy(self) -> float:
        """Mean share of slots holding a request (prefilling or decoding) per pass."""
        return self.busy_slots / (self.passes * self.slots) if self.passes else 0.0

    @property
    def decode_occupancy(self) -> float:
        return self.decode_rows / (self.passes * self.slots) if self.passes else 0.0

    @property
    def mean_context(self) -> float:
        return self.context_tokens / self.decode_rows if self.decode_rows else 0.0

    @property
    def attended_context(self) -> float:
        return self.attended_tokens / self.decode_rows if self.decode_rows else 0.0


class ContinuousBatcher:
    def __init__(self, engine_or_llm, slots: int, max_len: int, prefill_chunk: int = 512, *,
                 tokenizer=None, eos_token_ids=None, stop_check: Callable[[Request], bool] | None = None,
                 admission: str = "fifo"):
        """engine_or_llm: an Engine, or an LLM (its engine, tokenizer and EOS ids). max_len: the
        longest sequence (prompt + new tokens) a slot holds. Stop strings are checked with
        stop_check(request) if given, else on the tokenizer's text; without either they are ignored.
        admission: "fifo" or "longest" (see the module's note)."""
        self.engine = getattr(engine_or_llm, "engine", engine_or_llm)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine_or_llm, "tokenizer", None)
        self._eos = None if eos_token_ids is None else set(eos_token_ids)
        self.stop_check = stop_check
        if slots < 1 or max_len < 1 or prefill_chunk < 1:
            raise OffloadgenError("slots, max_len and prefill_chunk must be at least 1")
        if admission not in ADMISSION_ORDERS:
            raise OffloadgenError(f"admission order {admission!r}: expected one of {', '.join(ADMISSION_ORDERS)}")
        self.admission = admission
        if max_len > self.engine.cfg.max_position:
            raise OffloadgenError(f"max_len {max_len} exceeds the model's context of "
                                  f"{self.engine.cfg.max_position} tokens")
        limits = getattr(engine_or_llm, "limits", None)  # what an LLM's GPU memory was planned for
        if limits is not None and (slots > limits[0] or max_len > limits[1]):
            raise OffloadgenError(f"this model was placed on the GPU for {limits[0]} sequences of at most {limits[1]} "
                                  f"tokens; {slots} slots of {max_len} tokens asked for: load with larger "
                                  "max_batch_size / max_seq_len")
        self._told_chunk = None  # the last chunk asked for above the cap, said on stderr
        self.slots, self.max_len, self.prefill_chunk = slots, max_len, prefill_chunk
        self.stats = BatcherStats(slots)
        self._lock = threading.Lock()
        self._waiting: list[Request] = []  # in admission order
        self._cancelled: set[Request] = set()
        self._admitting = True
        # Set by ranks.run_in_lockstep where every pass joins collectives (all-gathered weights):
        # a step with nothing to compute still runs the pass, with no rows.
        self.empty_passes = False
        t0 = time.perf_counter()
        self._build()
        self.cache_seconds = time.perf_counter() - t0  # allocating (and pinning) the cache: start-up

    @property
    def prefill_chunk(self) -> int:
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int) -> None:
        """At most the prompt tokens the plan sized a prefill part's activations for (a property:
        LLM.batcher sets each call's chunk on the batcher it keeps, and a plain attribute let that
        undo the cap). A chunk asked for above it is cut, and said once, on stderr."""
        if n < 1:  # a reused batcher gets its chunk here, past __init__'s check
            raise OffloadgenError(f"prefill_chunk must be at least 1; got {n}")
        cap = getattr(self.engine, "prefill_tokens", None)
        if cap and n > cap and n != self._told_chunk:
            print(f"offloadgen: --prefill-chunk {n} cut to {cap} tokens: the GPU plan sized the prefill's "
                  f"temporaries for parts of {cap} prompt tokens", file=sys.stderr)
            self._told_chunk = n
        self._prefill_chunk = min(n, cap or n)

    @torch.inference_mode()
    def _build(self) -> None:
        self.cache = None
        # One spare slot past max_len: parked rows write there, beyond every key read.
        self.cache = self.engine.new_cache(self.slots, self.max_len + 1)
        self.cache.zero_()
        self.parts = self.engine.micro_batches(self.slots)
        self.rows: list[Request | None] = [None] * self.slots
        self.lengths = [0] * self.slots  # tokens of each row in the cache
        self.next_token = [0] * self.slots  # the token each decoding row feeds next
        self.prefilling: list[int] = []  # slots whose prompt is not all in the cache, in admission order

    @property
    def eos(self) -> set[int]:
        """The given EOS ids, else the tokenizer's as they are now."""
        if self._eos is not None:
            return self._eos
        return self.tokenizer.eos_token_ids if self.tokenizer is not None else set()

    # -- other threads ------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Refuse a prompt no slot can hold (also asked for a request bound for another rank's batcher)."""
        if not prompt_ids:
            raise OffloadgenError("the prompt has no tokens")
        if len(prompt_ids) > self.max_len:
            raise OffloadgenError(f"prompt of {len(prompt_ids)} tokens is longer than the {self.max_len} tokens a "
                                  "slot holds")

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, request_id=None) -> Request:
        self.check_prompt(prompt_ids)
        req = Request(list(prompt_ids), sampling, next(_next_id) if request_id is None else request_id,
                      submitted_at=time.perf_counter())
        with self._lock:
            if self.admission == "longest":  # after those of its length already waiting: stable
                bisect.insort_right(self._waiting, req, key=self._longest_first)
            else:
                self._waiting.append(req)
        return req

    def _longest_first(self, req: Request) -> int:
        return -new_tokens_at_most(len(req.prompt_ids), req.sampling, self.max_len)

    def cancel(self, request: Request) -> None:
        with self._lock:
            if not request.finished:
                self._cancelled.add(request)

    def has_work(self) -> bool:
        with self._lock:
            if self._cancelled or (self._waiting and self._admitting):
                return True
        return any(r is not None for r in self.rows)

    def warm_up(self) -> int:
        """Before the first request: every slot prefilled in one pass of a whole prompt chunk, then
        one decode pass, so that the first clients do not pay the first passes' one-off costs (on 4
        H100s a server's first wave waited 2-7 s for its first tokens, later requests 0.4 s). The
        same requests, hence the same passes, on every rank of a server. Returns the passes; the
        stats start again from zero."""
        prompt = [0] * max(1, min(self.prefill_chunk // self.slots, self.max_len - 2))
        for _ in range(self.slots):
            self.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
        passes = 0
        while self.has_work():
            self.step()
            passes += 1
        self.stats = BatcherStats(self.slots)
        return passes

    def stop_admitting(self) -> None:
        """Let the rows in flight finish; waiting requests stay queued (a job stopping on a signal)."""
        self._admitting = False

    def outstanding_passes(self) -> int:
        """Passes the rows and waiting requests still hold a slot for, at most: prompt chunks left
        to prefill, then a pass per token left (serve's ranks deal new requests by it)."""
        def left(req: Request) -> int:
            new = new_tokens_at_most(len(req.prompt_ids), req.sampling, self.max_len) - len(req.output_ids)
            return -(-(len(fill_ids(req)) - req.prefilled) // self.prefill_chunk) + max(new, 0)
        with self._lock:
            waiting = list(self._waiting)
        return sum(left(r) for r in self.rows if r is not None) + sum(left(r) for r in waiting)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        return sum(r is not None for r in self.rows)

    def snapshot(self) -> dict:
        s = self.stats
        return {"passes": s.passes, "pass_s": s.mean_pass_s, "slot_occupancy": s.slot_occupancy,
                "decode_occupancy": s.decode_occupancy, "mean_context": s.mean_context,
                "attended_context": s.attended_context, "queue_length": self.queue_length,
                "active_slots": self.active_slots,
                "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens}

    # -- the device thread --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One pass over the weights; the outputs of every request that moved or ended."""
        t0 = time.perf_counter()
        outputs = self._cancel_and_admit()
        self._recompute_where_due()
        decode = [s for s, r in enumerate(self.rows) if r is not None and s not in self.prefilling]
        chunks = self._prompt_chunks()
        if not decode and not chunks:
            if self.empty_passes:
                self.engine.run_pass([], self.cache)
                self.stats.empty_passes += 1
            return outputs
        busy = self.active_slots
        batches, logit_of = self._decode_batches(decode)
        batches += [self._chunk_batch(*c) for c in chunks]
        logits = self.engine.run_pass(batches, self.cache)
        context = sum(self.lengths[s] + 1 for s in decode)
        attended = sum(batches[j].step.end for _, j in logit_of)
        for s in decode:
            self.lengths[s] += 1  # the token fed this pass is in the cache now
        ready = [(s, logits[j][s - self.parts[self.part_of(s)].start]) for s, j in logit_of]
        for n, (slot, start, end) in enumerate(chunks):
            self.rows[slot].prefilled = self.lengths[slot] = end
            if end == len(fill_ids(self.rows[slot])):
                self.rows[slot].refill = None
                self.prefilling.remove(slot)
                ready.append((slot, logits[len(batches) - len(chunks) + n][0]))
        outputs += self._accept(ready)
        s = self.stats
        s.passes += 1
        seconds = time.perf_counter() - t0
        s.pass_seconds += seconds
        if chunks:
            s.prompt_passes += 1
            s.prompt_pass_seconds += seconds
        s.busy_slots += busy
        s.decode_rows += len(decode)
        s.context_tokens += context
        s.attended_tokens += attended
        s.prompt_tokens += sum(end - start for _, start, end in chunks)
        return outputs

    def restart(self) -> None:
        """After a pass that failed (out of GPU memory): every unfinished request starts over from
        its prompt, in the order it came, on a cache rebuilt for the engine's micro-batch size now."""
        active = sorted((r for r in self.rows if r is not None), key=lambda r: r.submitted_at)
        for r in active:
            r.output_ids, r.slot, r.prefilled, r.first_token_at, r.refill = [], None, 0, None, None
        with self._lock:
            self._waiting[0:0] = active
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._build()

    # -- one pass -----------------------------------------------------------------------------------
    def part_of(self, slot: int) -> int:
        size = self.parts[0].stop - self.parts[0].start
        return slot // size

    def _cancel_and_admit(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for req in cancelled:
                if req.finished:
                    continue
                if req.slot is not None and self.rows[req.slot] is req:
                    self._free(req.slot)
                elif req in self._waiting:
                    self._waiting.remove(req)
                self._end(req, "cancelled")
                outputs.append(RequestOutput(req, [], True, "cancelled"))
            free = [s for s, r in enumerate(self.rows) if r is None]
            while self._admitting and self._waiting and free:
                self._admit(free.pop(0), self._waiting.pop(0))
        return outputs

    def _recompute_where_due(self) -> None:
        """A row about to write the engine's recompute slot (Phi-3 LongRoPE, crossing to its long
        factors) prefills everything so far again instead, as the model run alone does; first in
        line, since it was decoding."""
        at = self.engine.recompute_at
        if at is None:
            return
        for slot, req in enumerate(self.rows):
            if req is not None and slot not in self.prefilling and self.lengths[slot] == at:
                req.refill, req.prefilled, self.lengths[slot] = req.prompt_ids + req.output_ids, 0, 0
                self.prefilling.insert(0, slot)

    def _admit(self, slot: int, req: Request) -> None:
        req.slot, req.prefilled = slot, 0
        if req.sampling.seed is not None:
            req.generator = torch.Generator(device=self.engine.device).manual_seed(req.sampling.seed)
        self.rows[slot], self.lengths[slot] = req, 0
        self.prefilling.append(slot)

    def _free(self, slot: int) -> None:
        self.rows[slot], self.lengths[slot] = None, 0
        if slot in self.prefilling:
            self.prefilling.remove(slot)

    def _prompt_chunks(self) -> list[tuple[int, int, int]]:
        """(slot, start, end) of the prompt tokens prefilled this pass: oldest admitted first, at
        most prefill_chunk tokens in all, so that a row starts decoding as soon as it can."""
        budget, chunks = self.prefill_chunk, []
        for slot in self.prefilling:
            if budget == 0:
                break
            req = self.rows[slot]
            n = min(len(fill_ids(req)) - req.prefilled, budget)
            chunks.append((slot, req.prefilled, req.prefilled + n))
            budget -= n
        return chunks

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.engine.device.type != "cuda":
            return t
        return t.pin_memory().to(self.engine.device, non_blocking=True)

    def _decode_batches(self, decode: list[int]) -> tuple[list[MicroBatch], list[tuple[int, int]]]:
        """One micro-batch per cache part with a decoding row; and (slot, micro-batch index) of
        every decoding row."""
        live = set(decode)
        batches, logit_of = [], []
        for j, part in enumerate(self.parts):
            slots = range(part.start, part.stop)
            if not live.intersection(slots):
                continue
            is_live = torch.tensor([s in live for s in slots])
            lengths = torch.tensor([self.lengths[s] if s in live else 0 for s in slots])
            write = torch.where(is_live, lengths, self.max_len)  # parked: the spare slot
            start = int(lengths.max())
            valid = (torch.arange(start + 1)[None] <= lengths[:, None]) & is_live[:, None]
            ids = torch.tensor([[self.next_token[s] if s in live else 0] for s in slots])
            step = StepInputs(start, self._to_device(lengths[:, None]), self._to_device(valid),
                              write_slots=self._to_device(write), seq_lens=(lengths + 1).tolist())
            step.extras["write_slots_host"] = write  # an offloaded cache needs them on the CPU
            logit_of += [(s, len(batches)) for s in slots if s in live]
            batches.append(MicroBatch(self._to_device(ids), self.engine.prepare(step), j, part))
        return batches, logit_of

    def _chunk_batch(self, slot: int, start: int, end: int) -> MicroBatch:
        tokens = fill_ids(self.rows[slot])
        ids = torch.tensor([tokens[start:end]])
        step = StepInputs(start, self._to_device(torch.arange(start, end)[None]),
                          self._to_device(torch.ones(1, end, dtype=torch.bool)), seq_lens=[len(tokens)])
        return MicroBatch(self._to_device(ids), self.engine.prepare(step), self.part_of(slot), slice(slot, slot + 1),
                          logits=end == len(tokens))

    def _accept(self, ready: list[tuple[int, torch.Tensor]]) -> list[RequestOutput]:
        """Sample the next token of every row with logits this pass, and end the rows that are done."""
        if not ready:
            return []
        logits = torch.stack([x for _, x in ready])
        tokens = logits.argmax(-1)
        for n, (slot, _) in enumerate(ready):
            p = self.rows[slot].sampling
            if p.temperature > 0:  # one row at a time: each may have its own generator and settings
                tokens[n] = sample(logits[n:n + 1], p, self.rows[slot].generator)[0]
        now, eos = time.perf_counter(), self.eos
        return [self._next(slot, token, now, eos) for (slot, _), token in zip(ready, tokens.tolist())]

    def _next(self, slot: int, token: int, now: float, eos: set[int]) -> RequestOutput:
        req = self.rows[slot]
        p = req.sampling
        if req.first_token_at is None:
            req.first_token_at = now
        if not p.ignore_eos and token in eos:
            return self._finish(slot, [], "stop")
        req.output_ids.append(token)
        self.stats.output_tokens += 1
        if p.stop and self._hits_stop(req):
            return self._finish(slot, [token], "stop")
        # The token sampled now goes in the cache next pass, at slot lengths[slot]: is there one?
        if len(req.output_ids) >= p.max_new_tokens or self.lengths[slot] >= self.max_len:
            return self._finish(slot, [token], "length")
        self.next_token[slot] = token
        return RequestOutput(req, [token], False, None)

    def _hits_stop(self, req: Request) -> bool:
        if self.stop_check is not None:
            return self.stop_check(req)
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(req.output_ids)
        return any(s in text for s in req.sampling.stop)

    def _finish(self, slot: int, new: list[int], reason: str) -> RequestOutput:
        req = self.rows[slot]
        self._free(slot)
        self._end(req, reason)
        return RequestOutput(req, new, True, reason)

    def _end(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason, req.finished_at, req.slot = True, reason, time.perf_counter(), None
        req.text = self.text_of(req)

    def text_of(self, req: Request) -> str | None:
        """The request's text so far (None without a tokenizer), cut before a stop string."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(req.output_ids)
        for s in req.sampling.stop:
            if s in text:
                text = text[:text.index(s)]
        return text
