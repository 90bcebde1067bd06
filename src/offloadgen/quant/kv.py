"""The KV cache in 4 or 8 bits (--kv-quant-bits, --kv-quant-group-size).

Keys and values are quantized as they are written, one token at a time or a prefill's tokens at
once, by the weights' codec (groupwise.quantize: asymmetric min/max, float16 scale and minimum,
every value within half a step). A token's vector of all KV heads, kv_heads * head_dim values, is
cut into groups of `group_size` along head_dim; a group larger than head_dim spans whole heads
(SmolLM2's heads are 64 wide, so its groups of 128 hold two, and the last group of its three heads
is padded as the weights' codec pads). The token's row is stored as one run of bytes, so the cache
keeps the layouts and copies of the dense cache with a shorter last axis:

    [codes: G * group_size * bits / 8 bytes | scales: G float16 | minimums: G float16]
                                                     G = ceil(kv_heads * head_dim / group_size)
4-bit codes pack element 2i in the low nibble of byte i and 2i + 1 in the high one. Readers
dequantize in registers (offload/cpu_attention_numba on the CPU, triton_kv on the GPU) or, here
in PyTorch, into a workspace of one layer and micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OffloadgenError
from .groupwise import QuantConfig, quantize


@dataclass(frozen=True)
class KVQuant:
    bits: int
    group_size: int
    kv_heads: int
    head_dim: int

    def __post_init__(self):
        QuantConfig(self.bits, self.group_size)  # checks bits and group size
        g, d = self.group_size, self.head_dim
        if d % g and g % d:
            raise OffloadgenError(f"KV quantization groups of {g} must divide the head size {d} or be whole heads")
        if self.codes_bytes % 2:  # the float16 scales that follow must be aligned
            raise OffloadgenError(f"KV quantization of {self.features} values a token in groups of {g} is not supported")

    @property
    def features(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def codes_bytes(self) -> int:
        return self.groups * self.group_size * self.bits // 8

    @property
    def groups(self) -> int:
        return -(-self.features // self.group_size)

    @property
    def row_bytes(self) -> int:
        """Bytes that one token's keys (or values) take, all KV heads."""
        return self.codes_bytes + 4 * self.groups

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., kv_heads * head_dim] (any float dtype, any device) -> uint8 [..., row_bytes]. On
        CUDA one Triton kernel (the same bytes); else PyTorch."""
        if x.is_cuda:
            from .triton_kv import encode_cuda
            return encode_cuda(self, x)
        lead = x.shape[:-1]
        qt = quantize(x.reshape(-1, self.features), QuantConfig(self.bits, self.group_size))
        row = torch.cat([qt.packed, qt.scale.view(torch.uint8), qt.min.view(torch.uint8)], dim=-1)
        return row.view(*lead, self.row_bytes)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [..., row_bytes] -> [..., kv_heads * head_dim] in dtype (into out if given). On CUDA
        one Triton kernel for 3-D row blocks; else PyTorch."""
        if rows.is_cuda and rows.dim() == 3:
            from .triton_kv import decode_cuda
            return decode_cuda(self, rows, dtype, out)
        c, g = self.codes_bytes, self.groups
        codes = rows[..., :c]
        if self.bits == 4:
            codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
        scale = rows[..., c:c + 2 * g].view(torch.float16).float()
        low = rows[..., c + 2 * g:].view(torch.float16).float()
        grouped = codes.unflatten(-1, (g, self.group_size)).float()
        dense = (grouped * scale[..., None] + low[..., None]).flatten(-2)[..., :self.features].to(dtype)
        if out is None:
            return dense
        return out.copy_(dense)


def kv_quant(bits: int | None, group_size: int, kv_heads: int, head_dim: int) -> KVQuant | None:
    """The codec for --kv-quant-bits (None or 16: the cache stays in the model's dtype)."""
    if bits is None or bits == 16:
        return None
    return KVQuant(bits, group_size, kv_heads, head_dim)
