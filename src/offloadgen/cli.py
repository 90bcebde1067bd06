"""offloadgen's command line. Generated text goes to standard output, everything else to stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys

# Never reach for a model hub, and keep transformers' advice off the user's terminal.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import OffloadgenError  # noqa: E402


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text for prompts",
                       description="Generate text. MODEL is a Hugging Face folder, a .gguf file, or a preset "
                                   "name with --dummy; with no MODEL, the embedded SmolLM2-135M.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--dummy", action="store_true", help="MODEL is a built-in preset with made-up weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--input", help="JSONL file: one {'prompt': ...} or {'messages': [...]} per line, optional 'id'")
    p.add_argument("--output", help="JSONL file for the results (default: text to standard output)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: float32 on CPU)")
    p.add_argument("--quant-bits", "--quant_bits", type=int, default=16, choices=[4, 8, 16],
                   help="group-wise quantize the decoder layers' linear weights (16 = none)")
    p.add_argument("--quant-group-size", "--quant_group_size", type=int, default=64)
    p.set_defaults(func=cmd_generate)


def _read_jsonl(path: str, tokenizer) -> list[tuple[object, str]]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise OffloadgenError(f"cannot read --input {path}: {e.strerror}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise OffloadgenError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not ("prompt" in rec or "messages" in rec):
            raise OffloadgenError(f"{path}:{n}: expected an object with 'prompt' or 'messages'")
        prompt = rec["prompt"] if "prompt" in rec else tokenizer.apply_chat_template(rec["messages"])
        if not isinstance(prompt, str):
            raise OffloadgenError(f"{path}:{n}: 'prompt' must be a string")
        items.append((rec.get("id", n), prompt))
    return items


def cmd_generate(args) -> int:
    import torch

    from .api import LLM, default_device, encode_prompts, resolve_dtype
    from .checkpoint import open_checkpoint
    from .offload.placement import all_resident
    from .offload.streaming import StreamingWeights
    from .quant import QuantConfig
    from .sampling import SamplingParams

    if args.batch_size < 1:
        raise OffloadgenError("--batch-size must be at least 1")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop)
    # Everything that can be wrong with the input is found before any weight is loaded.
    checkpoint = open_checkpoint(args.model, dummy=args.dummy)
    tokenizer = checkpoint.tokenizer()
    if args.input:
        items = _read_jsonl(args.input, tokenizer)
    else:
        items = list(enumerate(args.prompt or ["Paris is the capital city of"]))
    encode_prompts(tokenizer, checkpoint.cfg, [p for _, p in items], [i for i, _ in items])
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadgenError("--device cuda: this machine has no CUDA GPU")
    weights = None
    dtype = resolve_dtype(args.dtype, device, checkpoint.cfg)
    if args.quant_bits != 16:
        weights = StreamingWeights(checkpoint, device, dtype, all_resident(checkpoint.cfg),
                                   quant=QuantConfig(args.quant_bits, args.quant_group_size))
    llm = LLM(checkpoint, device, dtype, weights=weights, micro_batch_size=args.micro_batch_size, tokenizer=tokenizer)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            for (item_id, prompt), c in zip(chunk, llm.generate([p for _, p in chunk], sampling)):
                if out:
                    out.write(json.dumps({"id": item_id, "prompt": prompt, "text": c.text,
                                          "tokens": len(c.token_ids), "finish_reason": c.finish_reason}) + "\n")
                    out.flush()
                else:
                    print(prompt + c.text if len(items) == 1 else json.dumps({"id": item_id, "text": c.text}),
                          flush=True)
    finally:
        if out:
            out.close()
    if out:
        print(f"offloadgen: wrote {len(items)} results to {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offloadgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    try:
        from .bench.cli import add_bench
        add_bench(sub)
    except ImportError:
        pass
    p = sub.add_parser("presets", help="list the built-in model configs usable with --dummy")
    p.set_defaults(func=cmd_presets)
    return parser


def cmd_presets(args) -> int:
    from .models import param_count, preset, preset_names
    for name in preset_names():
        print(f"{name:16s} {param_count(preset(name)) / 1e9:8.2f}B parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OffloadgenError as e:
        print(f"offloadgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offloadgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
