"""Continuous batching: every request gives what its prompt gives alone, whatever shares its
passes; slots are refilled as rows end; cancel frees a slot; chunked prefill changes nothing."""
import pytest
import torch

from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload import ResidentWeights
from offloadgen.offload.kv_cache import KVOffload
from offloadgen.sampling import SamplingParams
from offloadgen.errors import OffloadgenError
from offloadgen.scheduler import ContinuousBatcher

from conftest import V, VARIANTS

CPU = torch.device("cpu")
# Prompt lengths and max_tokens mixed so that rows end at different passes, prompts longer than
# the chunk budget are split, and Mistral's window of 12 is exceeded.
LENGTHS = [14, 3, 9, 20, 1, 7, 16]
MAX_TOKENS = [10, 4, 12, 3, 8, 6, 9]


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in LENGTHS]


def engine_for(path, kv_offload=None, micro_batch=2):
    ckpt = SafetensorsFolder(path)
    weights = ResidentWeights(ckpt, CPU, torch.float32, progress=False)
    return Engine(ckpt.cfg, weights, CPU, torch.float32, micro_batch, kv_offload=kv_offload)


def alone(engine, ids, params):
    t = torch.tensor([ids])
    return engine.generate(t, torch.ones_like(t), params, set(), 0).tokens[0]


def run_batcher(engine, reqs, params, slots=3, prefill_chunk=8, max_len=40):
    batcher = ContinuousBatcher(engine, slots, max_len, prefill_chunk)
    handles = [batcher.submit(ids, p) for ids, p in zip(reqs, params)]
    while batcher.has_work():
        batcher.step()
    return handles, batcher


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_request_equals_its_prompt_run_alone(tiny, variant):
    _, path = tiny(variant)
    reqs, params = prompts(), [greedy(n) for n in MAX_TOKENS]
    ref = [alone(engine_for(path, micro_batch=None), ids, p) for ids, p in zip(reqs, params)]
    handles, batcher = run_batcher(engine_for(path), reqs, params)
    assert [h.output_ids for h in handles] == ref
    assert all(h.finished and h.finish_reason == "length" for h in handles)
    assert batcher.stats.prompt_tokens == sum(LENGTHS) and batcher.stats.output_tokens == sum(MAX_TOKENS)


KV = {"cpu-attention": KVOffload(attention="cpu"), "device-attention": KVOffload(attention="gpu", async_write=True),
      "split": KVOffload(gpu_fraction=0.5)}


@pytest.mark.parametrize("variant", ["opt", "llama3-gqa-rope-scaling", "mistral-sliding-window", "bloom", "gemma3",
                                     "qwen3-moe"])
@pytest.mark.parametrize("kv", sorted(KV))
def test_offloaded_cache_each_request_equals_its_prompt_run_alone(tiny, variant, kv):
    _, path = tiny(variant)
    reqs, params = prompts(1), [greedy(n) for n in MAX_TOKENS]
    ref = [alone(engine_for(path, micro_batch=None), ids, p) for ids, p in zip(reqs, params)]
    # 5 slots in parts of 2: the last part has one row
    handles, batcher = run_batcher(engine_for(path, KV[kv]), reqs, params, slots=5, prefill_chunk=6)
    assert [h.output_ids for h in handles] == ref
    cache = batcher.cache
    assert cache.nbytes == 2 * cache.n_layers * 41 * 5 * cache.kv_heads * cache.head_dim * 4  # max_len + the spare slot
    assert (cache.stats["cpu_cache_read_bytes"] > 0) == (len(cache.gpu_parts) < len(cache.parts))


@pytest.mark.parametrize("variant", ["llama3-gqa-rope-scaling", "opt", "bloom"])
@pytest.mark.parametrize("kv", [None, "cpu-attention", "device-attention"])
def test_chunked_prefill_equals_unchunked(tiny, variant, kv):
    _, path = tiny(variant)
    reqs, params = prompts(2), [greedy(n) for n in MAX_TOKENS]
    whole, b1 = run_batcher(engine_for(path, KV.get(kv)), reqs, params, prefill_chunk=1000)
    chunked, b2 = run_batcher(engine_for(path, KV.get(kv)), reqs, params, prefill_chunk=3)
    assert [h.output_ids for h in chunked] == [h.output_ids for h in whole]
    assert b2.stats.passes > b1.stats.passes  # it did prefill in pieces


