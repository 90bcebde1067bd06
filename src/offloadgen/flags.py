"""Command-line flags, each declared once and shared by every command that takes it.

Every flag has both spellings the ecosystem uses (--kv-offload and DeepSpeed's --kv_offload), and
the same meaning in `generate`, `bench`, `plan` and `serve`. `config_from_args` turns parsed flags
into the one settings object (config.RunConfig), which validates them.
"""
from __future__ import annotations

import argparse
import re

from .config import EXPERT_STREAMING, KV_ATTENTION, RESIDENT_LAYERS, WEIGHT_FETCH, WEIGHT_GATHER, RunConfig, parse_bytes


def flag(p, name: str, **kw):
    """Add --a-b together with its underscore spelling --a_b."""
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    return p.add_argument(*names, **kw)


def size(text: str) -> int:
    """argparse type for byte sizes: 16GiB, 12GB, 8e9."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_planned_flags(p, batch_default: int | None = 16, batch_help: str = "") -> None:
    """What a run's GPU memory is planned for: `generate` runs it, `plan` predicts it, with the same flags."""
    flag(p, "--batch-size", type=int, default=batch_default,
         help=batch_help or "sequence slots: prompts in flight at once; a finished one's slot takes the next (default 16)")
    flag(p, "--max-seq-len", type=int, default=None,
         help="longest prompt + new tokens, planned for and enforced (default: from --prompt, or 2048 with --input)")


def glue_dash_values(argv: list[str]) -> list[str]:
    """`--gpu-memory -1GiB` as `--gpu-memory=-1GiB`: argparse takes a value that starts with "-"
    and is not a plain number for a flag ("expected one argument"); glued, the value reaches the
    flag's own check, which says what is wrong with it."""
    out = []
    for i, arg in enumerate(argv):
        dash_value = re.fullmatch(r"-\.?\d.*", arg) and not re.fullmatch(r"-\d+|-\d*\.\d+", arg)  # plain: argparse's
        if dash_value and out and re.fullmatch(r"--[\w-]+", out[-1]) and "--" not in argv[:i]:
            out[-1] = f"{out[-1]}={arg}"
            continue
        out.append(arg)
    return out


def add_model_flags(p, positional: bool = True, default: str | None = None) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=default, metavar="MODEL",
                       help="a Hugging Face folder, a .gguf file, or a preset name with --dummy "
                            "(default: the embedded SmolLM2-135M)")
    else:  # the reference's spelling
        flag(p, "--model", default=default, help="folder, .gguf, or preset name with --dummy")
    flag(p, "--dummy", action="store_true", help="made-up weights from a built-in config (`offloadgen presets`)")


