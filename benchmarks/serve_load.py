"""Load test for `offloadgen serve`: async streaming clients at a fixed concurrency or request
rate, then the same requests through `offloadgen generate` (a Batch API file), one table last.

    python benchmarks/serve_load.py --model-args "facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB \\
        --kv-offload --micro-batch-size 8" --slots 64 --concurrency 16,64 --num-requests 128 \\
        --input-len 128:512 --output-len 32:128 --compare-generate

It starts the server itself (`--model-args` and `--slots` go to `offloadgen serve`), or uses a
running one with --url. Requests are drawn once (seeded): prompt and output lengths uniform in
the given ranges; output is held to its length (ignore_eos, greedy), so every mode does the same
work. Reported per mode: aggregate output tokens/s over the wall time of the run, time to first
token (TTFT) and time per output token after the first (TPOT) percentiles, and the ratio to
`generate`'s output tokens/s (its own figure, model loading excluded), and each mode's passes
over the weights and their mean duration (the server's /metrics; generate's summary line), which
tell a slower pass from more of them. Every request has a
timeout and the whole run a deadline, so nothing hangs.

`generate` runs the same Batch API lines through the same continuous batcher (--batch-size =
--slots), each with its own max_tokens: the comparison is the HTTP path's cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WORDS = "the of and to in is was for on that with as by at from his her an which or be are this were".split()


@dataclass
class Req:
    prompt: str
    output_len: int


@dataclass
class Result:
    ok: bool
    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class Row:
    mode: str
    requests: int
    failed: int
    output_tokens: int
    elapsed: float
    ttft: list = field(default_factory=list)
    tpot: list = field(default_factory=list)
    passes: int | None = None  # passes over the weights the mode ran (the server's /metrics, generate's summary)
    pass_s: float | None = None  # their mean duration

    @property
    def tokens_s(self) -> float:
        return self.output_tokens / self.elapsed if self.elapsed else 0.0


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def make_requests(args) -> list[Req]:
    """Prompts of about the drawn token count: the model's own tokenizer measures them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from offloadgen.checkpoint import open_checkpoint
    words = shlex.split(args.model_args)
    model = next((w for w in words if not w.startswith("-")), None)
    tok = open_checkpoint(model, dummy="--dummy" in words).tokenizer()
    rng = random.Random(args.seed)
    reqs = []
    for _ in range(args.num_requests):
        n_in, n_out = rng.randint(*span(args.input_len)), rng.randint(*span(args.output_len))
        text = " ".join(rng.choice(WORDS) for _ in range(n_in))
        while len(tok.encode(text)) > n_in and " " in text:
            text = text.rsplit(" ", max(1, (len(tok.encode(text)) - n_in) // 2))[0]
        reqs.append(Req(text, n_out))
    return reqs


async def one_request(client, model: str, req: Req, timeout: float) -> Result:
    res = Result(False, time.perf_counter())

    async def consume():
        stream = await client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and res.first is None:  # the server sends a chunk per token, text or not
                res.first = time.perf_counter()
            if chunk.usage is not None:
                res.tokens = chunk.usage.completion_tokens

    try:
        await asyncio.wait_for(consume(), timeout)
        res.end, res.ok = time.perf_counter(), True
    except Exception as e:  # noqa: BLE001 - one failed request is a row's count, not the run's end
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, key: str, model: str, reqs: list[Req], concurrency: int, rate: float | None,
                   timeout: float, seed: int) -> tuple[list[Result], float]:
    """At most `concurrency` requests at once; with a rate, arrivals are Poisson at that rate."""
    import openai
    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)
    gate, rng = asyncio.Semaphore(concurrency), random.Random(seed)

    async def gated(req):
        async with gate:
            return await one_request(client, model, req, timeout)

    start = time.perf_counter()
    tasks = []
    for req in reqs:
        tasks.append(asyncio.create_task(gated(req)))
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await client.close()
    return results, elapsed


