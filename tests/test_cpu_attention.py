"""Decode attention on the CPU (offload/cpu_attention): the Numba kernel and the PyTorch fallback
against a float64 reference, with the masks the families build (ragged rows, GQA, ALiBi, sliding
windows), on the slot-major cache layout."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadgen.models.layers import StepInputs, alibi_slopes, attention_mask, grouped_mask
from offloadgen.offload import cpu_attention

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def test_numba_kernel_is_installed():
    # CI installs numba; without it every "numba" case below would be skipped and prove nothing.
    assert "numba" in cpu_attention.available_impls()


def decode_mask(kind: str, pads: list[int], end: int, heads: int, group: int, window: int) -> torch.Tensor:
    """The mask a family builds for a decode step that writes slot end - 1: rows left-padded by
    `pads` slots; "sliding" (Mistral), "alibi" (BLOOM: per-head bias, MHA), else plain."""
    key_valid = torch.ones(len(pads), end, dtype=torch.bool)
    for row, pad in enumerate(pads):
        key_valid[row, :pad] = False
    positions = (key_valid.long().sum(-1, keepdim=True) - 1)
    step = StepInputs(start=end - 1, positions=positions, key_valid=key_valid)
    mask = attention_mask(step, torch.float32, window if kind == "sliding" else None)
    if kind == "alibi":
        valid = key_valid.long()
        key_index = ((valid.cumsum(-1) - 1) * valid).float()
        return mask + (alibi_slopes(heads)[None, :, None] * key_index[:, None, :])[:, :, None, :]
    return grouped_mask(mask, group)


def reference(q, k, v, end, mask, scale):
    """float64 attention over the first `end` slots of the slot-major k, v."""
    b, h, _, d = q.shape
    h_kv = k.shape[2]
    keys, values = k[:end].double().permute(1, 2, 0, 3), v[:end].double().permute(1, 2, 0, 3)
    qg = q.double().reshape(b, h_kv, h // h_kv, d)
    scores = qg @ keys.transpose(-1, -2) * scale + mask[..., :end].double()
    return (scores.softmax(-1) @ values).reshape(b, h, 1, d)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["plain", "gqa", "sliding", "alibi"]))
    batch, kv_heads = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    group = draw(st.integers(2, 4)) if kind in ("gqa", "sliding") else 1
    end = draw(st.integers(1, 48))
    slots = end + draw(st.integers(0, 5))  # the cache is longer than what is used so far
    pads = [draw(st.integers(0, end - 1)) for _ in range(batch)]
    return dict(kind=kind, batch=batch, kv_heads=kv_heads, group=group, end=end, slots=slots, pads=pads,
                head_dim=draw(st.sampled_from([8, 16, 64])), window=draw(st.integers(1, 12)),
                dtype=draw(st.sampled_from(list(DTYPES))), seed=draw(st.integers(0, 2**16)))


def make(c):
    g = torch.Generator().manual_seed(c["seed"])
    dtype, heads = DTYPES[c["dtype"]], c["kv_heads"] * c["group"]
    k = (torch.randn(c["slots"], c["batch"], c["kv_heads"], c["head_dim"], generator=g) * 2).to(dtype)
    v = torch.randn(c["slots"], c["batch"], c["kv_heads"], c["head_dim"], generator=g).to(dtype)
    q = (torch.randn(c["batch"], heads, 1, c["head_dim"], generator=g) * 2).to(dtype)
    mask = decode_mask(c["kind"], c["pads"], c["end"], heads, c["group"], c["window"])
    return q, k, v, mask


def tolerance(dtype):
    # float32 accumulation throughout; half-precision outputs are then rounded once to their dtype
    return {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


@pytest.mark.parametrize("impl", cpu_attention.available_impls() + ["sdpa"])
@settings(max_examples=80, deadline=None)
@given(c=cases())
def test_matches_float64_reference(impl, c):
    q, k, v, mask = make(c)
    scale = c["head_dim"] ** -0.5
    out = cpu_attention.attend(q, k, v, c["end"], cpu_attention.bias_from_mask(mask, c["end"]), scale, impl=impl)
    ref = reference(q, k, v, c["end"], mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = tolerance(q.dtype)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * v.double().abs().max().item())


@settings(max_examples=40, deadline=None)
@given(c=cases(), slot_splits=st.integers(1, 50), item_splits=st.integers(1, 13))
def test_every_split_of_the_work_gives_the_same_answer(c, slot_splits, item_splits):
    """Threads split slots and (row, head) items by the thread count; on a small CI machine most
    splits never happen by themselves, so force them (empty ranges included)."""
    q, k, v, mask = make(c)
    scale = q.shape[-1] ** -0.5
    bias = cpu_attention.bias_from_mask(mask, c["end"])
    # float32 results: two splits may differ in the last float32 bit, which can round apart in float16
    one = cpu_attention._attend_numba(q, k, v, c["end"], bias, scale, splits=(1, 1), out=torch.empty(q.shape))
    split = cpu_attention._attend_numba(q, k, v, c["end"], bias, scale, splits=(slot_splits, item_splits),
                                        out=torch.empty(q.shape))
    # a slot range of fewer than 4 slots reads one key at a time, whose products round in another
    # order than a 4-slot group's; a range that skipped or repeated a slot would be off by far more
    torch.testing.assert_close(split, one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("splits", [(1, 1), (2, 3), (5, 1)])
def test_hidden_keys_are_never_read_into_the_result_whatever_their_bits(dtype, splits):
    """A hidden key's slot may hold anything (a pad never written, NaN): its score is -inf and its
    value is multiplied by nothing. Dense caches are read several slots at a pass (the group's
    products computed together), so the pads cover whole groups, parts of groups and none."""
    pads, end = [0, 5, 9, 4], 15
    c = dict(kind="plain", batch=len(pads), kv_heads=2, group=1, end=end, slots=end, pads=pads,
             head_dim=64, window=1, dtype=dtype, seed=3)
    q, k, v, mask = make(c)
    scale = c["head_dim"] ** -0.5
    ref = reference(q, k, v, end, mask, scale)
    for row, pad in enumerate(pads):
        k[:pad, row], v[:pad, row] = float("nan"), float("inf")
    out = cpu_attention._attend_numba(q, k, v, end, cpu_attention.bias_from_mask(mask, end), scale,
                                      splits=splits, out=torch.empty(q.shape))
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * v[end - 1].double().abs().max().item())


def test_a_mask_with_heads_other_than_the_kv_heads_is_refused():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(5, 1, 2, 8), torch.randn(5, 1, 2, 8)
    with pytest.raises(ValueError, match="mask heads"):
        cpu_attention.attend(q, k, v, 5, torch.zeros(5, 1, 4, 2))


def test_rows_of_different_lengths_get_ranges_of_equal_work():
    """Continuous batching leaves rows of a micro-batch at different lengths: the work ranges
    follow the slots each row reads, not the count of items, and read no slot past their rows."""
    from offloadgen.offload.cpu_attention import item_ranges, row_ends
    bounds, ends = item_ranges(np.array([100, 10, 10, 10]), heads=2, n=2)
    assert bounds.tolist() == [0, 1, 8] and ends.tolist() == [100, 100]  # 100 | 160, not 200 | 60
    bounds, ends = item_ranges(np.array([40, 40, 40, 40]), heads=2, n=2)  # one length: equal counts
    assert bounds.tolist() == [0, 4, 8] and ends.tolist() == [40, 40]
    work = np.repeat(np.array([512, 32, 300, 64, 200, 128, 90, 600]), 4)
    bounds, _ = item_ranges(np.array([512, 32, 300, 64, 200, 128, 90, 600]), heads=4, n=8)
    balanced = max(work[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:]))
    even = max(work[i:i + 4].sum() for i in range(0, 32, 4))
    assert balanced < 0.7 * even
    bias = np.zeros((6, 3, 1, 1), np.float32)
    bias[4:, 0], bias[2:, 1], bias[:, 2] = -np.inf, -np.inf, -np.inf  # row 0 sees 4 slots, row 1 2, row 2 none
    assert row_ends(bias).tolist() == [4, 2, 0]


def test_the_kernel_leaves_the_thread_count_it_was_given():
    """Numba's OpenMP pool, started by the first parallel call of a process, resets the caller's
    OpenMP thread count to all cores; a rank given 1 of 2 threads must keep 1 (in a fresh process:
    the reset happens once)."""
    import subprocess
    import sys
    code = """
