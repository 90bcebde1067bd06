"""The streaming weight source and the placement planner, checked on the CPU."""
import pytest
import torch

from offloadgen.checkpoint import DummyCheckpoint, SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.errors import OffloadgenError
from offloadgen.models import block_nbytes, blocks, preset
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.offload.placement import GiB, Placement, plan_kv_offload, plan_placement, spread_layers
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.sampling import SamplingParams

from conftest import VARIANTS, fail_at_layer_call
from test_parity import ragged_batch

CPU = torch.device("cpu")


def streamed_placement(cfg, resident=(), depth=1):
    order = [b for b in blocks(cfg) if b not in resident]
    return Placement(list(resident), order, depth + 1, dict(streamed_per_pass=0))


@pytest.mark.parametrize("variant,resident,depth", [("llama3-gqa-rope-scaling", (), 1), ("opt", ("head", "embed", 2), 2),
                                                    ("bloom", (1,), 3), ("smollm-tied", ("embed",), 1)])
def test_streamed_generation_equals_resident(tiny, variant, resident, depth):
    _, path = tiny(variant)
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=7)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32, 2) \
        .generate(ids, mask, params, set(), 0)
    weights = StreamingWeights(ckpt, CPU, torch.float32, streamed_placement(ckpt.cfg, resident, depth), progress=False)
    out = Engine(ckpt.cfg, weights, CPU, torch.float32, micro_batch_size=2).generate(ids, mask, params, set(), 0)
    assert out.tokens == ref.tokens
    # Not bit-equal: a streamed block's tensors are views into one flat buffer, and the CPU BLAS
    # picks its kernel by alignment and strides, so the last bits of a sum may differ.
    torch.testing.assert_close(out.last_logits, ref.last_logits, rtol=1e-6, atol=1e-6)


def test_prefetch_schedule_runs_ahead_and_reuses_slots_in_order():
    cfg = preset("opt-125m")
    ck = DummyCheckpoint(cfg)
    placement = streamed_placement(cfg, resident=("embed", "head", 11), depth=2)
    w = StreamingWeights(ck, CPU, torch.float32, placement, progress=False)
    order = placement.streamed  # layers 0..10
    # before any use, depth + 1 blocks are already issued
    assert [b for _, b, _ in w.issued_log] == order[:3]
    for step in range(2):  # two passes: the prefetch wraps around from layer 10 to layer 0
        for b in blocks(cfg):
            w.get(b)
            w.done(b)
    log = w.issued_log
    assert [b for _, b, _ in log] == [order[i % len(order)] for i in range(len(log))]
    assert all(slot == i % 3 for i, _, slot in log)
    assert len(log) == 2 * len(order) + 3  # always exactly depth + 1 ahead of use
    with pytest.raises(AssertionError, match="pass order"):
        w.get(order[5])  # out of order: the schedule refuses rather than return the wrong weights


def test_packed_views_hold_each_tensor():
    cfg = preset("opt-125m")
    ck = DummyCheckpoint(cfg)
    w = StreamingWeights(ck, CPU, torch.float32, streamed_placement(cfg), progress=False)
    got = w.get("embed")
    for name, t in ck.read_block("embed", torch.float32).items():
        assert torch.equal(got[name], t)
        assert (got[name].data_ptr() - w.ring[0].data_ptr()) % 256 == 0  # aligned within the flat buffer


def test_placement_fills_the_budget_with_resident_layers():
    cfg = preset("opt-30b")
    layer = block_nbytes(cfg, 0, 2)
    small = plan_placement(cfg, 2, 10 * GiB, 8, 512, 32, offload=True)
    large = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True)
    assert "head" in large.resident and len(large.resident) > len(small.resident)
    for p, budget in ((small, 10 * GiB), (large, 16 * GiB)):
        used = sum(v for k, v in p.bytes.items() if k != "streamed_per_pass")
        assert used <= budget < used + layer + 1  # under budget, and not one more layer would fit
        assert p.streamed_bytes == sum(block_nbytes(cfg, b, 2) for b in p.streamed)
        assert p.resident[-1] == cfg.n_layers - 1 or p.resident[-1] == "head"