def test_a_late_request_takes_a_freed_slot_while_a_long_one_runs(tiny):
    """Two slots; A runs 24 tokens, B 2, then C and D arrive. Static batches of two would start C
    only when A ends; here C takes B's slot at once and ends long before A."""
    _, path = tiny("opt")
    reqs = prompts(3)
    batcher = ContinuousBatcher(engine_for(path, micro_batch=None), 2, 40, 64)
    a, _ = batcher.submit(reqs[0], greedy(24)), batcher.submit(reqs[1], greedy(2))
    batcher.step()
    c, d = batcher.submit(reqs[2], greedy(3)), batcher.submit(reqs[4], greedy(3))
    ended = {}
    while batcher.has_work():
        for out in batcher.step():
            if out.finished:
                ended[out.request.id] = batcher.stats.passes
    assert ended[c.id] < ended[a.id] and ended[d.id] < ended[a.id]
    static_passes = 24 + 3  # batch [A, B] runs to A's end, then [C, D]
    assert batcher.stats.passes < static_passes
    # both slots busy until C and D end (pass 1 to 6); A alone for the rest
    assert batcher.stats.busy_slots == 2 * ended[d.id] + (batcher.stats.passes - ended[d.id])
    engine = engine_for(path, micro_batch=None)
    assert c.output_ids == alone(engine, reqs[2], greedy(3)) and a.output_ids == alone(engine, reqs[0], greedy(24))


def test_cancel_frees_the_slot_for_the_next_request(tiny):
    _, path = tiny("llama2-mha")
    reqs = prompts(4)
    batcher = ContinuousBatcher(engine_for(path, micro_batch=None), 1, 48, 64)
    long, queued, dropped = (batcher.submit(reqs[0], greedy(30)), batcher.submit(reqs[2], greedy(5)),
                             batcher.submit(reqs[1], greedy(5)))
    for _ in range(3):
        batcher.step()
    assert batcher.active_slots == 1 and batcher.queue_length == 2 and len(long.output_ids) == 3
    batcher.cancel(long)
    batcher.cancel(dropped)
    outs = batcher.step()
    assert {o.request.id: o.finish_reason for o in outs if o.finished} == {long.id: "cancelled", dropped.id: "cancelled"}
    assert queued.slot == 0 and batcher.queue_length == 0  # admitted into the freed slot this pass
    while batcher.has_work():
        batcher.step()
    assert queued.output_ids == alone(engine_for(path, micro_batch=None), reqs[2], greedy(5))
    assert len(long.output_ids) == 3 and dropped.output_ids == []


def test_per_request_sampling_seed_eos_and_length(tiny):
    """Greedy and seeded rows side by side: a seeded row draws what it draws alone; an EOS ends
    a row (not returned); a row reaching the cache's end stops with 'length'."""
    _, path = tiny("llama3-gqa-rope-scaling")
    engine = engine_for(path, micro_batch=None)
    reqs = prompts(5)
    seeded = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    free_run = alone(engine, reqs[0], greedy(6))
    eos = free_run[2]
    batcher = ContinuousBatcher(engine, 3, 24, 8, eos_token_ids={eos})
    g = batcher.submit(reqs[0], SamplingParams(max_new_tokens=6))
    s = batcher.submit(reqs[2], seeded)
    full = batcher.submit(reqs[3], greedy(50))  # 20 prompt tokens in 24 slots: 5 new tokens fit
    while batcher.has_work():
        batcher.step()
    assert g.finish_reason == "stop" and g.output_ids == free_run[:free_run.index(eos)]
    t = torch.tensor([reqs[2]])
    assert s.output_ids == engine.generate(t, torch.ones_like(t), seeded, set(), 0).tokens[0]
    assert full.finish_reason == "length" and len(full.output_ids) == 24 - 20 + 1


