#!/usr/bin/env bash
# Issue 6 on one GPU: the same bench plain and under torchrun with world size 1 (OPT-30B fp16
# dummy, weights in CPU RAM, 16 GiB budget, batch 8, prompt 512, gen 32), one after the other.
# Several GPUs (issue 7) use the same command with --num-gpus-per-node N.
#   bash benchmarks/h100_distributed.sh
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
args="bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --batch-size 8 --prompt-len 512 --gen-len 32 --loops 2 --verbose 1"
(cd "$out" && python3 -m offloadgen.cli $args --json-file "$out/plain.jsonl")
(cd "$out" && python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m offloadgen.cli $args --json-file "$out/torchrun1.jsonl")
python3 -m offloadgen.cli report "$out/plain.jsonl" "$out/torchrun1.jsonl"
