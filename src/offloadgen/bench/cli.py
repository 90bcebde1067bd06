"""`offloadgen bench`: the flags of the reference's run_model.py (in both its spellings,
--quant_bits and --quant-bits), on top of the flags every command shares (flags.py)."""
from __future__ import annotations

from ..flags import add_model_flags, add_run_flags, config_from_args, flag


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="the reference's run_generation benchmark",
                       description="Benchmark generation as DeepSpeed ZeRO-Inference's run_model.py does: its flags, "
                                   "metrics and log file; plus a JSON record per run. Defaults are the reference's "
                                   "where it has one (--model facebook/opt-1.3b, --batch-size 1, --prompt-len 512, "
                                   "--gen-len 32, --pin-kv-cache and --async-kv-offload off).")
    add_model_flags(p, positional=False, default="facebook/opt-1.3b")
    flag(p, "--batch-size", type=int, default=1,
         help="rows over all ranks (default 1); with --workload, slots over all ranks")
    flag(p, "--prompt-len", type=int, default=512)
    flag(p, "--gen-len", type=int, default=32)
    flag(p, "--loops", type=int, default=2, help="timed generations; metrics come from the last")
    flag(p, "--local-rank", type=int, default=0, help="accepted for the reference's launcher")
    p.add_argument("--log-file", "--log_file", "--output-file", "--output_file", dest="output_file", default="auto",
                   help="log file, appended (auto: named from the model and configuration as the reference does)")
    flag(p, "--json-file", default=None, help="JSON record (one line per run; default: the log's name, .jsonl)")
    flag(p, "--verbose", type=int, default=2, choices=[0, 1, 2])
    flag(p, "--num-nodes", type=int, default=1)
    flag(p, "--num-gpus-per-node", type=int, default=1,
         help="ranks on this node; more than 1 starts torchrun (or run under torchrun yourself)")
    add_run_flags(p, reference_defaults=True)
    add_workload_flags(p)
    p.set_defaults(func=cmd_bench)


def add_workload_flags(p) -> None:
    """The job-level benchmark (bench/workload.py); --batch-size is then the number of slots."""
    g = p.add_argument_group("a job through the continuous batcher (--workload)")
    flag(g, "--workload", default=None, help="'synthetic' or a JSONL file ('prompt' or 'input_len', and 'output_len' "
                                             "per line): requests of their own lengths instead of the fixed batch")
    flag(g, "--num-requests", type=int, default=256, help="synthetic workload: requests")
    flag(g, "--input-len", default="32:512", help="synthetic workload: prompt tokens, MIN:MAX (uniform)")
    flag(g, "--output-len", default="8:256", help="synthetic workload: new tokens, MIN:MAX (uniform)")
    flag(g, "--workload-seed", type=int, default=0)
    flag(g, "--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per pass, at most")
    flag(g, "--admission", choices=("longest", "fifo"), default="longest",
         help="order waiting requests start in: longest output first (what jobs do), or arrival (what serve does)")
    flag(g, "--compare-static", action="store_true", help="also run the workload as static batches")
    flag(g, "--static-only", action="store_true", help="run the workload as static batches only")
    flag(g, "--static-part", default="1/1", help="K/N: only the K-th of N runs of consecutive static batches "
                                                 "(a long job over several processes; their records add up)")


def cmd_bench(args) -> int:
    from .. import distributed
    from .run import Workload, run_generation
    workload = Workload(args.batch_size, args.prompt_len, args.gen_len, args.loops, args.num_nodes,
                        args.num_gpus_per_node, args.output_file, args.json_file, args.verbose)
    workload.check()  # refused here, before torchrun starts ranks that would each refuse it
    if args.workload:
        check_workload_flags(args)
    config = config_from_args(args).validate()
    if args.num_nodes * args.num_gpus_per_node > 1 and args.num_nodes == 1 and not distributed.launched():
        if args.workload and (args.compare_static or args.static_only):
            from ..errors import OffloadgenError
            raise OffloadgenError("static batches run in one process: drop --compare-static / --static-only with "
                                  "--num-gpus-per-node, or run them with --static-part K/N in separate processes")
        return distributed.relaunch(args.argv, args.num_gpus_per_node)
    if args.workload:
        from .workload import cmd_workload
        cmd_workload(args)
        return 0
    run_generation(config, workload)
    return 0


def check_workload_flags(args) -> None:
    """Refused before loading, naming the flag (the batcher's own check names max_prompt_len, and no
    requests at all ended in a traceback)."""
    from ..errors import OffloadgenError
    for name in ("num_requests", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise OffloadgenError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.compare_static and args.static_only:
        raise OffloadgenError("--compare-static runs both ways and --static-only static batches alone: pick one")
