"""The batch the distributed tests generate for, in one process and split over ranks."""
import torch


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[4, :7] = 0
    return ids, mask
