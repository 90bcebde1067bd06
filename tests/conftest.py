"""Tiny random checkpoints of every family and variant we claim, made with transformers' own
config classes and save_pretrained, so parity is checked against the reference implementation."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402

V = 320  # vocabulary of the tiny models


def _llama(**kw):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=V, max_position_embeddings=256, **kw)


VARIANTS = {
    "llama2-mha": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=256)),
    "llama3-gqa-rope-scaling": lambda: (transformers.LlamaForCausalLM, _llama(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "smollm-tied": lambda: (transformers.LlamaForCausalLM, _llama(tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral-sliding-window": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=256, sliding_window=12)),
    "qwen2-qkv-bias": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=256, tie_word_embeddings=False)),
    "opt": lambda: (transformers.OPTForCausalLM, transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=256)),
    "opt-350m-style": lambda: (transformers.OPTForCausalLM, transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=False)),
    "bloom": lambda: (transformers.BloomForCausalLM, transformers.BloomConfig(
        hidden_size=64, n_layer=3, n_head=4, vocab_size=V)),
    "bloom-6-heads-residual-post-norm": lambda: (transformers.BloomForCausalLM, transformers.BloomConfig(
        hidden_size=72, n_layer=2, n_head=6, vocab_size=V, apply_residual_connection_post_layernorm=True)),
}


def make_checkpoint(name: str, path):
    """Save a tiny model with weights large enough that greedy choices are not near-ties."""
    cls, config = VARIANTS[name]()
    torch.manual_seed(hash(name) % 1000)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            made[name] = (make_checkpoint(name, path), path)
        return made[name]
    return get
