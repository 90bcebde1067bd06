"""Model files that are wrong in ways a user can plausibly hand us: one line and exit 2, never a
traceback nor garbage text (issue 15: config.json, weights, GGUF fields, stale GGUF conversions)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from offloadgen.checkpoint import SafetensorsFolder, open_checkpoint
from offloadgen.cli import main
from offloadgen.errors import OffloadgenError

OPT = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "vocab_size": 320, "max_position_embeddings": 256}


def one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offloadgen: error:"), lines
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize("content,needle", [
    (b"[1, 2]", "expected a JSON object"),
    (b'{"model_type": "opt", "hidden_size": 64\xff}', "not UTF-8"),
    (json.dumps({**OPT, "num_attention_heads": 0}).encode(), "num_attention_heads must be a positive integer, not 0"),
    (json.dumps({**OPT, "num_hidden_layers": "2"}).encode(), "num_hidden_layers must be a positive integer, not '2'"),
    (json.dumps({**OPT, "num_hidden_layers": None}).encode(), "num_hidden_layers must be a positive integer, not None"),
    (json.dumps({**OPT, "num_hidden_layers": 2.5}).encode(), "num_hidden_layers must be a positive integer, not 2.5"),
    (json.dumps({**OPT, "num_hidden_layers": 0}).encode(), "num_hidden_layers must be a positive integer, not 0"),
    (json.dumps({**OPT, "num_hidden_layers": -1}).encode(), "num_hidden_layers must be a positive integer, not -1"),
    (json.dumps({**OPT, "hidden_size": 66}).encode(), "not a multiple of the 4 attention heads"),
    (json.dumps({**OPT, "model_type": "llama", "intermediate_size": 96, "rope_theta": "big"}).encode(),
     "a setting has a value a llama model cannot use"),
])
def test_a_bad_config_json_is_one_line(capsys, tmp_path, content, needle):
    (tmp_path / "config.json").write_bytes(content)
    one_line_error(capsys, ["generate", str(tmp_path)], needle)


def test_an_unreadable_config_json_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    real = type(tmp_path).read_text

    def refuse(self, *a, **kw):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **kw)

    monkeypatch.setattr(type(tmp_path), "read_text", refuse)  # root reads any mode: make it refuse
    one_line_error(capsys, ["generate", str(tmp_path)], "cannot read it (Permission denied)")


def _damaged_copy(tiny, tmp_path, change):
    _, path = tiny("opt")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_integer_weights_are_refused_before_loading(tiny, tmp_path):
    name = "model.decoder.layers.1.fc1.weight"
    folder = _damaged_copy(tiny, tmp_path, lambda t: t.update({name: t[name].to(torch.int32)}))
    with pytest.raises(OffloadgenError, match=f"{name}' is stored as I32; weights must be floating point"):
        SafetensorsFolder(folder)


def test_nan_weights_are_refused_when_their_block_is_read(tiny, tmp_path):
    name = "model.decoder.layers.1.fc1.weight"
    folder = _damaged_copy(tiny, tmp_path, lambda t: t[name].view(-1).__setitem__(7, float("nan")))
    ckpt = SafetensorsFolder(folder)
    ckpt.read_block(0, torch.float32)
    with pytest.raises(OffloadgenError, match=f"{name}' holds NaN or infinite values as float32"):
        ckpt.read_block(1, torch.float32)


def write_gguf(path, head_count=True, vocab_size=True):
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_context_length(64)
    if head_count:
        w.add_head_count(2)
    if vocab_size:
        w.add_vocab_size(32)
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("missing,needle", [("head_count", "no valid llama.attention.head_count"),
                                            ("vocab_size", "no valid llama.vocab_size")])
def test_a_gguf_without_a_needed_field_is_one_line(tmp_path, monkeypatch, missing, needle):
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", **{missing: False})
    with pytest.raises(OffloadgenError, match=needle):
        open_checkpoint(path)


def test_stale_gguf_conversions_of_dead_processes_are_removed(tmp_path, monkeypatch):
    # issue 15, case 8: a conversion killed mid-way left its temporary folder forever
    cache = tmp_path / "cache"
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(cache))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = cache / f".other-0123.tmp{int(dead.stdout)}", cache / f".busy-4567.tmp{os.getpid()}"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "model-00001.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(OffloadgenError):  # the conversion itself fails here: no head count
        open_checkpoint(write_gguf(tmp_path / "m.gguf", head_count=False))
    assert not stale.exists() and live.exists()
