"""`offloadgen report`: read bench records (ours and the peers'), print a table, draw a plot."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

from ..errors import OffloadgenError
from ..models import param_count, preset

GiB = 1 << 30


def load_records(paths: list[str]) -> list[dict]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            # regular files only: reading a FIFO that happens to be named *.jsonl would wait forever
            files += [f for f in sorted(p.rglob("*.jsonl")) + sorted(p.rglob("*.json")) if f.is_file()]
        elif p.is_file():
            files.append(p)
        else:
            raise OffloadgenError(f"{p}: no such file or folder")
    records = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            print(f"offloadgen: {f}: not UTF-8 text (a binary file?), skipped", file=sys.stderr)
            continue
        except OSError as e:
            raise OffloadgenError(f"{f}: cannot read it ({e.strerror})") from None
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in a string
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                print(f"offloadgen: {f}:{n}: not a JSON record, skipped", file=sys.stderr)
                continue
            if isinstance(rec, dict) and "system" in rec and "batch_size" in rec:
                problem = record_problem(rec)
                if problem:
                    print(f"offloadgen: {f}:{n}: not a usable bench record ({problem}), skipped", file=sys.stderr)
                    continue
                rec["_file"] = str(f)
                records.append(rec)
    if not records:
        raise OffloadgenError("no bench records found (JSON lines with 'system' and 'batch_size')")
    return records


_MEASURED = ("prefill_throughput", "decode_throughput", "decode_step_s")
_OPTIONAL = ("peak_gpu_mem_bytes", "gpu_budget_bytes", "quant_bits", "quant_group_size", "h2d_bandwidth_bytes_s",
             "prompt_len", "gen_len")


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def record_problem(rec: dict) -> str | None:
    """What makes a record unusable for the table (a field missing or of the wrong type), or None."""
    if not isinstance(rec["system"], str) or not rec["system"]:
        return f"system is {rec['system']!r}, not a name"
    if type(rec["batch_size"]) is not int or rec["batch_size"] < 1:
        return f"batch_size is {rec['batch_size']!r}, not a positive integer"
    if "error" in rec:
        rec["error"] = str(rec["error"]) or "(no message)"
        return None
    for key in _MEASURED:
        if not _number(rec.get(key)):
            return f"{key} is {rec.get(key)!r}, not a number"
    for key in _OPTIONAL:
        if rec.get(key) is not None and not _number(rec[key]):
            return f"{key} is {rec[key]!r}, not a number"
    return None


def _label(rec) -> str:
    if rec["system"] == "offloadgen" and rec.get("pin_memory") == 0:
        return "offloadgen (pageable, staged)"
    if rec["system"] == "offloadgen" and rec.get("kv_offload"):
        return "offloadgen, KV in CPU RAM"
    return rec["system"]


def _family(rec) -> str:
    """Which system a record belongs to, whatever its configuration: Accelerate (its records are named
    after transformers), else the name's first word."""
    label = _label(rec)
    return "Accelerate" if "accelerate" in label.lower() else label.split()[0].rstrip(",")


def fits(rec) -> bool:
    """Peak GPU memory within the budget the run was held to (a record with no budget fits)."""
    budget = rec.get("gpu_budget_bytes")
    return not budget or rec.get("peak_gpu_mem_bytes", 0) <= budget


def _model(rec) -> str:
    return str(rec.get("model", "?")).rstrip("/").split("/")[-1]


def _config(rec) -> tuple:
    return _model(rec), int(rec.get("quant_bits") or 16), rec.get("prompt_len") or 0, rec.get("gen_len") or 0


