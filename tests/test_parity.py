"""Our engine against transformers on the same weights, float32 on the CPU."""
import pytest
import torch
import transformers

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload import ResidentWeights
from offloadgen.sampling import SamplingParams

from conftest import V, VARIANTS

NEW_TOKENS = 32


def ragged_batch(seed=0):
    """Three prompts of lengths 14, 9 and 3, left-padded to 14."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids.masked_fill(mask == 0, 0), mask


def run_ours(path, ids, mask, micro_batch_size=None):
    ckpt = SafetensorsFolder(path)
    weights = ResidentWeights(ckpt, torch.device("cpu"), torch.float32, progress=False)
    engine = Engine(ckpt.cfg, weights, torch.device("cpu"), torch.float32, micro_batch_size)
    return engine.generate(ids, mask, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), set(), 0)


MIN_GAP = 1e-4  # between the top two logits at every greedy step: 100x the rounding differences


def run_hf(model, ids, mask):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    top2 = torch.stack(out.logits).topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min().item()
    assert gap > MIN_GAP, f"near-tie in the reference's greedy run ({gap:.1e}): pick another seed (SEED_OFFSETS)"
    return out.sequences[:, ids.shape[1]:].tolist(), out.logits[-1]


def generate_drops_longrope_context(variant: str) -> bool:
    """transformers before 5.24: Phi3's generate, where the sequence crosses LongRoPE's original
    length, drops the cache to recompute it but passes only the last token, which then runs alone
    without its context (5.24 passes the whole sequence: next_sequence_length = None)."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return variant == "phi3-longrope" and (major, minor) < (5, 24)


@torch.no_grad()
def run_hf_by_prefixes(model, ids, mask, new_tokens=NEW_TOKENS):
    """Greedy tokens and each step's logits from the model's forward over the whole sequence so
    far, without generate's cache: what generate computes where its cache handling is right."""
    seq, seen, steps = ids, mask, []
    for _ in range(new_tokens):
        positions = (seen.long().cumsum(-1) - 1).clamp(min=0)  # left padding, as generate sets them
        logits = model(input_ids=seq, attention_mask=seen, position_ids=positions).logits[:, -1]
        steps.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        seen = torch.cat([seen, torch.ones_like(seen[:, :1])], 1)
    return seq[:, ids.shape[1]:].tolist(), steps


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_and_logits_match_transformers(tiny, variant):
    model, path = tiny(variant)
    ids, mask = ragged_batch()
    if generate_drops_longrope_context(variant):
        hf_tokens, steps = run_hf_by_prefixes(model, ids, mask)
        hf_logits = steps[-1]
    else:
        hf_tokens, hf_logits = run_hf(model, ids, mask)
    ours = run_ours(path, ids, mask)
    assert ours.tokens == hf_tokens
    assert len(ours.tokens[0]) == NEW_TOKENS
    assert (ours.last_logits - hf_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["phi3-longrope", "mistral-sliding-window", "gemma3"])
