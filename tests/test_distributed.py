"""torch.distributed on the CPU (gloo): 2 and 3 processes started by torchrun give the tokens of
one process, in both weight-fetch modes; weights are shared on a node; bad input and a dead rank
end with a clear error, not a hang."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import reaped, wait_while_running
from dist_batch import fixed_batch
from offloadgen.checkpoint import SafetensorsFolder
from offloadgen.engine import Engine
from offloadgen.offload import ResidentWeights
from offloadgen.sampling import SamplingParams

WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "OFFLOADGEN_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def torchrun(nproc, *args, timeout=240, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout)


def one_process_tokens(path):
    ckpt = SafetensorsFolder(path)
    ids, mask = fixed_batch()
    out = Engine(ckpt.cfg, ResidentWeights(ckpt, torch.device("cpu"), torch.float32, progress=False),
                 torch.device("cpu"), torch.float32, 2).generate(
        ids, mask, SamplingParams(max_new_tokens=8, ignore_eos=True), set(), 0)
    return out.tokens


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("mode", ["whole", "allgather", "pool", "poolspread", "poolall"])
def test_ranks_give_the_tokens_of_one_process(tiny, tmp_path, nproc, mode):
    _, path = tiny("llama3-gqa-rope-scaling")
    out = tmp_path / "tokens.json"
    r = torchrun(nproc, str(WORKER), str(path), str(out), mode)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == one_process_tokens(path)


def test_ranks_copying_from_whole_shared_blocks_give_the_tokens_of_one_process(tiny, tmp_path):
    """OFFLOADGEN_HOST_PARTS=0 (an A/B switch for GPU runs): with allgather the streamed blocks stay
    whole, once per node in shared memory, and each rank copies its 1/N from there (the worker
    checks which it holds)."""
    _, path = tiny("llama3-gqa-rope-scaling")
    out = tmp_path / "tokens.json"
    r = torchrun(2, str(WORKER), str(path), str(out), "allgather", OFFLOADGEN_HOST_PARTS="0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == one_process_tokens(path)


@pytest.mark.parametrize("nproc,mode,ring", [(2, "allgather", "2"), (3, "poolspread", "3"), (2, "poolall", "2")])
def test_ranks_copying_parts_from_each_other_give_the_tokens_of_one_process(tiny, tmp_path, nproc, mode, ring):
    """--weight-gather copy: each rank reads the others' pooled parts and landing buffers from their
    memory (here shared memory between gloo ranks), fenced where buffers are refilled; the worker
    makes NCCL's all-gather fail, so these tokens come from the copies. A reset two blocks into a
    pass starts the copies and fences again on every rank."""
    _, path = tiny("llama3-gqa-rope-scaling")
    out = tmp_path / "tokens.json"
    r = torchrun(nproc, str(WORKER), str(path), str(out), mode, DIST_GATHER="copy", DIST_RING=ring, DIST_RESET="2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == one_process_tokens(path)
    assert not list(Path("/dev/shm").glob("offloadgen-arenas-*")), "shared arenas left behind"


def test_ranks_copying_parts_leave_no_shared_arenas_when_a_rank_dies(tiny, tmp_path):
    """The last rank dies before the arenas are made: the others, waiting for it in a barrier,
    fail or are stopped by torchrun, and still remove their files in /dev/shm."""
    _, path = tiny("llama3-gqa-rope-scaling")
    r = torchrun(2, str(WORKER), str(path), str(tmp_path / "x.json"), "poolspread", DIST_GATHER="copy", DIST_DIE="1",
                 timeout=180)
    assert r.returncode != 0
    assert not list(Path("/dev/shm").glob("offloadgen-arenas-*")), "shared arenas left behind"


@pytest.mark.parametrize("mode,killed", [("poolspread", "1:_open_shared_files"), ("shared", "0:shared_host_buffers")])
def test_a_rank_sigkilled_while_sharing_memory_leaves_nothing_in_dev_shm(tiny, tmp_path, mode, killed):
    """SIGKILL (no handler, no finally) to a rank in the middle of a node's shared-memory setup, once
    the memory is made and mapped by every rank: rank 1 while the ranks map each other's copy
    arenas (--weight-gather copy), rank 0 while it shares the streamed weights it made. The run
    fails, and no file stays in /dev/shm (the files there were named after torchrun's port, and the
    killed rank's own stayed, taking its RAM)."""
    _, path = tiny("llama3-gqa-rope-scaling")
    before = set(os.listdir("/dev/shm"))
    r = torchrun(2, str(WORKER), str(path), str(tmp_path / "x.json"), mode, DIST_GATHER="copy", DIST_KILL=killed,
                 timeout=180)
    assert r.returncode != 0 and "Signal 9 (SIGKILL)" in r.stderr, r.stderr[-3000:]
    port = r.stdout.split("MASTER_PORT=")[1].split()[0]
    new = set(os.listdir("/dev/shm")) - before
    assert not [p for p in new if p.endswith(f"-{port}")], f"left in /dev/shm: {new}"


def test_copying_parts_refuses_ranks_on_several_nodes_and_an_unknown_copy_direction(monkeypatch):
    """Refused before any arena is made: ranks that cannot map each other's memory, and an
    OFFLOADGEN_PEER_COPY that is neither push nor pull (a typo ran push, and the record said the typo)."""
    from offloadgen.distributed import World
    from offloadgen.errors import OffloadgenError
    from offloadgen.offload.peer_copy import PeerArenas
    with pytest.raises(OffloadgenError, match="found 2 ranks, 1 on this node"):
        PeerArenas(16, World(rank=0, size=2, local_size=1), torch.device("cpu"))
    monkeypatch.setenv("OFFLOADGEN_PEER_COPY", "Pull")
    with pytest.raises(OffloadgenError, match="OFFLOADGEN_PEER_COPY must be push or pull; got 'Pull'"):
        PeerArenas(16, World(), torch.device("cpu"))



def test_copying_parts_on_several_nodes_is_refused_by_the_plan_before_weights_are_placed():
    from offloadgen.config import RunConfig
    from offloadgen.distributed import World
    from offloadgen.errors import OffloadgenError
    from offloadgen.models import preset
    from offloadgen.runtime import plan_run
    two_nodes = World(rank=0, size=2, local_size=1)
    config = RunConfig(device="cpu", dtype="float32", weight_fetch="allgather")
    plan_run(config, preset("opt-125m"), torch.device("cpu"), two_nodes)  # NCCL's all-gather crosses nodes
    with pytest.raises(OffloadgenError, match="every rank must be on one node: found 2 ranks, 1 on this node"):
        plan_run(RunConfig(device="cpu", dtype="float32", weight_fetch="allgather", weight_gather="copy"),
                 preset("opt-125m"), torch.device("cpu"), two_nodes)


@pytest.mark.parametrize("mode", ["allgather", "poolspread"])
def test_a_ring_of_three_reset_midway_gives_the_tokens_of_one_process(tiny, tmp_path, mode):
    """Three ring slots: host copies land up to three blocks ahead of the gathers, round the
    landing buffers; a reset two blocks into a pass (as after a failed pass) starts the copies
    and the gathers again from the first block, on every rank."""
    _, path = tiny("llama3-gqa-rope-scaling")
    out = tmp_path / "tokens.json"
    r = torchrun(3, str(WORKER), str(path), str(out), mode, DIST_RING="3", DIST_RESET="2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == one_process_tokens(path)


@pytest.mark.parametrize("mode,gather", [("allgather", "nccl"), ("poolspread", "copy")])
def test_landing_buffers_beyond_the_ring_give_the_tokens_of_one_process(tiny, tmp_path, mode, gather):
    """Four landing buffers beside a ring of two: each rank's host copies run four blocks ahead of
    the gathers (the worker checks how far), round the buffers and across passes, and the tokens
    stay those of one process; with --weight-gather copy the other ranks read the extra buffers too."""
    _, path = tiny("llama3-gqa-rope-scaling")
    out = tmp_path / "tokens.json"
    r = torchrun(2, str(WORKER), str(path), str(out), mode, DIST_RING="2", DIST_LANDING="4", DIST_GATHER=gather)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == one_process_tokens(path)


def test_pooled_ranks_hold_more_layers_and_stream_fewer_bytes():
    from offloadgen.models import block_nbytes, blocks, preset
    from offloadgen.offload.placement import GiB, plan_placement
    cfg = preset("opt-30b")
    one = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True)
    four = plan_placement(cfg, 2, 16 * GiB, 8, 512, 32, offload=True, pool_ranks=4)
    one_layers = [b for b in one.resident if isinstance(b, int)]
    assert len(four.pooled) >= 4 * len(one_layers) - 4 and not [b for b in four.resident if isinstance(b, int)]
    layer = block_nbytes(cfg, 0, 2)
    assert four.streamed_bytes == one.streamed_bytes - (len(four.pooled) - len(one_layers)) * layer
    assert four.fetched == [b for b in blocks(cfg) if b in four.streamed or b in four.pooled]  # in pass order
    assert set(four.fetched) == {b for b in one.fetched + one_layers if b in four.streamed or b in four.pooled}
    for p in (one, four):  # each rank stays within its budget
        used = sum(v for k, v in p.bytes.items() if k not in ("streamed_per_pass",))
        assert used <= 16 * GiB
    assert four.bytes["pooled_per_rank"] == len(four.pooled) * -(-layer // 4)


def test_streamed_weights_are_one_memory_per_node(tiny, tmp_path):
    _, path = tiny("opt")
    out = tmp_path / "seen.json"
    mine = f"offloadgen-{path.name}-"
    r = torchrun(2, str(WORKER), str(path), str(out), "shared")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == [list(range(100, 108))] * 2
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(mine)]  # nothing left behind
    # nor when a rank dies while the others wait for it
    torchrun(2, str(WORKER), str(path), str(out), "die")
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(mine)]