def _bandwidth(records) -> float | None:
    bws = sorted(r["h2d_bandwidth_bytes_s"] for r in records if r.get("h2d_bandwidth_bytes_s"))
    return bws[len(bws) // 2] if bws else None


@functools.lru_cache(maxsize=None)
def _param_count(model: str) -> int | None:
    """Parameters of a preset by name; cached, since every record of a model asks (a million
    records took 9 minutes when each rebuilt its preset)."""
    try:
        return param_count(preset(model))
    except OffloadgenError:
        return None


def bus_limit_tokens_s(rec, bandwidth: float | None) -> float | None:
    """docs/performance.md's ceiling with every weight streamed: batch * bandwidth / weight bytes."""
    params = _param_count(_model(rec)) if bandwidth else None
    if not params:
        return None
    bits = int(rec.get("quant_bits") or 16)
    bytes_per_param = 2 if bits == 16 else bits / 8 + 4 / int(rec.get("quant_group_size") or 64)
    return rec["batch_size"] * bandwidth / (params * bytes_per_param)


def _ratio(ours: float | None, theirs: float) -> str:
    """offloadgen's throughput over another's, blank where either is missing or zero."""
    return f"{ours / theirs:.2f}x" if ours and theirs > 0 else ""


def table(records: list[dict]) -> str:
    bw = _bandwidth(records)
    best_ours = {}
    for r in records:
        if _label(r) == "offloadgen" and "error" not in r:
            key = (*_config(r), r["batch_size"])
            best_ours[key] = max(best_ours.get(key, 0), r["decode_throughput"])
    head = (f"{'system':40s} {'model':9s} {'bits':>4s} {'batch':>5s} {'prefill tok/s':>13s} {'decode tok/s':>12s} "
            f"{'step s':>7s} {'peak GiB':>8s} {'vs bus':>7s} {'offloadgen/this':>15s}")
    lines = [head]
    for r in sorted(records, key=lambda r: (_config(r), r["batch_size"], r["system"] != "offloadgen", r["system"])):
        model, bits = _model(r), int(r.get("quant_bits") or 16)
        if "error" in r:
            lines.append(f"{_label(r)[:40]:40s} {model:9s} {bits:4d} {r['batch_size']:5d}  failed: "
                         f"{r['error'].splitlines()[0][:100]}")
            continue
        limit = bus_limit_tokens_s(r, bw)
        ours = best_ours.get((*_config(r), r["batch_size"]))
        ratio = _ratio(ours, r["decode_throughput"]) if _label(r) != "offloadgen" else ""
        peak = f"{r.get('peak_gpu_mem_bytes', 0) / GiB:.2f}" + ("" if fits(r) else "!")
        lines.append(f"{_label(r)[:40]:40s} {model:9s} {bits:4d} {r['batch_size']:5d} {r['prefill_throughput']:13.1f} "
                     f"{r['decode_throughput']:12.2f} {r['decode_step_s']:7.3f} {peak:>8s} "
                     f"{(r['decode_throughput'] / limit) if limit else float('nan'):7.0%} {ratio:>15s}")
    if bw:
        lines.append(f"vs bus: decode tokens/s over batch * {bw / 1e9:.1f} GB/s / weight bytes (every weight streamed); "
                     "above 100% means resident layers saved bus time")
        if any(r.get("kv_offload") for r in records):
            lines.append("  (with the KV cache in CPU RAM a step also reads the cache, which this limit leaves out)")
    if any(not fits(r) for r in records if "error" not in r):
        lines.append("!: peak GPU memory above the budget the run was held to")
    best = best_that_fits(records)
    if best:
        lines += ["", "Each system at its best run that fits the budget:",
                  f"{'system':12s} {'model':9s} {'bits':>4s} {'batch':>5s} {'decode tok/s':>12s} {'peak GiB':>8s} "
                  f"{'vs bus':>7s} {'offloadgen/this':>15s}  configuration"]
        for (model, bits), systems in sorted(best.items()):
            ours = systems.get("offloadgen")
            for family, r in sorted(systems.items(), key=lambda kv: -kv[1]["decode_throughput"]):
                limit = bus_limit_tokens_s(r, bw)
                mine = ours["decode_throughput"] if ours and family != "offloadgen" else None
                ratio = _ratio(mine, r["decode_throughput"])
                lines.append(f"{family:12s} {model:9s} {bits:4d} {r['batch_size']:5d} {r['decode_throughput']:12.2f} "
                             f"{r.get('peak_gpu_mem_bytes', 0) / GiB:8.2f} "
                             f"{(r['decode_throughput'] / limit) if limit else float('nan'):7.0%} {ratio:>15s}  {_label(r)}")
    return "\n".join(lines)


def best_that_fits(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """For each (model, bits), each system's fastest decoding run within its budget."""
    best: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "error" in r or not fits(r):
            continue
        model, bits = _config(r)[:2]
        systems = best.setdefault((model, bits), {})
        family = _family(r)
        if family not in systems or r["decode_throughput"] > systems[family]["decode_throughput"]:
            systems[family] = r
    return best


def plot(records: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OffloadgenError("--plot needs matplotlib: pip install matplotlib") from None
    bw = _bandwidth(records)
    series: dict[tuple, dict[int, float]] = {}
    for r in records:
        if "error" in r:
            continue
        key = (_label(r), *_config(r)[:2])
        series.setdefault(key, {})
        series[key][r["batch_size"]] = max(series[key].get(r["batch_size"], 0), r["decode_throughput"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (system, model, bits), points in sorted(series.items()):
        xs = sorted(points)
        style = "-o" if system.startswith("offloadgen") else "--s"
        ax.plot(xs, [points[x] for x in xs], style, label=f"{system} · {model} · {bits}-bit")
    if bw:
        batches = sorted({r["batch_size"] for r in records})
        for model, bits in sorted({_config(r)[:2] for r in records if "error" not in r}):
            rec = {"model": model, "quant_bits": bits, "quant_group_size": 64}
            ys = [bus_limit_tokens_s({**rec, "batch_size": b}, bw) for b in batches]
            if all(ys):
                ax.plot(batches, ys, ":", color="gray")
                ax.annotate(f"bus limit {model} {bits}-bit ({bw / 1e9:.0f} GB/s, all weights streamed)",
                            (batches[-1], ys[-1]), fontsize=7, color="gray", ha="right", va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_title("Decode throughput against batch size (prompt 512, gen 32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