def test_greedy_tokens_and_logits_match_transformers_forward_over_each_prefix(tiny, variant):
    """The second reference, which the test above takes for phi3-longrope under transformers
    before 5.24 (and benchmarks/gpu_hf_parity.py on GPU images that have one): transformers'
    forward over each step's whole sequence, no cache. It must give our tokens on every version,
    LongRoPE's switch (phi3-longrope crosses its original length of 32 at step 19) and sliding
    windows included."""
    model, path = tiny(variant)
    ids, mask = ragged_batch()
    hf_tokens, steps = run_hf_by_prefixes(model, ids, mask)
    ours = run_ours(path, ids, mask)
    assert ours.tokens == hf_tokens
    assert (ours.last_logits - steps[-1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["llama3-gqa-rope-scaling", "opt", "bloom"])
def test_each_row_alone_equals_the_padded_batch(tiny, variant):
    """Left padding must not change a row's result: the row run alone gives the same tokens."""
    _, path = tiny(variant)
    ids, mask = ragged_batch(seed=3)
    batch = run_ours(path, ids, mask)
    for row in range(3):
        keep = mask[row].bool()
        alone = run_ours(path, ids[row:row + 1, keep], mask[row:row + 1, keep])
        assert alone.tokens[0] == batch.tokens[row]
        assert torch.allclose(alone.last_logits[0], batch.last_logits[row], atol=1e-4)


@pytest.mark.parametrize("variant", ["llama2-mha", "opt-350m-style"])
def test_micro_batches_change_nothing(tiny, variant):
    _, path = tiny(variant)
    ids, mask = ragged_batch(seed=5)
    whole = run_ours(path, ids, mask)
    split = run_ours(path, ids, mask, micro_batch_size=1)
    assert split.tokens == whole.tokens
    assert torch.allclose(split.last_logits, whole.last_logits, atol=1e-5)


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on a GPU, so that sdpa takes its GPU path on a CPU machine."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("allow_cudnn", [False, True])
def test_gpu_attention_leaves_out_cudnn_only_around_its_own_call(monkeypatch, allow_cudnn):
    """cuDNN's attention builds an execution plan for every new shape, which a decode pass always
    has (44 ms a call on an H100: benchmarks/sdpa_backends.py), so sdpa turns PyTorch's cuDNN
    switch off while it calls attention on a GPU, and back on after, even when attention raises;
    OFFLOADGEN_CUDNN_ATTENTION=1 (layers.CUDNN_ATTENTION) leaves PyTorch's choice alone."""
    from offloadgen.models import layers
    real, seen = layers.F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, scale=None):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        if q.shape[0] == 2:
            raise RuntimeError("attention failed")
        return real(q.as_subclass(torch.Tensor), k.as_subclass(torch.Tensor), v.as_subclass(torch.Tensor),
                    attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(layers, "CUDNN_ATTENTION", allow_cudnn)
    q, k, v = (torch.randn(1, 4, 3, 8).as_subclass(CudaLooking) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    out = layers.sdpa(q, k, v, mask)
    assert torch.allclose(out.as_subclass(torch.Tensor),
                          real(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), attn_mask=mask))
    with pytest.raises(RuntimeError, match="attention failed"):
        layers.sdpa(*(torch.randn(2, 4, 3, 8).as_subclass(CudaLooking) for _ in range(3)), torch.zeros(2, 1, 3, 3))
    layers.sdpa(*(torch.randn(1, 4, 3, 8) for _ in range(3)), mask)  # on the CPU: left alone
    assert seen == [allow_cudnn, allow_cudnn, True]
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_gpu_attention_keeps_cudnn_out_until_the_last_thread_in_it_is_done(monkeypatch):
    """The switch is PyTorch's, one for the process: two threads in sdpa at once (the engine's and
    a CPU-side lane, a server's batcher and another engine) must not have the first one out turn
    cuDNN back on under the other's call; and a switch the user turned off stays off."""
    import threading
    from offloadgen.models import layers
    real, seen = layers.F.scaled_dot_product_attention, {"a": [], "b": []}
    a_in, a_go, b_in, b_go = (threading.Event() for _ in range(4))

    def spy(q, k, v, attn_mask=None, scale=None):
        me = threading.current_thread().name
        seen[me].append(torch.backends.cuda.cudnn_sdp_enabled())
        if me == "a":
            a_in.set()
            assert a_go.wait(10)
        else:
            b_in.set()
            assert b_go.wait(10)
            seen[me].append(torch.backends.cuda.cudnn_sdp_enabled())  # after a's call has ended
        return real(q.as_subclass(torch.Tensor), k.as_subclass(torch.Tensor), v.as_subclass(torch.Tensor),
                    attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(layers, "CUDNN_ATTENTION", False)
    mask = torch.zeros(1, 1, 3, 3)

    def call():
        layers.sdpa(*(torch.randn(1, 4, 3, 8).as_subclass(CudaLooking) for _ in range(3)), mask)
    a, b = threading.Thread(target=call, name="a"), threading.Thread(target=call, name="b")
    a.start()
    assert a_in.wait(10)
    b.start()
    assert b_in.wait(10)
    a_go.set()
    a.join(10)
    b_go.set()
    b.join(10)
    assert seen == {"a": [False], "b": [False, False]}
    assert torch.backends.cuda.cudnn_sdp_enabled()

    torch.backends.cuda.enable_cudnn_sdp(False)  # the user's own choice
    try:
        seen["a"].clear()
        a = threading.Thread(target=call, name="a")
        a_go.set()
        a.start()
        a.join(10)
        assert seen["a"] == [False]
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
