#!/usr/bin/env bash
# Issue 18 against the peers on one H100: Mixtral-8x7B dummy, weights in CPU RAM, 16 GiB GPU budget,
# prompt 512, gen 32, through offloadgen (routed experts over the bus, benchmarks/moe_streaming.sh's
# flags), transformers + Accelerate and DeepSpeed ZeRO-3 (both run transformers' MixtralForCausalLM,
# built from our preset by benchmarks/peers/common.py, fp16; offloadgen's dummy Mixtral is bf16: the
# same bytes). Records and console go to $OUT (or ./out); the table comes last: decode tok/s, weight
# bytes per decode step (offloadgen: measured; peers: what their placement leaves in CPU RAM, which
# every forward copies in) and offloadgen's decode tok/s over each peer's at the same batch.
#
# Steps and their expected time on one H100 (16 cores, 125 GiB RAM, PCIe Gen5 ~55 GB/s), from
# RESULTS.md: offloadgen's Mixtral runs took 36 s (b1, 2.11 tok/s), 80 s (b8, 4.92 tok/s) and ~75 s
# (b32, 20.09 tok/s) each, start-up included (fill 93 GB: ~10 s). Accelerate's OPT-30B step moved its
# CPU weights at ~6.6 GB/s (1.05 tok/s at batch 8, 7.65 s a step) and DeepSpeed's at ~46 GB/s
# (1.30 s a step for 60 GB; engine built in 40 s). For Mixtral that gives:
#   og1      offloadgen batch 1                                   ~40 s   (timeout 90)
#   og8      offloadgen batch 8                                   ~80 s   (timeout 130)
#   ogbest   offloadgen batch $BEST (32)                          ~75 s   (timeout 130)
#   ds       DeepSpeed ZeRO-3, batch 1 then 8 on one engine, one loop each: engine ~60 s (93 GB
#            pinned), each generate ~70 s (93 GB a step at ~46 GB/s: ~2.1 s x 32), ~215 s in all (timeout 290)
#   ds1      DeepSpeed batch 1 only                               ~145 s  (timeout 200)
#   acc1     Accelerate batch 1: dummy fill of 93 GB ~30 s; with 16 GiB less a 2.8 GB layer for its
#            own staging, ~4 of 32 layers fit the GPU, ~80 GB a step at ~6.6 GB/s: ~12 s a step.
#            At gen 32 that is ~7 min, too long beside anything else, so it generates
#            $ACC_GEN_LEN (16) tokens: ~15 decode steps, ~235 s (timeout 320). Its step is bus-bound
#            (~12 s against a KV cache of 0.07 GB), so 16 or 32 tokens give the same decode tok/s;
#            the table's gen column says which ran.
# The whole does not fit one call of 10 minutes (~9.5 min expected, the Accelerate step alone at gen
# 32 ~7 min). Two calls, each with offloadgen's batch 1 as its own baseline, each under 560 s of timeouts:
#   call 1:  bash benchmarks/moe_peers.sh og1 og8 ds        ~5.5 min (timeouts 510 s)
#   call 2:  bash benchmarks/moe_peers.sh og1 ogbest acc1   ~5.5 min (timeouts 540 s)
# Carry .whl (DeepSpeed 0.19.8 built with DS_BUILD_OPS=0 and its needs, as benchmarks/peers/run_peers.sh).
# Host RAM: each step is its own process and only one holds the 93 GB at a time; neither peer makes
# a second host copy (Accelerate takes each filled tensor as is; ZeRO-3 partitions to pinned CPU as
# zero.Init builds). The table of both calls together, here:
#   OUT=results/call2 TABLE_FROM=results/call1 bash benchmarks/moe_peers.sh table
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
exec > >(tee -a "$out/console.log") 2>&1
model=${MODEL:-mixtral-8x7b}
if [ "$*" != table ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) \
  || unset TORCH_CUDA_ARCH_LIST  # DeepSpeed 0.19.8 cannot parse the image's 9.0a (run_peers.sh)
