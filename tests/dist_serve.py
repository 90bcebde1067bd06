"""Run under torchrun by test_ranks.py: `serve` across ranks on a tiny checkpoint whose weights
stream from host memory (whole layers, or 1/N fetched and all-gathered every layer, which the CLI
offers on GPUs only), through serve.cli.serve_loaded as `offloadgen serve` runs it once loaded.

    torchrun --nproc-per-node N tests/dist_serve.py CHECKPOINT {whole|allgather} PORT [FAIL_PROMPT]

With FAIL_PROMPT, rank 1's first pass that holds that prompt raises (a stand-in for a pass that
runs out of memory or meets a bad kernel), so that the test sees how a failed pass is answered;
DIST_SERVE_FAIL_RANK=0 makes it rank 0's, DIST_SERVE_FAIL_INSIDE=1 makes the pass fail midway (at
its last layer, after the gathers of the layers before it) rather than as it starts.

DIST_SERVE_ARGS in the environment: more `serve` options (e.g. "--slots 1 --admission longest");
DIST_SERVE_HEARTBEAT: rank 0's idle sleep in seconds (serve.ranked.HEARTBEAT_S), made long so that
a request left waiting through it shows as a stall.

The tokenizer reads bytes and writes token ids as text ("17 301 5"), so that an answer's text is
exactly the tokens generated.
"""
import os
import sys

from dist_jobs import tiny_llm

from offloadgen import distributed
from offloadgen.cli import build_parser
from offloadgen.serve.cli import _listen, serve_loaded


def fail_once(prompt: str, world, rank: int = 1, inside: bool = False) -> None:
    """On `rank`, the first pass that holds `prompt` raises: as it starts (before any collective), or
    with `inside`, midway, at its last layer (after the all-gathers of the layers before it, as an
    out-of-memory in a layer's compute would)."""
    from offloadgen.offload.streaming import StreamingWeights
    from offloadgen.scheduler import ContinuousBatcher
    from offloadgen.tokenizer import ByteTokenizer
    if world.rank != rank:
        return
    step, get, ids, failed, armed = ContinuousBatcher.step, StreamingWeights.get, None, [], []

    def failing(self):
        nonlocal ids
        ids = ids or ByteTokenizer(self.engine.cfg).encode(prompt)
        held = [r for r in self.rows if r is not None] + list(self._waiting)
        if not failed and any(r.prompt_ids == ids for r in held):
            failed.append(True)
            if not inside:
                raise RuntimeError("injected failure")
            armed.append(self.engine.cfg.n_layers - 1)
        return step(self)

    def failing_get(self, block):
        if armed and armed[0] == block:  # the armed pass's last layer: once
            armed.clear()
            raise RuntimeError("injected failure")
        return get(self, block)
    ContinuousBatcher.step = failing
    StreamingWeights.get = failing_get


if __name__ == "__main__":
    path, mode, port = sys.argv[1:4]
    args = build_parser().parse_args(["serve", path, "--device", "cpu", "--port", port, "--slots", "6",
                                      "--max-seq-len", "256", "--served-model-name", "tiny", "--log-level", "warning",
                                      "--shutdown-grace", "30", *os.environ.get("DIST_SERVE_ARGS", "").split()])
    if "DIST_SERVE_HEARTBEAT" in os.environ:
        from offloadgen.serve import ranked
        ranked.HEARTBEAT_S = float(os.environ["DIST_SERVE_HEARTBEAT"])
    world = distributed.init("cpu")
    if len(sys.argv) > 4:
        fail_once(sys.argv[4], world, int(os.environ.get("DIST_SERVE_FAIL_RANK", "1")),
                  os.environ.get("DIST_SERVE_FAIL_INSIDE") == "1")
    sock = _listen(args.host, args.port) if world.is_main else None
    distributed.exit_process(serve_loaded(args, tiny_llm(path, mode, world), world, sock))
