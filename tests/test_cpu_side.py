"""CPU-attended micro-batches in a thread of their own (offload/cpu_side.py). On a GPU it also gives
them a stream of their own; here, on the CPU, the thread alone runs, which is what can go wrong
in it: results must equal one thread's, each micro-batch must run where the split says, and an
error in the thread must come out of generate."""
import threading

import pytest
import torch

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload import ResidentWeights, cpu_side
from offloadgen.offload import kv_cache
from offloadgen.offload.kv_cache import KVOffload, OffloadedKVCache
from offloadgen.sampling import SamplingParams

from test_parity import ragged_batch

CPU = torch.device("cpu")


@pytest.fixture
def threads_seen(monkeypatch):
    """The engine takes the CPU side on the CPU too, and each attention records its thread."""
    monkeypatch.setattr(Engine, "_cpu_side_for", _cpu_side_anywhere)
    seen = {"cpu": set(), "device": set(), "lanes": set(), "kernel": set()}
    for name, where in (("attend_on_cpu", "cpu"), ("attend_on_device", "device")):
        real = getattr(OffloadedKVCache, name)

        def spy(self, *args, real=real, where=where):
            seen[where].add(threading.current_thread().name.split("_")[0])
            if where == "cpu":
                seen["lanes"].add(threading.current_thread().name)
            return real(self, *args)
        monkeypatch.setattr(OffloadedKVCache, name, spy)
    real_kernel = kv_cache.cpu_attend

    def kernel_spy(*args, **kwargs):
        seen["kernel"].add(threading.current_thread().name.split("_")[0])
        return real_kernel(*args, **kwargs)
    monkeypatch.setattr(kv_cache, "cpu_attend", kernel_spy)
    return seen


def _cpu_side_anywhere(self, cache):
    if not (isinstance(cache, OffloadedKVCache) and cache.opts.overlap):
        return False
    if self.cpu_side is None:
        self.cpu_side = cpu_side.CpuSide(self.device)
    cache.use_cpu_side(self.cpu_side)  # as Engine._cpu_side_for does on a GPU
    return True


def generate(path, opts, new_tokens=10, micro_batch_size=2):
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=5)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32,
                    micro_batch_size, kv_offload=opts)
    return engine.generate(ids, mask, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), set(), 0), engine


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling"])
def test_the_cpu_side_thread_gives_one_threads_tokens(tiny, variant, threads_seen):
    _, path = tiny(variant)
    alone, _ = generate(path, KVOffload(gpu_fraction=0.5, overlap=False))
    assert threads_seen["cpu"] == threads_seen["kernel"] == {"MainThread"}
    for seen in threads_seen.values():
        seen.clear()
    out, engine = generate(path, KVOffload(gpu_fraction=0.5, overlap=True))
    assert out.tokens == alone.tokens
    torch.testing.assert_close(out.last_logits, alone.last_logits, rtol=1e-6, atol=1e-6)
    # decode attention on the CPU ran in a lane, its kernel in the attention thread, the device's
    # here; prefills all attend on the device
    assert threads_seen["cpu"] == {"cpu-side"}
    assert threads_seen["kernel"] == {"cpu-attention"}
    assert threads_seen["device"] == {"MainThread"}
    layers = engine.cfg.n_layers * (10 - 1)  # every decode pass, every layer
    assert engine.cpu_side.layers == layers
    cache = engine.offloaded_cache
    assert cache.stats["cpu_cache_read_bytes"] > 0 and cache.stats["h2d_cache_bytes"] > 0


def test_an_error_in_the_cpu_side_comes_out_of_generate(tiny, threads_seen, monkeypatch):
    _, path = tiny("opt")
    calls = {"n": 0}
    real = OffloadedKVCache.attend_on_cpu

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("attention failed in the worker")
        return real(self, *args)
    monkeypatch.setattr(OffloadedKVCache, "attend_on_cpu", failing)
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=5)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32, 2,
                    kv_offload=KVOffload(gpu_fraction=0.5, overlap=True))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(RuntimeError, match="attention failed in the worker"):
        engine.generate(ids, mask, params, set(), 0)
    again = engine.generate(ids, mask, params, set(), 0)  # the engine and its thread still work
    assert len(again.tokens[0]) == 4


