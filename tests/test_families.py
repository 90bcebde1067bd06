"""The newer families (Gemma 3, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers with
their weights streamed and with the KV cache in CPU memory; resident runs are in test_parity."""
import pytest
import torch

from offloadgen.checkpoint import DummyCheckpoint, SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.models import block_nbytes, preset
from offloadgen.models.moe import experts_of
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.offload.streaming import PackedBlock, StreamingWeights
from offloadgen.quant import QuantConfig
from offloadgen.sampling import SamplingParams

from test_offload import streamed_placement
from test_parity import NEW_TOKENS, ragged_batch, run_hf

CPU = torch.device("cpu")
NEW = ["gemma3", "gemma3-multimodal", "phi3-longrope", "phi3-partial-rotary-sliding", "mixtral", "qwen2-moe", "qwen3-moe"]
_reference = {}


def reference(tiny, variant):
    """transformers' greedy tokens and last logits for the ragged batch, once per variant."""
    if variant not in _reference:
        model, _ = tiny(variant)
        _reference[variant] = run_hf(model, *ragged_batch())
    return _reference[variant]


def generate(ckpt, weights, kv_offload=None):
    engine = Engine(ckpt.cfg, weights, CPU, torch.float32, micro_batch_size=2, kv_offload=kv_offload)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return engine.generate(*ragged_batch(), params, set(), 0)


def assert_matches(out, ref):
    tokens, logits = ref
    assert out.tokens == tokens
    assert (out.last_logits - logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", NEW)
def test_streamed_weights_match_transformers(tiny, variant):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    # the head stays resident, every layer and the embeddings stream through a ring of 3 buffers
    weights = StreamingWeights(ckpt, CPU, torch.float32, streamed_placement(ckpt.cfg, ("head",), 2), progress=False)
    assert_matches(generate(ckpt, weights), reference(tiny, variant))


@pytest.mark.parametrize("variant", NEW)
@pytest.mark.parametrize("attention", ["cpu", "gpu"])
def test_offloaded_kv_cache_matches_transformers(tiny, variant, attention):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    weights = ResidentWeights(ckpt, CPU, torch.float32, progress=False)
    assert_matches(generate(ckpt, weights, KVOffload(attention=attention)), reference(tiny, variant))


@pytest.mark.parametrize("name,experts,top_k", [("mixtral-8x7b", 8, 2), ("qwen3-30b-a3b", 128, 8)])
def test_moe_layer_keeps_each_expert_apart(name, experts, top_k):
    cfg = preset(name)
    tensors = DummyCheckpoint(cfg).family.block_tensors(cfg, 0)
    per_expert = {}
    for local, (_, shape) in tensors.items():
        e = experts_of(local)
        if e is not None:
            per_expert[e] = per_expert.get(e, 0) + shape[0] * shape[1] * 2
    assert sorted(per_expert) == list(range(experts)) and len(set(per_expert.values())) == 1
    rest = block_nbytes(cfg, 0, 2) - sum(per_expert.values())
    # a decode step for one token needs the rest of the layer and top_k experts, not all of them
    assert rest + top_k * per_expert[0] < 0.4 * block_nbytes(cfg, 0, 2)
    assert tensors["router"][1] == (experts, cfg.hidden_size)


def test_quantized_moe_layer_keeps_routers_in_16_bits():
    cfg = preset("qwen1.5-moe-a2.7b")
    shapes = {k: s for k, (_, s) in DummyCheckpoint(cfg).family.block_tensors(cfg, 0).items()}
    layout = PackedBlock(0, shapes, torch.float16, QuantConfig(4, 64))
    assert "router" not in layout.quantized and "shared_gate" not in layout.quantized
    assert "experts.5.down" in layout.quantized and "shared.up" in layout.quantized
