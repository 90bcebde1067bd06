"""On a GPU: the API (the path `offloadgen generate` takes) with the KV cache in CPU RAM and with
weights on disk gives the token ids of the plain streamed run (opt-1.3b dummy, 1 GiB budget)."""
import sys

import offloadgen
from offloadgen import SamplingParams

prompts = ["hello", "world", "again"]
params = SamplingParams(max_new_tokens=12, ignore_eos=True)


def run(**kw):
    with offloadgen.load("opt-1.3b", dummy=True, cpu_offload=True, gpu_memory=1 << 30, max_batch_size=3,
                         micro_batch_size=2, max_seq_len=64, progress=False, **kw) as llm:
        return [c.token_ids for c in llm.generate(prompts, params)]


ref = run()
ok = True
for name, kw in {"kv offload, CPU attention": dict(kv_offload=True, kv_attention="cpu"),
                 "kv offload, GPU attention": dict(kv_offload=True, kv_attention="gpu"),
                 "weights on disk": dict(offload_dir="/tmp/api_offload")}.items():
    same = run(**kw) == ref
    ok &= same
    print(f"{name}: token ids identical to the plain run: {same}")
print("plain run's token ids:", ref)
sys.exit(0 if ok else 1)
