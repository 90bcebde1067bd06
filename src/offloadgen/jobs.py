"""Batch generation jobs that lose nothing: a JSONL file of prompts in, one JSON line per prompt out.

- Prompts run through the continuous batcher (--batch-size slots): each request is appended,
  flushed and fsynced as it finishes, in the order requests finish (outputs.JobOutput); a rerun
  with the same output file skips every input line already answered (resume), so a kill loses at
  most the requests in flight. A torn last line (a write cut short) is dropped and redone.
- Resume matches records to input lines by the line's "id", or, for a line without one, by a
  hash of its bytes (with the occurrence number for repeated lines): lines may be inserted,
  removed or reordered between runs. Duplicate ids are refused.
- The output is locked for the whole job: a second job on it is refused, naming the holder.
- A line may set its own sampling with OpenAI's names (max_tokens, temperature, top_p, top_k,
  seed, stop); absent keys take the command's flags.
- A bad input line (not JSON, no prompt, empty, too long for the context with its max tokens, a
  bad sampling value) becomes an error record with its line number; the job goes on. Invalid
  UTF-8 is replaced and the record says so in "warning"; a UTF-8 byte-order mark is ignored.
- --ordered rewrites the output in input order once every line is answered.
- OpenAI Batch API request lines ({"custom_id", "method", "url", "body"}) are read as `offloadgen
  serve` reads a request (openai_batch.py) and keyed by custom_id; --output-format openai-batch
  writes the Batch API's output lines (with our "key" and "line" for resume).
- SIGINT / SIGTERM: no new request starts, those in flight finish and are written, then the job
  stops, says how to resume, and exits non-zero. CUDA out of memory: the micro-batch is halved and
  the requests in flight start over (none of theirs was written).

open_job finds what is wrong with a job's files (and takes the output's lock) before a model is
loaded; answer_job answers it. The bookkeeping (read_input, JobOutput, result_record /
error_record) does not depend on how completions are produced: a scheduler can drive it.
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import OffloadgenError
from .openai_batch import error_output_record, is_batch_request, output_record, parse_batch_line
from .outputs import JobOutput, is_regular_or_new
from .ranks import deal, request_cost, run_in_lockstep, sharded
from .sampling import SamplingParams


@dataclass
class InputLine:
    line: int  # 1-based line number in the input file as it is now
    text: str
    key: str  # what resume matches records by: "id:<the id as JSON>" or "sha256:<hash of the line>[#k]"
    warning: str | None = None


@dataclass
class JobItem:
    line: int  # 1-based line number in the input file
    id: object
    prompt: str | None = None
    error: str | None = None
    n_tokens: int = 0
    key: str = ""
    warning: str | None = None
    sampling: SamplingParams | None = None  # the line's own (it sets max_tokens, temperature, ...); None: the command's
    openai: object = None  # a Batch API line's request (openai_batch.BatchRequest)


@dataclass
class JobSummary:
    total: int
    skipped: int = 0  # answered by an earlier run
    done: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    passes: int = 0  # passes over the weights (across ranks: the same on every rank)
    interrupted: str | None = None
    retries: list = field(default_factory=list)


def clean_id(value):
    """An id as it can be written back in JSON: scalars as they are, NaN/Infinity and containers
    as their JSON text (json.loads accepts NaN; a record holding it would not be JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        return json.dumps(value)
    except (ValueError, RecursionError):
        return repr(value)


def read_input(path: str | os.PathLike) -> list[InputLine]:
    """The input's non-blank lines with their resume keys; refuses an unreadable file and ids
    used twice. JSON lines end at "\n" only: U+2028 and others may stand raw inside a string."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise OffloadgenError(f"cannot read --input {path}: {e.strerror}") from None
    data = data.removeprefix(codecs.BOM_UTF8)  # editors on Windows add one; it is not part of line 1
    lines, first_line_of, occurrences = [], {}, {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            text, warning = raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", errors="replace")
            warning = f"line {n}: invalid UTF-8 at byte {e.start + 1}, replaced with U+FFFD"
        key = _id_key(text)
        if key is not None:
            if key in first_line_of:
                raise OffloadgenError(f"--input {path}: lines {first_line_of[key]} and {n} have the same id "
                                      f"{key[3:]}; ids must be unique, since resume matches results to lines by id")
            first_line_of[key] = n
        else:  # no id: the line's bytes, and which repeat of them this is
            digest = hashlib.sha256(raw).hexdigest()[:16]
            occurrences[digest] = k = occurrences.get(digest, 0) + 1
            key = f"sha256:{digest}" + (f"#{k}" if k > 1 else "")
        lines.append(InputLine(n, text, key, warning))
    return lines


def _id_key(text: str) -> str | None:
    try:
        rec = json.loads(text)
        # "id": null is no id: such lines are keyed by their content, as lines without one are
        if is_batch_request(rec) and rec.get("custom_id") is not None:  # the Batch API's own id
            return "id:" + json.dumps(rec["custom_id"], sort_keys=True)
        has_id = isinstance(rec, dict) and rec.get("id") is not None
        return "id:" + json.dumps(rec["id"], sort_keys=True) if has_id else None
    except (ValueError, RecursionError):
        return None


# OpenAI's names in an input line -> SamplingParams fields
SAMPLING_KEYS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "seed": "seed", "stop": "stop"}


def line_sampling(rec: dict, n: int, sampling: SamplingParams) -> tuple[SamplingParams | None, str | None]:
    """The line's own sampling: the command's with the keys the line sets (absent or null: the
    command's); None if it sets none. Or what is wrong with a value."""
    out = {}
    for key, name in SAMPLING_KEYS.items():
        value = rec.get(key)
        if value is None:
            continue
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not (isinstance(value, list) and all(isinstance(s, str) and s for s in value)):
                return None, f"line {n}: 'stop' must be a non-empty string or a list of them"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, f"line {n}: '{key}' must be a number"
        elif key in ("max_tokens", "top_k", "seed") and not isinstance(value, int):
            return None, f"line {n}: '{key}' must be a whole number"
        out[name] = value
    if not out:
        return None, None
    try:
        return dataclasses.replace(sampling, **out), None  # checks the ranges
    except OffloadgenError as e:
        return None, f"line {n}: {str(e).replace('max_new_tokens', 'max_tokens')}"


def parse_input_line(text: str, n: int, tokenizer, max_context: int, max_new_tokens: int = 1,
                     sampling: SamplingParams | None = None) -> JobItem:
    """One input line -> a prompt, or an error that says what is wrong with it; never raises.
    A prompt must leave room in max_context for its max tokens (the line's, else max_new_tokens)."""
    try:
        rec = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return JobItem(n, n, error=f"line {n}: not valid JSON ({getattr(e, 'msg', e)})")
    if not isinstance(rec, dict):
        return JobItem(n, n, error=f"line {n}: expected a JSON object with 'prompt' or 'messages'")
    if is_batch_request(rec):
        return _batch_item(rec, n, tokenizer, max_context, sampling or SamplingParams(max_new_tokens=max(max_new_tokens, 1)))
    item_id = clean_id(rec.get("id", n))
    try:
        if "prompt" in rec:
            prompt = rec["prompt"]
            if not isinstance(prompt, str):
                return JobItem(n, item_id, error=f"line {n}: 'prompt' must be a string")
        elif "messages" in rec:
            messages = rec["messages"]
            if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                      and isinstance(m.get("content"), str) for m in messages)
                    and messages):
                return JobItem(n, item_id, error=f"line {n}: 'messages' must be a non-empty list of "
                                                 "{'role': str, 'content': str}")
            prompt = tokenizer.apply_chat_template(messages)
        else:
            return JobItem(n, item_id, error=f"line {n}: no 'prompt' or 'messages'")
        if not prompt.strip():
            return JobItem(n, item_id, error=f"line {n}: empty prompt")
        n_tokens = len(tokenizer.encode(prompt))
    except OffloadgenError as e:
        return JobItem(n, item_id, error=f"line {n}: {e}")
    except Exception as e:  # a tokenizer or template failure on odd input: report it, keep going
        return JobItem(n, item_id, error=f"line {n}: cannot tokenize ({type(e).__name__}: {e})")
    if n_tokens == 0:
        return JobItem(n, item_id, error=f"line {n}: prompt has no tokens")
    own, error = line_sampling(rec, n, sampling or SamplingParams(max_new_tokens=max(max_new_tokens, 1)))
    if error:
        return JobItem(n, item_id, error=error)
    max_new_tokens = own.max_new_tokens if own else max_new_tokens
    if max_new_tokens >= max_context:  # no prompt fits: the count of new tokens is what is wrong
        what = "max_tokens" if isinstance(rec, dict) and "max_tokens" in rec else "--max-new-tokens"
        return JobItem(n, item_id, error=f"line {n}: {what} {max_new_tokens} leaves no room for a prompt: sequences may "
                                         f"have {max_context} tokens (the model's context, or the --max-seq-len "
                                         "planned for)")
    if n_tokens + max(max_new_tokens, 1) > max_context:
        return JobItem(n, item_id, error=f"line {n}: prompt has {n_tokens} tokens; sequences may have {max_context} "
                                         "(the model's context, or the --max-seq-len planned for), "
                                         f"which leaves {max_context - max_new_tokens} for a prompt with "
                                         f"{max_new_tokens} new tokens")
    return JobItem(n, item_id, prompt, n_tokens=n_tokens, sampling=own)


