"""`offloadgen plan`: placement and predicted speed before loading; refusals that say what would fit."""
import pytest

from offloadgen.cli import main
from offloadgen.errors import OffloadgenError
from offloadgen.models import block_nbytes, preset
from offloadgen.offload.placement import GiB, plan_placement
from offloadgen.machine import Calibration
from offloadgen.plan import predict
from offloadgen.runtime import check_host_memory


def test_prediction_is_the_bus_time_when_the_bus_is_the_limit():
    cfg = preset("opt-30b")
    p = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True)
    r = predict(cfg, p, 8, None, 512, 32, 2, None, Calibration(50e9, 3e12, "test"))
    assert r["bound"] == "bus"
    assert r["step_s"] == pytest.approx(p.streamed_bytes / 50e9, rel=0.01)
    assert r["tokens_s"] == pytest.approx(8 / r["step_s"])


def test_prediction_becomes_gpu_bound_when_little_streams():
    cfg = preset("opt-1.3b")
    p = plan_placement(cfg, 2, 40 * GiB, 8, 512, 32, offload=True)
    assert p.streamed == []
    r = predict(cfg, p, 8, None, 512, 32, 2, None, Calibration(50e9, 3e12, "test"))
    assert r["bound"] == "GPU memory" and r["step_s"] > 0


def test_host_memory_is_checked_before_loading():
    p = plan_placement(preset("opt-30b"), 2, 16 * GiB, 8, 512, 32, offload=True)
    with pytest.raises(OffloadgenError, match=r"need .* GiB of CPU RAM, 8.0 GiB is available: quantize"):
        check_host_memory(p, available=8 * GiB)
    check_host_memory(p, available=128 * GiB)


