"""Which blocks stay resident on the GPU and which stream from CPU memory, under a memory budget.

Everything that lives on the GPU counts against the budget: the KV cache, the ring of buffers
that streamed blocks arrive in, the activations of the largest pass (the prefill), and the
resident blocks. Every resident block saves its bytes on the bus in every pass, so the plan keeps
as many as fit: the head and embeddings first (needed every pass, shared when tied), then layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import OffloadgenError
from ..models import block_nbytes, blocks, family_of, shared_nbytes
from ..models.moe import expected_routed, is_expert_streamable
from .experts import WHOLE_SPAN_SHARE, expert_layouts
from .packed import PackedBlock

GiB = 1 << 30


# Landing buffers --weight-fetch allgather gets by default, in layers: 1.5 layers' worth, that is
# 1.5 x N buffers of 1/N layer on N ranks (6 on 4). Every layer's all-gather waits for the slowest
# rank's part, and with two buffers the other ranks' copies stopped with it: on 4 H100s (OPT-30B
# fp16, 8 rows a GPU, one lease) 2 gave 56.0 and 69.8 tok/s, 4 gave 76.6, 6 gave 79.3-83.6. In
# layers the memory and the time a rank's copies run ahead (about 40 ms of PCIe Gen5) stay the same
# for any N; only N = 4 was measured. With pool, 4 instead of 2 cost two pooled layers and ran
# slower (106.7 against 111.3): one per ring slot stays its default.
ALLGATHER_LANDING_LAYERS = 1.5


def allgather_landings(ranks: int) -> int:
    return math.ceil(ALLGATHER_LANDING_LAYERS * ranks)


def pass_position(block) -> float:
    """Where a block comes in a pass: embed, the layers in order, head."""
    return -1 if block == "embed" else float("inf") if block == "head" else block


@dataclass
class Placement:
    resident: list  # blocks kept whole on the GPU
    streamed: list  # blocks copied from host memory (or disk) in every pass, in pass order
    ring_slots: int
    bytes: dict = field(default_factory=dict)  # what each part of the GPU memory holds
    # Several ranks pooling their GPU memory (--weight-fetch pool): each rank keeps 1/N of these
    # blocks and all-gathers the rest from its peers every pass; they never cross PCIe.
    pooled: list = field(default_factory=list)
    # MoE layers streamed by their trunk, then only their routed experts (offload/experts.py), with
    # an expert cache of this many GPU slots of one expert each
    expert_streaming: bool = False
    expert_slots: int = 0
    # The prefill runs in parts of at most this many prompt tokens (rows x prompt length), and the
    # activations are sized for one part (plan_prefill_parts); None: the whole batch (or micro-batch) at once
    prefill_tokens: int | None = None
    # Several ranks fetching 1/N of each streamed block (allgather, pool): the buffers of 1/N block
    # that host copies land in before the gather, so PCIe copies run this many blocks ahead of the
    # gathers; None: as many as the ring has slots
    landing_slots: int | None = None

    @property
    def landings(self) -> int:
        return self.ring_slots if self.landing_slots is None else self.landing_slots

    @property
    def streamed_bytes(self) -> int:
        return self.bytes["streamed_per_pass"]

    @property
    def bus_bytes_per_step(self) -> int:
        """Weight bytes a decode step moves to the GPU: with expert streaming, the trunks and the
        routed experts the expert cache is expected to miss."""
        return self.bytes["routed_per_step"] if self.expert_streaming else self.streamed_bytes

    @property
    def fetched(self) -> list:
        """Blocks that arrive in the ring every pass (streamed or pooled), in pass order."""
        return sorted([*self.streamed, *self.pooled], key=pass_position)

    def describe(self) -> str:
        b = {"resident": 0, "ring": 0, "landing": 0, "kv_cache": 0, "activations": 0, **self.bytes}
        pooled = (f"{len(self.pooled)} pooled across ranks ({b['pooled_per_rank'] / GiB:.2f} GiB on each), "
                  if self.pooled else "")
        landing = f" and {self.landings} landing buffers ({b['landing'] / GiB:.2f} GiB)" if b["landing"] else ""
        return (f"{len(self.resident)} blocks resident ({b['resident'] / GiB:.2f} GiB), {pooled}{len(self.streamed)} streamed "
                f"({b['streamed_per_pass'] / GiB:.2f} GiB per pass through {self.ring_slots} buffers of "
                f"{b['ring'] / self.ring_slots / GiB if self.ring_slots else 0:.2f} GiB{landing}), "
                f"KV cache {b['kv_cache'] / GiB:.2f} GiB, "
                f"activations {b['activations'] / GiB:.2f} GiB"
                + (f" (prefill in parts of {self.prefill_tokens} tokens)" if self.prefill_tokens else "")
                + (f"; experts on demand, {b['routed_per_step'] / GiB:.2f} GiB per decode step expected, an expert "
                   f"cache of {self.expert_slots} ({b['expert_cache'] / GiB:.2f} GiB)" if self.expert_streaming else ""))


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


def planned_activations(cfg, batch: int, micro_batch: int | None, prefill_rows: int | None, prompt_len: int,
                        max_len: int, elem: int) -> int:
    """The activations a run's passes need at most: one prefill part's temporaries (a micro-batch,
    or fewer rows where the plan prefills in parts), and every other row's prompt-long hidden state."""
    rows = min(micro_batch or batch, prefill_rows or batch)
    act = activation_bytes(cfg, rows, prompt_len, max_len, elem)
    # The engine keeps every micro-batch's hidden state on the GPU between layers (the prefill's
    # are prompt-long): with the KV cache offloaded and batch 96 in parts of 8, 0.65 GB more.
    act += max(0, batch - rows) * prompt_len * cfg.hidden_size * elem
    if rows < (micro_batch or batch):  # a decode step's logits are still the whole micro-batch's
        act += ((micro_batch or batch) - rows) * cfg.vocab_size * 4 * 2
    return act


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
                   kv_scratch: int = 0, pool_ranks: int = 1, kv_bits: tuple = (None, 64),
                   expert_streaming: str = "off", fetch_ranks: int = 1, prefill_rows: int | None = None,
                   resident_layers: str = "spread", landing_slots: int | None = None) -> Placement:
    """Place blocks under `budget` bytes of GPU memory; refuse, saying what would fit, if impossible.

    With the KV cache offloaded (kv_on_gpu=False) the GPU holds only `kv_scratch` bytes of it: the
    device buffers of the micro-batches that attend on the GPU. With pool_ranks N > 1 the budget is
    each of N ranks' and the layers are pooled across them (_pool_layers); with fetch_ranks N > 1
    (all-gather or pool) host copies land in buffers of 1/N of a layer, landing_slots of them (None:
    allgather_landings(N) for all-gather, one per ring slot for pool), before the gathers
    (offload/streaming.py, _copy_ahead). For an MoE model,
    expert_streaming "on" streams trunks and routed experts (_expert_placement), "auto" does so
    where that moves fewer bytes per decode step than whole layers, "off" never. resident_layers
    says which layers stay on the GPU when not all fit: "spread" evenly through the pass (the last
    among them), or "last" as one run at the end (see spread_layers)."""
    max_len = prompt_len + gen_len
    kv = kv_cache_bytes(cfg, batch, max_len, elem_bytes, *kv_bits) if kv_on_gpu else kv_scratch
    act = planned_activations(cfg, batch, micro_batch, prefill_rows, prompt_len, max_len, elem_bytes)
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
    if landing_slots is not None:
        landings = landing_slots
    else:  # all-gather lands further ahead than pool, whose landing buffers cost pooled layers
        landings = max(slots, allgather_landings(fetch_ranks)) if fetch_ranks > 1 and pool_ranks == 1 else slots
    layer_bytes = max(sizes[i] for i in range(cfg.n_layers))
    # The embedding and head (one tensor when tied) are wanted resident; if they cannot be, they
    # stream like a layer and the ring must hold the largest block.
    ends = ["head", "embed"]
    ends_bytes = sizes["head"] + sizes["embed"] - shared
    # with fetch_ranks N > 1, the landing buffers: 1/N of the largest streamed block each
    landing_of = lambda largest: landings * -(-largest // fetch_ranks) if fetch_ranks > 1 else 0  # noqa: E731
    ring, landing = slots * layer_bytes, landing_of(layer_bytes)
    if landing_slots is None and landings > slots and fixed + ring + landing + ends_bytes > budget:
        landings = slots  # all-gather's default lands further ahead only where the budget has room
        landing = landing_of(layer_bytes)
    if fixed + ring + landing + ends_bytes > budget:
        ring, landing = slots * max(sizes.values()), landing_of(max(sizes.values()))
        ends, ends_bytes = [], 0
    if fixed + ring + landing > budget:
        raise _too_small(budget, batch, kv, act, slots, ring, landing, landings, landing_slots, fetch_ranks, kv_on_gpu)
    free = budget - fixed - ring - landing - ends_bytes
    if pool_ranks > 1:
        return _pool_layers(cfg, sizes, ends, free, pool_ranks, slots, landings, shared,
                            dict(kv_cache=kv, activations=act, ring=ring, landing=landing))
    n_resident = min(cfg.n_layers, int(free // layer_bytes))
    if max_resident_layers is not None:
        n_resident = min(n_resident, max_resident_layers)
    if n_resident == cfg.n_layers:  # everything fits: no ring needed at all
        return plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, prefetch_depth,
                              offload=False, kv_on_gpu=kv_on_gpu, quant=quant, kv_scratch=kv_scratch, kv_bits=kv_bits,
                              prefill_rows=prefill_rows)
    kept = spread_layers(cfg.n_layers, n_resident) if resident_layers == "spread" else \
        list(range(cfg.n_layers - n_resident, cfg.n_layers))
    resident = [b for b in blocks(cfg) if b in ends or b in kept]
    streamed = [b for b in blocks(cfg) if b not in resident]
    streamed_bytes = sum(sizes[b] for b in streamed)
    resident_bytes = sum(sizes[b] for b in resident) - (shared if "embed" in resident else 0)
    whole = Placement(resident, streamed, slots, dict(resident=resident_bytes, kv_cache=kv, activations=act, ring=ring,
                                                      landing=landing, streamed_per_pass=streamed_bytes),
                      landing_slots=landings if fetch_ranks > 1 else None)
    if expert_streaming == "off" or not is_expert_streamable(cfg):
        return whole
    routed = _expert_placement(cfg, elem_bytes, quant, sizes, ends, free, batch, whole)
    return routed if expert_streaming == "on" or routed.bus_bytes_per_step < whole.bus_bytes_per_step else whole


def _too_small(budget: int, batch: int, kv: int, act: int, slots: int, ring: int, landing: int, landings: int,
               asked_landings: int | None, fetch_ranks: int, kv_on_gpu: bool) -> OffloadgenError:
    """The refusal of a budget short of the KV cache, activations, ring and landing buffers, with
    what each takes and what would make the run fit."""
    fixed = kv + act
    # batch 1 cannot be smaller: the sequence must be shorter instead
    smaller = f"a smaller --batch-size (e.g. {batch // 2})" if batch > 1 else "a shorter --max-seq-len"
    landed = f" + {landings} landing buffers of 1/{fetch_ranks} layer {landing / GiB:.1f} GiB" if landing else ""
    # landing buffers the user asked for, where fewer would fit: say so first
    room = (budget - fixed - ring) // (landing // landings) if landing and asked_landings is not None else 0
    if room >= 1:
        smaller = f"fewer --landing-buffers (at most {room} fit), " + smaller
    return OffloadgenError(
        f"batch {batch} does not fit a {budget / GiB:.1f} GiB GPU budget: KV cache {kv / GiB:.1f} GiB + "
        f"activations {act / GiB:.1f} GiB + {slots} layer buffers {ring / GiB:.1f} GiB{landed} = "
        f"{(fixed + ring + landing) / GiB:.1f} GiB. Try {smaller}, a larger --gpu-memory, "
        f"or --micro-batch-size to shrink activations" + ("" if not kv_on_gpu else ", or --kv-offload")
        + (", or --weight-fetch whole (no landing buffers)" if landing and fixed + ring <= budget else ""))


# A prefill part of fewer tokens than this is not worth its slower matmuls; and a continuous batch's
# pass (a 512-token prompt chunk beside its decode rows) stays within what one part is planned for.
MIN_PREFILL_PART_TOKENS = 1024


def plan_prefill_parts(cfg, elem_bytes: int, budget: int, batch: int, prompt_len: int, gen_len: int,
                       micro_batch: int | None = None, **kw) -> Placement:
    """plan_placement, with the prefill in parts of fewer rows where that keeps more weight bytes
    on the GPU. The prefill's temporaries (1.18 GB for 8 rows of 512 OPT-30B tokens) are the
    largest part of the budget that a decode step does not need: in parts of 2 rows they shrink to
    0.34 GB, which on 4 pooling GPUs holds two more layers (a quarter of one costs 0.31 GB). Parts
    halve down to MIN_PREFILL_PART_TOKENS prompt tokens; the largest part that keeps the most is
    taken (larger parts prefill faster). Only with the KV cache on the GPU and no --micro-batch-size:
    an offloaded cache's parts are its micro-batches."""
    whole = plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, **kw)
    if micro_batch is not None or not kw.get("offload", True) or not kw.get("kv_on_gpu", True) or not whole.streamed:
        return whole
    best, rows = whole, batch // 2
    while rows >= 1 and rows * prompt_len >= MIN_PREFILL_PART_TOKENS:
        try:
            p = plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, None, prefill_rows=rows, **kw)
        except OffloadgenError:
            break
        if p.bus_bytes_per_step < best.bus_bytes_per_step:
            p.prefill_tokens = rows * prompt_len
            best = p
        rows //= 2
    return best


