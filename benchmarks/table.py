"""Print a table of bench JSON records (offloadgen's and peers'), with the bus limit where known."""
import json
import sys

rows = []
for path in sys.argv[1:]:
    try:
        rows += [json.loads(line) for line in open(path) if line.strip()]
    except OSError:
        pass
print(f"{'system':34s} {'bs':>3s} {'pin':>3s} {'prefill s':>9s} {'step s':>7s} {'bus-limit s':>11s} {'of bus':>7s} "
      f"{'copy-only s':>11s} {'decode tok/s':>12s} {'total tok/s':>11s} {'peak GiB':>8s} {'ready s':>8s} {'pin s':>6s}")
for r in rows:
    limit = r.get("bus_limit_decode_step_s")
    pin = r.get("weights_timings", {}).get("pin_s")
    print(f"{r['system'][:34]:34s} {r['batch_size']:3d} {str(r.get('pin_memory', '-')):>3s} {r['prefill_latency_s']:9.3f} "
          f"{r['decode_step_s']:7.3f} {limit if limit else float('nan'):11.3f} "
          f"{(limit / r['decode_step_s']) if limit else float('nan'):7.1%} {r.get('copy_only_step_s') or float('nan'):11.3f} "
          f"{r['decode_throughput']:12.2f} "
          f"{r['total_throughput']:11.2f} {r['peak_gpu_mem_bytes'] / 2**30:8.2f} {r.get('startup_s', float('nan')):8.1f} "
          f"{pin if pin is not None else float('nan'):6.1f}")
