"""Mixtral: LLaMA's attention with a sparse mixture-of-experts MLP (8 experts, 2 per token).

The router's top-2 probabilities are renormalised to sum to 1. An MoE layer is one block holding
the attention, the router and every expert; expert tensors are named `experts.{e}.*` (moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# embed, head, kv_heads (and prepare) are LLaMA's: re-exported as this family's own
from .llama import (  # noqa: F401
    LlamaConfig, attention, block_tensors as llama_tensors,
    config_from_hf as llama_config, embed, head, kv_heads, prepare)
from .layers import StepInputs, rms_norm
from .moe import Routed, expert_tensors, route, run_experts

FAMILY = "mixtral"
MODEL_TYPES = ("mixtral",)


@dataclass
class MixtralConfig(LlamaConfig):
    n_experts: int = 8
    top_k: int = 2
    family: str = field(default=FAMILY, init=False)


_MIXTRAL = dict(vocab_size=32000, max_position=32768, rope_theta=1e6, n_kv_heads=8, model_type="mixtral",
                dtype="bfloat16")
PRESETS = {
    "mixtral-8x7b": dict(_MIXTRAL, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32),
    "mixtral-8x22b": dict(_MIXTRAL, hidden_size=6144, intermediate_size=16384, n_layers=56, n_heads=48,
                          vocab_size=32768, max_position=65536),
}


def config_from_hf(d: dict) -> MixtralConfig:
    base = llama_config(d)
    kw = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    return MixtralConfig(**kw, n_experts=d["num_local_experts"], top_k=d.get("num_experts_per_tok", 2))


def block_tensors(cfg: MixtralConfig, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    t = llama_tensors(cfg, block)
    if not isinstance(block, int):
        return t
    for dense in ("gate", "up", "down"):
        del t[dense]
    p = f"model.layers.{block}.block_sparse_moe."
    t["router"] = (p + "gate.weight", (cfg.n_experts, cfg.hidden_size))
    return t | expert_tensors(p + "experts.{e}.", ("w1", "w3", "w2"), cfg.n_experts, cfg.hidden_size,
                              cfg.intermediate_size)


def pre_experts(cfg: MixtralConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> Routed:
    """Attention, the MLP norm and the router: everything of the layer but its experts."""
    x = x + attention(cfg, w, rms_norm(x, w["attn_norm"], cfg.norm_eps), step, kv)
    h = rms_norm(x, w["mlp_norm"], cfg.norm_eps).view(-1, cfg.hidden_size)
    weights, experts = route(h, w["router"], cfg.top_k, normalize=True)
    return Routed(x, h, weights, experts)


def post_experts(cfg: MixtralConfig, w: dict, r: Routed) -> torch.Tensor:
    """The routed experts (w holds at least those) and the residual."""
    return r.x + run_experts(w, r.h, r.weights, r.experts).view_as(r.x)


def layer(cfg: MixtralConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    return post_experts(cfg, w, pre_experts(cfg, w, x, step, kv))
