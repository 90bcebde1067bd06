"""Accuracy of the 4/8-bit KV cache on the embedded SmolLM2-135M (real weights), on the CPU.

For 8 and 4 bits with groups of 32, 64 and 128 against the float32 cache (weights unchanged):
  - logits error: ||logits_q - logits|| / ||logits|| at each decode step, teacher forced with the
    float32 cache's greedy tokens so that both read the same context; the last step's (32nd
    token) and the mean over the 31 decode steps (the prefill attends before quantizing, so its
    logits are equal);
  - greedy agreement: share of prompts whose 32 greedy tokens are all identical to the float32
    cache's, and the mean length of the agreeing prefix.
    python benchmarks/kv_quant_accuracy.py
SmolLM2's heads are 64 wide (3 KV heads): groups of 128 span two heads, the third padded.
"""
import sys

import torch

sys.path.insert(0, "src")
import offloadgen  # noqa: E402
from offloadgen.engine import Engine  # noqa: E402
from offloadgen.sampling import SamplingParams  # noqa: E402

sys.path.insert(0, "benchmarks")
from quant_accuracy import N, PROMPTS  # noqa: E402  (the same prompts as the weights' table)


def engine_with(base, kv_quant):
    e = base.engine
    return Engine(e.cfg, e.weights, e.device, e.dtype, kv_quant=kv_quant)


def greedy(engine, ids, mask):
    return engine.generate(ids, mask, SamplingParams(max_new_tokens=N, ignore_eos=True), set(), 0).tokens


def forced_logits(engine, ids, mask, tokens):
    """Logits [B, N, V] of the prefill and N - 1 decode steps fed `tokens` [B, N]."""
    batch, prompt = ids.shape
    mask = mask.bool()
    cache = engine.new_cache(batch, prompt + N)
    key_valid = torch.zeros(batch, prompt + N, dtype=torch.bool)
    key_valid[:, :prompt] = mask
    positions, n_real = (mask.long().cumsum(-1) - 1).clamp(min=0), mask.long().sum(-1)
    out = [engine.forward(ids, engine._steps(0, positions, key_valid[:, :prompt]), cache)]
    for i in range(N - 1):
        slot = prompt + i
        key_valid[:, slot] = True
        steps = engine._steps(slot, (n_real + i)[:, None], key_valid[:, :slot + 1])
        out.append(engine.forward(tokens[:, i:i + 1], steps, cache))
    return torch.stack(out, 1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


with torch.inference_mode():
    base = offloadgen.load(device="cpu", progress=False)
    ids, mask = base.encode_batch(PROMPTS)
    ref_tokens = greedy(base.engine, ids, mask)
    forced = torch.tensor(ref_tokens)
    ref_logits = forced_logits(base.engine, ids, mask, forced)
    print(f"{'bits':>4s} {'group':>5s} {'last-logit rel. error':>21s} {'mean over steps':>15s} "
          f"{'prompts identical (32 tok)':>27s} {'mean agreeing prefix':>21s}")
    for bits in (8, 4):
        for group in (32, 64, 128):
            engine = engine_with(base, (bits, group))
            logits = forced_logits(engine, ids, mask, forced)
            steps = [rel(logits[:, i], ref_logits[:, i]) for i in range(1, N)]
            tokens = greedy(engine, ids, mask)
            prefix = [next((j for j, (a, b) in enumerate(zip(t, r)) if a != b), N) for t, r in zip(tokens, ref_tokens)]
            same = sum(p == N for p in prefix)
            print(f"{bits:4d} {group:5d} {steps[-1]:21.4f} {sum(steps) / len(steps):15.4f} "
                  f"{same:>21d}/{len(PROMPTS):<5d} {sum(prefix) / len(prefix):18.1f}/{N}")
