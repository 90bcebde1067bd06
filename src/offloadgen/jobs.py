"""Batch generation jobs that lose nothing: a JSONL file of prompts in, one JSON line per prompt out.

- Prompts run through the continuous batcher (--batch-size slots): each request is appended,
  flushed and fsynced as it finishes, in the order requests finish; a rerun with the same output
  file skips every input line already answered (resume), so a kill loses at most the requests in
  flight. A torn last line (a write cut short) is dropped and redone. --ordered rewrites the
  output in input order once every line is answered.
- A line may set its own sampling with OpenAI's names (max_tokens, temperature, top_p, top_k,
  seed, stop); absent keys take the command's flags.
- A bad input line (not JSON, no prompt, empty, longer than the context, a bad sampling value)
  becomes an error record with its line number; the job goes on.
- OpenAI Batch API request lines ({"custom_id", "method", "url", "body"}) are read as `offloadgen
  serve` reads a request (openai_batch.py); --output-format openai-batch writes the Batch API's
  output lines.
- SIGINT / SIGTERM: no new request starts, the ones in flight finish and are written, then the
  job stops, says how to resume, and exits non-zero. CUDA out of memory: the micro-batch is halved
  and the requests in flight start over (none of theirs was written).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import OffloadgenError
from .openai_batch import error_output_record, is_batch_request, output_record, parse_batch_line
from .sampling import SamplingParams


@dataclass
class JobItem:
    line: int  # 1-based line number in the input file: the resume key
    id: object
    prompt: str | None = None
    error: str | None = None
    n_tokens: int = 0
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
    interrupted: str | None = None
    retries: list = field(default_factory=list)


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


def parse_input_line(text: str, n: int, tokenizer, max_context: int, sampling: SamplingParams | None = None) -> JobItem:
    """One input line -> a prompt, or an error that says what is wrong with it; never raises."""
    try:
        rec = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return JobItem(n, n, error=f"line {n}: not valid JSON ({getattr(e, 'msg', e)})")
    if not isinstance(rec, dict):
        return JobItem(n, n, error=f"line {n}: expected a JSON object with 'prompt' or 'messages'")
    if is_batch_request(rec):
        return _batch_item(rec, n, tokenizer, max_context, sampling or SamplingParams())
    item_id = rec.get("id", n)
    if not isinstance(item_id, (str, int, float, bool)) and item_id is not None:
        item_id = json.dumps(item_id)
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
    if n_tokens >= max_context:
        return JobItem(n, item_id, error=f"line {n}: prompt has {n_tokens} tokens; the model's context is {max_context}")
    own, error = line_sampling(rec, n, sampling or SamplingParams())
    if error:
        return JobItem(n, item_id, error=error)
    return JobItem(n, item_id, prompt, n_tokens=n_tokens, sampling=own)


def _batch_item(rec: dict, n: int, tokenizer, max_context: int, sampling: SamplingParams) -> JobItem:
    req = parse_batch_line(rec, tokenizer, max_context, sampling)
    if req.parsed is None:
        return JobItem(n, req.custom_id, error=f"line {n}: {req.line_error or req.error.message}", openai=req)
    p = req.parsed  # its sampling already has the command's values for absent keys
    return JobItem(n, req.custom_id, p.prompt, n_tokens=len(p.prompt_ids), sampling=p.sampling, openai=req)


def _error_record(it: JobItem, output_format: str) -> dict:
    if output_format != "openai-batch":
        return {"id": it.id, "line": it.line, "error": it.error}
    req = it.openai  # None: not a Batch API line; its custom_id is then its id (by default its line number)
    custom_id = req.custom_id if req is not None else str(it.id)
    return {"line": it.line, **error_output_record(custom_id, it.error, req.error if req is not None else None)}


def _result_record(it: JobItem, c, output_format: str, model: str) -> dict:
    if output_format != "openai-batch":
        return {"id": it.id, "line": it.line, "prompt": it.prompt, "text": c.text, "tokens": len(c.token_ids),
                "finish_reason": c.finish_reason}
    kind = it.openai.kind if it.openai is not None else "completion"
    return {"line": it.line, **output_record(str(it.id), kind, model, c.text, c.finish_reason, it.n_tokens,
                                             len(c.token_ids))}


def read_done(output: Path) -> set[int]:
    """Input lines answered by earlier runs. A torn last line is cut off so appends stay valid."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    done, good_end, pos = set(), 0, 0
    for raw in data.split(b"\n"):
        end = pos + len(raw) + 1
        if raw.strip():
            try:
                done.add(int(json.loads(raw)["line"]))
                good_end = min(end, len(data))
            except (ValueError, KeyError, TypeError):
                if end < len(data):  # only the last line may be torn; anything else is not ours
                    line_no = data[:pos].count(b"\n") + 1
                    raise OffloadgenError(f"{output}: line {line_no} is not a result record; "
                                          "is this the output of another program?") from None
                break
        pos = end
    if good_end < len(data) and data[good_end:].strip():
        print(f"offloadgen: {output}: dropping a torn last line (a write cut short); it will be redone",
              file=sys.stderr)
        with open(output, "r+b") as f:
            f.truncate(good_end)
    elif data and not data.endswith(b"\n"):
        with open(output, "ab") as f:
            f.write(b"\n")
    return done


