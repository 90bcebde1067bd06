"""torchrun for `--num-gpus-per-node N` (distributed.relaunch), with a stop that is no failure.

Plain torchrun takes SIGTERM/SIGINT as its own death: it raises SignalException, prints its
traceback, sends every rank the signal, kills them 30 s later (cutting a server's grace period
short) and exits 1 whatever the ranks did. Here torchrun's agent is told not to handle the two
(`--signals-to-handle`); this process passes them to rank 0 instead, which stops as one process
does (a server drains and tells the other ranks to stop; a job stops admitting on every rank,
ranks.py), and torchrun waits for the ranks as for any run; a second signal kills every rank. A
run whose rank 0 has no stop of its own (bench, prompts on the command line, a rank still loading:
it does not catch SIGTERM) is ended rank by rank at once with SIGTERM, as one process would be.
The exit status is then the ranks':
0 for a server stopped on purpose, 128 + the signal for a job cut short or a rank the signal
ended (as one process exits), and nothing but the ranks' own lines is printed. An error that
rank 0 has said in its one line (exit status 2: bad input that every rank finds once they plan)
exits 2 as one process does, without torchrun's report or its line about stopping the other
ranks; any other failure that no signal asked for is reported by torchrun as before.

    python -m offloadgen.launcher TORCHRUN_ARGS...  (what distributed.relaunch runs)
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAID = 2  # the exit status of a rank that printed `offloadgen: error: ...` (cli.main; rank 0 prints it)
# torchrun's default less ours: a hang-up or SIGQUIT still ends the agent and its ranks at once
AGENT_SIGNALS = "SIGHUP,SIGQUIT"


def children_of(parent: int) -> list[int]:
    """parent's child processes: from /proc/PID/task/TID/children where the kernel has it, else
    from every process's parent in /proc/PID/stat (kernels and sandboxes without the first)."""
    try:
        return [int(c) for task in Path(f"/proc/{parent}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except OSError:
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # pid (comm) state ppid ...: the comm may hold spaces and parentheses
                ppid = int(entry.joinpath("stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            if ppid == parent:
                found.append(int(entry.name))
    return found


def rank_pids(parent: int) -> dict[int, int]:
    """{local rank: process} of the ranks among parent's children (torchrun starts them itself)."""
    found = {}
    for child in children_of(parent):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:  # it has just exited
            continue
        rank = [v for v in env if v.startswith(b"LOCAL_RANK=")]
        if rank:
            found[int(rank[0].split(b"=")[1])] = child
    return found


class HeldClosingLines(logging.Filter):
    """Holds torchrun's 'Sending process N closing signal SIGTERM' (the other ranks stopped once one
    has failed) and its 'failed (exitcode: 2) local_rank: N' of any rank (every rank finds the
    same bad input, and rank 0 says it; another may exit first) until the run's outcome is known: after rank
    0 has said its error in one line, the other ranks have nothing to add, and the lines are
    dropped; after any other failure they are let through (release), late."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.held = logger, []

    def filter(self, record: logging.LogRecord) -> bool:
        found_the_error = str(record.msg).startswith("failed (exitcode") and tuple(record.args or ())[:1] == (SAID,)
        if str(record.msg).startswith("Sending process") or found_the_error:
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.held:
            self.logger.callHandlers(record)  # past this filter, to where torchrun's lines go
        self.held.clear()


def catches_sigterm(pid: int) -> bool:
    """Whether a rank catches SIGTERM: a server's or a job's rank 0 does, and stops every rank itself
    (serve/ranked.py, ranks.py). A bench, prompts from the command line or a rank still loading
    would die of the signal alone, and the other ranks' next collective would fail loudly."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has just exited
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def agent_leaves_stop_signals() -> bool:
    """Whether this torch's torchrun takes --signals-to-handle (newer releases); an older one is
    run as it is, with its own handling of a stop and its traceback."""
    from torch.distributed.run import get_args_parser
    return any("--signals-to-handle" in action.option_strings for action in get_args_parser()._actions)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if not agent_leaves_stop_signals():
        torchrun(argv)
        return 0

    stopped: list[int] = []
    ended: list[int] = []  # the signals on which this process ended every rank itself

    def stop(signum, frame):
        stopped.append(signum)
        # the stop is asked for: torchrun's lines about ranks that exit with its signal are noise
        logging.disable(logging.CRITICAL)
        ranks = rank_pids(os.getpid())
        if 0 not in ranks:  # no rank started yet: nothing to finish; the agent stops as torchrun does
            raise SignalException(f"stopped by {signal.Signals(signum).name}", signal.Signals(signum))
        # The first to rank 0, where it stops every rank. A second ends one process at once; here
        # every rank must end at once (one alone would leave the others' collectives to fail
        # loudly, and a rank that has not had the first would take this one as a first). A run
        # with no stop of its own ends as one process does, every rank at once, by SIGTERM.
        if len(stopped) == 1 and catches_sigterm(ranks[0]):
            targets = [(ranks[0], signum)]
        else:
            ended.append(signum)
            # (a rank that catches SIGTERM without rank 0, say one following a server still
            # loading, would wait for rank 0 and fail loudly when it is gone: killed instead)
            targets = [(p, signal.SIGKILL if len(stopped) > 1 or catches_sigterm(p) else signal.SIGTERM)
                       for p in ranks.values()]
        for pid, sig in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # it has just exited; torchrun will see how
                pass

    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    closing = HeldClosingLines(agent_log)
    agent_log.addFilter(closing)
    try:
        torchrun(["--signals-to-handle", AGENT_SIGNALS, *argv])
        return 0
    except SignalException as e:
        if not stopped:  # SIGHUP or SIGQUIT: torchrun's own way
            closing.release()
            raise
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if not stopped and getattr(e.failures.get(0), "exitcode", None) == SAID:
            return SAID
        if not stopped:  # (when a stop was asked, torchrun's lines are off: logging.disable in stop)
            closing.release()
            raise
        if ended:  # the ranks were ended here: the user asked twice, or they have no stop of their own
            if ended[0] == signal.SIGINT and len(stopped) == 1:
                print("offloadgen: interrupted", file=sys.stderr)  # as cli.main says it
            return 128 + ended[-1]
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # a rank a signal ended: as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
