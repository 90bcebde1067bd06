"""The KV cache in CPU memory (--kv-offload): same tokens and logits as the cache on the device,
whichever micro-batches attend where; and the runtime's split between CPU and GPU attention."""
import pytest
import torch

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload, OffloadedKVCache, gpu_fraction
from offloadgen.sampling import SamplingParams

from test_parity import ragged_batch

CPU = torch.device("cpu")


def run(path, kv_offload, micro_batch=2, new_tokens=12):
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=11)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32,
                    micro_batch, kv_offload=kv_offload)
    out = engine.generate(ids, mask, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), set(), 0)
    return out, engine


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling", "mistral-sliding-window", "bloom"])
@pytest.mark.parametrize("opts", [KVOffload(attention="cpu"), KVOffload(attention="gpu", async_write=True),
                                  KVOffload(gpu_fraction=0.5)], ids=["cpu-attention", "device-attention", "split"])
def test_offloaded_cache_gives_the_same_tokens(tiny, variant, opts):
    _, path = tiny(variant)
    ref, _ = run(path, None)
    out, engine = run(path, opts)
    assert out.tokens == ref.tokens
    torch.testing.assert_close(out.last_logits, ref.last_logits, rtol=1e-5, atol=1e-5)
    cache = engine.offloaded_cache
    n_parts = len(cache.parts)
    assert len(cache.gpu_parts) == opts.gpu_parts(n_parts)
    # The path each micro-batch took shows in the traffic: CPU attention reads the cache in host
    # memory; device attention copies it over.
    assert (cache.stats["cpu_cache_read_bytes"] > 0) == (len(cache.gpu_parts) < n_parts)
    assert (cache.stats["h2d_cache_bytes"] > 0) == (len(cache.gpu_parts) > 0)


def test_the_cache_lives_in_host_memory_slot_major():
    cache = OffloadedKVCache(2, [slice(0, 3), slice(3, 5)], 10, 4, 8, torch.float16, CPU, KVOffload())
    assert cache.k[1][1].shape == (10, 2, 4, 8) and cache.k[1][1].device.type == "cpu"
    assert cache.nbytes == 2 * 2 * 10 * 5 * 4 * 8 * 2


def test_cache_is_reused_across_generations_of_the_same_shape(tiny):
    _, path = tiny("opt")
    ckpt = SafetensorsFolder(path)
    ids, mask = ragged_batch(seed=3)
    engine = Engine(ckpt.cfg, ResidentWeights(ckpt, CPU, torch.float32, progress=False), CPU, torch.float32, 2,
                    kv_offload=KVOffload(attention="cpu"))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = engine.generate(ids, mask, params, set(), 0)
    cache = engine.offloaded_cache
    second = engine.generate(ids, mask, params, set(), 0)
    assert engine.offloaded_cache is cache  # no second allocation (or pinning) for a benchmark's next loop
    assert first.tokens == second.tokens


def test_split_between_cpu_and_gpu_attention():
    # The weights alone keep the bus longer than the CPU needs for the whole cache: all on the CPU.
    assert gpu_fraction(1.0, 10e9, 50e9, 20e9) == 0.0
    # A slow CPU: part of the cache goes over the bus so that both finish together.
    x = gpu_fraction(1.0, 48e9, 50e9, 30e9)
    assert 0 < x < 1
    bus = 1.0 + x * 48e9 / 50e9
    cpu = (1 - x) * 48e9 / 30e9
    assert bus == pytest.approx(cpu)
    assert KVOffload(gpu_fraction=x).gpu_parts(8) == round(8 * x)
    assert KVOffload(attention="gpu").gpu_parts(5) == 5 and KVOffload(attention="cpu").gpu_parts(5) == 0


def test_generate_command_with_the_cache_offloaded(capsys):
    from offloadgen.cli import main
    prompts = ["--prompt", "The capital of France is", "--prompt", "Water boils at", "--prompt", "One, two,"]
    assert main(["generate", *prompts, "--max-new-tokens", "8", "--micro-batch-size", "2"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *prompts, "--max-new-tokens", "8", "--micro-batch-size", "2", "--kv-offload",
                 "--kv-attention", "cpu"]) == 0
    assert capsys.readouterr().out == plain