class TagTokenizer:
    """Each token id decodes to '<id>', so a stop string can name a token exactly."""
    eos_token_ids = set()

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_stop_strings_end_a_row_and_are_cut_from_the_text(tiny):
    _, path = tiny("opt")
    engine = engine_for(path, micro_batch=None)
    ids = prompts(7)[0]
    free_run = alone(engine, ids, greedy(8))
    stop = f"<{free_run[2]}>"
    batcher = ContinuousBatcher(engine, 2, 32, tokenizer=TagTokenizer())
    stopped = batcher.submit(ids, SamplingParams(max_new_tokens=8, stop=[stop]))
    plain = batcher.submit(ids, SamplingParams(max_new_tokens=8))
    while batcher.has_work():
        batcher.step()
    cut = free_run.index(free_run[2]) + 1
    assert stopped.finish_reason == "stop" and stopped.output_ids == free_run[:cut]
    assert stopped.text == TagTokenizer().decode(free_run[:cut]).split(stop)[0] and stop not in stopped.text
    assert plain.finish_reason == "length" and plain.text == TagTokenizer().decode(free_run)


def test_restart_after_a_failed_pass_gives_the_same_tokens(tiny):
    _, path = tiny("opt")
    engine = engine_for(path, micro_batch=None)
    reqs, params = prompts(6), [greedy(n) for n in MAX_TOKENS]
    batcher = ContinuousBatcher(engine, 3, 40, 8)
    handles = [batcher.submit(ids, p) for ids, p in zip(reqs, params)]
    for _ in range(5):
        batcher.step()
    engine.micro_batch_size = 2  # as a job does after running out of memory
    batcher.restart()
    while batcher.has_work():
        batcher.step()
    ref = [alone(engine_for(path, micro_batch=None), ids, p) for ids, p in zip(reqs, params)]
    assert [h.output_ids for h in handles] == ref and len(batcher.parts) == 2


def test_prompts_longer_than_a_slot_are_refused(tiny):
    from offloadgen.errors import OffloadgenError
    _, path = tiny("opt")
    batcher = ContinuousBatcher(engine_for(path), 2, 10)
    with pytest.raises(OffloadgenError, match="longer than the 10 tokens"):
        batcher.submit(list(range(3, 14)), greedy(2))
    with pytest.raises(OffloadgenError, match="no tokens"):
        batcher.submit([], greedy(2))


@pytest.mark.parametrize("quant", [None, "4-bit"])
def test_weights_streamed_from_disk_under_the_batcher(tiny, tmp_path, quant):
    """A pass keeps the weight source's schedule (every block once, in order) whatever its
    micro-batches: the same tokens from weights read off disk, plain or quantized."""
    from offloadgen.offload.placement import disk_placement_on_cpu
    from offloadgen.offload.streaming import StreamingWeights
    from offloadgen.quant import QuantConfig
    _, path = tiny("llama3-gqa-rope-scaling")
    ckpt = SafetensorsFolder(path)
    q = QuantConfig(4, 32) if quant else None
    placement = disk_placement_on_cpu(ckpt.cfg, prefetch_depth=1)
    reqs, params = prompts(8), [greedy(n) for n in MAX_TOKENS]

    def engine(offload_dir=None):
        w = StreamingWeights(ckpt, CPU, torch.float32, placement, progress=False, quant=q, offload_dir=offload_dir)
        return Engine(ckpt.cfg, w, CPU, torch.float32, 2)
    ref = [alone(engine(), ids, p) for ids, p in zip(reqs, params)]
    handles, _ = run_batcher(engine(tmp_path), reqs, params)
    assert [h.output_ids for h in handles] == ref


def test_an_llm_s_planned_limits_bound_its_batcher():
    import offloadgen
    from offloadgen.errors import OffloadgenError
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    llm.limits = (4, 64)  # as if placed on a GPU for 4 sequences of 64 tokens
    assert ContinuousBatcher(llm, 4, 64).slots == 4
    for slots, max_len in ((5, 64), (4, 65)):
        with pytest.raises(OffloadgenError, match="placed on the GPU for 4 sequences of at most 64"):
            ContinuousBatcher(llm, slots, max_len)