import torch
from offloadgen.offload.cpu_attention import attend, bias_from_mask
from offloadgen.quant.kv import kv_quant
codec = kv_quant(4, 64, 2, 64)
k = codec.encode(torch.randn(5, 2, 128))
attend(torch.randn(2, 4, 1, 64), k, k, 5, bias_from_mask(torch.zeros(2, 1, 2, 5), 5), quant=codec)
attend(torch.randn(2, 2, 1, 64), torch.randn(5, 2, 2, 64), torch.randn(5, 2, 2, 64), 5, torch.zeros(5, 2, 1, 1), impl="numba")
print(torch.get_num_threads())
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "1"


def test_a_pass_works_out_its_row_ranges_once_per_bias(monkeypatch):
    """Every layer and micro-batch of a pass attends with the same bias: its rows' ranges are
    worked out on the first call only, and a new bias (the next pass) gets its own."""
    calls = []
    real = cpu_attention.row_ends
    monkeypatch.setattr(cpu_attention, "row_ends", lambda b: calls.append(1) or real(b))
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    mask = torch.zeros(2, 1, 2, 6)  # 2 query heads a KV head, folded into the rows (layers.grouped_mask)
    mask[1, ..., :3] = -torch.inf  # row 1 sees 3 slots: the ranges matter
    bias = cpu_attention.bias_from_mask(mask, 6)
    first = cpu_attention.attend(q, k, v, 6, bias, impl="numba")
    again = [cpu_attention.attend(q, k, v, 6, bias, impl="numba") for _ in range(3)]
    assert len(calls) == 1 and all(torch.equal(first, a) for a in again)
    other = mask.clone()
    other[0, ..., 4:] = -torch.inf
    changed = cpu_attention.attend(q, k, v, 6, cpu_attention.bias_from_mask(other, 6), impl="numba")
    assert len(calls) == 2 and not torch.equal(changed, first)


