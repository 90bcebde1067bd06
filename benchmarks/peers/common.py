"""What every peer script shares: the workload, the reference's timing, and the JSON record; and
a whole job (a workload file) run as static batches, formed and counted as offloadgen's own
static mode (bench/workload.run_static) does."""
import json
import sys
import time
import traceback

import torch

sys.path.insert(0, "src")
from offloadgen.metrics import RunMetrics  # noqa: E402
from offloadgen.models import preset  # noqa: E402

PROMPT_IDS = [2, 32826, 16, 5, 812, 343, 9]  # "Paris is the capital city of" in OPT's vocabulary, after BOS


def require(peer: str, *modules: str) -> list:
    """Import a peer's packages, or say which is missing and leave (a missing peer is not a failure)."""
    import importlib
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        print(f"{peer}: {e.name} is not installed; skipped", file=sys.stderr)
        sys.exit(0)


def parser(loops: int = 1, several_batches: bool = False):
    """The workload flags every peer takes, as `offloadgen bench` spells them. --gpu-memory is the
    budget the comparison holds every system to: a peer that cannot be given one still records it,
    so that the report can tell which runs fit."""
    import argparse
    from offloadgen.config import parse_bytes
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="opt-30b")
    if several_batches:
        p.add_argument("--batch-size", type=int, nargs="+", default=[8], help="one run per batch size, one engine")
    else:
        p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu-memory", type=parse_bytes, default=16 << 30)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--loops", type=int, default=loops)
    p.add_argument("--json-file", default="peers.jsonl")
    add_job_flags(p)
    return p


def add_job_flags(p) -> None:
    p.add_argument("--workload", default=None, metavar="FILE",
                   help="a job: JSON lines with 'input_len' and 'output_len' (make_workload.py writes one), run as "
                        "static batches of --batch-size; --prompt-len, --gen-len and --loops are then unused")
    p.add_argument("--workload-seed", type=int, default=0, help="draws the prompts' tokens, as offloadgen's flag does")


def with_batch(args, batch: int):
    """The arguments of one run of a several-batch invocation."""
    import argparse
    return argparse.Namespace(**{**vars(args), "batch_size": batch})


# --- Our presets as transformers models --------------------------------------------------------
# The peers run transformers' own implementation of a family; these build its config from our
# preset, so every system runs the same shapes. OPT's is the config its earlier runs had
# (hf_opt_config: sizes only), with opt-350m's projection and post-norm added.


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) else token_id


def _llama_like(cfg) -> dict:
    """The settings LLaMA, Mixtral and Qwen3-MoE spell alike in transformers."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, dtype=torch.float16)


def _llama(t, cfg):
    if cfg.rope_scaling or cfg.sliding_window or cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"the peers build plain LLaMA configs only ({cfg.model_type} with rope scaling, a sliding "
                         "window or q/k/v-only biases is not mapped)")
    return t.LlamaConfig(**_llama_like(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def _mixtral(t, cfg):
    return t.MixtralConfig(**_llama_like(cfg), sliding_window=cfg.sliding_window, num_local_experts=cfg.n_experts,
                           num_experts_per_tok=cfg.top_k)


def _qwen3_moe(t, cfg):
    kw = _llama_like(cfg)
    # Qwen3-MoE's MLP-only layers: every layer off decoder_sparse_step 1 that is listed
    return t.Qwen3MoeConfig(**kw, attention_bias=cfg.qkv_bias, num_experts=cfg.n_experts,
                            num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_intermediate_size,
                            norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                            mlp_only_layers=list(cfg.dense_layers))


def _opt(t, cfg):
    c = t.OPTConfig(hidden_size=cfg.hidden_size, ffn_dim=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                    max_position_embeddings=cfg.max_position, dtype=torch.float16)
    if cfg.projected or not cfg.do_layer_norm_before:  # opt-350m: settings hf_opt_config never passed
        c.word_embed_proj_dim, c.do_layer_norm_before = cfg.word_embed_proj_dim, cfg.do_layer_norm_before
    return c


# our model_type -> (its config builder, transformers' causal-LM class)
HF_MODELS = {"opt": (_opt, "OPTForCausalLM"), "llama": (_llama, "LlamaForCausalLM"),
             "mixtral": (_mixtral, "MixtralForCausalLM"), "qwen3_moe": (_qwen3_moe, "Qwen3MoeForCausalLM")}


class HFModel:
    """A preset as transformers builds it: config, causal-LM class, and its decoder layer's class
    name (what Accelerate must not split across devices)."""

    def __init__(self, cfg, name: str = "this preset"):
        import transformers
        if cfg.model_type not in HF_MODELS:
            raise ValueError(f"the peers run {', '.join(sorted(HF_MODELS))} presets through transformers; "
                             f"{name} is a {cfg.model_type} model")
        build, cls_name = HF_MODELS[cfg.model_type]
        self.ours = cfg
        self.config = build(transformers, cfg)
        self.model_class = getattr(transformers, cls_name)
        self.layer_class = self.model_class._no_split_modules[0]


def hf_model(model: str) -> HFModel:
    return HFModel(preset(model), model)


def prompt_ids(model: str = "opt-30b") -> tuple[list, int]:
    """The reference's prompt and the id it is left-padded with. OPT: its own ids, padded with EOS
    (2). Another vocabulary: the model's BOS, then OPT's ids folded into the vocabulary (dummy
    weights need valid ids, not words), padded with the model's EOS."""
    cfg = preset(model)
    if cfg.model_type == "opt":
        return PROMPT_IDS, 2
    bos = _first(cfg.bos_token_id)
    return [PROMPT_IDS[0] if bos is None else bos] + [i % cfg.vocab_size for i in PROMPT_IDS[1:]], \
        _first(cfg.eos_token_id)


