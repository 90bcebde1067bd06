"""Does a real safetensors checkpoint load at the disk's speed, holding the model in RAM once?

1. Writes (once) a folder in the hub's layout from dummy tensors of a preset: config.json,
   model-0000k-of-0000n.safetensors shards of at most 5 GB (written with `safetensors`), the
   index model.safetensors.index.json and a tiny tokenizer.
2. Evicts the files from the page cache (fsync + POSIX_FADV_DONTNEED; mincore says how much of
   them is still cached) and measures the disk's cold read bandwidth on the same files: one
   thread reading sequentially, and 8 threads reading 16 MiB pieces; the better one is "the disk".
3. In a fresh subprocess per load (so peak RSS, VmHWM, is this load's alone), after evicting again:
   - fp16: the path `offloadgen generate FOLDER --input JOB`, `serve` and `load()` take (open the folder, plan, load the
     tokenizer, then the weights), weights in CPU RAM streamed to a GPU with a 16 GiB budget (--gpu-memory), or all
     on the CPU where there is no GPU; timed to ready-to-generate, then one short generation.
   - 4-bit, first: quantizes and writes the quantized-block cache (OFFLOADGEN_CACHE).
   - 4-bit, second: reads the cache (evicted first), the goal's case.
The goals: load s <= 1.25 x (bytes read / disk bandwidth), peak RSS < 1.1 x the model's bytes.

    python benchmarks/load_speed.py --model facebook/opt-13b --dir /tmp/load_speed --out results/x
    python benchmarks/load_speed.py --model facebook/opt-1.3b --dir /tmp/load_speed   # the CPU figures

On the lent H100 (64 GiB of disk) OPT-30B does not fit: its 60 GB of shards plus its 4-bit cache
(17 GB) exceed the disk, so OPT-13B (26 GB, cache 7 GB) is the default there.
Records (one JSON per run) go under --out or $LOAD_SPEED_OUT when given; the table is printed last.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GB = 1e9
SHARD_BYTES = 5 * 10 ** 9  # the hub's max_shard_size "5GB"
PIECE = 16 << 20


# -- the folder ----------------------------------------------------------------------------------
def hf_config(cfg) -> dict:
    """config.json for an OPT preset, checked to read back as the same config."""
    from offloadgen.models import config_from_hf
    if cfg.model_type != "opt":
        raise SystemExit(f"load_speed.py writes OPT configs only; {cfg.model_type} is not OPT")
    d = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": cfg.hidden_size,
         "ffn_dim": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position,
         "word_embed_proj_dim": cfg.word_embed_proj_dim, "do_layer_norm_before": cfg.do_layer_norm_before,
         "activation_function": cfg.activation, "tie_word_embeddings": cfg.tie_embeddings,
         "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
         "torch_dtype": "float16"}
    assert config_from_hf(d) == cfg, "config.json does not read back as the preset"
    return d


def write_tokenizer(folder: Path) -> None:
    """A small word-level tokenizer: enough for `generate` to encode a prompt; it is no part of the timing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "</s>", "<unk>", "hello", "world", "the", "a", "of", "Paris", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))


def write_folder(name: str, folder: Path) -> list[Path]:
    """The sharded folder, unless a complete one is there (its marker file is written last)."""
    import torch
    from safetensors.torch import save_file
    from offloadgen.checkpoint import DummyCheckpoint
    from offloadgen.models import blocks, preset
    marker = folder / "load_speed_complete.json"
    if marker.is_file() and json.loads(marker.read_text()).get("model") == name:
        return [folder / f for f in json.loads(marker.read_text())["shards"]]
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    cfg = preset(name)
    dummy = DummyCheckpoint(cfg)
    groups, current, size, seen = [], {}, 0, set()
    for b in blocks(cfg):  # in pass order, as the hub's shards are; tied tensors once
        for local, t in dummy.read_block(b, torch.float16).items():
            hf_name = dummy.family.block_tensors(cfg, b)[local][0]
            if hf_name in seen:
                continue
            seen.add(hf_name)
            n = t.numel() * t.element_size()
            if current and size + n > SHARD_BYTES:
                groups.append(current)
                current, size = {}, 0
            current[hf_name], size = t, size + n
        if size >= SHARD_BYTES:
            groups.append(current)
            current, size = {}, 0
    if current:
        groups.append(current)
    shards, weight_map, total = [], {}, 0
    for k, tensors in enumerate(groups, 1):
        path = folder / f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        shards.append(path)
        for hf_name, t in tensors.items():
            weight_map[hf_name] = path.name
            total += t.numel() * t.element_size()
        print(f"  wrote {path.name} ({path.stat().st_size / GB:.2f} GB)", file=sys.stderr)
        groups[k - 1] = None  # free the shard's tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    write_tokenizer(folder)
    marker.write_text(json.dumps({"model": name, "shards": [p.name for p in shards]}))
    return shards