def batches_by_length(items: list[JobItem], batch_size: int) -> list[list[JobItem]]:
    items = sorted(items, key=lambda it: it.n_tokens)
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_job(llm, input_path: str, output_path: str, sampling: SamplingParams, batch_size: int = 16,
            ordered: bool = False, progress: bool = True, output_format: str = "jsonl") -> JobSummary:
    src, out_path = Path(input_path), Path(output_path)
    try:
        # JSON lines end at "\n" only: splitlines() would also break at U+0085, U+2028 and others
        # that may stand raw inside a JSON string.
        lines = [line.removesuffix("\r") for line in src.read_text(encoding="utf-8", errors="replace").split("\n")]
    except OSError as e:
        raise OffloadgenError(f"cannot read --input {input_path}: {e.strerror}") from None
    if out_path.resolve() == src.resolve():
        raise OffloadgenError("--output must not be the --input file")
    done = read_done(out_path)
    items = [parse_input_line(text, n, llm.tokenizer, _context(llm), sampling)
             for n, text in enumerate(lines, 1) if text.strip() and n not in done]
    summary = JobSummary(total=sum(1 for t in lines if t.strip()), skipped=len(done))
    stop = {}

    def request_stop(signum, frame):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        print(f"\noffloadgen: {signal.Signals(signum).name}: finishing the requests in flight, then stopping",
              file=sys.stderr)

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc="prompts", unit="prompt", file=sys.stderr, disable=None if progress else True)
    try:
        with open(out_path, "a", encoding="utf-8") as out:
            def write(records):
                for r in records:
                    out.write(json.dumps(r, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())

            model = getattr(llm.checkpoint, "name", "offloadgen")
            bad = [it for it in items if it.error]
            write([_error_record(it, output_format) for it in bad])
            summary.errors += len(bad)
            bar.update(len(bad))
            def on_done(pairs):
                write([_result_record(it, c, output_format, model) for it, c in pairs])
                summary.done += len(pairs)
                summary.tokens += sum(len(c.token_ids) for _, c in pairs)
                bar.update(len(pairs))
                bar.set_postfix(tok_s=f"{summary.tokens / (time.perf_counter() - start):.1f}")

            answer_continuously(llm, [it for it in items if not it.error], sampling, batch_size, on_done, summary,
                                lambda: bool(stop))
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
    summary.seconds = time.perf_counter() - start
    if stop:
        summary.interrupted = signal.Signals(stop["signal"]).name
    elif ordered:
        write_in_input_order(out_path)
    return summary


def _context(llm) -> int:
    """Tokens a sequence may reach: the model's context, or less where the GPU was planned for less."""
    return min(llm.cfg.max_position, llm.limits[1]) if llm.limits else llm.cfg.max_position


def answer_continuously(llm, items: list[JobItem], sampling: SamplingParams, slots: int, on_done, summary: JobSummary,
                        stopping) -> None:
    """Every item through the model's continuous batcher in `slots` slots; on_done([(item,
    Completion)]) after each pass in which requests ended. Once stopping() is true no request
    starts and those in flight finish. A row that reaches the cache's end stops with "length"."""
    from .api import Completion
    if not items:
        return
    params = {it.line: it.sampling or sampling for it in items}
    max_len = min(_context(llm), max(it.n_tokens + params[it.line].max_new_tokens for it in items))
    batcher = llm.batcher(min(slots, len(items)), max_len)
    by_line = {it.line: it for it in items}
    for it in items:
        batcher.submit(llm.tokenizer.encode(it.prompt), params[it.line], request_id=it.line)
    while batcher.has_work():
        if stopping():
            batcher.stop_admitting()
        ended = [o.request for o in _step_with_retry(llm, batcher, summary) if o.finished]
        if ended:
            on_done([(by_line[r.id], Completion(by_line[r.id].prompt, r.text, r.output_ids, r.finish_reason))
                     for r in ended])


def _step_with_retry(llm, batcher, summary):
    while True:
        try:
            return batcher.step()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            llm.shrink_micro_batch(batcher.slots)
            summary.retries.append(llm.engine.micro_batch_size)
            print(f"offloadgen: out of GPU memory; the requests in flight start over with micro-batches of "
                  f"{llm.engine.micro_batch_size}", file=sys.stderr)
            batcher.restart()


def write_in_input_order(path: Path) -> None:
    """Rewrite the output sorted by input line, atomically (a temporary file renamed over it)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    records.sort(key=lambda r: r["line"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