def pad_id(model: str = "opt-30b") -> int:
    """The pad id a peer's generate is given: OPT's 1 as before; else the model's pad, or EOS."""
    cfg = preset(model)
    if cfg.model_type == "opt":
        return 1
    return cfg.pad_token_id if cfg.pad_token_id is not None else _first(cfg.eos_token_id)


def inputs(batch: int, prompt_len: int, device="cuda", model: str = "opt-30b"):
    """The reference's workload: its prompt, left-padded (OPT: with EOS, id 2) to exactly prompt_len."""
    prompt, pad = prompt_ids(model)
    ids = torch.full((batch, prompt_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, -len(prompt):] = torch.tensor(prompt)
    mask[:, -len(prompt):] = 1
    return ids.to(device), mask.to(device)


def time_generate(model, generate, loops: int):
    """Total time of each generate call, and its first forward pass (the prefill), synchronized."""
    state = {}

    def pre(module, args, kwargs=None):
        if "prefill" not in state:
            torch.cuda.synchronize()
            state["t"] = time.perf_counter()

    def post(module, args, out):
        if "prefill" not in state:
            torch.cuda.synchronize()
            state["prefill"] = time.perf_counter() - state["t"]

    h1, h2 = model.register_forward_pre_hook(pre), model.register_forward_hook(post)
    totals, prefills = [], []
    for _ in range(loops):
        state.clear()
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate()
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - t)
        prefills.append(state["prefill"])
    h1.remove()
    h2.remove()
    return out, totals, prefills


