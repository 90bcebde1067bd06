"""One settings object, one builder: `plan`, `bench` and `load()` plan the same run the same way,
and every bad setting is refused with one clear line before anything loads."""
import pytest
import torch

import offloadgen
from offloadgen import runtime
from offloadgen.bench import run as bench_run
from offloadgen.cli import build_parser, main
from offloadgen.config import RunConfig, parse_bytes
from offloadgen.errors import OffloadgenError
from offloadgen.flags import config_from_args
from offloadgen.offload import kv_cache

GiB = 1 << 30


class Planned(Exception):
    """Raised by the spy once a run is planned, so that no weight is loaded."""


@pytest.fixture
def spy(monkeypatch, tmp_path):
    """Every plan made, on a pretend GPU: the links and the CPU-attention probe read fixed figures
    (a probe that reads differently per call would make the three commands disagree, which is the
    point of measuring it once), and the host has room for OPT-30B."""
    plans = []
    real = runtime.plan_run

    def recording(*args, stop=True, **kw):
        plans.append(real(*args, **kw))
        if stop and len(plans) and not recording.plan_command:
            raise Planned()
        return plans[-1]
    recording.plan_command = False
    cuda = lambda config, world=None: torch.device("cuda")  # noqa: E731
    monkeypatch.setattr(runtime, "plan_run", recording)
    monkeypatch.setattr("offloadgen.plan.plan_run", recording)
    monkeypatch.setattr(runtime, "resolve_device", cuda)
    monkeypatch.setattr(bench_run, "resolve_device", cuda)
    monkeypatch.setattr(runtime, "h2d_bandwidth", lambda device: {"best": 50e9, "median": 50e9})
    monkeypatch.setattr(bench_run, "h2d_bandwidth", lambda device: {"best": 50e9, "median": 50e9})
    monkeypatch.setattr(runtime, "available_host_memory", lambda: 400 * GiB)
    monkeypatch.setattr(kv_cache, "probe_cpu_attention_bandwidth", lambda *a, **k: 30e9)
    monkeypatch.setenv("OFFLOADGEN_CACHE", str(tmp_path))  # plan keeps the CPU's figure: not the user's cache
    recording.plans = plans
    return recording