def test_resident_layers_are_spread_through_the_pass_unless_asked_for_last():
    # With the kept layers as one run at the end, the ring's two buffers fill while the first two of
    # them compute and the bus idles through the rest; spread, each sits between streamed layers.
    cfg = preset("opt-30b")
    spread = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True)
    last = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True, resident_layers="last")
    kept = [b for b in spread.resident if isinstance(b, int)]
    n = len(kept)
    assert 2 <= n < cfg.n_layers // 2
    assert [b for b in last.resident if isinstance(b, int)] == list(range(cfg.n_layers - n, cfg.n_layers))
    assert kept != list(range(cfg.n_layers - n, cfg.n_layers))
    assert kept[-1] == cfg.n_layers - 1 and kept[0] >= cfg.n_layers // n - 1
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert min(gaps) >= cfg.n_layers // n and max(gaps) <= -(-cfg.n_layers // n)  # evenly spaced
    # the same memory and the same bytes on the bus either way
    assert spread.bytes == last.bytes and spread.streamed_bytes == last.streamed_bytes
    assert sorted(spread.streamed, key=str) != sorted(last.streamed, key=str)
    # with the KV cache in CPU RAM too
    p, _, _ = plan_kv_offload(cfg, 2, 16 * GiB, 96, 512, 32, 8, 1, None, KVOffload(), None, torch.float16)
    assert [b for b in p.resident if isinstance(b, int)] == spread_layers(cfg.n_layers, len(
        [b for b in p.resident if isinstance(b, int)]))
    p, _, _ = plan_kv_offload(cfg, 2, 16 * GiB, 96, 512, 32, 8, 1, None, KVOffload(), None, torch.float16,
                              resident_layers="last")
    assert p.resident[-2:] == [cfg.n_layers - 1, "head"] and p.resident[-3] == cfg.n_layers - 2


@pytest.mark.parametrize("n_layers,n", [(48, 11), (48, 40), (48, 47), (5, 1), (7, 3)])
def test_spread_layers_picks_n_distinct_layers_ending_with_the_last(n_layers, n):
    kept = spread_layers(n_layers, n)
    assert len(kept) == n and kept == sorted(set(kept)) and kept[-1] == n_layers - 1 and kept[0] >= 0


def test_placement_counts_every_micro_batch_hidden_state():
    # The engine keeps each micro-batch's prompt-long hidden state between layers. Without this, a
    # KV-offloaded batch of 96 in parts of 8 peaked 0.45 GB above its plan on the H100 (and above
    # its 16 GiB budget with 4-bit weights).
    cfg = preset("opt-30b")
    one = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, micro_batch=8, kv_on_gpu=False)
    twelve = plan_placement(cfg, 2, 16 * GiB, 96, 512, 32, micro_batch=8, kv_on_gpu=False)
    assert twelve.bytes["activations"] - one.bytes["activations"] == 88 * 512 * cfg.hidden_size * 2


def test_placement_refuses_with_what_would_fit():
    cfg = preset("opt-30b")
    with pytest.raises(OffloadgenError, match=r"batch 64 does not fit .*smaller --batch-size"):
        plan_placement(cfg, 2, 16 * GiB, 64, 512, 32, offload=True)
    with pytest.raises(OffloadgenError, match=r"needs .* GiB .*--cpu-offload"):
        plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=False)


def test_everything_fits_means_nothing_streams():
    p = plan_placement(preset("opt-1.3b"), 2, 16 * GiB, 4, 128, 8, offload=True)
    assert p.streamed == [] and p.ring_slots == 0


def test_tied_embeddings_counted_once():
    cfg = preset("opt-1.3b")
    p = plan_placement(cfg, 2, 40 * GiB, 1, 16, 4, offload=False)
    total = sum(block_nbytes(cfg, b, 2) for b in blocks(cfg))
    assert p.bytes["resident"] == total - cfg.vocab_size * cfg.hidden_size * 2  # the shared matrix once


def test_a_pass_that_fails_midway_leaves_the_schedule_usable(tiny, monkeypatch):
    _, path = tiny("opt")
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=4)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    weights = StreamingWeights(ckpt, CPU, torch.float32, streamed_placement(ckpt.cfg, ("head",), 1), progress=False)
    engine = Engine(ckpt.cfg, weights, CPU, torch.float32)
    before = engine.generate(ids, mask, params, set(), 0)
    # the second layer of the prefill: mid-pass
    fail_at_layer_call(monkeypatch, engine, 2, lambda: engine.generate(ids, mask, params, set(), 0))
    after = engine.generate(ids, mask, params, set(), 0)
    assert after.tokens == before.tokens and torch.equal(after.last_logits, before.last_logits)


