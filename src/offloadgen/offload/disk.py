"""Weights on disk (`--disk-offload --offload-dir DIR`), for models larger than CPU RAM.

Each streamed block is written once, in the same packed byte layout the GPU ring receives
(quantized entries included), to its own file padded to 4 KiB, under a folder named after the
model, dtype and quantization. A manifest written last says the folder is complete, so an
interrupted write is redone, never half-used. During a step, reader threads fill a page-aligned
pinned buffer with O_DIRECT reads of 16 MiB pieces in parallel: the page cache is bypassed, so a
step's speed is the disk's, not RAM's, and a model larger than RAM needs no RAM for its weights.
Where the filesystem refuses O_DIRECT (tmpfs, some overlays), reads are buffered and each file
is dropped from the page cache after it is read (posix_fadvise DONTNEED); the run says which.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import OffloadgenError

ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the device's block
PIECE = 16 << 20  # bytes per read call; several in flight keep a virtual disk's queue full
GiB = 1 << 30


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 tensor (anonymous mmap), usable as an O_DIRECT target."""
    m = mmap.mmap(-1, padded(max(nbytes, 1)))
    t = torch.frombuffer(m, dtype=torch.uint8)
    t._offloadgen_mmap = m  # keep the mapping alive as long as the tensor
    return t


def checkpoint_identity(checkpoint) -> tuple[str, str]:
    """(readable name, identity) of where the weights come from: a folder's path with its files'
    sizes and modification times, or a dummy model's config."""
    path = checkpoint.path
    if path is not None:
        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return Path(path).name, f"{Path(path).resolve()}|{stamp}"
    return f"dummy-{checkpoint.cfg.model_type}-{checkpoint.cfg.n_layers}x{checkpoint.cfg.hidden_size}", repr(checkpoint.cfg)


def store_key(checkpoint, dtype: torch.dtype, quant, layouts: dict) -> str:
    """Folder name: readable model name plus a hash of everything that changes the bytes."""
    model, identity = checkpoint_identity(checkpoint)
    desc = json.dumps({"source": identity, "dtype": str(dtype), "quant": None if quant is None else [quant.bits, quant.group_size],
                       "blocks": {str(b): [l.nbytes, sorted(l.entries)] for b, l in layouts.items()}}, sort_keys=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)[-60:]
    return f"{name}-{hashlib.sha256(desc.encode()).hexdigest()[:12]}"


class DiskStore:
    def __init__(self, root: str | os.PathLike, key: str, layouts: dict, threads: int = 8):
        self.root = Path(os.path.expanduser(str(root)))
        self.path = self.root / key
        self.layouts = layouts
        self.files = {b: self.path / f"block-{b}.bin" for b in layouts}
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="offloadgen-disk")
        self.direct = hasattr(os, "O_DIRECT")
        self.stats = {"read_bytes": 0, "read_s": 0.0}

    @property
    def nbytes(self) -> int:
        return sum(padded(l.nbytes) for l in self.layouts.values())

    def complete(self) -> bool:
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            return False
        try:
            m = json.loads(manifest.read_text())
        except ValueError:
            return False
        return all(self.files[b].is_file() and self.files[b].stat().st_size == padded(self.layouts[b].nbytes)
                   and m["blocks"].get(str(b)) == self.layouts[b].nbytes for b in self.layouts)

    def check_space(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OffloadgenError(f"--offload-dir {self.root}: cannot create it ({e.strerror})") from None
        free = shutil.disk_usage(self.root).free
        have = sum(f.stat().st_size for f in self.files.values() if f.is_file())
        need = self.nbytes - have + 256 * (1 << 20)
        if need > free:
            raise OffloadgenError(f"--offload-dir {self.root}: the weights need {self.nbytes / GiB:.1f} GiB on disk "
                                  f"({need / GiB:.1f} GiB more), {free / GiB:.1f} GiB is free: choose another "
                                  f"--offload-dir, quantize (--quant-bits 4), or free space")

    def write(self, parts_of, progress=None) -> float:
        """Write every block that is not already there (parts_of(block) -> {entry: tensor}); returns
        seconds spent. The manifest goes last: a folder without it is not trusted."""
        t0 = time.perf_counter()
        if self.complete():
            return 0.0
        self.check_space()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "manifest.json").unlink(missing_ok=True)
        buf = None
        for b, layout in self.layouts.items():
            size = padded(layout.nbytes)
            if buf is None or buf.numel() < size:
                buf = torch.zeros(size, dtype=torch.uint8)
            flat = buf[:size]
            flat.zero_()
            layout.write(flat, parts_of(b))
            tmp = self.files[b].with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(memoryview(flat.numpy()))
                f.flush()
                os.fsync(f.fileno())
                _drop_from_page_cache(f.fileno())
            os.replace(tmp, self.files[b])
            if progress:
                progress()
        manifest = {"blocks": {str(b): l.nbytes for b, l in self.layouts.items()}, "written": time.strftime("%F %T")}
        (self.path / "manifest.json").write_text(json.dumps(manifest))
        return time.perf_counter() - t0

    def read_into(self, block, dst: torch.Tensor) -> None:
        """Read a block's file into dst (page-aligned, at least padded(nbytes) long)."""
        t0 = time.perf_counter()
        size = padded(self.layouts[block].nbytes)
        view = memoryview(dst[:size].numpy())
        fd = self._open(self.files[block])
        try:
            pieces = [(off, min(PIECE, size - off)) for off in range(0, size, PIECE)]
            for done, want in zip(self.pool.map(lambda p: os.preadv(fd, [view[p[0]:p[0] + p[1]]], p[0]), pieces),
                                  pieces):
                if done != want[1]:
                    raise OffloadgenError(f"{self.files[block]}: short read ({done} of {want[1]} bytes at {want[0]}); "
                                          f"the offload folder is damaged: delete {self.path} to rewrite it")
            if not self.direct:
                _drop_from_page_cache(fd)
        finally:
            os.close(fd)
        self.stats["read_bytes"] += size
        self.stats["read_s"] += time.perf_counter() - t0

    def _open(self, path: Path) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct = False  # e.g. tmpfs: buffered reads, dropped from the cache after use
        return os.open(path, os.O_RDONLY)

    def read_bandwidth(self, max_bytes: int = 8 * GiB) -> float:
        """Bytes/s of this store's own reads (O_DIRECT where allowed) over the first blocks' files,
        up to max_bytes: the disk limit a step is compared with, measured in the same run."""
        largest = max(padded(l.nbytes) for l in self.layouts.values())
        buf = aligned_buffer(largest)
        total, t0 = 0, time.perf_counter()
        before = dict(self.stats)
        for b in self.layouts:
            self.read_into(b, buf)
            total += padded(self.layouts[b].nbytes)
            if total >= max_bytes:
                break
        self.stats = before
        return total / (time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _drop_from_page_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
