"""One block's tensors laid out in a single flat byte buffer: the unit that crosses the bus.

One large copy runs at full bus speed; many small ones do not. The same layout is used in pinned
host memory, in the GPU ring, on disk (`disk.py`) and by the planner to size blocks (quantized
blocks are smaller), so a block's bytes mean the same thing everywhere.
"""
from __future__ import annotations

import math

import torch

from ..quant import QuantConfig, QuantizedTensor, dequantize, is_quantized_tensor, quantize

ALIGN = 256  # bytes: keeps every tensor view aligned for vectorised kernels


class PackedBlock:
    """One block's tensors laid out in a single flat byte buffer.

    A 16-bit tensor is one entry; a quantized one is three (packed values, scales, minimums) and
    is turned back into dense weights by `dense`, into a workspace shared by all blocks.
    """

    def __init__(self, block, shapes: dict[str, tuple], dtype: torch.dtype, quant: QuantConfig | None = None):
        self.block, self.dtype, self.quant = block, dtype, quant
        self.entries: dict[str, tuple[int, torch.dtype, tuple]] = {}
        self.quantized: dict[str, tuple] = {}
        pos = 0

        def add(key, dt, shape):
            nonlocal pos
            self.entries[key] = (pos, dt, tuple(shape))
            pos += -(-math.prod(shape) * _elem(dt) // ALIGN) * ALIGN

        for local, shape in shapes.items():
            if quant is not None and is_quantized_tensor(block, local, shape):
                self.quantized[local] = tuple(shape)
                for part, pshape in quant.packed_shapes(shape).items():
                    add(f"{local}.{part}", torch.uint8 if part == "packed" else torch.float16, pshape)
            else:
                add(local, dtype, shape)
        self.nbytes = pos
        self.dense_numel = sum(math.prod(s) for s in self.quantized.values())

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: flat[off:off + math.prod(shape) * _elem(dt)].view(dt).view(shape)
                for key, (off, dt, shape) in self.entries.items()}

    def encode(self, tensors: dict[str, torch.Tensor], quant_device: torch.device) -> dict[str, torch.Tensor]:
        """A block's 16-bit tensors as this layout's entries, quantizing where the layout says so."""
        parts = {}
        for local, t in tensors.items():
            if local in self.quantized:
                qt = quantize(t.to(quant_device), self.quant)
                for part in ("packed", "scale", "min"):
                    parts[f"{local}.{part}"] = getattr(qt, part)
            else:
                parts[local] = t
        return parts

    def write(self, flat: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        views = self.views(flat)
        for key, t in parts.items():
            views[key].copy_(t)

    def dense(self, flat: torch.Tensor, workspace: torch.Tensor | None) -> dict[str, torch.Tensor]:
        views = self.views(flat)
        out, pos = {}, 0
        for key, t in views.items():
            local = key.rsplit(".", 1)[0]
            if local in self.quantized and key.endswith(".packed"):
                shape = self.quantized[local]
                n = math.prod(shape)
                qt = QuantizedTensor(t, views[local + ".scale"], views[local + ".min"], shape, self.quant)
                out[local] = dequantize(qt, self.dtype, out=workspace[pos:pos + n].view(shape))
                pos += n
            elif local not in self.quantized:
                out[key] = t
        return out


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
