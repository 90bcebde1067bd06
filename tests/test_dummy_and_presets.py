
import pytest
import torch

from offloadgen.checkpoint import DummyCheckpoint
from offloadgen.models import blocks, param_count, preset


def test_dummy_weights_are_deterministic_finite_nonzero():
    a, b = DummyCheckpoint(preset("opt-125m")), DummyCheckpoint(preset("opt-125m"))
    for block in ["embed", 0, 11, "head"]:
        wa, wb = a.read_block(block, torch.float16), b.read_block(block, torch.float16)
        for name, t in wa.items():
            assert torch.equal(t, wb[name])
            assert torch.isfinite(t).all() and t.abs().sum() > 0, name
    # different tensors are not copies of each other
    w = a.read_block(0, torch.float32)
    assert not torch.equal(w["q"], w["k"])


def test_dummy_tied_embeddings_stay_tied():
    ck = DummyCheckpoint(preset("opt-125m"))
    assert torch.equal(ck.read_block("embed", torch.float32)["embed"], ck.read_block("head", torch.float32)["lm_head"])


def opt_reference_bytes(cfg):
    """The reference's model_bytes formula for OPT (docs/reference-benchmark.md), fp16."""
    h, L, V = cfg.hidden_size, cfg.n_layers, cfg.vocab_size
    return 2 * (L * (h * (3 * h + 1) + h * (h + 1) + h * (4 * h + 1) + 4 * h * (h + 1) + 4 * h) + V * (h + 1))


@pytest.mark.parametrize("name,billions", [("opt-1.3b", 1.3), ("opt-30b", 30), ("opt-66b", 66), ("opt-175b", 175),
                                           ("llama-2-7b", 6.7), ("llama-2-70b", 69), ("bloom-176b", 176),
                                           ("llama-3-8b", 8.0), ("qwen2.5-7b", 7.6), ("mistral-7b", 7.2)])
def test_preset_sizes(name, billions):
    assert param_count(preset(name)) / 1e9 == pytest.approx(billions, rel=0.05)


@pytest.mark.parametrize("name", ["opt-1.3b", "opt-30b", "opt-175b"])
def test_opt_param_count_agrees_with_the_reference_formula(name):
    cfg = preset(name)
    # The formula omits the position table (2050 x h); otherwise it counts what we count.
    assert param_count(cfg) * 2 == pytest.approx(opt_reference_bytes(cfg) + 2 * (cfg.max_position + 2) * cfg.hidden_size, rel=1e-3)


def test_presets_accept_hub_style_names():
    assert preset("facebook/opt-30b") == preset("opt-30b")
    assert len(blocks(preset("opt-30b"))) == 50
