"""`offloadgen serve`: load a model once, start the continuous batcher, and answer the OpenAI API."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

from ..errors import OffloadgenError
from ..flags import add_model_flags, add_run_flags, config_from_args


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the continuous batcher",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. "
                                   "Every request joins the running batch at the next pass over the weights.")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", "--batch-size", dest="slots", type=int, default=16,
                   help="sequence slots: requests generated together in each pass (default 16)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + max_tokens of a request (default: the model's context, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it the server answers 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens prefilled per pass (default 512)")
    p.add_argument("--admission", choices=("fifo", "longest"), default="fifo",
                   help="which waiting request takes a free slot: fifo, first come first served (default), or "
                        "longest, the largest max_tokens first: a burst of requests ends on full slots, as a "
                        "job's does, but a long request overtakes short ones that wait. See docs/serve.md")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $OFFLOADGEN_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: from MODEL)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds SIGTERM leaves in-flight requests to finish before cancelling them (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--num-gpus-per-node", type=int, default=1,
                   help="ranks on this node, each with --slots slots of its own; rank 0 alone listens and deals "
                        "requests to them. More than 1 starts torchrun (or run under torchrun yourself). "
                        "See docs/serve.md")
    add_run_flags(p)
    p.set_defaults(func=cmd_serve)


def _model_name(args) -> str:
    """--served-model-name, else MODEL's folder name, .gguf stem or preset name."""
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        from ..checkpoint import embedded_default_gguf
        return embedded_default_gguf().stem  # present: open_checkpoint found it
    path = Path(args.model)
    return path.stem if path.suffix == ".gguf" else path.name


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model: a port in use is found in a second, not after minutes of loading."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)  # connections made from now on wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise OffloadgenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _check_extras() -> None:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise OffloadgenError(f"offloadgen serve needs {', '.join(missing)}: pip install 'offloadgen[serve]'")


def _bus_bandwidth(config, world) -> float | None:
    """Host-to-device bytes/s, measured before the model takes the GPU's memory (the probe needs
    a buffer of its own); None where no weights stream to a GPU."""
    from ..machine import h2d_bandwidth
    from ..runtime import resolve_device
    device = resolve_device(config, world)
    if not config.offloaded or device.type != "cuda":
        return None
    return h2d_bandwidth(device, nbytes=256 << 20)["best"]


def _bus_seconds_per_pass(llm, bandwidth: float | None) -> float | None:
    placement = llm.plan.placement
    if bandwidth is None or placement is None or not placement.streamed:
        return None
    return placement.streamed_bytes / bandwidth


def load_model(args):
    """The model as serve plans it (every slot at full length, prefills of one chunk), on this
    rank's device: (llm, world, measured bus bandwidth or None)."""
    from .. import distributed
    from ..api import load
    from ..checkpoint import open_checkpoint
    from ..runtime import resolve_device

    if args.slots < 1 or args.max_queue < 0:
        raise OffloadgenError("--slots must be at least 1 and --max-queue at least 0")
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)
    max_len = _max_len(args, checkpoint.cfg)
    config = config_from_args(args, max_batch_size=args.slots, max_seq_len=max_len,
                              max_prompt_len=min(args.prefill_chunk or 512, max_len)).validate()
    world = distributed.init(resolve_device(config).type)
    bandwidth = _bus_bandwidth(config, world) if world.is_main else None
    return load(config=config, checkpoint=checkpoint, world=world), world, bandwidth


def _max_len(args, cfg) -> int:
    return min(args.max_seq_len or 4096, cfg.max_position)


def _batcher(llm, args):
    """The server's batcher, warmed up (ContinuousBatcher.warm_up) before any client comes."""
    from ..scheduler import ContinuousBatcher
    batcher = ContinuousBatcher(llm, slots=args.slots, max_len=_max_len(args, llm.cfg),
                                prefill_chunk=args.prefill_chunk or 512, admission=args.admission)
    t0 = time.perf_counter()
    passes = batcher.warm_up()
    if os.environ.get("RANK", "0") == "0":
        print(f"offloadgen: warmed up in {time.perf_counter() - t0:.1f} s ({passes} passes)", file=sys.stderr, flush=True)
    return batcher