def _batch_item(rec: dict, n: int, tokenizer, max_context: int, sampling: SamplingParams) -> JobItem:
    req = parse_batch_line(rec, tokenizer, max_context, sampling)
    if req.parsed is None:
        return JobItem(n, req.custom_id, error=f"line {n}: {req.line_error or req.error.message}", openai=req)
    p = req.parsed  # its sampling already has the command's values for absent keys
    return JobItem(n, req.custom_id, p.prompt, n_tokens=len(p.prompt_ids), sampling=p.sampling, openai=req)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def context_limit(llm) -> int:
    """Tokens a sequence may reach: the model's context, or less if the GPU placement was planned
    for shorter sequences."""
    limits = getattr(llm, "limits", None)
    return min(llm.cfg.max_position, limits[1]) if limits else llm.cfg.max_position


def job_item(src: InputLine, tokenizer, max_context: int, max_new_tokens: int,
             sampling: SamplingParams | None = None) -> JobItem:
    item = parse_input_line(src.text, src.line, tokenizer, max_context, max_new_tokens, sampling)
    item.key, item.warning = src.key, src.warning
    return item


def _with_warning(rec: dict, item: JobItem) -> dict:
    return {**rec, "warning": item.warning} if item.warning else rec


def error_record(item: JobItem, output_format: str = "jsonl") -> dict:
    if output_format == "openai-batch":
        req = item.openai  # None: not a Batch API line; its custom_id is then its id
        custom_id = req.custom_id if req is not None else str(item.id)
        return _with_warning({"key": item.key, "line": item.line, **error_output_record(
            custom_id, item.error, req.error if req is not None else None)}, item)
    return _with_warning({"key": item.key, "id": item.id, "line": item.line, "error": item.error}, item)


