"""A sharded safetensors folder loads into memory once: the reader reads the files straight into
the tensors that keep the weights (safetensors_io.py), with no mapping of the files kept (the
`safetensors` package's reader left every page it copied mapped: 2.4x the model in RSS) and no
intermediate copy. Measured in a fresh process, from the kernel's peak RSS (VmHWM) reset just
before the load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offloadgen.checkpoint import DummyCheckpoint, SafetensorsFolder
from offloadgen.models import blocks, config_from_hf

CONFIG = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 768, "ffn_dim": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 50272, "max_position_embeddings": 2048,
          "torch_dtype": "float16"}

MEASURE = """
import json, sys, time
import torch
from offloadgen.checkpoint import open_checkpoint
from offloadgen.config import RunConfig
from offloadgen.runtime import build_runtime
from offloadgen.tokenizer import ByteTokenizer

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

checkpoint = open_checkpoint(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # VmHWM starts again from the RSS of now
before = status("VmRSS")
rt = build_runtime(RunConfig(model=sys.argv[1], device="cpu", dtype="float16", max_batch_size=1,
                             max_seq_len=64, progress=False), checkpoint=checkpoint, tokenizer=ByteTokenizer(checkpoint.cfg))
print(json.dumps({"before": before, "peak": status("VmHWM"), "weights": rt.weights.nbytes()}))
"""


def write_sharded(folder: Path, shards: int = 3) -> int:
    """An opt-125m-sized folder in the hub's layout (index, several shards); returns its tensor bytes."""
    cfg = config_from_hf(CONFIG)
    dummy = DummyCheckpoint(cfg)
    tensors = {}
    for b in blocks(cfg):
        for local, (hf_name, _) in dummy.family.block_tensors(cfg, b).items():
            tensors.setdefault(hf_name, dummy.read_block(b, torch.float16)[local])
    names = list(tensors)
    weight_map, total = {}, 0
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return total


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_a_sharded_folder_is_held_in_memory_once(tmp_path):
    total = write_sharded(tmp_path)
    assert SafetensorsFolder(tmp_path).nbytes() == total
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["weights"] == total  # every tensor was loaded, tied embeddings once
    grew = (r["peak"] - r["before"]) / total
    assert 0.95 < grew < 1.1, f"loading {total / 1e6:.0f} MB raised peak RSS by {grew:.2f}x the model"
