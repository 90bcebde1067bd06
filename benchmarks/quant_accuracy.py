"""Accuracy of group-wise quantization on the embedded SmolLM2-135M (real weights), on the CPU.

For 8 and 4 bits with group sizes 32, 64 and 128 against the 16-bit-free float32 model:
  - logits error: ||logits_q - logits|| / ||logits|| over every position of the prompts (teacher forced);
  - greedy agreement: share of the 32 greedy tokens equal to the unquantized model's, per prompt,
    up to the first difference (after it the texts diverge and comparing further says little).
    python benchmarks/quant_accuracy.py
Note: SmolLM2 ships as Q4_1 (4-bit, groups of 32 along the input dimension), so its weights already
lie on a 4-bit grid in groups of 32; our 4-bit/32 lands on nearly the same grid and looks better
than it would on a float checkpoint.
"""
import sys

import torch

sys.path.insert(0, "src")
import offloadgen  # noqa: E402
from offloadgen.sampling import SamplingParams  # noqa: E402

PROMPTS = ["Paris is the capital city of", "The three primary colors are", "def fibonacci(n):",
           "Water boils at a temperature of", "The largest planet in the solar system is",
           "Once upon a time, in a small village,", "To make a cup of tea, first", "import numpy as np\n",
           "The French Revolution began in", "Photosynthesis is the process by which"]
N = 32


def run(llm):
    ids, mask = llm.encode_batch(PROMPTS)
    out = llm.engine.generate(ids, mask, SamplingParams(max_new_tokens=N, ignore_eos=True), set(),
                              llm.tokenizer.pad_token_id)
    return out.tokens


def prompt_logits(llm):
    """All positions' logits of the prompts, through the engine's blocks (teacher forcing)."""
    from offloadgen.models.layers import StepInputs
    ids, mask = llm.encode_batch(PROMPTS)
    eng = llm.engine
    fam, cfg, w = eng.family, eng.cfg, eng.weights
    cache = eng.new_cache(ids.shape[0], ids.shape[1])
    step = StepInputs(0, (mask.cumsum(-1) - 1).clamp(min=0), mask.bool())
    fam.prepare(cfg, step, eng.dtype)
    h = fam.embed(cfg, w.get("embed"), ids, step)
    w.done("embed")
    for i in range(cfg.n_layers):
        h = fam.layer(cfg, w.get(i), h, step, cache.layer(i, 0, slice(None)))
        w.done(i)
    logits = fam.head(cfg, w.get("head"), h)
    w.done("head")
    return logits[mask.bool()]


def main():
    with torch.inference_mode():
        base = offloadgen.load(device="cpu", progress=False)
        ref_tokens, ref_logits = run(base), prompt_logits(base)
        print(f"{'bits':>4s} {'group':>5s} {'logits rel. error':>17s} {'prompts identical (32 tok)':>27s} {'mean agreeing prefix':>21s}")
        for bits in (8, 4):
            for group in (32, 64, 128):
                llm = offloadgen.load(device="cpu", progress=False, quant_bits=bits, quant_group_size=group,
                                      tokenizer=base.tokenizer)
                tokens, logits = run(llm), prompt_logits(llm)
                rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                prefix = [next((j for j, (a, b) in enumerate(zip(t, r)) if a != b), N) for t, r in zip(tokens, ref_tokens)]
                same = sum(p == N for p in prefix)
                print(f"{bits:4d} {group:5d} {rel:17.4f} {same:>21d}/{len(PROMPTS):<5d} {sum(prefix) / len(prefix):18.1f}/{N}")


if __name__ == "__main__":  # kv_quant_accuracy.py imports its prompts
    main()
