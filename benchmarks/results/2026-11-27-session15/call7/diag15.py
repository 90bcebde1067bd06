import sys, tempfile
from pathlib import Path
import torch
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests")); sys.path.insert(0, str(HERE))
from conftest import make_checkpoint
from test_parity import ragged_batch
from gpu_inputs import padded_batch
from offloadgen.checkpoint import SafetensorsFolder, DummyCheckpoint
from offloadgen.engine import Engine
from offloadgen.models import layers, preset
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.sampling import SamplingParams
torch.backends.cuda.matmul.allow_tf32 = False
cuda, cpu = torch.device("cuda"), torch.device("cpu")

def first_diff(a, b):
    for r, (x, y) in enumerate(zip(a, b)):
        for i, (p, q) in enumerate(zip(x, y)):
            if p != q: return f"row {r} step {i}"
    return "same"

def ours(ck, dev, dtype, n, ids, mask, kv=None, mb=None):
    w = ResidentWeights(ck, dev, dtype, progress=False)
    e = Engine(ck.cfg, w, dev, dtype, mb, kv_offload=kv)
    out = e.generate(ids, mask, SamplingParams(max_new_tokens=n, ignore_eos=True), set(), 0)
    e.close() if kv else None
    return out.tokens

def hf(model, dev, dtype, n, ids, mask):
    m = model.to(dev, dtype)
    out = m.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n, do_sample=False,
                     output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    top2 = torch.stack(out.logits).float().topk(2, dim=-1).values
    return out.sequences[:, ids.shape[1]:].tolist(), (top2[..., 0] - top2[..., 1]).min().item()

# 1. opt-1.3b dummy, as gpu_kv_check
ck = DummyCheckpoint(preset("opt-1.3b")); ids, mask = padded_batch()
res = {}
for c in (False, True):
    layers.CUDNN_ATTENTION = c; res[f"gpu fp16 cudnn={c}"] = ours(ck, cuda, torch.float16, 16, ids, mask, mb=2)
layers.CUDNN_ATTENTION = False
res["gpu fp32"] = ours(ck, cuda, torch.float32, 16, ids, mask, mb=2)
res["kv cpu attention fp16"] = ours(ck, cuda, torch.float16, 16, ids, mask, KVOffload(True, True, "cpu"), mb=2)
for k, v in res.items(): print("opt-1.3b", k, "vs gpu fp32:", first_diff(v, res["gpu fp32"]))
# 2./3. tiny HF variants
with tempfile.TemporaryDirectory() as tmp:
    for name in ("phi3-longrope", "gemma3-multimodal"):
        path = Path(tmp) / name; model = make_checkpoint(name, path); ids, mask = ragged_batch()
        f = SafetensorsFolder(path)
        for n in (16, 24, 32):
            r = {}
            r["hf cpu fp32"], gap = hf(model, cpu, torch.float32, n, ids, mask)
            r["hf gpu fp32"], _ = hf(model, cuda, torch.float32, n, ids, mask)
            r["hf gpu fp16"], _ = hf(model, cuda, torch.float16, n, ids, mask)
            r["ours cpu fp32"] = ours(f, cpu, torch.float32, n, ids, mask)
            r["ours gpu fp32"] = ours(f, cuda, torch.float32, n, ids, mask)
            r["ours gpu fp16"] = ours(f, cuda, torch.float16, n, ids, mask)
            print(name, n, "new tokens; HF cpu min top-2 gap", f"{gap:.1e}")
            for k, v in r.items(): print("   ", k, "vs hf cpu fp32:", first_diff(v, r["hf cpu fp32"]))
