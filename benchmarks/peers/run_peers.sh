#!/usr/bin/env bash
# The peers on OPT-30B fp16 dummy, prompt 512, gen 32, weights in CPU RAM, on a GPU machine.
# The GPU image lacks DeepSpeed, FlexGen and a few of their needs: carry them as wheels in .whl
# (DeepSpeed built from its sdist with DS_BUILD_OPS=0; flexgen, hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions, pulp).
#   bash benchmarks/peers/run_peers.sh [flexgen8] [flexgen12] [flexgen8q4] [ds8] [ds16] [accelerate8]
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
j=$out/peers.jsonl
for what in "${@:-flexgen8 ds8 ds16}"; do
  case $what in
    flexgen8) python3 benchmarks/peers/flexgen_peer.py --batch-size 8 --percent 0 100 100 0 100 0 --json-file $j ;;
    flexgen12) python3 benchmarks/peers/flexgen_peer.py --batch-size 12 --percent 10 90 100 0 100 0 --json-file $j ;;
    flexgen8q4) python3 benchmarks/peers/flexgen_peer.py --batch-size 8 --percent 0 100 100 0 100 0 --compress-weight --json-file $j ;;
    ds8) python3 benchmarks/peers/deepspeed_peer.py --batch-size 8 --json-file $j ;;
    ds16) python3 benchmarks/peers/deepspeed_peer.py --batch-size 16 --json-file $j ;;
    accelerate8) python3 benchmarks/peers/accelerate_peer.py --batch-size 8 --gpu-memory 16GiB --json-file $j ;;
  esac
done
python3 -m offloadgen.cli report $j
