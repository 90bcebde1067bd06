"""On a GPU: our engine against transformers on the same weights, for every tiny variant the CPU
parity tests cover (tests/conftest.py VARIANTS), float32 on the GPU: greedy tokens equal and last
logits close, with weights resident and streamed, and with GPU attention on the kernels
models/layers.sdpa allows (flash, memory-efficient, math) and on PyTorch's own choice (cuDNN
first on Hopper); then float16 (cuDNN's attention takes half precision only), against
transformers in float16, logits within 2e-2. The CPU tests cannot reach the GPU's attention
kernels. Prints one line per variant and mode, exit 1 on a difference. Where tokens differ, the
line gives transformers' own margin (top-2 logit gap) at the first step that differs: below
NEAR_TIE the two sides rounded a near-tie differently, and the line says so; it still counts as a
difference.

    PYTHONPATH=src python benchmarks/gpu_hf_parity.py [variant ...]
"""
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from gpu_inputs import first_difference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import VARIANTS, make_checkpoint  # noqa: E402
from test_parity import generate_drops_longrope_context, ragged_batch  # noqa: E402
from test_parity import run_hf_by_prefixes as run_hf_by_prefixes_of_test  # noqa: E402

from offloadgen.checkpoint import SafetensorsFolder  # noqa: E402
from offloadgen.engine import Engine  # noqa: E402
from offloadgen.models import blocks, layers  # noqa: E402
from offloadgen.offload import ResidentWeights  # noqa: E402
from offloadgen.offload.placement import Placement  # noqa: E402
from offloadgen.offload.streaming import StreamingWeights  # noqa: E402
from offloadgen.sampling import SamplingParams  # noqa: E402

NEW_TOKENS = 24
dev = torch.device("cuda")


TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2}
NEAR_TIE = {torch.float32: 1e-3, torch.float16: 2e-2}  # of the order of each dtype's rounding of a logit


def run_hf_by_prefixes(model, ids, mask):
    """run_hf without generate's cache (test_parity.run_hf_by_prefixes): the reference for
    phi3-longrope under transformers before 5.24 (test_parity.generate_drops_longrope_context)."""
    tokens, steps = run_hf_by_prefixes_of_test(model, ids.to(dev), mask.to(dev), NEW_TOKENS)
    top2 = torch.stack(steps).float().topk(2, dim=-1).values
    return tokens, steps[-1].float().cpu(), (top2[..., 0] - top2[..., 1]).cpu()


def run_hf(model, ids, mask):
    """Greedy tokens per row, last logits, and the top-2 logit gap [step, row]."""
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    top2 = torch.stack(out.logits).float().topk(2, dim=-1).values
    return out.sequences[:, ids.shape[1]:].tolist(), out.logits[-1].float().cpu(), (top2[..., 0] - top2[..., 1]).cpu()


def run_ours(path, ids, mask, streamed: bool, dtype: torch.dtype):
    ckpt = SafetensorsFolder(path)
    cfg = ckpt.cfg
    if streamed:  # the last layer, head and embeddings resident, the rest through two buffers
        resident = ["head", "embed", cfg.n_layers - 1]
        placement = Placement(resident, [b for b in blocks(cfg) if b not in resident], 2, {})
        weights = StreamingWeights(ckpt, dev, dtype, placement, pinned=True, progress=False)
    else:
        weights = ResidentWeights(ckpt, dev, dtype, progress=False)
    try:
        result = Engine(cfg, weights, dev, dtype, None).generate(
            ids, mask, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), set(), 0)
    finally:
        if streamed:
            weights.close()
    return result.tokens, result.last_logits.float().cpu()


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as the reference computes it
    names = sys.argv[1:] or sorted(VARIANTS)
    ok = True
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / name
            model = make_checkpoint(name, path)
            if generate_drops_longrope_context(name):
                print(f"{name}: transformers {transformers.__version__}'s generate loses the context where LongRoPE "
                      "switches; the reference is its forward over each step's whole sequence")
            ids, mask = ragged_batch()
            for dtype in (torch.float32, torch.float16):
                reference = run_hf_by_prefixes if generate_drops_longrope_context(name) else run_hf
                with torch.no_grad():
                    hf_tokens, hf_logits, gaps = reference(model.to(dev, dtype), ids, mask)
                for cudnn in (False, True):
                    layers.CUDNN_ATTENTION = cudnn
                    for streamed in (False, True):
                        tokens, logits = run_ours(path, ids, mask, streamed, dtype)
                        diff = (logits - hf_logits).abs().max().item()
                        same = tokens == hf_tokens and diff < TOLERANCE[dtype]
                        ok &= same
                        mode = (f"{str(dtype)[6:]}, {'streamed' if streamed else 'resident'}, "
                                f"{'torch choice' if cudnn else 'no cuDNN'}")
                        if tokens == hf_tokens:
                            what = f"same tokens, logits within {diff:.1e}"
                        else:
                            step, row, gap = first_difference(tokens, hf_tokens, gaps)
                            what = (f"TOKENS DIFFER from step {step} of row {row}, where transformers' top-2 gap "
                                    f"is {gap:.1e}" + (" (a near-tie)" if gap < NEAR_TIE[dtype] else ""))
                        print(f"{name:34s} {mode:35s} {what}{'' if same else '  <-- FAIL'}", flush=True)
            del model
            torch.cuda.empty_cache()
    print("all match transformers" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
