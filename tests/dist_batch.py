"""The batch the distributed tests generate for, in one process and split over ranks."""
import torch


def fixed_batch(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: 6 splits over 2 and 3 ranks; the GPU check asks for 4 a rank (at least 5: two rows are padded)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (rows, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[4, :7] = 0
    return ids, mask