def test_ranks_plan_from_one_budget_the_smallest(tiny, tmp_path):
    """Without --gpu-memory each rank's budget is its GPU's free memory, which differs by what else
    holds each GPU; ranks planning from their own would place different layers."""
    _, path = tiny("opt")
    out = tmp_path / "budget.json"
    r = torchrun(3, str(WORKER), str(path), str(out), "budget")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == [980] * 3  # ranks' own: 1000, 990, 980


def test_a_dead_rank_ends_the_run_with_an_error(tiny, tmp_path):
    _, path = tiny("opt")
    r = torchrun(2, str(WORKER), str(path), str(tmp_path / "x.json"), "die", timeout=180)
    assert r.returncode != 0
    assert "exitcode" in r.stderr and "3" in r.stderr


def test_bench_starts_torchrun_and_rank_0_reports_for_all(tmp_path, monkeypatch, capfd):
    from offloadgen.cli import main
    monkeypatch.chdir(tmp_path)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "4", "--prompt-len", "32", "--gen-len", "3",
                 "--loops", "1", "--dtype", "float32", "--verbose", "1", "--device", "cpu",
                 "--num-gpus-per-node", "2"]) == 0
    log = tmp_path / "ds-opt-125m-bs4-prompt32-gen3-n1x2-gpu.log"
    assert len(log.read_text().splitlines()) == 4  # written once, by rank 0
    rec = json.loads(log.with_suffix(".jsonl").read_text())
    assert rec["world_size"] == 2 and [r["batch"] for r in rec["per_rank"]] == [2, 2]
    assert rec["decode_throughput"] == pytest.approx(sum(r["decode_throughput"] for r in rec["per_rank"]))
    assert rec["decode_latency_s"] == max(r["decode_latency_s"] for r in rec["per_rank"])
    # gloo ranks on CPUs: neither link to probe, no GPU step to predict, and the record says why
    assert rec["links_probed"] is None and "no CUDA" in rec["link_probe_skipped"]
    assert rec["h2d_aggregate_bytes_s"] is None and rec["nvlink_allgather_bytes_s"] is None
    assert rec["predicted_step_s"] is None and "CPU run" in rec["prediction_skipped"]
    assert "links not probed: no CUDA" in capfd.readouterr().err  # rank 0's summary, from torchrun's process


