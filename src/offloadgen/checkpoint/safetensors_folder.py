"""A Hugging Face model folder: config.json, *.safetensors (with or without an index), tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import OffloadgenError
from ..models import blocks, config_from_hf, family_of
from ..safetensors_io import DTYPES, SafetensorsFile, is_all_finite, read_many

# Checkpoints saved by older code name tensors without the model-class prefix (facebook's OPT:
# "decoder.layers.0..."; bigscience's BLOOM: "h.0..."), so each name is also tried without it.
_PREFIXES = ("model.", "transformer.")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise OffloadgenError(f"{self.path}: no config.json (is this a Hugging Face model folder?)")
        try:
            self.hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise OffloadgenError(f"{config_file}: not UTF-8 text (is it a config.json?)") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise OffloadgenError(f"{config_file}: not valid JSON ({e})") from None
        except OSError as e:
            raise OffloadgenError(f"{config_file}: cannot read it ({e.strerror})") from None
        self.cfg = config_from_hf(self.hf_config, str(config_file))
        self.family = family_of(self.cfg)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt*")):
                raise OffloadgenError(f"{self.path}: only pickled weights (*.bin/*.pt); offloadgen reads "
                                      "safetensors only, since unpickling can run arbitrary code")
            raise OffloadgenError(f"{self.path}: no *.safetensors files")
        self._handles: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                handle = SafetensorsFile(f)
            except OSError as e:
                raise OffloadgenError(f"{f}: cannot open it ({e.strerror})") from None
            self._handles[f] = handle
            for key in handle.keys():
                self._where[key] = f
        self._check_complete()

    def _resolve(self, hf_name: str) -> str | None:
        if hf_name in self._where:
            return hf_name
        for prefix in _PREFIXES:
            if hf_name.startswith(prefix) and hf_name[len(prefix):] in self._where:
                return hf_name[len(prefix):]
        return None

    def _check_complete(self) -> None:
        """Every tensor the config implies must be present with its shape, before any is loaded."""
        for block in blocks(self.cfg):
            for hf_name, shape in self.family.block_tensors(self.cfg, block).values():
                key = self._resolve(hf_name)
                if key is None:
                    raise OffloadgenError(f"{self.path}: tensor {hf_name!r} is missing from the safetensors files")
                handle = self._handles[self._where[key]]
                found = handle.shape(key)
                if found != tuple(shape):
                    raise OffloadgenError(f"{self.path}: tensor {hf_name!r} has shape {found}, "
                                          f"config.json implies {tuple(shape)}")
                if handle.dtype_name(key) not in FLOAT_DTYPES:  # integers are quantized or not weights at all
                    raise OffloadgenError(f"{self.path}: tensor {hf_name!r} is stored as {handle.dtype_name(key)}; "
                                          f"weights must be floating point ({', '.join(FLOAT_DTYPES)})")

    def read_block(self, block, dtype: torch.dtype, out: dict[str, torch.Tensor] | None = None,
                   skip=()) -> dict[str, torch.Tensor]:
        """A block's tensors as `dtype`, read straight from the files into out's tensors (e.g. the
        views of a packed host buffer) where given, else into new ones; names in skip are not read
        (a tied tensor already loaded with an earlier block). Every tensor is checked finite."""
        result, reads, conversions = {}, [], []
        for local, (hf_name, shape) in self.family.block_tensors(self.cfg, block).items():
            if local in skip:
                continue
            key = self._resolve(hf_name)
            handle = self._handles[self._where[key]]
            dst = out[local] if out is not None else torch.empty(shape, dtype=dtype)
            stored = DTYPES[handle.dtype_name(key)]
            if stored == dtype and dst.is_contiguous() and dst.device.type == "cpu":
                reads.append((handle, key, dst))
            else:  # another dtype on disk, or a destination elsewhere: through a temporary
                tmp = torch.empty(shape, dtype=stored)
                reads.append((handle, key, tmp))
                conversions.append((dst, tmp))
            result[local] = (key, dst)
        read_many(reads)  # the whole block's reads queued at once
        for dst, tmp in conversions:
            dst.copy_(tmp)
        for local, (key, dst) in result.items():
            if not is_all_finite(dst):
                raise OffloadgenError(f"{self._where[key]}: tensor {key!r} holds NaN or infinite values as "
                                      f"{str(dtype).replace('torch.', '')}: the checkpoint is damaged, or its values "
                                      "do not fit that dtype (try --dtype float32)")
        return {local: dst for local, (_, dst) in result.items()}

    def nbytes(self) -> int:
        """Bytes of tensor data the folder's files hold."""
        return sum(h.nbytes(k) for h in self._handles.values() for k in h.keys())

    def tokenizer(self):
        from ..tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(self.path, self.cfg)