def test_only_whole_decode_parts_without_a_prompt_chunk_go_to_the_cpu_side():
    from offloadgen.engine import MicroBatch
    from offloadgen.models.layers import StepInputs
    cache = OffloadedKVCache(1, [slice(0, 2), slice(2, 4), slice(4, 6)], 8, 1, 4, torch.float32, CPU,
                             KVOffload(gpu_fraction=1 / 3))  # the last part attends on the device
    decode = StepInputs(start=3, positions=torch.zeros(2, 1, dtype=torch.long), key_valid=torch.ones(2, 4))
    chunk = StepInputs(start=0, positions=torch.zeros(1, 3, dtype=torch.long), key_valid=torch.ones(1, 3))
    ids = torch.zeros(2, 1, dtype=torch.long)
    batches = [MicroBatch(ids, decode, 0, slice(0, 2)), MicroBatch(ids, decode, 1, slice(2, 4)),
               MicroBatch(ids, decode, 2, slice(4, 6)), MicroBatch(ids[:1], chunk, 1, slice(2, 3))]
    # part 0: decode on the CPU; part 1 shares its pass with a prompt chunk of its rows; part 2: the device
    assert cpu_side.cpu_side_batches(batches, cache) == [0]


def test_the_cpu_parts_of_a_layer_take_turns_in_two_lanes(tiny, threads_seen):
    """Three parts of one row, all attending on the CPU: two lanes share them (one takes the first
    and third, the other the second), the kernels all run in the one attention thread, and the
    tokens and logits are one thread's."""
    _, path = tiny("opt")
    alone, _ = generate(path, KVOffload(attention="cpu", overlap=False), micro_batch_size=1)
    for seen in threads_seen.values():
        seen.clear()
    out, engine = generate(path, KVOffload(attention="cpu", overlap=True), micro_batch_size=1)
    assert out.tokens == alone.tokens
    torch.testing.assert_close(out.last_logits, alone.last_logits, rtol=1e-6, atol=1e-6)
    assert threads_seen["lanes"] == {"cpu-side_0", "cpu-side_1"}
    assert threads_seen["kernel"] == {"cpu-attention"}
    assert threads_seen["device"] == {"MainThread"}  # the prefill's
    cache = engine.offloaded_cache
    # the host time counts each micro-batch's own work, not its wait behind the other lane's kernel
    assert 0 < cache.stats["cpu_attention_s"] <= cache.stats["cpu_side_host_s"]


def test_the_attention_thread_runs_one_kernel_at_a_time():
    side = cpu_side.CpuSide(CPU)
    inside, most = [0], [0]
    lock = threading.Lock()

    def kernel():
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        threading.Event().wait(0.01)
        with lock:
            inside[0] -= 1
        return threading.current_thread().name
    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(4) as callers:
            names = list(callers.map(lambda _: side.attend(kernel), range(8)))
    finally:
        side.close()
    assert most[0] == 1 and {n.split("_")[0] for n in names} == {"cpu-attention"}


def test_the_attention_thread_writes_the_callers_inference_tensors():
    """On a GPU the kernel writes its output into a pinned buffer made in the caller's inference
    mode; the attention thread must be in it too (outside it, PyTorch refuses the write)."""
    side = cpu_side.CpuSide(CPU)
    try:
        with torch.inference_mode():
            out = torch.zeros(4)
            assert side.attend(lambda: out.copy_(torch.ones(4))) is out
        assert out.sum() == 4
        assert side.attend(torch.is_inference_mode_enabled) is False
    finally:
        side.close()


def test_overlap_turned_off_between_runs_puts_the_kernels_back_on_the_calling_thread(tiny):
    """benchmarks/kv_overlap.py turns --kv-overlap off and on in one process; off, the cache must
    not keep sending its kernels to the last CPU side's attention thread."""
    _, path = tiny("opt")
    _, engine = generate(path, KVOffload(attention="cpu", overlap=False), new_tokens=2, micro_batch_size=1)
    cache = engine.offloaded_cache
    side = cpu_side.CpuSide(CPU)
    try:
        cache.use_cpu_side(side)
        assert cache.kernel_runner is not None
        assert engine._cpu_side_for(cache) is False  # overlap off (and no GPU)
        assert cache.kernel_runner is None and cache.in_lane() is False
    finally:
        side.close()


def test_a_cpu_side_needs_a_lane_and_its_pool_leaves_the_cores_asked_for():
    with pytest.raises(ValueError, match="at least one lane"):
        cpu_side.CpuSide(CPU, lanes=0)
    side = cpu_side.CpuSide(CPU, lanes=2, spare_cores=1)
    try:
        side.threads = 16
        assert side.attend(torch.get_num_threads) == 15
        side.spare_cores = 2
        assert side.attend(torch.get_num_threads) == 14
    finally:
        side.close()
