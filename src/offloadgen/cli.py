"""offloadgen's command line. Generated text goes to standard output, everything else to stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Never reach for a model hub, and keep transformers' advice off the user's terminal.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import OffloadgenError  # noqa: E402


def _parse_bytes(text: str) -> int:
    from .bench.cli import parse_bytes
    return parse_bytes(text)


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text for prompts",
                       description="Generate text. MODEL is a Hugging Face folder, a .gguf file, or a preset "
                                   "name with --dummy; with no MODEL, the embedded SmolLM2-135M.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--dummy", action="store_true", help="MODEL is a built-in preset with made-up weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--input", help="JSONL file: one {'prompt': ...} or {'messages': [...]} per line, optional 'id'")
    p.add_argument("--output", help="JSONL file for the results, appended; rerunning resumes (default: stdout)")
    p.add_argument("--ordered", action="store_true", help="rewrite --output in input order at the end")
    p.add_argument("--output-format", choices=["jsonl", "openai-batch"], default="jsonl",
                   help="--output records: offloadgen's (default) or the OpenAI Batch API's output lines")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: float32 on CPU)")
    p.add_argument("--quant-bits", "--quant_bits", type=int, default=16, choices=[4, 8, 16],
                   help="group-wise quantize the decoder layers' linear weights (16 = none)")
    p.add_argument("--quant-group-size", "--quant_group_size", type=int, default=64)
    p.add_argument("--cpu-offload", action="store_true", help="keep weights in CPU RAM and stream them to the GPU")
    p.add_argument("--gpu-memory", type=_parse_bytes, default=None, help="GPU budget with --cpu-offload, e.g. 16GiB")
    p.add_argument("--pin-memory", type=int, default=1, choices=[0, 1])
    p.add_argument("--disk-offload", "--disk_offload", action="store_true",
                   help="weights on disk (written once to --offload-dir), read layer by layer: models larger than RAM")
    p.add_argument("--offload-dir", "--offload_dir", default="~/offload_dir")
    p.add_argument("--kv-offload", "--kv_offload", action="store_true",
                   help="KV cache in CPU memory: batches limited by CPU RAM, not GPU memory")
    p.add_argument("--pin-kv-cache", "--pin_kv_cache", type=int, default=1, choices=[0, 1],
                   help="with --kv-offload: pinned cache memory (default 1)")
    p.add_argument("--async-kv-offload", "--async_kv_offload", type=int, default=1, choices=[0, 1],
                   help="with --kv-offload: write the cache back on a side stream (default 1)")
    p.add_argument("--kv-attention", default="auto", choices=["auto", "cpu", "gpu"],
                   help="with --kv-offload: where decode attention runs (auto: split by the step model)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + new tokens to plan GPU memory for (default: from --prompt, or 2048 with --input)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from .api import LLM, default_device, encode_prompts, place_weights, resolve_dtype
    from .checkpoint import open_checkpoint
    from .offload.kv_cache import KVOffload
    from .sampling import SamplingParams

    if args.batch_size < 1:
        raise OffloadgenError("--batch-size must be at least 1")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop)
    # Everything that can be wrong with the input is found before any weight is loaded.
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)
    tokenizer = checkpoint.tokenizer()
    if args.input:
        if not Path(args.input).is_file():
            raise OffloadgenError(f"--input {args.input}: no such file")
        if not args.output:
            raise OffloadgenError("--input needs --output (a JSONL file; rerunning with it resumes)")
        items = []
    else:
        items = list(enumerate(args.prompt or ["Paris is the capital city of"]))
        encode_prompts(tokenizer, checkpoint.cfg, [p for _, p in items], [i for i, _ in items])
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadgenError("--device cuda: this machine has no CUDA GPU")
    # Under torchrun each rank answers its share of the prompts; rank 0 gathers them in order and
    # alone writes.
    from . import distributed
    world = distributed.init(device.type)
    device = distributed.device_for(world, device)
    if world.active and args.input:
        raise OffloadgenError("--input jobs run in one process (they resume by line); under torchrun give --prompt")
    dtype = resolve_dtype(args.dtype, device, checkpoint.cfg)
    max_seq_len = args.max_seq_len
    if max_seq_len is None:
        longest = max((len(tokenizer.encode(p)) for _, p in items), default=0)
        max_seq_len = longest + args.max_new_tokens if items else min(2048, checkpoint.cfg.max_position)
    kv = KVOffload(pinned=bool(args.pin_kv_cache), async_write=bool(args.async_kv_offload),
                   attention=args.kv_attention) if args.kv_offload else None
    weights, limits, kv = place_weights(checkpoint, device, dtype, cpu_offload=args.cpu_offload,
                                        gpu_memory=args.gpu_memory, pin_memory=bool(args.pin_memory),
                                        max_batch_size=args.batch_size, max_seq_len=max_seq_len,
                                        micro_batch_size=args.micro_batch_size, quant_bits=args.quant_bits,
                                        quant_group_size=args.quant_group_size, kv_offload=kv,
                                        offload_dir=args.offload_dir if args.disk_offload else None)
    llm = LLM(checkpoint, device, dtype, weights=weights, micro_batch_size=args.micro_batch_size, tokenizer=tokenizer,
              limits=limits, kv_offload=kv)
    with llm:  # stops the weight source's threads and unpins memory however the run ends
        if args.input:
            return _run_job(llm, args, sampling)
        return _answer_prompts(llm, args, sampling, items, world)


def _answer_prompts(llm, args, sampling, items, world) -> int:
    from . import distributed
    if args.output and world.is_main:
        open(args.output, "w").close()  # a prompt run's --output starts afresh (jobs, above, resume)
    share = -(-len(items) // world.size)
    mine = items[world.rank * share:(world.rank + 1) * share]
    results = []
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start:start + args.batch_size]
        results += [(item_id, prompt, c.text, len(c.token_ids), c.finish_reason)
                    for (item_id, prompt), c in zip(chunk, llm.generate([p for _, p in chunk], sampling))]
        if not world.active:  # one process: print as each batch finishes
            _emit(results, args, len(items))
            results = []
    if world.active:
        results = [r for part in distributed.gather(results, world) for r in part]
        if world.is_main:
            _emit(results, args, len(items))
        distributed.finish(world)
    if args.output and world.is_main:
        print(f"offloadgen: wrote {len(items)} results to {args.output}", file=sys.stderr)
    return 0


def _emit(results, args, n_items: int) -> None:
    """Results as JSON lines appended to --output, or printed (the text alone for one prompt)."""
    out = open(args.output, "a", encoding="utf-8") if args.output else None
    try:
        for item_id, prompt, text, n_tokens, reason in results:
            if out:
                out.write(json.dumps({"id": item_id, "prompt": prompt, "text": text, "tokens": n_tokens,
                                      "finish_reason": reason}) + "\n")
            else:
                print(prompt + text if n_items == 1 else json.dumps({"id": item_id, "text": text}), flush=True)
    finally:
        if out:
            out.close()


def _run_job(llm, args, sampling) -> int:
    from .jobs import run_job
    s = run_job(llm, args.input, args.output, sampling, args.batch_size, args.ordered,
                output_format=args.output_format)
    rate = s.tokens / s.seconds if s.seconds else 0.0
    print(f"offloadgen: {s.done} prompts answered this run ({s.skipped} already done earlier), {s.errors} bad lines, "
          f"{s.tokens} tokens in {s.seconds:.1f} s ({rate:.1f} tokens/s) -> {args.output}", file=sys.stderr)
    if s.interrupted:
        print(f"offloadgen: stopped by {s.interrupted}; finished work is in {args.output}. "
              f"Run the same command again to resume.", file=sys.stderr)
        return 130 if s.interrupted == "SIGINT" else 143
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offloadgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    try:
        from .bench.cli import add_bench
        add_bench(sub)
    except ImportError:
        pass
    _add_plan(sub)
    from .serve.cli import add_serve
    add_serve(sub)
    p = sub.add_parser("report", help="table (and plot) of bench records: offloadgen's and the peers'")
    p.add_argument("paths", nargs="+", help="JSON-lines files or folders of them")
    p.add_argument("--plot", metavar="FILE.png", help="draw decode throughput against batch size")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("presets", help="list the built-in model configs usable with --dummy")
    p.set_defaults(func=cmd_presets)
    return parser


def _add_plan(sub):
    from .bench.cli import parse_bytes
    p = sub.add_parser("plan", help="where weights and KV cache would go, and the predicted speed",
                       description="Plan a run before loading anything: placement under the GPU budget, bytes per "
                                   "step over each link, predicted decode step and tokens/s per batch size.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--dummy", action="store_true")
    p.add_argument("--gpu-memory", type=parse_bytes, default=None, help="GPU budget (default: free memory, or 16GiB without a GPU)")
    p.add_argument("--cpu-memory", type=parse_bytes, default=None, help="CPU RAM to plan for (default: available now)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", help="comma-separated")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--quant-bits", "--quant_bits", type=int, default=16, choices=[4, 8, 16])
    p.add_argument("--quant-group-size", "--quant_group_size", type=int, default=64)
    p.add_argument("--h2d-bandwidth", type=parse_bytes, default=None, help="bytes/s, e.g. 50GB (default: measured)")
    p.add_argument("--no-offload", action="store_true", help="plan for everything on the GPU")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import torch

    from .checkpoint import open_checkpoint
    from .plan import available_host_memory, load_calibration, plan_table, print_plan
    from .quant import QuantConfig

    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise OffloadgenError(f"--batch-sizes {args.batch_sizes!r}: expected numbers like 1,8,16") from None
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)  # reads config.json and headers only
    quant = QuantConfig(args.quant_bits, args.quant_group_size) if args.quant_bits != 16 else None
    if args.gpu_memory:
        budget = args.gpu_memory
    elif torch.cuda.is_available():
        from .bench.run import default_budget
        budget = default_budget(torch.device("cuda"))
    else:
        budget = 16 << 30
    host = args.cpu_memory or available_host_memory()
    cal = load_calibration(args.h2d_bandwidth)
    rows = plan_table(checkpoint.cfg, budget, batches, args.prompt_len, args.gen_len, 2, quant,
                      args.micro_batch_size, cal, host, offload=not args.no_offload)
    print_plan(checkpoint.cfg, args.model or "embedded default", rows, cal, budget, host, quant, sys.stdout)
    return 0 if any("error" not in r for r in rows) else 2


def cmd_report(args) -> int:
    from .bench.report import load_records, plot, table
    records = load_records(args.paths)
    print(table(records))
    if args.plot:
        plot(records, args.plot)
        print(f"offloadgen: plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_presets(args) -> int:
    from .models import param_count, preset, preset_names
    for name in preset_names():
        print(f"{name:16s} {param_count(preset(name)) / 1e9:8.2f}B parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rank = os.environ.get("RANK", "0")
    try:
        return args.func(args)
    except OffloadgenError as e:
        if rank == "0":  # under torchrun every rank finds the same fault; one says it
            print(f"offloadgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offloadgen: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `offloadgen` command."""
    from .distributed import exit_process
    exit_process(main())


if __name__ == "__main__":
    entry()