def summarize(mode: str, results: list[Result], elapsed: float) -> Row:
    ok = [r for r in results if r.ok and r.first is not None]
    row = Row(mode, len(results), len(results) - len(ok), sum(r.tokens for r in ok), elapsed)
    row.ttft = [r.first - r.start for r in ok]
    row.tpot = [(r.end - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    for r in results:
        if r.ok and r.first is None:
            print("serve_load: a request ended without a single chunk", file=sys.stderr)
            break
        if not r.ok:
            print(f"serve_load: a request failed: {r.error}", file=sys.stderr)
            break
    return row


def scrape_passes(url: str, key: str) -> tuple[int | None, float | None]:
    """(passes, their seconds) so far, from the server's /metrics; (None, None) where unreadable."""
    req = urllib.request.Request(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"})
    try:
        text = urllib.request.urlopen(req, timeout=10).read().decode()
    except OSError:
        return None, None
    value = lambda name: float(m.group(1)) if (m := re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)) else None  # noqa: E731
    count, total = value("offloadgen_pass_seconds_count"), value("offloadgen_pass_seconds_sum")
    return (None, None) if count is None else (int(count), total)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "offloadgen.cli", "serve", *shlex.split(args.model_args), "--slots", str(args.slots),
           "--port", str(args.port), "--max-queue", str(args.num_requests), "--served-model-name", "bench",
           "--log-level", "warning", *shlex.split(args.serve_args)]
    print("serve_load: " + shlex.join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=_env())
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: the server exited with {proc.returncode} while starting")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url + "/v1"
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("serve_load: the server did not start in time")


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def run_generate(args, reqs: list[Req]) -> Row:
    """The same requests as a Batch API file through `offloadgen generate`; its own tokens/s figure
    (from its summary line) leaves out loading the model, as the server's runs do."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "requests.jsonl", Path(tmp) / "out.jsonl"
        src.write_text("".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": {
            "model": "bench", "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0, "ignore_eos": True}})
            + "\n" for i, r in enumerate(reqs)))
        cmd = [sys.executable, "-m", "offloadgen.cli", "generate", *shlex.split(args.model_args), "--input", str(src),
               "--output", str(dst), "--output-format", "openai-batch", "--batch-size", str(args.slots),
               *shlex.split(args.generate_args)]
        print("serve_load: " + shlex.join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, env=_env(), stderr=subprocess.PIPE, text=True, timeout=args.deadline)
        sys.stderr.write(done.stderr[-3000:])
        m = re.search(r"(\d+) tokens in ([0-9.]+) s", done.stderr)
        if done.returncode != 0 or not m:
            return Row("generate (failed)", len(reqs), len(reqs), 0, 0.0)
        row = Row("generate", len(reqs), 0, int(m.group(1)), float(m.group(2)))
        if p := re.search(r"tokens/s, (\d+) passes of ([0-9.]+) s", done.stderr):
            row.passes, row.pass_s = int(p.group(1)), float(p.group(2))
        return row


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.0f}"


def print_table(rows: list[Row]) -> None:
    base = next((r.tokens_s for r in rows if r.mode == "generate" and r.tokens_s), None)
    head = (f"{'mode':<24}{'reqs':>6}{'fail':>6}{'out tok':>9}{'secs':>8}{'out tok/s':>11}{'vs gen':>8}"
            f"{'TTFT ms p50/p90/p99':>22}{'TPOT ms p50/p90/p99':>22}{'passes':>8}{'pass s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r.tokens_s / base:.2f}" if base and r.mode != "generate" else "-"
        ttft = "/".join(pct(r.ttft, q) for q in (0.5, 0.9, 0.99))
        tpot = "/".join(pct(r.tpot, q) for q in (0.5, 0.9, 0.99))
        print(f"{r.mode:<24}{r.requests:>6}{r.failed:>6}{r.output_tokens:>9}{r.elapsed:>8.1f}{r.tokens_s:>11.1f}"
              f"{ratio:>8}{ttft:>22}{tpot:>22}{r.passes if r.passes is not None else '-':>8}"
              f"{f'{r.pass_s:.3f}' if r.pass_s else '-':>8}")
    if any(r.tpot for r in rows):
        means = ", ".join(f"{r.mode}: {statistics.mean(r.tpot) * 1000:.0f}" for r in rows if r.tpot)
        print(f"mean TPOT ms: {means}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-args", default="", help="MODEL and model/offload flags, as for `offloadgen serve`")
    p.add_argument("--slots", type=int, default=16, help="the server's slots, and generate's --batch-size")
    p.add_argument("--serve-args", default="", help="more flags for `offloadgen serve`")
    p.add_argument("--generate-args", default="", help="more flags for `offloadgen generate`")
    p.add_argument("--url", help="use this running server (http://host:port/v1) instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("OFFLOADGEN_API_KEY", "none"))
    p.add_argument("--model", default="bench", help="the model name to ask for (with --url)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--concurrency", default="16", help="comma-separated levels, e.g. 16,64 (one run each)")
    p.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson (default: all at once)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", default="128:512", help="prompt tokens MIN:MAX (uniform)")
    p.add_argument("--output-len", default="32:128", help="output tokens MIN:MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-generate", action="store_true", help="also run the requests through generate")
    p.add_argument("--request-timeout", type=float, default=1800)
    p.add_argument("--deadline", type=float, default=3600, help="seconds a whole mode may take")
    p.add_argument("--startup-timeout", type=float, default=1800)
    p.add_argument("--json", help="append each row as a JSON line to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reqs = make_requests(args)
    rows, proc = [], None
    url = args.url
    try:
        if url is None:
            proc, url = start_server(args)
        model = args.model if args.url else "bench"
        # one untimed request first: the first pass pays one-off costs (kernels, allocator, caches)
        asyncio.run(run_load(url, args.api_key, model, [Req(reqs[0].prompt, 4)], 1, None, args.request_timeout, 0))
        for level in [int(c) for c in args.concurrency.split(",")]:
            before = scrape_passes(url, args.api_key)
            results, elapsed = asyncio.run(asyncio.wait_for(
                run_load(url, args.api_key, model, reqs, level, args.request_rate, args.request_timeout, args.seed),
                args.deadline))
            mode = f"serve c={level}" + (f" rate={args.request_rate:g}/s" if args.request_rate else "")
            rows.append(summarize(mode, results, elapsed))
            after = scrape_passes(url, args.api_key)
            if None not in before and None not in after and after[0] > before[0]:  # this mode's passes alone
                rows[-1].passes = after[0] - before[0]
                rows[-1].pass_s = (after[1] - before[1]) / rows[-1].passes
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    if args.compare_generate:
        rows.append(run_generate(args, reqs))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r.__dict__, "tokens_s": r.tokens_s}) + "\n")
    print_table(rows)
    return 0 if all(r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