@pytest.mark.parametrize("faster", ["sdpa", cpu_attention.available_impls()[0]])
def test_impl_none_keeps_what_its_first_calls_timed_faster(monkeypatch, faster):
    """attend(impl=None) on a dense cache times the kernel (each of its cuts) and SDPA on a shape's
    first calls and then runs only the fastest: with a fake clock that charges the slower one 10x,
    every call after the trial must go to `faster`, and every call (trial ones too) must give the
    right answer."""
    kernel = cpu_attention.available_impls()[0]
    now, ran = [0.0], []

    def charged(name, real):
        def run(*args, **kwargs):
            ran.append(name)
            now[0] += 1.0 if name == faster else 10.0
            return real(*args, **kwargs)
        return run
    for name, attr in ((kernel, f"_attend_{kernel}"), ("sdpa", "_attend_sdpa")):
        monkeypatch.setattr(cpu_attention, attr, charged(name, getattr(cpu_attention, attr)))
    monkeypatch.setattr(cpu_attention, "clock", lambda: now[0])
    monkeypatch.setattr(cpu_attention, "_trials", {})
    c = dict(kind="gqa", batch=3, kv_heads=2, group=4, end=40, slots=44, pads=[0, 5, 17], head_dim=64,
             window=8, dtype="float16", seed=7)
    q, k, v, mask = make(c)
    scale, bias = c["head_dim"] ** -0.5, cpu_attention.bias_from_mask(mask, c["end"])
    ref, tol = reference(q, k, v, c["end"], mask, scale), tolerance(q.dtype)
    calls = 40
    for _ in range(calls):
        out = cpu_attention.attend(q, k, v, c["end"], bias, scale)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * v.double().abs().max().item())
    candidates = (cpu_attention.kernel_cuts(torch.get_num_threads()) if kernel == "numba" else [kernel]) + ["sdpa"]
    trial_calls = len(candidates) * (1 + 3)
    assert trial_calls < calls
    assert sorted(set(ran[:trial_calls])) == sorted({kernel, "sdpa"})
    assert ran[trial_calls:] == [faster] * (calls - trial_calls)


