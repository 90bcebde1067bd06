"""config.json's sizes checked before a model is built: a zero, negative, fractional, string or
null size would otherwise divide by zero, or run and print garbage."""
from __future__ import annotations

from ..errors import OffloadgenError

# config.json keys that hold a size in some family; when present and not null, a positive integer
SIZE_KEYS = ("hidden_size", "n_embed", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
             "num_key_value_heads", "intermediate_size", "ffn_dim", "vocab_size", "max_position_embeddings",
             "seq_length", "head_dim", "word_embed_proj_dim")
# the built config's sizes every family has, with the config.json names they come from
CONFIG_SIZES = {"hidden_size": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
                "max_position": "max_position_embeddings"}


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def check_raw_sizes(d: dict, where: str) -> None:
    for key in SIZE_KEYS:
        if d.get(key) is not None and not _positive_int(d[key]):
            raise OffloadgenError(f"{where}: {key} must be a positive integer, not {d[key]!r}")


def check_sizes(cfg, d: dict, where: str) -> None:
    """The built config: every size a positive integer, heads that divide the hidden size (unless
    config.json gives head_dim) and into the KV heads."""
    for attr, key in CONFIG_SIZES.items():
        value = getattr(cfg, attr)
        if not _positive_int(value):
            raise OffloadgenError(f"{where}: {key} must be a positive integer, not {value!r}")
    if d.get("head_dim") is None and cfg.hidden_size % cfg.n_heads:
        raise OffloadgenError(f"{where}: hidden_size {cfg.hidden_size} is not a multiple of the "
                              f"{cfg.n_heads} attention heads")
    if cfg.n_heads % cfg.n_kv_heads:
        raise OffloadgenError(f"{where}: {cfg.n_heads} attention heads do not divide into {cfg.n_kv_heads} KV heads")
