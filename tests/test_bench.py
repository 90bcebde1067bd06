"""`offloadgen bench`: the reference's flags, metrics, log lines and file names."""
import json
import re

import pytest

from offloadgen.bench.metrics import log_filename
from offloadgen.bench.run import RANK_OVERHEAD_BYTES
from offloadgen.metrics import RunMetrics
from offloadgen.cli import main


def test_metric_formulas_are_the_references():
    m = RunMetrics.measured(batch=8, prompt_len=512, gen_len=32, prefill_s=2.0, total_s=10.0, peak_gpu_mem=0)
    assert m.decode_latency_s == 8.0 and m.decode_step_s == 8.0 / 31
    assert m.prefill_throughput == 8 * 512 / 2.0
    assert m.decode_throughput == 8 * 31 / 8.0
    assert m.total_throughput == 8 * 32 / 10.0
    both = RunMetrics.combined([m, RunMetrics.measured(8, 512, 32, 3.0, 12.0, 5)])  # two ranks as one run
    assert both.batch == 16 and both.total_latency_s == 12.0 and both.peak_gpu_mem_bytes == 5
    assert both.decode_throughput == m.decode_throughput + 8 * 31 / 9.0


def test_log_file_names_follow_the_reference():
    assert log_filename("facebook/opt-175b", 8, 512, 32, 1, 1, "cpu", True, 4) == \
        "ds-opt-175b-bs8-prompt512-gen32-n1x1-cpu-kv_offload-w_quant.log"
    assert log_filename("opt-30b", 16, 512, 32, 1, 1, "gpu", False, 16) == "ds-opt-30b-bs16-prompt512-gen32-n1x1-gpu.log"


def test_bench_run_writes_the_four_log_lines_and_a_json_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the reference's underscore spellings are accepted
    code = main(["bench", "--model", "facebook/opt-125m", "--dummy", "--batch_size", "3", "--prompt_len", "40",
                 "--gen_len", "5", "--loops", "2", "--dtype", "float32", "--verbose", "2"])
    assert code == 0
    log = tmp_path / "ds-opt-125m-bs3-prompt40-gen5-n1x1-gpu.log"
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    number = r"[0-9]+\.[0-9]{3}"
    assert re.fullmatch(rf"model size: {number} GB\tcache size: {number} GB\thidden size \(p\): {number} GB", lines[0])
    assert re.fullmatch(rf"peak gpu mem: {number} GB\tprefill latency: {number} s\tprefill throughput: {number} token/s", lines[1])
    assert re.fullmatch(rf"decode latency: {number} s\tdecode throughput: {number} token/s", lines[2])
    assert re.fullmatch(rf"total latency: {number} s\ttotal throughput: {number} token/s", lines[3])
    rec = json.loads(log.with_suffix(".jsonl").read_text())
    assert rec["decode_latency_s"] == pytest.approx(rec["total_latency_s"] - rec["prefill_latency_s"])
    assert rec["decode_throughput"] == pytest.approx(3 * 4 / rec["decode_latency_s"])
    assert len(rec["all_totals_s"]) == 2
    out = capsys.readouterr().out
    assert "Outputs 0:" in out and "Outputs 2:" in out
    # appended, not overwritten
    main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "3", "--prompt-len", "40", "--gen-len", "5",
          "--loops", "1", "--dtype", "float32", "--verbose", "0"])
    assert len(log.read_text().splitlines()) == 8


@pytest.mark.parametrize("flags,needle", [(["--pin-kv-cache"], "add --kv-offload"),
                                          (["--num-nodes", "2"], "start offloadgen on each node with torchrun")])
def test_flags_that_cannot_apply_are_refused_clearly(capsys, tmp_path, monkeypatch, flags, needle):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_quantized_bench_names_its_log_w_quant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "2", "--prompt-len", "32", "--gen-len", "3",
                 "--quant_bits", "4", "--quant_group_size", "32", "--loops", "1", "--dtype", "float32",
                 "--verbose", "0"]) == 0
    rec = json.loads((tmp_path / "ds-opt-125m-bs2-prompt32-gen3-n1x1-gpu-w_quant.jsonl").read_text())
    assert rec["quant_bits"] == 4 and rec["quant_group_size"] == 32


def test_bench_with_the_kv_cache_in_cpu_memory(tmp_path, monkeypatch):
    """... and the cache is made once, at start-up: the timed generation reuses it."""
    from offloadgen.engine import Engine
    monkeypatch.chdir(tmp_path)
    made = []
    real_new_cache = Engine.new_cache
    monkeypatch.setattr(Engine, "new_cache", lambda self, *a: made.append(real_new_cache(self, *a)) or made[-1])
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "4", "--prompt-len", "32", "--gen-len", "4",
                 "--kv-offload", "--micro-batch-size", "2", "--loops", "1", "--dtype", "float32", "--verbose", "0"]) == 0
    rec = json.loads((tmp_path / "ds-opt-125m-bs4-prompt32-gen4-n1x1-gpu-kv_offload.jsonl").read_text())
    kv = rec["kv"]
    assert rec["kv_offload"] and kv["parts"] == 2 and kv["gpu_parts"] == 0  # no GPU measured: attention on the CPU
    # every decode step reads the whole cache so far: 12 layers x 4 rows x 33-35 slots x 768 x 2 (k, v) x 4 bytes
    per_step = kv["per_decode_step"]["cpu_cache_read_bytes"]
    assert 2 * 12 * 4 * 33 * 768 * 4 <= per_step <= 2 * 12 * 4 * 35 * 768 * 4
    # of which the reference's prompt (its 28-byte sentence, left-padded to 32 and masked) leaves 4
    # slots a row unseen: the kernel does not read them
    pads = 2 * 12 * 4 * 4 * 768 * 4
    assert kv["per_decode_step"]["cpu_cache_visible_bytes"] == pytest.approx(per_step - pads)
    assert kv["cpu_attention_impl"] and all(c.split()[0] in {"numba", "sdpa", "torch", "None"} for c in kv["cpu_attention_impl"])
    assert rec["kv_cache_alloc_s"] > 0 and len(made) == 2 and made[0] is made[1]  # start-up's, then reused
    # the node's memory against docs/distributed.md's model: weights in RAM (none streamed here), the
    # cache, and a rank's fixed share
    mem = rec["host_memory"]
    assert mem["ranks_on_node"] == 1 and mem["weight_host_bytes"] == 0
    assert mem["model_bytes"] == kv["host_bytes"] + RANK_OVERHEAD_BYTES
    assert mem["peak_rss_bytes_per_rank"][0] > kv["host_bytes"] and mem["node_used_by_run_bytes"] is not None


