"""Mixture-of-experts MLP shared by the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every expert for every token; each token goes through its top-k experts, and
their outputs are summed, weighted by the router's probabilities. Only the experts that received
at least one token run. Each expert's tensors are named apart in the block (`experts.{e}.gate`,
`experts.{e}.up`, `experts.{e}.down`) so that a weight source can fetch experts one by one: with
few tokens in a pass (decoding at small batches) most experts receive none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import linear

EXPERT_PARTS = ("gate", "up", "down")


def expert_key(e: int, part: str) -> str:
    return f"experts.{e}.{part}"


def experts_of(local_name: str) -> int | None:
    """The expert a block tensor belongs to, or None for the rest of the layer (attention, router)."""
    if not local_name.startswith("experts."):
        return None
    return int(local_name.split(".", 2)[1])


def is_expert_streamable(cfg) -> bool:
    """Whether a model's layers hold experts a weight source can fetch one by one."""
    return getattr(cfg, "n_experts", 0) > 0 and hasattr(cfg, "top_k")


def expected_routed(n_experts: int, top_k: int, tokens: int) -> float:
    """Experts a pass of `tokens` tokens routes to, on average, under uniform routing: each expert
    is missed by a token with probability 1 - k/E."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


@dataclass
class Routed:
    """An MoE layer between its two halves: the residual stream after attention, the normed MLP
    input [N, H], and each token's experts and their weights. The weight source fetches the
    experts in between (engine.py), so only the routed ones need be on the device."""
    x: torch.Tensor
    h: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor


def expert_tensors(hf_prefix: str, hf_parts: tuple[str, str, str], n_experts: int, hidden: int,
                   ffn: int) -> dict[str, tuple[str, tuple[int, int]]]:
    """Block entries of every expert's SwiGLU MLP: local name -> (checkpoint name, shape).

    hf_prefix has an `{e}` for the expert index; hf_parts names the gate, up and down projections
    as the checkpoint does (Mixtral: w1, w3, w2; Qwen: gate_proj, up_proj, down_proj).
    """
    shapes = {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    out = {}
    for e in range(n_experts):
        for part, hf in zip(EXPERT_PARTS, hf_parts):
            out[expert_key(e, part)] = (hf_prefix.format(e=e) + hf + ".weight", shapes[part])
    return out


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token x [N, H] and their weights (float32), as transformers routes:
    softmax over all experts in float32, then top-k, renormalised to sum to 1 when `normalize`."""
    probs = F.softmax(linear(x, router).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def run_experts(w: dict, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Sum over each token's experts of weight * expert(token), for x [N, H], experts [N, k].

    Experts run in ascending order, each over the tokens routed to it, and add into the output:
    the order transformers uses, so float32 results agree to rounding. The product with the
    routing weight is taken in the weights' dtype, then cast (Mixtral keeps it in float32).
    """
    out = torch.zeros_like(x)
    for e in torch.unique(experts).tolist():  # one host sync per layer: which experts run
        rows, slot = torch.where(experts == e)
        y = swiglu(x[rows], *(w[expert_key(e, p)] for p in EXPERT_PARTS))
        out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
    return out