def result_record(item: JobItem, completion, output_format: str = "jsonl", model: str = "offloadgen") -> dict:
    if output_format == "openai-batch":
        kind = item.openai.kind if item.openai is not None else "completion"
        return _with_warning({"key": item.key, "line": item.line, **output_record(
            str(item.id), kind, model, completion.text, completion.finish_reason, item.n_tokens,
            len(completion.token_ids))}, item)
    return _with_warning({"key": item.key, "id": item.id, "line": item.line, "prompt": item.prompt,
                          "text": completion.text, "tokens": len(completion.token_ids),
                          "finish_reason": completion.finish_reason}, item)


def describe_resume(lines: list[InputLine], done: dict[str, int]) -> str:
    """What an earlier run left and what changed in the input since: one line for stderr."""
    current = {src.key: src.line for src in lines}
    answered = [k for k in current if k in done]
    moved = sum(1 for k in answered if done[k] != current[k])
    gone = sum(1 for k in done if k not in current and not k.startswith("prompt:"))
    text = f"{len(answered)} of {len(current)} input lines answered by earlier runs, {len(current) - len(answered)} to go"
    if moved:
        text += f"; {moved} answered lines moved since (matched by id or content)"
    if gone:
        text += f"; {gone} answered lines are no longer in the input (their results are kept)"
    return text