def test_bench_record_says_no_copies_ran_where_nothing_was_gathered(tmp_path, monkeypatch):
    """--weight-gather copy on CPU ranks that hold every weight: nothing is gathered, and the
    record's peer_copy says so (it said 'push', the default direction, whatever ran)."""
    from offloadgen.cli import main
    monkeypatch.chdir(tmp_path)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    assert main(["bench", "--model", "opt-125m", "--dummy", "--batch-size", "2", "--prompt-len", "16", "--gen-len", "2",
                 "--loops", "1", "--dtype", "float32", "--verbose", "1", "--device", "cpu", "--num-gpus-per-node", "2",
                 "--weight-fetch", "allgather", "--weight-gather", "copy"]) == 0
    [log] = tmp_path.glob("*.jsonl")
    rec = json.loads(log.read_text())
    assert rec["world_size"] == 2 and rec["weight_gather"] == "copy" and rec["streamed_bytes_per_step"] == 0
    assert rec["peer_copy"] is None


def test_link_probe_arithmetic():
    """Four GPUs each copying 1 GiB, the slowest in 25 ms: 171.8 GB/s together. An all-gather of
    1 GiB over 4 ranks in 6 ms: each receives 3/4 GiB, 134.2 GB/s."""
    from offloadgen.distributed import World, aggregate_h2d_rate, allgather_receive_rate, probe_links
    assert aggregate_h2d_rate(1 << 30, 4, 0.025) == pytest.approx(171.8e9, rel=1e-3)
    assert allgather_receive_rate(1 << 30, 4, 0.006) == pytest.approx(134.2e9, rel=1e-3)
    assert allgather_receive_rate(1 << 30, 2, 0.006) == pytest.approx(89.5e9, rel=1e-3)  # half comes from the peer
    assert probe_links(World(), torch.device("cpu")) is None  # one process: nothing to probe together


