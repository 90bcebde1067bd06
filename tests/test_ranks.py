"""Continuous batching across ranks (CPU, gloo, 2 processes): a job's requests are dealt to ranks
that step in lockstep, each request gets exactly the tokens of its prompt run alone, a rank with
far less work keeps joining the passes (empty passes) without a hang, resume and bad lines work,
rank 0 alone writes; the workload bench combines the ranks' figures; serve refuses several ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offloadgen.ranks import deal, request_cost

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


def test_static_batches_and_serve_refuse_several_ranks(tmp_path, monkeypatch, capsys):
    from offloadgen.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--batch-size", "4", "--workload",
                 "synthetic", "--compare-static", "--num-gpus-per-node", "2"]) == 2
    assert "static batches run in one process" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "opt-125m", "--dummy", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serve runs in one process" in err


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
    lines = [sorted((tmp_path / f"{n}.jsonl").read_text().splitlines()) for n in (1, 2)]
    assert lines[0] == lines[1] and len(lines[0]) == 5
