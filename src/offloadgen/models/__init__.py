"""Model families and their configs. Each family is one module with the same functions:

    config_from_hf(dict) -> Config      block_tensors(cfg, block) -> {local: (hf_name, shape)}
    prepare(cfg, step, dtype)           embed / layer / head: the math of each block
    kv_heads(cfg) -> (heads, head_dim)  PRESETS: name -> Config kwargs, for --dummy runs

A model is a list of blocks: "embed", the decoder layers 0..L-1, then "head". Weights move block
by block; the engine never sees where they came from.
"""
from __future__ import annotations

import math
from types import ModuleType

import torch

from ..errors import OffloadgenError
from . import bloom, gemma3, llama, mixtral, opt, phi3, qwen_moe
from .checks import check_raw_sizes, check_sizes

FAMILIES: dict[str, ModuleType] = {"llama": llama, "opt": opt, "bloom": bloom, "gemma3": gemma3, "phi3": phi3,
                                   "mixtral": mixtral, "qwen_moe": qwen_moe}
_BY_MODEL_TYPE = {t: m for m in FAMILIES.values() for t in m.MODEL_TYPES}
_CONFIG_CLASS = {llama.LlamaConfig: llama, opt.OPTConfig: opt, bloom.BloomConfig: bloom,
                 gemma3.Gemma3Config: gemma3, phi3.Phi3Config: phi3, mixtral.MixtralConfig: mixtral,
                 qwen_moe.QwenMoeConfig: qwen_moe}


def supported_model_types() -> str:
    return ", ".join(sorted(_BY_MODEL_TYPE))


def family_of(cfg) -> ModuleType:
    return _CONFIG_CLASS[type(cfg)]


def config_from_hf(d: dict, where: str = "config.json"):
    if not isinstance(d, dict):
        raise OffloadgenError(f"{where}: expected a JSON object of settings, found a {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        archs = ", ".join(d.get("architectures") or []) or "none given"
        raise OffloadgenError(f"{where}: architecture {model_type!r} ({archs}) is not supported; "
                              f"supported model types: {supported_model_types()}")
    check_raw_sizes(d, where)
    try:
        cfg = _BY_MODEL_TYPE[model_type].config_from_hf(d)
    except KeyError as e:
        raise OffloadgenError(f"{where}: field {e.args[0]!r} missing for a {model_type} model") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a setting of the wrong type
        raise OffloadgenError(f"{where}: a setting has a value a {model_type} model cannot use ({e})") from None
    check_sizes(cfg, d, where)
    return cfg


def preset_names() -> list[str]:
    return sorted(n for m in FAMILIES.values() for n in m.PRESETS)


def preset(name: str):
    """Built-in config by name; 'facebook/opt-30b' and 'opt-30b' are the same preset."""
    short = name.rstrip("/").split("/")[-1].lower()
    for module in FAMILIES.values():
        if short in module.PRESETS:
            cls = next(c for c, m in _CONFIG_CLASS.items() if m is module)
            return cls(**module.PRESETS[short])
    raise OffloadgenError(f"no built-in config named {name!r}; presets: {', '.join(preset_names())}")


def blocks(cfg) -> list:
    return ["embed", *range(cfg.n_layers), "head"]


def block_nbytes(cfg, block, bytes_per_param: float) -> int:
    tensors = family_of(cfg).block_tensors(cfg, block)
    return int(sum(math.prod(shape) for _, shape in tensors.values()) * bytes_per_param)


def shared_nbytes(cfg, bytes_per_param: float) -> int:
    """Bytes of tensors that the embed and head blocks share (tied embeddings): stored once."""
    fam = family_of(cfg)
    embed = {hf: shape for hf, shape in fam.block_tensors(cfg, "embed").values()}
    head = {hf: shape for hf, shape in fam.block_tensors(cfg, "head").values()}
    return int(sum(math.prod(embed[k]) for k in embed.keys() & head.keys()) * bytes_per_param)


def param_count(cfg) -> int:
    """Real parameter count: every tensor once, tied embeddings once."""
    seen = {}
    for b in blocks(cfg):
        for hf_name, shape in family_of(cfg).block_tensors(cfg, b).values():
            seen[hf_name] = math.prod(shape)
    return sum(seen.values())


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.replace("torch.", "")
    if key not in DTYPES:
        raise OffloadgenError(f"dtype {name!r} is not supported; use float32, float16 or bfloat16")
    return DTYPES[key]
