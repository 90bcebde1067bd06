"""Fold py-spy's raw samples (`py-spy record --subprocesses --threads --idle --format raw`) of a
server on ranks into where each serving loop spends its time: rank 0's batcher thread
(RankedWorker._run), rank 0's HTTP side (run_server) and every other rank's loop (follow). Samples
outside those loops (start-up, loading) are left out. For each loop: its samples, then the
functions they were in (inclusive: a function counts once per sample, with whatever it called),
the most first, and the innermost frames (where the thread was when sampled). With native frames
(`py-spy record --native`) each loop's samples are also split by what the thread was waiting for:
Python's GIL (taking it back after a call that released it), the GPU (a CUDA synchronize), or
neither.

    python benchmarks/fold_profile.py out/profile.txt[.gz] [--top 25]
"""
from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict

LOOPS = {"RankedWorker._run": "batcher thread", "run_server": "HTTP side", "follow": "loop"}
# what a thread waits for, from the native frames of its stack (innermost first wins). CPython
# waits for the GIL in pthread_cond_timedwait (take_gil itself is inlined away in the samples);
# its locks and events wait on semaphores, and CUDA's synchronize spins or yields, so that frame
# marks a GIL wait.
WAITS = [("the GIL", ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "pthread_cond_timedwait")),
         ("the GPU (synchronize)", ("Synchronize", "synchronize")),
         ("the CUDA driver", ("libcuda.so",)),
         ("gloo", ("gloo::",)),
         ("a collective (c10d)", ("c10d::",)),
         ("NCCL", ("nccl", "NCCL"))]


def waiting_for(frames: list[str]) -> str:
    for frame in reversed(frames):
        for what, marks in WAITS:
            if any(m in frame for m in marks):
                return what
    return "none of these"


def fold(path: str) -> dict:
    loops: dict = defaultdict(lambda: {"samples": 0, "inclusive": Counter(), "leaf": Counter(), "waits": Counter()})
    opener = gzip.open if path.endswith(".gz") else open  # records are kept gzipped
    for line in opener(path, "rt", encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        names = [re.sub(r" \(.*\)$", "", f) for f in frames if not f.startswith(("process ", "thread "))]
        role = next((LOOPS[n] for n in names if n in LOOPS), None)
        if role is None or not procs:
            continue
        pid = procs[-1].split(":")[0].split()[1]
        loop = loops[(pid, role)]
        loop["samples"] += int(count)
        for name in set(names):
            loop["inclusive"][name] += int(count)
        loop["leaf"][frames[-1]] += int(count)
        loop["waits"][waiting_for(frames)] += int(count)
    return loops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    loops = fold(args.profile)
    for (pid, role), loop in sorted(loops.items(), key=lambda kv: (kv[0][1] == "loop", kv[0][0])):
        total = loop["samples"]
        print(f"\n== process {pid}, {role}: {total} samples")
        for name, n in loop["inclusive"].most_common(args.top):
            if n == total:
                continue  # the frames every sample has: the loop itself and what called it
            print(f"  {n / total:6.1%}  {name}")
        print("  -- innermost frames")
        for name, n in loop["leaf"].most_common(8):
            print(f"  {n / total:6.1%}  {name[:160]}")
        print("  -- waiting for (native frames only)")
        for what, n in loop["waits"].most_common():
            print(f"  {n / total:6.1%}  {what}")


if __name__ == "__main__":
    main()