@dataclass
class Job:
    """A job's files, opened: the input's lines and the output, locked until close()."""
    lines: list[InputLine]
    out: JobOutput
    ordered: bool = False

    def close(self) -> None:
        self.out.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_job(input_path: str, output_path: str, ordered: bool = False) -> Job:
    """Everything that can be wrong with a job's files, found before a model is loaded: an
    unreadable input, duplicate ids, an output that is not ours or is held by another job."""
    lines = read_input(input_path)
    if os.path.exists(output_path) and os.path.samefile(output_path, input_path):
        raise OffloadgenError("--output must not be the --input file")
    if ordered and not is_regular_or_new(output_path):
        raise OffloadgenError(f"--ordered rewrites --output at the end, and {output_path} is not a regular file "
                              "(a pipe or a terminal): drop --ordered, or write to a file")
    return Job(lines, JobOutput(output_path, legacy_keys(lines, input_path, output_path)), ordered)


def legacy_keys(lines: list[InputLine], input_path: str, output_path: str):
    """How a record of an older offloadgen (no "key": it resumed by input line number) gets the
    key resume matches by now: the key of the input line with its number, which must still carry
    the record's id (the line's "id", or its number where it had none, as that version wrote)."""
    by_number = {src.line: src for src in lines}

    def key_of(rec: dict) -> str:
        src = by_number.get(rec["line"])
        if src is None or _legacy_id(src) != rec.get("id"):
            now = "no line" if src is None else f"id {json.dumps(_legacy_id(src))}"
            raise OffloadgenError(f"--output {output_path} holds an older offloadgen's record for line {rec['line']} (id "
                                  f"{json.dumps(rec.get('id'))}), and --input {input_path} has {now} there now: "
                                  "resume with the input it was made from, or choose another --output")
        return src.key
    return key_of


def _legacy_id(src: InputLine):
    """The id an older offloadgen wrote for an input line: its "id" (containers as JSON text), else
    its line number."""
    try:
        rec = json.loads(src.text)
    except (ValueError, RecursionError):
        return src.line
    value = rec.get("id", src.line) if isinstance(rec, dict) else src.line
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def _pending_items(llm, job: Job, sampling: SamplingParams, max_seq_len: int | None):
    """What a (resumed) job has left to answer, parsed against the length limit: the summary so
    far, the items (bad lines carry their error), and that limit."""
    if job.out.done:
        print(f"offloadgen: {job.out.name}: {describe_resume(job.lines, job.out.done)}", file=sys.stderr)
    todo = [src for src in job.lines if src.key not in job.out.done]
    summary = JobSummary(total=len(job.lines), skipped=len(job.lines) - len(todo))
    limit = min(context_limit(llm), max_seq_len or math.inf)
    return summary, [job_item(src, llm.tokenizer, limit, sampling.max_new_tokens, sampling) for src in todo], limit


def answer_job(llm, job: Job, sampling: SamplingParams, batch_size: int = 16, progress: bool = True,
               prefill_chunk: int = 512, output_format: str = "jsonl", max_seq_len: int | None = None) -> JobSummary:
    """Answer the job's lines that its output has no record for; with job.ordered, rewrite the
    output in input order once all are answered. A line longer than max_seq_len (prompt + its max
    tokens; the command's --max-seq-len, on any device) is that line's error, as one beyond the
    model's context is."""
    summary, items, limit = _pending_items(llm, job, sampling, max_seq_len)
    answer_items(llm, items, job.out, sampling, batch_size, summary, progress, prefill_chunk, output_format)
    if job.ordered and not summary.interrupted:
        job.out.rewrite_in_order({src.key: i for i, src in enumerate(job.lines)})
    return summary


def run_job(llm, input_path: str, output_path: str, sampling: SamplingParams, batch_size: int = 16,
            ordered: bool = False, progress: bool = True, prefill_chunk: int = 512,
            output_format: str = "jsonl", max_seq_len: int | None = None) -> JobSummary:
    with open_job(input_path, output_path, ordered) as job:
        return answer_job(llm, job, sampling, batch_size, progress, prefill_chunk, output_format, max_seq_len)


