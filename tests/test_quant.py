"""Group-wise quantization: error bounds, awkward shapes, packing, and the engine paths agreeing."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadgen.checkpoint import DummyCheckpoint, SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.errors import OffloadgenError
from offloadgen.models import blocks, preset
from offloadgen.offload.placement import GiB, Placement, all_resident, plan_placement
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.quant import QuantConfig, dequantize, quantize
from offloadgen.sampling import SamplingParams

from test_parity import ragged_batch

CPU = torch.device("cpu")


def step_of(qt):
    return qt.scale.float().repeat_interleave(qt.config.group_size, 1)[:, :qt.shape[1]]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), bits=st.sampled_from([4, 8]),
       group=st.sampled_from([2, 32, 64, 128]), scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_round_trip_within_half_a_step(rows, cols, bits, group, scale, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    qt = quantize(w, QuantConfig(bits, group))
    back = dequantize(qt, torch.float32)
    assert back.shape == w.shape
    # half a step, plus a few float32 ulps of the weight for evaluating q * scale + min itself
    assert ((back - w).abs() <= step_of(qt) / 2 + w.abs() * 2.0**-20 + 1e-9).all()


def test_packing_sizes_and_constant_groups():
    w = torch.full((3, 130), 0.25)
    w[1] = torch.linspace(-1, 1, 130)
    qt = quantize(w, QuantConfig(4, 64))
    assert qt.packed.shape == (3, 3 * 64 // 2) and qt.packed.dtype == torch.uint8
    assert qt.scale.shape == qt.min.shape == (3, 3)
    assert torch.equal(dequantize(qt, torch.float32)[0], w[0])  # a constant group is exact
    assert quantize(w, QuantConfig(8, 64)).packed.shape == (3, 192)


def test_eight_bits_is_much_finer_than_four():
    w = torch.randn(64, 512)
    err = {b: (dequantize(quantize(w, QuantConfig(b, 64)), torch.float32) - w).abs().mean() for b in (4, 8)}
    assert err[8] * 10 < err[4]


def test_bad_configs_are_refused():
    with pytest.raises(OffloadgenError, match="4 or 8"):
        QuantConfig(3, 64)
    with pytest.raises(OffloadgenError, match="group size"):
        QuantConfig(4, 7)


@pytest.mark.parametrize("variant", ["llama3-gqa-rope-scaling", "opt", "bloom"])
def test_streamed_quantized_layers_equal_resident_quantized(tiny, variant):
    """Quantized blocks streamed through the ring and quantized blocks kept resident dequantize
    the same bytes: the tokens and logits are identical, and differ from 16 bits only slightly."""
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=2)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    q = QuantConfig(8, 32)
    resident = Engine(ckpt.cfg, StreamingWeights(ckpt, CPU, torch.float32, all_resident(ckpt.cfg), progress=False,
                                                 quant=q), CPU, torch.float32).generate(ids, mask, params, set(), 0)
    order = [b for b in blocks(ckpt.cfg) if b != "head"]
    streamed_w = StreamingWeights(ckpt, CPU, torch.float32, Placement(["head"], order, 2, {}), progress=False, quant=q)
    streamed = Engine(ckpt.cfg, streamed_w, CPU, torch.float32).generate(ids, mask, params, set(), 0)
    assert streamed.tokens == resident.tokens
    assert torch.equal(streamed.last_logits, resident.last_logits)
    assert streamed_w.workspace is not None  # layers really were dequantized from packed bytes


def test_quantized_placement_streams_a_quarter_of_the_bytes():
    cfg = preset("opt-30b")
    p16 = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True, max_resident_layers=0)
    p4 = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True, max_resident_layers=0, quant=QuantConfig(4, 64))
    assert p16.streamed == p4.streamed
    # 4 bits + a float16 scale and minimum per 64 weights = 4.5 bits: 16 / 4.5 = 3.56x fewer bytes
    assert p16.streamed_bytes / p4.streamed_bytes == pytest.approx(16 / 4.5, rel=0.01)
    # the space saved keeps more layers resident under the same budget
    more = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True, quant=QuantConfig(4, 64))
    fewer = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True)
    assert len(more.resident) > len(fewer.resident)


def test_dummy_quantized_generation_runs():
    ck = DummyCheckpoint(preset("opt-125m"))
    w = StreamingWeights(ck, CPU, torch.float32, all_resident(ck.cfg), progress=False, quant=QuantConfig(4, 64))
    out = Engine(ck.cfg, w, CPU, torch.float32).generate(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long),
                                                         SamplingParams(max_new_tokens=4, ignore_eos=True), set(), 0)
    assert len(out.tokens[0]) == 4 and torch.isfinite(out.last_logits).all()


def test_second_load_reads_quantized_blocks_from_the_cache(tiny, tmp_path, monkeypatch):
    import offloadgen.offload.packed as packed
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path))
    _, path = tiny("llama2-mha")
    ckpt = SafetensorsFolder(path)
    q = QuantConfig(4, 32)
    ids, mask = ragged_batch(seed=9)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    def run():
        w = StreamingWeights(ckpt, CPU, torch.float32, all_resident(ckpt.cfg), progress=False, quant=q)
        return w, Engine(ckpt.cfg, w, CPU, torch.float32).generate(ids, mask, params, set(), 0)

    first_w, first = run()
    assert first_w.timings["quantized_blocks"] == ckpt.cfg.n_layers and first_w.timings["cached_blocks"] == 0

    def no_quantizing(*args, **kwargs):
        raise AssertionError("the second load quantized again")

    monkeypatch.setattr(packed, "quantize", no_quantizing)
    second_w, second = run()
    assert second_w.timings["cached_blocks"] == ckpt.cfg.n_layers and second_w.timings["quantized_blocks"] == 0
    assert second.tokens == first.tokens and torch.equal(second.last_logits, first.last_logits)
    # another group size is another cache entry, not a wrong hit
    monkeypatch.setattr(packed, "quantize", quantize)
    other = StreamingWeights(ckpt, CPU, torch.float32, all_resident(ckpt.cfg), progress=False, quant=QuantConfig(4, 64))
    assert other.timings["quantized_blocks"] == ckpt.cfg.n_layers
