"""torchrun for `--num-gpus-per-node N` (distributed.relaunch), with a stop that is no failure.

Plain torchrun takes SIGTERM/SIGINT as its own death: it raises SignalException, prints its
traceback, sends every rank the signal, kills them 30 s later (cutting a server's grace period
short) and exits 1 whatever the ranks did. Here torchrun's agent is told not to handle the two
(`--signals-to-handle`); this process passes them to rank 0 instead, which stops as one process
does (a server drains and tells the other ranks to stop; a job stops admitting on every rank,
ranks.py), and torchrun waits for the ranks as for any run. The exit status is then the ranks':
0 for a server stopped on purpose, 128 + the signal for a job cut short or a rank the signal
ended (as one process exits), and nothing but the ranks' own lines is printed. A failure that no
signal asked for is reported by torchrun as before.

    python -m offloadgen.launcher TORCHRUN_ARGS...  (what distributed.relaunch runs)
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# torchrun's default less ours: a hang-up or SIGQUIT still ends the agent and its ranks at once
AGENT_SIGNALS = "SIGHUP,SIGQUIT"


def rank_0_pid(parent: int) -> int | None:
    """The process of local rank 0 among parent's children (torchrun starts the ranks itself)."""
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:  # it has just exited
                continue
            if b"LOCAL_RANK=0" in env:
                return int(child)
    return None


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    stopped: list[int] = []

    def stop(signum, frame):
        stopped.append(signum)
        # the stop is asked for: torchrun's lines about ranks that exit with its signal are noise
        logging.disable(logging.CRITICAL)
        pid = rank_0_pid(os.getpid())
        if pid is None:  # no rank started yet: nothing to finish; the agent stops as torchrun does
            raise SignalException(f"stopped by {signal.Signals(signum).name}", signal.Signals(signum))
        os.kill(pid, signum)

    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    try:
        torchrun(["--signals-to-handle", AGENT_SIGNALS, *argv])
        return 0
    except SignalException as e:
        if not stopped:  # SIGHUP or SIGQUIT: torchrun's own way
            raise
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if not stopped:
            raise
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # a rank a signal ended: as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
