"""serve across ranks, in one process: the shared queue of waiting requests (SharedQueue), the
deal every rank makes alike (apply_order), and rank 0's worker (RankedWorker) beside another
rank's loop (follow) with the ranks as threads, whose exchange (distributed.gather) is a barrier
that hands every rank a copy of what each gave, as gloo's pickling does. The loops, the deal and
the batchers are the real ones; only the transport is not (tests/test_ranks.py runs torchrun)."""
import asyncio
import pickle
import threading
import time

import pytest
import torch

from offloadgen import distributed
from offloadgen.distributed import World
from offloadgen.ranks import request_cost
from offloadgen.sampling import SamplingParams
from offloadgen.scheduler import ContinuousBatcher
from offloadgen.serve import ranked
from offloadgen.serve.ranked import Order, RankedWorker, Report, SharedQueue, apply_order, follow

from conftest import V
from test_scheduler import alone, engine_for

MAX_LEN, CHUNK = 48, 8


def item(key, n_prompt, max_new):
    return (key, list(range(3, 3 + n_prompt)), SamplingParams(max_new_tokens=max_new))


def report(free, work):
    return Report(free=free, work=work)


# --- the shared queue ---------------------------------------------------------------------------
def test_fifo_keeps_arrival_order_and_longest_puts_the_most_new_tokens_first_stably():
    new = [item("a", 4, 3), item("b", 4, 9), item("c", 4, 3), item("d", 40, 30), item("e", 4, 9)]
    fifo, longest = SharedQueue("fifo", MAX_LEN, CHUNK), SharedQueue("longest", MAX_LEN, CHUNK)
    fifo.add(new[:2]), fifo.add(new[2:])
    longest.add(new[:2]), longest.add(new[2:])
    assert [k for k, *_ in fifo.waiting] == ["a", "b", "c", "d", "e"]
    # d asks 30 but its slot holds 8 more tokens: it counts as 8; b before e, a before c (stable)
    assert [k for k, *_ in longest.waiting] == ["b", "e", "d", "a", "c"]


def test_drop_removes_only_the_keys_given_and_ignores_unknown_ones():
    q = SharedQueue("fifo", MAX_LEN, CHUNK)
    q.add([item(k, 4, 3) for k in "abcd"])
    q.drop(["b", "d", "zz"])
    assert [k for k, *_ in q.waiting] == ["a", "c"]


def test_deal_fills_free_slots_by_least_work_then_more_free_then_lower_rank():
    q = SharedQueue("fifo", MAX_LEN, CHUNK)
    q.add([item(k, 4, 10) for k in "abcdefg"])  # each costs 1 prefill pass + 10 tokens
    cost = request_cost(4, 10, CHUNK)
    # rank 0: 1 free slot, 50 passes of work; rank 1: full; rank 2: 2 free, 5; rank 3: 2 free, 5
    dealt = q.deal([report(1, 50), report(0, 0), report(2, 5), report(2, 5)])
    assert [(r, k) for r, k, *_ in dealt] == [(2, "a"), (3, "b"), (2, "c"), (3, "d"), (0, "e")]
    assert 5 + 2 * cost < 50  # why rank 0 came last
    assert [k for k, *_ in q.waiting] == ["f", "g"]  # no free slot left: they wait
    assert q.deal([report(0, 0), report(0, 0)]) == [] and len(q.waiting) == 2


def test_every_rank_deals_alike_from_the_same_orders_and_reports():
    """The same orders and reports, applied in turn on two copies (as two ranks do), give the same
    deals and leave the same queue: a difference would hang the ranks or lose a request."""
    orders = [Order(new=[item("a", 4, 9), item("b", 20, 2), item("c", 4, 30)]),
              Order(new=[item("d", 1, 5)], cancel=["b"]),
              Order(new=[item("e", 4, 7), item("f", 4, 7)], cancel=["e", "a"]),
              Order()]
    reports = [[report(1, 0), report(1, 3)], [report(0, 12), report(1, 3)], [report(2, 8), report(1, 8)],
               [report(3, 0), report(3, 0)]]
    for admission in ("fifo", "longest"):
        copies = [SharedQueue(admission, MAX_LEN, CHUNK) for _ in range(2)]
        for order, seen in zip(orders, reports):
            order, seen = pickle.loads(pickle.dumps((order, seen)))  # what each rank gets over gloo
            deals = []
            for q in copies:
                q.add(order.new), q.drop(order.cancel)
                deals.append([(r, k) for r, k, *_ in q.deal(seen)])
            assert deals[0] == deals[1]
            assert [i[0] for i in copies[0].waiting] == [i[0] for i in copies[1].waiting]


