#!/usr/bin/env bash
# Where a server's ranks spend their time under load: `offloadgen serve` across N GPUs (OPT-30B
# dummy, pool, 8 slots a GPU, as multi_gpu_workload.sh's "serve") run under py-spy, which samples
# every process of it (waiting included, without pausing them), while benchmarks/serve_load.py
# sends N x 24 requests at once; then SIGTERM, and a table per process and thread of the functions
# its samples were in (benchmarks/fold_profile.py). Needs py-spy on PATH or as .whl/py-spy, and the
# server's and client's wheels in .whl/ (carry it). Records and console go to $OUT (or ./out).
# MODEL_ARGS and GPUS change the model and ranks (on a CPU: MODEL_ARGS="facebook/opt-125m --dummy
# --device cpu" GPUS=2).
#   SERVE_ARGS=--admission=longest [NATIVE=1] [GIL=1] [NATIVE_RANKS="0 1"] bash benchmarks/serve_profile.sh
# GIL=1 attaches a second py-spy to every process once the server answers, keeping only the samples
# of threads that hold the GIL (profile-gil.txt): a loop's share of those against its share of all
# samples says how much of a function's time it held the GIL. NATIVE_RANKS attaches a py-spy with
# native frames to those ranks alone (profile-native-rankR.txt). NATIVE=1 on the whole tree
# segfaulted py-spy 0.4.3 on 4 H100s (session 15).
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
# the attached samplers: until the server stops (they end with their process)
descendants() {  # every process under $1, depth first
  for c in $(cat /proc/$1/task/*/children 2>/dev/null); do echo $c; descendants $c; done
}
attached=()
if [ -n "${GIL:-}" ]; then
  server=$(cat /proc/$spy_pid/task/*/children | head -1)
  $spy record --pid $server --subprocesses --nonblocking --gil --threads --rate ${RATE:-25} --format raw \
    -o "$out/profile-gil.txt" > "$out/spy-gil.log" 2>&1 &
  attached+=($!)
fi
for r in ${NATIVE_RANKS:-}; do
  for pid in $(descendants $spy_pid); do
    if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "LOCAL_RANK=$r"; then
      $spy record --pid $pid --native --idle --threads --rate ${RATE:-25} --format raw \
        -o "$out/profile-native-rank$r.raw" > "$out/spy-native-rank$r.log" 2>&1 &
      attached+=($!)
      echo "serve_profile: native frames of rank $r (process $pid)"
      break
    fi
  done
done
python3 benchmarks/serve_load.py --url http://127.0.0.1:$port/v1 --model bench --model-args "$model" --input-len 32:256 --output-len 8:32 \
  --concurrency $((24 * n)) --num-requests $((24 * n)) --json "$out/serve.jsonl" --deadline ${DEADLINE:-120}
pkill -TERM -P $spy_pid  # the serve command, which hands it to rank 0: the server drains and stops
wait $spy_pid
for a in "${attached[@]}"; do wait $a; done
python3 benchmarks/fold_profile.py "$out/profile.txt"
if [ -f "$out/profile-gil.txt" ]; then
  echo; echo "== holding the GIL (profile-gil.txt)"; python3 benchmarks/fold_profile.py "$out/profile-gil.txt"
fi
for r in ${NATIVE_RANKS:-}; do
  raw="$out/profile-native-rank$r.raw"; [ -f "$raw" ] || { echo "serve_profile: no native profile of rank $r"; continue; }
  # one process per file: name it as --subprocesses would, for the fold
  sed "s/^/process rank$r:rank $r;/" "$raw" > "$out/profile-native-rank$r.txt"
  echo; echo "== native frames, rank $r"; python3 benchmarks/fold_profile.py "$out/profile-native-rank$r.txt"
done
