#!/usr/bin/env bash
# Issue 16's whole-job comparison, one GPU, one call: the same job through offloadgen's continuous
# batcher and through DeepSpeed ZeRO-Inference and FlexGen as static batches (they run nothing
# else), same machine, same run. OPT-13B fp16 dummy weights in CPU RAM, 8 GiB GPU budget.
#   bash benchmarks/job_vs_peers.sh [workload] [offloadgen] [deepspeed] [flexgen] [table]
# With no step named, all run, in that order. Records: $OUT (or ./out)/job.jsonl (workload file
# job-input.jsonl, offloadgen's workload.jsonl, the peers' job.jsonl, console in each step's log).
#
# The job (make_workload.py, offloadgen's synthetic generator): N=32 requests, prompts 32:512,
# outputs 8:64 (uniform, seed 0): 9848 prompt tokens, 1118 output tokens.
# - offloadgen: continuous, SLOTS=32 (every request admitted at once; its KV cache in pinned CPU
#   RAM, micro-batches of 8, 2048 prompt tokens per pass); its usual best for the budget.
# - the peers keep their KV cache on the GPU, which caps the batch: at a batch's longest request
#   (559 tokens) OPT-13B's cache is 0.43 GiB a row, so 14 rows take 6.0 GiB, plus ~1 GiB of
#   weights in flight and activations (scaled from their OPT-30B peaks in benchmarks/RESULTS.md:
#   FlexGen 7.5 GiB and DeepSpeed 6.3 GiB at batch 8, 5.6 of it cache, plus 0.70 and 0.74 a row).
#   DS_BATCH=14 and FG_BATCH=14: 3 batches, 188 decode steps each (FlexGen's fixed batch gets 10
#   filler rows in the last). Each record has its peak; the table marks one over the budget.
#   Batch 16 (2 batches, 128 steps) would need ~7.9 GiB: try it if the peaks at 14 leave room.
# Expected time on one H100 (PCIe Gen5, ~46 GB/s as the peers stream: ~0.56 s a step at 13B):
#   workload 2 s; offloadgen ~75 s (start-up with the cache ~30 s, ~70 passes of ~0.6 s);
#   DeepSpeed ~170 s (import and engine ~50 s, 188 steps ~105 s, 3 prefills); FlexGen ~160 s
#   (26 GB of dummy weights pinned ~45 s, 188 steps ~105 s); table 1 s. About 7 minutes in all;
#   each step is cut off (TIMEOUT_OG=140, TIMEOUT_PEER=210 s: 560 s at worst) so the table still
#   prints inside a 10-minute call.
# Knobs (environment): N, INPUT (32:512), OUTPUT (8:64), SEED (0), SLOTS (32), DS_BATCH, FG_BATCH,
# MODEL (facebook/opt-13b), BUDGET_GIB (8); OG_STATIC=1 also runs offloadgen's own static batches of
# SLOTS (--compare-static: one batch of 32 here, ~40 s more; raise TIMEOUT_OG). The peers need
# their wheels in .whl (see run_peers.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
N=${N:-32}; INPUT=${INPUT:-32:512}; OUTPUT=${OUTPUT:-8:64}; SEED=${SEED:-0}; SLOTS=${SLOTS:-32}
MODEL=${MODEL:-facebook/opt-13b}; BUDGET_GIB=${BUDGET_GIB:-8}
job=$out/job-input.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; free -g | head -2
for what in ${@:-workload offloadgen deepspeed flexgen table}; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    workload) python3 benchmarks/peers/make_workload.py "$job" --model "$MODEL" --num-requests "$N" \
                --input-len "$INPUT" --output-len "$OUTPUT" --seed "$SEED" ;;
    offloadgen) (cd "$out" && timeout "${TIMEOUT_OG:-140}" python3 -m offloadgen.cli bench --model "$MODEL" --dummy \
                  --cpu-offload --gpu-memory "${BUDGET_GIB}GiB" --kv-offload --pin-kv-cache --async-kv-offload \
                  --micro-batch-size 8 --batch-size "$SLOTS" --workload "$job" --workload-seed "$SEED" \
                  --prefill-chunk 2048 --verbose 1 --json-file "$out/workload.jsonl" \
                  ${OG_STATIC:+--compare-static}) 2>&1 | tee "$out/offloadgen.log" ;;
    deepspeed|flexgen)
      step=$([ "$what" = deepspeed ] && echo dsjob || echo flexgenjob)
      OUT=$out PEERS_NO_REPORT=1 JOB=$job JOB_MODEL=$MODEL JOB_SEED=$SEED BUDGET_GIB=$BUDGET_GIB \
        timeout "${TIMEOUT_PEER:-210}" bash benchmarks/peers/run_peers.sh "$step" 2>&1 | tee "$out/$what.log" ;;
    table) python3 benchmarks/job_table.py "$out/workload.jsonl" "$out/job.jsonl" --workload "$job" \
             --budget-gib "$BUDGET_GIB" | tee "$out/table.txt" ;;
    *) echo "job_vs_peers.sh: no step named $what (steps: workload offloadgen deepspeed flexgen table)" >&2 ;;
  esac
done
