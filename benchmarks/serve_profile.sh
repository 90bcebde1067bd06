#!/usr/bin/env bash
# Where a server's ranks spend their time under load: `offloadgen serve` across N GPUs (OPT-30B
# dummy, pool, 8 slots a GPU, as multi_gpu_workload.sh's "serve") run under py-spy, which samples
# every process of it (waiting included, without pausing them), while benchmarks/serve_load.py
# sends N x 24 requests at once; then SIGTERM, and a table per process and thread of the functions
# its samples were in (benchmarks/fold_profile.py). Needs py-spy on PATH or as .whl/py-spy, and the
# server's and client's wheels in .whl/ (carry it). Records and console go to $OUT (or ./out).
# MODEL_ARGS and GPUS change the model and ranks (on a CPU: MODEL_ARGS="facebook/opt-125m --dummy
# --device cpu" GPUS=2).
#   SERVE_ARGS=--admission=longest [NATIVE=1] bash benchmarks/serve_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
exec > >(tee -a "$out/console.log") 2>&1
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=${GPUS:-$(nvidia-smi -L | wc -l)}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
model=${MODEL_ARGS:-facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --weight-fetch pool}
spy=$(command -v py-spy || echo "$PWD/.whl/py-spy")
port=${PORT:-8123}
# NATIVE=1 adds C/C++ frames (then py-spy pauses each process to sample it): the fold then tells
# waits for the GIL from waits for the GPU
sampling=--nonblocking; [ -n "${NATIVE:-}" ] && sampling=--native
$spy record $sampling --subprocesses --idle --threads --rate ${RATE:-25} --format raw -o "$out/profile.txt" -- \
  python3 -m offloadgen.cli serve $model --max-seq-len 320 \
  --num-gpus-per-node $n --slots 8 --port $port --max-queue $((24 * n)) --served-model-name bench \
  --log-level warning ${SERVE_ARGS:-} &
spy_pid=$!
for _ in $(seq 300); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
  kill -0 $spy_pid 2>/dev/null || { echo "serve_profile: the server ended while starting"; exit 1; }
  sleep 1
done
python3 benchmarks/serve_load.py --url http://127.0.0.1:$port/v1 --model bench --model-args "$model" --input-len 32:256 --output-len 8:32 \
  --concurrency $((24 * n)) --num-requests $((24 * n)) --json "$out/serve.jsonl" --deadline ${DEADLINE:-120}
pkill -TERM -P $spy_pid  # the serve command, which hands it to rank 0: the server drains and stops
wait $spy_pid
python3 benchmarks/fold_profile.py "$out/profile.txt"
