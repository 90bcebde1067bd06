"""The peers' job runs (benchmarks/peers/common.py): the same static batches as offloadgen's own
static mode, padded as a peer needs, and counted by the tokens each request asked for."""
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch

from offloadgen.bench.workload import WorkItem, from_file, run_workload, synthetic
from offloadgen.errors import OffloadgenError

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"


def _load(name, folder=PEERS):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_benchmark(name):
    return _load(name, PEERS.parent)


common = _load("common")


def _fake_peer(calls):
    """A peer's generate: records what it was given, every row gets the batch's longest output."""
    def generate_batch(batch):
        ids, mask, gen_len = common.padded_batch(batch, pad_id=1)
        calls.append((ids, mask, gen_len, batch))
        return gen_len
    return generate_batch


def test_batches_are_offloadgens_static_batches_and_only_asked_tokens_count():
    import offloadgen
    # prompts of 3..6 tokens and outputs far apart: padding and idle rows are a large share
    items = [WorkItem([5 + i] * (3 + i % 4), n) for i, n in enumerate([12, 1, 9, 1, 2, 1, 7, 3, 1])]
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    ours = run_workload(llm, items, 4, 8, ignore_eos=True, modes=("static",))
    calls = []
    batches, elapsed = common.time_job(items, 4, _fake_peer(calls))
    fig = common.job_figures(batches, elapsed, 4)
    # the same requests in the same batches, the same number of passes, the same counted tokens
    assert [len(b) for b in batches] == [4, 4, 1] and fig["batches"] == ours["static_batches"] == 3
    assert [len(it.prompt_ids) for b in batches for it in b] == sorted(len(it.prompt_ids) for it in items)
    assert fig["passes"] == ours["static_passes"]
    for key in ("requests", "prompt_tokens", "output_tokens"):
        assert fig[key] == ours[f"static_{key}"], key
    assert fig["output_tokens"] == sum(it.output_len for it in items) == 37
    # what the padded batches ran is kept apart and is larger: counting it would inflate the figure
    assert fig["generated_tokens"] == sum(len(b) * c[2] for b, c in zip(batches, calls)) > fig["output_tokens"]
    assert fig["padded_prompt_tokens"] == sum(c[0].numel() for c in calls) > fig["prompt_tokens"]


def test_figures_use_offloadgens_names_and_formulas():
    items = [WorkItem([4] * p, o) for p, o in [(10, 3), (2, 8), (6, 1)]]
    clock = itertools.count(100.0, 2.5)  # started at 100.0, stopped at 102.5
    batches, elapsed = common.time_job(items, 2, lambda b: max(it.output_len for it in b), clock=lambda: next(clock))
    fig = common.job_figures(batches, elapsed, 2)
    assert elapsed == 2.5 and fig["requests"] == 3
    assert fig["prompt_tokens"] == 18 and fig["output_tokens"] == 12
    assert fig["output_throughput"] == 12 / 2.5 and fig["total_throughput"] == 30 / 2.5
    assert fig["requests_per_s"] == 3 / 2.5
    # batches [2, 8] (prompts 2 and 6) and [10, 3]: rows x longest output = 2*8 + 1*3
    assert fig["generated_tokens"] == 19 and fig["passes"] == 11


def test_a_batch_that_stops_early_is_refused():
    items = [WorkItem([4] * 3, 5), WorkItem([4] * 4, 9)]
    with pytest.raises(RuntimeError, match="asked for 9"):
        common.time_job(items, 2, lambda b: 8)


def test_padded_batch_left_pads_to_the_longest_and_fills_fixed_batches():
    batch = [WorkItem([7, 8], 3), WorkItem([9, 10, 11, 12], 6)]
    ids, mask, gen_len = common.padded_batch(batch, pad_id=1)
    assert gen_len == 6
    assert ids.tolist() == [[1, 1, 7, 8], [9, 10, 11, 12]] and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    ids, mask, _ = common.padded_batch(batch, pad_id=1, rows=4)  # FlexGen's fixed batch of 4
    assert ids.shape == (4, 4) and torch.equal(ids[3], ids[1]) and torch.equal(mask[2], mask[1])
    # filler rows change what ran, not what counts
    fig = common.job_figures([batch], 1.0, 4)
    assert fig["output_tokens"] == 9 and fig["requests"] == 2


