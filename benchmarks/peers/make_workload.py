"""Write a synthetic job as a workload file once, so offloadgen and the peers run the same requests.

The lengths come from offloadgen's own generator (bench/workload.synthetic): with the same model,
counts, ranges and seed, the file holds the prompt and output lengths `offloadgen bench --workload
synthetic` would draw. Each line is {"input_len": n, "output_len": m}; whoever reads the file back
(`offloadgen bench --workload FILE`, the peers' --workload FILE) draws the prompt's tokens from
--workload-seed, so with the same seed every system gets the same token ids too.

    python benchmarks/peers/make_workload.py job.jsonl --num-requests 32 --input-len 32:512 --output-len 8:64
"""
import argparse
import json
import sys

sys.path.insert(0, "src")
from offloadgen.bench.workload import parse_range, synthetic  # noqa: E402
from offloadgen.errors import OffloadgenError  # noqa: E402
from offloadgen.models import preset  # noqa: E402


def write_workload(path: str, num_requests: int, input_len: str, output_len: str, seed: int, model: str) -> list:
    """The requests synthetic() draws for `model`'s vocabulary (it shapes the random stream), as lines."""
    items = synthetic(num_requests, parse_range(input_len, "--input-len"), parse_range(output_len, "--output-len"),
                      seed, preset(model).vocab_size)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"input_len": len(it.prompt_ids), "output_len": it.output_len}) + "\n")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="the JSONL file to write")
    p.add_argument("--model", default="facebook/opt-13b", help="preset whose vocabulary synthetic() draws from")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", default="32:512", help="MIN:MAX prompt tokens (uniform)")
    p.add_argument("--output-len", default="8:64", help="MIN:MAX new tokens (uniform)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.num_requests < 1:
        p.error(f"--num-requests must be at least 1, got {a.num_requests}")
    try:
        items = write_workload(a.path, a.num_requests, a.input_len, a.output_len, a.seed, a.model)
    except OffloadgenError as e:
        p.error(str(e))
    print(f"{a.path}: {len(items)} requests, {sum(len(it.prompt_ids) for it in items)} prompt tokens, "
          f"{sum(it.output_len for it in items)} output tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
