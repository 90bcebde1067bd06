"""offloadgen's command line. Generated text goes to standard output, everything else to stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# transformers never reaches for a model hub on its own, and its advice stays off the user's terminal.
# A hub model the user names is still fetched: the marker tells checkpoint/hub.py the offline mode
# is this default, not the user's own HF_HUB_OFFLINE=1 (which is honoured).
if "HF_HUB_OFFLINE" not in os.environ:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["OFFLOADGEN_HUB_OFFLINE_DEFAULT"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import OffloadgenError  # noqa: E402
from .flags import (add_model_flags, add_planned_flags, add_run_flags, config_from_args, flag,  # noqa: E402
                    glue_dash_values, size)


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text for prompts",
                       description="Generate text. MODEL is a Hugging Face folder, a hub name (org/name[@revision]: "
                                   "from the local cache, else downloaded), a .gguf file, or a preset "
                                   "name with --dummy; with no MODEL, the embedded SmolLM2-135M.")
    add_model_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--input", help="JSONL file: one {'prompt': ...} or {'messages': [...]} per line, optional 'id'")
    p.add_argument("--output", help="JSONL file for the results, appended; rerunning resumes (default: stdout)")
    p.add_argument("--ordered", action="store_true", help="rewrite --output in input order at the end")
    flag(p, "--output-format", choices=["jsonl", "openai-batch"], default="jsonl",
                   help="--output records: offloadgen's (default) or the OpenAI Batch API's output lines")
    add_sampling_flags(p)
    add_planned_flags(p)
    flag(p, "--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per pass, at most (default 512)")
    flag(p, "--num-gpus-per-node", type=int, default=1,
         help="ranks on this node, each with --batch-size slots of its own; more than 1 starts torchrun "
              "(or run under torchrun yourself). See docs/distributed.md")
    add_run_flags(p)
    p.set_defaults(func=cmd_generate)


def add_sampling_flags(p) -> None:
    g = p.add_argument_group("sampling")
    flag(g, "--max-new-tokens", type=int, default=64)
    flag(g, "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    flag(g, "--top-k", type=int, default=0)
    flag(g, "--top-p", type=float, default=1.0)
    flag(g, "--seed", type=int, default=None)
    flag(g, "--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_generate(args) -> int:
    from . import distributed
    from .api import encode_prompts, load
    from .checkpoint import open_checkpoint
    from .runtime import resolve_device
    from .sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop)
    config = config_from_args(args, max_batch_size=args.batch_size).validate()
    for name in ("prefill_chunk", "max_seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise OffloadgenError(f"--{name.replace('_', '-')} must be at least 1; got {value}")
    if args.num_gpus_per_node < 1:
        raise OffloadgenError(f"--num-gpus-per-node must be at least 1; got {args.num_gpus_per_node}")
    # Everything that can be wrong with the input is found before any weight is loaded.
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)
    # A job's prompts are encoded after loading: its tokenizer is left to the builder, which loads
    # it while the weights load. Prompts given here set --max-seq-len, so theirs comes first.
    tokenizer = None
    if args.input:
        _check_job_files(args)
        items = []
    else:
        tokenizer = checkpoint.tokenizer()
        items = list(enumerate(args.prompt or ["Paris is the capital city of"]))
        encoded = encode_prompts(tokenizer, checkpoint.cfg, [p for _, p in items], [i for i, _ in items])
        check_lengths(encoded, args.max_new_tokens, checkpoint.cfg.max_position, args.max_seq_len)
    if args.num_gpus_per_node > 1 and not distributed.launched():
        return distributed.relaunch(args.argv, args.num_gpus_per_node)
    # Under torchrun each rank answers its share of the prompts (of a job: dealt by expected work,
    # jobs.answer_job_on_ranks); rank 0 gathers them and alone writes.
    world = distributed.init(resolve_device(config).type)
    max_seq_len = args.max_seq_len
    if max_seq_len is None and items:
        max_seq_len = max(len(ids) for ids in encoded) + args.max_new_tokens
    llm = load(config=config.replace(max_seq_len=max_seq_len), checkpoint=checkpoint, tokenizer=tokenizer, world=world)
    with llm:  # stops the weight source's threads and unpins memory however the run ends
        if args.input:
            return _run_job_on_ranks(llm, args, sampling, world) if world.active else _run_job(llm, args, sampling)
        return _answer_prompts(llm, args, sampling, items, world)


def check_lengths(encoded: list[list[int]], max_new_tokens: int, context: int, max_seq_len: int | None) -> None:
    """Refuse, before any weight is loaded, a prompt whose tokens and --max-new-tokens do not fit
    the model's context or --max-seq-len (which is enforced on every device, never truncated)."""
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    n = len(encoded[longest])
    name = f"prompt {longest}" if len(encoded) > 1 else "the prompt"
    if max_seq_len is not None and n + max_new_tokens > max_seq_len:
        raise OffloadgenError(f"{name} has {n} tokens, and with --max-new-tokens {max_new_tokens} needs {n + max_new_tokens}"
                              f": more than --max-seq-len {max_seq_len} (raise it, or lower --max-new-tokens)")
    if n + max_new_tokens > context:
        raise OffloadgenError(f"{name} has {n} tokens, and with --max-new-tokens {max_new_tokens} needs {n + max_new_tokens}"
                              f": more than the model's context of {context} tokens (lower --max-new-tokens to "
                              f"{max(context - n, 0)} or less)")


