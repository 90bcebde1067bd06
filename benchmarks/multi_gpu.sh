#!/usr/bin/env bash
# Issue 20 in one call on a machine of N GPUs: OPT-30B dummy, weights in CPU RAM, 16 GiB per GPU,
# prompt 512, gen 32, 8 rows per GPU, against one GPU of the same machine in the same call; the
# links probed first (benchmarks/link_probe.py). Records and console go to $OUT (or ./out); a table last,
# with each run's step beside the one `offloadgen plan` predicts from the links that run probed.
#   bash benchmarks/multi_gpu.sh [check] [probe] [one] [whole] [allgather] [pool] [allgather2] [pool2] [poolq4] [poolkv] [plan] ...
# (check: the tokens of pooled layers gathered by NCCL, by pushed and by pulled copies agree with whole layers, before poolpull's timing)
# (poolcopy, allgathercopy, poolq4copy: --weight-gather copy; poolpull, allgatherpull: the same with
#  OFFLOADGEN_PEER_COPY=pull; poolcta: pool at NCCL_CTA_POLICY=1)
# (allgather2, pool2: the same with --prefetch-depth 2; poolch: pool at NCCL_MAX_NCHANNELS=$CHANNELS,
#  default "12 16 24", ~60 s each on 4 H100s)
# RESIDENT=last (or spread, the default) places the layers each GPU keeps whole with --resident-layers:
#   bash benchmarks/multi_gpu.sh one allgather && RESIDENT=last bash benchmarks/multi_gpu.sh one allgather
# allgathershared, poolshared: the same with the whole blocks in one node-shared memory (OFFLOADGEN_HOST_PARTS=0)
# OFFLOADGEN_COPY_CHUNK_MB=n: host copies in n MB pieces (default 64; column MB)
# LANDING=n gives allgather and pool n landing buffers (--landing-buffers), e.g. LANDING=4 ... allgather
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
# The console goes to $OUT as it comes: a call cut at its time limit still brings it back.
exec > >(tee -a "$out/console.log") 2>&1
step_limit=${STEP_TIMEOUT:-600}  # seconds per step; keep the steps of one call under its limit
# NVLink multicast stays off on shared hosts (see src/offloadgen/distributed.py)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=${GPUS:-$(nvidia-smi -L | wc -l)}  # GPUS=2 with CUDA_VISIBLE_DEVICES=0,1 uses two of them
bench="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --loops ${LOOPS:-1} --verbose 1 --json-file $out/offloadgen.jsonl ${RESIDENT:+--resident-layers $RESIDENT}"
# LANDING=n: n landing buffers for allgather and pool (--landing-buffers; default 1.5 x N for allgather where the budget
# has room, 6 on 4 GPUs; one per ring slot for pool)
land=${LANDING:+--landing-buffers $LANDING}
many="--num-gpus-per-node $n --batch-size $((8 * n))"
if [ -n "${TORCHRUN:-}" ]; then  # TORCHRUN=1: the ranks under plain torchrun instead of offloadgen's launcher (an A/B)
  export OMP_NUM_THREADS=$(( $(nproc) / n ))
  bench=${bench/python3 -m offloadgen.cli bench/python3 -m torch.distributed.run --standalone --nproc-per-node $n -m offloadgen.cli bench}
fi
nvidia-smi topo -m; free -g | head -2
python3 -c "import torch; print('torch', torch.__version__, 'NCCL', torch.cuda.nccl.version())"
for what in "$@"; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    probe) timeout 300 python3 benchmarks/link_probe.py ;;
    check) timeout 300 python3 benchmarks/gpu_dist_check.py --gpus $n --modes whole,poolspread,poolspread+copy,poolspread+pull \
             | tee "$out/dist_check.txt" ;;
    one) (cd "$out" && timeout $step_limit $bench --batch-size 8) ;;
    whole) (cd "$out" && timeout $step_limit $bench $many --weight-fetch whole) ;;
    allgather) (cd "$out" && timeout $step_limit $bench $many --weight-fetch allgather $land) ;;
    # the A/B of each rank's own driver-pinned parts: the whole blocks once per node in a shared
    # memfd registered with cudaHostRegister, as before session 16 (OFFLOADGEN_HOST_PARTS=0)
    allgathershared) (cd "$out" && OFFLOADGEN_HOST_PARTS=0 timeout $step_limit $bench $many --weight-fetch allgather $land) ;;
    poolshared) (cd "$out" && OFFLOADGEN_HOST_PARTS=0 timeout $step_limit $bench $many --weight-fetch pool $land) ;;
    pool) (cd "$out" && timeout $step_limit $bench $many --weight-fetch pool $land) ;;
    # a third ring buffer: one more layer in flight, to hide compute behind both links
    allgather2) (cd "$out" && timeout $step_limit $bench $many --weight-fetch allgather --prefetch-depth 2) ;;
    pool2) (cd "$out" && timeout $step_limit $bench $many --weight-fetch pool --prefetch-depth 2) ;;
    # NCCL's all-gather kernels share the SMs with the layer's compute: fewer channels leave the
    # compute more of them, at a lower all-gather rate (8 channels: step 1.18x copy-only, 168 GB/s)
    poolch) for ch in ${CHANNELS:-12 16 24}; do echo "-- NCCL_MAX_NCHANNELS=$ch"
              (cd "$out" && NCCL_MAX_NCHANNELS=$ch timeout $step_limit $bench $many --weight-fetch pool); done ;;
    poolq4) (cd "$out" && timeout $step_limit $bench $many --weight-fetch pool --quant-bits 4) ;;
    # the parts copied from the other GPUs' memory by the copy engines (no NCCL kernels on the SMs)
    poolcopy) (cd "$out" && timeout $step_limit $bench $many --weight-fetch pool --weight-gather copy) ;;
    allgathercopy) (cd "$out" && timeout $step_limit $bench $many --weight-fetch allgather --weight-gather copy) ;;
    # the same with this GPU's copy engines reading the others' memory (no contexts on other GPUs)
    poolpull) (cd "$out" && OFFLOADGEN_PEER_COPY=pull timeout $step_limit $bench $many --weight-fetch pool --weight-gather copy) ;;
    allgatherpull) (cd "$out" && OFFLOADGEN_PEER_COPY=pull timeout $step_limit $bench $many --weight-fetch allgather \
                      --weight-gather copy) ;;
    poolq4copy) (cd "$out" && timeout $step_limit $bench $many --weight-fetch pool --quant-bits 4 --weight-gather copy) ;;
    # NCCL's own answer to SM contention (NCCL 2.27+): its fewest-CTA policy
    poolcta) (cd "$out" && NCCL_CTA_POLICY=1 timeout $step_limit $bench $many --weight-fetch pool) ;;
    plan) for f in allgather pool; do  # the plan of N ranks, from the links the last bench of N ranks saved
            python3 -m offloadgen.cli plan facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 \
              --gen-len 32 --batch-size 8 --num-gpus-per-node $n --weight-fetch $f; done ;;
    poolkv) (cd "$out" && timeout $step_limit $bench --num-gpus-per-node $n --batch-size $((64 * n)) --weight-fetch pool \
               --kv-offload --pin-kv-cache --async-kv-offload --micro-batch-size 8) ;;
  esac
