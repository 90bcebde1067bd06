"""Which blocks stay resident on the GPU and which stream from CPU memory, under a memory budget.

Everything that lives on the GPU counts against the budget: the KV cache, the ring of buffers
that streamed blocks arrive in, the activations of the largest pass (the prefill), and the
resident blocks. Every resident block saves its bytes on the bus in every pass, so the plan keeps
as many as fit: the head and embeddings first (needed every pass, shared when tied), then layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import OffloadgenError
from ..models import block_nbytes, blocks, family_of, shared_nbytes
from .packed import PackedBlock

GiB = 1 << 30


@dataclass
class Placement:
    resident: list  # blocks kept on the GPU
    streamed: list  # blocks copied in every pass, in pass order
    ring_slots: int
    bytes: dict = field(default_factory=dict)  # what each part of the GPU memory holds

    @property
    def streamed_bytes(self) -> int:
        return self.bytes["streamed_per_pass"]

    def describe(self) -> str:
        b = {"resident": 0, "ring": 0, "kv_cache": 0, "activations": 0, **self.bytes}
        return (f"{len(self.resident)} blocks resident ({b['resident'] / GiB:.2f} GiB), {len(self.streamed)} streamed "
                f"({b['streamed_per_pass'] / GiB:.2f} GiB per pass through {self.ring_slots} buffers of "
                f"{b['ring'] / self.ring_slots / GiB if self.ring_slots else 0:.2f} GiB), KV cache {b['kv_cache'] / GiB:.2f} GiB, "
                f"activations {b['activations'] / GiB:.2f} GiB")


def activation_bytes(cfg, micro_batch: int, prompt_len: int, max_len: int, elem: int) -> int:
    """A generous bound on the prefill's temporaries for one micro-batch.

    Hidden state and its norm/residual copies, q/k/v/attention output, the MLP's intermediate
    (two of them for SwiGLU), the additive attention mask, and float32 logits of the last
    position. Attention scores are not materialised: SDPA's memory-efficient kernel runs with a mask.
    """
    h = cfg.hidden_size
    ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * h
    tokens = micro_batch * prompt_len
    per_token = (8 * h + 3 * ffn) * elem
    # BLOOM's mask carries ALiBi per head; grouped-query attention repeats it per group
    mask_heads = cfg.n_heads if cfg.family == "bloom" else cfg.n_heads // cfg.n_kv_heads
    mask = micro_batch * mask_heads * prompt_len * max_len * elem
    logits = micro_batch * cfg.vocab_size * 4 * 2
    return tokens * per_token + mask + logits


def all_resident(cfg) -> Placement:
    """Every block on the compute device (CPU runs, or a model that fits)."""
    return Placement(list(blocks(cfg)), [], 0, dict(streamed_per_pass=0))


def disk_placement_on_cpu(cfg, prefetch_depth: int = 1, elem_bytes: int = 4) -> Placement:
    """A CPU run with weights on disk: embeddings and head in RAM, layers read into a ring of
    prefetch_depth + 1 buffers, so RAM holds a few layers, not the model."""
    layers = list(range(cfg.n_layers))
    streamed = sum(block_nbytes(cfg, i, elem_bytes) for i in layers)
    return Placement(["embed", "head"], layers, prefetch_depth + 1, dict(streamed_per_pass=streamed))


def block_sizes(cfg, elem_bytes: int, quant=None) -> tuple[dict, int]:
    """Bytes of each block as stored (quantized layers packed), and the dense workspace that
    dequantized layers need on the device."""
    if quant is None:
        return {b: block_nbytes(cfg, b, elem_bytes) for b in blocks(cfg)}, 0
    dtype = {2: torch.float16, 4: torch.float32}[elem_bytes]
    fam = family_of(cfg)
    layouts = {b: PackedBlock(b, {k: s for k, (_, s) in fam.block_tensors(cfg, b).items()}, dtype, quant)
               for b in blocks(cfg)}
    return ({b: l.nbytes for b, l in layouts.items()},
            max(l.dense_numel for l in layouts.values()) * elem_bytes)


def plan_placement(cfg, elem_bytes: int, budget: int, batch: int, prompt_len: int, gen_len: int,
                   micro_batch: int | None = None, prefetch_depth: int = 1, offload: bool = True,
                   kv_on_gpu: bool = True, max_resident_layers: int | None = None, quant=None,
                   kv_scratch: int = 0) -> Placement:
    """Place blocks under `budget` bytes of GPU memory; refuse, saying what would fit, if impossible.

    With the KV cache offloaded (kv_on_gpu=False) the GPU holds only `kv_scratch` bytes of it: the
    device buffers of the micro-batches that attend on the GPU."""
    max_len = prompt_len + gen_len
    heads, head_dim = family_of(cfg).kv_heads(cfg)
    kv = 2 * cfg.n_layers * batch * max_len * heads * head_dim * elem_bytes if kv_on_gpu else kv_scratch
    act = activation_bytes(cfg, micro_batch or batch, prompt_len, max_len, elem_bytes)
    # The engine keeps every micro-batch's hidden state on the GPU between layers (the prefill's
    # are prompt-long): with the KV cache offloaded and batch 96 in parts of 8, 0.65 GB more.
    act += max(0, batch - (micro_batch or batch)) * prompt_len * cfg.hidden_size * elem_bytes
    sizes, workspace = block_sizes(cfg, elem_bytes, quant)
    act += workspace  # one dequantized layer at a time
    shared = shared_nbytes(cfg, elem_bytes)  # tied embeddings: one matrix for embed and head
    everything = sum(sizes.values()) - shared
    fixed = kv + act
    if not offload:
        need = fixed + everything
        if need > budget:
            raise OffloadgenError(f"the model needs {need / GiB:.1f} GiB of GPU memory (weights {everything / GiB:.1f}, "
                                  f"KV cache {kv / GiB:.1f}, activations {act / GiB:.1f}) but the budget is "
                                  f"{budget / GiB:.1f} GiB: add --cpu-offload, or lower the batch size")
        return Placement(list(blocks(cfg)), [], 0, dict(resident=everything, kv_cache=kv, activations=act,
                                                         ring=0, streamed_per_pass=0))
    slots = prefetch_depth + 1
    layer_bytes = max(sizes[i] for i in range(cfg.n_layers))
    # The embedding and head (one tensor when tied) are wanted resident; if they cannot be, they
    # stream like a layer and the ring must hold the largest block.
    ends = ["head", "embed"]
    ends_bytes = sizes["head"] + sizes["embed"] - shared
    ring = slots * layer_bytes
    if fixed + ring + ends_bytes > budget:
        ring = slots * max(sizes.values())
        ends, ends_bytes = [], 0
    if fixed + ring > budget:
        largest = max(1, batch // 2)
        raise OffloadgenError(
            f"batch {batch} does not fit a {budget / GiB:.1f} GiB GPU budget: KV cache {kv / GiB:.1f} GiB + "
            f"activations {act / GiB:.1f} GiB + {slots} layer buffers {ring / GiB:.1f} GiB = "
            f"{(fixed + ring) / GiB:.1f} GiB. Try a smaller --batch-size (e.g. {largest}), a larger --gpu-memory, "
            f"or --micro-batch-size to shrink activations" + ("" if not kv_on_gpu else ", or --kv-offload"))
    free = budget - fixed - ring - ends_bytes
    n_resident = min(cfg.n_layers, int(free // layer_bytes))
    if max_resident_layers is not None:
        n_resident = min(n_resident, max_resident_layers)
    if n_resident == cfg.n_layers:  # everything fits: no ring needed at all
        return plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, prefetch_depth,
                              offload=False, kv_on_gpu=kv_on_gpu, quant=quant, kv_scratch=kv_scratch)
    # Keep the last layers resident: the copy of the next pass's first layers then overlaps them.
    resident_layers = list(range(cfg.n_layers - n_resident, cfg.n_layers))
    resident = [b for b in blocks(cfg) if b in ends or b in resident_layers]
    streamed = [b for b in blocks(cfg) if b not in resident]
    streamed_bytes = sum(sizes[b] for b in streamed)
    resident_bytes = sum(sizes[b] for b in resident) - (shared if "embed" in resident else 0)
    return Placement(resident, streamed, slots, dict(resident=resident_bytes, kv_cache=kv, activations=act, ring=ring,
                                                     streamed_per_pass=streamed_bytes))


def kv_cache_bytes(cfg, batch: int, seq: int, elem_bytes: int) -> int:
    heads, head_dim = family_of(cfg).kv_heads(cfg)
    return 2 * cfg.n_layers * batch * seq * heads * head_dim * elem_bytes


def plan_kv_offload(cfg, elem_bytes: int, budget: int, batch: int, prompt_len: int, gen_len: int,
                    micro_batch: int | None, prefetch_depth: int, quant, opts, h2d_bytes_s: float | None,
                    dtype: torch.dtype, offload: bool = True, cpu_attention_bytes_s: float | None = None):
    """Placement with the KV cache in CPU memory, and the share of micro-batches that attend on the
    GPU. With attention "auto" the share comes from the step model (kv_cache.gpu_fraction): the
    cache read in a decode step at the average context length, against the bus time the streamed
    weights already take. The CPU's attention bandwidth is measured here on this model's shapes
    unless given (only where there is a bus to weigh it against). Returns (placement, opts with
    gpu_fraction set, model dict)."""
    import dataclasses

    from .kv_cache import gpu_fraction
    rows = micro_batch or batch
    if cpu_attention_bytes_s is None and h2d_bytes_s and opts.attention == "auto" and opts.gpu_fraction is None:
        from .kv_cache import probe_cpu_attention_bandwidth
        heads, head_dim = family_of(cfg).kv_heads(cfg)
        cpu_attention_bytes_s = probe_cpu_attention_bandwidth(rows, heads, cfg.n_heads, head_dim, prompt_len + gen_len, dtype)
    n_parts = -(-batch // rows)
    first = plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, prefetch_depth,
                           offload=offload, kv_on_gpu=False, quant=quant)
    cache_step = kv_cache_bytes(cfg, batch, prompt_len + gen_len // 2, elem_bytes)  # read per decode step
    fraction = opts.gpu_fraction
    model = {"cache_bytes_per_step": cache_step, "h2d_bytes_s": h2d_bytes_s, "cpu_attention_bytes_s": cpu_attention_bytes_s}
    if fraction is None and opts.attention == "auto":
        if h2d_bytes_s and cpu_attention_bytes_s:
            fraction = gpu_fraction(first.streamed_bytes / h2d_bytes_s, cache_step, h2d_bytes_s, cpu_attention_bytes_s)
        else:
            fraction = 0.0  # nothing measured (no GPU): the cache is read where it is
    opts = dataclasses.replace(opts, gpu_fraction=fraction)
    n_gpu = opts.gpu_parts(n_parts)
    # two device buffers (this layer, the next one) of keys and values per GPU-attending part
    scratch = n_gpu * 2 * kv_cache_bytes(cfg, rows, prompt_len + gen_len, elem_bytes) // cfg.n_layers
    placement = plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, prefetch_depth,
                               offload=offload, kv_on_gpu=False, quant=quant, kv_scratch=scratch) if scratch else first
    placement.bytes["kv_host"] = kv_cache_bytes(cfg, batch, prompt_len + gen_len, elem_bytes)
    if h2d_bytes_s:
        x = n_gpu / n_parts
        bus = (placement.streamed_bytes + x * cache_step) / h2d_bytes_s
        cpu = (1 - x) * cache_step / cpu_attention_bytes_s if cpu_attention_bytes_s else 0.0
        model.update(predicted_bus_s=bus, predicted_cpu_attention_s=cpu, predicted_step_s=max(bus, cpu))
    model.update(gpu_parts=n_gpu, parts=n_parts, gpu_fraction=fraction)
    return placement, opts, model