@pytest.fixture(scope="module")
def engines(tiny):
    _, path = tiny("llama2-mha")
    return engine_for(path, micro_batch=None), engine_for(path, micro_batch=None)


def batchers(engines, slots, admission="fifo"):
    return [ContinuousBatcher(e, slots, MAX_LEN, CHUNK, admission=admission) for e in engines]


def test_apply_order_submits_on_each_rank_only_its_share_and_cancels_only_its_own(engines):
    bs = batchers(engines, 2)
    lives, queues = [{}, {}], [SharedQueue("fifo", MAX_LEN, CHUNK) for _ in bs]
    reports = [ranked.state(b) for b in bs]
    # c arrives and is cancelled before any exchange: never dealt
    order = Order(new=[item("a", 4, 9), item("b", 4, 9), item("c", 4, 9), item("d", 4, 9), item("e", 4, 9)],
                  cancel=["c"])
    deals = [apply_order(b, order, rank, lives[rank], queues[rank], reports) for rank, b in enumerate(bs)]
    assert deals[0] == deals[1]
    assert sorted(lives[0]) + sorted(lives[1]) == ["a", "d", "b", "e"]  # 2 slots each, by least work
    assert [k for k, *_ in queues[0].waiting] == []
    for b in bs:
        b.step()
    reports = [ranked.state(b) for b in bs]
    assert [r.free for r in reports] == [0, 0] and all(r.work > 0 for r in reports)
    # b is rank 1's: only rank 1 cancels it; the freed slot shows at the next exchange
    order = Order(new=[item("f", 4, 9)], cancel=["b"])
    for rank, b in enumerate(bs):
        assert apply_order(b, order, rank, lives[rank], queues[rank], reports) == []
    outputs = [b.step() for b in bs]
    assert outputs[0] and not any(o.finished for o in outputs[0])
    assert [(o.request.id, o.finish_reason) for o in outputs[1] if o.finished] == [("b", "cancelled")]
    reports = [ranked.state(b) for b in bs]
    assert [r.free for r in reports] == [0, 1]
    deals = [apply_order(b, Order(), rank, lives[rank], queues[rank], reports) for rank, b in enumerate(bs)]
    assert [(r, k) for r, k, *_ in deals[0]] == [(1, "f")] and deals[0] == deals[1]


def test_outstanding_passes_counts_prefill_chunks_and_tokens_left_of_rows_and_waiting(engines):
    b = ContinuousBatcher(engines[0], 1, MAX_LEN, CHUNK)
    assert b.outstanding_passes() == 0
    b.submit(list(range(3, 23)), SamplingParams(max_new_tokens=5))  # 20 tokens: 3 chunks of 8
    b.submit([3, 4], SamplingParams(max_new_tokens=100))  # its slot holds 46 more
    assert b.outstanding_passes() == (3 + 5) + (1 + 46)
    b.step()
    assert b.outstanding_passes() == (2 + 5) + (1 + 46)
    b.step(), b.step()  # the prompt is in, and its first token out
    assert b.outstanding_passes() == 4 + (1 + 46)


# --- rank 0's worker and another rank's loop, as threads ------------------------------------------
class ThreadExchange:
    """distributed.gather between threads: waits for every rank, returns copies of every object."""

    def __init__(self, ranks: int):
        self.barrier = threading.Barrier(ranks, timeout=90)
        self.objs = [None] * ranks
        self.calls = [0] * ranks  # exchanges each rank has made

    def __call__(self, obj, world, group=None):
        self.objs[world.rank] = obj
        self.barrier.wait()
        out = pickle.loads(pickle.dumps(self.objs))
        self.calls[world.rank] += 1
        self.barrier.wait()
        return out