def test_make_workload_writes_the_requests_offloadgen_draws(tmp_path):
    make = _load("make_workload")
    path = tmp_path / "job.jsonl"
    assert make.main([str(path), "--num-requests", "12", "--input-len", "5:40", "--output-len", "2:9",
                      "--seed", "3", "--model", "opt-125m"]) == 0
    drawn = synthetic(12, (5, 40), (2, 9), 3, 50272)  # what `offloadgen bench --workload synthetic` runs
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"input_len": len(it.prompt_ids), "output_len": it.output_len} for it in drawn]
    assert lines != [{"input_len": len(it.prompt_ids), "output_len": it.output_len}
                     for it in synthetic(12, (5, 40), (2, 9), 4, 50272)]
    # offloadgen and the peers read it back to the same token ids (same seed)
    peer = common.load_job(str(path), "opt-125m", seed=0)

    class Tok:
        def encode(self, text):
            raise AssertionError("no text prompts in this file")
    assert peer == from_file(str(path), Tok(), 0, 50272)
    assert [len(it.prompt_ids) for it in peer] == [len(it.prompt_ids) for it in drawn]


def test_peers_refuse_text_prompts_by_line(tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text('{"input_len": 4, "output_len": 2}\n{"prompt": "hello", "output_len": 2}\n')
    with pytest.raises(OffloadgenError, match="line 2.*input_len' lines only"):
        common.load_job(str(path), "opt-125m", seed=0)


def test_a_transformers_peer_runs_every_batch_to_its_longest_output(tmp_path):
    """DeepSpeed's and Accelerate's path (common.hf_job), on a tiny random OPT on the CPU made to
    prefer EOS: only min_new_tokens holds each batch to its longest request."""
    import argparse
    import transformers
    cfg = transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=50272, max_position_embeddings=64, word_embed_proj_dim=16)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()

    def eos_first(module, inputs, logits):
        logits = logits.clone()
        logits[..., 2] += 1e4
        return logits
    model.lm_head.register_forward_hook(eos_first)
    job = tmp_path / "job.jsonl"
    job.write_text("".join(json.dumps({"input_len": p, "output_len": o}) + "\n" for p, o in [(9, 3), (2, 7), (5, 1)]))
    args = argparse.Namespace(model="opt-125m", workload=str(job), workload_seed=0, json_file=str(tmp_path / "r.jsonl"))
    items = common.load_job(str(job), args.model, args.workload_seed)
    rec = common.hf_job("tiny", args, model, items, 2, device="cpu")
    assert rec["kind"] == "workload" and rec["system"] == "tiny" and rec["batches"] == 2
    assert rec["output_tokens"] == 11 and rec["prompt_tokens"] == 16 and rec["generated_tokens"] == 2 * 7 + 3
    assert json.loads((tmp_path / "r.jsonl").read_text()) == rec


def test_job_table_compares_the_latest_run_of_each_system(tmp_path):
    table = _load_benchmark("job_table")
    job = {"requests": 3, "prompt_tokens": 18, "output_tokens": 12, "requested_output_tokens": 12}
    ours = {"system": "offloadgen", "kind": "workload", "workload": "w.jsonl", "slots": 32, **job,
            "elapsed_s": 2.0, "output_throughput": 6.0, "total_throughput": 15.0, "passes": 9,
            "peak_gpu_mem_bytes": 7 << 30}
    old_ds = {"system": "DeepSpeed", "kind": "workload", "workload": "w.jsonl", "batch_size": 14, **job,
              "elapsed_s": 1.0, "output_throughput": 12.0, "total_throughput": 30.0, "passes": 9}
    ds = {**old_ds, "elapsed_s": 4.0, "output_throughput": 3.0, "total_throughput": 7.5, "peak_gpu_mem_bytes": 9 << 30}
    other_job = {**ds, "workload": "other.jsonl", "output_throughput": 1.0}
    fg = {"system": "FlexGen", "kind": "workload", "workload": "w.jsonl", "batch_size": 14, "error": "OOM"}
    fixed = {"system": "FlexGen", "batch_size": 8, "decode_throughput": 5.0}  # a fixed-batch record: not a job
    (tmp_path / "a.jsonl").write_text(json.dumps(ours) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (old_ds, ds, other_job, fg, fixed)))
    recs = table.read([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "w.jsonl")
    text = table.table(recs, budget_gib=8)
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "2.00x" in rows["DeepSpeed"] and "9.00!" in rows["DeepSpeed"]  # the later run, over the budget
    assert "7.00!" not in rows["offloadgen"] and "failed: OOM" in rows["FlexGen"]
    assert "NOT THE SAME JOB" not in text
    assert "NOT THE SAME JOB" in table.table(recs + [{**ds, "system": "X", "output_tokens": 99}], budget_gib=8)
