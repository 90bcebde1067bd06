"""FlexGen on the bench workload: `python -m flexgen.flex_opt --path _DUMMY_` with a placement
policy, its own timers (the same formulas as the reference), parsed from its log lines.

With --workload FILE, a whole job as static batches (common.time_job): FlexGen's OptLM is built
once, as flex_opt's run_flexgen builds it (same Policy, dummy weights, one warm-up generate of one
token), and its generate runs each batch with that batch's prompt length and longest output.
FlexGen's batch size is fixed when the model is built, so a last batch with fewer requests gets
filler rows (copies of its last request); they are generated and never counted.

    python benchmarks/peers/flexgen_peer.py --model opt-30b --batch-size 8 --percent 0 100 100 0 100 0
    python benchmarks/peers/flexgen_peer.py --model opt-13b --batch-size 12 --workload job.jsonl
"""
import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_job_flags  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="opt-30b")
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--gen-len", type=int, default=32)
p.add_argument("--percent", nargs=6, type=int, default=[0, 100, 100, 0, 100, 0],
               help="weights GPU/CPU, cache GPU/CPU, activations GPU/CPU (FlexGen's policy)")
p.add_argument("--cpu-cache-compute", action="store_true")
p.add_argument("--compress-weight", action="store_true", help="FlexGen's 4-bit group-wise weights (group 64)")
p.add_argument("--compress-cache", action="store_true", help="FlexGen's 4-bit group-wise KV cache (group 64)")
p.add_argument("--num-gpu-batches", type=int, default=1,
               help="FlexGen's GPU batches per block: the batch is --batch-size (its gpu batch) times this")
p.add_argument("--gpu-memory", type=float, default=16,
               help="GiB: the budget the comparison holds it to (FlexGen takes none; its policy decides)")
p.add_argument("--json-file", default="peers.jsonl")
add_job_flags(p)
a = p.parse_args()
if importlib.util.find_spec("flexgen") is None:
    print("flexgen peer: flexgen is not installed; skipped", file=sys.stderr)
    sys.exit(0)

here = Path(__file__).resolve().parent
work = Path(tempfile.mkdtemp(prefix="flexgen-"))
name = f"facebook/{a.model.split('/')[-1]}"
system = (f"FlexGen percent {'/'.join(map(str, a.percent))}" + (" cpu-attn" if a.cpu_cache_compute else "")
          + (" kv4" if a.compress_cache else ""))
batch = a.batch_size * a.num_gpu_batches


def flexgen_job():
    """The job through one OptLM, built with run_flexgen's Policy (its flag defaults: overlap,
    sep_layer, pin_weight on; attention sparsity 1; 4-bit groups of 64 along dim 0 if compressed)."""
    import torch
    from common import job_record, load_job, padded_batch, time_job, warmup_batch
    from flexgen.flex_opt import OptLM, Policy, get_opt_config  # importing flex_opt fixes FlexGen's import cycle
    from flexgen.compression import CompressionConfig
    from flexgen.pytorch_backend import TorchDevice, TorchDisk, TorchMixedDevice
    from flexgen.utils import ExecutionEnv
    items = load_job(a.workload, a.model, a.workload_seed)
    gpu, cpu, disk = TorchDevice("cuda:0"), TorchDevice("cpu"), TorchDisk(str(work / "offload"))
    env = ExecutionEnv(gpu=gpu, cpu=cpu, disk=disk, mixed=TorchMixedDevice([gpu, cpu, disk]))
    policy = Policy(a.batch_size, 1, *a.percent, True, True, True, a.cpu_cache_compute, 1.0,
                    a.compress_weight, CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False),
                    a.compress_cache, CompressionConfig(num_bits=4, group_size=64, group_dim=2, symmetric=False))
    try:
        t0 = time.perf_counter()
        model = OptLM(get_opt_config(name), env, "_DUMMY_", policy)
        ready = time.perf_counter() - t0

        def generate_batch(batch):
            ids, _, gen_len = padded_batch(batch, pad_id=1, rows=a.batch_size)  # FlexGen masks its pad id, 1
            out = model.generate(ids.numpy(), max_new_tokens=gen_len)
            return out.shape[1] - ids.shape[1]

        generate_batch(warmup_batch(a.batch_size))
        torch.cuda.reset_peak_memory_stats()
        batches, elapsed = time_job(items, a.batch_size, generate_batch)
        job_record(system, a, a.batch_size, batches, elapsed, torch.cuda.max_memory_allocated(),
                   {"percent": a.percent, "quant_bits": 4 if a.compress_weight else 16, "startup_s": ready,
                    "gpu_budget_bytes": int(a.gpu_memory * 2**30),
                    "filler_rows": sum(a.batch_size - len(b) for b in batches)}, a.json_file)
    finally:
        env.close_copy_threads()


if a.workload:
    from common import job_failure
    if a.num_gpu_batches != 1:
        raise SystemExit("flexgen peer: a job runs batches of --batch-size; --num-gpu-batches applies to the bench")
    try:
        flexgen_job()
    except Exception as e:
        job_failure(system, a, a.batch_size, e, a.json_file)
    sys.exit(0)

shutil.copytree(here / "opt-tokenizer-standin", work / name)  # FlexGen loads this name from its cwd
cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", name, "--path", "_DUMMY_", "--percent",
       *map(str, a.percent), "--gpu-batch-size", str(a.batch_size), "--num-gpu-batches", str(a.num_gpu_batches),
       "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--offload-dir", str(work / "offload")]
if a.cpu_cache_compute:
    cmd.append("--cpu-cache-compute")
if a.compress_weight:
    cmd.append("--compress-weight")
if a.compress_cache:
    cmd.append("--compress-cache")
proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
text = proc.stdout + proc.stderr


def grab(key):
    m = re.search(rf"{key}: ([0-9.]+)", text)
    return float(m.group(1)) if m else None


rec = {"system": system, "model": a.model, "batch_size": batch, "gpu_batch_size": a.batch_size,
       "num_gpu_batches": a.num_gpu_batches, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "percent": a.percent,
       "quant_bits": 4 if a.compress_weight else 16, "kv_quant_bits": 4 if a.compress_cache else 16,
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