done
python3 - "$out/offloadgen.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
one = next((r["decode_throughput"] for r in rows if r["world_size"] == 1 and r["quant_bits"] == 16 and not r["kv_offload"]), None)
def gbs(v):
    return f"{v / 1e9:.1f}" if v else "-"
def sec(v):
    return f"{v:.3f}" if v is not None else "-"
def ram(r, key):  # the node's RAM the run took, and docs/distributed.md's model of it
    v = (r.get("host_memory") or {}).get(key)
    return f"{v / 2**30:.1f}" if v is not None else "-"
def host(r):  # where the streamed weights sat: each rank's own part, or whole blocks shared by the node
    h = r.get("host_memory") or {}
    return "-" if r["world_size"] == 1 else "part" if h.get("weight_host_parts") else "node"
print(f"{'gpus':>4} {'fetch':>9} {'host':>4} {'MB':>4} {'gath':>4} {'ahead':>5} {'kept':>6} {'land':>4} {'ch':>3} {'bits':>4} {'kv':>3} {'batch':>5} {'pooled':>6} {'tok/s':>8} {'step s':>7} {'vs 1':>6} "
      f"{'PCIe GB/rank':>12} {'NVLink GB/rank':>14} {'start s':>7} {'H2D GB/s':>8} {'NV GB/s':>7} {'pred s':>7} "
      f"{'PCIe s':>7} {'NVLink s':>8} {'copy s':>7} {'bound':>8} {'RAM GiB':>7} {'model':>6}")
for r in rows:
    ratio = r["decode_throughput"] / one if one else float("nan")
    # H2D: the N links together where probed, else one link alone; NV: the all-gather rate a rank receives
    h2d = r.get("h2d_aggregate_bytes_s") or r.get("h2d_bandwidth_bytes_s")
    print(f"{r['world_size']:4d} {r['weight_fetch']:>9} {host(r):>4} {r.get('copy_chunk_bytes', 64 << 20) >> 20:4d} {r.get('peer_copy') or r.get('weight_gather', 'nccl'):>4} {r.get('prefetch_depth', 1):5d} {r.get('resident_at') or '-':>6} {r.get('landing_buffers') or '-':>4} {r.get('nccl_max_nchannels') or '-':>3} {r['quant_bits']:4d} {'y' if r['kv_offload'] else 'n':>3} {r['batch_size']:5d} "
          f"{r.get('pooled_blocks', 0):6d} {r['decode_throughput']:8.2f} {r['decode_step_s']:7.3f} {ratio:6.2f} "
          f"{r.get('pcie_bytes_per_step_per_rank', 0) / 1e9:12.2f} {r.get('nvlink_bytes_per_step_per_rank', 0) / 1e9:14.2f} {r['startup_s']:7.1f} "
          f"{gbs(h2d):>8} {gbs(r.get('nvlink_allgather_bytes_s')):>7} {sec(r.get('predicted_step_s')):>7} "
          f"{sec(r.get('predicted_pcie_s')):>7} {sec(r.get('predicted_nvlink_s')):>8} {sec(r.get('copy_only_step_s')):>7} "
          f"{r.get('predicted_bound', '-'):>8} {ram(r, 'node_used_by_run_bytes'):>7} {ram(r, 'model_bytes'):>6}")
PY