def build_context(args, llm, world=None, bandwidth: float | None = None, group=None):
    """Rank 0's batcher, worker and HTTP app context (a RankedWorker where slots are on several ranks)."""
    from .app import ServeContext
    from .metrics import ServeMetrics
    from .ranked import RankedWorker
    from .worker import Worker

    batcher = _batcher(llm, args)
    ranks = world.size if world is not None else 1
    metrics = ServeMetrics(args.slots * ranks, _bus_seconds_per_pass(llm, bandwidth))
    worker = RankedWorker(batcher, args.slots, args.max_queue, world, metrics, group) if ranks > 1 \
        else Worker(batcher, args.slots, args.max_queue, metrics)
    return ServeContext(worker, llm.tokenizer, metrics, _model_name(args), batcher.max_len,
                        api_key=args.api_key or os.environ.get("OFFLOADGEN_API_KEY") or None,
                        shutdown_grace_s=args.shutdown_grace)


def run_server(app, ctx, sock: socket.socket, log_level: str = "info") -> int:
    """Serve until SIGTERM or SIGINT; then admit nothing new, give in-flight requests the grace
    period, cancel the rest, and return 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            ctx.worker.begin_drain(ctx.shutdown_grace_s)
            super().handle_exit(sig, frame)

    # uvicorn's own deadline comes after ours, so cancelled requests still get their error reply
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=ctx.shutdown_grace_s + 2)
    server = Server(config)
    # uvicorn re-raises the signal it caught once it has shut down, so that the process ends "as
    # the signal would"; a server stopped on purpose has done its job and exits 0 instead.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    cpu = time.thread_time()
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # beside the batcher thread's own figures: the HTTP side shares the process's GIL with it
    print(f"offloadgen: the HTTP side used {time.thread_time() - cpu:.1f} s of CPU", file=sys.stderr, flush=True)
    return 0 if server.started else 1


def cmd_serve(args) -> int:
    from .. import distributed
    _check_extras()
    if args.num_gpus_per_node < 1:
        raise OffloadgenError(f"--num-gpus-per-node must be at least 1; got {args.num_gpus_per_node}")
    if args.num_gpus_per_node > 1 and not distributed.launched():
        return distributed.relaunch(args.argv, args.num_gpus_per_node)
    # rank 0 alone listens (bound before loading: a port in use is found in a second)
    sock = _listen(args.host, args.port) if os.environ.get("RANK", "0") == "0" else None
    llm, world, bandwidth = load_model(args)
    return serve_loaded(args, llm, world, sock, bandwidth)


def serve_loaded(args, llm, world, sock: socket.socket | None, bandwidth: float | None = None) -> int:
    """Serve a loaded model: rank 0 runs the HTTP app (until SIGTERM/SIGINT), any other rank
    follows rank 0's passes (serve/ranked.py) until rank 0 says stop. Returns the exit code."""
    from .. import distributed
    from .app import create_app
    from .ranked import follow
    group = distributed.control_group(world)  # every rank makes it here, before any exchange
    with llm:
        if not world.is_main:
            follow(_batcher(llm, args), world, group)
            code = 0
        else:
            ctx = build_context(args, llm, world, bandwidth, group)
            _say_serving(args, ctx, sock, world)
            code = run_server(create_app(ctx), ctx, sock, args.log_level)
            code = 1 if getattr(ctx.worker, "failure", None) else code
    if world.active and code == 0:
        distributed.finish(world)
    return code


def _say_serving(args, ctx, sock: socket.socket, world) -> None:
    host, port = sock.getsockname()[:2]
    if not ctx.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"offloadgen: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    ranks = f" on each of {world.size} ranks" if world.size > 1 else ""
    print(f"offloadgen: serving '{ctx.model_name}' on http://{host}:{port}/v1 ({args.slots} slots{ranks}, "
          f"{ctx.max_len} tokens each, queue {ctx.worker.max_queue})", file=sys.stderr, flush=True)
