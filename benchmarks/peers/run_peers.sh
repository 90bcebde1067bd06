#!/usr/bin/env bash
# The peers on OPT-30B dummy, prompt 512, gen 32, weights in CPU RAM, held to a 16 GiB GPU budget.
# The GPU image lacks DeepSpeed, FlexGen and a few of their needs: carry them as wheels in .whl
# (DeepSpeed built from its sdist with DS_BUILD_OPS=0; flexgen, hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions, pulp). DeepSpeed's 4-bit weights build its
# quantizer kernel on first use (nvcc and ninja, a minute or two).
#   bash benchmarks/peers/run_peers.sh [flexgen8] [flexgen18] [flexgen12] [flexgen8q4] [flexgen18q4] [flexgenq4kvq4]
#                                      [ds] [dsq4] [dskv] [accelerate8] [accelerate16]
#   JOB=job.jsonl bash benchmarks/peers/run_peers.sh [dsjob] [flexgenjob] [acceleratejob]
# Batch 18 (FlexGen) and 20 (DeepSpeed) are the largest their measured peaks allow in 16 GiB:
# FlexGen 7.5 GiB at 8 plus 0.70 GiB a sequence; DeepSpeed 6.3 GiB at 8 plus 0.74 GiB a sequence.
# A whole job (issue 16) as static batches: dsjob, flexgenjob, acceleratejob run the workload file
# $JOB (make_workload.py writes one) on $JOB_MODEL (facebook/opt-13b) at batch $DS_BATCH /
# $FG_BATCH / $ACC_BATCH (14 / 14 / 8), budget $BUDGET_GIB (8), records in $out/job.jsonl;
# benchmarks/job_vs_peers.sh runs them against offloadgen's continuous batcher.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# DeepSpeed's JIT kernels: build for this GPU only, spelled as DeepSpeed 0.19.8 can parse (the GPU
# image sets 9.0a, and its builder fails on int('0a')).
TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) \
  || unset TORCH_CUDA_ARCH_LIST
export TORCH_CUDA_ARCH_LIST
j=$out/peers.jsonl
fg="python3 benchmarks/peers/flexgen_peer.py --json-file $j"
ds="python3 benchmarks/peers/deepspeed_peer.py --json-file $j"
acc="python3 benchmarks/peers/accelerate_peer.py --gpu-memory 16GiB --json-file $j"
job="--model ${JOB_MODEL:-facebook/opt-13b} --workload ${JOB:-job.jsonl} --workload-seed ${JOB_SEED:-0} --json-file $out/job.jsonl"
budget=${BUDGET_GIB:-8}
for what in ${@:-flexgen8 flexgen18 ds}; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    flexgen8) $fg --batch-size 8 --percent 0 100 100 0 100 0 ;;
    flexgen18) $fg --batch-size 18 --percent 0 100 100 0 100 0 ;;
    flexgen12) $fg --batch-size 12 --percent 10 90 100 0 100 0 ;;
    flexgen8q4) $fg --batch-size 8 --percent 0 100 100 0 100 0 --compress-weight ;;
    flexgen18q4) $fg --batch-size 18 --percent 0 100 100 0 100 0 --compress-weight ;;
    # issue 17's peer: 4-bit weights and 4-bit cache, the cache in CPU RAM, a large batch in GPU
    # batches of $FG_GPU_BATCH (32) x $FG_GPU_BATCHES (8), as FlexGen's paper runs OPT-30B
    flexgenq4kvq4) $fg --batch-size ${FG_GPU_BATCH:-32} --num-gpu-batches ${FG_GPU_BATCHES:-8} \
                     --percent 0 100 0 100 100 0 --compress-weight --compress-cache ;;
    ds) $ds --batch-size 8 20 ;;
    dsq4) $ds --batch-size 8 20 --quant-bits 4 --quant-group-size 64 ;;
    dskv) $ds --batch-size 8 --kv-offload ;;
    accelerate8) $acc --batch-size 8 ;;
    accelerate16) $acc --batch-size 16 ;;
    dsjob) python3 benchmarks/peers/deepspeed_peer.py $job --gpu-memory "${budget}GiB" --batch-size ${DS_BATCH:-14} ;;
    flexgenjob) python3 benchmarks/peers/flexgen_peer.py $job --gpu-memory "$budget" --batch-size ${FG_BATCH:-14} \
                  --percent 0 100 100 0 100 0 ;;
    acceleratejob) python3 benchmarks/peers/accelerate_peer.py $job --gpu-memory "${budget}GiB" --batch-size ${ACC_BATCH:-8} ;;
    *) echo "run_peers.sh: no step named $what" >&2 ;;
  esac
done
[ -n "${PEERS_NO_REPORT:-}" ] || [ ! -f "$j" ] || python3 -m offloadgen.cli report $j
