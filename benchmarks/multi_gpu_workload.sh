#!/usr/bin/env bash
# A job's worth of requests through the continuous batcher on one GPU, then on N GPUs as ranks
# (issue 20: "continuous batching runs its slots across ranks"), in one call on the same machine:
# OPT-30B dummy, weights in CPU RAM, 16 GiB per GPU, KV cache on the GPU, 8 slots per GPU,
# prompts 32:256 tokens, outputs 8:32 tokens (EOS ignored: dummy weights). N GPUs get N times the
# requests (one GPU's share each), so both runs take about as many passes. Records and console go
# to $OUT (or ./out); a table last.
#   bash benchmarks/multi_gpu_workload.sh [one] [allgather] [whole] [pool] [serve1] [serve]
# "serve1" and "serve": `offloadgen serve` under load (benchmarks/serve_load.py, streaming clients of
# the official openai client, as many as the slots) with 8 slots on one GPU, then 8 on each of N
# ranks pooling their memory, each mode compared with `generate` over the same requests. They need
# the server's and the client's wheels in .whl/ (carry it), installed here as run_peers.sh does.
# CONCURRENCY (default: the slots, 8 per GPU) sets "serve"'s clients: N x 24 sends every request at once.
# SERVE_ARGS (default --admission=fifo) go to the server, e.g. SERVE_ARGS=--admission=longest;
# COMPARE= (empty) skips the `generate` run of the same requests.
# About 4-5 minutes on 4 H100s for "one allgather" (start-up 40-100 s for one GPU, 25-80 s for four).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
# The console goes to $OUT as it comes: a call cut at its time limit still brings it back.
exec > >(tee -a "$out/console.log") 2>&1
step_limit=${STEP_TIMEOUT:-400}  # seconds per step; keep the steps of one call under its limit
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=${GPUS:-$(nvidia-smi -L | wc -l)}
per=${REQUESTS_PER_GPU:-24}
bench="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --verbose 1
       --workload synthetic --input-len 32:256 --output-len 8:32 --json-file $out/workload.jsonl"
if ls .whl/*.whl >/dev/null 2>&1 && [[ " $* " == *" serve"* ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -n "${SWITCH_INTERVAL:-}" ]; then  # an experiment: Python's GIL hand-over interval (default 0.005 s) in every process
  mkdir -p /tmp/switch && printf 'import sys\nsys.setswitchinterval(%s)\n' "$SWITCH_INTERVAL" > /tmp/switch/sitecustomize.py
  export PYTHONPATH=/tmp/switch:$PYTHONPATH
fi
model="facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --max-seq-len 320"
load="python3 benchmarks/serve_load.py --input-len 32:256 --output-len 8:32 --json $out/serve.jsonl
      ${COMPARE---compare-generate} --serve-args=${SERVE_ARGS:---admission=fifo}"
for what in "$@"; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    one) (cd "$out" && timeout $step_limit $bench --batch-size 8 --num-requests $per) ;;
    allgather|whole|pool) (cd "$out" && timeout $step_limit $bench --batch-size $((8 * n)) --num-requests $((per * n)) \
                             --num-gpus-per-node $n --weight-fetch $what) ;;
    serve1) timeout $step_limit $load --model-args "$model" --slots 8 --concurrency 8 --num-requests $per ;;
    serve) timeout $step_limit $load --model-args "$model --num-gpus-per-node $n --weight-fetch pool" --slots 8 \
             --generate-args "--num-gpus-per-node $n --weight-fetch pool" --concurrency ${CONCURRENCY:-$((8 * n))} \
             --num-requests $((per * n)) ;;
  esac
done
[ -f "$out/workload.jsonl" ] && python3 - "$out/workload.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
one = next((r["output_throughput"] for r in rows if r.get("world_size", 1) == 1), None)
print(f"{'gpus':>4} {'fetch':>9} {'requests':>8} {'slots':>5} {'elapsed s':>9} {'passes':>6} {'pass s':>7} "
      f"{'occupancy':>9} {'empty':>5} {'out tok/s':>9} {'vs 1':>5} {'start s':>7}")
for r in rows:
    ratio = r["output_throughput"] / one if one else float("nan")
    print(f"{r.get('world_size', 1):4d} {r.get('weight_fetch', 'whole'):>9} {r['requests']:8d} {r['slots']:5d} "
          f"{r['elapsed_s']:9.1f} {r['passes']:6d} {r['pass_s']:7.3f} {r['slot_occupancy']:9.1%} "
          f"{r.get('empty_passes', 0):5d} {r['output_throughput']:9.2f} {ratio:5.2f} {r['startup_s']:7.1f}")
PY