# -- the page cache and the disk -------------------------------------------------------------------
def evict(paths) -> None:
    """Written pages to disk, then every page of the files out of the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths) -> float:
    """Share of the files' pages in the page cache (mincore on a mapping that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {p}")
            cached += sum(1 for v in bytes(vec) if v & 1) if pages < (1 << 16) else _count_odd(vec)
            total += pages
            libc.munmap(addr, size)
        finally:
            os.close(fd)
    return cached / max(total, 1)


def _count_odd(vec) -> int:
    import numpy as np
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())


def cold_read_bandwidth(paths, threads: int) -> float:
    """Bytes/s reading the files once, cold: one thread sequentially, or pieces from several threads."""
    evict(paths)
    jobs = [(p, off) for p in paths for off in range(0, os.path.getsize(p), PIECE)]
    lock, total = threading.Lock(), [0]

    def worker():
        buf = bytearray(PIECE)
        fds = {}
        while True:
            with lock:
                if not jobs:
                    break
                p, off = jobs.pop(0)
            fd = fds.get(p) or fds.setdefault(p, os.open(p, os.O_RDONLY))
            n = os.preadv(fd, [buf], off)
            with lock:
                total[0] += n
        for fd in fds.values():
            os.close(fd)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    evict(paths)
    return total[0] / seconds


# -- one load, in its own process -----------------------------------------------------------------
def status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    """Load as `offloadgen generate FOLDER --input JOB` does, timed to ready; RSS from the kernel.
    (With --prompt, generate loads the tokenizer first: the prompt's length sets --max-seq-len.)"""
    import torch
    try:
        from offloadgen import safetensors_io
    except ImportError:  # an older offloadgen, for a before/after comparison
        safetensors_io = None
    from offloadgen.api import load
    from offloadgen.checkpoint import open_checkpoint
    from offloadgen.config import RunConfig
    from offloadgen.sampling import SamplingParams
    cuda = spec["device"] == "cuda"
    if cuda:  # the CUDA context is no part of loading a model
        torch.empty(1, device="cuda")
    baseline = status_bytes("VmRSS")
    config = RunConfig(model=spec["folder"], device=spec["device"], dtype="float16", quant_bits=spec["bits"],
                       cpu_offload=cuda, gpu_memory=spec["gpu_memory"] if cuda else None, max_batch_size=1,
                       max_seq_len=256, progress=False)
    t0 = time.perf_counter()
    checkpoint = open_checkpoint(config.model)
    t_open = time.perf_counter()
    before_weights = status_bytes("VmRSS")
    # As a job: the tokenizer is left to the builder, which loads it after planning and before the
    # weights (a thread beside the weights, 2026-11-26 evening to issue 18's fast path, slowed them on
    # the H100). "tokenizer_s" is the rest of the load beyond opening and the weights: plan + tokenizer.
    llm = load(config=config, checkpoint=checkpoint)
    load_s = time.perf_counter() - t0
    weights_s = llm.runtime.timings.get("weights_load_s", load_s - (t_open - t0))
    out = {"load_s": load_s, "open_s": t_open - t0, "tokenizer_s": max(0.0, load_s - (t_open - t0) - weights_s),
           "weights_s": weights_s, "peak_rss": status_bytes("VmHWM"),
           "rss": status_bytes("VmRSS"), "rss_anon": status_bytes("RssAnon"), "rss_file": status_bytes("RssFile"),
           "baseline_rss": baseline, "rss_before_weights": before_weights,
           "bytes_read": getattr(safetensors_io, "bytes_read", lambda: 0)() or checkpoint_bytes(checkpoint),
           "placement": llm.plan.describe(),
           "weights_timings": {k: v for k, v in llm.weights.timings.items() if isinstance(v, (int, float))},
           "runtime_timings": llm.runtime.timings,
           # transformers' import alone took seconds on the H100's image: a load that needs it says so
           "transformers_imported": "transformers" in sys.modules}
    done = llm.generate(["hello world"], SamplingParams(max_new_tokens=2, ignore_eos=True))
    out["generated_tokens"] = len(done[0].token_ids)
    llm.close()
    return out


def checkpoint_bytes(checkpoint) -> int:
    return sum(f.stat().st_size for f in Path(checkpoint.path).glob("*.safetensors"))


