"""Page-locked (pinned) host memory, made quickly.

torch.empty(..., pin_memory=True) goes through PyTorch's caching host allocator, which rounds
each allocation up to a power of two (a 1.23 GB layer takes 2 GB) and locks pages on one thread
(1.3 GB/s measured; docs/performance.md). Here each buffer is an ordinary allocation registered with
cudaHostRegister, exact in size, and several buffers are registered at once from a thread pool.
"""
from __future__ import annotations

import ctypes
import functools
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import OffloadgenError


def _register(t: torch.Tensor, device: torch.device | int) -> bool:
    # A new thread's current GPU is 0: registering from it would open a CUDA context on GPU 0 in
    # every rank of a node, memory no budget counts. The caller's GPU is made current instead.
    with torch.cuda.device(device):
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    return int(err) == 0


def pin_tensors(tensors: list[torch.Tensor], threads: int = 8, device: torch.device | None = None) -> list[bool]:
    """Register each tensor's memory as pinned, from `threads` threads with `device` (the
    caller's current GPU by default) current; returns which succeeded (the rest stay pageable)."""
    if not torch.cuda.is_available() or not tensors:
        return [False] * len(tensors)
    torch.cuda.init()
    device = torch.cuda.current_device() if device is None else device
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda t: _register(t, device), tensors))


def unpin_tensors(tensors: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        return
    cudart = torch.cuda.cudart()
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())


_cudart_lib = None


def _cudart():
    """The CUDA runtime library PyTorch loaded, through ctypes, for what torch.cuda.cudart() lacks
    (cudaHostAlloc); None where PyTorch has none loaded as its own library (cudart linked
    statically) or it cannot be opened: the caller then falls back to registered memory."""
    global _cudart_lib
    if _cudart_lib is None:
        torch.cuda.init()
        maps = Path("/proc/self/maps")
        # a line is "address perms offset dev inode path": the path may hold spaces
        paths = [fields[5] for line in (maps.read_text().splitlines() if maps.exists() else ())
                 if len(fields := line.split(maxsplit=5)) == 6 and "libcudart.so" in fields[5]]
        lib = False
        try:
            lib = ctypes.CDLL(paths[0]) if paths else False
        except OSError:  # e.g. "(deleted)": the file was replaced after it was loaded
            pass
        if lib:
            lib.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
            lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        # published only with its argtypes set: the fill threads call this at once, and one that
        # took the library before them would pass sizes as C ints (over 2 GiB refused)
        _cudart_lib = lib
    return _cudart_lib or None


def _free_host(lib, ptr: int, device: torch.device | None) -> None:
    with torch.cuda.device(device):
        lib.cudaFreeHost(ptr)


def driver_pinned(nbytes: int, device: torch.device | None = None) -> torch.Tensor | None:
    """nbytes of page-locked memory allocated by the CUDA driver (cudaHostAlloc, what pin_memory()
    uses, without its caching allocator's rounding up to a power of two), as a uint8 tensor whose
    memory is freed when the last view of it goes; None without CUDA or where it is refused.

    Four H100s copying from such memory at once, one thread each, moved 171-194 GB/s together;
    from ordinary memory registered with cudaHostRegister, 108-150 in 9 of 10 cases
    (benchmarks/link_patterns.py, two leases). A whole all-gather run did not show that
    difference (docs/distributed.md).

    `device` (the rank's GPU) is made current around the runtime's calls: a fill thread's current
    device is otherwise GPU 0, and the call would open a CUDA context there in every rank."""
    lib = _cudart() if torch.cuda.is_available() and nbytes > 0 else None
    if lib is None:
        return None
    ptr = ctypes.c_void_p()
    with torch.cuda.device(device):
        if lib.cudaHostAlloc(ctypes.byref(ptr), nbytes, 1) != 0:  # 1: cudaHostAllocPortable, every context
            lib.cudaGetLastError()  # clear the error so that it is not reported by an unrelated later call
            return None
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr.value)
    # torch.frombuffer keeps buf while a view lives; at exit the process's end frees it, after CUDA's
    weakref.finalize(buf, _free_host, lib, ptr.value, device).atexit = False
    return torch.frombuffer(buf, dtype=torch.uint8)


@functools.cache
def copy_chunk() -> int:
    """The piece size of copy_in_chunks, for every host-to-device copy in pieces (streamed weights
    and the offloaded KV cache): 64 MB, or OFFLOADGEN_COPY_CHUNK_MB for A/B runs (4 H100s copying
    at once moved 1-7% more in whole 0.3 GB copies in link_patterns; an all-gather run did not
    gain: docs/distributed.md)."""
    raw = os.environ.get("OFFLOADGEN_COPY_CHUNK_MB", "64")
    if not raw.isdigit() or int(raw) == 0:
        raise OffloadgenError(f"OFFLOADGEN_COPY_CHUNK_MB must be a whole number of megabytes above 0; got {raw!r}")
    return int(raw) << 20


def copy_in_chunks(dst: torch.Tensor, src: torch.Tensor, chunk: int | None = None) -> None:
    """dst.copy_(src, non_blocking=True) for contiguous tensors, as several copies of `chunk` bytes
    (copy_chunk()'s by default).

    Copies in the same direction from different streams share the copy engine in submission
    order: a small copy on the compute stream (an attention output going back to the GPU) would
    otherwise wait behind a whole 1 GB layer. In 64 MB pieces it waits at most about a
    millisecond, and the pieces still run at full bus speed."""
    chunk = chunk or copy_chunk()
    d = dst.reshape(-1).view(torch.uint8)
    s = src.reshape(-1).view(torch.uint8)
    for off in range(0, s.numel(), chunk):
        d[off:off + chunk].copy_(s[off:off + chunk], non_blocking=True)


class _HostPointer:
    """A pinned host buffer handed to a Triton kernel as a pointer: with unified addressing the
    GPU reads page-locked host memory directly over the bus, through its SMs, not a copy engine."""

    def __init__(self, t: torch.Tensor):
        self.t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


_zero_copy_ok: bool | None = None  # unknown until first tried


def zero_copy_used() -> bool | None:
    """Whether attention outputs return to the GPU through the zero-copy kernel (None: not tried)."""
    return _zero_copy_ok


def to_device_zero_copy(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small pinned host tensor on the GPU, read by a kernel instead of a copy engine.

    The copy engines serve host-to-device copies in the order they were queued, from every stream:
    an attention output copied back with .to() waits until the layer of weights queued before it
    has crossed (about 20 ms for OPT-30B), once per layer. A kernel that loads from the mapped
    host memory is not queued behind them. Falls back to .to() where Triton cannot do it."""
    global _zero_copy_ok
    if _zero_copy_ok is not False:
        try:
            from .triton_copy import copy_from_host
            out = torch.empty(host.shape, dtype=host.dtype, device=device)
            copy_from_host(_HostPointer(host), out, host.numel())
            _zero_copy_ok = True
            return out
        except Exception:
            if _zero_copy_ok:  # it worked before: a real failure, not a missing capability
                raise
            _zero_copy_ok = False
    return host.to(device, non_blocking=True)