def test_plan_command_prints_the_table_and_the_largest_batch(capsys):
    code = main(["plan", "facebook/opt-30b", "--dummy", "--cpu-offload", "--gpu-memory", "16GiB", "--cpu-memory", "120GiB",
                 "--h2d-bandwidth", "50GB", "--batch-sizes", "8,16,32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "largest batch that fits: 16" in out
    assert "32  does not fit: batch 32 does not fit a 16.0 GiB GPU budget" in out
    assert "host-to-device 50.0 GB/s" in out


def test_plan_refuses_when_nothing_fits(capsys):
    assert main(["plan", "opt-175b", "--dummy", "--cpu-offload", "--gpu-memory", "8GiB", "--cpu-memory", "64GiB",
                 "--batch-sizes", "8", "--h2d-bandwidth", "50GB"]) == 2
    assert "nothing fits" in capsys.readouterr().out


PLAN = ["plan", "opt-1.3b", "--dummy", "--cpu-offload", "--gpu-memory", "16GiB", "--cpu-memory", "64GiB",
        "--h2d-bandwidth", "50GB"]


def rows_of(out):
    return [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]


def test_plan_takes_generates_batch_size_and_max_seq_len(capsys):
    assert main([*PLAN, "--batch-size", "4", "--max-seq-len", "2048"]) == 0
    long = rows_of(capsys.readouterr().out)
    assert main([*PLAN, "--batch_size", "4", "--max_seq_len", "100"]) == 0
    short = rows_of(capsys.readouterr().out)
    assert [r[0] for r in long] == [r[0] for r in short] == ["4"]  # one row: the batch generate would run
    assert float(long[0][4]) > 10 * float(short[0][4])  # the KV cache planned for the sequences asked for
    for extra, needle in ((["--batch-sizes", "1,2"], "or --batch-sizes (a table), not both"),
                          (["--max-seq-len", "100", "--gen-len", "8"], "or --gen-len (as bench does), not both"),
                          (["--max-seq-len", "0"], "--max-seq-len must be at least 1; got 0")):
        assert main([*PLAN, "--batch-size", "4", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_plan_header_shows_the_dtype_and_its_bytes(capsys):
    assert main([*PLAN, "--batch-sizes", "1", "--dtype", "float32"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "float32 (4 bytes a value)" in header and "16-bit" not in header
    assert main([*PLAN, "--batch-sizes", "1", "--dtype", "bfloat16", "--quant-bits", "4"]) == 0
    assert "4-bit weights in groups of 64, computing in bfloat16 (2 bytes a value)" in capsys.readouterr().out


def test_plan_with_an_offloaded_kv_cache_probes_the_cpu_once_and_keeps_the_figure(capsys, monkeypatch, tmp_path):
    from offloadgen.offload import kv_cache
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(kv_cache, "probe_cpu_attention_bandwidth", lambda *a, **k: calls.append(a) or 7e9)
    argv = [*PLAN, "--kv-offload", "--batch-sizes", "1,2,4,8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1 and "7.0 GB/s (probed now; saved in" in out  # once for the table, not once a row
    assert main(argv) == 0
    assert len(calls) == 1 and "7.0 GB/s (saved in" in capsys.readouterr().out  # the next plan asks nobody
    assert main([*argv, "--kv-quant-bits", "8"]) == 0 and len(calls) == 2  # another cache format, its own figure
    assert main([*argv, "--kv-attention", "gpu"]) == 0 and len(calls) == 2  # no split to weigh: no probe


def test_one_rank_or_whole_layers_without_a_probe_predict_as_before():
    """The step model of several ranks changes nothing where there is one rank, or where every
    rank copies whole layers and no probe measured the links together."""
    from offloadgen.plan import LAUNCH_OVERHEAD_S, Links
    cfg = preset("opt-30b")
    p = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True)
    cal = Calibration(50e9, 3e12, "test")
    before = max(p.streamed_bytes / 50e9, 0) + cfg.n_layers * LAUNCH_OVERHEAD_S  # the bus-bound step, as it was
    default = predict(cfg, p, 8, None, 512, 32, 2, None, cal)
    assert default["step_s"] == before and default["nvlink_s"] == 0
    for links in (Links(1, "allgather"), Links(1, "pool"), Links(4, "whole")):
        r = predict(cfg, p, 8, None, 512, 32, 2, None, cal, links=links)
        assert {k: r[k] for k in ("step_s", "bus_s", "gpu_s", "bound")} == \
            {k: default[k] for k in ("step_s", "bus_s", "gpu_s", "bound")}
        assert r["tokens_s"] == links.ranks * 8 / before  # all ranks' tokens
    # measured together, four links give less than four times one: whole layers then take longer
    slower = predict(cfg, p, 8, None, 512, 32, 2, None, cal, links=Links(4, "whole", 172.8e9, 179e9))
    assert slower["bus_s"] == p.streamed_bytes / (172.8e9 / 4) > default["bus_s"]


def test_one_rank_with_an_offloaded_kv_cache_keeps_the_kv_models_bus_time():
    from offloadgen.config import RunConfig
    from offloadgen.plan import Links, plan_table
    config = RunConfig(model="opt-30b", dummy=True, cpu_offload=True, kv_offload=True, gpu_memory=16 * GiB,
                       max_seq_len=544, max_prompt_len=512, micro_batch_size=8)
    cal = Calibration(50e9, 3e12, "test", {"16": 20e9})
    for links in (None, Links(1, "allgather")):
        [row] = plan_table(config, preset("opt-30b"), [32], cal, 1 << 40, links)
        assert row["kv"]["gpu_parts"] > 0  # the bus carries some of the cache too
        assert row["bus_s"] == pytest.approx(row["kv"]["predicted_bus_s"], rel=1e-12)
        assert row["cpu_s"] == row["kv"]["predicted_cpu_attention_s"]


def test_four_pooled_ranks_predict_the_slower_of_their_two_links():
    """OPT-30B, 16 GiB on each of 4 GPUs, pooled: 22 layers held across the GPUs, 26 streamed; each
    rank copies 1/4 of the streamed bytes over PCIe (8.0 GB, as the 4-H100 bench recorded) and
    receives 3/4 of the streamed and pooled bytes over NVLink (44.4 GB)."""
    from offloadgen.plan import LAUNCH_OVERHEAD_S, Links
    cfg = preset("opt-30b")
    p = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True, pool_ranks=4)
    assert len(p.pooled) == 22
    cal = Calibration(54.8e9, 3e12, "test")
    pcie = p.streamed_bytes / 4 / (172.8e9 / 4)
    nvlink = 3 / 4 * (p.streamed_bytes + 4 * p.bytes["pooled_per_rank"]) / 150e9
    assert p.streamed_bytes / 4 == pytest.approx(8.02e9, rel=0.01) and nvlink * 150e9 == pytest.approx(44.4e9, rel=0.01)
    r = predict(cfg, p, 8, None, 512, 32, 2, None, cal, links=Links(4, "pool", 172.8e9, 150e9))
    assert r["bus_s"] == pytest.approx(pcie) and r["nvlink_s"] == pytest.approx(nvlink)
    assert r["bound"] == "NVLink" and r["step_s"] == pytest.approx(nvlink + cfg.n_layers * LAUNCH_OVERHEAD_S)
    assert r["tokens_s"] == pytest.approx(4 * 8 / r["step_s"])
    fast_nvlink = predict(cfg, p, 8, None, 512, 32, 2, None, cal, links=Links(4, "pool", 172.8e9, 600e9))
    assert fast_nvlink["bound"] == "bus"
    assert fast_nvlink["step_s"] == pytest.approx(pcie + cfg.n_layers * LAUNCH_OVERHEAD_S)


def test_pooled_layers_are_spread_through_the_pass_and_landing_buffers_are_counted():
    """Pooled layers need NVLink only: spread between streamed ones they keep the gathers busy while
    PCIe copies (as one run at the end PCIe idled through them). Each ring slot's landing buffer
    (a quarter layer on 4 ranks) comes out of the pool."""
    cfg = preset("opt-30b")
    args = (cfg, 2, 16 * GiB, 8, 512, 32)
    p = plan_placement(*args, offload=True, pool_ranks=4)
    assert len(p.pooled) == 22 and p.pooled[-1] == cfg.n_layers - 1
    gaps = [b - a for a, b in zip(p.pooled, p.pooled[1:])]
    assert set(gaps) <= {2, 3}  # never two streamed layers' worth of PCIe without a pooled one between
    landed = plan_placement(*args, offload=True, pool_ranks=4, fetch_ranks=4)
    layer = p.streamed_bytes // len(p.streamed)
    assert landed.bytes["landing"] == 2 * -(-layer // 4) and len(landed.pooled) == 20
    assert landed.bytes["ring"] == p.bytes["ring"] and p.bytes["landing"] == 0
    assert "2 landing buffers (0.57 GiB)" in landed.describe() and "landing" not in p.describe()
    gathered = plan_placement(*args, offload=True, fetch_ranks=4)  # all-gather: landing buffers, nothing pooled
    assert gathered.bytes["landing"] == 3 * landed.bytes["landing"] and not gathered.pooled  # 6 by default


def test_more_landing_buffers_than_ring_slots_are_counted_and_cost_what_they_take():
    """--landing-buffers 4 beside a ring of two: four quarter layers on 4 ranks, taken from what
    the ranks keep (pooled layers, or whole layers with all-gather), and the ring unchanged."""
    cfg = preset("opt-30b")
    args = (cfg, 2, 16 * GiB, 8, 512, 32)
    two = plan_placement(*args, offload=True, pool_ranks=4, fetch_ranks=4)
    four = plan_placement(*args, offload=True, pool_ranks=4, fetch_ranks=4, landing_slots=4)
    quarter = -(-block_nbytes(cfg, 0, 2) // 4)
    assert (two.landings, four.landings) == (2, 4) and four.ring_slots == two.ring_slots == 2
    assert four.bytes["landing"] == 4 * quarter == 2 * two.bytes["landing"]
    assert len(four.pooled) == len(two.pooled) - 2  # two more quarter layers: two fewer pooled
    assert "4 landing buffers" in four.describe()
    gathered = plan_placement(*args, offload=True, fetch_ranks=4, landing_slots=4)
    assert gathered.landings == 4 and gathered.bytes["landing"] == 4 * quarter
    assert plan_placement(*args, offload=True, fetch_ranks=4).landings == 6  # 1.5 layers of quarter layers
    assert plan_placement(*args, offload=True, fetch_ranks=2).landings == 3  # of half layers
    # a budget with room for the ring and two quarter layers, not six: all-gather's default falls back to two
    bare = plan_placement(*args, offload=True, fetch_ranks=4, landing_slots=2, max_resident_layers=0)
    need = sum(v for k, v in bare.bytes.items() if k != "streamed_per_pass")  # no layer kept
    tight = plan_placement(cfg, 2, need + quarter, 8, 512, 32, offload=True, fetch_ranks=4)
    assert tight.landings == 2 and "head" in tight.resident
    deep = plan_placement(cfg, 2, 32 * GiB, 8, 512, 32, offload=True, fetch_ranks=4, prefetch_depth=7)
    assert deep.landings == 8  # never fewer than the ring's slots
    assert plan_placement(*args, offload=True, landing_slots=4).bytes["landing"] == 0  # one rank lands nothing


def test_a_budget_short_of_ring_and_landing_buffers_is_refused_saying_both():
    """With the ring alone fitting but not its landing buffers beside it, the refusal names each
    part of what is needed, not a ring that looks larger than two layers."""
    cfg = preset("opt-30b")
    layer = block_nbytes(cfg, 0, 2)
    fixed = plan_placement(cfg, 2, 64 * GiB, 1, 8, 8, offload=True, kv_on_gpu=False)
    need = fixed.bytes["activations"] + 2 * max(block_nbytes(cfg, b, 2) for b in ("embed", "head", 0))
    budget = need + GiB // 8  # the ring fits, the ring and 2 quarter layers do not
    plan_placement(cfg, 2, budget, 1, 8, 8, offload=True, kv_on_gpu=False, pool_ranks=4)  # no landing: fits
    with pytest.raises(OffloadgenError) as refused:
        plan_placement(cfg, 2, budget, 1, 8, 8, offload=True, kv_on_gpu=False, pool_ranks=4, fetch_ranks=4)
    msg = str(refused.value)
    assert "2 layer buffers 2.3 GiB + 2 landing buffers of 1/4 layer 0.6 GiB" in msg and "\n" not in msg
    assert msg.endswith("or --weight-fetch whole (no landing buffers)")
    with pytest.raises(OffloadgenError, match="landing buffers of 1/4 layer") as refused:  # short of the ring too
        plan_placement(cfg, 2, budget - GiB // 4, 1, 8, 8, offload=True, kv_on_gpu=False, pool_ranks=4, fetch_ranks=4)
    assert "--weight-fetch whole" not in str(refused.value)
    assert layer * 2 / GiB == pytest.approx(2.3, abs=0.05)


def test_too_many_landing_buffers_asked_for_are_refused_naming_the_flag():
    """--landing-buffers 40 on 4 ranks: 10 layers of landing buffers cannot fit 16 GiB beside the
    KV cache and the ring; the refusal says that fewer landing buffers would fit, not only a smaller
    batch (the budget has room for the run with the default)."""
    cfg = preset("opt-30b")
    args = (cfg, 2, 16 * GiB, 8, 512, 32)
    plan_placement(*args, offload=True, fetch_ranks=4)  # the default fits
    with pytest.raises(OffloadgenError) as refused:
        plan_placement(*args, offload=True, fetch_ranks=4, landing_slots=40)
    msg = str(refused.value)
    assert "40 landing buffers of 1/4 layer" in msg and "\n" not in msg
    assert "Try fewer --landing-buffers (at most 24 fit), a smaller --batch-size" in msg, msg
    assert plan_placement(*args, offload=True, fetch_ranks=4, landing_slots=24).landings == 24  # as it says
    with pytest.raises(OffloadgenError, match="at most 24 fit"):
        plan_placement(*args, offload=True, fetch_ranks=4, landing_slots=25)
    with pytest.raises(OffloadgenError) as refused:  # the default's landing buffers are not the user's to change
        plan_placement(cfg, 2, 8 * GiB, 8, 512, 32, offload=True, fetch_ranks=4)
    assert "--landing-buffers" not in str(refused.value)


def test_every_layer_pooled_needs_no_landing_buffers():
    """Nothing crosses PCIe when every fetched block is pooled: no host copy lands anywhere, and
    the plan counts no buffer for one (StreamingWeights makes none)."""
    cfg = preset("opt-1.3b")
    p = plan_placement(cfg, 2, 8 * GiB, 8, 512, 32, offload=True, pool_ranks=4, fetch_ranks=4)
    assert len(p.pooled) == cfg.n_layers and not p.streamed and p.bytes["landing"] == 0
    some_streamed = plan_placement(cfg, 2, int(1.9 * GiB), 8, 512, 32, offload=True, pool_ranks=4, fetch_ranks=4)
    assert some_streamed.streamed and some_streamed.bytes["landing"] == 2 * -(-some_streamed.bytes["ring"] // 2 // 4)


POOL = ["plan", "facebook/opt-30b", "--dummy", "--cpu-offload", "--gpu-memory", "16GiB", "--cpu-memory", "400GiB",
        "--h2d-bandwidth", "54.8GB", "--batch-size", "8", "--prompt-len", "512", "--gen-len", "32",
        "--num-gpus-per-node", "4", "--weight-fetch", "pool"]


def test_plan_of_four_ranks_says_which_link_figures_it_assumed_and_uses_saved_ones(capsys, monkeypatch, tmp_path):
    from offloadgen.machine import save_link_figures
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path))
    assert main(POOL) == 0
    out = capsys.readouterr().out
    assert "host links assumed 4 x 54.8 GB/s" in out and "NVLink unmeasured: all-gather assumed 179 GB/s" in out
    [row] = rows_of(out)
    # pooled, GB each link: 22 layers (20 with landing buffers and the prefill's rows at once, 24
    # without either); the prefill in parts of 2 rows (test_a_prefill_in_parts_pools_two_more...)
    assert row[5:8] == ["0.250", "NVLink", "128.02"] and row[8:11] == ["22", "8.02", "44.40"]
    assert main([*POOL, "--num-gpus-per-node", "1"]) == 0  # one rank: one GPU's plan
    one = capsys.readouterr().out
    assert "NVLink" not in one and rows_of(one)[0][2] == "42"
    save_link_figures(4, 100e9, 400e9, "H100 x 4, test")
    assert main(POOL) == 0
    out = capsys.readouterr().out
    assert "host links 100.0 GB/s together (measured by bench: H100 x 4, test)" in out
    [row] = rows_of(out)
    assert row[6] == "bus" and float(row[11]) == pytest.approx(8.02e9 / 25e9, abs=1e-3)  # PCIe s at 100/4 GB/s each
    assert main([*POOL, "--allgather-bandwidth", "90GB"]) == 0
    out = capsys.readouterr().out
    assert "all-gather 90.0 GB/s received per GPU (given with --allgather-bandwidth)" in out
    assert rows_of(out)[0][6] == "NVLink" and "weight-gather" not in out
    assert main([*POOL, "--weight-gather", "copy"]) == 0  # the plan says which gather it timed, and how
    assert "--weight-gather copy: parts gathered by copies, timed here at the all-gather's rate" in capsys.readouterr().out


@pytest.mark.parametrize("change", [["--num-gpus-per-node", "1"], ["--weight-fetch", "whole"]])
def test_an_allgather_bandwidth_where_nothing_is_gathered_is_refused(capsys, monkeypatch, tmp_path, change):
    """With one rank or whole layers there is no all-gather: the figure would be silently ignored."""
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path))
    assert main([*POOL, *change, "--allgather-bandwidth", "90GB"]) == 2
    err = capsys.readouterr().err
    assert "--allgather-bandwidth is the NVLink all-gather rate" in err and "got --num-gpus-per-node" in err


@pytest.mark.parametrize("figure", ["Infinity", "true", "-1e11", "NaN", "\"1e11\""])
def test_a_links_file_with_a_figure_that_is_no_rate_is_not_used(capsys, monkeypatch, tmp_path, figure):
    """links.json is read back from the cache folder: json takes Infinity and true as numbers, and an
    infinite host-link total made every PCIe time 0 s in the table. Such a file counts as none saved."""
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path))
    (tmp_path / "links.json").write_text(
        f'{{"4": {{"h2d_aggregate_bytes_s": {figure}, "allgather_bytes_s": 4e11, "source": "edited"}}}}')
    assert main(POOL) == 0
    out = capsys.readouterr().out
    assert "host links assumed 4 x 54.8 GB/s" in out and "edited" not in out


def test_a_prefill_in_parts_pools_two_more_layers_on_four_ranks_and_stays_in_the_budget():
    """OPT-30B, 16 GiB on each of 4 GPUs, 8 rows each, pooled with landing buffers: the prefill of
    all 8 rows at once needs 1.18 GB of temporaries that a decode step does not; in parts of 2 rows
    (1024 tokens) 0.34 GB, and the 0.84 GB left pool two more layers (22, not 20) with every part
    of the modelled peak still within the budget. One GPU keeps one more layer (6, not 5)."""
    from offloadgen.offload.placement import plan_prefill_parts
    cfg = preset("opt-30b")
    args = (cfg, 2, 16 * GiB, 8, 512, 32)
    whole = plan_placement(*args, offload=True, pool_ranks=4, fetch_ranks=4)
    parts = plan_prefill_parts(*args, offload=True, pool_ranks=4, fetch_ranks=4)
    assert len(whole.pooled) == 20 and whole.prefill_tokens is None
    assert len(parts.pooled) == 22 and parts.prefill_tokens == 1024 and len(parts.streamed) == 26
    assert parts.bytes["activations"] == pytest.approx(0.342e9, rel=0.01)
    assert whole.bytes["activations"] == pytest.approx(1.182e9, rel=0.01)
    on_gpu = ("resident", "pooled_per_rank", "ring", "landing", "kv_cache", "activations")
    peak = sum(parts.bytes[k] for k in on_gpu)
    assert peak <= 16 * GiB and 16 * GiB - peak == pytest.approx(0.232e9, rel=0.02)
    assert parts.bytes["kv_cache"] == whole.bytes["kv_cache"] == 8 * 544 * 48 * 2 * 7168 * 2  # this rank's rows only
    assert "prefill in parts of 1024 tokens" in parts.describe()
    one = plan_prefill_parts(*args, offload=True)
    assert len(one.streamed) == 42 and len(plan_placement(*args, offload=True).streamed) == 43
    # nothing gained, or the cache's parts fixed by other means: the prefill stays whole
    assert plan_prefill_parts(*args, offload=True, fetch_ranks=4).prefill_tokens is None  # all-gather: 0.84 GB < a layer
    short = plan_prefill_parts(*args[:-3], 8, 128, 32, offload=True, pool_ranks=4, fetch_ranks=4)
    assert short.prefill_tokens is None  # 8 prompts of 128 tokens: parts of 4 rows would be under 1024 tokens
    assert plan_prefill_parts(*args, 4, offload=True, pool_ranks=4, fetch_ranks=4).prefill_tokens is None  # --micro-batch-size