def answer_items(llm, items: list[JobItem], out: JobOutput, sampling: SamplingParams, batch_size: int,
                 summary: JobSummary, progress: bool = True, prefill_chunk: int = 512,
                 output_format: str = "jsonl") -> None:
    """Error records first, then each request's record as it finishes (continuous batching in
    batch_size slots). SIGINT/SIGTERM: no request starts, those in flight finish and are written
    (summary.interrupted says which signal)."""
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc="prompts", unit="prompt", file=sys.stderr, disable=None if progress else True)
    with stop_on_signals() as stop:
        try:
            bad = [it for it in items if it.error]
            out.append([error_record(it, output_format) for it in bad])
            model = llm.checkpoint.name if output_format == "openai-batch" else ""
            summary.errors += len(bad)
            bar.update(len(bad))

            def on_done(pairs):
                _write_results(out, [(result_record(it, c, output_format, model), len(c.token_ids))
                                     for it, c in pairs], summary, bar, start)

            answer_continuously(llm, [it for it in items if not it.error], sampling, batch_size, on_done, summary,
                                lambda: bool(stop), prefill_chunk)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    if stop:
        summary.interrupted = signal.Signals(stop["signal"]).name


def _write_results(out: JobOutput, records: list[tuple[dict, int]], summary: JobSummary, bar, start: float) -> None:
    """Append (record, tokens) pairs of finished requests, and count them."""
    out.append([rec for rec, _ in records])
    summary.done += len(records)
    summary.tokens += sum(n for _, n in records)
    bar.update(len(records))
    bar.set_postfix(tok_s=f"{summary.tokens / max(time.perf_counter() - start, 1e-9):.1f}")


@contextmanager
def stop_on_signals():
    """While open, SIGINT and SIGTERM set the yielded dict's "signal" (no request starts, those in
    flight finish) instead of ending the process; a second signal ends it at once."""
    stop = {}

    def request_stop(signum, frame):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)
        print(f"\noffloadgen: {signal.Signals(signum).name}: finishing the requests in flight, then stopping",
              file=sys.stderr)

    # Python lets only the main thread set handlers; a job driven from another thread keeps the defaults.
    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def prompt_records(results) -> list[dict]:
    """Records of a --prompt run, from (index, prompt, text, tokens, finish_reason) tuples, in the
    shape of a job's. Their keys start with "prompt:", so a job's resume never takes them for its
    own lines."""
    return [{"key": "prompt:" + hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16],
             "id": index, "line": index + 1, "prompt": prompt, "text": text, "tokens": n_tokens,
             "finish_reason": reason} for index, prompt, text, n_tokens, reason in results]


def answer_continuously(llm, items: list[JobItem], sampling: SamplingParams, slots: int, on_done, summary: JobSummary,
                        stopping, prefill_chunk: int = 512) -> None:
    """Every item through the model's continuous batcher in `slots` slots; on_done([(item,
    Completion)]) after each pass in which requests ended. Once stopping() is true no request
    starts and those in flight finish."""
    if not items:
        return
    batcher, by_line = _submit(llm, items, sampling, slots, prefill_chunk)
    while batcher.has_work():
        if stopping():
            batcher.stop_admitting()
        ended = _ended(_step_with_retry(llm, batcher, summary), by_line)
        summary.passes += 1
        if ended:
            on_done(ended)


def _submit(llm, items: list[JobItem], sampling: SamplingParams, slots: int, prefill_chunk: int):
    """The model's batcher with every item submitted (request id: its line), and the items by
    line. No items (a rank dealt none): a batcher of one short slot, to take part in passes."""
    params = {it.line: it.sampling or sampling for it in items}
    max_len = min(context_limit(llm), max((it.n_tokens + params[it.line].max_new_tokens for it in items), default=1))
    batcher = llm.batcher(max(1, min(slots, len(items))), max_len, prefill_chunk)
    for it in items:
        batcher.submit(llm.tokenizer.encode(it.prompt), params[it.line], request_id=it.line)
    return batcher, {it.line: it for it in items}


def _ended(outputs, by_line: dict) -> list:
    """(item, Completion) of every request that ended in a pass's outputs."""
    from .api import Completion
    return [(by_line[o.request.id], Completion(by_line[o.request.id].prompt, o.request.text, o.request.output_ids,
                                               o.request.finish_reason)) for o in outputs if o.finished]