def test_quantized_caches_never_go_to_sdpa():
    """SDPA needs a dense cache: asked by name for a 4/8-bit one, it is refused."""
    from offloadgen.quant.kv import KVQuant
    codec = KVQuant(8, 64, 2, 64)
    k = codec.encode(torch.randn(6, 1, 128).half())
    q = torch.randn(1, 2, 1, 64).half()
    with pytest.raises(ValueError, match="dense caches"):
        cpu_attention.attend(q, k, k, 6, torch.zeros(6, 1, 1, 1), impl="sdpa", quant=codec)


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_out_takes_the_result_in_qs_dtype(quant_bits):
    """attend(out=buffer) (the offloaded cache's pinned output buffer) holds the same values as the
    returned tensor without it, and is what comes back; a buffer of another dtype is refused."""
    from offloadgen.quant.kv import kv_quant
    codec = kv_quant(quant_bits, 64, 2, 64)
    k, v = torch.randn(7, 3, 2, 64), torch.randn(7, 3, 2, 64)
    if codec is not None:
        k, v = codec.encode(k.flatten(-2)), codec.encode(v.flatten(-2))
    else:
        k, v = k.half(), v.half()
    q = torch.randn(3, 4, 1, 64).half()
    bias = cpu_attention.bias_from_mask(torch.zeros(3, 1, 2, 7), 7)  # 4 query heads over 2 KV heads
    plain = cpu_attention.attend(q, k, v, 7, bias, impl="numba", quant=codec)
    out = torch.full_like(q, float("nan"))
    got = cpu_attention.attend(q, k, v, 7, bias, impl="numba", quant=codec, out=out)
    assert got is out and torch.equal(out, plain)
    with pytest.raises(ValueError, match="dtype"):
        cpu_attention.attend(q, k, v, 7, bias, impl="numba", quant=codec, out=torch.empty(3, 4, 1, 64))


def test_a_bias_with_fewer_query_rows_than_the_kernel_reads_is_refused():
    """With 2 query heads a KV head the kernel reads 2 bias entries a row: a bias of 1 made it read
    past the array (a wrong, run-to-run different answer, found by CI on 2 threads)."""
    q, k = torch.randn(2, 4, 1, 8), torch.randn(6, 2, 2, 8)
    with pytest.raises(ValueError, match="2 query rows per KV head"):
        cpu_attention.attend(q, k, k, 6, cpu_attention.bias_from_mask(torch.zeros(2, 1, 1, 6), 6), impl="numba")
    good = cpu_attention.attend(q, k, k, 6, cpu_attention.bias_from_mask(torch.zeros(2, 1, 2, 6), 6), impl="numba")
    sdpa = cpu_attention.attend(q, k, k, 6, cpu_attention.bias_from_mask(torch.zeros(2, 1, 2, 6), 6), impl="sdpa")
    torch.testing.assert_close(good, sdpa, rtol=1e-5, atol=1e-5)


def test_an_end_past_the_cache_or_the_bias_is_refused():
    """The kernel reads `end` slots of the cache and of the bias: one past either (a row longer
    than the cache it was given) crashed the process with a segmentation fault."""
    q, k = torch.randn(2, 4, 1, 8), torch.randn(6, 2, 4, 8)
    bias = cpu_attention.bias_from_mask(torch.zeros(2, 1, 1, 7), 7)
    with pytest.raises(ValueError, match="cache's 6 slots and the bias's 7; got 7"):
        cpu_attention.attend(q, k, k, 7, bias, impl="numba")
    with pytest.raises(ValueError, match="got 0"):
        cpu_attention.attend(q, k, k, 0, bias, impl="numba")
    short = cpu_attention.bias_from_mask(torch.zeros(2, 1, 1, 5), 5)
    with pytest.raises(ValueError, match="the bias's 5; got 6"):
        cpu_attention.attend(q, k, k, 6, short, impl="numba")
    assert cpu_attention.attend(q, k, k, 6, cpu_attention.bias_from_mask(torch.zeros(2, 1, 1, 6), 6)).shape == q.shape


