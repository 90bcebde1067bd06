"""The job-level benchmark: workloads drawn or read, both modes run, the record written."""
import json

import pytest

from offloadgen.bench.workload import WorkItem, from_file, parse_range, run_workload, synthetic
from offloadgen.errors import OffloadgenError


def test_ranges_and_synthetic_workloads_are_reproducible():
    assert parse_range("32:512", "x") == (32, 512) and parse_range("7", "x") == (7, 7)
    for bad in ("0:4", "9:3", "a:b"):
        with pytest.raises(OffloadgenError):
            parse_range(bad, "--input-len")
    a, b = synthetic(20, (3, 9), (1, 5), 0, 300), synthetic(20, (3, 9), (1, 5), 0, 300)
    assert a == b and a != synthetic(20, (3, 9), (1, 5), 1, 300)
    assert all(3 <= len(it.prompt_ids) <= 9 and 1 <= it.output_len <= 5 for it in a)
    assert all(4 <= t < 300 for it in a for t in it.prompt_ids)


def test_workload_file(tmp_path):
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]
    f = tmp_path / "w.jsonl"
    f.write_text('{"prompt": "abc", "output_len": 4}\n\n{"input_len": 5, "output_len": 2}\n')
    items = from_file(str(f), Tok(), 0, 300)
    assert items[0] == WorkItem([97, 98, 99], 4) and len(items[1].prompt_ids) == 5 and items[1].output_len == 2
    f.write_text('{"prompt": "abc"}\n')
    with pytest.raises(OffloadgenError, match="line 1"):
        from_file(str(f), Tok(), 0, 300)
    # wrong types are refused, not cut (3.7 -> 3, true -> 1) or left to crash the tokenizer
    for bad in ('{"input_len": 5, "output_len": 3.7}', '{"input_len": 5, "output_len": true}',
                '{"input_len": 2.5, "output_len": 3}', '{"prompt": 5, "output_len": 3}'):
        f.write_text(bad + "\n")
        with pytest.raises(OffloadgenError, match="line 1"):
            from_file(str(f), Tok(), 0, 300)


def test_continuous_needs_fewer_passes_than_static_batches():
    import offloadgen
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    # output lengths far apart: a static batch idles its short rows until its long one ends
    # (equal prompts: the static batches are [12, 1], [12, 1], [1, 1], [1, 1]: 26 passes)
    items = [WorkItem([5 + i] * 3, n) for i, n in enumerate([12, 1, 12, 1, 1, 1, 1, 1])]
    r = run_workload(llm, items, 2, 8, ignore_eos=True, modes=("continuous", "static"))
    assert r["output_tokens"] == r["static_output_tokens"] == sum(it.output_len for it in items)
    assert r["static_passes"] == 26 and r["passes"] <= 20 and r["slot_occupancy"] > 0.8
    # every request's 3-token prompt is prefilled in one pass, two at most per pass (chunk of 8)
    assert 4 <= r["prompt_passes"] <= 8 < r["passes"] and r["prompt_pass_s"] > 0 and r["decode_only_pass_s"] > 0
    assert set(r) >= {"requests", "prompt_tokens", "elapsed_s", "requests_per_s", "output_throughput",
                      "total_throughput", "slot_occupancy", "passes", "pass_s", "static_output_throughput"}


def test_bench_command_runs_a_workload_file(tmp_path, capsys):
    from offloadgen.cli import main
    w, rec = tmp_path / "w.jsonl", tmp_path / "rec.jsonl"
    w.write_text("".join(json.dumps({"input_len": 3 + i, "output_len": 1 + i % 4}) + "\n" for i in range(5)))
    assert main(["bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--dtype", "float32", "--verbose", "0",
                 "--batch-size", "2", "--workload", str(w), "--json-file", str(rec)]) == 0
    out = capsys.readouterr().out
    assert "continuous:" in out and "static:" not in out
    r = json.loads(rec.read_text())
    assert r["requests"] == 5 and r["output_tokens"] == sum(1 + i % 4 for i in range(5)) and r["kind"] == "workload"
    assert r["weight_fetch"] == "whole" and r["weight_gather"] == "nccl" and r["peer_copy"] is None  # which gather ran


def test_a_workload_with_the_kv_cache_in_cpu_memory_records_where_passes_went():
    import offloadgen
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False, kv_offload=True, micro_batch_size=2)
    items = [WorkItem([5 + i] * (3 + i), 2 + i) for i in range(4)]
    r = run_workload(llm, items, 2, 8, ignore_eos=True)
    # every decoding row read its own keys and values in every layer: at least 2 (k, v) x 12 layers x
    # 768 x 4 bytes per token of context
    read = r["kv_cpu_cache_read_bytes_per_pass"] * r["passes"]
    assert r["kv_cpu_attention_s_per_pass"] > 0 and read >= 2 * 12 * 768 * 4 * sum(len(it.prompt_ids) for it in items)
    assert r["cpu_attention_impl"] and all(c.split()[0] in {"numba", "sdpa", "torch", "None"} for c in r["cpu_attention_impl"])


@pytest.mark.parametrize("flags, needed", [(["--num-requests", "0"], "--num-requests must be at least 1; got 0"),
                                           (["--prefill-chunk", "-1"], "--prefill-chunk must be at least 1; got -1"),
                                           (["--compare-static", "--static-only"], "pick one")])
def test_bench_workload_refuses_bad_flags_by_name(flags, needed, capsys):
    from offloadgen.cli import main
    # --num-requests 1 --output-len 1 keeps a run that is wrongly let through short
    args = ["--num-requests", "1", "--input-len", "2", "--output-len", "1", *flags]
    assert main(["bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--workload", "synthetic", *args,
                 "--json-file", "/dev/null"]) == 2
    assert needed in capsys.readouterr().err
