"""On a GPU: the KV cache in CPU memory (CPU attention, GPU attention, split; pinned or not;
written back synchronously or on a side stream) against the cache on the GPU, the same for an
8-bit cache (and the adaptive split), plus the CPU attention bandwidth for OPT-30B's shapes.
Prints one line per case; where tokens differ, the first step that does and the reference's
top-2 logit gap there (a gap of the order of float16's rounding is a near-tie, not a fault)."""
import sys

import torch
from gpu_inputs import greedy_margins, padded_batch, where_they_differ

from offloadgen.machine import cpu_read_bandwidth
from offloadgen.offload.kv_cache import probe_cpu_attention_bandwidth as cpu_attention_bandwidth
from offloadgen.checkpoint import DummyCheckpoint
from offloadgen.engine import Engine
from offloadgen.models import preset
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.sampling import SamplingParams

dev = torch.device("cuda")
print(f"threads {torch.get_num_threads()}; CPU memory read {cpu_read_bandwidth() / 1e9:.1f} GB/s")
for rows in (4, 8, 16):
    bw = cpu_attention_bandwidth(rows, 56, 56, 128, 544, torch.float16)
    print(f"CPU decode attention, OPT-30B shape, {rows} rows, 544 slots: {bw / 1e9:.1f} GB/s of cache")

ok = True
cases = {"cpu attention, pinned, async": KVOffload(True, True, "cpu"),
         "cpu attention, pinned, sync": KVOffload(True, False, "cpu"),
         "cpu attention, pageable": KVOffload(False, False, "cpu"),
         "gpu attention, pinned, async": KVOffload(True, True, "gpu"),
         "split half/half, pinned, async": KVOffload(True, True, gpu_fraction=0.5)}
for name in ("opt-1.3b", "smollm2-135m", "bloom-560m"):
    ck = DummyCheckpoint(preset(name))
    cfg = ck.cfg
    ids, mask = padded_batch()
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    weights = ResidentWeights(ck, dev, torch.float16, progress=False)
    with greedy_margins() as gaps:
        ref = Engine(cfg, weights, dev, torch.float16, 2).generate(ids, mask, params, set(), 0)
    for case, opts in cases.items():
        engine = Engine(cfg, weights, dev, torch.float16, 2, kv_offload=opts)
        out = engine.generate(ids, mask, params, set(), 0)
        engine.close()
        same = out.tokens == ref.tokens
        diff = (out.last_logits - ref.last_logits).abs().max().item()
        ok &= same and diff < 0.05
        print(f"{name:14s} {case:32s}: tokens identical {same}, last logits max diff {diff:.2e}"
              + where_they_differ(out.tokens, ref.tokens, gaps))
    # The 8-bit cache: on the GPU (Triton dequantization) against offloaded with each attention
    with greedy_margins() as gaps:
        ref = Engine(cfg, weights, dev, torch.float16, 2, kv_quant=(8, 64)).generate(ids, mask, params, set(), 0)
    for case, attention in (("8-bit, cpu attention", "cpu"), ("8-bit, gpu attention", "gpu"),
                            ("8-bit, adaptive split", "auto")):
        opts = KVOffload(True, True, attention, gpu_fraction=0.5 if attention == "auto" else None, quant_bits=8)
        engine = Engine(cfg, weights, dev, torch.float16, 2, kv_offload=opts)
        out = engine.generate(ids, mask, params, set(), 0)
        history = engine.offloaded_cache.split.history if engine.offloaded_cache.split else None
        engine.close()
        same = out.tokens == ref.tokens
        diff = (out.last_logits - ref.last_logits).abs().max().item()
        ok &= same and diff < 0.05
        print(f"{name:14s} {case:32s}: tokens identical {same}, last logits max diff {diff:.2e}"
              + (f", GPU parts per step {history}" if history else "") + where_they_differ(out.tokens, ref.tokens, gaps))
sys.exit(0 if ok else 1)