def _step_with_retry(llm, batcher, summary, world=None):
    while True:
        try:
            return batcher.step()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            if world is not None and world.active and sharded(llm.engine):
                # a retry starts this rank's pass over while the others are in the middle of theirs:
                # the per-layer all-gathers would no longer pair up
                raise OffloadgenError(f"out of GPU memory on rank {world.rank}; with --weight-fetch "
                                      f"{llm.plan.config.weight_fetch} the ranks cannot start a pass over apart: "
                                      "lower --batch-size or --max-new-tokens and run the same command again "
                                      "(finished results are kept)") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            llm.shrink_micro_batch(batcher.slots)
            summary.retries.append(llm.engine.micro_batch_size)
            print(f"offloadgen: out of GPU memory; the requests in flight start over with micro-batches of "
                  f"{llm.engine.micro_batch_size}", file=sys.stderr)
            batcher.restart()


def answer_job_on_ranks(llm, job: Job | None, sampling: SamplingParams, world, batch_size: int = 16,
                        progress: bool = True, prefill_chunk: int = 512, output_format: str = "jsonl",
                        max_seq_len: int | None = None) -> JobSummary:
    """A job across data-parallel ranks (ranks.py): rank 0 holds the job (its lock; job is None
    elsewhere), parses its lines, writes the bad lines' error records, deals the good ones by
    expected work and alone writes: every pass, what ended on any rank is gathered to it and
    appended (fsynced) before the next pass starts, so a failure anywhere loses at most the
    requests in flight. Each rank answers its share in its own batch_size slots, in lockstep.
    The summary is rank 0's (others count only their own requests)."""
    from . import distributed
    start = time.perf_counter()
    summary, shares = JobSummary(total=0), None
    if world.is_main:
        summary, shares = _prepare_on_rank_0(llm, job, sampling, world.size, prefill_chunk, output_format, max_seq_len)
    items = distributed.scatter(shares, world, distributed.control_group(world))
    bar = tqdm(total=summary.total - summary.skipped, initial=summary.errors, desc="prompts", unit="prompt",
               file=sys.stderr, disable=True if not (progress and world.is_main) else None)
    model = llm.checkpoint.name if output_format == "openai-batch" else ""
    batcher, by_line = _submit(llm, items, sampling, batch_size, prefill_chunk)

    def report(outputs):  # records of what ended this pass, built on the rank that ran them
        return [(result_record(it, c, output_format, model), len(c.token_ids)) for it, c in _ended(outputs, by_line)]

    def on_gathered(reports):
        _write_results(job.out, [pair for part in reports for pair in part], summary, bar, start)

    with stop_on_signals() as stop:
        try:
            result = run_in_lockstep(batcher, world, lambda: _step_with_retry(llm, batcher, summary, world),
                                     report, on_gathered, lambda: stop.get("signal"))
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    summary.passes = result["passes"]
    result["clock"].say(world.rank)
    if result["stopped_by"] is not None:
        summary.interrupted = signal.Signals(result["stopped_by"]).name
    elif world.is_main and job.ordered:
        job.out.rewrite_in_order({src.key: i for i, src in enumerate(job.lines)})
    return summary


def _prepare_on_rank_0(llm, job: Job, sampling: SamplingParams, ranks: int, prefill_chunk: int,
                       output_format: str, max_seq_len: int | None = None) -> tuple[JobSummary, list[list[JobItem]]]:
    """Rank 0's part before the passes: what is left to answer, the bad lines' records written
    (a line longer than max_seq_len among them, as in one process), and the good lines dealt to
    the ranks by expected work."""
    summary, items, limit = _pending_items(llm, job, sampling, max_seq_len)
    bad = [it for it in items if it.error]
    job.out.append([error_record(it, output_format) for it in bad])
    summary.errors = len(bad)
    good = [it for it in items if not it.error]
    costs = [request_cost(it.n_tokens, min((it.sampling or sampling).max_new_tokens, limit - it.n_tokens),
                          prefill_chunk) for it in good]
    return summary, [[good[i] for i in share] for share in deal(costs, ranks)]
