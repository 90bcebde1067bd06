"""transformers + Accelerate offloading (device_map with max_memory) on the bench workload.

    python benchmarks/peers/accelerate_peer.py --model opt-30b --batch-size 8 --gpu-memory 16GiB
"""
import sys
import time

import torch

sys.path.insert(0, "benchmarks/peers")
from common import hf_opt_config, inputs, parser, record, require, record_failure, time_generate  # noqa: E402

from offloadgen.bench.cli import parse_bytes  # noqa: E402
from offloadgen.checkpoint.dummy import fill_dummy  # noqa: E402

p = parser(loops=1)
p.add_argument("--gpu-memory", type=parse_bytes, default=16 << 30)
a = p.parse_args()
accelerate, transformers = require("accelerate peer", "accelerate", "transformers")
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights  # noqa: E402
system = f"transformers {transformers.__version__} + accelerate {accelerate.__version__}"
try:
    t0 = time.perf_counter()
    with init_empty_weights():
        model = transformers.OPTForCausalLM(hf_opt_config(a.model)).half()
    # Weights in ordinary CPU memory, filled with our fast dummy pattern (Accelerate's own dummy
    # path saves and reloads the checkpoint: 199 s for 60 GB, DESIGN.md); tied tensors stay tied.
    for name, param in list(model.named_parameters()):
        accelerate.utils.set_module_tensor_to_device(model, name, "cpu",
                                                     value=fill_dummy(torch.empty(param.shape, dtype=torch.float16), name))
    model.tie_weights()
    device_map = infer_auto_device_map(model, max_memory={0: a.gpu_memory, "cpu": 120 << 30},
                                       no_split_module_classes=["OPTDecoderLayer"])
    model = dispatch_model(model, device_map=device_map).eval()
    ready = time.perf_counter() - t0
    ids, mask = inputs(a.batch_size, a.prompt_len)
    with torch.no_grad():
        out, totals, prefills = time_generate(model, lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len,
            do_sample=False, pad_token_id=1), a.loops)
    assert out.shape[1] == a.prompt_len + a.gen_len
    record(system, a, prefills[-1], totals[-1], torch.cuda.max_memory_allocated(),
           {"startup_s": ready, "modules_on_gpu": sum(1 for v in device_map.values() if v == 0)}, a.json_file)
except Exception as e:
    record_failure(system, a, e, a.json_file)
