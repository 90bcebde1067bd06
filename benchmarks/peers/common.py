"""What every peer script shares: the workload, the reference's timing, and the JSON record."""
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
    return p


def with_batch(args, batch: int):
    """The arguments of one run of a several-batch invocation."""
    import argparse
    return argparse.Namespace(**{**vars(args), "batch_size": batch})


def hf_opt_config(model: str):
    import transformers
    cfg = preset(model)
    return transformers.OPTConfig(hidden_size=cfg.hidden_size, ffn_dim=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                                  num_attention_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                                  max_position_embeddings=cfg.max_position, dtype=torch.float16)


def inputs(batch: int, prompt_len: int, device="cuda"):
    """The reference's workload: its prompt, left-padded with EOS (id 2) to exactly prompt_len."""
    ids = torch.full((batch, prompt_len), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, -len(PROMPT_IDS):] = torch.tensor(PROMPT_IDS)
    mask[:, -len(PROMPT_IDS):] = 1
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