def record(system, args, prefill, total, peak, extra=None, json_file="peers.jsonl"):
    m = RunMetrics.measured(args.batch_size, args.prompt_len, args.gen_len, prefill, total, peak)
    rec = {"system": system, "model": args.model, "prompt_len": args.prompt_len,
           "gen_len": args.gen_len, "gpu_budget_bytes": getattr(args, "gpu_memory", None),
           "quant_bits": getattr(args, "quant_bits", 16), **m.as_record(), "batch_size": args.batch_size,
           **(extra or {})}
    print(json.dumps(rec))
    with open(json_file, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def record_failure(system, args, exc: BaseException, json_file="peers.jsonl"):
    """A peer that cannot run leaves the error it gave, not a gap."""
    rec = {"system": system, "model": args.model, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
           "gen_len": args.gen_len, "error": f"{type(exc).__name__}: {exc}"[:2000],
           "traceback_tail": traceback.format_exc()[-1500:]}
    print(json.dumps(rec))
    with open(json_file, "a") as f:
        f.write(json.dumps(rec) + "\n")


# --- A job as static batches -------------------------------------------------------------------
# offloadgen runs a job file continuously, or as static batches with --compare-static; a peer can
# only run static batches. These form the same batches (workload.static_batches: sorted by prompt
# length, batch_size at a time), pad each as a peer needs (left, to the batch's longest prompt;
# every row generates the batch's longest output, EOS ignored on dummy weights) and count only what
# each request asked for: its prompt and its own output_len, as run_static counts them.


class _NoTokenizer:
    def encode(self, text):
        raise TypeError("the peers take 'input_len' lines only (a 'prompt' as text needs the model's tokenizer)")


def load_job(path: str, model: str, seed: int) -> list:
    """The requests of a workload file, with the prompt tokens offloadgen draws for it (same seed)."""
    from offloadgen.bench.workload import from_file
    return from_file(path, _NoTokenizer(), seed, preset(model).vocab_size)


def job_batches(items: list, batch_size: int) -> list:
    from offloadgen.bench.workload import static_batches
    return static_batches(items, batch_size)


def padded_batch(batch: list, pad_id: int, rows: int = 0):
    """One static batch as a peer takes it: prompts left-padded with pad_id to the longest (mask 0
    on the padding), and the number of tokens every row generates (the longest output asked for).
    rows > len(batch) adds filler rows (copies of the last request) for a peer whose batch size is
    fixed when it is built (FlexGen); they are generated and never counted."""
    width = max(len(it.prompt_ids) for it in batch)
    n = max(rows, len(batch))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r in range(n):
        prompt = batch[min(r, len(batch) - 1)].prompt_ids
        ids[r, width - len(prompt):] = torch.tensor(prompt)
        mask[r, width - len(prompt):] = 1
    return ids, mask, max(it.output_len for it in batch)


def warmup_batch(batch_size: int, prompt_len: int = 32) -> list:
    """A tiny batch (one new token) to run before the clock starts, as FlexGen's own benchmark warms up."""
    from offloadgen.bench.workload import WorkItem
    return [WorkItem([4 + r] * prompt_len, 1) for r in range(batch_size)]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_job(items: list, batch_size: int, generate_batch, clock=time.perf_counter) -> tuple:
    """Every static batch through generate_batch(batch) -> new tokens each row got, on one clock
    (started after a device sync, stopped after the last batch's), as run_static times its own.
    A batch that stopped before its longest output (EOS honoured on real weights, say) is an error:
    the accounting below assumes every request got what it asked for."""
    batches = job_batches(items, batch_size)
    _sync()
    t0 = clock()
    for batch in batches:
        got, wanted = generate_batch(batch), max(it.output_len for it in batch)
        if got < wanted:
            raise RuntimeError(f"a batch generated {got} new tokens where its longest request asked for {wanted}")
    _sync()
    return batches, clock() - t0


def job_figures(batches: list, elapsed: float, batch_size: int) -> dict:
    """The job's figures under the names offloadgen's workload record uses. output_tokens is what
    the requests asked for (each its own output_len), not the padded rows' tokens, which are kept
    apart as generated_tokens (rows x the batch's longest output, filler rows left out)."""
    reqs = [it for b in batches for it in b]
    prompt = sum(len(it.prompt_ids) for it in reqs)
    output = sum(it.output_len for it in reqs)
    return {"requests": len(reqs), "prompt_tokens": prompt, "requested_output_tokens": output,
            "output_tokens": output, "elapsed_s": elapsed, "requests_per_s": len(reqs) / elapsed,
            "output_throughput": output / elapsed, "total_throughput": (prompt + output) / elapsed,
            "batch_size": batch_size, "batches": len(batches),
            "passes": sum(max(it.output_len for it in b) for b in batches),
            "padded_prompt_tokens": sum(len(b) * max(len(it.prompt_ids) for it in b) for b in batches),
            "generated_tokens": sum(len(b) * max(it.output_len for it in b) for b in batches)}


def job_record(system, args, batch_size, batches, elapsed, peak, extra=None, json_file="peers.jsonl") -> dict:
    rec = {"system": system, "kind": "workload", "model": args.model, "workload": args.workload,
           "workload_seed": args.workload_seed, "gpu_budget_bytes": getattr(args, "gpu_memory", None),
           "quant_bits": getattr(args, "quant_bits", 16), **job_figures(batches, elapsed, batch_size),
           "peak_gpu_mem_bytes": peak, **(extra or {})}
    print(json.dumps(rec))
    with open(json_file, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def job_failure(system, args, batch_size, exc: BaseException, json_file="peers.jsonl") -> dict:
    rec = {"system": system, "kind": "workload", "model": args.model, "workload": args.workload,
           "batch_size": batch_size, "error": f"{type(exc).__name__}: {exc}"[:2000],
           "traceback_tail": traceback.format_exc()[-1500:]}
    print(json.dumps(rec))
    with open(json_file, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def hf_job(system, args, model, items, batch_size, extra=None, device="cuda", **generate_kw) -> dict:
    """A job through a transformers model's generate (DeepSpeed's engine.module, Accelerate's
    dispatched model): a warm-up batch of one token, then the static batches on one clock, each
    left-padded with the model's pad id (OPT's 1) and held to the batch's longest output (min_new_tokens)."""
    pad = pad_id(args.model)

    def generate_batch(batch):
        ids, mask, gen_len = padded_batch(batch, pad_id=pad)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=gen_len,
                                 min_new_tokens=gen_len, do_sample=False, pad_token_id=pad, **generate_kw)
        return out.shape[1] - ids.shape[1]

    on_gpu = torch.device(device).type == "cuda"
    generate_batch(warmup_batch(batch_size))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    batches, elapsed = time_job(items, batch_size, generate_batch)
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    return job_record(system, args, batch_size, batches, elapsed, peak, extra, args.json_file)