def test_batch_that_does_not_divide_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = [sys.executable, "-m", "offloadgen.cli", "bench", "--model", "opt-125m", "--dummy", "--batch-size", "3",
           "--prompt-len", "32", "--gen-len", "2", "--device", "cpu", "--num-gpus-per-node", "2"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert r.stderr.count("batch size 3 does not divide by the world size 2") == 1  # said once, by rank 0
    assert not list(tmp_path.glob("*.log"))


def test_generate_under_torchrun_scatters_prompts_and_gathers_them_in_order(tmp_path):
    prompts = ["The capital of France is", "Water boils at", "One, two,", "Red, green,", "Monday, Tuesday,"]
    args = [a for p in prompts for a in ("--prompt", p)] + ["--max-new-tokens", "6", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "offloadgen.cli", "generate", *args, "--output", str(tmp_path / "1.jsonl")],
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    r = torchrun(2, "-m", "offloadgen.cli", "generate", *args, "--output", str(tmp_path / "2.jsonl"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "2.jsonl").read_text() == (tmp_path / "1.jsonl").read_text()
    assert [json.loads(line)["id"] for line in (tmp_path / "2.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_relaunch_passes_a_signal_to_the_launcher_once_and_exits_with_its_code(monkeypatch):
    """Ctrl-C reaches the launcher (launcher.py, which hands it to rank 0) through relaunch, once;
    relaunch then exits with the launcher's code, which says what the ranks did (0 for a server
    stopped on purpose, 130 for a job cut short); the handlers are put back."""
    import os
    import signal

    from offloadgen import distributed

    sent = []

    class FakeLauncher:
        def __init__(self, cmd, **k):
            assert cmd[1:3] == ["-m", "offloadgen.launcher"] and k["start_new_session"]

        def send_signal(self, signum):
            sent.append(signum)

        def wait(self):
            if interrupt:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, in the main thread
            return code

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(distributed.subprocess, "Popen", FakeLauncher)
    for interrupt, code in ((True, 0), (True, 130), (False, 1), (False, 0)):
        sent.clear()
        assert distributed.relaunch(["generate"], 2) == code
        assert sent == ([signal.SIGINT] if interrupt else [])
        assert signal.getsignal(signal.SIGINT) is before
    # A stop that reaches the launcher before it has set its handlers (it is still importing torch)
    # ends it by the signal: exit as a shell reports that, 128 + the signal, not 256 - the signal.
    for interrupt, code, expected in ((True, -signal.SIGINT, 130), (False, -signal.SIGTERM, 143)):
        assert distributed.relaunch(["generate"], 2) == expected


def test_the_launcher_runs_an_older_torchrun_as_it_is(monkeypatch):
    """A torchrun without --signals-to-handle gets the arguments unchanged (its own handling of a
    stop), where a newer one is told to leave SIGINT/SIGTERM to the launcher."""
    import argparse

    import torch.distributed.run as torchrun_module

    from offloadgen import launcher
    seen = []
    monkeypatch.setattr(torchrun_module, "main", lambda argv: seen.append(list(argv)))
    # main installs its own SIGINT/SIGTERM handlers, as the process it is meant to be; not in pytest's
    monkeypatch.setattr(launcher.signal, "signal", lambda *a: None)
    launcher.main(["--standalone", "x.py"])
    assert seen[-1][:2] == ["--signals-to-handle", launcher.AGENT_SIGNALS]
    monkeypatch.setattr(torchrun_module, "get_args_parser", argparse.ArgumentParser)
    assert launcher.main(["--standalone", "x.py"]) == 0
    assert seen[-1] == ["--standalone", "x.py"]


def test_a_stop_while_rank_0_has_no_stop_of_its_own_ends_ranks_that_ignore_sigterm_too(tmp_path):
    """Rank 0 still loading (no SIGTERM handler) while rank 1 already follows it with SIGTERM
    ignored (serve/ranked.py's follow): a stop ends both at once, exit 143 with nothing printed,
    not rank 1's collective failing on rank 0's death with a gloo traceback."""
    import signal
    import time
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, signal, time\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if dist.get_rank() == 1:\n"
        "    signal.signal(signal.SIGTERM, lambda *_: None)\n"
        "open(os.environ['READY'] + str(dist.get_rank()), 'w').close()\n"
        "time.sleep(60) if dist.get_rank() == 0 else None\n"
        "dist.barrier()\n")
    ready = tmp_path / "ready-"
    cmd = [sys.executable, "-m", "offloadgen.launcher", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.Popen(cmd, env={**ENV, "READY": str(ready)}, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    with reaped(proc):
        wait_while_running(proc, lambda: all(Path(f"{ready}{r}").exists() for r in (0, 1)), 120)
        time.sleep(0.5)  # rank 1 waits in its barrier
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "Connection" not in err, err[-3000:]
    assert time.time() - t0 < 20  # not torchrun's 30 s wait for a rank that ignores SIGTERM


def test_the_launcher_finds_its_ranks_without_the_kernels_children_files(monkeypatch):
    """Where /proc/PID/task/TID/children is missing (some kernels and sandboxes), the ranks are
    found by their parent in /proc/PID/stat: the same {local rank: pid} either way."""
    from pathlib import Path

    from offloadgen import launcher
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              env={**os.environ, "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        expected = {0: procs[0].pid, 1: procs[1].pid}
        assert launcher.rank_pids(os.getpid()) == expected
        real_read_text = Path.read_text

        def no_children_files(self, *a, **k):
            if self.name == "children":
                raise FileNotFoundError(self)
            return real_read_text(self, *a, **k)
        monkeypatch.setattr(Path, "read_text", no_children_files)
        assert launcher.rank_pids(os.getpid()) == expected
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("quant", [None, (4, 32)])
def test_a_ranks_part_of_a_block_is_those_bytes_of_the_whole_block(tiny, quant):
    """With allgather and pool a rank makes only its 1/N of each block (StreamingWeights.fill_part):
    for 2, 3 and 5 ranks every part equals those bytes of the block made whole, padding zeros
    included, where a part ends inside a tensor, and a 16-bit part reads only the tensors it overlaps."""
    from offloadgen.offload.packed import ALIGN
    from offloadgen.offload.placement import disk_placement_on_cpu
    from offloadgen.offload.streaming import StreamingWeights
    from offloadgen.quant import QuantConfig
    ckpt = SafetensorsFolder(tiny("llama3-gqa-rope-scaling")[1])
    # float16: a norm weight (64 values) takes 128 bytes, padded to 256 in the packed buffer
    weights = StreamingWeights(ckpt, torch.device("cpu"), torch.float16, disk_placement_on_cpu(ckpt.cfg),
                               progress=False, quant=QuantConfig(*quant) if quant else None)
    layout = weights.layouts[0]
    whole = torch.zeros(layout.nbytes, dtype=torch.uint8)
    weights._fill_block(ckpt, 0, whole)
    read, real_read = [], ckpt.read_block

    def counted(block, dtype, out=None, skip=()):
        got = real_read(block, dtype, out=out, skip=skip)
        read.extend(got)
        return got
    ckpt.read_block = counted
    starts = {off for off, _, _ in layout.entries.values()}
    assert sum(torch.Size(s).numel() * 2 for _, _, s in layout.entries.values()) < layout.nbytes or quant  # padding
    cut = 0
    for n in (2, 3, 5):
        part = -(-layout.nbytes // (n * ALIGN)) * ALIGN
        for r in range(n):
            lo, hi = min(r * part, layout.nbytes), min((r + 1) * part, layout.nbytes)
            out = torch.full((hi - lo,), 7, dtype=torch.uint8)
            read.clear()
            weights.fill_part(ckpt, 0, lo, hi, out)
            assert torch.equal(out, whole[lo:hi]), (n, r)
            cut += lo not in starts and 0 < lo < layout.nbytes
            if not quant and n == 5:
                assert len(read) < len(layout.entries), (n, r, read)
    assert cut >= 3  # parts did end inside tensors
    for lo in range(0, layout.nbytes, 4099):  # any byte range: ends in padding and mid-element too
        hi = min(lo + 1531, layout.nbytes)
        out = torch.full((hi - lo,), 7, dtype=torch.uint8)
        weights.fill_part(ckpt, 0, lo, hi, out)
        assert torch.equal(out, whole[lo:hi]), (lo, hi)


def test_copy_pieces_come_from_the_environment_and_a_bad_size_is_refused(monkeypatch):
    from offloadgen.errors import OffloadgenError
    from offloadgen.offload import pinned
    for raw, expect in (("64", 64 << 20), ("1024", 1 << 30), ("0", None), ("1.5", None), ("big", None)):
        pinned.copy_chunk.cache_clear()
        monkeypatch.setenv("OFFLOADGEN_COPY_CHUNK_MB", raw)
        if expect is None:
            with pytest.raises(OffloadgenError, match=f"whole number of megabytes above 0; got '{raw}'"):
                pinned.copy_chunk()
        else:
            assert pinned.copy_chunk() == expect
    pinned.copy_chunk.cache_clear()
    monkeypatch.delenv("OFFLOADGEN_COPY_CHUNK_MB")
    assert pinned.copy_chunk() == 64 << 20
    pieces = []
    dst, src = torch.empty(10), torch.arange(10.0)
    real = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda d, s, **kw: pieces.append(s.numel()) or real(d, s, **kw))
    pinned.copy_in_chunks(dst, src, chunk=16)  # 40 bytes in pieces of 16
    assert pieces == [16, 16, 8] and torch.equal(dst, src)
    pinned.copy_chunk.cache_clear()  # without a chunk, the environment's
    monkeypatch.setenv("OFFLOADGEN_COPY_CHUNK_MB", "1")
    pieces.clear()
    dst, src = torch.empty(3 << 18), torch.ones(3 << 18)  # 3 MB
    pinned.copy_in_chunks(dst, src)
    pinned.copy_chunk.cache_clear()
    assert pieces == [1 << 20] * 3 and torch.equal(dst, src)


def test_a_nodes_weights_are_counted_once_whether_shared_or_held_in_parts():
    """bench's host-memory model: node-shared blocks are mapped whole by every rank (counted once,
    the largest), parts held by each rank add up (allgather and pool since session 16)."""
    from offloadgen.bench.run import RANK_OVERHEAD_BYTES, host_memory_record
    ranks = [{"weight_host_bytes": n, "kv_host_bytes": 0, "peak_rss_bytes": 0} for n in (30, 30, 30, 10)]
    shared = host_memory_record(0, 1, [{**r, "weight_host_bytes": 100} for r in ranks], 4)
    parts = host_memory_record(0, 1, [{**r, "weight_host_parts": True} for r in ranks], 4)
    assert shared["weight_host_bytes"] == 100 and not shared["weight_host_parts"]
    assert parts["weight_host_bytes"] == 100 and parts["weight_host_parts"]
    assert parts["model_bytes"] == 100 + 4 * RANK_OVERHEAD_BYTES


def test_driver_pinned_memory_lives_while_a_view_does_and_is_freed_on_the_ranks_device(monkeypatch):
    """driver_pinned's memory (cudaHostAlloc, here a fake runtime over malloc) is freed once, by
    cudaFreeHost, when the last view goes, with the rank's device current; a refusal gives None."""
    import contextlib
    import ctypes
    import gc
    from offloadgen.offload import pinned
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    freed, current = [], []

    class FakeRuntime:
        refuse = False

        def cudaHostAlloc(self, ptr, nbytes, flags):
            if self.refuse:
                return 2  # cudaErrorMemoryAllocation
            ptr._obj.value = libc.malloc(nbytes)
            return 0

        def cudaFreeHost(self, ptr):
            freed.append((ptr, current[-1] if current else None))
            libc.free(ctypes.c_void_p(ptr))

        def cudaGetLastError(self):
            return 0
    fake = FakeRuntime()

    @contextlib.contextmanager
    def device(d):
        current.append(d)
        yield
        current.pop()
    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device)
    t = pinned.driver_pinned(4096, "cuda:3")
    t.fill_(5)
    view = t[100:200].view(torch.int16)
    del t
    gc.collect()
    assert not freed and view.sum().item() == 50 * (5 * 256 + 5)
    del view
    gc.collect()
    assert len(freed) == 1 and freed[0][1] == "cuda:3"
    fake.refuse = True
    assert pinned.driver_pinned(4096, "cuda:3") is None
    assert pinned.driver_pinned(0) is None


def test_pinning_registers_from_its_threads_with_the_callers_device_current(monkeypatch):
    """pin_tensors registers from a thread pool, whose threads' current GPU is 0: each call runs
    with the given device (or the caller's) current, so that no rank opens a context on GPU 0."""
    import contextlib
    import threading
    from offloadgen.offload import pinned
    seen, current = [], threading.local()

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            seen.append(getattr(current, "device", None))
            return 0

    @contextlib.contextmanager
    def device(d):
        current.device = d
        yield
        current.device = None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert pinned.pin_tensors([torch.empty(8) for _ in range(5)], threads=3, device="cuda:1") == [True] * 5
    assert seen == ["cuda:1"] * 5
    seen.clear()
    assert pinned.pin_tensors([torch.empty(8)], threads=2) == [True]
    assert seen == [2]  # the caller's current device


@pytest.mark.parametrize("name,value,says", [("OFFLOADGEN_HOST_PARTS", "false", "must be 1 (each rank keeps"),
                                             ("OFFLOADGEN_COPY_CHUNK_MB", "64MB", "whole number of megabytes")])
def test_a_bad_ab_switch_is_refused_when_the_run_is_planned(monkeypatch, name, value, says):
    """Refused before any weight is placed (a CPU bench used to fail only when writing its record)."""
    from offloadgen.config import RunConfig
    from offloadgen.errors import OffloadgenError
    from offloadgen.models import preset
    from offloadgen.offload import pinned
    from offloadgen.runtime import plan_run
    pinned.copy_chunk.cache_clear()
    monkeypatch.setenv(name, value)
    with pytest.raises(OffloadgenError, match=re.escape(says)):
        plan_run(RunConfig(device="cpu", dtype="float32"), preset("opt-125m"), torch.device("cpu"))
    monkeypatch.delenv(name)
    pinned.copy_chunk.cache_clear()
    plan_run(RunConfig(device="cpu", dtype="float32"), preset("opt-125m"), torch.device("cpu"))
