"""DeepSpeed ZeRO-Inference on the bench workload: ZeRO stage 3, parameters offloaded to pinned CPU
memory, configured as its run_model.py does (HfDeepSpeedConfig, from_config, deepspeed.initialize).

    python benchmarks/peers/deepspeed_peer.py --model opt-30b --batch-size 8
"""
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks/peers")
from common import hf_opt_config, inputs, parser, record, require, record_failure, time_generate  # noqa: E402

p = parser(loops=2)
a = p.parse_args()
deepspeed, transformers = require("deepspeed peer", "deepspeed", "transformers")
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402
system = f"DeepSpeed {deepspeed.__version__} ZeRO-3 CPU offload"


@contextlib.contextmanager
def skip_weight_init():
    """Dummy weights, as ZeRO-Inference's --dummy: 60 GB of random init on the CPU would take minutes."""
    names = ["normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_", "xavier_uniform_", "kaiming_uniform_"]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    saved_init = transformers.PreTrainedModel._init_weights
    for n in names:
        setattr(torch.nn.init, n, lambda t, *args, **kw: t)
    transformers.PreTrainedModel._init_weights = lambda self, module: None
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
        transformers.PreTrainedModel._init_weights = saved_init


try:
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed()
    cfg = hf_opt_config(a.model)
    h = cfg.hidden_size
    ds_config = {  # run_model.py's get_ds_model, with cpu_offload and pin_memory
        "fp16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h,
                              "stage3_param_persistence_threshold": h, "stage3_max_live_parameters": 2 * h * h,
                              "offload_param": {"device": "cpu", "pin_memory": True}},
        "steps_per_print": 2000, "train_batch_size": a.batch_size, "wall_clock_breakdown": False,
    }
    t0 = time.perf_counter()
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive: from_config reads it)
    with skip_weight_init():
        model = transformers.OPTForCausalLM._from_config(cfg, dtype=torch.float16)
    engine = deepspeed.initialize(model=model, config_params=ds_config)[0]
    engine.module.eval()
    model = engine.module
    ready = time.perf_counter() - t0
    ids, mask = inputs(a.batch_size, a.prompt_len)
    with torch.no_grad():
        out, totals, prefills = time_generate(model, lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len,
            do_sample=False, pad_token_id=1, synced_gpus=False), a.loops)
    assert out.shape[1] == a.prompt_len + a.gen_len
    record(system, a, prefills[-1], totals[-1], torch.cuda.max_memory_allocated(), {"startup_s": ready}, a.json_file)
except Exception as e:
    record_failure(system, a, e, a.json_file)
