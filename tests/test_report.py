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
    rows = out.splitlines()
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
