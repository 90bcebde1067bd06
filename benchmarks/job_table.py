"""The whole-job table (benchmarks/job_vs_peers.sh): offloadgen's workload record against the
peers' job records (benchmarks/peers/common.job_record) for the same workload file, the latest
run of each system and batch, with offloadgen's output tokens/s over each peer's.

    python benchmarks/job_table.py out/workload.jsonl out/job.jsonl --workload out/job-input.jsonl --budget-gib 8
"""
import argparse
import json
import sys
from pathlib import Path

GiB = 1 << 30


def read(paths, workload=None) -> list:
    """Job records ('kind': 'workload') of this workload file, in the order they were written."""
    recs = []
    for path in map(Path, paths):
        if not path.is_file():
            print(f"job_table: {path}: no such file (that step did not run?)", file=sys.stderr)
            continue
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                rec = json.loads(line)
                if rec.get("kind") == "workload" and (workload is None or rec.get("workload") == workload):
                    recs.append(rec)
    return recs


def latest(recs) -> list:
    """The last record of each system at each batch size (slots for offloadgen), offloadgen first."""
    keep = {}
    for r in recs:
        keep[(r["system"], r.get("slots", r.get("batch_size")))] = r
    return sorted(keep.values(), key=lambda r: (r["system"] != "offloadgen", r["system"]))


def table(recs, budget_gib=None) -> str:
    recs = latest(recs)
    ours = next((r for r in recs if r["system"] == "offloadgen" and "output_throughput" in r), None)
    lines = [f"{'system':44s} {'batch':>5s} {'reqs':>5s} {'out tok/s':>9s} {'total tok/s':>11s} {'elapsed s':>9s} "
             f"{'passes':>6s} {'peak GiB':>8s} {'offloadgen/this':>15s}"]
    if ours is not None and "static_output_throughput" in ours:  # run with --compare-static: its own static batches
        recs.insert(1, {"system": "offloadgen static batches", "batch_size": ours["slots"],
                        "peak_gpu_mem_bytes": ours.get("peak_gpu_mem_bytes"),
                        **{k[len("static_"):]: v for k, v in ours.items() if k.startswith("static_")}})
    for r in recs:
        name = r["system"] + ("" if r is not ours else " (continuous)")
        batch = r.get("slots", r.get("batch_size"))
        if "error" in r or "output_throughput" not in r:
            lines.append(f"{name:44s} {batch:5d}  failed: {r.get('error', 'no figures')[:150]}")
            continue
        peak = r.get("peak_gpu_mem_bytes")
        over = budget_gib is not None and peak is not None and peak > budget_gib * GiB
        peak_s = "-" if peak is None else f"{peak / GiB:.2f}" + ("!" if over else "")
        ratio = "" if r is ours or ours is None else f"{ours['output_throughput'] / r['output_throughput']:.2f}x"
        lines.append(f"{name:44s} {batch:5d} {r['requests']:5d} {r['output_throughput']:9.2f} "
                     f"{r['total_throughput']:11.2f} {r['elapsed_s']:9.1f} {r.get('passes', 0):6d} {peak_s:>8s} "
                     f"{ratio:>15s}")
    jobs = {(r["requests"], r["prompt_tokens"], r["output_tokens"]) for r in recs if "output_tokens" in r}
    if len(jobs) > 1:
        lines.append(f"NOT THE SAME JOB: (requests, prompt tokens, output tokens) differ: {sorted(jobs)}")
    lines.append("output tokens are those each request asked for (padding and idle rows not counted); "
                 "'!' marks a peak over the budget" + (f" of {budget_gib:g} GiB" if budget_gib is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records", nargs="+", help="JSONL files: offloadgen's --json-file and the peers'")
    p.add_argument("--workload", default=None, help="only records of this workload file (as the runs spelled it)")
    p.add_argument("--budget-gib", type=float, default=None)
    a = p.parse_args(argv)
    recs = read(a.records, a.workload)
    if not recs:
        print("job_table: no job records" + (f" for {a.workload}" if a.workload else ""), file=sys.stderr)
        return 1
    print(table(recs, a.budget_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
