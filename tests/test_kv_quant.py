"""The 4/8-bit KV cache (quant/kv.py): the codec, CPU attention reading it in place, attention
within the quantization's error bound, the Triton decoder, and the engine's three cache paths
(device, offloaded with CPU attention, offloaded with GPU attention) agreeing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.errors import OffloadgenError
from offloadgen.models import preset
from offloadgen.offload import ResidentWeights, cpu_attention
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.offload.placement import kv_bytes_per_token
from offloadgen.quant.kv import KVQuant
from offloadgen.sampling import SamplingParams

from test_cpu_attention import decode_mask
from test_parity import ragged_batch

CPU = torch.device("cpu")


def half_steps(codec, rows):
    """Half a quantization step for every value of the stored rows [..., row bytes]."""
    c, g = codec.codes_bytes, codec.groups
    scale = rows[..., c:c + 2 * g].view(torch.float16).double()
    return scale.repeat_interleave(codec.group_size, -1)[..., :codec.features] / 2


@st.composite
def codecs(draw):
    head_dim = draw(st.sampled_from([8, 16, 64, 128]))
    kv_heads = draw(st.integers(1, 4))
    groups = [g for g in (4, 8, 16, 32, 64, 128, 256) if head_dim % g == 0 or g % head_dim == 0]
    return KVQuant(draw(st.sampled_from([4, 8])), draw(st.sampled_from(groups)), kv_heads, head_dim)


@settings(max_examples=60, deadline=None)
@given(codec=codecs(), tokens=st.integers(1, 6), scale=st.floats(1e-3, 50.0), seed=st.integers(0, 2**16))
def test_round_trip_within_half_a_step(codec, tokens, scale, seed):
    x = torch.randn(tokens, 3, codec.features, generator=torch.Generator().manual_seed(seed)) * scale
    rows = codec.encode(x)
    assert rows.dtype == torch.uint8 and rows.shape == (tokens, 3, codec.row_bytes)
    back = codec.decode(rows, torch.float64)
    assert ((back - x.double()).abs() <= half_steps(codec, rows) * (1 + 1e-3) + 1e-6 * x.abs().double()).all()


def test_row_sizes_and_refused_groups():
    assert KVQuant(8, 64, 56, 128).row_bytes == 56 * 128 + 4 * 56 * 128 // 64
    assert KVQuant(4, 64, 56, 128).row_bytes == 56 * 64 + 4 * 56 * 128 // 64
    assert KVQuant(4, 128, 3, 64).row_bytes == 2 * 64 + 4 * 2  # SmolLM2: 3 heads of 64 in 2 groups, the last padded
    with pytest.raises(OffloadgenError, match="groups"):
        KVQuant(4, 48, 2, 64)  # neither divides the head nor is whole heads
    with pytest.raises(OffloadgenError, match="4 or 8"):
        KVQuant(3, 64, 2, 64)


def test_the_planner_counts_the_smaller_cache():
    cfg = preset("opt-30b")
    fp16 = kv_bytes_per_token(cfg, 2)
    assert fp16 == 2 * cfg.n_layers * cfg.hidden_size * 2
    assert kv_bytes_per_token(cfg, 2, 8, 64) == pytest.approx(fp16 / 2 * (1 + 4 / 64))
    assert kv_bytes_per_token(cfg, 2, 4, 64) == pytest.approx(fp16 / 4 * (1 + 8 / 64))


@st.composite
def attention_cases(draw):
    codec = draw(codecs())
    kind = draw(st.sampled_from(["plain", "gqa", "sliding", "alibi"]))
    group = draw(st.integers(2, 3)) if kind in ("gqa", "sliding") else 1
    batch, end = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    pads = [draw(st.integers(0, end - 1)) for _ in range(batch)]
    return dict(codec=codec, kind=kind, group=group, batch=batch, end=end, slots=end + draw(st.integers(0, 3)),
                pads=pads, window=draw(st.integers(1, 10)), seed=draw(st.integers(0, 2**16)))


def make(c):
    codec, g = c["codec"], torch.Generator().manual_seed(c["seed"])
    heads = codec.kv_heads * c["group"]
    k = torch.randn(c["slots"], c["batch"], codec.features, generator=g) * 2
    v = torch.randn(c["slots"], c["batch"], codec.features, generator=g)
    q = torch.randn(c["batch"], heads, 1, codec.head_dim, generator=g)
    mask = decode_mask(c["kind"], c["pads"], c["end"], heads, c["group"], c["window"])
    return q, k, v, mask


def attention64(q, k, v, end, mask, codec):
    """float64 attention over slots [:end] of k, v [slots, B, kv_heads * head_dim]."""
    b, h, _, d = q.shape
    keys = k[:end].double().unflatten(-1, (codec.kv_heads, d)).permute(1, 2, 0, 3)
    values = v[:end].double().unflatten(-1, (codec.kv_heads, d)).permute(1, 2, 0, 3)
    scores = q.double().reshape(b, codec.kv_heads, -1, d) @ keys.transpose(-1, -2) * d ** -0.5
    p = (scores + mask[..., :end].double()).softmax(-1)
    return (p @ values).reshape(b, h, 1, d), p


@pytest.mark.parametrize("impl", cpu_attention.available_impls())
@settings(max_examples=60, deadline=None)
@given(c=attention_cases())
def test_cpu_attention_reads_the_quantized_cache(impl, c):
    """Against float64 attention over the dequantized cache: only float32 rounding may differ."""
    codec = c["codec"]
    q, k, v, mask = make(c)
    kq, vq = codec.encode(k), codec.encode(v)
    out = cpu_attention.attend(q, kq, vq, c["end"], cpu_attention.bias_from_mask(mask, c["end"]), impl=impl,
                               quant=codec)
    ref, _ = attention64(q, codec.decode(kq, torch.float64), codec.decode(vq, torch.float64), c["end"], mask, codec)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(c=attention_cases())
def test_quantized_attention_within_the_error_bound(c):
    """Keys off by at most half a step move each score by at most eps = scale * sum |q| dk, so each
    softmax weight by a factor within exp(+-2 eps); values are off by at most dv. Hence
    |out_q - out| <= (exp(2 eps) - 1) max |v_q| + max dv, per output element."""
    codec = c["codec"]
    q, k, v, mask = make(c)
    end, d = c["end"], codec.head_dim
    kq, vq = codec.encode(k), codec.encode(v)
    out = cpu_attention.attend(q, kq, vq, end, cpu_attention.bias_from_mask(mask, end), quant=codec).double()
    exact, _ = attention64(q, k, v, end, mask, codec)
    b, h = q.shape[:2]
    dk = half_steps(codec, kq[:end]).unflatten(-1, (codec.kv_heads, d)).permute(1, 2, 0, 3)  # [B, Hkv, S, D]
    eps = (q.double().abs().reshape(b, codec.kv_heads, -1, d) @ dk.transpose(-1, -2)).amax(-1) * d ** -0.5
    dv = half_steps(codec, vq[:end]).unflatten(-1, (codec.kv_heads, d)).amax(0)  # [B, Hkv, D]
    v_max = codec.decode(vq[:end], torch.float64).abs().unflatten(-1, (codec.kv_heads, d)).amax(0)
    bound = (torch.expm1(2 * eps)[..., None] * v_max[:, :, None] + dv[:, :, None]).reshape(b, h, 1, d)
    assert ((out - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all()


@settings(max_examples=40, deadline=None)
@given(c=attention_cases(), slot_splits=st.integers(1, 50), item_splits=st.integers(1, 13))
def test_every_split_of_the_work_reads_the_quantized_cache_alike(c, slot_splits, item_splits):
    """As for the dense cache (test_cpu_attention): a thread's range of (row, head) items may start
    mid-row, where the quantized reader finds its head's scales by table; force every split."""
    codec = c["codec"]
    q, k, v, mask = make(c)
    scale = q.shape[-1] ** -0.5
    kq, vq, bias = codec.encode(k), codec.encode(v), cpu_attention.bias_from_mask(mask, c["end"])
    one = cpu_attention._attend_numba(q, kq, vq, c["end"], bias, scale, splits=(1, 1), quant=codec, out=torch.empty(q.shape))
    split = cpu_attention._attend_numba(q, kq, vq, c["end"], bias, scale, splits=(slot_splits, item_splits), quant=codec,
                                        out=torch.empty(q.shape))
    # A slot range of fewer than 4 slots reads one key at a time, whose sum over pieces rounds in
    # another order than a 4-slot group's (6e-5 relative seen); a head given another head's scales
    # would be off by a quantization step, 1e-2 or more.
    torch.testing.assert_close(split, one, rtol=1e-4, atol=1e-5)
    ref, _ = attention64(q, codec.decode(kq, torch.float64), codec.decode(vq, torch.float64), c["end"], mask, codec)
    torch.testing.assert_close(split.double().reshape(ref.shape), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_triton_decoder_matches_pytorch():
    """The GPU's decoder, run by Triton's interpreter on the CPU (where Triton is installed)."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("kv_quant_triton_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all equal" in done.stdout


def run(path, micro_batch=2, new_tokens=10, **kw):
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=11)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32,
                    micro_batch, **kw)
    return engine.generate(ids, mask, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), set(), 0), engine


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling", "mistral-sliding-window", "bloom"])
@pytest.mark.parametrize("bits", [8, 4])
def test_device_and_offloaded_quantized_caches_agree(tiny, variant, bits):
    """The same quantized keys and values, read by SDPA after the GPU path's dequantization or by
    the CPU kernel in place, give the same tokens; and they are quantized (not the float cache)."""
    _, path = tiny(variant)
    plain, _ = run(path, new_tokens=4)
    device, engine = run(path, new_tokens=4, kv_quant=(bits, 16))
    assert engine.new_cache(4, 8).k[0].dtype == torch.uint8
    for attention in ("cpu", "gpu"):
        out, engine = run(path, new_tokens=4,
                          kv_offload=KVOffload(attention=attention, quant_bits=bits, quant_group_size=16))
        assert engine.offloaded_cache.k[0][0].dtype == torch.uint8
        assert out.tokens == device.tokens
        # Measured 4e-7 apart (float32 rounding of two attentions), now and then 5e-5, when a new
        # value lands on the other side of a rounding boundary and its code moves a whole step;
        # quantizing itself moves these logits by 1e-3 or more.
        torch.testing.assert_close(out.last_logits, device.last_logits, rtol=2e-4, atol=2e-4)
    assert (device.last_logits - plain.last_logits).abs().max() > 5e-4


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, head_dim", [(64, 128), (128, 64), (32, 64)])
@pytest.mark.parametrize("splits", [(1, 1), (2, 3), (5, 1)])
def test_hidden_slots_of_a_quantized_cache_are_never_read(bits, group_size, head_dim, splits):
    """A hidden key's packed row may hold anything: all bytes 0xFF make its float16 scales and
    minimums NaN. Pieces of 64 are read 4 slots a pass (the group's products together), so the
    pads cover whole groups of 4, parts of groups and none; other piece sizes go key by key."""
    codec = KVQuant(bits, group_size, 2, head_dim)
    pads, end = [0, 5, 9, 4, 8], 19
    c = dict(codec=codec, kind="plain", group=1, batch=len(pads), end=end, slots=end, pads=pads, window=1, seed=5)
    q, k, v, mask = make(c)
    kq, vq = codec.encode(k), codec.encode(v)
    ref, _ = attention64(q, codec.decode(kq, torch.float64), codec.decode(vq, torch.float64), end, mask, codec)
    for row, pad in enumerate(pads):
        kq[:pad, row], vq[:pad, row] = 0xFF, 0xFF
    bias = cpu_attention.bias_from_mask(mask, end)
    out = cpu_attention._attend_numba(q, kq, vq, end, bias, head_dim ** -0.5, splits=splits, quant=codec,
                                      out=torch.empty(q.shape))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    kq[end - 1, 0, 0] ^= 0xFF  # a visible slot changed moves the result: the check is not blind
    moved = cpu_attention._attend_numba(q, kq, vq, end, bias, head_dim ** -0.5, splits=splits, quant=codec,
                                        out=torch.empty(q.shape))
    assert not torch.allclose(moved, out)
