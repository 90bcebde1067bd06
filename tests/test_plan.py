"""`offloadgen plan`: placement and predicted speed before loading; refusals that say what would fit."""
import pytest

from offloadgen.cli import main
from offloadgen.errors import OffloadgenError
from offloadgen.models import preset
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