def test_longrope_rows_cross_to_long_factors_on_their_own(tiny):
    """Phi-3 LongRoPE switches to long factors once a sequence passes 32 tokens, and recomputes its
    cache then, as transformers does. Each row must do it at its own length: rows that cross during
    decode, a prompt longer than 32 prefilled in chunks, and rows that never cross share passes."""
    _, path = tiny("phi3-longrope")
    g = torch.Generator().manual_seed(3)
    lengths, new = [34, 40, 47, 55, 28, 12, 31, 5], [6, 6, 6, 6, 10, 30, 4, 8]
    reqs = [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]
    params = [greedy(n) for n in new]
    ref = [alone(engine_for(path, micro_batch=None), ids, p) for ids, p in zip(reqs, params)]
    handles, _ = run_batcher(engine_for(path), reqs, params, slots=3, prefill_chunk=8, max_len=64)
    assert [h.output_ids for h in handles] == ref


@pytest.mark.parametrize("kv", [None, "cpu-attention", "device-attention"])
def test_a_quantized_kv_cache_under_the_batcher_equals_the_prompt_alone(tiny, kv):
    # The batcher writes rows at their own slots; with --kv-quant-bits those writes must be
    # encoded as the static path's are, on the device cache and the offloaded one alike. Prompts
    # are not chunked here: a chunk attends over the quantized past, a whole prefill over exact keys.
    _, path = tiny("llama3-gqa-rope-scaling")
    reqs, params = prompts(2), [greedy(n) for n in MAX_TOKENS]

    def engine(micro_batch):
        ckpt = SafetensorsFolder(path)
        weights = ResidentWeights(ckpt, CPU, torch.float32, progress=False)
        opts = None if kv is None else KVOffload(attention=KV[kv].attention, quant_bits=8, quant_group_size=16)
        return Engine(ckpt.cfg, weights, CPU, torch.float32, micro_batch, kv_offload=opts, kv_quant=(8, 16))
    ref = [alone(engine(None), ids, p) for ids, p in zip(reqs, params)]
    handles, batcher = run_batcher(engine(2), reqs, params, slots=4, prefill_chunk=64)
    assert [h.output_ids for h in handles] == ref
    stored = batcher.cache.k[0] if kv is None else batcher.cache.k[0][0]
    assert stored.dtype == torch.uint8  # the cache really is quantized


def test_longest_first_admission_ends_the_job_in_fewer_passes(tiny):
    """Two slots, outputs 2, 2, 2, 2, 12 in arrival order. FIFO runs the 12 last, alone for most of
    the job; longest-first starts it at once and fills the other slot with the short ones, so the
    job takes fewer passes at higher occupancy, and every output is still its prompt's alone."""
    _, path = tiny("llama2-mha")
    reqs, lens = prompts(5)[:5], [2, 2, 2, 2, 12]
    runs = {}
    for order in ("fifo", "longest"):
        batcher = ContinuousBatcher(engine_for(path, micro_batch=None), 2, 40, 64, admission=order)
        handles = [batcher.submit(ids, greedy(n)) for ids, n in zip(reqs, lens)]
        batcher.step()
        long_started_first = handles[4].slot is not None
        while batcher.has_work():
            batcher.step()
        runs[order] = (batcher.stats, [h.output_ids for h in handles], long_started_first)
    fifo, longest = runs["fifo"][0], runs["longest"][0]
    assert runs["longest"][2] and not runs["fifo"][2]  # the long one, last in, in the first pass
    assert longest.passes < fifo.passes and longest.slot_occupancy > fifo.slot_occupancy
    assert runs["fifo"][1] == runs["longest"][1]
    engine = engine_for(path, micro_batch=None)
    assert runs["longest"][1][4] == alone(engine, reqs[4], greedy(12))


def test_an_unknown_admission_order_is_refused(tiny):
    _, path = tiny("llama2-mha")
    with pytest.raises(Exception, match="admission order 'lifo'"):
        ContinuousBatcher(engine_for(path, micro_batch=None), 2, 40, 64, admission="lifo")


def test_the_kv_split_is_told_which_passes_also_prefill(tiny, monkeypatch):
    """A pass with prompt chunks beside the decode rows is not a decode step's time: the engine
    says so to the offloaded cache's split (begin_pass(prefills=True)), on exactly those passes."""
    from offloadgen.offload.kv_cache import OffloadedKVCache
    _, path = tiny("opt")
    engine = engine_for(path, KV["cpu-attention"])
    told, chunks = [], []
    real_pass, real_begin = engine.run_pass, OffloadedKVCache.begin_pass

    def run_pass(batches, cache):
        chunks.append(any(mb.step.length > 1 for mb in batches))
        return real_pass(batches, cache)
    monkeypatch.setattr(engine, "run_pass", run_pass)

    def begin_pass(self, step, prefills=False):
        told.append((prefills, chunks[-1]))
        return real_begin(self, step, prefills)
    monkeypatch.setattr(OffloadedKVCache, "begin_pass", begin_pass)
    run_batcher(engine, prompts(4), [greedy(n) for n in MAX_TOKENS], slots=3, prefill_chunk=6)
    assert all(said == had for said, had in told)
    assert {said for said, _ in told} == {True, False}  # both kinds of pass happened


