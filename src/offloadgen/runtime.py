"""The one way to build a run: settings + checkpoint + world -> plan -> weights -> engine.

    plan_run(config, model_cfg, device)   where every block and the KV cache go, checked against
                                          the GPU budget and CPU RAM; loads nothing
    build_runtime(config)                 the plan, then the weight source and the engine

`load()` (api.py), `offloadgen generate`, `bench`, `plan` and `serve` all go through here, so
`plan` predicts exactly the placement that a run with the same settings gets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .distributed import World, control_group, device_for, gather
from .checkpoint import open_checkpoint
from .config import RunConfig
from .engine import Engine
from .errors import OffloadgenError
from .machine import GiB, available_host_memory, default_gpu_budget, h2d_bandwidth
from .models import family_of, parse_dtype
from .offload import ResidentWeights, WeightSource
from .offload.kv_cache import KVOffload
from .offload.placement import Placement, all_resident, disk_placement_on_cpu, plan_kv_offload, plan_prefill_parts
from .quant import QuantConfig
from .quant.kv import KVQuant
from .quant.groupwise import check_group_size

DEFAULT_PLANNED_SEQ_LEN = 2048  # what the GPU memory is planned for when max_seq_len is not given


@dataclass
class RunPlan:
    """Everything decided before a weight is loaded."""
    config: RunConfig
    model_cfg: object
    device: torch.device
    dtype: torch.dtype
    quant: QuantConfig | None
    placement: Placement | None  # None: every block on the compute device, no budget to plan (a CPU run)
    budget: int | None  # GPU bytes planned for
    max_seq_len: int
    max_prompt_len: int
    kv: KVOffload | None = None  # the offloaded cache's options, with the CPU/GPU attention split decided
    kv_model: dict | None = None  # the step model behind that split
    world: World = field(default_factory=World)

    @property
    def limits(self) -> tuple[int, int] | None:
        """(rows, tokens per row) the GPU memory was planned for; None where nothing was planned."""
        return None if self.budget is None else (self.config.max_batch_size, self.max_seq_len)

    @property
    def streams(self) -> bool:
        """Whether the weights go through the streaming source (streamed blocks, or packed quantized ones)."""
        return self.quant is not None or bool(self.placement is not None and self.placement.streamed)

    def describe(self) -> str:
        if self.placement is None:
            return f"all weights on the {self.device.type.upper()}"
        return self.placement.describe()


def resolve_device(config: RunConfig, world: World | None = None) -> torch.device:
    device = torch.device(config.device) if config.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadgenError("device cuda asked for, but this machine has no CUDA GPU (use --device cpu)")
    return device_for(world or World(), device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, model_cfg) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls on CPUs are slow and less exact
    stored = model_cfg.dtype
    return parse_dtype(stored) if stored in ("float16", "bfloat16") else torch.float16


def agreed_budget(own: int, world: World) -> int:
    """The GPU budget every rank plans from when --gpu-memory is not given: the smallest of the
    ranks' free memory. Each rank's own figure differs by what else holds its GPU; ranks that
    planned from their own would pool or stream different layers and wait in different
    collectives."""
    if not world.active:
        return own
    return min(gather(own, world, control_group(world)))


def plan_run(config: RunConfig, model_cfg, device: torch.device, world: World | None = None,
             h2d_bytes_s: float | None = None, host_available: int | None = None,
             cpu_attention_bytes_s: float | None = None) -> RunPlan:
    """Where everything goes, refused up front (with what would fit) when it cannot.

    On a GPU every run is planned under the budget: resident blocks, the ring streamed blocks
    arrive in, activations and the KV cache (or, offloaded, its device buffers). h2d_bytes_s
    weighs CPU against GPU attention for an offloaded cache; it is measured here when needed and
    not given, as the CPU's attention bandwidth is (cpu_attention_bytes_s). A CPU run has nothing
    to plan but where weights on disk are read into."""
    config.validate()
    world = world or World()
    if config.weight_gather == "copy" and world.size > 1:  # refused now, not after the weights are placed
        from .offload.peer_copy import check_peer_copy
        check_peer_copy(world)
    check_model_settings(config, model_cfg)
    # the A/B switches' values are refused now, not at the first copy or once weights are placed
    from .offload.pinned import copy_chunk
    from .offload.streaming import host_parts_wanted
    copy_chunk()
    host_parts_wanted()
    quant = QuantConfig(config.quant_bits, config.quant_group_size) if config.quant_bits != 16 else None
    dtype = resolve_dtype(config.dtype, device, model_cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    max_len = min(config.max_seq_len or DEFAULT_PLANNED_SEQ_LEN, model_cfg.max_position)
    prompt_len = min(config.max_prompt_len or max_len, max_len)
    kv_bits = config.kv_quant() or (None, 64)
    kv = KVOffload(pinned=config.kv_pinned(), async_write=config.kv_async(), attention=config.kv_attention,
                   overlap=config.kv_overlap, quant_bits=kv_bits[0], quant_group_size=kv_bits[1]) if config.kv_offload else None
    plan = RunPlan(config, model_cfg, device, dtype, quant, None, None, max_len, prompt_len, kv, world=world)
    if device.type != "cuda":
        if config.cpu_offload and not config.disk_offload:
            raise OffloadgenError("--cpu-offload streams weights to a GPU; this run is on the CPU, where the "
                                  "weights already are (drop --cpu-offload)")
        if config.kv_overlap:
            raise OffloadgenError("--kv-overlap overlaps CPU attention with a GPU's work; this run is on the CPU "
                                  "(drop --kv-overlap)")
        if config.disk_offload:  # layers stream from disk into a ring of RAM buffers
            plan.placement = disk_placement_on_cpu(model_cfg, config.prefetch_depth, elem)
            plan.placement.bytes["weights_on_disk"] = True
        elif quant is not None:
            plan.placement = all_resident(model_cfg)
        return plan
    plan.budget = config.gpu_memory or agreed_budget(default_gpu_budget(device), world)
    batch, gen_len = config.max_batch_size, max_len - prompt_len
    pool_ranks = world.size if config.weight_fetch == "pool" else 1
    fetch_ranks = world.size if config.weight_fetch in ("allgather", "pool") else 1
    # experts are copied one by one from pinned CPU memory by one rank (offload/experts.py)
    experts = config.expert_streaming if config.cpu_offload and not config.disk_offload and config.pin_memory \
        and world.size == 1 else "off"
    if kv is not None:
        if h2d_bytes_s is None and kv.attention == "auto":
            h2d_bytes_s = h2d_bandwidth(device)["best"]
        plan.placement, plan.kv, plan.kv_model = plan_kv_offload(
            model_cfg, elem, plan.budget, batch, prompt_len, gen_len, config.micro_batch_size, config.prefetch_depth,
            quant, kv, h2d_bytes_s, dtype, offload=config.offloaded, cpu_attention_bytes_s=cpu_attention_bytes_s,
            pool_ranks=pool_ranks, expert_streaming=experts, fetch_ranks=fetch_ranks,
            resident_layers=config.resident_layers, landing_slots=config.landing_buffers)
    else:
        plan.placement = plan_prefill_parts(model_cfg, elem, plan.budget, batch, prompt_len, gen_len,
                                            config.micro_batch_size, prefetch_depth=config.prefetch_depth,
                                            offload=config.offloaded, quant=quant, pool_ranks=pool_ranks, kv_bits=kv_bits,
                                            expert_streaming=experts, fetch_ranks=fetch_ranks,
                                            resident_layers=config.resident_layers,
                                            landing_slots=config.landing_buffers)
    if config.disk_offload:
        plan.placement.bytes["weights_on_disk"] = True
    if plan.placement.streamed or plan.placement.pooled or kv is not None:
        try:
            check_host_memory(plan.placement, host_available, quantized=quant is not None,
                              ranks_per_node=world.local_size)
        except OffloadgenError:
            # Experts on demand stream every layer, so CPU RAM holds them all; whole layers keep
            # some on the GPU and may fit where they do not. "auto" takes whichever runs.
            if experts != "auto" or not plan.placement.expert_streaming:
                raise
            return plan_run(config.replace(expert_streaming="off"), model_cfg, device, world, h2d_bytes_s,
                            host_available, cpu_attention_bytes_s)
    return plan


def check_model_settings(config: RunConfig, model_cfg) -> None:
    """Settings that are valid on their own but not for this model: a weight quantization group
    that does not divide its rows, a KV group that fits neither its head size nor whole heads, a
    --max-seq-len beyond the model's context (it was quietly cut to the context)."""
    if config.max_seq_len and config.max_seq_len > model_cfg.max_position:
        raise OffloadgenError(f"--max-seq-len {config.max_seq_len} is beyond the model's context of "
                              f"{model_cfg.max_position} tokens")
    if config.quant_bits != 16:
        check_group_size(QuantConfig(config.quant_bits, config.quant_group_size), model_cfg)
    if config.kv_quant():
        try:
            KVQuant(*config.kv_quant(), *family_of(model_cfg).kv_heads(model_cfg))
        except OffloadgenError as e:
            raise OffloadgenError(f"--kv-quant-group-size {config.kv_quant_group_size}: {e}") from None


