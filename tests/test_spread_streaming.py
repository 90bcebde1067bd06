"""Layers kept on the device spread through the pass (--resident-layers spread), as plan_placement
places them, with the streamed layers between them: the streaming weight source on the CPU gives
the tokens of every layer resident, at several prefetch depths, quantized, read from disk, under
the continuous batcher, and after a pass that fails midway (at a kept layer or at a streamed one)."""
import pytest
import torch
import transformers

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.models import blocks
from offloadgen.offload import ResidentWeights
from offloadgen.offload.placement import GiB, Placement, all_resident, plan_placement, spread_layers
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.quant import QuantConfig
from offloadgen.sampling import SamplingParams

from conftest import fail_at_layer_call
from test_parity import ragged_batch

CPU = torch.device("cpu")
LAYERS = 8


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny Llama of 8 layers: enough for kept layers with streamed ones on both sides."""
    path = tmp_path_factory.mktemp("deep-llama")
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    model.save_pretrained(path)
    return SafetensorsFolder(path)


def planned(cfg, kept: int, depth: int, resident_layers: str = "spread") -> Placement:
    """What plan_placement gives a GPU with room for `kept` layers beside the ends."""
    p = plan_placement(cfg, 4, 64 * GiB, 3, 14, 12, prefetch_depth=depth, offload=True, max_resident_layers=kept,
                       resident_layers=resident_layers)
    assert [b for b in p.resident if isinstance(b, int)] == (
        spread_layers(LAYERS, kept) if resident_layers == "spread" else list(range(LAYERS - kept, LAYERS)))
    return p


def interleaved(p: Placement) -> bool:
    """Some streamed layer comes after a kept one and before another: the schedule skips kept
    layers in the middle of the pass, not only a run at its end."""
    kept = [b for b in p.resident if isinstance(b, int)]
    return any(kept[0] < b < kept[-1] for b in p.streamed if isinstance(b, int))


def generate(ckpt, weights, micro_batch=None, prefill_tokens=None):
    ids, mask = ragged_batch(seed=5)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    return Engine(ckpt.cfg, weights, CPU, torch.float32, micro_batch, prefill_tokens=prefill_tokens).generate(
        ids, mask, params, set(), 0)


@pytest.fixture(scope="module")
def reference(deep):
    return generate(deep, ResidentWeights(deep, CPU, torch.float32, progress=False))


@pytest.mark.parametrize("kept,depth", [(1, 1), (3, 1), (3, 2), (5, 3), (2, 6), (7, 1)])
def test_spread_kept_layers_stream_the_rest_and_give_the_tokens_of_every_layer_resident(deep, reference, kept, depth):
    p = planned(deep.cfg, kept, depth)
    assert interleaved(p) == (1 < kept < LAYERS - 1)  # 7 of 8: only layer 0 streams
    w = StreamingWeights(deep, CPU, torch.float32, p, progress=False)
    out = generate(deep, w, micro_batch=2)
    assert out.tokens == reference.tokens
    torch.testing.assert_close(out.last_logits, reference.last_logits, rtol=1e-5, atol=1e-5)
    # only the streamed layers went through the ring, in pass order, none of the kept ones
    issued = [b for _, b, _ in w.issued_log]
    assert issued == [p.streamed[i % len(p.streamed)] for i in range(len(issued))]
    assert not set(issued) & set(p.resident)


def test_ends_streamed_with_spread_kept_layers(deep, reference):
    """A budget that cannot keep the embeddings: they stream like a layer, beside spread kept layers."""
    kept = spread_layers(LAYERS, 3)
    order = [b for b in blocks(deep.cfg) if b not in kept]
    w = StreamingWeights(deep, CPU, torch.float32, Placement(kept, order, 3, dict(streamed_per_pass=0)), progress=False)
    assert generate(deep, w, micro_batch=1).tokens == reference.tokens


def test_spread_kept_layers_prefilled_in_parts(deep, reference):
    w = StreamingWeights(deep, CPU, torch.float32, planned(deep.cfg, 3, 1), progress=False)
    assert generate(deep, w, prefill_tokens=14).tokens == reference.tokens


def test_spread_kept_layers_quantized_equal_every_layer_resident_quantized(deep):
    q = QuantConfig(4, 32)
    ref = generate(deep, StreamingWeights(deep, CPU, torch.float32, all_resident(deep.cfg), progress=False, quant=q),
                   micro_batch=2)
    w = StreamingWeights(deep, CPU, torch.float32, planned(deep.cfg, 3, 2), progress=False, quant=q)
    out = generate(deep, w, micro_batch=2)
    assert w.resident_packed and out.tokens == ref.tokens  # kept layers packed, dequantized on use
    assert torch.equal(out.last_logits, ref.last_logits)


def test_spread_kept_layers_with_the_rest_read_from_disk(deep, reference, tmp_path):
    p = planned(deep.cfg, 3, 2)
    w = StreamingWeights(deep, CPU, torch.float32, p, progress=False, offload_dir=str(tmp_path))
    assert w.disk is not None and set(w.disk.layouts) >= set(p.streamed)
    assert generate(deep, w, micro_batch=2).tokens == reference.tokens


def test_spread_kept_layers_under_the_continuous_batcher(deep):
    from offloadgen.scheduler import ContinuousBatcher
    g = torch.Generator().manual_seed(3)
    reqs = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (14, 3, 9, 20, 1)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 3, 8, 2, 5)]

    def alone(ids, sp):
        t = torch.tensor([ids])
        eng = Engine(deep.cfg, ResidentWeights(deep, CPU, torch.float32, progress=False), CPU, torch.float32)
        return eng.generate(t, torch.ones_like(t), sp, set(), 0).tokens[0]
    ref = [alone(ids, sp) for ids, sp in zip(reqs, params)]
    w = StreamingWeights(deep, CPU, torch.float32, planned(deep.cfg, 3, 1), progress=False)
    batcher = ContinuousBatcher(Engine(deep.cfg, w, CPU, torch.float32, 2), 3, 40, 8)
    handles = [batcher.submit(ids, sp) for ids, sp in zip(reqs, params)]
    while batcher.has_work():
        batcher.step()
    assert [h.output_ids for h in handles] == ref


@pytest.mark.parametrize("fail_at", ["kept", "streamed after kept", "last streamed"])
def test_a_pass_failing_midway_among_spread_kept_layers_leaves_the_schedule_usable(deep, reference, monkeypatch,
                                                                                   fail_at):
    p = planned(deep.cfg, 3, 2)
    kept = [b for b in p.resident if isinstance(b, int)]
    layer = {"kept": kept[0], "streamed after kept": kept[0] + 1,
             "last streamed": max(b for b in p.streamed if isinstance(b, int))}[fail_at]
    assert (layer in kept) == (fail_at == "kept")
    w = StreamingWeights(deep, CPU, torch.float32, p, progress=False)
    engine = Engine(deep.cfg, w, CPU, torch.float32)
    ids, mask = ragged_batch(seed=5)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    # the second pass (first decode step), at that layer
    fail_at_layer_call(monkeypatch, engine, LAYERS + layer + 1, lambda: engine.generate(ids, mask, params, set(), 0))
    assert engine.generate(ids, mask, params, set(), 0).tokens == reference.tokens


@pytest.mark.parametrize("nproc,mode,env", [
    (2, "allgather", dict(DIST_LANDING="1", DIST_RESET="3")),  # one landing buffer: each copy waits for a gather
    (2, "allgather", dict(DIST_LANDING="10", DIST_RESET="4")),  # more landing buffers than streamed blocks
    (3, "allgather", dict(DIST_LANDING="3", DIST_RING="4", DIST_RESET="5", DIST_GATHER="copy")),  # fewer than slots
    (2, "poolspread", dict(DIST_LANDING="9", DIST_RESET="2", DIST_GATHER="copy")),
    (2, "poolall", dict(DIST_LANDING="5")),  # every fetched block pooled: nothing lands
])
def test_ranks_fetching_parts_around_spread_kept_layers_give_the_tokens_of_one_process(deep, tmp_path, nproc, mode,
                                                                                       env):
    """Layers 2 and 5 of 8 kept whole on every rank, the others all-gathered or pooled around them,
    with landing buffers fewer than, as many as or more than the ring's slots and the streamed
    blocks, and a reset a few blocks into a pass (as after a failed one)."""
    import json

    from test_distributed import WORKER, one_process_tokens, torchrun
    out = tmp_path / "tokens.json"
    r = torchrun(nproc, str(WORKER), str(deep.path), str(out), mode, DIST_KEEP="2,5", **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == one_process_tokens(deep.path)
