"""--kv-overlap's two lanes against one thread (KVOffload(overlap=False)): tokens and logits equal
for several CPU-attended micro-batches a layer, ragged prompts, a GQA model, a 4-bit cache, an MoE
model, and under the continuous batcher (decode parts beside prompt chunks); errors in one lane
while the other runs; an interrupt while the engine waits for the lanes. On the CPU only the
threads run (see test_cpu_side's fixture): what can go wrong in them is what these look for."""
import signal
import threading
import time

import pytest
import torch

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload import ResidentWeights, cpu_side
from offloadgen.offload.kv_cache import KVOffload, OffloadedKVCache
from offloadgen.sampling import SamplingParams
from offloadgen.scheduler import ContinuousBatcher

from test_cpu_side import _cpu_side_anywhere
from test_parity import ragged_batch
from test_scheduler import MAX_TOKENS, greedy, prompts

CPU = torch.device("cpu")
OPTS = {"cpu": dict(attention="cpu"), "split": dict(gpu_fraction=0.5),
        "cpu-4bit": dict(attention="cpu", quant_bits=4, quant_group_size=16)}


@pytest.fixture
def lanes_seen(monkeypatch):
    """The engine takes the CPU side on the CPU too; the names of the threads that attended on the CPU."""
    monkeypatch.setattr(Engine, "_cpu_side_for", _cpu_side_anywhere)
    seen = set()
    real = OffloadedKVCache.attend_on_cpu

    def spy(self, *args):
        seen.add(threading.current_thread().name)
        return real(self, *args)
    monkeypatch.setattr(OffloadedKVCache, "attend_on_cpu", spy)
    return seen


def engine_for(path, opts, micro_batch_size=1):
    ckpt = SafetensorsFolder(path)
    return Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32,
                  micro_batch_size, kv_offload=opts)


def generate(engine, new_tokens=8):
    ids, mask = ragged_batch(seed=5)
    return engine.generate(ids, mask, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), set(), 0)


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling", "qwen3-moe"])
@pytest.mark.parametrize("kind", sorted(OPTS))
def test_lanes_give_one_threads_tokens_and_logits(tiny, variant, kind, lanes_seen):
    """One row a micro-batch: 3 parts, all (or, split, 2 of them) attended on the CPU, in two lanes."""
    _, path = tiny(variant)
    alone = generate(engine_for(path, KVOffload(**OPTS[kind], overlap=False)))
    assert lanes_seen == {"MainThread"}
    lanes_seen.clear()
    engine = engine_for(path, KVOffload(**OPTS[kind], overlap=True))
    out = generate(engine)
    assert out.tokens == alone.tokens
    torch.testing.assert_close(out.last_logits, alone.last_logits, rtol=1e-6, atol=1e-6)
    if variant == "qwen3-moe":  # its layers are all MoE: attention and routing on the engine's thread
        assert lanes_seen == {"MainThread"} and engine.cpu_side.layers == 0
    else:
        lanes = 2 if kind != "split" else 1  # split: 2 of 3 parts on the CPU, one a lane
        assert len(lanes_seen) == lanes and all(n.startswith("cpu-side") for n in lanes_seen)
    engine.close()


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling"])
@pytest.mark.parametrize("kind", ["cpu", "split"])
def test_lanes_under_the_continuous_batcher_give_one_threads_tokens(tiny, variant, kind, lanes_seen):
    """5 slots in parts of 1: decode parts in the lanes, beside prompt chunks of other parts on the
    engine's thread; rows refilled as others end."""
    _, path = tiny(variant)
    reqs, params = prompts(1), [greedy(n) for n in MAX_TOKENS]

    def run(overlap):
        batcher = ContinuousBatcher(engine_for(path, KVOffload(**OPTS[kind], overlap=overlap)), 5, 40, 6)
        handles = [batcher.submit(ids, p) for ids, p in zip(reqs, params)]
        while batcher.has_work():
            batcher.step()
        batcher.engine.close()
        return [h.output_ids for h in handles]
    alone = run(False)
    lanes_seen.clear()
    assert run(True) == alone
    assert {"cpu-side_0", "cpu-side_1"} <= lanes_seen


def test_an_error_in_one_lane_waits_for_the_other_and_a_retry_gives_one_threads_tokens(tiny, lanes_seen, monkeypatch):
    """Part 0's attention fails in one lane while part 1's, in the other, is still attending: the
    error comes out of generate only once part 1's lane is done, and generating again gives the
    single thread's tokens."""
    _, path = tiny("llama3-gqa-rope-scaling")
    alone = generate(engine_for(path, KVOffload(attention="cpu", overlap=False)))
    real = OffloadedKVCache.attend_on_cpu
    state = {"fail": True, "inside": 0, "inside_at_error": None}
    lock = threading.Lock()

    def flaky(self, i, j, *args):
        with lock:
            state["inside"] += 1
        try:
            if j == 1 and state["fail"]:
                time.sleep(0.2)  # the other lane's part still attending when part 0 fails
            if j == 0 and i == 1 and state["fail"]:
                raise RuntimeError("attention failed in a lane")
            return real(self, i, j, *args)
        finally:
            with lock:
                state["inside"] -= 1
    monkeypatch.setattr(OffloadedKVCache, "attend_on_cpu", flaky)
    engine = engine_for(path, KVOffload(attention="cpu", overlap=True))
    with pytest.raises(RuntimeError, match="failed in a lane"):
        generate(engine)
    assert state["inside"] == 0  # no lane still at work on the cache
    state["fail"] = False
    again = generate(engine)
    assert again.tokens == alone.tokens
    torch.testing.assert_close(again.last_logits, alone.last_logits, rtol=1e-6, atol=1e-6)
    engine.close()
    assert engine.cpu_side is None