def test_a_bench_without_kv_offload_makes_no_cache_at_start_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "2", "--prompt-len", "32", "--gen-len", "2",
                 "--loops", "1", "--dtype", "float32", "--verbose", "0"]) == 0
    rec = json.loads((tmp_path / "ds-opt-125m-bs2-prompt32-gen2-n1x1-gpu.jsonl").read_text())
    assert rec["kv_cache_alloc_s"] is None


def test_dummy_weights_take_every_prompt_len_the_reference_takes(tmp_path, monkeypatch):
    # issue 15: the reference's prompt is 8 OPT tokens, and dummy weights' bytes made it 28
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "1", "--prompt-len", "8", "--gen-len", "2",
                 "--loops", "1", "--dtype", "float32", "--verbose", "0"]) == 0
    rec = json.loads((tmp_path / "ds-opt-125m-bs1-prompt8-gen2-n1x1-gpu.jsonl").read_text())
    assert rec["prompt_len"] == 8
    # a real tokenizer's sentence is never cut: a shorter --prompt-len is refused, as the reference does
    from types import SimpleNamespace

    from offloadgen.bench.run import bench_inputs
    from offloadgen.errors import OffloadgenError
    real = SimpleNamespace(encode=lambda text: list(range(8)), eos_token_ids={2})
    assert bench_inputs(real, 2, 8)[0].shape == (2, 8)
    with pytest.raises(OffloadgenError, match="--prompt-len 7 is shorter than the prompt"):
        bench_inputs(real, 2, 7)


def test_moe_bytes_per_step_count_the_decode_steps_not_the_copy_only_pass_after_them():
    """The copy-only pass runs after the timed loops through the same ring, and its copies count in
    the same counter; an MoE record read after it showed 3 passes too many (92.3 GB a step for 84.2)."""
    from types import SimpleNamespace
    from offloadgen.bench.run import _expert_record
    per_pass, steps = 1000, 31
    placement = SimpleNamespace(expert_streaming=False, expert_slots=0, streamed_bytes=per_pass,
                                bus_bytes_per_step=per_pass)
    zero = {"bus_bytes": 0, "expert_bytes": 0, "expert_hits": 0, "expert_misses": 0}
    end = dict(zero, bus_bytes=steps * per_pass)
    after_copy_only = dict(end, bus_bytes=end["bus_bytes"] + 3 * per_pass)
    rt = SimpleNamespace(plan=SimpleNamespace(placement=placement, model_cfg=SimpleNamespace(n_experts=8)),
                         weights=SimpleNamespace(timings=after_copy_only))
    rec = _expert_record(rt, {"marks": {"weights": zero, "weights_end": end}}, steps + 1, RunMetrics.measured(
        batch=8, prompt_len=16, gen_len=steps + 1, prefill_s=1.0, total_s=32.0, peak_gpu_mem=0))
    assert rec["bus_bytes_per_step"] == per_pass and rec["fewer_bytes_than_whole"] == 1.0


def test_kv_record_keeps_the_planned_count_beside_where_the_split_ended():
    """The record's predictions are for the plan's split (all on the CPU for a pageable cache);
    gpu_parts is where the split ended. Both are kept: the planned count is not overwritten."""
    from types import SimpleNamespace
    from offloadgen.bench.run import _kv_record
    stats = dict(cpu_attention_s=3.0, wait_for_gpu_s=0.0, cpu_cache_read_bytes=0, h2d_cache_bytes=0,
                 d2h_cache_bytes=0, cpu_side_host_s=3.0, gpu_attention_host_s=0.0)
    cache = SimpleNamespace(stats=stats, gpu_parts={7}, parts=[slice(i, i + 1) for i in range(8)], nbytes=1,
                            pinned_bytes=0, split=SimpleNamespace(history=[0, 1]))
    plan = SimpleNamespace(kv=SimpleNamespace(attention="auto", pinned=False, async_write=False, overlap=False),
                           kv_model={"gpu_parts": 0, "parts": 8, "predicted_cpu_attention_s": 7.6},
                           device=SimpleNamespace(type="cpu"))
    rt = SimpleNamespace(engine=SimpleNamespace(offloaded_cache=cache, cpu_side=None), plan=plan)
    rec = _kv_record(rt, {"marks": {"kv_stats": dict(stats)}}, 3)
    assert rec["planned_gpu_parts"] == 0 and rec["gpu_parts"] == 1 and rec["predicted_cpu_attention_s"] == 7.6
