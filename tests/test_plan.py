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
