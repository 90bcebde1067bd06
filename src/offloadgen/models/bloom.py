"""BLOOM: ALiBi attention (no position embeddings), fused query_key_value, GELU MLP."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .layers import OneKVHeadPerHead, StepInputs, alibi_slopes, attention_mask, layer_norm, linear

FAMILY = "bloom"
MODEL_TYPES = ("bloom",)


@dataclass
class BloomConfig(OneKVHeadPerHead):
    hidden_size: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    vocab_size: int = 250880
    max_position: int = 2048  # ALiBi has no hard limit; this is the length BLOOM was trained on
    norm_eps: float = 1e-5
    residual_after_norm: bool = False  # apply_residual_connection_post_layernorm
    tie_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 3
    dtype: str = "float16"
    model_type: str = "bloom"
    family: str = field(default=FAMILY, init=False)


PRESETS = {
    "bloom-560m": dict(hidden_size=1024, n_layers=24, n_heads=16),
    "bloom-1b7": dict(hidden_size=2048, n_layers=24, n_heads=16),
    "bloom-7b1": dict(hidden_size=4096, n_layers=30, n_heads=32),
    "bloom-176b": dict(hidden_size=14336, n_layers=70, n_heads=112, dtype="bfloat16"),
}


def config_from_hf(d: dict) -> BloomConfig:
    return BloomConfig(
        hidden_size=d.get("hidden_size") or d["n_embed"], n_layers=d.get("n_layer") or d["num_hidden_layers"],
        n_heads=d.get("n_head") or d["num_attention_heads"], vocab_size=d["vocab_size"],
        max_position=d.get("seq_length", 2048), norm_eps=d.get("layer_norm_epsilon", 1e-5),
        residual_after_norm=d.get("apply_residual_connection_post_layernorm", False),
        tie_embeddings=d.get("tie_word_embeddings", True), bos_token_id=d.get("bos_token_id", 1),
        eos_token_id=d.get("eos_token_id", 2), pad_token_id=d.get("pad_token_id", 3),
        dtype=str(d.get("torch_dtype") or d.get("dtype") or "float16"),
    )


def _norm(hf_prefix, local, h):
    return {local: (hf_prefix + ".weight", (h,)), local + "_bias": (hf_prefix + ".bias", (h,))}


def block_tensors(cfg: BloomConfig, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors of one block: local name -> (name in a Hugging Face checkpoint, shape)."""
    h = cfg.hidden_size
    if block == "embed":
        return {"embed": ("transformer.word_embeddings.weight", (cfg.vocab_size, h))} | \
            _norm("transformer.word_embeddings_layernorm", "embed_norm", h)
    if block == "head":
        lm_head = "transformer.word_embeddings.weight" if cfg.tie_embeddings else "lm_head.weight"
        return {"lm_head": (lm_head, (cfg.vocab_size, h))} | _norm("transformer.ln_f", "norm", h)
    p = f"transformer.h.{block}."
    t = {}
    for name, hf, shape in (("qkv", "self_attention.query_key_value", (3 * h, h)),
                            ("o", "self_attention.dense", (h, h)),
                            ("fc1", "mlp.dense_h_to_4h", (4 * h, h)), ("fc2", "mlp.dense_4h_to_h", (h, 4 * h))):
        t[name] = (p + hf + ".weight", shape)
        t[name + "_bias"] = (p + hf + ".bias", shape[:1])
    return t | _norm(p + "input_layernorm", "attn_norm", h) | _norm(p + "post_attention_layernorm", "mlp_norm", h)


def kv_heads(cfg: BloomConfig) -> tuple[int, int]:
    return cfg.n_heads, cfg.head_dim


def prepare(cfg: BloomConfig, step: StepInputs, dtype: torch.dtype) -> None:
    # ALiBi as BLOOM defines it: slope * (index of the key among its row's real tokens). Only the
    # key's index appears because softmax ignores a per-query constant.
    valid = step.key_valid.long()
    key_index = ((valid.cumsum(-1) - 1) * valid).float()
    alibi = alibi_slopes(cfg.n_heads).to(key_index.device)[None, :, None] * key_index[:, None, :]
    step.mask = attention_mask(step, dtype) + alibi[:, :, None, :].to(dtype)


def embed(cfg: BloomConfig, w: dict, ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
    return layer_norm(F.embedding(ids, w["embed"]), w["embed_norm"], w["embed_norm_bias"], cfg.norm_eps)


def layer(cfg: BloomConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    b, t, _ = x.shape
    h = layer_norm(x, w["attn_norm"], w["attn_norm_bias"], cfg.norm_eps)
    residual = h if cfg.residual_after_norm else x
    qkv = linear(h, w["qkv"], w["qkv_bias"]).view(b, t, cfg.n_heads, 3, cfg.head_dim)
    q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
    a = kv.attend(q, k, v, step, step.mask)
    x = residual + linear(a.transpose(1, 2).reshape(b, t, -1), w["o"], w["o_bias"])
    h = layer_norm(x, w["mlp_norm"], w["mlp_norm_bias"], cfg.norm_eps)
    residual = h if cfg.residual_after_norm else x
    return residual + linear(F.gelu(linear(h, w["fc1"], w["fc1_bias"]), approximate="tanh"), w["fc2"], w["fc2_bias"])


def head(cfg: BloomConfig, w: dict, x: torch.Tensor) -> torch.Tensor:
    return linear(layer_norm(x, w["norm"], w["norm_bias"], cfg.norm_eps), w["lm_head"])
