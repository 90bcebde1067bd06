"""Where the host thread's time goes in a continuous-batching job (issue 16): the job runs under
cProfile (the host is what bounds a pass with the KV cache in CPU RAM: on the H100 a decode-only
pass of OPT-13B at 64 slots took 0.89 s, 0.55 s of it in CPU attention, and a pass that also
prefilled took 1.26 s). Prints the functions with the most time of their own, then those with the
most time below them, offloadgen's and the waits (synchronize, copies, the kernel); the stats go
to $OUT/profile_job.prof when OUT is set.

    python benchmarks/profile_job.py [bench flags]    # default: a 64-request version of
                                                      # continuous_batching.sh's job (~3 min on one H100)
    python benchmarks/profile_job.py --model opt-125m --dummy --device cpu --kv-offload \
        --batch-size 8 --num-requests 16 --micro-batch-size 4   # the same tool on a small machine

cProfile adds a little to every Python call; compare passes within this run, not with other runs.
"""
import cProfile
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from offloadgen.cli import main  # noqa: E402

DEFAULT = ("--model facebook/opt-13b --dummy --cpu-offload --gpu-memory 8GiB --kv-offload --pin-kv-cache "
           "--async-kv-offload --micro-batch-size 8 --batch-size 64 --workload synthetic --num-requests 64 "
           "--input-len 32:512 --output-len 8:256 --workload-seed 0 --prefill-chunk 2048").split()
WAITS = ("synchronize", "copy_", "attend", "wait", "item", "tolist", "pin_memory", "copy_in_chunks", "to")


def is_wait(file: str, name: str) -> bool:
    """Our functions by name, PyTorch's builtins as cProfile names them ("<method 'copy_' of ...>")."""
    return any(name == w or f"'{w}'" in name for w in WAITS)


def run(argv: list[str]) -> pstats.Stats:
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    argv = ["bench", *argv, "--json-file", str(out / "profile_job.jsonl")]
    profile = cProfile.Profile()
    profile.enable()
    code = main(argv)
    profile.disable()
    if code:
        raise SystemExit(f"the job failed (exit {code})")
    profile.dump_stats(str(out / "profile_job.prof"))
    return pstats.Stats(profile)


def table(stats: pstats.Stats, key: int, title: str, keep, n: int = 25) -> None:
    """Rows of (calls, own s, cumulative s, function), sorted by own (key 2) or cumulative (key 3) time."""
    rows = [(cc, tt, ct, f"{Path(file).name}:{line} {name}") for (file, line, name), (cc, _, tt, ct, _)
            in stats.stats.items() if keep(file, name)]
    rows.sort(key=lambda r: -r[key - 1])
    print(f"\n{title}\n{'calls':>9} {'own s':>8} {'below s':>8}  function")
    for cc, tt, ct, where in rows[:n]:
        print(f"{cc:9d} {tt:8.2f} {ct:8.2f}  {where}")


if __name__ == "__main__":
    stats = run(sys.argv[1:] or DEFAULT)
    table(stats, 2, "most time of their own (any function)", lambda file, name: True)
    table(stats, 3, "most time below them (offloadgen's functions)", lambda file, name: "offloadgen" in file)
    table(stats, 2, "waits and copies", is_wait, n=15)