def serve_on_threads(monkeypatch, bs, requests, during=None, heartbeat=20.0, max_queue=16):
    """Rank 0's RankedWorker over bs[0], with the HTTP side's requests submitted before it starts,
    and follow() over bs[1] on this thread. during(worker, handles): a coroutine run beside.
    Returns ({key: (tokens, finish reason, error)}, seconds until all were answered, records),
    records: (exchange, rank, key) of every request a rank's batcher was given."""
    exchange, records = ThreadExchange(2), []
    monkeypatch.setattr(distributed, "gather", exchange)
    monkeypatch.setattr(ranked, "HEARTBEAT_S", heartbeat)
    gave_up = []
    for rank, b in enumerate(bs):
        def submit(ids, sampling, request_id=None, rank=rank, real=b.submit):
            records.append((exchange.calls[rank], rank, request_id))
            return real(ids, sampling, request_id=request_id)
        b.submit = submit
    worker = RankedWorker(bs[0], bs[0].slots, max_queue, World(0, 2))
    worker._give_up = gave_up.append  # an exchange that failed: no SIGTERM to pytest
    result = {}

    async def answer(handle):
        tokens = []
        while True:
            e = await asyncio.wait_for(handle.queue.get(), 60)
            tokens += e.new_ids
            if e.finished:
                return tokens, e.finish_reason, e.error

    async def http_side():
        handles = [worker.submit(ids, sampling) for ids, sampling in requests]
        t0 = time.perf_counter()
        worker.start()
        beside = asyncio.ensure_future(during(worker, handles)) if during else None
        answers = await asyncio.gather(*(answer(h) for h in handles))
        result["seconds"] = time.perf_counter() - t0
        if beside is not None:
            await beside
        result["answers"] = {h.key: a for h, a in zip(handles, answers)}

    def run():
        try:
            asyncio.run(http_side())
        finally:
            worker.stop()  # says stop at the next exchange: follow returns

    t = threading.Thread(target=run)
    t.start()
    follow(bs[1], World(1, 2))
    t.join(60)
    assert not gave_up and "answers" in result
    return result["answers"], result["seconds"], records


def check_alone(engine, requests, answers):
    for (ids, sampling), (key, (tokens, reason, error)) in zip(requests, answers.items()):
        assert error is None and reason == "length", key
        assert tokens == list(alone(engine, ids, sampling))[:sampling.max_new_tokens], key


def prompt(n, seed):
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_requests_still_waiting_keep_the_ranks_going_when_every_slot_emptied_in_one_pass(engines, monkeypatch):
    """Six one-token requests on two ranks of one slot: each pass ends every row, so no rank
    reports work left, but four requests still wait in the shared queue: they must be dealt at
    the next exchange, not after rank 0's idle sleep (HEARTBEAT_S, 20 s here)."""
    requests = [(prompt(3 + i, i), SamplingParams(max_new_tokens=1)) for i in range(6)]
    answers, seconds, records = serve_on_threads(monkeypatch, batchers(engines, 1), requests)
    check_alone(engines[0], requests, answers)
    assert seconds < 15, f"the waiting requests sat out rank 0's idle sleep: {seconds:.1f} s"
    assert sorted(k for *_, k in records) == sorted(answers) and len(records) == 6  # each dealt once


@pytest.mark.parametrize("admission", ["fifo", "longest"])
def test_admission_orders_the_shared_queue_for_every_ranks_slots(engines, monkeypatch, admission):
    """Two ranks of one slot, six requests waiting at once: fifo deals them in arrival order,
    longest the most new tokens first, whichever rank's slot frees; every answer as alone."""
    lengths = [2, 9, 3, 7, 5, 4]
    requests = [(prompt(4, i), SamplingParams(max_new_tokens=n)) for i, n in enumerate(lengths)]
    answers, _, records = serve_on_threads(monkeypatch, batchers(engines, 1, admission), requests)
    check_alone(engines[0], requests, answers)
    keys = list(answers)
    dealt = sorted(records)  # by exchange: the order requests took a slot, on either rank
    assert sorted(k for *_, k in dealt) == sorted(keys)
    rank_of = {k: k_rank for _, k_rank, k in records}
    assert {rank_of[k] for k in keys} == {0, 1}  # both ranks' slots were used
    want = sorted(keys, key=lambda k: -lengths[keys.index(k)]) if admission == "longest" else keys
    exchanges = {k: x for x, _, k in records}
    # a request with a later place in the order never got a slot at an earlier exchange
    for a, b in zip(want, want[1:]):
        assert exchanges[a] <= exchanges[b], (admission, a, b, records)
    if admission == "longest":  # and the order differs from fifo's: the 2-token one waited
        assert exchanges[keys[0]] > exchanges[keys[1]]


