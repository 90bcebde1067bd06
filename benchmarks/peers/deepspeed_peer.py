"""DeepSpeed ZeRO-Inference on the bench workload: ZeRO stage 3, parameters offloaded to pinned CPU
memory, configured as its run_model.py does (HfDeepSpeedConfig, from_config, deepspeed.initialize),
with its 4-bit weights (`weight_quantization.quantized_initialization`) when --quant-bits 4.
Several batch sizes run on one engine, one record each (the engine takes 40 s to build).
With --workload FILE each batch size runs the whole job as static batches (common.hf_job).

    python benchmarks/peers/deepspeed_peer.py --model opt-30b --batch-size 8 20 [--quant-bits 4]
    python benchmarks/peers/deepspeed_peer.py --model opt-13b --batch-size 16 --workload job.jsonl
    python benchmarks/peers/deepspeed_peer.py --model mixtral-8x7b --batch-size 1 8

--model takes any preset of a family transformers implements (common.HF_MODELS: opt-*, llama-*,
mixtral-*, qwen3-*-a*b), built as transformers' own model class from our preset. The record's
weight_bytes_per_step is what ZeRO-3 gathers for every forward: the bytes of the parameters it
partitions to the CPU (all but those under stage3_param_persistence_threshold; counted from
the parameters, not on the bus).
"""
import contextlib
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks/peers")
from common import (hf_job, hf_model, inputs, job_failure, load_job, parser, record, require,  # noqa: E402
                    pad_id, record_failure, time_generate, with_batch)

p = parser(loops=2, several_batches=True)
p.add_argument("--quant-bits", type=int, default=16, choices=[4, 8, 16])
p.add_argument("--quant-group-size", type=int, default=64)
p.add_argument("--kv-offload", action="store_true", help="ZeRO-Inference's KV cache offload (needs its patched transformers)")
a = p.parse_args()
deepspeed, transformers = require("deepspeed peer", "deepspeed", "transformers")
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402
try:
    spec = hf_model(a.model)
except ValueError as e:
    sys.exit(f"deepspeed peer: {e}")
if a.kv_offload and spec.ours.model_type != "opt":
    sys.exit(f"deepspeed peer: --kv-offload is ZeRO-Inference's OPT-only KV offload; {a.model} is a "
             f"{spec.ours.model_type} model")
system = f"DeepSpeed {deepspeed.__version__} ZeRO-3 CPU offload" + (" + KV offload" if a.kv_offload else "")


def ds_config(cfg, batch: int) -> dict:
    """run_model.py's get_ds_model, with cpu_offload and pin_memory, and its get_quant_config for 4 bits."""
    h = cfg.hidden_size
    config = {
        "fp16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h,
                              "stage3_param_persistence_threshold": h, "stage3_max_live_parameters": 2 * h * h,
                              "offload_param": {"device": "cpu", "pin_memory": True}},
        "steps_per_print": 2000, "train_batch_size": batch, "wall_clock_breakdown": False,
    }
    if a.quant_bits != 16:
        config["weight_quantization"] = {"quantized_initialization": {
            "num_bits": a.quant_bits, "group_size": a.quant_group_size, "group_dim": 1, "symmetric": False}}
    return config


@contextlib.contextmanager
def skip_weight_init():
    """Dummy weights, as ZeRO-Inference's --dummy: 60 GB of random init on the CPU would take minutes.
    Newer transformers (5.x) also re-initializes every module after zero.Init, gathering each one's
    parameters to the GPU and back (initialize_weights_zero3): 93 GB each way for Mixtral; skipped too."""
    names = ["normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_", "xavier_uniform_", "kaiming_uniform_"]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    saved_init = transformers.PreTrainedModel._init_weights
    zero3 = importlib.import_module("transformers.integrations.deepspeed")
    saved_zero3 = getattr(zero3, "initialize_weights_zero3", None)
    for n in names:
        setattr(torch.nn.init, n, lambda t, *args, **kw: t)
    transformers.PreTrainedModel._init_weights = lambda self, module: None
    if saved_zero3 is not None:
        zero3.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
        transformers.PreTrainedModel._init_weights = saved_init
        if saved_zero3 is not None:
            zero3.initialize_weights_zero3 = saved_zero3


try:
    items = load_job(a.workload, a.model, a.workload_seed) if a.workload else None  # a bad file fails before the engine
    if a.kv_offload and not hasattr(spec.model_class, "set_kv_cache_offload"):
        # run_model.py calls model.set_kv_cache_offload(...), which exists only in the transformers
        # fork ZeRO-Inference pins; say so before spending a minute building the engine.
        raise RuntimeError(f"ZeRO-Inference's KV offload calls OPTForCausalLM.set_kv_cache_offload, which "
                           f"transformers {transformers.__version__} does not have (it comes from the patched "
                           "transformers ZeRO-Inference pins)")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed()
    cfg = spec.config
    config = ds_config(cfg, a.batch_size[0])
    t0 = time.perf_counter()
    dschf = HfDeepSpeedConfig(config)  # noqa: F841  (must stay alive: from_config reads it)
    with skip_weight_init():  # under HfDeepSpeedConfig this builds inside zero.Init, which quantizes
        model = spec.model_class._from_config(cfg, dtype=torch.float16)
    engine = deepspeed.initialize(model=model, config_params=config)[0]
    engine.module.eval()
    model = engine.module
    ready = time.perf_counter() - t0
    # ZeRO-3 keeps parameters under the persistence threshold on the GPU; the rest it gathers
    # from CPU RAM for every forward (ds_numel: the full size; a partitioned tensor's own is 0).
    fetched = sum(getattr(prm, "ds_numel", prm.numel()) for prm in model.parameters()
                  if not getattr(prm, "ds_persist", False))
    extra = {"startup_s": ready, "weight_bytes_per_step": int(fetched * a.quant_bits / 8)}
    if a.quant_bits != 16:
        quantized = [n for n, prm in model.named_parameters() if getattr(prm, "weight_quantized", False)]
        if not quantized:
            raise RuntimeError("weight_quantization was set but no parameter was quantized")
        print(f"{len(quantized)} weights quantized to {a.quant_bits} bits", flush=True)
except Exception as e:
    for batch in a.batch_size:
        if a.workload:
            job_failure(system, a, batch, e, a.json_file)
        else:
            record_failure(system, with_batch(a, batch), e, a.json_file)
    sys.exit(0)

for batch in a.batch_size if a.workload else []:
    try:
        hf_job(system, a, model, items, batch, extra, synced_gpus=False)
    except Exception as e:
        job_failure(system, a, batch, e, a.json_file)
    finally:
        torch.cuda.empty_cache()

for batch in [] if a.workload else a.batch_size:
    run = with_batch(a, batch)
    try:
        torch.cuda.reset_peak_memory_stats()
        ids, mask = inputs(batch, a.prompt_len, model=a.model)
        with torch.no_grad():
            out, totals, prefills = time_generate(model, lambda: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len,
                do_sample=False, pad_token_id=pad_id(a.model), synced_gpus=False), a.loops)
        assert out.shape[1] == a.prompt_len + a.gen_len
        record(system, run, prefills[-1], totals[-1], torch.cuda.max_memory_allocated(), extra, a.json_file)
    except Exception as e:
        record_failure(system, run, e, a.json_file)
    finally:
        ids = mask = out = None
        torch.cuda.empty_cache()
