#!/usr/bin/env bash
# Issue 18 on one H100: MoE layers with only their routed experts over the bus (docs/moe-streaming.md).
# Dummy weights in pinned CPU RAM, 16 GiB GPU budget, prompt 512, gen 32, one timed loop each:
#   mixtral1 / mixtral8 / mixtralbest : Mixtral-8x7B (93 GB bf16) at batch 1, 8 and BEST (default 32)
#   qwen1 / qwen8                     : Qwen3-30B-A3B (61 GB) at batch 1 and 8
# --expert-streaming auto: the plan picks routed experts or whole layers per batch (the record says
# which). Records and console go to $OUT (or the folder given as first argument if it is not a case);
# the table comes last: measured weight bytes per decode step against every streamed layer whole.
# Expected on one H100 (16 cores, 125 GiB): ~7 minutes for all five, most of it start-up (filling and
# pinning 93 GB of dummy weights: ~45 s a Mixtral run).
#   bash benchmarks/moe_streaming.sh [FOLDER] [mixtral1 mixtral8 mixtralbest qwen1 qwen8]
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in mixtral*|qwen*|"") out=${OUT:-out} ;; *) out=$1; shift ;; esac
out=$(realpath -m "$out"); mkdir -p "$out"
cases=("$@"); [ ${#cases[@]} -eq 0 ] && cases=(mixtral1 mixtral8 mixtralbest qwen1 qwen8)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
bench="$py -m offloadgen.cli bench --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --loops 1 --verbose 1 --json-file $out/moe.jsonl"
free -g | head -2
for what in "${cases[@]}"; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    mixtral1) (cd "$out" && timeout 200 $bench --model mixtral-8x7b --batch-size 1) ;;
    mixtral8) (cd "$out" && timeout 200 $bench --model mixtral-8x7b --batch-size 8) ;;
    mixtralbest) (cd "$out" && timeout 200 $bench --model mixtral-8x7b --batch-size "${BEST:-32}") ;;
    qwen1) (cd "$out" && timeout 150 $bench --model qwen3-30b-a3b --batch-size 1) ;;
    qwen8) (cd "$out" && timeout 150 $bench --model qwen3-30b-a3b --batch-size 8) ;;
    *) echo "unknown case $what" ;;
  esac
done 2>&1 | tee -a "$out/console.log"
$py - "$out/moe.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'model':15s} {'batch':>5s} {'mode':>8s} {'slots':>5s} {'decode tok/s':>12s} {'step s':>7s} {'GB/step':>8s} "
      f"{'whole GB':>8s} {'fewer':>6s} {'hits/miss':>11s} {'GB/s':>6s} {'bus share':>9s} {'ready s':>7s}")
for r in rows:
    x = r.get("experts") or {}
    bw = r.get("h2d_bandwidth_bytes_s") or 0
    gbs = x.get("bus_gb_s") or 0
    print(f"{r['model']:15s} {r['batch_size']:5d} {'experts' if x.get('expert_streaming') else 'whole':>8s} "
          f"{x.get('expert_slots', 0):5d} {r['decode_throughput']:12.2f} {r['decode_step_s']:7.3f} "
          f"{x.get('bus_bytes_per_step', 0) / 1e9:8.2f} {x.get('whole_layers_bytes_per_step', 0) / 1e9:8.2f} "
          f"{x.get('fewer_bytes_than_whole') or 0:5.2f}x {x.get('hits_per_step', 0):5.0f}/{x.get('misses_per_step', 0):<5.0f} "
          f"{gbs:6.1f} {gbs * 1e9 / bw if bw else 0:9.1%} {r['startup_s']:7.1f}")
print("GB/step: weight bytes copied per decode step (measured); whole GB: every streamed layer whole (all experts); "
      "bus share: GB/s over the probe's best host-to-device bandwidth")
PY