def test_a_waiting_request_cancelled_is_never_dealt_and_one_cancelled_on_its_rank_frees_the_slot(engines,
                                                                                                  monkeypatch):
    """c is cancelled while it waits in the shared queue, a while it runs on rank 0: c reaches no
    rank, a's slot goes to d; /metrics counts the waiting ones in the shared queue."""
    requests = [(prompt(4, i), SamplingParams(max_new_tokens=n)) for i, n in enumerate([40, 40, 5, 5])]
    seen = {}

    async def during(worker, handles):
        a, b, c, d = handles
        await asyncio.sleep(0)
        while worker.batcher_stats()["active_slots"] < 2:  # a and b hold both ranks' slot
            await asyncio.sleep(0.01)
        seen.update(worker.batcher_stats())
        worker.cancel(c)
        worker.cancel(a)
        a.queue.put_nowait(ranked.Event([], True, "cancelled"))  # as the app ends a cancelled stream
        c.queue.put_nowait(ranked.Event([], True, "cancelled"))

    answers, _, records = serve_on_threads(monkeypatch, batchers(engines, 1), requests, during)
    keys = list(answers)
    assert seen["queue_length"] == 2 and seen["active_slots"] == 2
    assert keys[2] not in {k for *_, k in records}
    assert answers[keys[0]][1] == "cancelled" and len(answers[keys[0]][0]) < 40
    check_alone(engines[0], [requests[1], requests[3]], {k: answers[k] for k in (keys[1], keys[3])})


@pytest.mark.parametrize("grace", [60.0, 0.0])
def test_a_drain_answers_the_shared_queue_or_cancels_it_with_an_error_and_never_hangs(engines, monkeypatch, grace):
    """SIGTERM's drain while requests still wait in the shared queue: within the grace period every
    one is answered in full; when it ends at once every one gets an error; either way the ranks
    stop."""
    requests = [(prompt(4, i), SamplingParams(max_new_tokens=20)) for i in range(5)]

    async def during(worker, handles):
        worker.begin_drain(grace)

    answers, _, records = serve_on_threads(monkeypatch, batchers(engines, 1), requests, during)
    if grace:
        check_alone(engines[0], requests, answers)
    else:
        for tokens, reason, error in answers.values():
            assert reason == "cancelled" and "shutting down" in error


def test_metrics_count_requests_that_arrived_since_the_last_exchange_as_waiting(engines):
    """Between two exchanges (a pass may take seconds) new requests wait in rank 0's next Order:
    /metrics' queue_length counts them, as one process counts a request the moment it comes,
    and not those cancelled meanwhile."""
    worker = RankedWorker(batchers(engines, 1)[0], 1, 16, World(0, 2))

    async def arrive():
        handles = [worker.submit(prompt(4, i), SamplingParams(max_new_tokens=3)) for i in range(5)]
        assert worker.batcher_stats()["queue_length"] == 5
        worker.cancel(handles[2])
        assert worker.batcher_stats()["queue_length"] == 4
    asyncio.run(arrive())


