"""LLaMA family: Llama 2 and 3, Mistral, Qwen2, SmolLM.

Pre-norm decoder with RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU
MLP. Qwen2 adds biases to q/k/v; Mistral may use a sliding attention window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import OffloadgenError
from .layers import (StepInputs, apply_rope, attention_mask, grouped_mask, linear,
                     rms_norm, rope_cos_sin)

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm")


@dataclass
class LlamaConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None
    vocab_size: int = 32000
    max_position: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float16"  # dtype of the weights as stored / as the preset is meant to run
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise OffloadgenError(f"{self.n_heads} attention heads do not divide into {self.n_kv_heads} KV heads")
        if self.hidden_act not in ("silu", "swish"):
            raise OffloadgenError(f"LLaMA-family activation {self.hidden_act!r} is not supported (only silu)")


PRESETS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32, n_kv_heads=32),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, n_layers=40, n_heads=40, n_kv_heads=40),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, n_layers=80, n_heads=64, n_kv_heads=8),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                       vocab_size=128256, max_position=8192, rope_theta=500000.0, bos_token_id=128000,
                       eos_token_id=128001, dtype="bfloat16"),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                          vocab_size=128256, max_position=131072, rope_theta=500000.0, bos_token_id=128000,
                          eos_token_id=128001, dtype="bfloat16",
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                       max_position=32768, rope_theta=1e6, model_type="mistral", dtype="bfloat16"),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, n_layers=28, n_heads=28, n_kv_heads=4,
                       vocab_size=152064, max_position=32768, rope_theta=1e6, qkv_bias=True, norm_eps=1e-6,
                       model_type="qwen2", bos_token_id=None, eos_token_id=151643, dtype="bfloat16"),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                         vocab_size=49152, max_position=8192, rope_theta=100000.0, tie_embeddings=True,
                         model_type="llama", eos_token_id=2, dtype="bfloat16"),
}


def config_from_hf(d: dict) -> LlamaConfig:
    model_type = d.get("model_type", "llama")
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta / rope_scaling.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    sliding = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        sliding = None
    return LlamaConfig(
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim"),
        vocab_size=d["vocab_size"], max_position=d.get("max_position_embeddings", 4096),
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
        qkv_bias=d.get("attention_bias", False) or model_type == "qwen2",
        o_bias=d.get("attention_bias", False) and model_type != "qwen2",
        mlp_bias=d.get("mlp_bias", False), tie_embeddings=d.get("tie_word_embeddings", False),
        sliding_window=sliding, hidden_act=d.get("hidden_act", "silu"), model_type=model_type,
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), dtype=str(d.get("torch_dtype") or d.get("dtype") or "float16"),
    )


def block_tensors(cfg: LlamaConfig, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors of one block: local name -> (name in a Hugging Face checkpoint, shape)."""
    h, d = cfg.hidden_size, cfg.head_dim
    if block == "embed":
        return {"embed": ("model.embed_tokens.weight", (cfg.vocab_size, h))}
    if block == "head":
        lm_head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        return {"norm": ("model.norm.weight", (h,)), "lm_head": (lm_head, (cfg.vocab_size, h))}
    p = f"model.layers.{block}."
    q_out, kv_out, ffn = cfg.n_heads * d, cfg.n_kv_heads * d, cfg.intermediate_size
    t = {
        "attn_norm": (p + "input_layernorm.weight", (h,)),
        "q": (p + "self_attn.q_proj.weight", (q_out, h)),
        "k": (p + "self_attn.k_proj.weight", (kv_out, h)),
        "v": (p + "self_attn.v_proj.weight", (kv_out, h)),
        "o": (p + "self_attn.o_proj.weight", (h, q_out)),
        "mlp_norm": (p + "post_attention_layernorm.weight", (h,)),
        "gate": (p + "mlp.gate_proj.weight", (ffn, h)),
        "up": (p + "mlp.up_proj.weight", (ffn, h)),
        "down": (p + "mlp.down_proj.weight", (h, ffn)),
    }
    if cfg.qkv_bias:
        t |= {"q_bias": (p + "self_attn.q_proj.bias", (q_out,)), "k_bias": (p + "self_attn.k_proj.bias", (kv_out,)),
              "v_bias": (p + "self_attn.v_proj.bias", (kv_out,))}
    if cfg.o_bias:
        t["o_bias"] = (p + "self_attn.o_proj.bias", (h,))
    if cfg.mlp_bias:
        t |= {"gate_bias": (p + "mlp.gate_proj.bias", (ffn,)), "up_bias": (p + "mlp.up_proj.bias", (ffn,)),
              "down_bias": (p + "mlp.down_proj.bias", (h,))}
    return t


def kv_heads(cfg: LlamaConfig) -> tuple[int, int]:
    return cfg.n_kv_heads, cfg.head_dim


def inv_freq(cfg: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies, adjusted by the checkpoint's rope scaling; and the cos/sin scale."""
    dim = cfg.head_dim
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return freq, 1.0
    if kind == "linear":
        return freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old_ctx / low, freq / factor, freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise OffloadgenError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def prepare(cfg: LlamaConfig, step: StepInputs, dtype: torch.dtype) -> None:
    """Per-pass tensors shared by every layer: the grouped mask and the rotary cos/sin."""
    freq, scale = inv_freq(cfg)
    step.extras["cos_sin"] = rope_cos_sin(step.positions, freq, dtype, scale)
    mask = attention_mask(step, dtype, cfg.sliding_window)
    step.mask = grouped_mask(mask, cfg.n_heads // cfg.n_kv_heads)


def embed(cfg: LlamaConfig, w: dict, ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
    return F.embedding(ids, w["embed"])


def attention(cfg, w: dict, h: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    """Rotary grouped-query attention of the normed hidden state h, through the layer's KV cache.

    Shared with the families built on LLaMA's attention (Mixtral, Qwen-MoE): `cfg` needs n_heads,
    n_kv_heads, head_dim and norm_eps. Per-head q/k RMS norms (Qwen3) apply where the block has them.
    """
    b, t, _ = h.shape
    q = linear(h, w["q"], w.get("q_bias")).view(b, t, cfg.n_heads, cfg.head_dim)
    k = linear(h, w["k"], w.get("k_bias")).view(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = linear(h, w["v"], w.get("v_bias")).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    if "q_norm" in w:
        q, k = rms_norm(q, w["q_norm"], cfg.norm_eps), rms_norm(k, w["k_norm"], cfg.norm_eps)
    cos, sin = step.extras["cos_sin"]
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    a = kv.attend(q, k, v, step, step.mask)
    return linear(a.transpose(1, 2).reshape(b, t, -1), w["o"], w.get("o_bias"))


def layer(cfg: LlamaConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    x = x + attention(cfg, w, rms_norm(x, w["attn_norm"], cfg.norm_eps), step, kv)
    h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
    gated = F.silu(linear(h, w["gate"], w.get("gate_bias"))) * linear(h, w["up"], w.get("up_bias"))
    return x + linear(gated, w["down"], w.get("down_bias"))


def head(cfg: LlamaConfig, w: dict, x: torch.Tensor) -> torch.Tensor:
    return linear(rms_norm(x, w["norm"], cfg.norm_eps), w["lm_head"])