def test_resident_tied_embeddings_take_memory_once():
    cfg = preset("opt-125m")
    w = ResidentWeights(DummyCheckpoint(cfg), CPU, torch.float32, progress=False)
    assert w.get("embed")["embed"].data_ptr() == w.get("head")["lm_head"].data_ptr()
    planned = plan_placement(cfg, 4, 40 * GiB, 1, 16, 4, offload=False).bytes["resident"]
    assert w.nbytes() == planned


def test_a_finished_generation_leaves_no_kv_cache_behind(tiny):
    # A benchmark's second loop must not hold the first loop's cache while it makes its own: on the
    # GPU that is a whole cache over the planned budget.
    import gc
    import weakref
    _, path = tiny("opt")
    ckpt = SafetensorsFolder(path)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32)
    made = []
    real = engine.new_cache
    engine.new_cache = lambda *a: made.append(real(*a)) or made[-1]
    ids, mask = ragged_batch(seed=1)
    engine.generate(ids, mask, SamplingParams(max_new_tokens=3, ignore_eos=True), set(), 0)
    ref = weakref.ref(made.pop())
    gc.collect()
    assert ref() is None


def test_plan_streams_routed_experts_at_small_batches_and_whole_layers_at_large():
    from offloadgen.offload.placement import plan_placement as plan
    cfg = preset("mixtral-8x7b")
    layer = block_nbytes(cfg, 0, 2)
    one = plan(cfg, 2, 16 * GiB, 1, 512, 32, expert_streaming="auto")
    off = plan(cfg, 2, 16 * GiB, 1, 512, 32, expert_streaming="off")
    big = plan(cfg, 2, 16 * GiB, 16, 512, 32, expert_streaming="auto")
    assert one.expert_streaming and not off.expert_streaming and not big.expert_streaming
    # batch 1: a trunk and 2 of 8 experts per layer, less what the expert cache holds: >= 3x fewer bytes
    assert 3 * one.bus_bytes_per_step < off.bus_bytes_per_step == off.streamed_bytes
    assert one.expert_slots > 0 and one.bytes["whole_per_step"] == off.streamed_bytes
    used = sum(v for k, v in one.bytes.items() if k in ("resident", "ring", "kv_cache", "activations", "expert_cache"))
    assert used <= 16 * GiB < used + one.bytes["expert_cache"] // one.expert_slots + 1  # the cache fills the budget
    assert one.streamed_bytes == sum(block_nbytes(cfg, b, 2) for b in one.streamed)  # host RAM holds every layer
    assert layer * len(big.streamed) == big.bus_bytes_per_step  # batch 16 hits every expert: whole layers
    qwen = preset("qwen3-30b-a3b")
    q1 = plan(qwen, 2, 16 * GiB, 1, 512, 32, expert_streaming="on")
    assert 8 * q1.bus_bytes_per_step < sum(block_nbytes(qwen, i, 2) for i in range(qwen.n_layers))


def test_plan_command_shows_both_ways_for_moe(capsys):
    from offloadgen.cli import main
    assert main(["plan", "mixtral-8x7b", "--dummy", "--cpu-offload", "--gpu-memory", "16GiB", "--batch-sizes", "1,16",
                 "--h2d-bandwidth", "50GB", "--cpu-memory", "200GiB"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["1"], ["16"])]
    (whole1, _, routed1), (whole16, _, routed16) = rows[0][-3:], rows[1][-3:]
    assert routed1.endswith("*") and whole16.endswith("*")  # batch 1 on demand, batch 16 whole layers
    assert 3 * float(routed1[:-1]) < float(whole1)