def test_cpu_attention_runs_the_cpu_kernel(tiny, monkeypatch):
    """Decode steps attending on the CPU go through offload/cpu_attention (tested against a float64
    reference in test_cpu_attention), not through SDPA."""
    from offloadgen.offload import kv_cache
    calls = []
    real = kv_cache.cpu_attend
    monkeypatch.setattr(kv_cache, "cpu_attend", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    _, path = tiny("llama3-gqa-rope-scaling")
    ref, _ = run(path, None, new_tokens=4)
    out, engine = run(path, KVOffload(attention="cpu"), new_tokens=4)
    assert out.tokens == ref.tokens
    n_parts = len(engine.offloaded_cache.parts)
    assert len(calls) == 3 * 3 * n_parts  # 3 decode steps x 3 layers x micro-batches


def test_staged_row_writes_are_put_in_place_oldest_first_past_the_staging_limit(monkeypatch):
    """On a GPU a prompt chunk's rows are staged in pinned memory and put in place when their layer
    and part are next read (the next pass). A pass that prefills a whole batch would stage the whole
    cache at once (67 GB at OPT-30B batch 96, and the host ran out of memory): past STAGING_LIMIT
    the oldest are put in place at once, in order, and the newest stay staged. (The GPU's copies
    are stood in for by events that have landed.)"""
    from offloadgen.offload import kv_cache
    cache = OffloadedKVCache(3, [slice(0, 2)], 4, 1, 2, torch.float32, CPU, KVOffload())
    row = torch.ones(4, 1, 1, 2)  # 32 bytes a tensor, 64 a write
    monkeypatch.setattr(kv_cache, "STAGING_LIMIT", 150)
    landed = type("Landed", (), {"query": lambda self: True, "synchronize": lambda self: None})()
    applied = []

    def put_for(layer, value):
        def put(k_host, v_host):
            cache.k[layer][0][:, 0:1] = k_host * value
            applied.append((layer, value))
        return put
    for n, layer in enumerate([0, 1, 0, 2]):  # two writes to layer 0 (in order), then layers 1 and 2
        cache.deferred.setdefault((layer, 0), []).append((landed, row, row, put_for(layer, n + 1), {0}))
        cache.staged_bytes += 64
        cache._bound_staging()
    # 4 writes = 256 bytes > 150: layer 0's two writes (the oldest key) went in, in order; 128 left
    assert applied == [(0, 1), (0, 3)]
    assert cache.k[0][0][0, 0, 0, 0] == 3  # the later write is the one that stays
    assert cache.staged_bytes == 128 and set(cache.deferred) == {(1, 0), (2, 0)}


def test_the_cpu_side_thread_waits_for_a_staged_write_another_thread_is_putting_in_place(monkeypatch):
    """_bound_staging (on the engine's thread, staging a prompt chunk) may put in place the last
    pass's writes to a part that the cpu_side worker attends in this one. The worker's
    _landed_for_host must then wait until they are all in place, not find none left and read the
    slots half written."""
    import threading
    from offloadgen.offload import kv_cache
    cache = OffloadedKVCache(2, [slice(0, 1)], 4, 1, 2, torch.float32, CPU, KVOffload())
    cache.k[0][0].zero_()
    monkeypatch.setattr(kv_cache, "STAGING_LIMIT", 0)
    landed = type("Landed", (), {"query": lambda self: True, "synchronize": lambda self: None})()
    putting, finish = threading.Event(), threading.Event()

    def put(k_host, v_host):  # a slow put, held half done until the test lets it go on
        cache.k[0][0][:2] = k_host[:2]
        putting.set()
        finish.wait(10)
        cache.k[0][0][2:] = k_host[2:]
    row = torch.ones(4, 1, 1, 2)
    cache.deferred[(0, 0)] = [(landed, row, row, put, {0})]
    cache.staged_bytes = 64
    bounding = threading.Thread(target=cache._bound_staging)
    bounding.start()
    assert putting.wait(10)
    seen = []
    reading = threading.Thread(target=lambda: (cache._landed_for_host(0, 0), seen.append(cache.k[0][0].clone())))
    reading.start()
    reading.join(0.5)  # what the worker would read, if it did not wait
    finish.set()
    bounding.join()
    reading.join()
    assert torch.equal(seen[0], torch.ones(4, 1, 1, 2))  # the whole write, not its first half
    assert cache.staged_bytes == 0 and not cache.deferred