def moe_layer_bytes(cfg, elem_bytes: int, quant=None) -> dict:
    """Per sparse layer: (trunk bytes, bytes of one expert, number of experts) as packed."""
    dtype = {2: torch.float16, 4: torch.float32}[elem_bytes]
    fam = family_of(cfg)
    out, seen = {}, {}  # sparse layers are alike: lay out one of each shape
    for i in range(cfg.n_layers):
        shapes = {k: s for k, (_, s) in fam.block_tensors(cfg, i).items()}
        key = tuple(shapes.items())
        if key not in seen:
            lay = expert_layouts({i: PackedBlock(i, shapes, dtype, quant)}).get(i)
            seen[key] = lay and (lay.trunk_nbytes, lay.expert_nbytes, len(lay.spans))
        if seen[key]:
            out[i] = seen[key]
    return out


def routed_bytes_per_step(cfg, moe: dict, sizes: dict, streamed: list, batch: int, cache_share: float) -> int:
    """Expected bytes per decode step of `streamed` blocks with experts on demand: each sparse
    layer's trunk, and the experts a step of `batch` tokens routes to (uniform routing) that the
    expert cache, holding cache_share of all experts, misses; a layer missing most of its
    experts copies them all as one span."""
    total = 0
    for b in streamed:
        if b not in moe:
            total += sizes[b]
            continue
        trunk, expert, n = moe[b]
        missed = expected_routed(n, cfg.top_k, batch) * (1 - cache_share)
        total += trunk + (n if missed >= WHOLE_SPAN_SHARE * n else missed) * expert
    return int(total)