def check_host_memory(placement: Placement, available: int | None = None, quantized: bool = False,
                      ranks_per_node: int = 1) -> None:
    """Streamed blocks and an offloaded KV cache live in CPU RAM: refuse before loading if they
    cannot fit. A node holds the streamed weights once (shared by its ranks) and a KV cache per rank."""
    kv = placement.bytes.get("kv_host", 0) * ranks_per_node
    weights = 0 if placement.bytes.get("weights_on_disk") else placement.streamed_bytes
    need = weights + kv + GiB  # and a little for buffers and Python
    available = available if available is not None else available_host_memory()
    if need <= available:
        return
    if kv:
        raise OffloadgenError(f"the offloaded KV cache needs {kv / GiB:.1f} GiB of CPU RAM and the streamed weights "
                              f"{weights / GiB:.1f} GiB, {need / GiB:.1f} GiB in all; {available / GiB:.1f} GiB is "
                              f"available: lower the batch size, or the prompt or generation length")
    hint = "" if quantized else "quantize (--quant-bits 4), "
    raise OffloadgenError(f"the streamed weights need {need / GiB:.1f} GiB of CPU RAM, {available / GiB:.1f} GiB "
                          f"is available: {hint}give the GPU a larger budget, or free memory")


def make_weights(plan: RunPlan, checkpoint) -> WeightSource:
    """The weight source the plan calls for: resident blocks, or the streaming source (from RAM or
    disk, quantized or not, shared per node under torchrun)."""
    c = plan.config
    if not plan.streams:
        return ResidentWeights(checkpoint, plan.device, plan.dtype, progress=c.progress)
    from .offload.streaming import StreamingWeights
    return StreamingWeights(checkpoint, plan.device, plan.dtype, plan.placement or all_resident(plan.model_cfg),
                            pinned=c.pin_memory, progress=c.progress, quant=plan.quant,
                            offload_dir=c.offload_dir if c.disk_offload else None, world=plan.world,
                            fetch=c.weight_fetch, gather=c.weight_gather)


