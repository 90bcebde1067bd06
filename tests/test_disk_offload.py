"""Weights on disk (--disk-offload): same tokens and logits as weights in memory, written once,
rewritten when incomplete, refused clearly when the disk is short, and no weights in RAM."""
import json
import os
import shutil

import pytest
import torch

from offloadgen.checkpoint import DummyCheckpoint, SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.errors import OffloadgenError
from offloadgen.models import preset
from offloadgen.offload.placement import GiB, disk_placement_on_cpu
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.runtime import check_host_memory
from offloadgen.quant import QuantConfig
from offloadgen.sampling import SamplingParams

from test_parity import ragged_batch

CPU = torch.device("cpu")


def generate(ckpt, weights):
    ids, mask = ragged_batch(seed=5)
    return Engine(ckpt.cfg, weights, CPU, torch.float32, 2).generate(
        ids, mask, SamplingParams(max_new_tokens=10, ignore_eos=True), set(), 0)


@pytest.mark.parametrize("variant,quant", [("opt", None), ("llama3-gqa-rope-scaling", None),
                                           ("smollm-tied", QuantConfig(4, 32))])
def test_weights_from_disk_give_the_same_tokens(tiny, tmp_path, variant, quant):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    placement = disk_placement_on_cpu(ckpt.cfg, prefetch_depth=1)
    ref = generate(ckpt, StreamingWeights(ckpt, CPU, torch.float32, placement, progress=False, quant=quant))
    w = StreamingWeights(ckpt, CPU, torch.float32, placement, progress=False, quant=quant, offload_dir=tmp_path)
    assert w.host == {}  # no layer is held in RAM beyond the ring
    out = generate(ckpt, w)
    assert out.tokens == ref.tokens
    assert torch.equal(out.last_logits, ref.last_logits)
    # every pass reads every layer from disk (prefill + 9 decode passes), and the prefetch has
    # already read the next pass's first two layers
    size = [os.path.getsize(w.disk.files[i]) for i in range(ckpt.cfg.n_layers)]
    assert w.disk.stats["read_bytes"] == 10 * sum(size) + size[0] + size[1]


def test_written_once_and_rewritten_when_incomplete(tmp_path):
    cfg = preset("opt-125m")
    ck = DummyCheckpoint(cfg)
    placement = disk_placement_on_cpu(cfg)
    first = StreamingWeights(ck, CPU, torch.float32, placement, progress=False, offload_dir=tmp_path)
    assert first.timings["disk_write_s"] > 0
    second = StreamingWeights(ck, CPU, torch.float32, placement, progress=False, offload_dir=tmp_path)
    assert second.timings["disk_write_s"] == 0.0 and second.disk.path == first.disk.path
    # a write that died before its manifest: the folder is not trusted, and is written again
    (first.disk.path / "manifest.json").unlink()
    third = StreamingWeights(ck, CPU, torch.float32, placement, progress=False, offload_dir=tmp_path)
    assert third.timings["disk_write_s"] > 0
    assert json.loads((first.disk.path / "manifest.json").read_text())["blocks"]["3"] > 0
    # a truncated block file is caught by the manifest check too
    with open(third.disk.files[3], "r+b") as f:
        f.truncate(4096)
    assert not third.disk.complete()


def test_short_disk_is_refused_before_writing(tmp_path, monkeypatch):
    cfg = preset("opt-125m")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(OffloadgenError, match=r"need .* GiB on disk .* free"):
        StreamingWeights(DummyCheckpoint(cfg), CPU, torch.float32, disk_placement_on_cpu(cfg), progress=False,
                         offload_dir=tmp_path / "dir")
    assert not list((tmp_path / "dir").glob("*/*.bin"))


def test_ram_check_does_not_count_weights_on_disk():
    cfg = preset("opt-175b")
    placement = disk_placement_on_cpu(cfg, elem_bytes=2)
    with pytest.raises(OffloadgenError, match="CPU RAM"):
        check_host_memory(placement, available=24 * GiB)  # 350 GB of weights cannot live in 24 GiB
    placement.bytes["weights_on_disk"] = True
    check_host_memory(placement, available=24 * GiB)  # on disk, they need not


def test_bench_with_weights_on_disk(tmp_path, monkeypatch):
    from offloadgen.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "2", "--prompt-len", "32", "--gen-len", "3",
                 "--disk-offload", "--offload-dir", str(tmp_path / "off"), "--loops", "1", "--dtype", "float32",
                 "--verbose", "0"]) == 0
    rec = json.loads((tmp_path / "ds-opt-125m-bs2-prompt32-gen3-n1x1-disk.jsonl").read_text())
    d = rec["disk"]
    assert rec["disk_offload"] and d["read_bandwidth_bytes_s"] > 0
    layers = 12 * (12 * 768 * 768 + 13 * 768) * 4  # OPT-125m's 12 layers in float32, read once a step
    # each of a layer's 16 tensors aligned to 256 bytes, each file padded to 4 KiB
    assert layers <= d["read_bytes_per_decode_step"] <= layers + 12 * (16 * 256 + 4096)


def test_generate_command_with_weights_on_disk(capsys, tmp_path):
    from offloadgen.cli import main
    prompts = ["--prompt", "The capital of France is", "--prompt", "Water boils at"]
    assert main(["generate", *prompts, "--max-new-tokens", "8"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *prompts, "--max-new-tokens", "8", "--disk-offload", "--offload-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == plain
    assert list(tmp_path.glob("*/manifest.json"))
