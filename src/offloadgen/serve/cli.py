"""`offloadgen serve`: load a model once, start the continuous batcher, and answer the OpenAI API."""
from __future__ import annotations

import os
import signal
import socket
import sys
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
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $OFFLOADGEN_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: from MODEL)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds SIGTERM leaves in-flight requests to finish before cancelling them (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
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


def _bus_bandwidth(config) -> float | None:
    """Host-to-device bytes/s, measured before the model takes the GPU's memory (the probe needs
    a buffer of its own); None where no weights stream to a GPU."""
    from ..machine import h2d_bandwidth
    from ..runtime import resolve_device
    device = resolve_device(config)
    if not config.offloaded or device.type != "cuda":
        return None
    return h2d_bandwidth(device, nbytes=256 << 20)["best"]


def _bus_seconds_per_pass(llm, bandwidth: float | None) -> float | None:
    placement = llm.plan.placement
    if bandwidth is None or placement is None or not placement.streamed:
        return None
    return placement.streamed_bytes / bandwidth


def build_context(args):
    """Load the model and make the batcher, the worker and the HTTP app's context."""
    from ..api import load
    from ..checkpoint import open_checkpoint
    from ..scheduler import ContinuousBatcher
    from .app import ServeContext
    from .metrics import ServeMetrics
    from .worker import Worker

    if args.slots < 1 or args.max_queue < 0:
        raise OffloadgenError("--slots must be at least 1 and --max-queue at least 0")
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)
    max_len = min(args.max_seq_len or 4096, checkpoint.cfg.max_position)
    chunk = args.prefill_chunk or 512
    # the GPU memory is planned for every slot at full length, and prefills of one chunk
    config = config_from_args(args, max_batch_size=args.slots, max_seq_len=max_len,
                              max_prompt_len=min(chunk, max_len)).validate()
    bandwidth = _bus_bandwidth(config)
    llm = load(config=config, checkpoint=checkpoint)
    batcher = ContinuousBatcher(llm, slots=args.slots, max_len=max_len, prefill_chunk=chunk)
    metrics = ServeMetrics(args.slots, _bus_seconds_per_pass(llm, bandwidth))
    worker = Worker(batcher, args.slots, args.max_queue, metrics)
    ctx = ServeContext(worker, llm.tokenizer, metrics, _model_name(args), max_len,
                       api_key=args.api_key or os.environ.get("OFFLOADGEN_API_KEY") or None,
                       shutdown_grace_s=args.shutdown_grace)
    return ctx, llm


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
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if server.started else 1


def cmd_serve(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several ranks would need rank 0's requests and cancels sent to the others every pass
        # (ranks.py has the lockstep, not that); each would bind the same port.
        raise OffloadgenError(f"serve runs in one process, not under torchrun with {os.environ['WORLD_SIZE']} ranks: "
                              "start one server per GPU (CUDA_VISIBLE_DEVICES=i offloadgen serve --port 800i) behind "
                              "a load balancer, or run offline work as a job across GPUs (generate --input ... "
                              "--num-gpus-per-node N)")
    _check_extras()
    sock = _listen(args.host, args.port)
    ctx, llm = build_context(args)
    from .app import create_app
    host, port = sock.getsockname()[:2]
    if not ctx.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"offloadgen: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    print(f"offloadgen: serving '{ctx.model_name}' on http://{host}:{port}/v1 ({ctx.worker.slots} slots, "
          f"{ctx.max_len} tokens each, queue {ctx.worker.max_queue})", file=sys.stderr, flush=True)
    with llm:
        return run_server(create_app(ctx), ctx, sock, args.log_level)
