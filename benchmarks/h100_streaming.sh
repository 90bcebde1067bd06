#!/usr/bin/env bash
# Issue 9's matrix on one GPU: parity of streamed vs resident weights, then OPT-30B fp16 dummy,
# weights in CPU RAM, 16 GiB GPU budget, prompt 512, gen 32, through `offloadgen bench`; then
# the Accelerate peer on the same workload. Records go to $OUT (or ./out); a table prints last.
#   bash benchmarks/h100_streaming.sh [parity] [bs8] [bs16] [pageable] [accelerate] [quantcheck] [q4bs8] [q4bs16] [q8bs8] [opt175q4]
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bench="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --loops 2 --verbose 1 --json-file $out/offloadgen.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for what in "${@:-parity bs8 bs16}"; do
  case $what in
    parity) python3 benchmarks/gpu_parity.py 2>&1 | tee "$out/parity.txt" ;;
    bs8) (cd "$out" && $bench --batch-size 8) ;;
    bs16) (cd "$out" && $bench --batch-size 16 --micro-batch-size 4) ;;
    pageable) (cd "$out" && $bench --batch-size 8 --pin-memory 0 --loops 1) ;;
    quantcheck) python3 benchmarks/gpu_quant_check.py 2>&1 | tee "$out/quantcheck.txt" ;;
    q4bs8) (cd "$out" && $bench --batch-size 8 --quant-bits 4 --quant-group-size 64) ;;
    q4bs16) (cd "$out" && $bench --batch-size 16 --micro-batch-size 4 --quant-bits 4 --quant-group-size 64) ;;
    q8bs8) (cd "$out" && $bench --batch-size 8 --quant-bits 8 --quant-group-size 64) ;;
    opt175q4) (cd "$out" && python3 -m offloadgen.cli bench --model facebook/opt-175b --dummy --cpu-offload \
                 --gpu-memory 70GiB --batch-size 8 --quant-bits 4 --quant-group-size 64 --loops 1 --verbose 1 \
                 --json-file "$out/offloadgen-175b.jsonl") ;;
    plan) for q in 16 8 4; do python3 -m offloadgen.cli plan facebook/opt-30b --dummy --gpu-memory 16GiB \
            --batch-sizes 8,16 --quant-bits $q; done 2>&1 | tee "$out/plan.txt"
          python3 -m offloadgen.cli plan facebook/opt-30b --dummy --gpu-memory 16GiB --batch-sizes 16 \
            --micro-batch-size 4 --quant-bits 16 | tee -a "$out/plan.txt" ;;
    bs16mb4) (cd "$out" && $bench --batch-size 16 --micro-batch-size 4) ;;
    accelerate) python3 benchmarks/peers/accelerate_peer.py --model opt-30b --batch-size 8 --gpu-memory 16GiB --json-file "$out/peers.jsonl" ;;
  esac
done
python3 -m offloadgen.cli report "$out"
