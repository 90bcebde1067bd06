"""How much a busy HTTP thread in the same process slows a loop of short PyTorch calls: the
question behind a server rank whose pass is slower than its job's (benchmarks/RESULTS.md, session
14). No model, no GPU: a "pass" is 48 layers of 40 short torch calls (each releases and takes back
Python's GIL, as a kernel launch does) and a 1 ms wait with the GIL released (as a stream wait),
and the "HTTP side" is an asyncio thread that, for each of 32 events a pass, spins for the given
microseconds of JSON work and writes a server-sent event to a socket. Prints the mean pass alone
and beside the HTTP side; if the GIL only made the pass wait for the HTTP side's own work, the
difference is that work.

    OMP_NUM_THREADS=1 python benchmarks/gil_contention.py [--work-us 100,300] [--passes 40]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import torch

LAYERS, CALLS, EVENTS = 48, 40, 32


def one_pass(x: torch.Tensor) -> None:
    for _ in range(LAYERS):
        for _ in range(CALLS):
            torch.add(x, 1)
        time.sleep(0.001)


def mean_pass(passes: int, work_us: int | None) -> float:
    """Mean seconds of a pass (the first five left out), beside an HTTP side doing work_us a
    request-event, or alone (None)."""
    x, times = torch.ones(4), []
    loop = asyncio.new_event_loop()
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    threading.Thread(target=lambda: [reader.recv(1 << 20) for _ in iter(int, 1)], daemon=True).start()
    events: asyncio.Queue = asyncio.Queue()

    async def stream():
        while True:
            await events.get()
            t = time.perf_counter()
            while time.perf_counter() - t < work_us * 1e-6:
                json.dumps({"id": "cmpl", "choices": [{"text": " tok", "index": 0, "finish_reason": None}]})
            writer.send(b"data: {}\n\n")

    def http_side():
        asyncio.set_event_loop(loop)
        for _ in range(EVENTS):
            loop.create_task(stream())
        loop.run_forever()

    if work_us is not None:
        threading.Thread(target=http_side, daemon=True).start()
    for _ in range(passes):
        t = time.perf_counter()
        one_pass(x)
        times.append(time.perf_counter() - t)
        if work_us is not None:
            for i in range(EVENTS):
                loop.call_soon_threadsafe(events.put_nowait, i)
    return sum(times[5:]) / len(times[5:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-us", default="100,300", help="microseconds of HTTP work per event, comma-separated")
    p.add_argument("--passes", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)
    alone = mean_pass(args.passes, None)
    print(f"{'HTTP work a pass':>17} {'pass alone':>11} {'pass beside it':>15} {'difference':>11}")
    for us in (int(u) for u in args.work_us.split(",")):
        beside = mean_pass(args.passes, us)
        print(f"{us * EVENTS / 1000:14.1f} ms {alone * 1000:8.1f} ms {beside * 1000:12.1f} ms "
              f"{(beside - alone) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
