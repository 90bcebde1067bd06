"""Run under torchrun by test_ranks.py: a job across ranks on a tiny checkpoint whose weights
stream from host memory (whole layers, or 1/N fetched and all-gathered every layer), through
jobs.answer_job_on_ranks as `generate --input` runs it; then rank 0 writes what each rank did.

    torchrun --nproc-per-node N tests/dist_jobs.py CHECKPOINT IN.jsonl OUT.jsonl {whole|allgather} STATS.json

The tokenizer reads bytes and writes token ids as text ("17 301 5"), so that a record's text is
exactly the tokens generated.
"""
import json
import sys

import torch

from offloadgen import distributed
from offloadgen.api import LLM
from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.config import RunConfig
from offloadgen.engine import Engine
from offloadgen.jobs import answer_job_on_ranks, open_job
from offloadgen.offload.placement import disk_placement_on_cpu
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.runtime import Runtime, plan_run
from offloadgen.sampling import SamplingParams
from offloadgen.tokenizer import ByteTokenizer

CPU = torch.device("cpu")


class IdsTokenizer(ByteTokenizer):
    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def tiny_llm(path, mode, world) -> LLM:
    ckpt = SafetensorsFolder(path)
    weights = StreamingWeights(ckpt, CPU, torch.float32, disk_placement_on_cpu(ckpt.cfg), progress=False,
                               world=world, fetch=mode)
    plan = plan_run(RunConfig(device="cpu", dtype="float32", weight_fetch=mode), ckpt.cfg, CPU, world)
    engine = Engine(ckpt.cfg, weights, CPU, torch.float32)
    return LLM(Runtime(plan, ckpt, IdsTokenizer(ckpt.cfg), weights, engine, {}))


if __name__ == "__main__":
    path, src, dst, mode, stats_file = sys.argv[1:6]
    world = distributed.init("cpu")
    llm = tiny_llm(path, mode, world)
    job = open_job(src, dst) if world.is_main else None
    summary = answer_job_on_ranks(llm, job, SamplingParams(max_new_tokens=4), world, batch_size=2, progress=False)
    if job is not None:
        job.close()
    s = llm._batcher.stats
    mine = {"passes": s.passes, "empty_passes": s.empty_passes, "output_tokens": s.output_tokens}
    every = distributed.gather(mine, world)
    if world.is_main:
        with open(stats_file, "w") as f:
            json.dump({"ranks": every, "done": summary.done, "errors": summary.errors, "skipped": summary.skipped},
                      f)
    distributed.finish(world)
    distributed.exit_process(0)