def _check_job_files(args) -> None:
    """The job's files, checked before any weight is loaded. Under torchrun only rank 0 opens the
    output (and takes its lock, briefly here, then for the job); the others check what they can
    without the lock, so that most faults are refused alike by every rank and said once."""
    from .jobs import open_job, read_input
    from .outputs import check_output_path
    if not Path(args.input).is_file():
        what = "a folder" if Path(args.input).is_dir() else "not a regular file (jobs resume by reading it again)" \
            if Path(args.input).exists() else "no such file"
        raise OffloadgenError(f"--input {args.input}: {what}")
    if not args.output:
        raise OffloadgenError("--input needs --output (a JSONL file; rerunning with it resumes)")
    if os.environ.get("RANK", "0") == "0":
        open_job(args.input, args.output, args.ordered).close()
    else:
        read_input(args.input)
        check_output_path(args.output)


def _answer_prompts(llm, args, sampling, items, world) -> int:
    from contextlib import nullcontext

    from . import distributed
    from .outputs import JobOutput
    # --output gets records appended, as a job's are (locked; a file that is not ours is refused).
    with JobOutput(args.output) if args.output and world.is_main else nullcontext() as out:
        share = -(-len(items) // world.size)
        mine = items[world.rank * share:(world.rank + 1) * share]
        results = []
        for start in range(0, len(mine), args.batch_size):
            chunk = mine[start:start + args.batch_size]
            results += [(item_id, prompt, c.text, len(c.token_ids), c.finish_reason)
                        for (item_id, prompt), c in zip(chunk, llm.generate([p for _, p in chunk], sampling,
                                                                            prefill_chunk=args.prefill_chunk))]
            if not world.active:  # one process: print as each batch finishes
                _emit(results, out, len(items))
                results = []
        if world.active:
            results = [r for part in distributed.gather(results, world) for r in part]
            if world.is_main:
                _emit(results, out, len(items))
            distributed.finish(world)
    if args.output and world.is_main:
        print(f"offloadgen: appended {len(items)} results to {args.output}", file=sys.stderr)
    return 0


def _emit(results, out, n_items: int) -> None:
    """Results as records appended to out (an outputs.JobOutput), or printed (the text alone for one prompt)."""
    if out is not None:
        from .jobs import prompt_records
        out.append(prompt_records(results))
        return
    for item_id, prompt, text, n_tokens, reason in results:
        print(prompt + text if n_items == 1 else json.dumps({"id": item_id, "text": text}), flush=True)


def _run_job(llm, args, sampling) -> int:
    from .jobs import run_job
    s = run_job(llm, args.input, args.output, sampling, args.batch_size, args.ordered,
                prefill_chunk=args.prefill_chunk, output_format=args.output_format, max_seq_len=args.max_seq_len)
    return _job_summary(s, args)


def _run_job_on_ranks(llm, args, sampling, world) -> int:
    """A job across ranks: rank 0 holds the output (locked) and writes; see jobs.answer_job_on_ranks."""
    from contextlib import nullcontext

    from . import distributed
    from .jobs import answer_job_on_ranks, open_job
    with open_job(args.input, args.output, args.ordered) if world.is_main else nullcontext() as job:
        s = answer_job_on_ranks(llm, job, sampling, world, args.batch_size, prefill_chunk=args.prefill_chunk,
                                output_format=args.output_format, max_seq_len=args.max_seq_len)
    distributed.finish(world)
    if not world.is_main:
        return 0 if not s.interrupted else 130 if s.interrupted == "SIGINT" else 143
    return _job_summary(s, args)


def _job_summary(s, args) -> int:
    rate = s.tokens / s.seconds if s.seconds else 0.0
    print(f"offloadgen: {s.done} prompts answered this run ({s.skipped} already done earlier), {s.errors} bad lines, "
          f"{s.tokens} tokens in {s.seconds:.1f} s ({rate:.1f} tokens/s, {s.passes} passes"
          f"{f' of {s.seconds / s.passes:.3f} s' if s.passes else ''}) -> {args.output}", file=sys.stderr)
    if s.interrupted:
        print(f"offloadgen: stopped by {s.interrupted}; finished work is in {args.output}. "
              f"Run the same command again to resume.", file=sys.stderr)
        return 130 if s.interrupted == "SIGINT" else 143
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line and exit 2, like every other refusal (`--help` shows the usage)."""

    def error(self, message: str):
        command = self.prog.removeprefix("offloadgen").strip()
        self.exit(2, f"offloadgen: error: {command + ': ' if command else ''}{message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offloadgen", description=__doc__)
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
    p = sub.add_parser("plan", help="where weights and KV cache would go, and the predicted speed",
                       description="Plan a run before loading anything: placement under the GPU budget, bytes per "
                                   "step over each link, predicted decode step and tokens/s per batch size. It takes "
                                   "the flags a run takes (generate's --batch-size and --max-seq-len too) and plans "
                                   "exactly what that run would get.")
    add_model_flags(p)
    p.add_argument("--cpu-memory", type=size, default=None, help="CPU RAM to plan for (default: available now)")
    add_planned_flags(p, batch_default=None, batch_help="plan this batch size alone, as generate --batch-size runs it")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; or give --max-seq-len)")
    p.add_argument("--gen-len", type=int, default=None, help="new tokens (default 32; or give --max-seq-len)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,2,4,8,16,32,64)")
    p.add_argument("--h2d-bandwidth", type=size, default=None, help="bytes/s, e.g. 50GB (default: measured)")
    flag(p, "--num-gpus-per-node", type=int, default=1,
         help="plan one rank of a run of N GPUs (with --weight-fetch): --batch-size rows each, tokens/s of all; the "
              "links as the last `bench --num-gpus-per-node N` here measured them, else assumed (the line says which)")
    flag(p, "--allgather-bandwidth", type=size, default=None,
         help="with several GPUs: bytes/s each GPU receives in an all-gather, e.g. 180GB (default: as measured by "
              "bench, else assumed)")
    add_run_flags(p)
    p.set_defaults(func=cmd_plan)


def _plan_batches(args) -> list[int]:
    """generate's --batch-size (one row), or the --batch-sizes list."""
    if args.batch_size is not None and args.batch_sizes is not None:
        raise OffloadgenError("give --batch-size (one batch, as generate runs it) or --batch-sizes (a table), not both")
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise OffloadgenError(f"--batch-size must be at least 1; got {args.batch_size}")
        return [args.batch_size]
    text = args.batch_sizes or "1,2,4,8,16,32,64"
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise OffloadgenError(f"--batch-sizes {text!r}: expected whole numbers like 1,8,16") from None
    if not batches or min(batches) < 1:
        raise OffloadgenError(f"--batch-sizes {text!r}: every batch size must be at least 1")
    return batches


def _plan_lengths(args) -> dict:
    """What the run's memory is planned for: generate's --max-seq-len (prompt and new tokens
    together, as a generate run plans it), or bench's --prompt-len and --gen-len."""
    given = [f"--{n.replace('_', '-')}" for n in ("prompt_len", "gen_len") if getattr(args, n) is not None]
    if args.max_seq_len is not None:
        if given:
            raise OffloadgenError(f"give --max-seq-len (as generate takes it) or {' and '.join(given)} (as bench "
                                  "does), not both")
        if args.max_seq_len < 1:
            raise OffloadgenError(f"--max-seq-len must be at least 1; got {args.max_seq_len}")
        return {"max_seq_len": args.max_seq_len}
    prompt_len, gen_len = args.prompt_len or 512, args.gen_len or 32
    for name, value in (("--prompt-len", args.prompt_len), ("--gen-len", args.gen_len)):
        if value is not None and value < 1:
            raise OffloadgenError(f"{name} must be at least 1; got {value}")
    return {"max_seq_len": prompt_len + gen_len, "max_prompt_len": prompt_len}


def cmd_plan(args) -> int:
    import torch

    from .checkpoint import open_checkpoint
    from .machine import available_host_memory, default_gpu_budget, load_calibration
    from .plan import cpu_attention_figure, plan_links, plan_table, print_plan
    from .runtime import check_model_settings, resolve_dtype
    from .quant import QuantConfig

    batches, lengths = _plan_batches(args), _plan_lengths(args)
    if args.num_gpus_per_node < 1:
        raise OffloadgenError(f"--num-gpus-per-node must be at least 1; got {args.num_gpus_per_node}")
    if args.allgather_bandwidth and (args.num_gpus_per_node < 2 or args.weight_fetch == "whole"):
        raise OffloadgenError("--allgather-bandwidth is the NVLink all-gather rate of several ranks fetching with "
                              "--weight-fetch allgather or pool; got --num-gpus-per-node "
                              f"{args.num_gpus_per_node} and --weight-fetch {args.weight_fetch}")
    if args.device == "cpu":
        raise OffloadgenError("plan predicts a run on a GPU; a --device cpu run keeps every weight on the CPU, with "
                              "nothing to place (drop --device cpu)")
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)  # reads config.json and headers only
    budget = args.gpu_memory or (default_gpu_budget(torch.device("cuda")) if torch.cuda.is_available() else 16 << 30)
    config = config_from_args(args, gpu_memory=budget, **lengths).validate()
    check_model_settings(config, checkpoint.cfg)  # once, not on every row of the table
    host = args.cpu_memory or available_host_memory()
    cal = load_calibration(args.h2d_bandwidth)
    dtype = resolve_dtype(config.dtype, torch.device(config.device or "cuda"), checkpoint.cfg)
    cpu_attention = cpu_attention_figure(cal, config, checkpoint.cfg, dtype,
                                         config.micro_batch_size or min(max(batches), 16))
    links = plan_links(args.num_gpus_per_node, config.weight_fetch, args.allgather_bandwidth, config.weight_gather)
    rows = plan_table(config, checkpoint.cfg, batches, cal, host, links)
    quant = QuantConfig(config.quant_bits, config.quant_group_size) if config.quant_bits != 16 else None
    print_plan(checkpoint.cfg, args.model or "embedded default", rows, cal, budget, host, quant, dtype, sys.stdout,
               cpu_attention, links)
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
    args = build_parser().parse_args(glue_dash_values(list(sys.argv[1:] if argv is None else argv)))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rank = os.environ.get("RANK", "0")
    try:
        return args.func(args)
    except OffloadgenError as e:
        if rank == "0":  # under torchrun every rank finds the same fault; one says it
            print(f"offloadgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine refused (a file that cannot be written or sought, a full disk)
        if rank == "0":
            where = f"{e.filename}: " if e.filename else ""
            print(f"offloadgen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offloadgen: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # under torchrun: a collective whose peer had ended (rank 0 cut by a broken pipe)
        from .distributed import PEER_ENDED_EXIT, peer_ended_message
        said = peer_ended_message(e, rank)
        if said is None:
            raise
        print(said, file=sys.stderr)
        return PEER_ENDED_EXIT


def entry() -> None:
    """The `offloadgen` command."""
    from .distributed import exit_process
    exit_process(main())


if __name__ == "__main__":
    entry()
