"""Continuous batching across ranks (CPU, gloo, 2 processes): a job's requests are dealt to ranks
that step in lockstep, each request gets exactly the tokens of its prompt run alone, a rank with
far less work keeps joining the passes (empty passes) without a hang, resume and bad lines work,
rank 0 alone writes; the workload bench combines the ranks' figures; `serve` deals its requests to
the ranks' slots, each answer the tokens of its prompt alone, and stops every rank on SIGTERM;
a server or job started with --num-gpus-per-node and stopped by its user exits as one process does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offloadgen.ranks import deal, request_cost

from conftest import reaped, wait_while_running

WORKER = Path(__file__).with_name("dist_jobs.py")
ENV = {**os.environ, "OFFLOADGEN_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_deal_balances_expected_work_and_is_deterministic():
    costs = [30, 5, 5, 5, 5, 5]
    assert deal(costs, 2) == [[0], [1, 2, 3, 4, 5]]  # one long request against five short ones
    costs = [request_cost(p, n, 4) for p, n in [(9, 10), (3, 2), (4, 7), (1, 1), (8, 3), (2, 9)]]
    shares = deal(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(6)) and shares == deal(costs, 3)
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert deal([], 2) == [[], []]


def alone(path, prompt, max_new_tokens):
    """The tokens of one prompt run by itself (one process, weights resident, a static batch of 1)."""
    from offloadgen.checkpoint import SafetensorsFolder
    from offloadgen.engine import Engine
    from offloadgen.offload import ResidentWeights
    from offloadgen.sampling import SamplingParams
    from offloadgen.tokenizer import ByteTokenizer
    ckpt = SafetensorsFolder(path)
    ids = torch.tensor([ByteTokenizer(ckpt.cfg).encode(prompt)])
    eos = ByteTokenizer(ckpt.cfg).eos_token_ids
    out = Engine(ckpt.cfg, ResidentWeights(ckpt, torch.device("cpu"), torch.float32, progress=False),
                 torch.device("cpu"), torch.float32).generate(
        ids, torch.ones_like(ids), SamplingParams(max_new_tokens=max_new_tokens), eos, 0)
    tokens = out.tokens[0]
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


# One long request (30 tokens) and five short ones (5): the deal gives rank 0 the long one and
# rank 1 the five, which end long before it; a bad line becomes an error record.
LINES = ([{"id": "long", "prompt": "The long one", "max_tokens": 30}]
         + [{"id": f"s{i}", "prompt": f"short {i} " * (1 + i), "max_tokens": 5} for i in range(5)])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["allgather", "whole"])
def test_job_across_ranks_gives_each_prompt_its_own_tokens_and_resumes(tiny, tmp_path, mode):
    _, ckpt = tiny("llama2-mha")
    src, dst, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps(x) + "\n" for x in LINES[:3]) + "not json\n"
                   + "".join(json.dumps(x) + "\n" for x in LINES[3:]))
    r = torchrun(2, str(WORKER), str(ckpt), str(src), str(dst), mode, str(stats))
    assert r.returncode == 0, r.stderr[-3000:]
    got = {rec["id"]: rec for rec in records(dst)}
    assert sorted(got, key=str) == sorted([x["id"] for x in LINES] + [4], key=str)  # the bad line: by its number
    assert "not valid JSON" in got[4]["error"]
    for x in LINES:
        want = alone(ckpt, x["prompt"], x["max_tokens"])
        assert got[x["id"]]["text"] == " ".join(map(str, want)) and got[x["id"]]["tokens"] == len(want), x["id"]
    s = json.loads(stats.read_text())
    assert s["done"] == 6 and s["errors"] == 1
    long_tokens = len(alone(ckpt, LINES[0]["prompt"], 30))
    assert s["ranks"][0]["output_tokens"] == long_tokens  # rank 0 had the long request alone
    assert long_tokens > s["ranks"][1]["passes"], "the deal should leave rank 1 idle at the end"
    if mode == "allgather":  # rank 1 ran out of work first and kept joining every layer's all-gather
        assert s["ranks"][1]["empty_passes"] > 0
    else:  # with whole layers an idle rank has no collective to join: it skips the passes
        assert s["ranks"][1]["empty_passes"] == 0

    # resume: keep the error record and two results, and a torn start of a third
    kept = dst.read_text().splitlines(keepends=True)
    kept = [line for line in kept if '"error"' in line][:1] + [line for line in kept if '"text"' in line][:3]
    dst.write_text("".join(kept[:3]) + kept[3][:20])
    r = torchrun(2, str(WORKER), str(ckpt), str(src), str(dst), mode, str(stats))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 of 7 input lines answered by earlier runs" in r.stderr
    again = records(dst)
    assert sorted(rec["line"] for rec in again) == list(range(1, 8))  # none lost, none twice
    assert "".join(kept[:3]) == dst.read_text()[:len("".join(kept[:3]))]  # earlier records untouched
    assert {rec["id"]: rec.get("text") for rec in again} == {k: v.get("text") for k, v in got.items()}
    assert json.loads(stats.read_text())["done"] == 4


def test_workload_bench_across_ranks_combines_the_ranks(tmp_path, monkeypatch):
    from offloadgen.cli import main
    monkeypatch.chdir(tmp_path)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    rec_file = tmp_path / "w.jsonl"
    assert main(["bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--dtype", "float32", "--verbose", "0",
                 "--batch-size", "4", "--workload", "synthetic", "--num-requests", "7", "--input-len", "3:9",
                 "--output-len", "1:6", "--num-gpus-per-node", "2", "--json-file", str(rec_file)]) == 0
    lines = rec_file.read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    r = json.loads(lines[0])
    from offloadgen.bench.workload import synthetic
    from offloadgen.models import preset
    items = synthetic(7, (3, 9), (1, 6), 0, preset("opt-125m").vocab_size)
    ranks = r["per_rank"]
    assert r["world_size"] == 2 and r["slots"] == 4 and r["slots_per_rank"] == 2 and len(ranks) == 2
    assert r["requests"] == 7 == sum(x["requests"] for x in ranks) and min(x["requests"] for x in ranks) >= 3
    assert r["output_tokens"] == sum(it.output_len for it in items) == sum(x["output_tokens"] for x in ranks)
    assert r["elapsed_s"] == max(x["elapsed_s"] for x in ranks)
    assert r["slot_occupancy"] == pytest.approx(sum(x["slot_occupancy"] for x in ranks) / 2)
    assert ranks[0]["passes"] == ranks[1]["passes"] == r["passes"]  # lockstep
    assert r["output_throughput"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])


def test_static_batches_refuse_several_ranks(tmp_path, monkeypatch, capsys):
    from offloadgen.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--batch-size", "4", "--workload",
                 "synthetic", "--compare-static", "--num-gpus-per-node", "2"]) == 2
    assert "static batches run in one process" in capsys.readouterr().err


def test_generate_job_with_num_gpus_per_node_writes_what_one_process_writes(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hello there"}\n{"id": "b", "prompt": "One two three", "max_tokens": 3}\n'
                   'oops\n{"id": "c", "prompt": "Red green"}\n{"prompt": "no id here"}\n')
    cmd = [sys.executable, "-m", "offloadgen.cli", "generate", "opt-125m", "--dummy", "--device", "cpu", "--dtype",
           "float32", "--input", str(src), "--max-new-tokens", "5", "--batch-size", "2"]
    one = subprocess.run(cmd + ["--output", str(tmp_path / "1.jsonl")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(cmd + ["--output", str(tmp_path / "2.jsonl"), "--num-gpus-per-node", "2"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stderr.count("4 prompts answered this run (0 already done earlier), 1 bad lines") == 1  # rank 0 says it
    # every rank says where its time went; the lockstep gives each the job's passes
    import re
    passes = int(re.search(r"tokens/s, (\d+) passes", two.stderr).group(1))
    clocks = dict(re.findall(r"rank (\d): (\d+) passes of [0-9.]+ s, [0-9.]+ s in passes, [0-9.]+ s at the exchanges",
                             two.stderr))
    assert clocks == {"0": str(passes), "1": str(passes)} and passes > 0, two.stderr[-2000:]
    lines = [sorted((tmp_path / f"{n}.jsonl").read_text().splitlines()) for n in (1, 2)]
    assert lines[0] == lines[1] and len(lines[0]) == 5


# --- serve across ranks -----------------------------------------------------------------------------
SERVE = Path(__file__).with_name("dist_serve.py")
LONG, SHORT = "The long one", [f"short {i} " * (1 + i) for i in range(5)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(log: Path, *args, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=f, stderr=subprocess.STDOUT)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The process of one rank: the child of torchrun whose environment says RANK=rank."""
    children = [int(c) for t in Path(f"/proc/{torchrun_pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    return next(c for c in children if f"RANK={rank}".encode() in Path(f"/proc/{c}/environ").read_bytes().split(b"\0"))


def metrics_text(port: int) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def rank_counters(port: int) -> dict:
    """{(metric, rank): value} of the per-rank counters on /metrics."""
    import re
    return {(m[1], int(m[2])): float(m[3]) for m in
            re.finditer(r'^(offloadgen_rank_\w+)_total\{rank="(\d+)"\} (\S+)$', metrics_text(port), re.M)}


def stop_rank_0(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM to rank 0 alone, as a user stops a server: both ranks must then end with 0, or
    torchrun would not."""
    import signal
    os.kill(rank_pid(proc.pid, 0), signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("mode", ["whole", "allgather"])
def test_serve_across_ranks_deals_requests_and_each_gets_its_tokens_alone(tiny, tmp_path, mode):
    """One long request, which rank 0 takes, then five short ones at once, which go to rank 1
    (the least outstanding work); every answer is its prompt's tokens run alone (greedy)."""
    import openai
    from concurrent.futures import ThreadPoolExecutor
    _, ckpt = tiny("llama2-mha")
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_torchrun(log, str(SERVE), str(ckpt), mode, str(port))
    try:
        wait_for_line(log, "serving", proc)
        assert "6 slots on each of 2 ranks" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        stream = iter(client.completions.create(model="tiny", prompt=LONG, max_tokens=200, temperature=0,
                                                stream=True))
        first = next(stream).choices[0].text  # rank 0 has it now, and is generating
        assert "offloadgen_slots 12.0" in metrics_text(port)  # every rank's slots

        def short(prompt):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens
        with ThreadPoolExecutor(5) as pool:
            shorts = list(pool.map(short, SHORT))
        long_text = first + "".join(c.choices[0].text for c in stream)
        for prompt, (text, n) in zip(SHORT, shorts):
            want = alone(ckpt, prompt, 5)
            assert text == " ".join(map(str, want)) and n == len(want), prompt
        want_long = alone(ckpt, LONG, 200)
        assert long_text == " ".join(map(str, want_long))
        counters = rank_counters(port)
        assert counters[("offloadgen_rank_requests", 0)] == 1 and counters[("offloadgen_rank_requests", 1)] == 5
        assert counters[("offloadgen_rank_generation_tokens", 0)] == len(want_long)
        stop_rank_0(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    import re
    m = re.search(r"rank 1 answered (\d+) requests \((\d+) tokens\) in (\d+) passes, and ran (\d+) empty ones", out)
    assert m, out[-3000:]
    answered, tokens, passes, empty = map(int, m.groups())
    assert answered == 5 and tokens == sum(n for _, n in shorts)
    assert len(want_long) > passes, "rank 1 should have run out of work long before rank 0"
    clocks = dict(re.findall(r"rank (\d): (\d+) passes of [0-9.]+ s, .* at the exchanges, [0-9.]+ s of CPU", out))
    assert set(clocks) == {"0", "1"} and "the HTTP side used" in out
    if mode == "allgather":  # rank 1 kept joining every layer's all-gather while rank 0 went on
        assert empty > 0
        assert clocks["0"] == clocks["1"] == str(passes + empty)  # lockstep: the same passes on both
    else:  # with whole layers an idle rank only joins the exchange
        assert empty == 0


@pytest.mark.parametrize("mode,admission", [("whole", "fifo"), ("allgather", "fifo"), ("allgather", "longest")])
def test_serve_across_ranks_with_more_requests_than_slots_answers_each_once_and_never_stalls(tiny, tmp_path,
                                                                                             mode, admission):
    """Two ranks of one slot and a burst of ten requests, some of one token: the eight left
    waiting are dealt from the shared queue as slots free, on both ranks, each answered once with
    its prompt's tokens alone; and none sits out rank 0's idle sleep (20 s here) meanwhile."""
    import time

    import openai
    from concurrent.futures import ThreadPoolExecutor
    _, ckpt = tiny("llama2-mha")
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_torchrun(log, str(SERVE), str(ckpt), mode, str(port),
                          env={"DIST_SERVE_ARGS": f"--slots 1 --admission {admission}", "DIST_SERVE_HEARTBEAT": "20"})
    asks = [(SHORT[i % 5] + str(i), (1, 1, 4, 1, 7)[i % 5]) for i in range(10)]
    try:
        wait_for_line(log, "serving", proc)
        assert "1 slots on each of 2 ranks" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(prompt_and_n):
            r = client.completions.create(model="tiny", prompt=prompt_and_n[0], max_tokens=prompt_and_n[1],
                                          temperature=0)
            return r.choices[0].text
        t0 = time.perf_counter()
        with ThreadPoolExecutor(10) as pool:
            got = list(pool.map(ask, asks))
        seconds = time.perf_counter() - t0
        for (prompt, n), text in zip(asks, got):
            assert text == " ".join(map(str, alone(ckpt, prompt, n))), prompt
        assert seconds < 15, f"requests waited out rank 0's idle sleep: {seconds:.1f} s"
        counters = rank_counters(port)
        assert counters[("offloadgen_rank_requests", 0)] + counters[("offloadgen_rank_requests", 1)] == 10
        assert min(counters[("offloadgen_rank_requests", r)] for r in (0, 1)) >= 1
        stop_rank_0(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_across_ranks_answers_as_one_process(tmp_path):
    """`offloadgen serve` itself under torchrun (dummy weights): concurrent requests spread over
    both ranks, each answered as one process answers it alone; SIGTERM ends both ranks with 0."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    import offloadgen
    from offloadgen.sampling import SamplingParams
    prompts = ["Hello there", "One two three", "Red green blue", "Paris is"]
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", dtype="float32", progress=False)
    want = {p: llm.generate(p, SamplingParams(max_new_tokens=4), static=True)[0].text for p in prompts}
    llm.close()
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_torchrun(log, "-m", "offloadgen.cli", "serve", "opt-125m", "--dummy", "--device", "cpu", "--dtype",
                          "float32", "--slots", "2", "--max-seq-len", "64", "--port", str(port), "--log-level",
                          "warning")
    try:
        wait_for_line(log, "serving", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(prompt):
            return client.completions.create(model="opt-125m", prompt=prompt, max_tokens=4, temperature=0)
        with ThreadPoolExecutor(4) as pool:
            got = {p: r.choices[0].text for p, r in zip(prompts, pool.map(ask, prompts))}
        assert got == want
        counters = rank_counters(port)
        assert counters[("offloadgen_rank_requests", 1)] >= 1 and counters[("offloadgen_rank_generation_tokens", 1)] > 0
        stop_rank_0(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "rank 1 answered" in log.read_text()


def test_a_pass_failing_on_rank_1_answers_its_requests_with_the_error_and_serving_goes_on(tiny, tmp_path):
    """Rank 1's pass raises while it holds a request: that request gets a 503 naming the failure,
    rank 0's request is untouched, rank 1 answers the next one correctly, and SIGTERM still ends both."""
    import openai
    _, ckpt = tiny("llama2-mha")
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_torchrun(log, str(SERVE), str(ckpt), "whole", str(port), "boom")
    try:
        wait_for_line(log, "serving", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        stream = iter(client.completions.create(model="tiny", prompt=LONG, max_tokens=200, temperature=0,
                                                stream=True))
        first = next(stream).choices[0].text  # on rank 0: rank 1 has the least work for what follows
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model="tiny", prompt="boom", max_tokens=5, temperature=0)
        assert failed.value.status_code == 503
        assert "generation failed on rank 1: RuntimeError: injected failure" in str(failed.value)
        after = client.completions.create(model="tiny", prompt=SHORT[1], max_tokens=5, temperature=0)
        assert after.choices[0].text == " ".join(map(str, alone(ckpt, SHORT[1], 5)))
        assert first + "".join(c.choices[0].text for c in stream) == " ".join(map(str, alone(ckpt, LONG, 200)))
        assert rank_counters(port)[("offloadgen_rank_requests", 1)] == 2
        stop_rank_0(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "RuntimeError: injected failure" in log.read_text()  # rank 1's traceback, in the server's log


@pytest.mark.parametrize("rank,inside", [(0, False), (0, True), (1, False), (1, True)])
def test_a_pass_failing_with_allgather_answers_every_request_with_the_failing_ranks_error(tiny, tmp_path, rank,
                                                                                           inside):
    """A pass failing on either rank, as it starts or midway (after some of its all-gathers, as an
    out-of-memory in a layer would): with all-gathered weights no rank can go on alone, so every
    request is answered with that rank's error, the failing rank prints its traceback and one line,
    the other rank one line that another rank stopped (no gloo traceback), and the server exits 1
    in seconds. Before, the failing rank rebuilt its rows and went on to the next exchange while
    the other sat in the pass's all-gathers (on GPUs until the collective timeout, 600 s; on gloo
    ranks a crash with gloo's traceback and no word of the cause); and a failure midway let the
    engine's reset() issue the next pass's gathers against the other rank's gathers of this pass: gloo
    aborted the healthy rank (rank 0: requests cut off; rank 1: rank 0 blamed another rank), and
    a failure on rank 0 left rank 1 printing gloo's traceback of the closed connection."""
    import time

    import openai
    _, ckpt = tiny("llama2-mha")
    port, log = free_port(), tmp_path / "serve.log"
    env = {"DIST_SERVE_FAIL_RANK": str(rank), "DIST_SERVE_FAIL_INSIDE": "1" if inside else "0"}
    proc = start_torchrun(log, str(SERVE), str(ckpt), "allgather", str(port), "boom", env=env)
    why = f"generation failed on rank {rank}: RuntimeError: injected failure"
    try:
        wait_for_line(log, "serving", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=50)
        streams = []
        for _ in range(2 - rank):  # the long ones first: "boom" goes to the failing rank, the least work
            streams.append(iter(client.completions.create(model="tiny", prompt=LONG, max_tokens=200, temperature=0,
                                                          stream=True, extra_body={"ignore_eos": True})))
            next(streams[-1])
        started = time.time()
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model="tiny", prompt="boom", max_tokens=5, temperature=0)
        if rank == 0:  # rank 1's failure reaches rank 0 as another rank having stopped
            assert failed.value.status_code == 503 and why in str(failed.value), str(failed.value)
        for stream in streams:
            with pytest.raises(openai.APIError):
                sum(1 for _ in stream)
        assert proc.wait(40) == 1
        assert time.time() - started < 40
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert f"offloadgen: rank {rank}: {why}" in out, out[-3000:]
    assert f"offloadgen: rank {1 - rank}: another rank of the server stopped during a pass" in out, out[-3000:]
    assert "Fatal Python error" not in out and "Connection closed by peer" not in out \
        and "Connection reset by peer" not in out, out[-3000:]


def test_a_client_leaving_cancels_its_request_on_rank_1(tiny, tmp_path):
    """A stream dealt to rank 1 whose client hangs up after one chunk: the cancel crosses to rank 1
    at the next exchange and its slot is freed long before the 250 tokens it would have run to."""
    import time

    import openai
    _, ckpt = tiny("llama2-mha")
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_torchrun(log, str(SERVE), str(ckpt), "whole", str(port))
    try:
        wait_for_line(log, "serving", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        ask = dict(model="tiny", temperature=0, stream=True, extra_body={"ignore_eos": True})
        on_0 = iter(client.completions.create(prompt=LONG, max_tokens=200, **ask))
        next(on_0)
        on_1 = client.completions.create(prompt="ab", max_tokens=250, **ask)
        next(iter(on_1))
        on_1.close()  # the client leaves
        assert len(list(on_0)) > 0
        deadline = time.time() + 60
        while "offloadgen_active_slots 0.0" not in metrics_text(port):  # every rank's slots free
            assert time.time() < deadline
            time.sleep(0.1)
        counters = rank_counters(port)
        assert counters[("offloadgen_rank_requests", 1)] == 1
        assert counters[("offloadgen_rank_generation_tokens", 1)] < 250
        stop_rank_0(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process below pid (the launcher's torchrun, its ranks)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            found += [child, *descendants(child)]
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_server_on_ranks_stopped_by_its_user_drains_and_exits_0_without_torchrun_noise(tmp_path, sig):
    """`offloadgen serve --num-gpus-per-node 2` as a user starts it, then SIGTERM (systemd, docker
    stop) or SIGINT (Ctrl-C) to that process, with a stream in flight: the stream still finishes,
    the command exits 0 as one process does, stderr has our lines and no torchrun traceback, and no
    process of the run is left."""
    import signal

    import openai
    port = free_port()
    cmd = [sys.executable, "-m", "offloadgen.cli", "serve", "opt-125m", "--dummy", "--device", "cpu", "--dtype",
           "float32", "--slots", "2", "--max-seq-len", "64", "--port", str(port), "--log-level", "warning",
           "--shutdown-grace", "60", "--num-gpus-per-node", "2"]
    # torchrun's own stop kills the ranks this long after its signal (30 s unless set): with 0 any
    # stream still running when torchrun itself acts on the stop would be cut off at once
    env = {**ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
        assert "2 slots on each of 2 ranks" in "".join(lines), "".join(lines)[-3000:]
        run = descendants(proc.pid)
        assert len(run) >= 3, run  # torchrun and its two ranks
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        stream = iter(client.completions.create(model="opt-125m", prompt="1, 2, 3,", max_tokens=40, temperature=0,
                                                stream=True))
        first = next(stream)
        proc.send_signal(getattr(signal, sig))
        rest = list(stream)  # the request in flight gets the grace period, not a cut
        assert rest[-1].choices[0].finish_reason == "length"
        assert first.choices[0].text + "".join(c.choices[0].text for c in rest)
        code = proc.wait(120)
        err = "".join(lines) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err[-3000:]
    for noise in ("Traceback", "SignalException", "ChildFailedError", "death signal"):
        assert noise not in err, err[-3000:]
    assert "rank 1 answered 1 requests" in err or "rank 1 answered 0 requests" in err, err[-3000:]
    import time
    deadline = time.time() + 10
    while any(map(running, run)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in run if running(p)], "processes of the run outlived it"


def test_a_job_on_ranks_stopped_midway_exits_as_one_process_without_torchrun_noise(tmp_path):
    """`generate --input ... --num-gpus-per-node 2` and SIGTERM to that process midway: the
    requests in flight are written, the command exits 143 as one process does, stderr says to
    resume and has no torchrun traceback, and no process of the run is left."""
    import signal
    import time
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "x" * (1 + i % 37)}) + "\n" for i in range(400)))
    cmd = [sys.executable, "-m", "offloadgen.cli", "generate", "opt-125m", "--dummy", "--device", "cpu", "--dtype",
           "float32", "--input", str(src), "--output", str(dst), "--max-new-tokens", "6", "--batch-size", "4",
           "--num-gpus-per-node", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        wait_while_running(proc, lambda: dst.exists() and dst.read_text().count("\n") >= 8, 240)
        run = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Run the same command again to resume" in err and err.count("finishing the requests in flight") == 1
    for noise in ("Traceback", "SignalException", "ChildFailedError", "death signal"):
        assert noise not in err, err[-3000:]
    assert 8 <= dst.read_text().count("\n") < 400, "the stop came after the job finished: the test proved nothing"
    time.sleep(1)
    assert not [p for p in run if running(p)], "processes of the run outlived it"


def test_an_error_every_rank_finds_is_one_line_and_exit_2_as_in_one_process(tmp_path):
    """A setting refused only once the ranks plan (here --cpu-offload on the CPU): rank 0 says it in
    one line and the command exits 2, as one process does, not 1 under torchrun's FAILED report and
    ChildFailedError traceback; a rank that crashes is still reported by torchrun (test_distributed)."""
    cmd = [sys.executable, "-m", "offloadgen.cli", "generate", "opt-125m", "--dummy", "--device", "cpu", "--dtype",
           "float32", "--prompt", "x", "--max-new-tokens", "2", "--cpu-offload"]
    one = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    two = subprocess.run([*cmd, "--num-gpus-per-node", "2"], env=ENV, capture_output=True, text=True, timeout=240)
    assert one.returncode == 2 and "--cpu-offload streams weights to a GPU" in one.stderr, one.stderr[-3000:]
    assert two.returncode == 2, two.stderr[-3000:]
    assert two.stderr.strip() == one.stderr.strip(), two.stderr[-3000:]


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_bench_on_ranks_stopped_midway_ends_every_rank_quietly(tmp_path, sig, code):
    """`bench --num-gpus-per-node 2` has no stop of its own (unlike a server or a job, rank 0 does
    not stop the others): a SIGTERM or Ctrl-C midway ends every rank at once, as it ends one process,
    exit 128 + the signal, rather than rank 0 alone and rank 1's collective failing with a gloo traceback."""
    import signal
    import time
    cmd = [sys.executable, "-m", "offloadgen.cli", "bench", "--model", "opt-125m", "--dummy", "--device", "cpu",
           "--dtype", "float32", "--batch-size", "2", "--prompt-len", "4", "--gen-len", "2", "--loops", "2000",
           "--num-gpus-per-node", "2", "--json-file", str(tmp_path / "b.jsonl")]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if sum("model ready" in x for x in lines) == 2:  # both ranks loaded: the timed loops begin
                break
        time.sleep(1.5)
        assert proc.poll() is None, "".join(lines)[-3000:]
        run = descendants(proc.pid)
        proc.send_signal(getattr(signal, sig))
        err = "".join(lines) + proc.stderr.read()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    for noise in ("Traceback", "SignalException", "ChildFailedError", "Connection reset", "Connection closed"):
        assert noise not in err, err[-3000:]
    assert not (tmp_path / "b.jsonl").exists()  # stopped before its record
    time.sleep(1)
    assert not [p for p in run if running(p)], "processes of the run outlived it"


def test_rank_0_cut_by_a_broken_pipe_leaves_the_other_rank_one_line_not_a_gloo_traceback():
    """`offloadgen generate --prompt ... --num-gpus-per-node 2 | true`: rank 0 prints the answers to a
    pipe its reader has closed and ends with its one line (exit 2, as one process does). Rank 1,
    already in distributed.finish()'s barrier, used to print gloo's 'Connection closed by peer'
    traceback; it says one line and stops instead. torchrun looks at its ranks every 0.1 s and then
    SIGTERMs the rest, which sometimes came before rank 1's traceback: a 5 s look-out (PET_ is
    torchrun's own environment prefix) lets rank 1 always reach its end by itself."""
    cmd = [sys.executable, "-m", "offloadgen.cli", "generate", "opt-125m", "--dummy", "--device", "cpu", "--dtype",
           "float32", "--max-new-tokens", "2", "--prompt", "a", "--prompt", "b", "--num-gpus-per-node", "2"]
    read, write = os.pipe()
    os.close(read)  # the reader has gone: rank 0's first print meets EPIPE
    try:
        r = subprocess.run(cmd, env={**ENV, "PET_MONITOR_INTERVAL": "5"}, stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=240)
    finally:
        os.close(write)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("offloadgen: error: Broken pipe") == 1, r.stderr[-3000:]
    said = "offloadgen: rank 1: another rank ended before this one (its own message says why); stopping"
    assert r.stderr.count(said) == 1, r.stderr[-3000:]
    for noise in ("Traceback", "Connection closed", "RuntimeError", "ChildFailedError"):
        assert noise not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("code", [2, 3])
def test_torchrun_stopping_the_other_ranks_is_said_only_when_rank_0_has_not(tmp_path, code):
    """Rank 0 ends while rank 1 still runs: torchrun SIGTERMs rank 1 and logs 'Sending process N
    closing signal SIGTERM'. After rank 0's one-line error (exit 2) that line is noise and the
    launcher drops it; after any other failure it still comes, with torchrun's report."""
    script = tmp_path / "ranks.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '0':\n"
                      "    time.sleep(1)\n"
                      f"    print('offloadgen: error: said by rank 0', file=sys.stderr, flush=True)\n"
                      f"    os._exit({code})\n"
                      "time.sleep(60)\n")
    r = subprocess.run([sys.executable, "-m", "offloadgen.launcher", "--standalone", "--nproc-per-node=2", str(script)],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == (2 if code == 2 else 1), r.stderr[-3000:]
    assert r.stderr.count("offloadgen: error: said by rank 0") == 1
    assert ("closing signal SIGTERM" in r.stderr) == (code != 2), r.stderr[-3000:]
    assert ("ChildFailedError" in r.stderr) == (code != 2), r.stderr[-3000:]


def test_torchruns_lines_about_ranks_that_found_the_error_are_held_until_the_outcome_is_known():
    """Every rank finds a bad setting and exits 2; rank 1 may exit before rank 0, and torchrun then
    logs 'failed (exitcode: 2) local_rank: 1' (once seen in CI). Such lines, and the closing
    signals, are held: dropped when rank 0 has said the error, let through (release) otherwise."""
    import logging
    from offloadgen.launcher import HeldClosingLines
    seen = []
    log = logging.getLogger("test-held-closing-lines")
    log.propagate = False
    handler = logging.Handler()
    handler.emit = seen.append
    log.addHandler(handler)
    held = HeldClosingLines(log)
    log.addFilter(held)
    fmt = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"
    log.error(fmt, 2, 1, 123, "python")
    log.warning("Sending process %s closing signal %s", 124, "SIGTERM")
    log.error(fmt, 1, 1, 125, "python")  # another failure: not held
    assert [r.args[0] for r in seen] == [1]
    held.release()
    assert [r.args[0] for r in seen] == [1, 2, 124] and not held.held