def test_an_interrupt_while_waiting_for_the_lanes_still_waits_for_them():
    """Ctrl-C while the engine's thread waits for the lanes: the layer may not end, and a retry
    begin, while a lane still writes the cache. The interrupt comes out once both are done."""
    side = cpu_side.CpuSide(CPU)
    running = [0]
    lock = threading.Lock()

    def run(j):
        with lock:
            running[0] += 1
        time.sleep(0.6 if j == 0 else 0.05)
        with lock:
            running[0] -= 1
        return torch.zeros(1)
    main = threading.main_thread().ident
    timer = threading.Timer(0.15, signal.pthread_kill, (main, signal.SIGINT))
    hidden = [None, None]
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            side.run_layer([0, 1], [], hidden, run)
        assert running[0] == 0
    finally:
        timer.cancel()
        side.close()


@pytest.mark.parametrize("variant", ["qwen3-moe", "opt"])
def test_the_split_counts_kernels_beside_lane_work_only_where_lanes_ran_them(tiny, variant, lanes_seen):
    """An MoE layer attends every micro-batch on the engine's thread, one after the other: there
    the CPU side's cost is its whole host time less its waits, as with one thread, not the longer
    of its kernels and the rest (which would tell the split the CPU side is cheaper than it is,
    and send it parts it cannot take). In the lanes, the longer of the two."""
    from offloadgen.offload.kv_split import SplitController
    _, path = tiny(variant)
    engine = engine_for(path, KVOffload(attention="auto", gpu_fraction=0.0, overlap=True))
    cache = engine.new_cache(3, 14 + 6)
    cache.split = SplitController(3, 0, 0)  # on the CPU there is none: one that keeps every part on the CPU
    seen, marks = [], []
    observe, begin_pass = cache.split.observe, cache.begin_pass
    names = ("cpu_attention_s", "wait_for_gpu_s", "cpu_side_host_s")

    def spy(cpu_s, wait_s, step_s, issue_s=0.0):
        attention, wait, side = (cache.stats[n] - m for n, m in zip(names, marks[-1]))
        seen.append((cpu_s, attention, side - wait))
        return observe(cpu_s, wait_s, step_s, issue_s)

    def marking(step, prefills=False):
        begin_pass(step, prefills)
        marks.append([cache.stats[n] for n in names])
    cache.split.observe, cache.begin_pass = spy, marking
    generate(engine, new_tokens=6)
    assert len(seen) == 6 - 2  # decode passes after the first
    for cpu_s, attention, host in seen:
        assert 0 < attention < host
        if variant == "qwen3-moe":  # no lane ran: the kernels and the rest one after the other
            assert cpu_s == pytest.approx(host)
        else:
            assert cpu_s == pytest.approx(max(attention, host - attention))
    engine.close()


def test_an_interrupt_while_waiting_for_a_kernel_still_waits_for_it():
    """An MoE layer's CPU kernels are called from the engine's thread: Ctrl-C while it waits must
    not leave the kernel writing its part's pinned output under a retry."""
    side = cpu_side.CpuSide(CPU)
    state = {"done": False}

    def kernel():
        time.sleep(0.5)
        state["done"] = True
    timer = threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            side.attend(kernel)
        assert state["done"]
        assert side.attend(lambda: 7) == 7
        with pytest.raises(ZeroDivisionError):
            side.attend(lambda: 1 / 0)
    finally:
        timer.cancel()
        side.close()


def test_the_two_lanes_really_run_at_once(tiny, monkeypatch):
    """Two lane names alone would pass with the lanes taking turns under one lock: here a CPU
    attention's staging (the spy's sleep) in one lane overlaps the other's."""
    monkeypatch.setattr(Engine, "_cpu_side_for", _cpu_side_anywhere)
    _, path = tiny("opt")
    real = OffloadedKVCache.attend_on_cpu
    inside, most = [0], [0]
    lock = threading.Lock()

    def slow(self, *args):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return real(self, *args)
    monkeypatch.setattr(OffloadedKVCache, "attend_on_cpu", slow)
    engine = engine_for(path, KVOffload(attention="cpu", overlap=True))
    generate(engine, new_tokens=3)
    engine.close()
    assert most[0] == 2
