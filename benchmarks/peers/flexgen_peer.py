"""FlexGen on the bench workload: `python -m flexgen.flex_opt --path _DUMMY_` with a placement
policy, its own timers (the same formulas as the reference), parsed from its log lines.

    python benchmarks/peers/flexgen_peer.py --model opt-30b --batch-size 8 --percent 0 100 100 0 100 0
"""
import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--model", default="opt-30b")
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--gen-len", type=int, default=32)
p.add_argument("--percent", nargs=6, type=int, default=[0, 100, 100, 0, 100, 0],
               help="weights GPU/CPU, cache GPU/CPU, activations GPU/CPU (FlexGen's policy)")
p.add_argument("--cpu-cache-compute", action="store_true")
p.add_argument("--compress-weight", action="store_true", help="FlexGen's 4-bit group-wise weights (group 64)")
p.add_argument("--gpu-memory", type=float, default=16,
               help="GiB: the budget the comparison holds it to (FlexGen takes none; its policy decides)")
p.add_argument("--json-file", default="peers.jsonl")
a = p.parse_args()
if importlib.util.find_spec("flexgen") is None:
    print("flexgen peer: flexgen is not installed; skipped", file=sys.stderr)
    sys.exit(0)

here = Path(__file__).resolve().parent
work = Path(tempfile.mkdtemp(prefix="flexgen-"))
name = f"facebook/{a.model.split('/')[-1]}"
shutil.copytree(here / "opt-tokenizer-standin", work / name)  # FlexGen loads this name from its cwd
cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", name, "--path", "_DUMMY_", "--percent",
       *map(str, a.percent), "--gpu-batch-size", str(a.batch_size), "--num-gpu-batches", "1",
       "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--offload-dir", str(work / "offload")]
if a.cpu_cache_compute:
    cmd.append("--cpu-cache-compute")
if a.compress_weight:
    cmd.append("--compress-weight")
proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
text = proc.stdout + proc.stderr
system = f"FlexGen percent {'/'.join(map(str, a.percent))}" + (" cpu-attn" if a.cpu_cache_compute else "")


def grab(key):
    m = re.search(rf"{key}: ([0-9.]+)", text)
    return float(m.group(1)) if m else None


rec = {"system": system, "model": a.model, "batch_size": a.batch_size, "prompt_len": a.prompt_len,
       "gen_len": a.gen_len, "percent": a.percent, "quant_bits": 4 if a.compress_weight else 16,
       "gpu_budget_bytes": int(a.gpu_memory * 2**30)}
if proc.returncode != 0 or grab("decode throughput") is None:
    rec["error"] = f"exit {proc.returncode}: " + text[-1500:]
else:
    rec.update(prefill_latency_s=grab("prefill latency"), prefill_throughput=grab("prefill throughput"),
               decode_latency_s=grab("decode latency"), decode_throughput=grab("decode throughput"),
               total_latency_s=grab("total latency"), total_throughput=grab("total throughput"),
               peak_gpu_mem_bytes=grab("peak gpu mem") * 2**30)
    rec["decode_step_s"] = rec["decode_latency_s"] / (a.gen_len - 1)
print(json.dumps(rec))
with open(a.json_file, "a") as f:
    f.write(json.dumps(rec) + "\n")
