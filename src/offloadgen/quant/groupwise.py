"""The codec: quantize on any device, dequantize with PyTorch (CPU) or Triton (GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OffloadgenError


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise OffloadgenError(f"quantization bits must be 4 or 8 (16 means none), got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise OffloadgenError(f"quantization group size must be even and at least 2, got {self.group_size}")

    def packed_shapes(self, shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
        rows, cols = shape
        groups = -(-cols // self.group_size)
        return {"packed": (rows, groups * self.group_size * self.bits // 8), "scale": (rows, groups),
                "min": (rows, groups)}

    def nbytes(self, shape: tuple[int, int]) -> int:
        s = self.packed_shapes(shape)
        return s["packed"][0] * s["packed"][1] + 2 * 2 * s["scale"][0] * s["scale"][1]


def check_group_size(config: QuantConfig, cfg) -> None:
    """Refuse a group size that exceeds or does not divide the input width of a quantized weight
    of this model (cfg: a models Config). Rows are padded to whole groups, so a group of 100000
    on a 768-wide model quantizes 130 times the weights it has (minutes and gigabytes)."""
    import math

    from ..models import family_of
    widths = sorted({shape[1] for local, (_, shape) in family_of(cfg).block_tensors(cfg, 0).items()
                     if is_quantized_tensor(0, local, shape)})
    bad = [w for w in widths if w % config.group_size]
    if bad:
        common = math.gcd(*widths)
        fits = [g for g in (128, 64, 32, 16) if common % g == 0] or [2]
        raise OffloadgenError(f"--quant-group-size {config.group_size}: it must divide the width of every quantized "
                              f"weight row of this model ({', '.join(map(str, widths))}); "
                              f"{fits[0]} does, and so does any even divisor of {common}")


@dataclass
class QuantizedTensor:
    packed: torch.Tensor  # uint8 [rows, padded_cols * bits / 8]
    scale: torch.Tensor  # float16 [rows, groups]
    min: torch.Tensor  # float16 [rows, groups]
    shape: tuple[int, int]  # the original [rows, cols]
    config: QuantConfig


# MoE routers and Qwen2-MoE's shared-expert gate choose discretely (top-k) or scale a whole
# expert: quantization error there changes which experts run, and they are tiny, so they stay 16-bit.
UNQUANTIZED = ("router", "shared_gate")


def is_quantized_tensor(block, local: str, shape: tuple) -> bool:
    """Linear weights of decoder layers; everything else stays in 16 bits."""
    return isinstance(block, int) and len(shape) == 2 and not local.endswith("bias") and local not in UNQUANTIZED


def quantize(w: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Asymmetric min/max per group. The float16 minimum is never above the group's minimum nor
    the scale below what the range needs, so every weight is within half a step of its value."""
    rows, cols = w.shape
    gs, levels = config.group_size, (1 << config.bits) - 1
    wf = w.float()
    pad = (-cols) % gs
    if pad:  # repeat the last column: padding must not widen the last group's range
        wf = torch.cat([wf, wf[:, -1:].expand(rows, pad)], dim=1)
    groups = wf.view(rows, -1, gs)
    lo, hi = groups.amin(-1), groups.amax(-1)
    # Round to nearest, then step one float16 ulp where that fell on the wrong side: exact grids
    # (e.g. weights that were already quantized) stay exact, and the range still covers the group.
    lo16 = lo.half()
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, float("-inf"))), lo16)
    scale = (hi - lo16.float()) / levels
    scale16 = scale.half()
    scale16 = torch.where(scale16.float() < scale, torch.nextafter(scale16, torch.full_like(scale16, float("inf"))),
                          scale16)
    scale16 = torch.where(scale16 > 0, scale16, torch.ones_like(scale16))  # constant group: any scale
    q = ((groups - lo16.float()[..., None]) / scale16.float()[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    q = q.view(rows, -1)
    if config.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedTensor(q.contiguous(), scale16, lo16, (rows, cols), config)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [rows, cols] weights; on CUDA through the Triton kernel, else plain PyTorch."""
    if qt.packed.is_cuda:
        from .triton_dequant import dequantize_cuda
        return dequantize_cuda(qt, dtype, out)
    rows, cols = qt.shape
    if qt.config.bits == 4:
        q = torch.stack([qt.packed & 0xF, qt.packed >> 4], dim=-1).view(rows, -1)
    else:
        q = qt.packed
    g = q.view(rows, -1, qt.config.group_size).float()
    dense = (g * qt.scale.float()[..., None] + qt.min.float()[..., None]).view(rows, -1)[:, :cols].to(dtype)
    if out is not None:
        out.copy_(dense)
        return out
    return dense
