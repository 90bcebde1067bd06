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
from offloadgen.offload.kv_cache import KVOffload, OffloadedKVCache
from offloadgen.sampling import SamplingParams

from test_parity import ragged_batch

CPU = torch.device("cpu")


@pytest.fixture
def threads_seen(monkeypatch):
    """The engine takes the CPU side on the CPU too, and each attention records its thread."""
    monkeypatch.setattr(Engine, "_cpu_side_for", _cpu_side_anywhere)
    seen = {"cpu": set(), "device": set()}
    for name, where in (("attend_on_cpu", "cpu"), ("attend_on_device", "device")):
        real = getattr(OffloadedKVCache, name)

        def spy(self, *args, real=real, where=where):
            seen[where].add(threading.current_thread().name.split("_")[0])
            return real(self, *args)
        monkeypatch.setattr(OffloadedKVCache, name, spy)
    return seen


def _cpu_side_anywhere(self, cache):
    if not (isinstance(cache, OffloadedKVCache) and cache.opts.overlap):
        return False
    if self.cpu_side is None:
        self.cpu_side = cpu_side.CpuSide(self.device)
    return True


def generate(path, opts, new_tokens=10):
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=5)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32, 2,
                    kv_offload=opts)
    return engine.generate(ids, mask, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), set(), 0), engine


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling"])
def test_the_cpu_side_thread_gives_one_threads_tokens(tiny, variant, threads_seen):
    _, path = tiny(variant)
    alone, _ = generate(path, KVOffload(gpu_fraction=0.5, overlap=False))
    assert threads_seen["cpu"] == {"MainThread"}
    threads_seen["cpu"].clear()
    threads_seen["device"].clear()
    out, engine = generate(path, KVOffload(gpu_fraction=0.5, overlap=True))
    assert out.tokens == alone.tokens
    torch.testing.assert_close(out.last_logits, alone.last_logits, rtol=1e-6, atol=1e-6)
    # decode attention on the CPU ran in the worker, the device's here; prefills all attend on the device
    assert threads_seen["cpu"] == {"cpu-attention"}
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
