"""On a GPU: the continuous batcher against each prompt run alone (greedy, float32), with the KV
cache on the GPU and in CPU memory (CPU attention, GPU attention, split; pinned or not; written
back synchronously or on a side stream), prompt chunks small enough that long prompts are split
across passes. These are the paths a CPU test cannot reach: row writes staged in pinned memory and
put in place later, rows' past slots read by a zero-copy kernel. Prints one line per case."""
import sys

import torch

from offloadgen.checkpoint import DummyCheckpoint
from offloadgen.engine import Engine
from offloadgen.models import preset
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.sampling import SamplingParams
from offloadgen.scheduler import ContinuousBatcher

# `--device cpu --quick`: a dry run of the first model on the CPU (the staged paths stay unused there)
dev = torch.device(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
QUICK = "--quick" in sys.argv
LENGTHS = [70, 5, 33, 120, 1, 48, 90, 12, 64, 7, 101, 26, 3, 80]
MAX_TOKENS = [24, 6, 30, 9, 17, 3, 28, 12, 20, 31, 5, 14, 25, 8]
CASES = {"kv on the GPU": None,
         "cpu attention, pinned, async": KVOffload(True, True, "cpu"),
         "cpu attention, pageable, sync": KVOffload(False, False, "cpu"),
         "gpu attention, pinned, async": KVOffload(True, True, "gpu"),
         "gpu attention, pinned, sync": KVOffload(True, False, "gpu"),
         "split half/half, pinned, async": KVOffload(True, True, gpu_fraction=0.5)}


def configs():
    for name in ("opt-125m", "smollm2-135m", "bloom-560m"):
        yield name, preset(name)
    cfg = preset("smollm2-135m")
    cfg.sliding_window = 40  # shorter than most rows here: the window is exercised
    yield "smollm2-135m, window 40", cfg


def main() -> int:
    g = torch.Generator().manual_seed(0)
    ok = True
    for name, cfg in list(configs())[:1 if QUICK else None]:
        prompts = [torch.randint(4, 250, (n,), generator=g).tolist() for n in LENGTHS]
        weights = ResidentWeights(DummyCheckpoint(cfg), dev, torch.float32, progress=False)
        alone = Engine(cfg, weights, dev, torch.float32)
        ref = []
        for ids, n in zip(prompts, MAX_TOKENS):
            t = torch.tensor([ids])
            ref.append(alone.generate(t, torch.ones_like(t), SamplingParams(max_new_tokens=n, ignore_eos=True),
                                      set(), 0).tokens[0])
        distinct = len({tuple(r) for r in ref})
        for case, opts in list(CASES.items())[:2 if QUICK else None]:
            engine = Engine(cfg, weights, dev, torch.float32, 4, kv_offload=opts)
            batcher = ContinuousBatcher(engine, 6, max(LENGTHS) + max(MAX_TOKENS), prefill_chunk=48)
            reqs = [batcher.submit(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))
                    for ids, n in zip(prompts, MAX_TOKENS)]
            while batcher.has_work():
                batcher.step()
            engine.close()
            bad = [i for i, (r, want) in enumerate(zip(reqs, ref)) if r.output_ids != want]
            ok &= not bad
            print(f"{name:24s} {case:32s}: {len(reqs) - len(bad)}/{len(reqs)} requests equal alone "
                  f"({distinct} distinct outputs), {batcher.stats.passes} passes, occupancy "
                  f"{batcher.stats.slot_occupancy:.0%}" + (f"; differ: {bad}" if bad else ""), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