@dataclass
class Runtime:
    """A built run: what was planned, and the objects that carry it out."""
    plan: RunPlan
    checkpoint: object
    tokenizer: object
    weights: WeightSource
    engine: Engine
    timings: dict  # startup_s (checkpoint opened to ready), weights_load_s

    def close(self) -> None:
        """Stop the weight source's threads and unpin its memory and the KV cache's."""
        self.engine.close()
        self.weights.close()


def build_runtime(config: RunConfig, world: World | None = None, checkpoint=None, tokenizer=None,
                  h2d_bytes_s: float | None = None) -> Runtime:
    """Plan, then load: the checkpoint is opened (unless given), the plan refuses what cannot fit
    before any weight is read, then the tokenizer, the weight source and the engine are made."""
    t_start = time.perf_counter()
    world = world or World()
    checkpoint = checkpoint or open_checkpoint(config.model, dummy=config.dummy)
    device = resolve_device(config, world)
    plan = plan_run(config, checkpoint.cfg, device, world, h2d_bytes_s)
    # The tokenizer before the weights, not beside them: from a tokenizer.json it takes a fraction of
    # a second (tokenizer.py). In a thread during the weight load, transformers' import (9-10 s on the
    # H100 host) slowed the loader threads more than it cost alone: OPT-13B's weights took 31 s instead
    # of 16 (issue 18; one run each, likely contention for the GIL).
    # A tokenizer that cannot load is told before any weight is read.
    tokenizer = tokenizer if tokenizer is not None else checkpoint.tokenizer()
    t_load = time.perf_counter()
    weights = make_weights(plan, checkpoint)
    try:
        engine = Engine(checkpoint.cfg, weights, device, plan.dtype, config.micro_batch_size, kv_offload=plan.kv,
                        kv_quant=config.kv_quant(),
                        prefill_tokens=plan.placement.prefill_tokens if plan.placement is not None else None)
    except BaseException:
        weights.close()  # its reader threads and pinned buffers would outlive the failed load
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    return Runtime(plan, checkpoint, tokenizer, weights, engine,
                   {"startup_s": now - t_start, "weights_load_s": now - t_load})