@pytest.mark.skipif("numba" not in cpu_attention.available_impls(), reason="the Numba kernel narrows its own output")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_kernel_narrows_its_result_as_pytorch_rounds(dtype):
    """The kernel writes float16 / bfloat16 results itself (no PyTorch conversion after the call):
    bit for bit what PyTorch's rounding of its float32 result gives, over values from subnormal to
    past float16's range."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 16, generator=g).to(dtype)
    k = torch.randn(9, 3, 4, 16, generator=g).to(dtype)
    magnitudes = torch.logspace(-9, 6, 16)  # per element of a head: float16 subnormals to overflow
    v = (torch.randn(9, 3, 4, 16, generator=g) * magnitudes).to(dtype)
    bias = cpu_attention.bias_from_mask(None, 9, batch=3)
    wide = cpu_attention._attend_numba(q, k, v, 9, bias, 0.25, out=torch.empty(q.shape))
    narrow = cpu_attention._attend_numba(q, k, v, 9, bias, 0.25, out=torch.empty(q.shape, dtype=dtype))
    expected = wide.to(dtype)
    assert torch.equal(narrow.view(torch.int16), expected.view(torch.int16))
    assert (dtype == torch.bfloat16) or expected.isinf().any()  # float16's overflow was reached


@pytest.mark.skipif("numba" not in cpu_attention.available_impls(), reason="cuts are the Numba kernel's")
def test_the_trial_keeps_the_cut_its_first_calls_timed_fastest(monkeypatch):
    """A 4-bit cache has no SDPA candidate, but its kernel's cuts are tried too: with a fake clock
    that charges every cut but one 10x, the calls after the trial run that cut, and every call
    gives the answer of the rule's cut."""
    from offloadgen.quant.kv import kv_quant
    cuts = cpu_attention.kernel_cuts(torch.get_num_threads())
    fast = cuts[-1]
    now, ran = [0.0], []
    real = cpu_attention._attend_numba

    def charged(*args, splits=None, **kwargs):
        ran.append(splits)
        now[0] += 1.0 if splits == cpu_attention._cut(fast, args[3], args[0].shape[0] * 2) else 10.0
        return real(*args, splits=splits, **kwargs)
    monkeypatch.setattr(cpu_attention, "_attend_numba", charged)
    monkeypatch.setattr(cpu_attention, "clock", lambda: now[0])
    monkeypatch.setattr(cpu_attention, "_trials", {})
    codec = kv_quant(4, 32, 2, 64)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 1, 64, generator=g)
    k, v = (codec.encode(torch.randn(20, 3, 128, generator=g)) for _ in range(2))
    bias = cpu_attention.bias_from_mask(None, 20, batch=3, queries=2)
    ref = real(q, k, v, 20, bias, 0.125, quant=codec)
    trial_calls = len(cuts) * (1 + 3)
    for _ in range(trial_calls + 5):
        torch.testing.assert_close(cpu_attention.attend(q, k, v, 20, bias, 0.125, quant=codec), ref, rtol=1e-5, atol=1e-5)
    assert len(set(ran[:trial_calls])) == len(cuts) > 1
    assert ran[trial_calls:] == [cpu_attention._cut(fast, 20, 6)] * 5
    assert fast in {c for c in cpu_attention.choices().values()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_put_rows_writes_what_indexed_assignment_writes(dtype):
    """A decode step's new slot of some rows, written by the Numba helper, lands where PyTorch's
    cache[slots, rows] = new[rows] puts it (fp16/bf16 caches, and a quantized cache's byte rows)."""
    g = torch.Generator().manual_seed(1)
    shape = (10, 4, 3, 8) if dtype != torch.uint8 else (10, 4, 40)
    make = (lambda s: torch.randint(0, 255, s, generator=g).to(dtype)) if dtype == torch.uint8 else \
        (lambda s: torch.randn(s, generator=g).to(dtype))  # noqa: E731
    cache, new = make(shape), make(shape[1:])
    slots, rows = torch.tensor([9, 0, 5]), torch.tensor([3, 0, 1])  # some rows, the spare last slot among them
    expected = cache.clone()
    expected[slots, rows] = new[rows]
    cpu_attention.put_rows(cache, slots, rows, new)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def test_put_rows_refuses_indices_outside_the_cache():
    cache, new = torch.zeros(4, 2, 8), torch.ones(2, 8)
    for slots, rows in (([4], [0]), ([0], [2]), ([-1], [0])):
        with pytest.raises(ValueError, match="must index the cache"):
            cpu_attention.put_rows(cache, torch.tensor(slots), torch.tensor(rows), new)
    assert not cache.any()


@pytest.mark.skipif("numba" not in cpu_attention.available_impls(), reason="the kernel's query and output dtypes")
def test_a_float64_query_and_a_strided_out_are_converted_around_the_kernel():
    """The kernel reads q and writes out as float16, bfloat16 or float32: a float64 query (which the
    PyTorch path took) must still be answered, in float64, into a float64 or strided `out` too."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float64)
    k, v = torch.randn(7, 2, 2, 16, generator=g), torch.randn(7, 2, 2, 16, generator=g)
    mask = torch.zeros(2, 1, 2, 7)
    mask[1, ..., :3] = -torch.inf
    bias, scale = cpu_attention.bias_from_mask(mask, 7), 0.25
    ref = reference(q, k, v, 7, mask, scale)
    got = cpu_attention.attend(q, k, v, 7, bias, scale, impl="numba")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    strided = torch.empty(2, 1, 4, 16, dtype=torch.float64).transpose(1, 2)  # q's shape, not contiguous
    assert cpu_attention.attend(q, k, v, 7, bias, scale, impl="numba", out=strided) is strided
    torch.testing.assert_close(strided, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu_attention.attend(q, k, v, 7, bias, scale), ref, rtol=1e-5, atol=1e-6)  # the trial's


@pytest.mark.skipif("numba" not in cpu_attention.available_impls(), reason="the kernel's buffers")
def test_two_threads_attending_one_shape_at_once_get_their_own_answers():
    """The cpu_side worker and the engine's thread (a part that also has a prompt chunk stays on the
    latter) can attend micro-batches of one shape at the same time: the kernel's kept buffers (its
    query, partial results and scores) must not be shared between them."""
    import threading
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(128, 4, 8, 64, generator=g), torch.randn(128, 4, 8, 64, generator=g)
    queries = [torch.randn(4, 8, 1, 64, generator=g) for _ in range(2)]
    bias = cpu_attention.bias_from_mask(None, 128, 4)
    alone = [cpu_attention.attend(q, k, v, 128, bias, impl="numba") for q in queries]
    buffers = {}

    def attend_many(n):
        buffers[n] = cpu_attention._workspace(2, 4, 128, 4, 8, 1, 64)
        return sum(not torch.equal(cpu_attention.attend(queries[n], k, v, 128, bias, impl="numba"), alone[n])
                   for _ in range(100))
    wrong = {}
    threads = [threading.Thread(target=lambda n=n: wrong.__setitem__(n, attend_many(n))) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not {id(a) for a in buffers[0]} & {id(a) for a in buffers[1]}
    assert wrong == {0: 0, 1: 0}


def test_query_heads_that_are_not_a_multiple_of_the_kv_heads_are_refused():
    """The kernel folds q [B, H, t, D] into [B, Hkv, H / Hkv * t, D] without a reshape: 3 query heads
    over 2 KV heads wrote past its query buffer (the process then aborted, "double free or
    corruption"). PyTorch's path raised a bare reshape error."""
    q, k = torch.randn(1, 3, 1, 16), torch.randn(5, 1, 2, 16)
    for impl in ["torch"] + [i for i in cpu_attention.available_impls() if i != "torch"]:  # torch first: no crash
        with pytest.raises(ValueError, match="query heads must be a multiple of the 2 KV heads, not 3"):
            cpu_attention.attend(q, k, k, 5, torch.zeros(5, 1, 1, 1), impl=impl)


@pytest.mark.parametrize("impl", ["numba2x8", "numba 2x", "numba 2 x8", "numba_fast"])
def test_a_misspelt_implementation_or_cut_is_refused(impl):
    q, k = torch.randn(1, 2, 1, 8), torch.randn(5, 1, 2, 8)
    with pytest.raises(ValueError, match="unknown CPU attention implementation"):
        cpu_attention.attend(q, k, k, 5, torch.zeros(5, 1, 1, 1), impl=impl)


@pytest.mark.parametrize("impl", cpu_attention.available_impls() + ["sdpa"])
def test_a_cache_or_bias_of_other_rows_or_head_size_than_q_is_refused(impl):
    """The kernel indexes the cache and the bias by q's rows and head size, unchecked: a larger q read
    past them (and PyTorch's paths broadcast one cache row over four query rows without a word)."""
    q, k, bias = torch.randn(4, 2, 1, 16), torch.randn(5, 4, 2, 16), torch.zeros(5, 4, 1, 1)
    with pytest.raises(ValueError, match=r"k must be \[slots, 4 rows \(q's\), 2, 16\], not \[5, 1, 2, 16\]"):
        cpu_attention.attend(q, k[:, :1], k, 5, bias, impl=impl)
    with pytest.raises(ValueError, match=r"v must be \[slots, 4 rows \(q's\), 2, 16\], not \[5, 4, 2, 8\]"):
        cpu_attention.attend(q, k, k[..., :8].contiguous(), 5, bias, impl=impl)
    with pytest.raises(ValueError, match="bias must have q's 4 rows, not 1"):
        cpu_attention.attend(q, k, k, 5, bias[:, :1], impl=impl)
    assert cpu_attention.attend(q, k, k, 5, bias, impl=impl).shape == q.shape


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_hidden_keys_of_any_mask_stay_unread_for_every_cut(seed):
    """Random masks, not only the families' (per KV head, per query, holes anywhere, visible keys
    whose weight underflows to 0), with every slot hidden from all of an item's queries and every
    slot past `end` set to NaN: every cut the trial may pick (kernel_cuts) and a few others match
    a float64 reference. The kernel reads dense caches 4 slots a pass, so holes fall across, inside
    and at the ends of its groups, and cuts split slots at other than multiples of 4."""
    import itertools
    import random
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    b, hkv, grp, t = rng.randint(1, 5), rng.randint(1, 3), rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])
    h, r, d, end = hkv * grp, grp * t, rng.choice([4, 8, 16, 64]), rng.randint(1, 23)
    mh, dtype = rng.choice([1, hkv]), rng.choice(list(DTYPES.values()))
    k = (torch.randn(end + rng.randint(0, 3), b, hkv, d, generator=g) * 2).to(dtype)
    v = torch.randn(k.shape, generator=g).to(dtype)
    q = (torch.randn(b, h, t, d, generator=g) * 2).to(dtype)
    bias = torch.randn(end, b, mh, r, generator=g) * rng.choice([0, 1, 50])
    bias[torch.rand(end, b, mh, r, generator=g) < rng.choice([0, 0.3])] = -300.0  # exp underflows to 0
    hidden = (torch.rand(end, b, mh, 1, generator=g) < rng.random()) | (torch.rand(end, b, mh, r, generator=g) < 0.1)
    for row, m, x in itertools.product(range(b), range(mh), range(r)):
        hidden[rng.randrange(end), row, m, x] = False  # every query sees a key
    bias[hidden] = float("-inf")
    scale = d ** -0.5
    scores = (q.double().reshape(b, hkv, r, d) * scale) @ k[:end].double().permute(1, 2, 3, 0)
    ref = ((scores + bias.double().permute(1, 2, 3, 0)).softmax(-1) @ v[:end].double().permute(1, 2, 0, 3))
    unread = hidden.all(-1)  # [end, b, mh]: hidden from every query of the item
    for s, row, head in itertools.product(range(end), range(b), range(hkv)):
        if unread[s, row, head if mh > 1 else 0]:
            k[s, row, head], v[s, row, head] = float("nan"), float("nan")
    k[end:], v[end:] = float("nan"), float("nan")
    cuts = {cpu_attention._cut(c, end, b * hkv) for n in (1, 2, 3, 8, 16) for c in cpu_attention.kernel_cuts(n)}
    cuts |= {(rng.randint(1, end + 2), rng.randint(1, b * hkv + 2)) for _ in range(2)}
    tol = tolerance(dtype)
    for cut in cuts:
        out = cpu_attention._attend_numba(q, k, v, end, bias, scale, splits=cut, out=torch.empty(q.shape))
        torch.testing.assert_close(out.double(), ref.reshape(b, h, t, d), rtol=tol,
                                   atol=tol * v[:end].double().nan_to_num().abs().max().item(), msg=f"cut {cut}")