CASES = {
    "fp16": ([], {}),
    "4-bit": (["--quant-bits", "4"], {"quant_bits": 4}),
    "kv-offload": (["--kv-offload", "--micro-batch-size", "8"], {"kv_offload": True, "micro_batch_size": 8}),
    "resident-last": (["--resident-layers", "last"], {"resident_layers": "last"}),
    "disk": (["--disk-offload", "--offload-dir", "/nonexistent/offload"],
             {"disk_offload": True, "offload_dir": "/nonexistent/offload"}),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_bench_and_load_plan_the_same_run(spy, case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags, settings = CASES[case]
    batch = 32 if case == "kv-offload" else 8
    offload = [] if case == "disk" else ["--cpu-offload"]
    spy.plan_command = True
    assert main(["plan", "opt-30b", "--dummy", *offload, *flags, "--gpu-memory", "16GiB", "--batch-sizes", str(batch),
                 "--h2d-bandwidth", "50e9", "--cpu-memory", "400GiB"]) == 0
    spy.plan_command = False
    with pytest.raises(Planned):
        main(["bench", "--model", "opt-30b", "--dummy", *offload, *flags, "--gpu-memory", "16GiB",
              "--batch-size", str(batch), "--prompt-len", "512", "--gen-len", "32"])
    with pytest.raises(Planned):
        offloadgen.load("opt-30b", dummy=True, cpu_offload=case != "disk", gpu_memory=16 * GiB, max_batch_size=batch,
                        max_seq_len=544, max_prompt_len=512, **settings)
    planned, benched, loaded = spy.plans
    for other in (benched, loaded):
        p, q = planned.placement, other.placement
        assert (p.resident, p.streamed, p.ring_slots, p.bytes) == (q.resident, q.streamed, q.ring_slots, q.bytes)
        assert (planned.dtype, planned.quant, planned.budget) == (other.dtype, other.quant, other.budget)
        if case == "kv-offload":  # the same micro-batch split between CPU and GPU attention
            assert planned.kv.gpu_fraction == other.kv.gpu_fraction
            assert {k: planned.kv_model[k] for k in ("gpu_parts", "parts")} == \
                   {k: other.kv_model[k] for k in ("gpu_parts", "parts")}
    assert planned.placement.streamed, "the case must stream something to mean anything"
    if case == "kv-offload":
        assert planned.kv_model["parts"] == 4 and "kv_host" in planned.placement.bytes
    if case == "disk":
        assert planned.placement.bytes["weights_on_disk"]
    kept = [b for b in planned.placement.resident if isinstance(b, int)]
    if case == "resident-last":  # the flag reaches the planner: one run at the end, not spread
        assert kept == list(range(48 - len(kept), 48))
    elif case in ("fp16", "kv-offload"):
        assert kept != list(range(48 - len(kept), 48))


def test_generate_plans_a_gpu_run_under_the_budget_even_without_offloading(spy, capsys):
    # generate on a GPU without --cpu-offload used to skip the budget check that bench made.
    with pytest.raises(OffloadgenError, match=r"needs .* GiB of GPU memory .* budget is 16.0 GiB: add --cpu-offload"):
        main_raising(["generate", "opt-30b", "--dummy", "--gpu-memory", "16GiB", "--prompt", "hi"])


def main_raising(argv):
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


@pytest.mark.parametrize("settings,needle", [
    ({"max_batch_size": 0}, "max_batch_size must be a whole number of at least 1; got 0"),
    ({"micro_batch_size": -1}, "micro_batch_size must be a whole number of at least 1; got -1"),
    ({"max_seq_len": 2.5}, "max_seq_len must be a whole number"),
    ({"prefetch_depth": 0}, "prefetch_depth must be"),
    ({"quant_bits": 3}, "quant_bits must be 4, 8 or 16"),
    ({"quant_group_size": 0}, "quant_group_size must be"),
    ({"gpu_memory": 0}, "gpu_memory must be a whole number of at least 1"),
    ({"gpu_memory": 1 << 60}, "is not a GPU's"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N; got 'tpu'"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"kv_attention": "disk"}, "kv_attention must be one of auto, cpu, gpu"),
    ({"weight_fetch": "p2p"}, "weight_fetch must be one of whole, allgather"),
    ({"weight_gather": "ipc"}, "weight_gather must be one of nccl, copy"),
    ({"resident_layers": "first"}, "resident_layers must be one of spread, last"),
    ({"landing_buffers": 0, "weight_fetch": "allgather"}, "landing_buffers must be a whole number of at least 1"),
    ({"landing_buffers": 4}, "with --weight-fetch whole each rank copies whole layers into its ring"),
    ({"weight_gather": "copy"}, "with --weight-fetch whole each rank copies whole blocks and gathers nothing"),
    ({"pin_kv_cache": True}, "add --kv-offload"),
    ({"async_kv_offload": True}, "add --kv-offload"),
    ({"kv_attention": "gpu"}, "add --kv-offload"),
    ({"kv_overlap": True}, "add --kv-offload"),
    ({"kv_overlap": True, "kv_offload": True, "kv_attention": "gpu"}, "with --kv-attention gpu none attends on the CPU"),
    ({"weight_fetch": "allgather", "disk_offload": True}, "cannot be combined with --disk-offload"),
    ({"max_seq_len": 16, "max_prompt_len": 32}, "max_prompt_len (32) is longer than max_seq_len (16)"),
])
def test_each_bad_setting_is_one_clear_error(settings, needle):
    with pytest.raises(OffloadgenError) as e:
        RunConfig(**settings).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_settings_pass_and_explicit_off_is_not_a_conflict():
    RunConfig(kv_offload=True, pin_kv_cache=False, async_kv_offload=True, kv_attention="cpu").validate()
    RunConfig(pin_kv_cache=False, async_kv_offload=False).validate()  # --no-pin-kv-cache alone asks for nothing
    RunConfig(kv_offload=True, kv_overlap=True, kv_attention="cpu").validate()  # beside prompt chunks on the GPU
    RunConfig(weight_fetch="pool", weight_gather="copy", cpu_offload=True).validate()


# serve builds through load() as generate does (and, run without the refusal, would serve); plan
# refuses --device cpu itself
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_kv_overlap_on_the_cpu_is_refused(capsys, command):
    """A thread of its own beside the GPU's work does nothing where there is no GPU: said, not ignored."""
    argv = {"generate": ["generate", "--prompt", "hi", "--max-new-tokens", "1"],
            "bench": ["bench", "--batch-size", "1", "--prompt-len", "8", "--gen-len", "1", "--model"]}[command]
    assert main([*argv, "opt-125m", "--dummy", "--device", "cpu", "--kv-offload", "--kv-overlap"]) == 2
    assert "--kv-overlap overlaps CPU attention with a GPU's work; this run is on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,needle", [("--device", "tpu", "device must be cpu, cuda"),
                                               ("--micro-batch-size", "-1", "micro_batch_size must be")])
def test_bad_flags_are_one_line_and_exit_2_in_every_command(capsys, flag, value, needle):
    for argv in (["generate", "opt-125m", "--dummy", "--prompt", "hi"], ["bench", "--model", "opt-125m", "--dummy"],
                 ["plan", "opt-125m", "--dummy", "--h2d-bandwidth", "50GB"]):
        assert main([*argv, flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("offloadgen: error:") and needle in err[0], err


@pytest.mark.parametrize("text", ["1e400", "0", "-5GiB", "nan", "lots"])
def test_sizes_that_are_not_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_bytes(text)
    assert parse_bytes("16GiB") == 16 * GiB and parse_bytes("8e9") == 8_000_000_000


@pytest.mark.parametrize("text,needle", [("-1GiB", "is negative"), ("-0.5", "is negative"), ("0", "is zero"),
                                         ("0GiB", "is zero")])
def test_negative_and_zero_sizes_say_so(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_bytes(text)


def test_shared_flags_are_spelled_and_mean_the_same_in_every_command():
    common = ["--cpu-offload", "--gpu-memory", "12GiB", "--quant_bits", "8", "--quant-group-size", "32", "--kv-offload",
              "--no-pin-kv-cache", "--async_kv_offload", "--kv-attention", "cpu", "--micro_batch_size", "4",
              "--prefetch-depth", "2", "--pin-memory", "0", "--weight-fetch", "allgather", "--dtype", "float16"]
    parser = build_parser()
    configs = [config_from_args(parser.parse_args(argv + common)) for argv in
               (["generate", "m"], ["bench", "--model", "m"], ["plan", "m"])]
    assert configs[0] == configs[1] == configs[2]
    c = configs[0]
    assert (c.gpu_memory, c.quant_bits, c.pin_kv_cache, c.async_kv_offload, c.pin_memory) == (12 * GiB, 8, False, True, False)


def test_kv_cache_defaults_differ_only_where_the_reference_says(capsys):
    parser = build_parser()
    gen = config_from_args(parser.parse_args(["generate", "--kv-offload"]))
    bench = bench_run.bench_config(config_from_args(parser.parse_args(["bench", "--kv-offload"])),
                                   bench_run.Workload(), 1)
    assert (gen.kv_pinned(), gen.kv_async()) == (True, True)  # generate: pinned, asynchronous
    assert (bench.kv_pinned(), bench.kv_async()) == (False, False)  # bench: the reference's defaults
    assert "off, as in the reference benchmark" in " ".join(parser._subparsers._group_actions[0].choices["bench"]
                                                            .format_help().split())


def test_a_max_seq_len_beyond_the_context_is_refused_not_cut():
    import offloadgen
    with pytest.raises(OffloadgenError, match="--max-seq-len 99999 is beyond the model's context of 2048 tokens"):
        offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False, max_seq_len=99999)
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False, max_seq_len=2048)
    llm.close()


class _OrderedCheckpoint(offloadgen.checkpoint.DummyCheckpoint):
    """Records the order of tokenizer and weight reads. The tokenizer takes a moment, so a builder
    that loads it beside the weights (a thread, as before issue 18's measurement) reads a weight first."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.events = []

    def tokenizer(self):
        self.events.append("tokenizer started")
        import time
        time.sleep(0.5)
        self.events.append("tokenizer done")
        return super().tokenizer()

    def read_block(self, *args, **kwargs):
        if not self.events or self.events[-1] != "weight":
            self.events.append("weight")
        return super().read_block(*args, **kwargs)


def test_the_tokenizer_loads_before_the_weights():
    """In a thread beside the weight load, transformers' import starved the loader threads of the
    GIL (OPT-13B's weights: 31 s instead of 16 on the H100); from a tokenizer.json it takes well
    under a second, so it comes first, whole."""
    from offloadgen.models import preset
    ckpt = _OrderedCheckpoint(preset("opt-125m"))
    rt = runtime.build_runtime(RunConfig(model="opt-125m", dummy=True, device="cpu", max_batch_size=1,
                                         max_seq_len=16), checkpoint=ckpt)
    try:
        assert rt.tokenizer.encode("a") and ckpt.events == ["tokenizer started", "tokenizer done", "weight"]
    finally:
        rt.close()


def test_a_job_loads_its_tokenizer_once_before_the_weights(monkeypatch, tmp_path):
    """`generate --input` encodes its prompts after loading and leaves the tokenizer to the builder."""
    import json

    import offloadgen.checkpoint
    from offloadgen.models import preset

    ckpt = _OrderedCheckpoint(preset("opt-125m"))
    monkeypatch.setattr(offloadgen.checkpoint, "open_checkpoint", lambda *a, **kw: ckpt)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi", "max_tokens": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "opt-125m", "--dummy", "--device", "cpu", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(out)]) == 0
    assert ckpt.events == ["tokenizer started", "tokenizer done", "weight"]
    assert json.loads(out.read_text().splitlines()[0])["text"] is not None


def test_a_folder_without_tokenizer_files_is_refused_in_one_line(tiny):
    folder = tiny("llama2-mha")[1]  # save_pretrained of a model writes no tokenizer
    with pytest.raises(OffloadgenError, match="no tokenizer files"):
        runtime.build_runtime(RunConfig(model=str(folder), device="cpu", max_batch_size=1, max_seq_len=16))


class _BrokenTokenizerCheckpoint(offloadgen.checkpoint.DummyCheckpoint):
    def tokenizer(self):
        raise OffloadgenError("cannot load its tokenizer (a broken tokenizer.json)")


def test_a_broken_tokenizer_is_told_before_any_weight_is_read(monkeypatch):
    """A checkpoint whose tokenizer cannot load fails before minutes of reading its weights, and
    leaves no weight source (threads, pinned buffers) behind in a long-lived process."""
    from offloadgen.models import preset
    made = []
    monkeypatch.setattr(runtime, "make_weights", lambda plan, checkpoint: made.append(plan))
    with pytest.raises(OffloadgenError, match="broken tokenizer.json"):
        runtime.build_runtime(RunConfig(model="opt-125m", dummy=True, device="cpu", max_batch_size=1, max_seq_len=16),
                              checkpoint=_BrokenTokenizerCheckpoint(preset("opt-125m")))
    assert made == []


def test_a_refused_plan_ends_the_process_without_waiting_for_the_tokenizer(tmp_path):
    """The plan is checked before the tokenizer loads: a refused plan is told at once, not after a
    tokenizer that imports transformers (seconds)."""
    import os
    import subprocess
    import sys
    script = tmp_path / "refused.py"
    script.write_text(
        "import time, offloadgen\n"
        "from offloadgen import runtime\n"
        "from offloadgen.config import RunConfig\n"
        "from offloadgen.models import preset\n"
        "class Slow(offloadgen.checkpoint.DummyCheckpoint):\n"
        "    def tokenizer(self):\n"
        "        time.sleep(120)\n"
        "try:\n"
        "    runtime.build_runtime(RunConfig(model='opt-125m', dummy=True, device='cpu', max_seq_len=99999),\n"
        "                          checkpoint=Slow(preset('opt-125m')))\n"
        "except offloadgen.OffloadgenError as e:\n"
        "    print('refused:', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # the tokenizer sleeps 120 s: a builder that loads it before planning runs past the timeout
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=40, env=env)
    assert "refused: --max-seq-len 99999" in done.stdout, done.stderr
