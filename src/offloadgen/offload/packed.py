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
        # each quantized tensor has its own place in the dense workspace, so a layer's parts
        # dequantized at different times (its trunk, then its experts) do not overwrite each other
        self.dense_offset, n = {}, 0
        for local, shape in self.quantized.items():
            self.dense_offset[local] = n
            n += math.prod(shape)
        self.dense_numel = n

    def span(self, locals_: set[str]) -> tuple[int, int]:
        """The byte range [lo, hi) that these tensors' entries take in the flat buffer; they must
        be contiguous (an expert's three matrices are: see models/moe.py)."""
        keys = [k for k in self.entries if k in locals_ or k.rsplit(".", 1)[0] in locals_]
        lo = min(self.entries[k][0] for k in keys)
        hi = max(self.entries[k][0] + _padded(self.entries[k]) for k in keys)
        assert hi - lo == sum(_padded(self.entries[k]) for k in keys), "entries are not contiguous"
        return lo, hi

    def views(self, flat: torch.Tensor, locals_: set[str] | None = None, base: int = 0) -> dict[str, torch.Tensor]:
        """Tensors over a flat buffer holding the block (or, with `base`, its bytes from `base` on);
        with `locals_`, only those tensors' entries."""
        return {key: flat[off - base:off - base + math.prod(shape) * _elem(dt)].view(dt).view(shape)
                for key, (off, dt, shape) in self.entries.items()
                if locals_ is None or key in locals_ or key.rsplit(".", 1)[0] in locals_}

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

    def dense(self, flat: torch.Tensor, workspace: torch.Tensor | None, locals_: set[str] | None = None,
              base: int = 0) -> dict[str, torch.Tensor]:
        """The block's tensors (or those named in `locals_`) as dense weights: views into `flat`,
        quantized ones dequantized into their place in the workspace."""
        views = self.views(flat, locals_, base)
        out = {}
        for key, t in views.items():
            local = key.rsplit(".", 1)[0]
            if local in self.quantized and key.endswith(".packed"):
                shape = self.quantized[local]
                pos = self.dense_offset[local]
                qt = QuantizedTensor(t, views[local + ".scale"], views[local + ".min"], shape, self.quant)
                out[local] = dequantize(qt, self.dtype, out=workspace[pos:pos + math.prod(shape)].view(shape))
            elif local not in self.quantized:
                out[key] = t
        return out


def _padded(entry) -> int:
    _, dt, shape = entry
    return -(-math.prod(shape) * _elem(dt) // ALIGN) * ALIGN


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