def test_auto_expert_streaming_falls_back_to_whole_layers_when_cpu_ram_cannot_hold_every_layer(capsys):
    # 4-bit Mixtral is ~25 GiB: experts on demand stream (and keep in CPU RAM) every layer, which
    # 24 GiB cannot hold; whole layers keep 16 GiB of them on the GPU and fit. "off" runs, so must "auto".
    from offloadgen.cli import main
    common = ["plan", "mixtral-8x7b", "--dummy", "--cpu-offload", "--gpu-memory", "16GiB", "--quant-bits", "4",
              "--batch-sizes", "1", "--h2d-bandwidth", "50GB", "--cpu-memory", "24GiB", "--expert-streaming"]
    assert main(common + ["off"]) == 0
    off = capsys.readouterr().out
    assert main(common + ["auto"]) == 0
    auto = capsys.readouterr().out
    row = [line.split() for line in auto.splitlines() if line.split()[:1] == ["1"]][0]
    assert "does not fit" not in auto and row[-3].endswith("*")  # whole layers chosen
    assert [line for line in off.splitlines() if line.startswith("    1")] == \
        [line for line in auto.splitlines() if line.startswith("    1")]


def test_a_batch_of_one_that_does_not_fit_is_not_told_to_shrink_the_batch():
    cfg = preset("opt-125m")
    with pytest.raises(OffloadgenError, match="shorter --max-seq-len") as e:
        plan_placement(cfg, 2, GiB // 8, 1, 1024, 1024)
    assert "--batch-size" not in str(e.value)
    with pytest.raises(OffloadgenError, match=r"smaller --batch-size \(e.g. 8\)"):
        plan_placement(cfg, 2, GiB // 8, 16, 1024, 1024)


class _LayerShapes:
    """A model family that records the hidden states' shapes its layers are called on."""

    def __init__(self, family):
        self.family, self.shapes = family, []

    def __getattr__(self, name):
        return getattr(self.family, name)

    def layer(self, cfg, w, x, step, kv):
        self.shapes.append(tuple(x.shape[:2]))
        return self.family.layer(cfg, w, x, step, kv)


def test_a_prefill_in_parts_of_rows_gives_the_tokens_of_one_whole_prefill(tiny):
    """The plan may size the prefill's temporaries for parts of a few rows (Placement.prefill_tokens):
    the prompt pass then runs its rows in parts, and decode steps still take the whole batch at once."""
    _, path = tiny("opt")
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=3)  # 3 rows of 14 tokens
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ref = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32)
    ref.family = _LayerShapes(ref.family)
    whole = ref.generate(ids, mask, params, set(), 0)
    parts = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32,
                   prefill_tokens=14)  # one 14-token prompt per part
    parts.family = _LayerShapes(parts.family)
    out = parts.generate(ids, mask, params, set(), 0)
    assert out.tokens == whole.tokens
    torch.testing.assert_close(out.last_logits, whole.last_logits, rtol=1e-5, atol=1e-5)
    n = ckpt.cfg.n_layers
    assert ref.family.shapes[:n] == [(3, 14)] * n  # without: one prefill of all rows
    assert parts.family.shapes[:3 * n] == [(1, 14)] * 3 * n  # with: 3 parts of 1 row in every layer
    assert set(parts.family.shapes[3 * n:]) == {(3, 1)}  # decode steps whole
    assert parts.micro_batches(8, 512) == [slice(0, 1), slice(1, 2)] + [slice(i, i + 1) for i in range(2, 8)]
    parts.prefill_tokens = 1024
    assert parts.micro_batches(8, 512) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert parts.micro_batches(8) == [slice(0, 8)]  # a decode step


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_family_prefilled_in_parts_of_rows_gives_the_tokens_of_one_whole_prefill(tiny, name):
    """Each family prepares its own masks and positions per pass (sliding windows, ALiBi, Gemma 3's
    two rope bases): in parts of one left-padded row each, the greedy tokens are one whole prefill's."""
    _, path = tiny(name)
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=5)  # 3 rows of 14 tokens, two of them left-padded
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    outs = []
    for prefill_tokens in (None, 14):
        engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32,
                        prefill_tokens=prefill_tokens)
        assert len(engine.micro_batches(*ids.shape)) == (1 if prefill_tokens is None else 3)
        outs.append(engine.generate(ids, mask, params, set(), 0))
    assert outs[1].tokens == outs[0].tokens
    torch.testing.assert_close(outs[1].last_logits, outs[0].last_logits, rtol=1e-4, atol=1e-4)
