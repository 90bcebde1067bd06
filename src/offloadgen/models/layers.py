"""Layer math shared by the model families: norms, rotary embeddings, attention over a KV cache.

Every function takes plain tensors; no nn.Module holds weights, because weights arrive per layer
from wherever the offload runtime keeps them.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The attention kernels a GPU may use. PyTorch picks cuDNN's attention first on Hopper when a mask
# is given, and cuDNN builds an execution plan on the CPU for every new shape: with the key length
# growing by one each decode pass, every pass built one (session 15's native profile of a server on
# 4 H100s: 22% and 18% of ranks 0's and 1's serving loops in cudnnBackendFinalize, of 25% and 20%
# in attention; benchmarks/sdpa_backends.py times both). Flash and memory-efficient attention
# launch at once for any shape. The switch is turned off around our own call only (1.5-3 us with
# its lock; torch's sdpa_kernel context costs 40 us, 2 ms a pass of 48 layers).
# OFFLOADGEN_CUDNN_ATTENTION=1 gives PyTorch its own choice back (an A/B switch for benchmarks).
CUDNN_ATTENTION = os.environ.get("OFFLOADGEN_CUDNN_ATTENTION") == "1"
# The switch is one for the whole process, and several threads may be in sdpa at once (two
# engines run from threads of one program; our own CPU-side lanes attend on the CPU only): the
# first call in turns it off, the last one out turns it back on, and only if it was on (a user's
# own False stays).
_cudnn_lock = threading.Lock()
_cudnn_calls = 0  # our GPU attention calls under way
_cudnn_turned_off = False  # whether those calls turned the switch off (and so turn it back on)


def _cudnn_out() -> None:
    global _cudnn_calls, _cudnn_turned_off
    with _cudnn_lock:
        if _cudnn_calls == 0:
            _cudnn_turned_off = torch.backends.cuda.cudnn_sdp_enabled()
            if _cudnn_turned_off:
                torch.backends.cuda.enable_cudnn_sdp(False)
        _cudnn_calls += 1


def _cudnn_back() -> None:
    global _cudnn_calls, _cudnn_turned_off
    with _cudnn_lock:
        _cudnn_calls -= 1
        if _cudnn_calls == 0 and _cudnn_turned_off:
            torch.backends.cuda.enable_cudnn_sdp(True)
            _cudnn_turned_off = False


@dataclass
class StepInputs:
    """What every layer of one forward pass over one micro-batch needs besides its weights.

    The KV cache has one slot per step of the padded batch: slot j of every row holds the token fed
    at step j, so all rows write the same slots and left padding is expressed by `key_valid`.

    With `write_slots` (continuous batching) the rows of a one-token pass sit at different
    lengths: row r writes its token at slot write_slots[r] and attends over its own valid keys;
    `start` is then the largest slot a real row writes, so keys [:end] cover every row. A row with
    nothing to decode is parked: it writes a slot beyond `end` (the cache's spare last slot) and
    has no valid key; attention_mask lets it see slot 0 so that softmax stays finite.
    """

    start: int  # first cache slot written by this pass
    positions: torch.Tensor  # [B, t] position of each new token within its own sequence
    key_valid: torch.Tensor  # [B, start + t] bool: slot holds a real (non-padding) token
    mask: torch.Tensor | None = None  # [B, 1 or H, t, start + t] additive, built by the family
    extras: dict = field(default_factory=dict)  # family-specific per-pass tensors (rope, alibi)
    write_slots: torch.Tensor | None = None  # [B] long, t == 1: each row's own slot (None: start..end)
    # Each row's sequence length this pass is for, where it is not `end`: rows at their own lengths,
    # or a prompt prefilled in chunks (its whole length). Phi-3 LongRoPE picks its factors by it.
    seq_lens: list[int] | None = None

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def end(self) -> int:
        return self.start + self.length


class OneKVHeadPerHead:
    """Config mixin of families without grouped-query attention (OPT, BLOOM): every query head has
    its own key/value head, and heads split the hidden size evenly."""

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


def attention_mask(step: StepInputs, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, t, S]: causal, padding keys hidden, optional sliding window.

    A query always sees its own slot, so rows of padding never become fully masked (which would
    make softmax produce NaN); real tokens never see padding, so those rows cannot leak into them.
    """
    device = step.positions.device
    q_slots = query_slots(step)[:, :, None]  # [B or 1, t, 1]
    k_slots = torch.arange(step.end, device=device)[None, None, :]
    allowed = (k_slots <= q_slots) & step.key_valid[:, None, :]
    if sliding_window is not None:
        allowed &= k_slots > q_slots - sliding_window
    allowed |= k_slots == q_slots
    if step.write_slots is not None:  # a parked row sees no key at all: give it slot 0
        allowed[..., 0] |= ~allowed.any(-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask[:, None]


def query_slots(step: StepInputs) -> torch.Tensor:
    """Cache slot of each new token: [B, 1] per row with write_slots, else [1, t] shared by all rows."""
    if step.write_slots is not None:
        return step.write_slots[:, None]
    return torch.arange(step.start, step.end, device=step.positions.device)[None, :]


def grouped_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat a [B, 1, t, S] mask for `group` query heads folded into the query axis."""
    if group == 1:
        return mask
    b, one, t, s = mask.shape
    return mask[:, :, None].expand(b, one, group, t, s).reshape(b, one, group * t, s)


def sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
         scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, H, t, D] over keys, values [B, Hkv, S, D] (any strides, any device).

    Grouped-query attention folds the H/Hkv query heads that share a KV head into the query axis,
    so the cache is never repeated in memory. `mask` must be grouped the same way (grouped_mask).
    """
    b, h, t, d = q.shape
    h_kv = keys.shape[1]
    q = q.reshape(b, h_kv, (h // h_kv) * t, d)
    if q.is_cuda and not CUDNN_ATTENTION:
        _cudnn_out()
        try:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        finally:
            _cudnn_back()
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
           cache_v: torch.Tensor, step: StepInputs, mask: torch.Tensor,
           scale: float | None = None) -> torch.Tensor:
    """Write k, v into the cache at this pass's slots, then attend q over every slot so far.

    q [B, H, t, D]; k, v [B, Hkv, t, D]; cache [B, Hkv, S_max, D].
    """
    if step.write_slots is None:
        cache_k[:, :, step.start:step.end] = k
        cache_v[:, :, step.start:step.end] = v
    else:  # each row at its own slot
        rows = torch.arange(k.shape[0], device=k.device)
        cache_k[rows, :, step.write_slots] = k[:, :, 0]
        cache_v[rows, :, step.write_slots] = v[:, :, 0]
    return sdpa(q, cache_k[:, :, :step.end], cache_v[:, :, :step.end], mask, scale)


class DeviceKV:
    """One layer's KV cache for one micro-batch, held on the compute device."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def attend(self, q, k, v, step: StepInputs, mask, scale=None) -> torch.Tensor:
        return attend(q, k, v, self.k, self.v, step, mask, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 as transformers does, so half-precision runs keep the same rounding.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, 1, t, D] for the given positions (float32 math, then cast)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling).to(dtype)[:, None]
    sin = (emb.sin() * attention_scaling).to(dtype)[:, None]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), with BLOOM's handling of head counts that are not 2^k."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(n_extra)]
    return torch.tensor(slopes, dtype=torch.float32)
