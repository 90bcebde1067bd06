#!/usr/bin/env bash
# On a GPU: `offloadgen generate` with the KV cache in CPU RAM and with weights on disk answers as
# the plain run does (opt-1.3b dummy, weights streamed under a 1 GiB budget). Exit 1 on a mismatch.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
g="python3 -m offloadgen.cli generate opt-1.3b --dummy --prompt hello --prompt world --prompt again --max-new-tokens 12 --batch-size 3 --micro-batch-size 2"
$g --cpu-offload --gpu-memory 1GiB > /tmp/plain.txt
$g --cpu-offload --gpu-memory 1GiB --kv-offload --kv-attention cpu > /tmp/kvcpu.txt
$g --cpu-offload --gpu-memory 1GiB --kv-offload --kv-attention gpu > /tmp/kvgpu.txt
$g --disk-offload --offload-dir /tmp/gen_offload --gpu-memory 1GiB > /tmp/disk.txt
ok=0
for f in kvcpu kvgpu disk; do
  if cmp -s /tmp/plain.txt /tmp/$f.txt; then echo "$f: same answers as plain"; else echo "$f: DIFFERENT"; diff /tmp/plain.txt /tmp/$f.txt; ok=1; fi
done
cat /tmp/plain.txt
exit $ok
