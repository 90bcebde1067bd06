"""What each of PyTorch's attention kernels costs offloadgen's GPU attention, CPU and GPU apart.

models/layers.sdpa passes an additive mask (continuous batching: each row at its own length), and
PyTorch then picks cuDNN's attention first on Hopper. cuDNN builds an execution plan for every new
shape; a decode pass's key length grows by one each pass, so its shape is always new. This times
calls of OPT-30B's attention shape (56 heads of 128, fp16) with the key length new at every call
("growing", as decode) and the same at every call ("fixed"), per kernel:

  - issue ms: the CPU time of one call (what a layer's launch stalls on);
  - GPU ms: one call on the GPU's clock (CUDA events around all calls; equal to issue ms where
    the CPU is the slower).

    python benchmarks/sdpa_backends.py [--batch 8] [--calls 200]

Needs a CUDA GPU. Prints one row per kernel and case, then the largest difference of each kernel's
output from the math kernel's.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from offloadgen.models import layers  # noqa: E402

KERNELS = {
    "torch's choice": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def inputs(batch: int, t: int, keys: int, heads: int, head_dim: int):
    q = torch.randn(batch, heads, t, head_dim, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, heads, keys, head_dim, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    mask = torch.zeros(batch, 1, t, keys, device="cuda", dtype=torch.float16)
    mask[:, :, :, : keys // 8] = float("-inf")  # some keys hidden, as padding would be
    return q, k, v, mask


def time_calls(call, shapes: list[tuple], args) -> tuple[float, float]:
    """(issue ms, GPU ms) per call over `shapes`, after one untimed pass over the first shape."""
    made = [inputs(args.batch, t, s, args.heads, args.head_dim) for t, s in shapes]
    call(*made[0])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    issue = 0.0
    start.record()
    for q, k, v, mask in made:
        t0 = time.perf_counter()
        call(q, k, v, mask)
        issue += time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return issue / len(made) * 1e3, start.elapsed_time(end) / len(made)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=56)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sdpa_backends: needs a CUDA GPU")
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    # cuDNN keeps the plans it built: the two rows that may use it get key lengths of their own
    # (even, odd), so that neither is timed on lengths the other already planned (session 15's
    # first run did); the rest share the first row's, one key apart at most from any row's.
    def cases(odd: int) -> dict:
        return {"decode, keys growing": [(1, 64 + odd + 2 * i) for i in range(args.calls)],
                "decode, keys fixed": [(1, 256 + odd)] * args.calls,
                "prefill 128, growing": [(128, 128 + odd + 2 * i) for i in range(args.calls // 4)]}
    rows = []
    for kernel, backend in KERNELS.items():
        def call(q, k, v, mask, backend=backend):
            with sdpa_kernel([backend]) if backend is not None else nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for case, shapes in cases(int(backend == SDPBackend.CUDNN_ATTENTION)).items():
            try:
                rows.append((kernel, case, *time_calls(call, shapes, args)))
            except RuntimeError as e:  # a kernel that refuses the shape
                rows.append((kernel, case, float("nan"), float("nan")))
                print(f"{kernel}, {case}: {str(e).splitlines()[0][:120]}")
    for case, shapes in cases(0).items():  # offloadgen's own call, as a layer makes it
        def ours(q, k, v, mask):
            return layers.sdpa(q, k, v, mask)
        rows.append(("offloadgen sdpa", case, *time_calls(ours, shapes, args)))
    print(f"\n{'kernel':<16} {'case':<22} {'issue ms':>9} {'GPU ms':>8}")
    for kernel, case, issue, gpu in rows:
        print(f"{kernel:<16} {case:<22} {issue:9.3f} {gpu:8.3f}")
    q, k, v, mask = inputs(args.batch, 1, 300, args.heads, args.head_dim)
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    for kernel, backend in KERNELS.items():
        if backend is None or backend == SDPBackend.MATH:
            continue
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        print(f"{kernel}: largest difference from fp32 math {(out.float() - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
