#!/usr/bin/env bash
# The whole comparison on one GPU machine, OPT-30B dummy, prompt 512, gen 32, weights in CPU RAM,
# 16 GiB GPU budget: offloadgen and every installed peer at batch 8 and at the best batch each can
# hold, fp16 and 4-bit; then the table (and plot) from all records. With no step named, all run:
# about 45 minutes on an H100. $OUT (or ./out) keeps everything; each step is cut off after 15 min.
#   bash benchmarks/run_matrix.sh [step ...]    steps: og8 og16 ogkv96 ogq4 ogq4b16 ogq4kv96 and run_peers.sh's
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bench="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --loops 2 --verbose 1 --json-file $out/offloadgen.jsonl"
kv="--kv-offload --pin-kv-cache --async-kv-offload --micro-batch-size 8"
q4="--quant-bits 4 --quant-group-size 64"
all="og8 flexgen8 ds ogkv96 flexgen18 ogq4 ogq4b16 ogq4kv96 flexgen8q4 flexgen18q4 dsq4 dskv accelerate8 accelerate16"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
free -g | head -2
for what in ${@:-$all}; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    og8) (cd "$out" && timeout 900 $bench --batch-size 8) ;;
    og16) (cd "$out" && timeout 900 $bench --batch-size 16 --micro-batch-size 4) ;;
    ogkv96) (cd "$out" && timeout 900 $bench $kv --batch-size 96) ;;
    ogq4) (cd "$out" && timeout 900 $bench $q4 --batch-size 8) ;;
    ogq4b16) (cd "$out" && timeout 900 $bench $q4 --batch-size 16 --micro-batch-size 4) ;;
    ogq4kv96) (cd "$out" && timeout 900 $bench $q4 $kv --batch-size 96) ;;
    *) OUT=$out PEERS_NO_REPORT=1 timeout 900 bash benchmarks/peers/run_peers.sh "$what" ;;
  esac
done
echo "== report $(date -u +%H:%M:%S)"
python3 -m offloadgen.cli report "$out" --plot "$out/throughput.png" | tee "$out/report.txt"
