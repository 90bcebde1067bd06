"""The same workload as `offloadgen bench` through transformers + Accelerate offloading
(device_map with max_memory), with the reference's metric definitions; writes the same JSON record.

    python benchmarks/peers/accelerate_peer.py --model opt-30b --batch-size 8 --gpu-memory 16GiB
"""
import argparse
import json
import sys
import time

import torch

sys.path.insert(0, "src")
from offloadgen.bench.cli import parse_bytes  # noqa: E402
from offloadgen.bench.metrics import Metrics  # noqa: E402
from offloadgen.checkpoint.dummy import fill_dummy  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="opt-30b")
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--gen-len", type=int, default=32)
p.add_argument("--gpu-memory", type=parse_bytes, default=16 << 30)
p.add_argument("--loops", type=int, default=1)
p.add_argument("--json-file", default="peers.jsonl")
a = p.parse_args()
try:
    import accelerate
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
except ImportError as e:
    print(f"accelerate peer: missing package ({e.name}); skipped", file=sys.stderr)
    sys.exit(0)

from offloadgen.models import preset  # noqa: E402

cfg = preset(a.model)
hf_cfg = transformers.OPTConfig(hidden_size=cfg.hidden_size, ffn_dim=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                                num_attention_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                                max_position_embeddings=cfg.max_position, dtype=torch.float16)
t0 = time.perf_counter()
with init_empty_weights():
    model = transformers.OPTForCausalLM(hf_cfg).half()
# Weights in ordinary CPU memory, filled with our fast dummy pattern (Accelerate's own dummy path
# saved and reloaded 60 GB: 199 s, DESIGN.md); tied tensors stay tied.
model.tie_weights()
for name, param in list(model.named_parameters()):
    t = fill_dummy(torch.empty(param.shape, dtype=torch.float16), name)
    accelerate.utils.set_module_tensor_to_device(model, name, "cpu", value=t)
model.tie_weights()
device_map = infer_auto_device_map(model, max_memory={0: a.gpu_memory, "cpu": 120 << 30},
                                   no_split_module_classes=["OPTDecoderLayer"])
model = dispatch_model(model, device_map=device_map).eval()
ready = time.perf_counter() - t0
on_gpu = sum(1 for v in device_map.values() if v == 0)
print(f"accelerate: model ready in {ready:.0f} s; {on_gpu}/{len(device_map)} modules on the GPU", file=sys.stderr)

ids = torch.full((a.batch_size, a.prompt_len), 2, dtype=torch.long)
mask = torch.zeros_like(ids)
ids[:, -7:] = torch.tensor([2, 32826, 16, 5, 812, 343, 9])  # "Paris is the capital city of" in OPT's vocabulary
mask[:, -7:] = 1
ids, mask = ids.cuda(), mask.cuda()
state = {}


def pre_hook(module, args):
    if "prefill" not in state:
        torch.cuda.synchronize()
        state["t_start_fwd"] = time.perf_counter()


def post_hook(module, args, out):
    if "prefill" not in state:
        torch.cuda.synchronize()
        state["prefill"] = time.perf_counter() - state["t_start_fwd"]


model.register_forward_pre_hook(pre_hook)
model.register_forward_hook(post_hook)
for _ in range(a.loops):
    state.clear()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len,
                             do_sample=False, pad_token_id=1)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
assert out.shape[1] == a.prompt_len + a.gen_len
m = Metrics(a.batch_size, a.prompt_len, a.gen_len, state["prefill"], total, torch.cuda.max_memory_allocated())
rec = {"system": f"transformers {transformers.__version__} + accelerate {accelerate.__version__}", "model": a.model,
       "batch_size": a.batch_size, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "gpu_budget_bytes": a.gpu_memory,
       "prefill_latency_s": m.prefill_latency, "prefill_throughput": m.prefill_throughput,
       "decode_latency_s": m.decode_latency, "decode_throughput": m.decode_throughput, "decode_step_s": m.decode_step,
       "total_latency_s": m.total_latency, "total_throughput": m.total_throughput, "peak_gpu_mem_bytes": m.peak_gpu_mem,
       "startup_s": ready, "modules_on_gpu": on_gpu}
print(json.dumps(rec))
with open(a.json_file, "a") as f:
    f.write(json.dumps(rec) + "\n")