def _expert_placement(cfg, elem_bytes: int, quant, sizes: dict, ends: list, free: int, batch: int,
                      whole: Placement) -> Placement:
    """Every layer streams (its trunk ahead, its routed experts on demand); what the budget leaves
    after the ends holds experts in the expert cache, the most used ones across all layers (a
    resident layer is a cache of its own experts that never adapts to the routing)."""
    moe = moe_layer_bytes(cfg, elem_bytes, quant)
    expert = max(e for _, e, _ in moe.values())
    n_experts = sum(n for _, _, n in moe.values())
    slots = min(n_experts, max(0, int(free // expert)))
    streamed = [b for b in blocks(cfg) if b not in ends]
    resident = [b for b in blocks(cfg) if b in ends]
    b = dict(whole.bytes, resident=whole.bytes["resident"] - sum(sizes[i] for i in whole.resident if isinstance(i, int)),
             expert_cache=slots * expert, streamed_per_pass=sum(sizes[i] for i in streamed),
             routed_per_step=routed_bytes_per_step(cfg, moe, sizes, streamed, batch, slots / n_experts),
             whole_per_step=whole.streamed_bytes)
    return Placement(resident, streamed, whole.ring_slots, b, expert_streaming=True, expert_slots=slots)


def spread_layers(n_layers: int, n: int) -> list[int]:
    """n of n_layers layers, evenly spaced through the pass, the last layer among them.

    Why layers kept on the GPU are spread rather than kept as one run at the end: the ring holds
    prefetch_depth + 1 streamed layers, so while a run of kept layers computes, the bus can copy
    only that many of the next pass's layers and then idles for the rest of the run. One kept layer
    between streamed ones computes while the bus copies the streamed layers after it. (OPT-30B at
    batch 96 on one H100, 11 kept layers: the model said 0.14 s of a 1.1 s step; one A/B measured
    0.027 s, 88.70 against 86.60 tok/s. At batch 8, and with all-gather on 4 GPUs, no difference.)"""
    return sorted({n_layers - 1 - k * n_layers // n for k in range(n)}) if n else []


def _pool_layers(cfg, sizes: dict, ends: list, free: int, ranks: int, slots: int, landings: int, shared: int,
                 parts: dict) -> Placement:
    """Ranks pool their GPU memory: a pooled layer costs each rank 1/ranks of its bytes, and is
    all-gathered over NVLink into the ring every pass, so the pool holds ranks times the layers
    that one GPU would; only the layers it cannot hold cross PCIe (1/ranks of each on every link).
    As many layers as fit, counted from the last, are pooled, spread evenly through the pass (the
    last one among them): a pooled layer needs NVLink only, so between two streamed layers it keeps
    the gathers busy while PCIe copies the next streamed one. Pooled as one run at the end, the
    last 22 of OPT-30B's 48 layers on 4 H100s left PCIe idle for their whole stretch."""
    share = lambda b: -(-sizes[b] // ranks)  # noqa: E731
    pooled, room = [], free
    for i in reversed(range(cfg.n_layers)):
        if share(i) > room:
            break
        pooled.insert(0, i)
        room -= share(i)
    n, layers = len(pooled), cfg.n_layers
    spread = spread_layers(layers, n)
    if len(spread) == n and sum(share(i) for i in spread) <= free:  # layers of unequal sizes: keep the run
        pooled = spread
    resident = [b for b in blocks(cfg) if b in ends]
    streamed = [b for b in blocks(cfg) if b not in resident and b not in pooled]
    resident_bytes = sum(sizes[b] for b in resident) - (shared if "embed" in resident else 0)
    if not streamed:  # every fetched block pooled: no host copies to land (streaming.py makes none)
        parts = dict(parts, landing=0)
    return Placement(resident, streamed, slots, dict(parts, resident=resident_bytes,
                                                     pooled_per_rank=sum(share(b) for b in pooled),
                                                     streamed_per_pass=sum(sizes[b] for b in streamed)), pooled,
                     landing_slots=landings)


def kv_bytes_per_token(cfg, elem_bytes: int, bits: int | None = None, group_size: int = 64) -> int:
    """Bytes of keys and values one token adds to the cache over all layers: elem_bytes a value,
    or with bits 4 or 8 the packed codes and a float16 scale and minimum per group (quant/kv.py)."""
    from ..quant.kv import kv_quant
    heads, head_dim = family_of(cfg).kv_heads(cfg)
    codec = kv_quant(bits, group_size, heads, head_dim)
    return 2 * cfg.n_layers * (heads * head_dim * elem_bytes if codec is None else codec.row_bytes)


def kv_cache_bytes(cfg, batch: int, seq: int, elem_bytes: int, bits: int | None = None, group_size: int = 64) -> int:
    return batch * seq * kv_bytes_per_token(cfg, elem_bytes, bits, group_size)


def plan_kv_offload(cfg, elem_bytes: int, budget: int, batch: int, prompt_len: int, gen_len: int,
                    micro_batch: int | None, prefetch_depth: int, quant, opts, h2d_bytes_s: float | None,
                    dtype: torch.dtype, offload: bool = True, cpu_attention_bytes_s: float | None = None,
                    pool_ranks: int = 1, expert_streaming: str = "off", fetch_ranks: int = 1,
                    resident_layers: str = "spread", landing_slots: int | None = None):
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
        cpu_attention_bytes_s = probe_cpu_attention_bandwidth(
            rows, heads, cfg.n_heads, head_dim, prompt_len + gen_len, dtype, quant_bits=opts.quant_bits,
            quant_group_size=opts.quant_group_size)
    n_parts = -(-batch // rows)
    first = plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, prefetch_depth,
                           offload=offload, kv_on_gpu=False, quant=quant, pool_ranks=pool_ranks,
                           expert_streaming=expert_streaming, fetch_ranks=fetch_ranks, resident_layers=resident_layers,
                           landing_slots=landing_slots)
    kv_bits = (opts.quant_bits, opts.quant_group_size)
    cache_step = kv_cache_bytes(cfg, batch, prompt_len + gen_len // 2, elem_bytes, *kv_bits)  # read per decode step
    fraction = opts.gpu_fraction
    model = {"cache_bytes_per_step": cache_step, "h2d_bytes_s": h2d_bytes_s, "cpu_attention_bytes_s": cpu_attention_bytes_s}
    if fraction is None and opts.attention == "auto":
        if not opts.pinned:
            # A pageable cache's copies to the GPU hold the host thread at a fraction of the bus
            # (4 ranks: 4.7 s of a 6.6 s step issuing 5 GPU parts); the pinned-memory model above
            # would send parts there. Start on the CPU; the split (kv_split) weighs what issuing costs.
            fraction = 0.0
        elif h2d_bytes_s and cpu_attention_bytes_s:
            fraction = gpu_fraction(first.bus_bytes_per_step / h2d_bytes_s, cache_step, h2d_bytes_s, cpu_attention_bytes_s)
        else:
            fraction = 0.0  # nothing measured (no GPU): the cache is read where it is
    opts = dataclasses.replace(opts, gpu_fraction=fraction)
    n_gpu = opts.gpu_parts(n_parts)
    most = opts.most_gpu_parts(n_parts)  # the split may move a few more to the GPU (kv_split)
    opts = dataclasses.replace(opts, max_gpu_parts=most)
    # two device buffers (this layer, the next one) of keys and values per GPU-attending part, and a
    # quantized cache's dense workspace for one layer and part
    scratch = most * 2 * kv_cache_bytes(cfg, rows, prompt_len + gen_len, elem_bytes, *kv_bits) // cfg.n_layers
    if opts.quant_bits and most:
        scratch += kv_cache_bytes(cfg, rows, prompt_len + gen_len, elem_bytes) // cfg.n_layers
    placement = plan_placement(cfg, elem_bytes, budget, batch, prompt_len, gen_len, micro_batch, prefetch_depth,
                               offload=offload, kv_on_gpu=False, quant=quant, kv_scratch=scratch,
                               pool_ranks=pool_ranks, expert_streaming=expert_streaming,
                               fetch_ranks=fetch_ranks, resident_layers=resident_layers,
                               landing_slots=landing_slots) if scratch else first
    placement.bytes["kv_host"] = kv_cache_bytes(cfg, batch, prompt_len + gen_len, elem_bytes, *kv_bits)
    if h2d_bytes_s:
        # what the split needs to move several micro-batches at once (kv_split)
        opts = dataclasses.replace(opts, split_bus_s=(placement.bus_bytes_per_step / h2d_bytes_s,
                                                      cache_step / n_parts / h2d_bytes_s))
        x = n_gpu / n_parts
        bus = (placement.bus_bytes_per_step + x * cache_step) / h2d_bytes_s
        cpu = (1 - x) * cache_step / cpu_attention_bytes_s if cpu_attention_bytes_s else 0.0
        model.update(predicted_bus_s=bus, predicted_cpu_attention_s=cpu, predicted_step_s=max(bus, cpu))
    model.update(gpu_parts=n_gpu, max_gpu_parts=most, parts=n_parts, gpu_fraction=fraction)
    return placement, opts, model
