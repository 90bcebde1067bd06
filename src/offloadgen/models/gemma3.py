"""Gemma 3 (text): Gemma3ForCausalLM, 270M to 27B.

Differences from LLaMA: most layers attend over a sliding window and every sixth over the whole
context (the config's layer_types), each kind with its own rotary base (10k local, 1M global,
the global one linearly scaled on 4B+); per-head RMS norms on q and k; RMSNorm weights stored as
an offset from 1 (x * (1 + w)); embeddings scaled by sqrt(hidden_size); a GeGLU MLP (tanh GELU);
norms after attention and after the MLP as well as before; attention scaled by
query_pre_attn_scalar^-0.5 rather than head_dim^-0.5; optional soft-capping of the final logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import OffloadgenError
from .layers import StepInputs, apply_rope, attention_mask, grouped_mask, linear, rope_cos_sin

FAMILY = "gemma3"
MODEL_TYPES = ("gemma3_text", "gemma3")  # gemma3: the multimodal 4B/12B/27B, of which we read the text part
SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma3TextConfig's defaults: the multimodal checkpoints' text_config lists only what differs
TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256)


@dataclass
class Gemma3Config:
    hidden_size: int = 640
    intermediate_size: int = 2048
    n_layers: int = 18
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 262144
    max_position: int = 32768
    norm_eps: float = 1e-6
    rope_local_theta: float = 10000.0
    rope_global_theta: float = 1e6
    rope_global_scaling: float = 1.0  # linear scaling factor of the global layers' positions
    sliding_window: int = 512
    layer_types: tuple[str, ...] | None = None  # None: every sixth layer global, as Gemma 3 ships
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    tie_embeddings: bool = True
    model_type: str = "gemma3_text"
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    dtype: str = "bfloat16"
    prefix: str = "model."  # where the text model's tensors are: "language_model.model." when multimodal
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.n_layers))
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise OffloadgenError(f"Gemma 3 layer_types must be {self.n_layers} of {SLIDING!r} / {FULL!r}")
        if self.n_heads % self.n_kv_heads:
            raise OffloadgenError(f"{self.n_heads} attention heads do not divide into {self.n_kv_heads} KV heads")


_G3 = dict(vocab_size=262208, max_position=131072, sliding_window=1024, rope_global_scaling=8.0)
PRESETS = {
    "gemma-3-270m": dict(hidden_size=640, intermediate_size=2048, n_layers=18, n_heads=4, n_kv_heads=1),
    "gemma-3-1b": dict(hidden_size=1152, intermediate_size=6912, n_layers=26, n_heads=4, n_kv_heads=1),
    "gemma-3-4b": dict(_G3, hidden_size=2560, intermediate_size=10240, n_layers=34, n_heads=8, n_kv_heads=4),
    "gemma-3-12b": dict(_G3, hidden_size=3840, intermediate_size=15360, n_layers=48, n_heads=16, n_kv_heads=8),
    "gemma-3-27b": dict(_G3, hidden_size=5376, intermediate_size=21504, n_layers=62, n_heads=32, n_kv_heads=16,
                        head_dim=128, query_pre_attn_scalar=168.0),
}


def _rope(d: dict) -> tuple[float, float, float]:
    """(local theta, global theta, global linear factor) from transformers 5's per-layer-type
    rope_parameters, or from 4.x's rope_theta / rope_local_base_freq / rope_scaling."""
    params = d.get("rope_parameters") or {}
    local = params.get(SLIDING) or {}
    glob = params.get(FULL) or d.get("rope_scaling") or {}
    for kind in (local, glob):
        rope_type = kind.get("rope_type", kind.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise OffloadgenError(f"Gemma 3 rope scaling {rope_type!r} is not supported (default, linear)")
    factor = glob.get("factor", 1.0) if glob.get("rope_type", glob.get("type")) == "linear" else 1.0
    return (float(local.get("rope_theta", d.get("rope_local_base_freq", 10000.0))),
            float(glob.get("rope_theta", d.get("rope_theta", 1e6))), float(factor))


def config_from_hf(d: dict) -> Gemma3Config:
    if d.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration: its language model only
        text = {**TEXT_DEFAULTS, **d.get("text_config", {}), "model_type": "gemma3_text"}
        # transformers ties (or not) by the outer config's flag, whatever text_config says
        text["tie_word_embeddings"] = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return replace(config_from_hf(text), prefix="language_model.model.", model_type="gemma3")
    if d.get("attn_logit_softcapping") is not None:
        raise OffloadgenError("Gemma attention-logit soft-capping is not supported (Gemma 3 checkpoints have none)")
    if d.get("use_bidirectional_attention"):
        raise OffloadgenError("bidirectional Gemma 3 (an embedding model) is not a text generator")
    if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise OffloadgenError(f"Gemma 3 activation {d['hidden_activation']!r} is not supported")
    local, glob, factor = _rope(d)
    n_layers = d["num_hidden_layers"]
    pattern = d.get("sliding_window_pattern") or 6
    types = d.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
    return Gemma3Config(
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], n_layers=n_layers,
        n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim", 256), vocab_size=d["vocab_size"],
        max_position=d.get("max_position_embeddings", 131072), norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_local_theta=local, rope_global_theta=glob, rope_global_scaling=factor,
        sliding_window=d.get("sliding_window") or 4096, layer_types=tuple(types),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        tie_embeddings=d.get("tie_word_embeddings", True), bos_token_id=d.get("bos_token_id", 2),
        eos_token_id=d.get("eos_token_id", 1), pad_token_id=d.get("pad_token_id", 0),
        dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"))


def block_tensors(cfg: Gemma3Config, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors of one block: local name -> (name in a Hugging Face checkpoint, shape)."""
    h, d, ffn, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.prefix
    if block == "embed":
        return {"embed": (m + "embed_tokens.weight", (cfg.vocab_size, h))}
    if block == "head":
        untied = m.removesuffix("model.") + "lm_head.weight"
        lm_head = m + "embed_tokens.weight" if cfg.tie_embeddings else untied
        return {"norm": (m + "norm.weight", (h,)), "lm_head": (lm_head, (cfg.vocab_size, h))}
    p = f"{m}layers.{block}."
    q_out, kv_out = cfg.n_heads * d, cfg.n_kv_heads * d
    return {
        "attn_norm": (p + "input_layernorm.weight", (h,)),
        "q": (p + "self_attn.q_proj.weight", (q_out, h)),
        "k": (p + "self_attn.k_proj.weight", (kv_out, h)),
        "v": (p + "self_attn.v_proj.weight", (kv_out, h)),
        "q_norm": (p + "self_attn.q_norm.weight", (d,)),
        "k_norm": (p + "self_attn.k_norm.weight", (d,)),
        "o": (p + "self_attn.o_proj.weight", (h, q_out)),
        "post_attn_norm": (p + "post_attention_layernorm.weight", (h,)),
        "mlp_norm": (p + "pre_feedforward_layernorm.weight", (h,)),
        "gate": (p + "mlp.gate_proj.weight", (ffn, h)),
        "up": (p + "mlp.up_proj.weight", (ffn, h)),
        "down": (p + "mlp.down_proj.weight", (h, ffn)),
        "post_mlp_norm": (p + "post_feedforward_layernorm.weight", (h,)),
    }


def kv_heads(cfg: Gemma3Config) -> tuple[int, int]:
    return cfg.n_kv_heads, cfg.head_dim


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Gemma scales by (1 + w) and multiplies before casting back, both in float32 (unlike LLaMA).
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


def prepare(cfg: Gemma3Config, step: StepInputs, dtype: torch.dtype) -> None:
    """Per-pass tensors for both kinds of layer: rotary cos/sin and mask, local and global.

    `layer` does not receive its index, so each micro-batch's step counts the layers it has run:
    the engine runs every layer once per pass, in order (the weight sources rely on it too)."""
    arange = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    group = cfg.n_heads // cfg.n_kv_heads
    step.extras["rope"] = {
        SLIDING: rope_cos_sin(step.positions, 1.0 / cfg.rope_local_theta ** arange, dtype),
        FULL: rope_cos_sin(step.positions, 1.0 / cfg.rope_global_theta ** arange / cfg.rope_global_scaling, dtype)}
    step.mask = grouped_mask(attention_mask(step, dtype), group)
    step.extras["masks"] = {FULL: step.mask,
                            SLIDING: grouped_mask(attention_mask(step, dtype, cfg.sliding_window), group)}
    step.extras["layer"] = 0


def embed(cfg: Gemma3Config, w: dict, ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
    # The scale is rounded to the weights' dtype first, as transformers does (sqrt(640) in bf16).
    return F.embedding(ids, w["embed"]) * torch.tensor(math.sqrt(cfg.hidden_size), dtype=w["embed"].dtype)


def layer(cfg: Gemma3Config, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    kind = cfg.layer_types[step.extras["layer"]]
    step.extras["layer"] += 1
    b, t, _ = x.shape
    h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
    q = rms_norm(linear(h, w["q"]).view(b, t, cfg.n_heads, cfg.head_dim), w["q_norm"], cfg.norm_eps)
    k = rms_norm(linear(h, w["k"]).view(b, t, cfg.n_kv_heads, cfg.head_dim), w["k_norm"], cfg.norm_eps)
    v = linear(h, w["v"]).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    cos, sin = step.extras["rope"][kind]
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    a = kv.attend(q, k, v, step, step.extras["masks"][kind], cfg.query_pre_attn_scalar ** -0.5)
    x = x + rms_norm(linear(a.transpose(1, 2).reshape(b, t, -1), w["o"]), w["post_attn_norm"], cfg.norm_eps)
    h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
    h = linear(F.gelu(linear(h, w["gate"]), approximate="tanh") * linear(h, w["up"]), w["down"])
    return x + rms_norm(h, w["post_mlp_norm"], cfg.norm_eps)


def head(cfg: Gemma3Config, w: dict, x: torch.Tensor) -> torch.Tensor:
    logits = linear(rms_norm(x, w["norm"], cfg.norm_eps), w["lm_head"])
    cap = cfg.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap
