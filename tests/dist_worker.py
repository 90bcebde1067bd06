"""Run under torchrun by test_distributed.py: each rank generates for its slice of a fixed batch
with streamed weights (whole layers, or 1/N fetched and all-gathered) from shared host memory;
rank 0 writes every row's tokens, gathered in order, to a JSON file.

    torchrun --nproc-per-node N tests/dist_worker.py CHECKPOINT OUT.json {whole|allgather|pool|poolspread|poolall|die|shared|budget}

In "poolspread" mode every other layer from the second is pooled (streamed and pooled layers
alternate, as the planner spreads them: host copies run ahead past pooled layers); in "poolall"
every layer is (nothing is copied from host memory, and no landing buffer is made).
In "pool" mode the last two layers are pooled (each rank keeps 1/N of them and all-gathers the
rest), the others stream from shared host memory. DIST_RESET=k: k blocks of a pass are fetched
and used, then the schedule is reset (as after a pass that failed midway) before generating.
DIST_DIE=1: the last rank dies at the start, as in "die" mode, whatever the mode.
DIST_KILL=r:function: rank r SIGKILLs itself in the first barrier that `function`
(shared_host_buffers or _open_shared_files) calls, once the node's shared memory is made and
mapped but before the ranks are done with it; every rank first prints the port in MASTER_PORT
(which the old /dev/shm names carried).
DIST_LANDING=n: n landing buffers (placement.landing_slots), whatever the ring's slots.
DIST_KEEP=i,j: layers i and j stay resident (kept whole on every rank, as plan_placement spreads
them), taken out of the streamed and pooled ones, so that kept layers sit between fetched ones.
DIST_GATHER=copy: the ranks read each other's parts from shared memory (--weight-gather copy); the
all-gather then refuses to run, so a pass that still used it fails. With DIST_DEVICE=cuda it runs the same on the
ranks' GPUs over NCCL (benchmarks/gpu_dist_check.py), where the copies and gathers overlap.
"""
import json
import os
import sys

import torch

from dist_batch import fixed_batch
from offloadgen import distributed
from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload.placement import Placement, disk_placement_on_cpu
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.sampling import SamplingParams

path, out_file, mode = sys.argv[1:4]
DEVICE_TYPE = os.environ.get("DIST_DEVICE", "cpu")
world = distributed.init(DEVICE_TYPE)
DEVICE = distributed.device_for(world, torch.device(DEVICE_TYPE))
if (mode == "die" or "DIST_DIE" in os.environ) and world.rank == world.size - 1:
    import time
    time.sleep(2)  # the others are waiting in a collective (rank 0 holding shared-memory files)
    os._exit(3)
if "DIST_KILL" in os.environ:
    import signal
    killed_rank, killed_in = os.environ["DIST_KILL"].split(":")
    print(f"MASTER_PORT={os.environ['MASTER_PORT']}", flush=True)
    plain_barrier = distributed.barrier

    def killing_barrier(w):
        if w.rank == int(killed_rank) and sys._getframe(1).f_code.co_name == killed_in:
            os.kill(os.getpid(), signal.SIGKILL)
        return plain_barrier(w)
    distributed.barrier = killing_barrier
ckpt = SafetensorsFolder(path)
ids, mask = fixed_batch(int(os.environ.get("DIST_ROWS", "6")))
rows = distributed.local_rows(ids.shape[0], world)
placement = disk_placement_on_cpu(ckpt.cfg, prefetch_depth=int(os.environ.get("DIST_RING", "2")) - 1)
layers = list(range(ckpt.cfg.n_layers))
pooled = {"pool": layers[-2:], "poolspread": layers[1::2], "poolall": layers}.get(mode)
if pooled:
    streamed = [i for i in layers if i not in pooled]
    placement = Placement(["embed", "head"], streamed, placement.ring_slots, dict(streamed_per_pass=0), pooled=pooled)
if "DIST_KEEP" in os.environ:
    kept = [int(i) for i in os.environ["DIST_KEEP"].split(",")]
    placement = Placement(["embed", *kept, "head"], [b for b in placement.streamed if b not in kept],
                          placement.ring_slots, dict(streamed_per_pass=0), pooled=[b for b in placement.pooled
                                                                                    if b not in kept])
    pooled, streamed = placement.pooled, [b for b in placement.streamed if isinstance(b, int)]
if "DIST_LANDING" in os.environ:  # landing buffers beyond the ring's slots: copies run further ahead
    placement.landing_slots = int(os.environ["DIST_LANDING"])
gather = os.environ.get("DIST_GATHER", "nccl")
if gather == "copy":
    def no_all_gather(*args, **kwargs):
        raise AssertionError("--weight-gather copy must not all-gather")
    torch.distributed.all_gather_into_tensor = no_all_gather
weights = StreamingWeights(ckpt, DEVICE, torch.float32, placement, progress=False, world=world,
                           fetch="pool" if pooled else mode if mode == "allgather" else "whole", gather=gather)
assert (weights.peers is not None) == (gather == "copy" and mode != "whole")
# what a bench record says ran: shared memory between CPU ranks, the environment's direction on GPUs
expected_copy = "shared memory" if DEVICE_TYPE == "cpu" else os.environ.get("OFFLOADGEN_PEER_COPY", "push")
assert weights.peers is None or weights.peers.mode == expected_copy, (weights.peers.mode, expected_copy)
if weights.shards > 1:  # each rank keeps only its own 1/N of every streamed block, made by itself
    assert weights.host_parts == (os.environ.get("OFFLOADGEN_HOST_PARTS") != "0")
    for block, held in weights.host.items():
        whole = torch.zeros(weights.layouts[block].nbytes, dtype=torch.uint8)
        weights._fill_block(ckpt, block, whole)
        lo, hi = weights._part_span(block)
        assert torch.equal(held, whole[lo:hi] if weights.host_parts else whole), (world.rank, block)
if "DIST_KEEP" in os.environ:  # kept whole on this rank, never fetched
    assert set(kept) <= set(weights.resident) and not set(kept) & set(weights.order), weights.order
if pooled:
    assert set(weights.host) == set(streamed) and set(weights.pool_shard) == set(pooled)
    assert len(weights.landing) == (placement.landings if streamed else 0)
if mode == "allgather":  # every block streams: a pass begins with the ring's gathers and every landing buffer's copy
    assert len(weights.landing) == placement.landings
    assert weights.next_copy == len(weights.ring) + placement.landings, (weights.next_copy, placement.landings)
for block in weights.order[:int(os.environ.get("DIST_RESET", "0"))]:
    weights.get(block)
    weights.done(block)
if "DIST_RESET" in os.environ:
    weights.reset()
if mode == "budget":
    # ranks whose GPUs have different free memory plan from one budget, the smallest
    from offloadgen.runtime import agreed_budget
    result = distributed.gather(agreed_budget(1000 - 10 * world.rank, world), world)
elif mode == "shared":
    # the streamed blocks are one memory on the node: what rank 0 writes, the others read
    block = weights.order[0]
    if world.rank == 0:
        weights.host[block][:8] = torch.arange(8, dtype=torch.uint8) + 100
    distributed.barrier(world)
    seen = weights.host[block][:8].tolist()
    result = distributed.gather(seen, world)
else:
    out = Engine(ckpt.cfg, weights, DEVICE, torch.float32, 2).generate(
        ids[rows].to(DEVICE), mask[rows].to(DEVICE), SamplingParams(max_new_tokens=8, ignore_eos=True), set(), 0)
    result = [row for part in distributed.gather(out.tokens, world) for row in part]
if world.is_main:
    with open(out_file, "w") as f:
        json.dump(result, f)
distributed.finish(world)
distributed.exit_process(0)
