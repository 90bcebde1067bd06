#!/usr/bin/env bash
# The whole comparison on one GPU machine: offloadgen (fp16 and 4-bit, batch 8 and 16) and every
# installed peer on OPT-30B dummy, prompt 512, gen 32, weights in CPU RAM, 16 GiB budget, then
# offloadgen with the KV cache in CPU RAM (batch 64 and 96); then the table (and plot) from all
# records. About 35 minutes on an H100; $OUT (or ./out) keeps everything.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
OUT=$out bash benchmarks/h100_streaming.sh parity bs8 bs16mb4 q4bs8 q4bs16 q8bs8
OUT=$out bash benchmarks/h100_kv.sh kv64 kv96
OUT=$out bash benchmarks/peers/run_peers.sh flexgen8 flexgen12 flexgen8q4 ds8 ds16 accelerate8
PYTHONPATH=$PWD/src python3 -m offloadgen.cli report "$out" --plot "$out/throughput.png"
