"""GGUF files (llama.cpp's format): converted once into a cached Hugging Face folder.

Dequantizing a GGUF takes tens of seconds even for a small model; the converted folder
(float32 safetensors, config.json, tokenizer) loads in a second or two on every later run.
The cache key is the file's absolute path, size and modification time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import OffloadgenError
from ..machine import cache_root
from ..models import config_from_hf

CONVERTER_VERSION = 1  # part of the cache key: bump when converted folders change
SHARD_BYTES = 2 << 30

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# Gemma 3 names its four norms apart from LLaMA's two
_GEMMA3_LAYER_NAMES = {k: v for k, v in _LAYER_NAMES.items() if k not in ("ffn_norm.weight",)} | {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
SUPPORTED_ARCHS = tuple(_ARCHITECTURES)


def convert_gguf(path: Path) -> Path:
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    out = cache_root() / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    print(f"offloadgen: converting {path.name} to {out} (once; later loads use it)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(path, tmp)
        tmp.rename(out)  # atomic: a killed conversion never leaves a half-written folder behind
    except FileExistsError:  # another process finished the same conversion first
        pass
    except OSError as e:
        # rename over a non-empty folder that appeared meanwhile also raises OSError(ENOTEMPTY)
        if not (out / "config.json").is_file():
            raise OffloadgenError(f"cannot write the converted model to {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the `.{name}.tmp{pid}` folders of conversions whose process is gone (killed mid-way:
    a 135M model leaves 200 MB). A live process's folder is left alone."""
    for tmp in folder.glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _required(reader, key, path):
    """A GGUF field we cannot do without, as an int."""
    value = _field(reader, key)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OffloadgenError(f"{path}: GGUF file has no valid {key} (found {value!r}); it cannot be read") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each Q/K head; undo it so the weights match
    # Hugging Face's rotate_half convention.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _config(reader, arch: str, path: Path) -> dict:
    """config.json of the Hugging Face model the GGUF file was converted from."""
    heads = _required(reader, f"{arch}.attention.head_count", path)
    kv_heads = _required(reader, kv, path) if (kv := f"{arch}.attention.head_count_kv") in reader.fields else heads
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise OffloadgenError(f"{path}: rope scaling {scaling!r} in GGUF is not supported")
    config = {
        "model_type": arch, "architectures": [_ARCHITECTURES[arch]],
        "hidden_size": _required(reader, f"{arch}.embedding_length", path),
        "intermediate_size": _required(reader, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _required(reader, f"{arch}.block_count", path),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens") or []) or _required(reader, f"{arch}.vocab_size", path),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    return _gemma3_config(reader, config) if arch == "gemma3" else config


def _gemma3_config(reader, config: dict) -> dict:
    """Gemma 3's text config. GGUF keeps the global rope base only: the local one is 10k in every
    Gemma 3, as llama.cpp assumes, and so is every sixth layer being global."""
    n_layers, head_dim = config["num_hidden_layers"], int(_field(reader, "gemma3.attention.key_length", 256))
    rope_global = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    rope_global.update(config.pop("rope_scaling", {}))
    # llama.cpp's rule: 27B (62 layers) scales queries by hidden/heads, the others by head_dim
    scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else head_dim
    del config["hidden_act"]
    return config | {
        "model_type": "gemma3_text", "head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(_field(reader, "gemma3.attention.sliding_window", 4096)),
        "query_pre_attn_scalar": scalar,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        "rope_parameters": {"full_attention": rope_global,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    }


def _hf_tensor(arch: str, name: str, w: np.ndarray, config: dict) -> tuple[str | None, np.ndarray]:
    """A GGUF tensor's Hugging Face name (None: not used) and its values in Hugging Face's layout."""
    if not name.startswith("blk."):
        hf = _GLOBAL_NAMES.get(name)
        return hf, (w - 1 if arch == "gemma3" and name == "output_norm.weight" else w)
    _, layer, rest = name.split(".", 2)
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if rest not in names:
        return None, w  # tensors we do not use (e.g. rope_freqs of llama3 GGUFs are refused above)
    if arch == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
        w = _reverse_permute(w, config["num_attention_heads"])
    elif arch == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
        w = _reverse_permute(w, config["num_key_value_heads"])
    elif arch == "gemma3" and rest.endswith("norm.weight"):
        w = w - 1  # llama.cpp stores Gemma's (1 + w) norm weights with the 1 added
    return f"model.layers.{layer}.{names[rest]}", w


def _convert(path: Path, out: Path) -> None:
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise OffloadgenError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    from safetensors.torch import save_file
    from tqdm import tqdm

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
        raise OffloadgenError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise OffloadgenError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    config = _config(reader, arch, path)
    config_from_hf(config, str(path))  # refuse impossible sizes before minutes of dequantizing
    out.mkdir(parents=True)

    shard, shard_bytes, weight_map, n_shard = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            n_shard += 1
            fname = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out / fname))
            weight_map.update({k: fname for k in shard})
            shard, shard_bytes = {}, 0

    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor", file=sys.stderr, leave=False, disable=None):
        if not t.name.startswith("blk.") and t.name not in _GLOBAL_NAMES:
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        hf, w = _hf_tensor(arch, t.name, w.reshape(tuple(int(n) for n in reversed(t.shape))), config)
        if hf is None:
            continue
        shard[hf] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: the mmap is read-only
        shard_bytes += w.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(str(out))
    except Exception as e:
        raise OffloadgenError(f"{path}: could not build a tokenizer from the GGUF file ({e})") from None
    (out / "config.json").write_text(json.dumps(config, indent=2))
