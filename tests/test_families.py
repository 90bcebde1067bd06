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


# -- MoE layers with their experts streamed on demand (offload/experts.py) -----------------------------
MOE = ["mixtral", "qwen2-moe", "qwen3-moe"]


def expert_streaming(ckpt, slots, whole_span_share=2.0):
    """Every layer and the embeddings streamed, experts fetched as routed, an expert cache of
    `slots`; whole_span_share 2.0: never fall back to one span, so every expert is its own copy."""
    placement = streamed_placement(ckpt.cfg, ("head",), 1)
    placement.expert_streaming, placement.expert_slots = True, slots
    return StreamingWeights(ckpt, CPU, torch.float32, placement, progress=False, whole_span_share=whole_span_share)


@pytest.mark.parametrize("variant", MOE)
@pytest.mark.parametrize("slots", ["none", "some", "all"])
def test_experts_on_demand_match_transformers(tiny, variant, slots):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    n = {"none": 0, "some": 3, "all": 3 * ckpt.cfg.n_experts}[slots]
    weights = expert_streaming(ckpt, n)
    assert_matches(generate(ckpt, weights), reference(tiny, variant))
    t = weights.timings
    assert t["expert_misses"] > 0 and (t["expert_hits"] > 0) == (n > 0)  # the path under test ran
    copied = [x for x in weights.expert_log if x[1] != "span"]
    assert copied and all(x[1] == ("ring" if n == 0 else x[1]) for x in copied)


@pytest.mark.parametrize("variant", MOE)
def test_experts_on_demand_with_offloaded_kv_cache_match_transformers(tiny, variant):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    weights = expert_streaming(ckpt, 2, whole_span_share=0.75)  # the one-span fallback too, as a run has it
    assert_matches(generate(ckpt, weights, KVOffload(attention="cpu")), reference(tiny, variant))


def test_only_routed_experts_cross_the_bus_and_cache_hits_not_at_all(tiny):
    _, path = tiny("qwen3-moe")
    ckpt = SafetensorsFolder(path)
    weights = expert_streaming(ckpt, 4, whole_span_share=0.75)
    engine = Engine(ckpt.cfg, weights, CPU, torch.float32)
    ids, mask = ragged_batch()
    calls = []
    real = weights.get_experts

    def spy(block, experts):
        cached = {e for e in experts if (block, e) in weights.expert_cache.where}
        start = len(weights.expert_log)
        out = real(block, experts)
        calls.append((block, experts, cached, list(weights.expert_log)[start:]))
        return out
    weights.get_experts = spy
    engine.generate(ids[:1], mask[:1], SamplingParams(max_new_tokens=6, ignore_eos=True), set(), 0)
    hits, spans = 0, 0
    for block, experts, cached, log in calls:
        missed = set(experts) - cached
        assert all(b == block for b, _, _ in log)
        if len(missed) >= 0.75 * ckpt.cfg.n_experts:  # most of the layer: its experts cross as one span
            assert [kind for _, kind, _ in log] == ["span"]
            spans += 1
            continue
        copied = [e for _, kind, e in log]
        assert sorted(copied) == sorted(missed)  # each routed miss once, no hit, nothing else
        hits += len(cached)
    assert hits > 0 and spans > 0 and len(calls) > spans


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_on_demand_copies_fewer_bytes_than_whole_layers_at_batch_1(tiny, variant):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    moved = {}
    for mode in ("whole", "experts"):
        placement = streamed_placement(ckpt.cfg, ("head",), 1)
        placement.expert_streaming = mode == "experts"
        weights = StreamingWeights(ckpt, CPU, torch.float32, placement, progress=False)
        engine = Engine(ckpt.cfg, weights, CPU, torch.float32)
        engine.generate(ids[:1], mask[:1], params, set(), 0)  # the prefill: every expert routed
        before = weights.timings["bus_bytes"]
        out = engine.generate(ids[:1], mask[:1], params, set(), 0)
        moved[mode] = weights.timings["bus_bytes"] - before, out.tokens
    assert moved["experts"][1] == moved["whole"][1]
    # Mixtral's tiny model routes 2 of 4 experts, Qwen3-MoE's 3 of 8: a batch-1 step copies about
    # the trunk and half (3/8) of the experts, the prefill all of them
    assert moved["experts"][0] < 0.8 * moved["whole"][0]