def run_child(spec: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"load failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "quantized").rglob("*.safetensors")) if (cache / "quantized").is_dir() else []


def measure(args) -> dict:
    import torch
    folder = Path(args.dir).expanduser() / args.model.split("/")[-1]
    cache = Path(args.dir).expanduser() / "offloadgen-cache"
    t0 = time.perf_counter()
    shards = write_folder(args.model, folder)
    write_s = time.perf_counter() - t0
    model_bytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    evict(shards)
    after_evict = cached_fraction(shards)
    disk = {f"{n}_thread": cold_read_bandwidth(shards, n) for n in (1, 8)}
    bandwidth = max(disk.values())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "OFFLOADGEN_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    spec = {"folder": str(folder), "device": device, "gpu_memory": int(args.gpu_memory * (1 << 30))}
    loads = {}
    kinds = [("fp16", 16)] + ([] if args.skip_quant else [("4-bit first (writes cache)", 4), ("4-bit second (cache)", 4)])
    if not args.skip_quant:  # the first 4-bit load must build the cache
        import shutil
        shutil.rmtree(cache / "quantized", ignore_errors=True)
    for kind, bits in kinds:
        evict([*shards, *cache_files(cache)])
        cold = cached_fraction([*shards, *cache_files(cache)])
        r = run_child({**spec, "bits": bits}, env)
        r["cached_before"] = cold
        loads[kind] = r
        print(f"  {kind}: {r['load_s']:.2f} s, peak RSS {r['peak_rss'] / GB:.2f} GB, read {r['bytes_read'] / GB:.2f} GB"
              f" ({r['placement']})", file=sys.stderr)
    return {"model": args.model, "device": device, "gpu_memory_gib": args.gpu_memory if device == "cuda" else None,
            "folder": str(folder), "shards": len(shards), "model_bytes": model_bytes, "write_s": write_s,
            "cached_after_evict": after_evict, "disk_bytes_s": disk, "bandwidth": bandwidth,
            "cache_bytes": sum(p.stat().st_size for p in cache_files(cache)), "loads": loads,
            "host": os.uname().nodename, "cpus": os.cpu_count(), "time": time.strftime("%F %T")}


def table(rec: dict) -> str:
    bw = rec["bandwidth"]
    lines = [f"{rec['model']} on {rec['device']}: {rec['shards']} shards, {rec['model_bytes'] / GB:.2f} GB; disk "
             f"{rec['disk_bytes_s']['1_thread'] / GB:.2f} GB/s one thread, {rec['disk_bytes_s']['8_thread'] / GB:.2f} "
             f"GB/s 8 threads (cached after eviction: {rec['cached_after_evict']:.1%})",
             "| load | bytes (GB) | disk GB/s | bytes/disk (s) | load (s) | of it: open+tokenizer, weights (s) "
             "| ratio (goal <= 1.25) | peak RSS (GB) | peak RSS / bytes (goal < 1.1) | (peak - pre-load RSS) / bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in rec["loads"].items():
        # fp16: the checkpoint's bytes; 4-bit: what the load read (the cache, and the 16-bit blocks)
        nbytes = rec["model_bytes"] if kind == "fp16" else r["bytes_read"]
        floor = nbytes / bw
        lines.append(f"| {kind} | {nbytes / GB:.2f} | {bw / GB:.2f} | {floor:.2f} | {r['load_s']:.2f} | "
                     f"{r['open_s'] + r['tokenizer_s']:.2f}, {r['weights_s']:.2f} | {r['load_s'] / floor:.2f} | {r['peak_rss'] / GB:.2f} | {r['peak_rss'] / nbytes:.2f} | "
                     f"{(r['peak_rss'] - r['baseline_rss']) / nbytes:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="an OPT preset (default: facebook/opt-13b with a GPU, "
                                                "facebook/opt-1.3b without)")
    p.add_argument("--dir", default="~/load_speed", help="where the folder and the quantized cache are written")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--gpu-memory", type=float, default=16.0, help="GPU budget in GiB (weights beyond it in CPU RAM)")
    p.add_argument("--skip-quant", action="store_true", help="only the fp16 load")
    p.add_argument("--out", default=os.environ.get("LOAD_SPEED_OUT"), help="folder for the JSON record")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch
    args.model = args.model or ("facebook/opt-13b" if torch.cuda.is_available() else "facebook/opt-1.3b")
    rec = measure(args)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / f"load_speed-{args.model.split('/')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(rec, indent=2))
        print(f"record: {path}", file=sys.stderr)
    print(table(rec))


if __name__ == "__main__":
    main()