def add_device_flags(p) -> None:
    flag(p, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    flag(p, "--dtype", default="auto", help="float32, float16 or bfloat16 (default: float32 on the CPU, the "
                                            "checkpoint's 16-bit type on a GPU)")


def add_placement_flags(p) -> None:
    g = p.add_argument_group("where the weights live")
    flag(g, "--cpu-offload", action="store_true", help="weights in CPU RAM, streamed to the GPU layer by layer")
    flag(g, "--disk-offload", action="store_true",
         help="weights on disk (written once to --offload-dir) and read layer by layer: models larger than RAM")
    flag(g, "--offload-dir", default="~/offload_dir")
    flag(g, "--gpu-memory", type=size, default=None,
         help="GPU memory budget, e.g. 16GiB (default: the card's free memory less a margin)")
    flag(g, "--pin-memory", type=int, default=1, choices=[0, 1],
         help="1: streamed weights in pinned CPU memory (default); 0: pageable, staged through pinned buffers")
    flag(g, "--prefetch-depth", type=int, default=1, help="layers copied ahead of the one computing (default 1)")
    flag(g, "--resident-layers", default="spread", choices=list(RESIDENT_LAYERS),
         help="layers kept on the GPU when not all fit: spread through the pass, so the bus copies the streamed "
              "ones while they compute (default), or the last ones, as one run (--weight-fetch pool keeps no layer "
              "whole: its pooled layers are spread either way)")
    flag(g, "--micro-batch-size", type=int, default=None, help="rows per layer pass; shrinks activations")
    flag(g, "--expert-streaming", default="auto", choices=list(EXPERT_STREAMING),
         help="MoE models: copy only the routed experts of each layer, with an expert cache in the budget left "
              "(auto: where the plan expects fewer bytes per step than whole layers; default)")


def add_quant_flags(p) -> None:
    g = p.add_argument_group("weight quantization")
    flag(g, "--quant-bits", type=int, default=16, choices=[4, 8, 16],
         help="group-wise quantize the decoder layers' linear weights (16 = none)")
    flag(g, "--quant-group-size", type=int, default=64)


def add_kv_flags(p, reference_defaults: bool = False) -> None:
    """The KV cache's flags. bench keeps the reference's defaults (its --pin_kv_cache and
    --async_kv_offload are off unless given); elsewhere both are on with --kv-offload."""
    g = p.add_argument_group("the KV cache")
    flag(g, "--kv-offload", action="store_true", help="KV cache in CPU memory: batches limited by CPU RAM, not GPU memory")
    default = "off, as in the reference benchmark" if reference_defaults else "on with --kv-offload"
    flag(g, "--pin-kv-cache", action=argparse.BooleanOptionalAction, default=None,
         help=f"with --kv-offload: page-locked cache memory, needed for asynchronous copies ({default})")
    flag(g, "--async-kv-offload", action=argparse.BooleanOptionalAction, default=None,
         help=f"with --kv-offload: write the cache back on a side stream ({default})")
    flag(g, "--kv-attention", default="auto", choices=list(KV_ATTENTION),
         help="with --kv-offload: where decode attention runs (auto: split by the step model, corrected as it runs)")
    flag(g, "--kv-overlap", action=argparse.BooleanOptionalAction, default=False,
         help="with --kv-offload on a GPU (not with --kv-attention gpu): attend on the CPU in a thread of its own "
              "while the GPU's micro-batches are issued (default off until it measures faster on the H100: see "
              "docs/performance.md)")
    flag(g, "--kv-quant-bits", type=int, default=16, choices=[4, 8, 16],
         help="keep keys and values group-wise quantized, on the GPU or in CPU RAM (16 = none): a 3-4x larger batch")
    flag(g, "--kv-quant-group-size", type=int, default=64, help="values per quantization group of the KV cache")


def add_world_flags(p) -> None:
    flag(p, "--weight-fetch", default="whole", choices=list(WEIGHT_FETCH),
         help="several ranks (torchrun): each copies whole layers over its own link (whole); or 1/N of each and "
              "all-gathers the rest over NVLink (allgather); or also pools the GPUs' memory, each keeping 1/N of as "
              "many layers as fit, so only the rest crosses PCIe (pool)")
    flag(p, "--weight-gather", default="nccl", choices=list(WEIGHT_GATHER),
         help="with --weight-fetch allgather or pool: gather a block's parts with NCCL's all-gather (nccl), or copy "
              "them from the other ranks' GPU memory with the copy engines, leaving the SMs to the layers (copy; one "
              "node)")
    flag(p, "--landing-buffers", type=int, default=None,
         help="with --weight-fetch allgather or pool: buffers of 1/N layer that each rank's host copies land in, so "
              "its PCIe copies run that many layers ahead of the gathers (default: 1.5 x N with allgather, 6 on 4 ranks; "
              "one per ring slot with pool)")


def add_run_flags(p, reference_defaults: bool = False) -> None:
    """Everything a RunConfig holds but the model and the planned batch."""
    add_device_flags(p)
    add_placement_flags(p)
    add_quant_flags(p)
    add_kv_flags(p, reference_defaults)
    add_world_flags(p)


def config_from_args(args, **planned) -> RunConfig:
    """The settings the parsed flags describe; `planned` gives what the command plans for (batch,
    sequence lengths). Validation happens when the run is planned (RunConfig.validate)."""
    settings = dict(
        model=getattr(args, "model", None), dummy=getattr(args, "dummy", False), device=args.device, dtype=args.dtype,
        cpu_offload=args.cpu_offload, disk_offload=args.disk_offload, offload_dir=args.offload_dir,
        gpu_memory=args.gpu_memory, pin_memory=bool(args.pin_memory), prefetch_depth=args.prefetch_depth,
        resident_layers=args.resident_layers,
        micro_batch_size=args.micro_batch_size, quant_bits=args.quant_bits, quant_group_size=args.quant_group_size,
        kv_offload=args.kv_offload, pin_kv_cache=args.pin_kv_cache, async_kv_offload=args.async_kv_offload,
        kv_attention=args.kv_attention, kv_overlap=args.kv_overlap, kv_quant_bits=args.kv_quant_bits,
        kv_quant_group_size=args.kv_quant_group_size, weight_fetch=args.weight_fetch,
        weight_gather=args.weight_gather, landing_buffers=args.landing_buffers,
        expert_streaming=args.expert_streaming)
    return RunConfig(**{**settings, **planned})
