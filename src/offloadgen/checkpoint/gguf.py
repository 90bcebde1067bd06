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

CONVERTER_VERSION = 1
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
SUPPORTED_ARCHS = ("llama", "qwen2")


def convert_gguf(path: Path) -> Path:
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    out = cache_root() / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    print(f"offloadgen: converting {path.name} to {out} (once; later loads use it)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
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


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each Q/K head; undo it so the weights match
    # Hugging Face's rotate_half convention.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


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
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise OffloadgenError(f"{path}: rope scaling {scaling!r} in GGUF is not supported")
    config = {
        "model_type": arch, "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": int(_field(reader, f"{arch}.embedding_length")),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens") or []) or int(_field(reader, f"{arch}.vocab_size")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
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
        rest = None
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            hf = f"model.layers.{layer}.{_LAYER_NAMES.get(rest, rest)}"
            if rest not in _LAYER_NAMES:
                continue  # tensors we do not use (e.g. rope_freqs of llama3 GGUFs are refused above)
        elif t.name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[t.name]
        else:
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        if arch == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
            w = _reverse_permute(w, heads)
        elif arch == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
            w = _reverse_permute(w, kv_heads)
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
