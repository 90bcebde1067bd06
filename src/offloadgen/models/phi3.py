"""Phi-3 (Phi3ForCausalLM): Phi-3 mini/small-context/medium, Phi-3.5-mini, Phi-4-mini.

LLaMA's layer with q, k and v fused into one qkv_proj, gate and up fused into gate_up_proj, and
for the long-context checkpoints LongRoPE ("su"/"longrope"): each rotary frequency is divided by
its own factor, from short_factor while the sequence is within the original pretraining length and
long_factor beyond it, and cos/sin are scaled by sqrt(1 + ln(s) / ln(original length)).
Phi-4-mini rotates only part of each head (partial_rotary_factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..errors import OffloadgenError
# embed, head, kv_heads (and prepare) are LLaMA's: re-exported as this family's own
from .llama import (  # noqa: F401
    LlamaConfig, block_tensors as llama_tensors,
    config_from_hf as llama_config, embed, head, kv_heads)
from .layers import StepInputs, apply_rope, attention_mask, grouped_mask, linear, rms_norm, rope_cos_sin

FAMILY = "phi3"
MODEL_TYPES = ("phi3",)


@dataclass
class Phi3Config(LlamaConfig):
    original_max_position: int | None = None  # LongRoPE's pretraining length
    partial_rotary_factor: float = 1.0
    family: str = field(default=FAMILY, init=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


_PHI3 = dict(vocab_size=32064, max_position=4096, sliding_window=2047, bos_token_id=1, eos_token_id=32000,
             pad_token_id=32000, model_type="phi3", dtype="bfloat16")
PRESETS = {
    "phi-3-mini": dict(_PHI3, hidden_size=3072, intermediate_size=8192, n_layers=32, n_heads=32, n_kv_heads=32),
    "phi-3-medium": dict(_PHI3, hidden_size=5120, intermediate_size=17920, n_layers=40, n_heads=40, n_kv_heads=10),
}


def config_from_hf(d: dict) -> Phi3Config:
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("su", "yarn", "longrope"):  # transformers reads all three as LongRoPE for Phi-3
        rope_type = "longrope"
    elif rope_type != "default":
        raise OffloadgenError(f"Phi-3 rope scaling {rope_type!r} is not supported (default, longrope)")
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    base = llama_config({**d, "rope_parameters": {"rope_theta": rope.get("rope_theta", d.get("rope_theta"))},
                                 "rope_scaling": None})
    kw = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    kw["rope_scaling"] = {**rope, "rope_type": rope_type} if rope_type == "longrope" else None
    # transformers prefers the top-level original_max_position_embeddings that Phi-3 configs carry
    original = d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    return Phi3Config(**kw, original_max_position=original, partial_rotary_factor=float(partial or 1.0))


def block_tensors(cfg: Phi3Config, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    t = llama_tensors(cfg, block)
    if not isinstance(block, int):
        return t
    p, h, ffn = f"model.layers.{block}.", cfg.hidden_size, cfg.intermediate_size
    qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    return {"attn_norm": t["attn_norm"], "qkv": (p + "self_attn.qkv_proj.weight", (qkv_out, h)), "o": t["o"],
            "mlp_norm": t["mlp_norm"], "gate_up": (p + "mlp.gate_up_proj.weight", (2 * ffn, h)),
            "down": t["down"]}




def inv_freq(cfg: Phi3Config, seq_len: int) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies for a pass whose sequence reaches seq_len, and the cos/sin scale.

    transformers picks long or short factors from the batch's largest position + 1 in each forward
    call; in a left-padded batch the longest row has no padding, so that is the pass's last slot
    + 1, whatever the micro-batch. Keys already cached keep the rotation they were made with."""
    dim = cfg.rotary_dim
    base = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    scaling = cfg.rope_scaling
    if scaling is None:
        return 1.0 / base, 1.0
    original = cfg.original_max_position or cfg.max_position
    factors = scaling["long_factor"] if seq_len > original else scaling["short_factor"]
    factor = scaling.get("factor") or cfg.max_position / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base), attention


def recompute_cache_at(cfg: Phi3Config) -> int | None:
    """The slot whose pass first uses LongRoPE's long factors. Keys cached before it were rotated
    with the short ones, so transformers drops the cache there and runs the whole sequence again
    (Phi3ForCausalLM.prepare_inputs_for_generation); the engine does the same at this slot."""
    return (cfg.original_max_position or cfg.max_position) if cfg.rope_scaling else None


def prepare(cfg: Phi3Config, step: StepInputs, dtype: torch.dtype) -> None:
    lens = step.seq_lens or [step.end]
    freq, scale = inv_freq(cfg, lens[0])
    step.extras["cos_sin"] = rope_cos_sin(step.positions, freq, dtype, scale)
    original = cfg.original_max_position or cfg.max_position
    if cfg.rope_scaling is not None and len({n > original for n in lens}) > 1:
        # Rows at their own lengths (continuous batching): each row's factors by its own length.
        other_freq, other_scale = inv_freq(cfg, original if lens[0] > original else original + 1)
        other = rope_cos_sin(step.positions, other_freq, dtype, other_scale)
        flip = torch.tensor([(n > original) != (lens[0] > original) for n in lens], device=step.positions.device)
        flip = flip[:, None, None, None]
        step.extras["cos_sin"] = tuple(torch.where(flip, b, a) for a, b in zip(step.extras["cos_sin"], other))
    step.mask = grouped_mask(attention_mask(step, dtype, cfg.sliding_window), cfg.n_heads // cfg.n_kv_heads)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)


def layer(cfg: Phi3Config, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    b, t, _ = x.shape
    d, n_q, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    qkv = linear(rms_norm(x, w["attn_norm"], cfg.norm_eps), w["qkv"])
    q, k, v = (s.view(b, t, -1, d).transpose(1, 2) for s in qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1))
    cos, sin = step.extras["cos_sin"]
    q, k = _rope(q, cos, sin, cfg.rotary_dim), _rope(k, cos, sin, cfg.rotary_dim)
    a = kv.attend(q, k, v, step, step.mask)
    x = x + linear(a.transpose(1, 2).reshape(b, t, -1), w["o"])
    gate, up = linear(rms_norm(x, w["mlp_norm"], cfg.norm_eps), w["gate_up"]).chunk(2, dim=-1)
    return x + linear(up * F.silu(gate), w["down"])
