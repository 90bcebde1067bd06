"""Tiny random checkpoints of every family and variant we claim, made with transformers' own
config classes and save_pretrained, so parity is checked against the reference implementation."""
import contextlib
import os
import time
import zlib

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
    # Gemma 3: sliding (window 8) and global layers with separate rope bases, the global one linearly
    # scaled; query_pre_attn_scalar unlike head_dim; final-logit soft-capping.
    "gemma3": lambda: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=V, max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=False)),
    # Gemma3ForConditionalGeneration (4B/12B/27B on the hub): its language model, under language_model.model.
    "gemma3-multimodal": lambda: (transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=V, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0, bos_token_id=2, eos_token_id=1),
        vision_config=transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2,
        tie_word_embeddings=False)),  # tied, these tiny models repeat one token: a weak test
    # Phi-3 LongRoPE: original length 32, so generation crosses from short to long factors mid-way.
    "phi3-longrope": lambda: (transformers.Phi3ForCausalLM, transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=256, original_max_position_embeddings=32, pad_token_id=0,
        eos_token_id=1, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                         "long_factor": [1.5 + 0.5 * i for i in range(8)]})),
    "phi3-partial-rotary-sliding": lambda: (transformers.Phi3ForCausalLM, transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=V, max_position_embeddings=256, sliding_window=10, pad_token_id=0, eos_token_id=1,
        partial_rotary_factor=0.5)),
    "mixtral": lambda: (transformers.MixtralForCausalLM, transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2)),
    # Qwen2-MoE: shared expert with its sigmoid gate, top-2 of 6 not renormalised, a dense layer 1.
    "qwen2-moe": lambda: (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=V, max_position_embeddings=256,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    # Qwen3-MoE: q/k norms, top-3 of 8 renormalised.
    "qwen3-moe": lambda: (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=V, max_position_embeddings=256, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=True)),
}


# Seeds moved on from the variant's own where its greedy run had a near-tie (top-2 logits less than
# 1e-4 apart at some step: smollm-tied's were 3e-6 apart), which rounding could flip.
SEED_OFFSETS = {"smollm-tied": 2, "opt": 1, "llama3-gqa-rope-scaling": 1}


def make_checkpoint(name: str, path):
    """Save a tiny model with weights large enough that greedy choices are not near-ties."""
    cls, config = VARIANTS[name]()
    # crc32, not hash(): hash() changes with every process, and so would the weights
    torch.manual_seed(zlib.crc32(name.encode()) % 1000 + SEED_OFFSETS.get(name, 0))
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


def fail_at_layer_call(monkeypatch, engine, call: int, run) -> None:
    """run() with the engine's `call`-th layer call (1-based, over every pass) raising a simulated
    CUDA out-of-memory error, which run() must let out; the real layer is back afterwards."""
    real_layer, calls = engine.family.layer, []

    def failing_layer(cfg, w, x, step, kv):
        calls.append(1)
        if len(calls) == call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_layer(cfg, w, x, step, kv)

    monkeypatch.setattr(engine.family, "layer", failing_layer)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run()
    monkeypatch.setattr(engine.family, "layer", real_layer)


@contextlib.contextmanager
def reaped(proc):
    """proc never outlives the block: killed and waited for if it still runs at the end."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_while_running(proc, ready, timeout: float) -> None:
    """Poll ready() until true; fail with proc's stderr if it exits or timeout seconds pass first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
