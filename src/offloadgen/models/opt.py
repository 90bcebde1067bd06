"""OPT (Meta's Open Pre-trained Transformers), opt-125m to opt-175b.

Learned positional embeddings (offset 2), ReLU MLP, biases everywhere. opt-350m differs: its
embeddings are 512 wide and projected in and out of the 1024-wide decoder, and it normalises
after each residual add (do_layer_norm_before=False) with no final layer norm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import OffloadgenError
from .layers import OneKVHeadPerHead, StepInputs, attention_mask, layer_norm, linear

FAMILY = "opt"
MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPT's position table starts with two unused rows


@dataclass
class OPTConfig(OneKVHeadPerHead):
    hidden_size: int = 768
    ffn_dim: int = 3072
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 50272
    max_position: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_affine: bool = True
    activation: str = "relu"
    tie_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 1
    dtype: str = "float16"
    model_type: str = "opt"
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.activation not in ("relu", "gelu"):
            raise OffloadgenError(f"OPT activation {self.activation!r} is not supported (relu, gelu)")

    @property
    def projected(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def final_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


def _opt(h, layers, heads, **kw):
    return dict(hidden_size=h, ffn_dim=4 * h, n_layers=layers, n_heads=heads, **kw)


PRESETS = {
    "opt-125m": _opt(768, 12, 12),
    "opt-350m": _opt(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    # No public config: the reference takes opt-66b's and widens it (docs/reference-benchmark.md).
    "opt-175b": _opt(12288, 96, 96),
}


def config_from_hf(d: dict) -> OPTConfig:
    return OPTConfig(
        hidden_size=d["hidden_size"], ffn_dim=d["ffn_dim"], n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"], vocab_size=d["vocab_size"],
        max_position=d.get("max_position_embeddings", 2048), word_embed_proj_dim=d.get("word_embed_proj_dim"),
        do_layer_norm_before=d.get("do_layer_norm_before", True),
        remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
        enable_bias=d.get("enable_bias", True), layer_norm_affine=d.get("layer_norm_elementwise_affine", True),
        activation=d.get("activation_function", "relu"), tie_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=d.get("bos_token_id", 2), eos_token_id=d.get("eos_token_id", 2),
        pad_token_id=d.get("pad_token_id", 1), dtype=str(d.get("torch_dtype") or d.get("dtype") or "float16"),
    )


def block_tensors(cfg: OPTConfig, block) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors of one block: local name -> (name in a Hugging Face checkpoint, shape)."""
    h, e, f = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim
    d = "model.decoder."
    if block == "embed":
        t = {"embed": (d + "embed_tokens.weight", (cfg.vocab_size, e)),
             "positions": (d + "embed_positions.weight", (cfg.max_position + POSITION_OFFSET, h))}
        if cfg.projected:
            t["project_in"] = (d + "project_in.weight", (h, e))
        return t
    if block == "head":
        lm_head = d + "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        t = {"lm_head": (lm_head, (cfg.vocab_size, e))}
        if cfg.final_norm:
            t |= _norm(d + "final_layer_norm", "norm", cfg)
        if cfg.projected:
            t["project_out"] = (d + "project_out.weight", (e, h))
        return t
    p = f"{d}layers.{block}."
    t = {}
    for name, hf, shape in (("q", "self_attn.q_proj", (h, h)), ("k", "self_attn.k_proj", (h, h)),
                            ("v", "self_attn.v_proj", (h, h)), ("o", "self_attn.out_proj", (h, h)),
                            ("fc1", "fc1", (f, h)), ("fc2", "fc2", (h, f))):
        t[name] = (p + hf + ".weight", shape)
        if cfg.enable_bias:
            t[name + "_bias"] = (p + hf + ".bias", shape[:1])
    return t | _norm(p + "self_attn_layer_norm", "attn_norm", cfg) | _norm(p + "final_layer_norm", "mlp_norm", cfg)


def _norm(hf_prefix: str, local: str, cfg: OPTConfig) -> dict:
    if not cfg.layer_norm_affine:
        return {}
    return {local: (hf_prefix + ".weight", (cfg.hidden_size,)), local + "_bias": (hf_prefix + ".bias", (cfg.hidden_size,))}


def kv_heads(cfg: OPTConfig) -> tuple[int, int]:
    return cfg.n_heads, cfg.head_dim


def prepare(cfg: OPTConfig, step: StepInputs, dtype: torch.dtype) -> None:
    step.mask = attention_mask(step, dtype)


def embed(cfg: OPTConfig, w: dict, ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
    x = F.embedding(ids, w["embed"])
    if cfg.projected:
        x = linear(x, w["project_in"])
    return x + F.embedding(step.positions + POSITION_OFFSET, w["positions"])


def _ln(x, w, name, cfg):
    return layer_norm(x, w.get(name), w.get(name + "_bias"), 1e-5)


def layer(cfg: OPTConfig, w: dict, x: torch.Tensor, step: StepInputs, kv) -> torch.Tensor:
    b, t, _ = x.shape
    pre = cfg.do_layer_norm_before
    h = _ln(x, w, "attn_norm", cfg) if pre else x
    q = linear(h, w["q"], w.get("q_bias")).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = linear(h, w["k"], w.get("k_bias")).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    v = linear(h, w["v"], w.get("v_bias")).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    a = kv.attend(q, k, v, step, step.mask)
    x = x + linear(a.transpose(1, 2).reshape(b, t, -1), w["o"], w.get("o_bias"))
    if not pre:
        x = _ln(x, w, "attn_norm", cfg)
    h = _ln(x, w, "mlp_norm", cfg) if pre else x
    act = F.relu if cfg.activation == "relu" else F.gelu
    x = x + linear(act(linear(h, w["fc1"], w.get("fc1_bias"))), w["fc2"], w.get("fc2_bias"))
    return x if pre else _ln(x, w, "mlp_norm", cfg)


def head(cfg: OPTConfig, w: dict, x: torch.Tensor) -> torch.Tensor:
    if cfg.final_norm:
        x = _ln(x, w, "norm", cfg)
    if cfg.projected:
        x = linear(x, w["project_out"])
    return linear(x, w["lm_head"])
