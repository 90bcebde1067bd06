"""The left-padded batch the GPU correctness checks generate for, and how near a greedy run's
choices were to ties, so that a check can tell a rounding flip from a fault."""
from contextlib import contextmanager

import torch

from offloadgen import engine


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (6, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    return ids, mask


@contextmanager
def greedy_margins():
    """Collects, for every token the engine picks meanwhile, the gap between the two largest
    logits of its row: a list of [B] tensors, one per step."""
    gaps, real_sample = [], engine.sample

    def sample(logits, params, generator):
        top2 = logits.float().topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).cpu())
        return real_sample(logits, params, generator)

    engine.sample = sample
    try:
        yield gaps
    finally:
        engine.sample = real_sample


def first_difference(tokens: list, reference: list, gaps) -> tuple[int, int, float]:
    """(step, row, the reference's top-2 gap there) of the earliest token that differs; gaps
    indexed [step][row] (greedy_margins' list, or a [steps, rows] tensor)."""
    step, row = min((next(i for i, (a, b) in enumerate(zip(x, y)) if a != b), r)
                    for r, (x, y) in enumerate(zip(tokens, reference)) if x != y)
    return step, row, gaps[step][row].item()


def where_they_differ(tokens: list, reference: list, gaps: list) -> str:
    """'' if equal, else the first (step, row) that differs and the reference's margin there."""
    if tokens == reference:
        return ""
    step, row, gap = first_difference(tokens, reference, gaps)
    return f" (from step {step} of row {row}, where the reference's top-2 gap is {gap:.1e})"
