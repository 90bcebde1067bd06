"""The peers' models (benchmarks/peers/common.py): our presets built as transformers' own model
classes. A tiny config derived from each supported family's preset must survive the trip through
transformers and back: the config.json transformers saves reads back as the same config, and our
loader finds every tensor it expects, with the shape it expects, in the weights transformers saves."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.models import blocks, config_from_hf, family_of, param_count, preset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
import common  # noqa: E402

transformers = pytest.importorskip("transformers")

# Sizes chosen unlike transformers' defaults, so a setting the mapping drops shows up as a difference.
TINY = dict(hidden_size=64, n_layers=3, n_heads=4, vocab_size=320, max_position=256)
TINY_CONFIGS = {
    "opt-125m": dict(TINY, ffn_dim=96),
    "opt-350m": dict(TINY, ffn_dim=96, word_embed_proj_dim=32),  # projected, post-norm
    "llama-2-7b": dict(TINY, intermediate_size=96, n_kv_heads=2, head_dim=16, rope_theta=5e5),
    "mixtral-8x7b": dict(TINY, intermediate_size=96, n_kv_heads=2, head_dim=16, n_experts=4, top_k=2),
    "qwen3-30b-a3b": dict(TINY, intermediate_size=96, moe_intermediate_size=32, n_kv_heads=2, head_dim=16,
                          n_experts=6, top_k=3, dense_layers=(1,)),
}


def tiny(name):
    return dataclasses.replace(preset(name), **TINY_CONFIGS[name])


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_a_tiny_preset_round_trips_through_transformers(name, tmp_path):
    cfg = tiny(name)
    spec = common.HFModel(cfg)
    torch.manual_seed(0)
    model = spec.model_class(spec.config).eval()
    assert type(model.model.layers[0] if hasattr(model, "model") and hasattr(model.model, "layers")
                else model.model.decoder.layers[0]).__name__ == spec.layer_class
    # every tensor once (tied embeddings once), as our loader counts them
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 17, 250, 9]])).logits
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()

    model.save_pretrained(tmp_path)
    back = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    theirs, ours = dataclasses.asdict(back), dataclasses.asdict(cfg)
    theirs.pop("dtype"), ours.pop("dtype")  # the peers run fp16 whatever the preset stores
    assert theirs == ours
    folder = SafetensorsFolder(tmp_path)
    for block in blocks(cfg):
        expected = family_of(cfg).block_tensors(cfg, block)
        got = folder.read_block(block, torch.float32)
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(s) for k, (_, s) in expected.items()}


def test_opt_30b_gets_the_config_its_earlier_runs_had():
    """The OPT runs before this change built OPTConfig from the sizes alone (hf_opt_config)."""
    cfg = preset("opt-30b")
    before = transformers.OPTConfig(hidden_size=cfg.hidden_size, ffn_dim=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                                    num_attention_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                                    max_position_embeddings=cfg.max_position, dtype=torch.float16)
    spec = common.hf_model("facebook/opt-30b")
    assert spec.config.to_dict() == before.to_dict()
    assert (spec.model_class, spec.layer_class) == (transformers.OPTForCausalLM, "OPTDecoderLayer")


def test_inputs_keep_opts_ids_and_use_ids_of_the_models_vocabulary_elsewhere():
    opt_ids, opt_mask = common.inputs(3, 16, "cpu")
    assert opt_ids[:, -7:].tolist() == [common.PROMPT_IDS] * 3 and (opt_ids[:, :-7] == 2).all()
    assert common.pad_id("opt-30b") == 1
    ids, mask = common.inputs(3, 16, "cpu", model="mixtral-8x7b")
    assert ids.shape == opt_ids.shape and torch.equal(mask, opt_mask)
    assert int(ids.max()) < 32000 < int(opt_ids.max())  # OPT's 32826 is past Mixtral's vocabulary
    assert ids[0, -7] == 1 and (ids[:, :-7] == 2).all()  # Mixtral's BOS, left-padded with its EOS
    assert common.pad_id("mixtral-8x7b") == 2


def test_an_unsupported_family_is_refused_in_one_line():
    with pytest.raises(ValueError, match="bloom-7b1 is a bloom model") as e:
        common.hf_model("bloom-7b1")
    assert "\n" not in str(e.value)
    pytest.importorskip("accelerate")
    run = subprocess.run([sys.executable, "benchmarks/peers/accelerate_peer.py", "--model", "bloom-7b1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "accelerate peer: the peers run llama, mixtral, opt, qwen3_moe presets through transformers; "
        "bloom-7b1 is a bloom model"]


@pytest.mark.parametrize("flags, line", [
    (["--model", "gemma-3-1b"], "deepspeed peer: the peers run llama, mixtral, opt, qwen3_moe presets through "
                                "transformers; gemma-3-1b is a gemma3_text model"),
    (["--model", "mixtral-8x7b", "--kv-offload"], "deepspeed peer: --kv-offload is ZeRO-Inference's OPT-only KV "
                                                  "offload; mixtral-8x7b is a mixtral model")])
def test_deepspeed_refuses_other_families_and_kv_offload_off_opt_in_one_line(flags, line):
    pytest.importorskip("deepspeed")  # the GPU image's wheel (DS_BUILD_OPS=0) imports on a CPU machine too
    run = subprocess.run([sys.executable, "benchmarks/peers/deepspeed_peer.py", *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert [x for x in run.stderr.strip().splitlines() if "WARNING" not in x] == [line]
