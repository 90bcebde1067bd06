#!/usr/bin/env bash
# On a GPU: the API with the KV cache in CPU RAM and with weights on disk gives the plain run's
# token ids (benchmarks/gpu_api_check.py); then `offloadgen generate` with each offload option
# exits cleanly. Exit 1 on any failure.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 benchmarks/gpu_api_check.py || exit 1
g="python3 -m offloadgen.cli generate opt-1.3b --dummy --prompt hello --prompt world --max-new-tokens 8 --cpu-offload --gpu-memory 1GiB"
for extra in "" "--kv-offload" "--disk-offload --offload-dir /tmp/gen_offload" "--pin-memory 0"; do
  $g $extra > /dev/null 2>/tmp/err.txt; rc=$?
  echo "generate $extra: exit $rc"; [ $rc -eq 0 ] || { cat /tmp/err.txt; exit 1; }
done
