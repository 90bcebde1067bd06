#!/usr/bin/env bash
# Issue 17 on one GPU machine: CPU attention against the cores' read bandwidth, then OPT-30B dummy
# (16 GiB, prompt 512, gen 32, weights in CPU RAM) at large batches with the KV cache in CPU RAM:
# fp16 cache at batch 96, a 4-bit cache at the larger batch it allows, 4-bit weights with it.
# Records and console go to $OUT (or ./out); the report comes last.
#   bash benchmarks/large_batch.sh [check] [kernel] [kv96] [kv96overlap] [kv96q8] [kvq4] [wq4kvq4] [wq4kvq4overlap] [kvq4triton] [wq4kvq4triton]
#                                  [kv96real] [kv96realoverlap] [kvq4real] ...
# BIG (default 256) is the batch of the 4-bit cache runs, MB the micro-batch size (default 8 for the fp16
# cache at 96, 32 for the 4-bit cache runs: at batch 256, 32 rows a part ran 178.6 tok/s where parts of 8
# had run 64-96 on earlier leases, since each CPU-attended call reads more rows at once and the host issues a quarter
# as many calls).
# RESIDENT=last (or spread, the default) places the layers kept on the GPU with --resident-layers, e.g.
#   bash benchmarks/large_batch.sh kv96 && RESIDENT=last bash benchmarks/large_batch.sh kv96
# "check": the Triton KV encoder, decoder and decode attention, compiled, against PyTorch on this GPU (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-out}"); mkdir -p "$out"
# The console goes to $OUT as it comes: a call cut at its time limit still brings it back.
exec > >(tee -a "$out/console.log") 2>&1
step_limit=${STEP_TIMEOUT:-500}  # seconds per step; keep the steps of one call under its limit
# (H100 host, measured: kv96 about 2 min, wq4kvq4 about 2.5, kv96real about 2.7; kvq4real took
# more than 210 s, so give it about 400)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bench="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --prompt-len 512 --gen-len 32 --loops ${LOOPS:-1} --verbose 1 --json-file $out/offloadgen.jsonl ${RESIDENT:+--resident-layers $RESIDENT}"
kv="--kv-offload --pin-kv-cache --async-kv-offload --micro-batch-size ${MB:-8}"
kvq="--kv-offload --pin-kv-cache --async-kv-offload --micro-batch-size ${MB:-32}"
big=${BIG:-256}
real="python3 -m offloadgen.cli bench --model facebook/opt-30b --dummy --cpu-offload --gpu-memory 16GiB --workload synthetic
      --input-len 512:512 --output-len 32:32 --workload-seed 0 --verbose 1 --json-file $out/real.jsonl ${RESIDENT:+--resident-layers $RESIDENT}"
free -g | head -2
for what in "$@"; do
  echo "== $what $(date -u +%H:%M:%S)"
  case $what in
    check) timeout 300 python3 tests/kv_quant_triton_check.py ;;
    kernel) timeout 300 python3 benchmarks/kv_cpu_attention.py 2>&1 | tee "$out/kv_cpu_attention.txt" ;;
    kv96) (cd "$out" && timeout $step_limit $bench $kv --batch-size 96) ;;
    # batch 96 with the CPU-attended parts in their own thread (--kv-overlap): the fp16 step is the
    # host thread's CPU side (0.90 s) plus the GPU parts it issues, beside 0.91 s of bus
    kv96overlap) (cd "$out" && timeout $step_limit $bench $kv --batch-size 96 --kv-overlap) ;;
    kv96q8) (cd "$out" && timeout $step_limit $bench $kv --batch-size 96 --kv-quant-bits 8) ;;
    kvq4) (cd "$out" && timeout $step_limit $bench $kvq --batch-size "$big" --kv-quant-bits 4) ;;
    # The same batches over real prompts of 512 tokens (bench's fixed batch is the reference's
    # sentence left-padded and masked, and CPU attention skips the padding): through the batcher,
    # prefilled in one pass, then every pass decodes every row; decode tok/s = batch / decode-only pass.
    kv96real) (cd "$out" && timeout $step_limit $real $kv --batch-size 96 --num-requests 96 --prefill-chunk $((96 * 512))) ;;
    kv96realoverlap) (cd "$out" && timeout $step_limit $real $kv --batch-size 96 --num-requests 96 --prefill-chunk $((96 * 512)) \
                        --kv-overlap) ;;
    kvq4real) (cd "$out" && timeout $step_limit $real $kvq --batch-size "$big" --num-requests "$big" \
                 --prefill-chunk $((big * 512)) --kv-quant-bits 4) ;;
    wq4kvq4) (cd "$out" && timeout $step_limit $bench $kvq --batch-size "$big" --kv-quant-bits 4 --quant-bits 4) ;;
    # the same with the CPU-attended parts in a thread of their own (--kv-overlap, offload/cpu_side.py):
    # on the one host thread (the default) session 10's step was that thread's (0.99 s busy of 1.076 s),
    # so 5 of 8 GPU parts was its balance; with the CPU side off it, the bus and the CPU cores should
    # balance at 3-4 GPU parts (kv_split's model: ~0.74 s), which the split should reach in a step or two
    wq4kvq4overlap) (cd "$out" && timeout $step_limit $bench $kvq --batch-size "$big" --kv-quant-bits 4 --quant-bits 4 \
                       --kv-overlap) ;;
    # the same with the GPU-attended parts read by the Triton decode attention (off by default)
    kvq4triton) (cd "$out" && OFFLOADGEN_KV_TRITON_ATTENTION=1 timeout $step_limit $bench $kvq --batch-size "$big" --kv-quant-bits 4) ;;
    wq4kvq4triton) (cd "$out" && OFFLOADGEN_KV_TRITON_ATTENTION=1 timeout $step_limit $bench $kvq --batch-size "$big" \
                      --kv-quant-bits 4 --quant-bits 4) ;;
  esac
done
ls "$out"/*.jsonl 2>/dev/null | grep -qv real.jsonl && python3 -m offloadgen.cli report "$out"
[ -f "$out/real.jsonl" ] && python3 - "$out/real.jsonl" <<'PY'
import json, sys
print(f"{'real prompts':14s} {'batch':>5s} {'decode tok/s':>12s} {'total tok/s':>11s} {'decode pass s':>13s} {'CPU attn s':>10s} {'unmasked GB':>11s}")
for r in (json.loads(l) for l in open(sys.argv[1]) if l.strip()):
    step = r["decode_only_pass_s"]
    print(f"{'kv ' + str(r.get('kv_quant_bits', 16)):14s} {r['slots']:5d} {r['slots'] / step:12.2f} {r['total_throughput']:11.2f} "
          f"{step:13.3f} {r.get('kv_cpu_attention_s_per_pass', 0):10.3f} {r.get('kv_cpu_cache_visible_bytes_per_pass', 0) / 1e9:11.2f}")
PY
