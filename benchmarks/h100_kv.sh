#!/usr/bin/env bash
# Issue 3 on one GPU: OPT-30B fp16 dummy, weights in CPU RAM, 16 GiB GPU budget, prompt 512,
# gen 32, with the KV cache in CPU memory, through `offloadgen bench`; and OPT-6.7B with its
# weights on disk (4 GiB GPU budget, gen 8: the disk reads about 1.3 GB/s). Records go to $OUT (or ./out).
#   bash benchmarks/h100_kv.sh [check] [kv64] [kv64cpu] [kv64gpu] [kv96] [kv32] [disk] ...
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bench="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --verbose 1 --json-file $out/offloadgen.jsonl"
kv="--kv-offload --pin-kv-cache --async-kv-offload --micro-batch-size 8"
free -g | head -2
for what in "$@"; do
  case $what in
    check) python3 benchmarks/gpu_kv_check.py 2>&1 | tee "$out/kv_check.txt" ;;
    kv32) (cd "$out" && $bench $kv --batch-size 32 --loops 2) ;;
    kv64) (cd "$out" && $bench $kv --batch-size 64 --loops 2) ;;
    kv64cpu) (cd "$out" && $bench $kv --batch-size 64 --loops 1 --kv-attention cpu) ;;
    kv64gpu) (cd "$out" && $bench $kv --batch-size 64 --loops 1 --kv-attention gpu) ;;
    kv80) (cd "$out" && $bench $kv --batch-size 80 --loops 2) ;;
    kv96) (cd "$out" && $bench $kv --batch-size 96 --loops 2) ;;
    disk) df -h /tmp | tail -1
          (cd "$out" && python3 -m offloadgen.cli bench --model facebook/opt-6.7b --dummy --disk-offload \
             --offload-dir /tmp/offload_dir --gpu-memory 4GiB --batch-size 8 --prompt-len 512 --gen-len 8 --loops 1 \
             --verbose 1 --json-file "$out/offloadgen-disk.jsonl") ;;
    plan) python3 -m offloadgen.cli plan facebook/opt-30b --dummy --gpu-memory 16GiB --batch-sizes 8,16,32,64 \
            2>&1 | tee "$out/plan.txt" ;;
  esac
done
python3 -m offloadgen.cli report "$out"