# --- --admission on one process -------------------------------------------------------------------
def test_serve_admission_flag_reaches_the_batcher_and_orders_one_process_too(engines):
    """`serve --admission longest` makes the batcher every rank builds (cli._batcher) longest-first;
    on one process (the plain Worker) a slot that frees then goes to the most new tokens, where
    fifo gives it to the first come: the answers end in another order."""
    from offloadgen.cli import build_parser
    from offloadgen.serve.cli import _batcher
    from offloadgen.serve.worker import Worker
    lengths = [2, 9, 3, 7]
    finished = {}
    for admission in ("fifo", "longest"):
        flag = ["--admission", admission] if admission != "fifo" else []  # fifo: the default
        args = build_parser().parse_args(["serve", "m", "--slots", "1", "--max-seq-len", str(MAX_LEN),
                                          "--prefill-chunk", str(CHUNK), *flag])
        batcher = _batcher(engines[0], args)
        assert batcher.admission == admission
        worker, order = Worker(batcher, 1, 16), []

        async def answer(handle, n):
            while not (await asyncio.wait_for(handle.queue.get(), 60)).finished:
                pass
            order.append(n)

        async def serve():
            # submitted before the worker runs: all wait together for the one slot
            handles = [worker.submit(prompt(4, i), SamplingParams(max_new_tokens=n)) for i, n in enumerate(lengths)]
            worker.start()
            await asyncio.gather(*(answer(h, n) for h, n in zip(handles, lengths)))
        try:
            asyncio.run(serve())
        finally:
            worker.stop()
        finished[admission] = order
    assert finished == {"fifo": [2, 9, 3, 7], "longest": [9, 7, 3, 2]}


def test_a_pass_failing_on_rank_1_ends_its_request_with_the_error_and_the_shared_queue_goes_on(engines,
                                                                                                 monkeypatch):
    """Rank 1's first pass raises while it holds the second request: that one is answered with
    the error; the slot it frees (at its next pass) takes its turn again, so the three still
    waiting in the shared queue are answered as alone, none lost, none twice."""
    requests = [(prompt(4, i), SamplingParams(max_new_tokens=5)) for i in range(5)]
    bs = batchers(engines, 1)
    step, failed = bs[1].step, []

    def failing():
        if not failed and bs[1].has_work():
            failed.append(True)
            raise RuntimeError("injected failure")
        return step()
    bs[1].step = failing
    answers, _, records = serve_on_threads(monkeypatch, bs, requests)
    keys = list(answers)
    tokens, reason, error = answers[keys[1]]
    assert reason == "cancelled" and error == "generation failed on rank 1: RuntimeError: injected failure"
    rest = [i for i in range(5) if i != 1]
    check_alone(engines[0], [requests[i] for i in rest], {keys[i]: answers[keys[i]] for i in rest})
    assert sorted(k for *_, k in records) == sorted(keys)  # each dealt once
    assert {r for _, r, k in records if k != keys[1]} == {0, 1}  # rank 1 served again after


def test_the_queue_limit_counts_every_ranks_slots_then_max_queue_then_answers_429(engines):
    """Two ranks of one slot and --max-queue 2: four requests may be in the server (two running,
    two in the shared queue); the fifth is refused (the app's 429); a cancel makes room again."""
    from offloadgen.serve.worker import QueueFull
    worker = RankedWorker(batchers(engines, 1)[0], 1, 2, World(0, 2))

    async def arrive():
        handles = [worker.submit(prompt(4, i), SamplingParams(max_new_tokens=3)) for i in range(4)]
        with pytest.raises(QueueFull):
            worker.submit(prompt(4, 9), SamplingParams(max_new_tokens=3))
        worker.cancel(handles[0])
        worker.submit(prompt(4, 9), SamplingParams(max_new_tokens=3))
    asyncio.run(arrive())


# --- where a rank's time went -----------------------------------------------------------------------
def test_the_lockstep_clock_counts_the_passes_run_and_says_them_in_one_line(engines, capsys):
    """run_in_lockstep (one process here: each exchange is with itself) returns its clock: one pass
    per step run, their time, and the line each rank prints at the end."""
    import re

    from offloadgen.ranks import run_in_lockstep
    b = ContinuousBatcher(engines[0], 2, MAX_LEN, CHUNK)
    for i, n in enumerate([3, 6]):
        b.submit(prompt(4, i), SamplingParams(max_new_tokens=n))
    result = run_in_lockstep(b, World())
    clock = result["clock"]
    assert result["passes"] == clock.passes == b.stats.passes == 6 and clock.pass_s > 0
    clock.say(3)
    line = capsys.readouterr().err
    m = re.fullmatch(r"offloadgen: rank 3: 6 passes of (\S+) s, (\S+) s in passes, (\S+) s at the exchanges, "
                     r"(\S+) s of CPU\n", line)
    assert m and abs(float(m[1]) - clock.pass_s / 6) < 1e-3, line
