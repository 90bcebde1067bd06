"""Qwen2-MoE and Qwen3-MoE: LLaMA's attention with a sparse mixture-of-experts MLP.

Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, 60-64 experts with top-4 routing, plus a
shared expert that every token goes through, scaled by its own sigmoid gate. Qwen3-MoE
(Qwen3-30B-A3B, 235B-A22B): per-head q/k RMS norms, 128 small experts, top-8 renormalised
(norm_topk_prob). In both, layers listed in mlp_only_layers (or off the decoder_sparse_step) keep a
dense SwiGLU MLP.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..errors import OffloadgenError
# embed, head, kv_heads (and prepare) are LLaMA's: re-exported as this family's own
from .llama import (  # noqa: F401
    LlamaConfig, attention, block_tensors as llama_tensors,
    config_from_hf as llama_config, embed, head, kv_heads, prepare)
from .layers import StepInputs, rms_norm
from .moe import Routed, expert_tensors, route, run_experts, swiglu

FAMILY = "qwen_moe"
MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


@dataclass
class QwenMoeConfig(LlamaConfig):
    n_experts: int = 128
    top_k: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert; 0: none
    qk_norm: bool = False  # Qwen3
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP of intermediate_size
    family: str = field(default=FAMILY, init=False)

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and self.n_experts > 0


_QWEN3 = dict(vocab_size=151936, max_position=40960, rope_theta=1e6, n_kv_heads=4, head_dim=128, norm_eps=1e-6,
              n_experts=128, top_k=8, norm_topk_prob=True, qk_norm=True, model_type="qwen3_moe",
              bos_token_id=151643, eos_token_id=151645, dtype="bfloat16")
PRESETS = {
    "qwen3-30b-a3b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          n_layers=48, n_heads=32),
    "qwen3-235b-a22b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            n_layers=94, n_heads=64),
    "qwen1.5-moe-a2.7b": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                              shared_intermediate_size=5632, n_layers=24, n_heads=16, n_kv_heads=16,
                              vocab_size=151936, max_position=8192, rope_theta=1e6, norm_eps=1e-6, n_experts=60,
                              top_k=4, qkv_bias=True, model_type="qwen2_moe", bos_token_id=151643,
                              eos_token_id=151643, dtype="bfloat16"),
}


def config_from_hf(d: dict) -> QwenMoeConfig:
    qwen2 = d["model_type"] == "qwen2_moe"
    if d.get("use_sliding_window"):
        raise OffloadgenError(f"{d['model_type']} with use_sliding_window is not supported")
    base = llama_config({**d, "sliding_window": None})
    kw = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    n_experts = d.get("num_experts", d.get("num_local_experts"))
    step = d.get("decoder_sparse_step") or 1
    dense = {i for i in range(base.n_layers) if (i + 1) % step} | set(d.get("mlp_only_layers") or ())
    kw.update(qkv_bias=d.get("qkv_bias", True) if qwen2 else d.get("attention_bias", False),
              o_bias=False if qwen2 else d.get("attention_bias", False))
    return QwenMoeConfig(**kw, n_experts=n_experts, top_k=d["num_experts_per_tok"],
                         moe_intermediate_size=d["moe_intermediate_size"],
                         norm_topk_prob=d.get("norm_topk_prob", False),
                         shared_intermediate_size=d.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
                         qk_norm=not qwen2, dense_layers=tuple(sorted(dense)))


def block_tensors(cfg: QwenMoeConfig, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    t = llama_tensors(cfg, block)
    if not isinstance(block, int):
        return t
    p, h = f"model.layers.{block}.", cfg.hidden_size
    if cfg.qk_norm:
        t |= {"q_norm": (p + "self_attn.q_norm.weight", (cfg.head_dim,)),
              "k_norm": (p + "self_attn.k_norm.weight", (cfg.head_dim,))}
    if not cfg.is_sparse(block):
        return t
    for dense in ("gate", "up", "down"):
        del t[dense]
    t["router"] = (p + "mlp.gate.weight", (cfg.n_experts, h))
    if cfg.shared_intermediate_size:  # before the experts: a layer's trunk is the front of its packed block
        s = cfg.shared_intermediate_size
        t |= {"shared.gate": (p + "mlp.shared_expert.gate_proj.weight", (s, h)),
              "shared.up": (p + "mlp.shared_expert.up_proj.weight", (s, h)),
              "shared.down": (p + "mlp.shared_expert.down_proj.weight", (h, s)),
              "shared_gate": (p + "mlp.shared_expert_gate.weight", (1, h))}
    t |= expert_tensors(p + "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"), cfg.n_experts, h,
                        cfg.moe_intermediate_size)
    return t


def pre_experts(cfg: QwenMoeConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> Routed:
    """Attention, the MLP norm and the router of a sparse layer: everything but its experts."""
    x = x + attention(cfg, w, rms_norm(x, w["attn_norm"], cfg.norm_eps), step, kv)
    h = rms_norm(x, w["mlp_norm"], cfg.norm_eps).view(-1, cfg.hidden_size)
    weights, experts = route(h, w["router"], cfg.top_k, cfg.norm_topk_prob)
    return Routed(x, h, weights, experts)


def post_experts(cfg: QwenMoeConfig, w: dict, r: Routed) -> torch.Tensor:
    """The routed experts (w holds at least those), the gated shared expert where there is one,
    and the residual."""
    out = run_experts(w, r.h, r.weights.to(r.h.dtype), r.experts)  # Qwen casts the routing weights first
    if "shared_gate" in w:
        shared = swiglu(r.h, w["shared.gate"], w["shared.up"], w["shared.down"])
        out = out + torch.sigmoid(r.h @ w["shared_gate"].t()) * shared
    return r.x + out.view_as(r.x)


def layer(cfg: QwenMoeConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    if "router" in w:
        return post_experts(cfg, w, pre_experts(cfg, w, x, step, kv))
    x = x + attention(cfg, w, rms_norm(x, w["attn_norm"], cfg.norm_eps), step, kv)
    h = rms_norm(x, w["mlp_norm"], cfg.norm_eps).view(-1, cfg.hidden_size)
    return x + swiglu(h, w["gate"], w["up"], w["down"]).view_as(x)
