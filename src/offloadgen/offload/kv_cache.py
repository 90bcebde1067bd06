"""The KV cache: per layer, keys and values [batch, kv_heads, max_len, head_dim] on one device."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def layer(self, i: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i][rows], self.v[i][rows]

    @staticmethod
    def nbytes_for(n_layers, batch, max_len, kv_heads, head_dim, dtype) -> int:
        return 2 * n_layers * batch * max_len * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
