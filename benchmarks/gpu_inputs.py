"""The left-padded batch the GPU correctness checks generate for."""
import torch


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (6, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    return ids, mask