export TORCH_CUDA_ARCH_LIST
bench="python3 -m offloadgen.cli bench --model $model --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --loops 1 --verbose 1 --json-file $out/moe.jsonl"
peer="--model $model --gpu-memory 16GiB --prompt-len 512 --loops 1 --json-file $out/peers.jsonl"
[ "$*" = table ] || { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2; }
for what in "$@"; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    og1) (cd "$out" && timeout ${OG1_TIMEOUT:-90} $bench --batch-size 1) ;;
    og8) (cd "$out" && timeout ${OG8_TIMEOUT:-130} $bench --batch-size 8) ;;
    ogbest) (cd "$out" && timeout ${OGBEST_TIMEOUT:-130} $bench --batch-size "${BEST:-32}") ;;
    ds) timeout ${DS_TIMEOUT:-290} python3 benchmarks/peers/deepspeed_peer.py $peer --gen-len 32 --batch-size 1 8 ;;
    ds1) timeout ${DS1_TIMEOUT:-200} python3 benchmarks/peers/deepspeed_peer.py $peer --gen-len 32 --batch-size 1 ;;
    acc1) timeout ${ACC_TIMEOUT:-320} python3 benchmarks/peers/accelerate_peer.py $peer --gen-len ${ACC_GEN_LEN:-16} --batch-size 1 ;;
    table) ;;
    *) echo "moe_peers.sh: no step named $what" ;;
  esac
done
python3 - "$out" ${TABLE_FROM:-} <<'PY'
import json, os, sys
rows = []
for folder in sys.argv[1:]:
    for name in ("moe.jsonl", "peers.jsonl"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            rows += [dict(json.loads(line), call=os.path.basename(os.path.normpath(folder))) for line in open(path) if line.strip()]
ours = [r for r in rows if r["system"] == "offloadgen" and "error" not in r]

def baseline(r):
    """offloadgen at the peer's batch, from the same call where there is one."""
    same = [o for o in ours if o["batch_size"] == r["batch_size"]]
    return next((o for o in same if o["call"] == r["call"]), same[0] if same else None)

def gb_per_step(r):
    b = (r.get("experts") or {}).get("bus_bytes_per_step") or r.get("weight_bytes_per_step")
    return f"{b / 1e9:8.2f}" if b else f"{'-':>8s}"

print(f"{'call':10s} {'system':44s} {'batch':>5s} {'gen':>4s} {'decode tok/s':>12s} {'step s':>7s} {'GB/step':>8s} "
      f"{'peak GiB':>8s} {'ready s':>7s} {'offloadgen over it':>18s}")
for r in rows:
    if "error" in r:
        print(f"{r['call']:10s} {r['system'][:44]:44s} {r['batch_size']:5d} {r['gen_len']:4d}  failed: {r['error'][:100]}")
        continue
    base = baseline(r) if r["system"] != "offloadgen" else None
    ratio = f"{base['decode_throughput'] / r['decode_throughput']:7.2f}x" + ("" if base["call"] == r["call"] else f" ({base['call']})") if base else ""
    print(f"{r['call']:10s} {r['system'][:44]:44s} {r['batch_size']:5d} {r['gen_len']:4d} {r['decode_throughput']:12.2f} "
          f"{r['decode_step_s']:7.3f} {gb_per_step(r)} {r['peak_gpu_mem_bytes'] / 2**30:8.2f} {r.get('startup_s') or 0:7.1f} {ratio:>18s}")
fine = [r for r in rows if "error" not in r]
best_ours = max(ours, key=lambda r: r["decode_throughput"], default=None)
for system in sorted({r["system"] for r in fine} - {"offloadgen"}):
    best = max((r for r in fine if r["system"] == system), key=lambda r: r["decode_throughput"])
    if best_ours:
        print(f"best measured: offloadgen {best_ours['decode_throughput']:.2f} tok/s (batch {best_ours['batch_size']}) over "
              f"{system} {best['decode_throughput']:.2f} (batch {best['batch_size']}): "
              f"{best_ours['decode_throughput'] / best['decode_throughput']:.2f}x")
print("GB/step: weight bytes per decode step; offloadgen's measured on the bus, the peers' from their placement "
      "(bytes left in CPU RAM that every forward copies in). Ratios: offloadgen's decode tok/s over the peer's at "
      "the same batch, from the same call unless another call is named.")
PY
