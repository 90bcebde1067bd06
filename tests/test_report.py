"""`offloadgen report` over real bench records (made here on the CPU) and a peer's record."""
import json

import pytest

from offloadgen.cli import main


@pytest.fixture()
def records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for batch in (2, 4):
        assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", str(batch), "--prompt-len", "32",
                     "--gen-len", "3", "--loops", "1", "--dtype", "float32", "--verbose", "0",
                     "--json-file", "ours.jsonl"]) == 0
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]
    peer = dict(ours[0], system="SomePeer 1.0", decode_throughput=ours[0]["decode_throughput"] / 4)
    failed = {"system": "BrokenPeer", "model": "opt-125m", "batch_size": 2, "error": "RuntimeError: no kernel image"}
    folder = tmp_path / "peers"
    folder.mkdir()
    (folder / "peers.jsonl").write_text(json.dumps(peer) + "\n" + json.dumps(failed) + "\nnot json\n")
    return tmp_path


def test_report_table_gives_ratios_and_errors(records, capsys):
    assert main(["report", str(records / "ours.jsonl"), str(records / "peers")]) == 0
    out = capsys.readouterr().out
    rows = out.split("Each system at its best")[0].splitlines()
    assert sum(r.startswith("offloadgen ") for r in rows) == 2
    peer_row = next(r for r in rows if r.startswith("SomePeer"))
    assert peer_row.rstrip().endswith("4.00x")  # offloadgen's decode throughput over the peer's
    assert "BrokenPeer" in out and "failed: RuntimeError: no kernel image" in out


def test_report_plot_is_written(records, capsys):
    png = records / "plot.png"
    assert main(["report", str(records), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_with_nothing_to_read_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no bench records" in capsys.readouterr().err


def test_report_marks_runs_over_budget_and_compares_the_best_that_fit(tmp_path, capsys):
    base = {"model": "opt-125m", "prompt_len": 32, "gen_len": 3, "quant_bits": 16, "prefill_throughput": 100.0,
            "decode_step_s": 0.1, "gpu_budget_bytes": 4 << 30}
    recs = [dict(base, system="offloadgen", batch_size=8, decode_throughput=40.0, peak_gpu_mem_bytes=3 << 30),
            dict(base, system="offloadgen", kv_offload=True, batch_size=64, decode_throughput=100.0,
                 peak_gpu_mem_bytes=4 << 30),
            dict(base, system="PeerA policy 1", batch_size=8, decode_throughput=20.0, peak_gpu_mem_bytes=2 << 30),
            dict(base, system="PeerA policy 2", batch_size=16, decode_throughput=25.0, peak_gpu_mem_bytes=3 << 30),
            # faster, but over the budget: it may not count as PeerA's best
            dict(base, system="PeerA policy 3", batch_size=32, decode_throughput=60.0, peak_gpu_mem_bytes=5 << 30)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table, best = out.split("Each system at its best run that fits the budget:")
    over = next(r for r in table.splitlines() if r.startswith("PeerA policy 3"))
    assert "5.00!" in over
    assert "offloadgen, KV in CPU RAM" in table
    rows = [r for r in best.splitlines() if r.startswith(("offloadgen", "PeerA"))]
    assert rows[0].startswith("offloadgen") and rows[0].rstrip().endswith("offloadgen, KV in CPU RAM")
    assert rows[1].startswith("PeerA") and "4.00x" in rows[1] and rows[1].rstrip().endswith("PeerA policy 2")


def _rec(**kw):
    return {"system": "offloadgen", "model": "opt-125m", "batch_size": 2, "prefill_throughput": 10.0,
            "decode_throughput": 5.0, "decode_step_s": 0.4, "h2d_bandwidth_bytes_s": 2e10, **kw}


def test_report_skips_what_it_cannot_use_with_a_line_each(tmp_path, capsys):
    # issue 15: each of these was a traceback
    (tmp_path / "blob.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    rows = [_rec(), _rec(system="Peer", decode_throughput=0.0), _rec(system="Partial", decode_throughput=None),
            {"system": "Partial2", "batch_size": 2}, _rec(batch_size="8"), _rec(system=None),
            _rec(system="Odd", quant_bits="four"), {"system": "Failed", "batch_size": 2, "error": ""}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "blob.jsonl: not UTF-8 text (a binary file?), skipped" in err
    for problem in ("decode_throughput is None", "prefill_throughput is None", "batch_size is '8'",
                    "system is None", "quant_bits is 'four'"):
        assert problem + ", not" in err
    peer = next(line for line in out.splitlines() if line.startswith("Peer"))
    assert "0.00" in peer and "x" not in peer.split()[-1]  # no ratio over 0 tokens/s
    assert "Failed" in out


def test_report_is_linear_in_the_records(monkeypatch):
    # a million records took 9 minutes: every record rebuilt its model's preset to count parameters
    from offloadgen.bench import report
    calls = []
    real = report.param_count
    monkeypatch.setattr(report, "param_count", lambda cfg: calls.append(1) or real(cfg))
    if hasattr(report, "_param_count"):
        report._param_count.cache_clear()
    records = [_rec(batch_size=1 + i % 64, system=f"S{i % 3}") for i in range(3000)]
    assert "S2" in report.table(records)
    assert len(calls) <= 2


def test_report_skips_a_fifo_in_a_folder_instead_of_waiting_on_it(tmp_path, capsys):
    import os
    import threading
    (tmp_path / "r.jsonl").write_text(json.dumps(_rec()) + "\n")
    os.mkfifo(tmp_path / "pipe.jsonl")

    def unblock():  # a report stuck reading the FIFO gets an empty read after 20 s, and the test fails
        fd = os.open(tmp_path / "pipe.jsonl", os.O_WRONLY)
        fired.append(fd)
        os.close(fd)
    fired = []
    watchdog = threading.Timer(20, unblock)
    watchdog.daemon = True
    watchdog.start()
    assert main(["report", str(tmp_path)]) == 0
    assert not fired, "report waited on a FIFO"
    watchdog.cancel()
