"""transformers + Accelerate offloading (device_map with max_memory) on the bench workload.

max_memory bounds only the weights Accelerate places on the GPU; the KV cache and activations
come on top (with max_memory = 16 GiB, batch 8 peaked at 20.6 GiB). To hold it to the same budget
as the others, the GPU's max_memory is the budget less the KV cache of the whole generation and
1 GiB of activations, unless --weights-memory says otherwise.

    python benchmarks/peers/accelerate_peer.py --model opt-30b --batch-size 8 --gpu-memory 16GiB
    python benchmarks/peers/accelerate_peer.py --model mixtral-8x7b --batch-size 1 --gpu-memory 16GiB
    python benchmarks/peers/accelerate_peer.py --model opt-13b --batch-size 8 --gpu-memory 8GiB --workload job.jsonl

With --workload FILE the whole job runs as static batches (common.hf_job); the KV cache left out
of max_memory is then the one of the job's longest request, in every row.

--model takes any preset of a family transformers implements (common.HF_MODELS: opt-*, llama-*,
mixtral-*, qwen3-*-a*b), built as transformers' own model class from our preset. The record's
weight_bytes_per_step is what the placement makes every forward copy in: the bytes of the
weights Accelerate left in CPU RAM (counted from the device map, not on the bus).
"""
import sys
import time

import torch

sys.path.insert(0, "benchmarks/peers")
from common import (hf_job, hf_model, inputs, job_failure, load_job, parser, record, require,  # noqa: E402
                    pad_id, record_failure, time_generate)

from offloadgen.config import parse_bytes  # noqa: E402
from offloadgen.checkpoint.dummy import fill_dummy  # noqa: E402
from offloadgen.models import preset  # noqa: E402
from offloadgen.offload.placement import kv_cache_bytes  # noqa: E402

p = parser(loops=1)
p.add_argument("--weights-memory", type=parse_bytes, default=None,
               help="max_memory for the GPU (default: the budget less the KV cache and 1 GiB)")
a = p.parse_args()
items = load_job(a.workload, a.model, a.workload_seed) if a.workload else None
seq_len = max(len(it.prompt_ids) + it.output_len for it in items) if items else a.prompt_len + a.gen_len
kv = kv_cache_bytes(preset(a.model), a.batch_size, seq_len, 2)
weights_memory = a.weights_memory if a.weights_memory is not None else a.gpu_memory - kv - (1 << 30)
if weights_memory <= 0:
    sys.exit(f"accelerate peer: batch {a.batch_size}'s KV cache ({kv / 2**30:.1f} GiB) leaves nothing of the "
             f"{a.gpu_memory / 2**30:.1f} GiB budget for weights")
accelerate, transformers = require("accelerate peer", "accelerate", "transformers")
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights  # noqa: E402
try:
    spec = hf_model(a.model)
except ValueError as e:
    sys.exit(f"accelerate peer: {e}")
system = f"transformers {transformers.__version__} + accelerate {accelerate.__version__}"


def weights_left_on(model, device_map: dict, device) -> int:
    """Bytes of the parameters whose module the device map puts on `device` (the longest module
    name that prefixes the parameter's decides; "" is the whole model). Counted before dispatch,
    while every parameter still has its data."""
    def placed(name):
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        return device_map[max(keys, key=len)] if keys else None
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if placed(n) == device)


try:
    t0 = time.perf_counter()
    with init_empty_weights():
        model = spec.model_class(spec.config).half()
    # Weights in ordinary CPU memory, filled with our fast dummy pattern (Accelerate's own dummy
    # path saves and reloads the checkpoint: 199 s for 60 GB, measured before); tied tensors stay tied.
    # One tensor at a time, each taken by the model as it is (no copy): Mixtral's 93 GB fit once.
    for name, param in list(model.named_parameters()):
        accelerate.utils.set_module_tensor_to_device(model, name, "cpu",
                                                     value=fill_dummy(torch.empty(param.shape, dtype=torch.float16), name))
    model.tie_weights()
    device_map = infer_auto_device_map(model, max_memory={0: weights_memory, "cpu": 120 << 30},
                                       no_split_module_classes=[spec.layer_class])
    in_cpu_ram = weights_left_on(model, device_map, "cpu")
    model = dispatch_model(model, device_map=device_map).eval()
    ready = time.perf_counter() - t0
    placed = {"startup_s": ready, "max_memory_gpu_bytes": weights_memory,
              "modules_on_gpu": sum(1 for v in device_map.values() if v == 0), "weight_bytes_per_step": in_cpu_ram}
    if items:
        hf_job(system, a, model, items, a.batch_size, placed)
        sys.exit(0)
    ids, mask = inputs(a.batch_size, a.prompt_len, model=a.model)
    with torch.no_grad():
        out, totals, prefills = time_generate(model, lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len,
            do_sample=False, pad_token_id=pad_id(a.model)), a.loops)
    assert out.shape[1] == a.prompt_len + a.gen_len
    record(system, a, prefills[-1], totals[-1], torch.cuda.max_memory_allocated(), placed, a.json_file)
except Exception as e:
    if items:
        job_failure(system, a, a.batch_size, e, a.json_file)
    else:
        record_failure(system, a, e, a.json_file)
