"""Safetensors files read straight into the buffers that keep the weights, at the disk's speed.

The `safetensors` package maps each file and copies a tensor out of the mapping: the pages it
touched stay mapped for as long as the file is open, so a loaded model counts twice in the
process's resident memory (the mapping and the copy), and the copy runs on one thread. Here the
header is parsed once, and a tensor's bytes are read with pread() in 16 MiB pieces, from a pool
of threads, into a tensor the caller owns: the final packed block, the resident tensor, or a
temporary one where the stored dtype must be converted. No mapping, no second copy.

write_safetensors writes the same format (a header, then the bytes) from tensors in place.
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import OffloadgenError

PIECE = 16 << 20  # bytes per pread: several in flight keep a disk's queue full
READ_THREADS = 8
MAX_HEADER = 100 << 20  # the safetensors package's own limit

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_read = [0]  # bytes read by this process, for benchmarks/load_speed.py


def bytes_read() -> int:
    """Bytes this process has read from safetensors files so far."""
    return _read[0]


def _reader_pool() -> ThreadPoolExecutor:
    """One pool for every read in the process: nested fills (several blocks at once, each in
    pieces) share it, so the disk sees a bounded queue. Pieces never submit work themselves."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="offloadgen-read")
        return _pool


def byte_view(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, writable, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pread_all(jobs: list[tuple[int, int, memoryview, str]]) -> None:
    """Each (fd, file offset, destination, what) filled from its file, all at once: every job is
    cut into PIECE-sized reads and all of them are queued together on the reader pool, so small
    tensors (a layer's norms and biases, or a model's 8 MB projections) read in parallel too,
    and the disk's queue does not drain between tensors."""
    def read(fd: int, offset: int, piece: memoryview, where: str) -> None:
        done = 0
        while done < len(piece):
            n = os.preadv(fd, [piece[done:]], offset + done)
            if n <= 0:
                raise OffloadgenError(f"{where}: the file ended early (truncated?)")
            done += n
        with _pool_lock:
            _read[0] += done
    pieces = [(fd, offset + start, dst[start:start + PIECE], where)
              for fd, offset, dst, where in jobs for start in range(0, len(dst), PIECE)]
    if len(pieces) == 1:
        read(*pieces[0])
        return
    futures = [_reader_pool().submit(read, *p) for p in pieces]
    for future in futures:  # all waited for, so no read is still writing when an error is raised
        future.exception()
    for future in futures:
        future.result()


class SafetensorsFile:
    """One safetensors file: its header parsed, its tensors read on request with read_into."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _bad(self, why: str) -> OffloadgenError:
        return OffloadgenError(f"{self.path}: not a readable safetensors file, truncated or corrupt ({why})")

    def _parse_header(self) -> None:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise self._bad("shorter than its 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER or 8 + n > size:
            raise self._bad(f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        data_start, data_size = 8 + n, size - 8 - n
        self.tensors: dict[str, tuple[str, tuple, int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                ok = (isinstance(dtype, str) and all(type(d) is int and d >= 0 for d in shape)
                      and type(start) is int and type(end) is int and 0 <= start <= end <= data_size)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise self._bad(f"tensor {name!r} has a malformed entry")
            if dtype in DTYPES and end - start != math.prod(shape) * _elem(DTYPES[dtype]):
                raise self._bad(f"tensor {name!r}: {end - start} bytes for shape {list(shape)} of {dtype}")
            self.tensors[name] = (dtype, shape, data_start + start, data_start + end)

    def keys(self):
        return self.tensors.keys()

    def dtype_name(self, name: str) -> str:
        return self.tensors[name][0]

    def shape(self, name: str) -> tuple:
        return self.tensors[name][1]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self.tensors[name]
        return end - start

    def read_job(self, name: str, dst: torch.Tensor) -> tuple[int, int, memoryview, str]:
        """What read_many needs to read the tensor's bytes into dst (contiguous, on the CPU, of the
        stored dtype's size)."""
        _, _, start, end = self.tensors[name]
        view = byte_view(dst)
        if len(view) != end - start:
            raise ValueError(f"{name}: {end - start} bytes stored, the destination holds {len(view)}")
        return self.fd, start, view, f"{self.path}: {name!r}"

    def read_into(self, name: str, dst: torch.Tensor) -> torch.Tensor:
        read_many([(self, name, dst)])
        return dst

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _, _ = self.tensors[name]
        if dtype not in DTYPES:
            raise OffloadgenError(f"{self.path}: tensor {name!r} is stored as {dtype}, which offloadgen does not read")
        return self.read_into(name, torch.empty(shape, dtype=DTYPES[dtype]))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def read_many(reads: list[tuple[SafetensorsFile, str, torch.Tensor]]) -> None:
    """Several tensors (file, name, destination) read at once, in parallel pieces."""
    try:
        pread_all([f.read_job(name, dst) for f, name, dst in reads])
    except OSError as e:
        raise OffloadgenError(f"cannot read the weights ({e.filename or ''} {e.strerror})") from None


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file from CPU tensors, written from their memory (no serialised copy), synced."""
    header, pos = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(byte_view(t.contiguous()))
        f.flush()
        os.fsync(f.fileno())


def is_all_finite(t: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite. A sum in the tensor's own type is 20-40x faster on
    the CPU than one upcast to float64 (19 GB/s against 0.5 for float16, one core); NaN and inf
    always make it non-finite, and where finite values only overflow it, the exact check says so."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return True
    return math.isfinite(t.sum()) or bool(torch.isfinite(t).all())


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