def test_a_pass_carries_no_more_prompt_tokens_than_the_plan_sized_a_prefill_part_for(tiny):
    """With the prefill planned in parts (Placement.prefill_tokens) the activations are sized for
    one part: a continuous batch's prompt chunks stay within it, whatever chunk was asked for."""
    _, path = tiny("opt")
    engine = engine_for(path, micro_batch=None)
    assert ContinuousBatcher(engine, 2, 40, 64).prefill_chunk == 64
    engine.prefill_tokens = 16
    assert ContinuousBatcher(engine, 2, 40, 64).prefill_chunk == 16
    assert ContinuousBatcher(engine, 2, 40, 8).prefill_chunk == 8


def test_the_llms_batcher_keeps_the_prefill_part_cap_and_says_when_it_cuts_a_chunk(tiny, capsys):
    """LLM.batcher (the path of generate, jobs and serve) sets each call's chunk on the batcher it
    keeps: that must not undo the cap, on the batcher it makes or on one it reuses, and a chunk
    asked for above the cap is cut with a line on stderr, once."""
    from offloadgen.api import LLM
    from offloadgen.config import RunConfig
    from offloadgen.runtime import Runtime, plan_run
    from offloadgen.tokenizer import ByteTokenizer
    _, path = tiny("opt")
    engine = engine_for(path, micro_batch=None)
    engine.prefill_tokens = 16
    plan = plan_run(RunConfig(device="cpu", dtype="float32"), engine.cfg, CPU)
    llm = LLM(Runtime(plan, SafetensorsFolder(path), ByteTokenizer(engine.cfg), engine.weights, engine, {}))
    made = llm.batcher(2, 40, 64)
    assert made.prefill_chunk == 16
    assert capsys.readouterr().err.count("--prefill-chunk 64") == 1
    assert llm.batcher(2, 40, 64) is made and made.prefill_chunk == 16  # reused
    assert "--prefill-chunk" not in capsys.readouterr().err  # said once
    assert llm.batcher(2, 40, 8).prefill_chunk == 8  # under the cap: as asked, and nothing said
    assert "--prefill-chunk" not in capsys.readouterr().err
    engine.prefill_tokens = None
    assert llm.batcher(2, 40, 64).prefill_chunk == 64  # no cap without parts
    with pytest.raises(OffloadgenError, match="prefill_chunk must be at least 1; got 0"):
        llm.batcher(2, 40, 0)  # a reused batcher is checked too


@pytest.mark.parametrize("kv", [None, "cpu-attention"])
def test_a_warmed_up_batcher_answers_as_a_fresh_one_and_counts_from_zero(tiny, kv):
    """warm_up (what `serve` runs before its first client): every slot prefilled in one pass of a
    whole chunk, one decode pass, then nothing left behind: no rows, no queue, zero stats, and the
    same tokens afterwards as a batcher that never warmed up."""
    _, path = tiny("llama3-gqa-rope-scaling")
    engine = engine_for(path, KV.get(kv))
    reqs, params = prompts(), [greedy(n) for n in MAX_TOKENS]
    fresh, _ = run_batcher(engine, reqs, params)
    batcher = ContinuousBatcher(engine, 3, 40, 8)
    assert batcher.warm_up() == 2
    assert not batcher.has_work() and batcher.active_slots == 0 and batcher.queue_length == 0
    assert batcher.stats.passes == 0 and batcher.stats.output_tokens == 0
    handles = [batcher.submit(ids, p) for ids, p in zip(reqs, params)]
    while batcher.has_work():
        batcher.step()
    assert [h.output_ids for h in handles] == [h.output_ids for h in fresh]
    assert batcher.stats.output_tokens == sum(MAX_TOKENS)
