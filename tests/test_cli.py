"""The command line: good input gives text on stdout; bad input a one-line error, exit 2."""
import json
import re
import subprocess
import sys

import pytest

from offloadgen.cli import main

from conftest import make_checkpoint


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress)
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offloadgen: error:"), err
    for n in needles:
        assert n in lines[0]


def test_missing_path(capsys, tmp_path):
    one_line_error(*run(capsys, "generate", str(tmp_path / "nope"))[::2], "does not exist")


def test_folder_without_config(capsys, tmp_path):
    one_line_error(*run(capsys, "generate", str(tmp_path))[::2], "no config.json")


def test_unsupported_architecture_names_the_supported_ones(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    one_line_error(*run(capsys, "generate", str(tmp_path))[::2], "gpt_neox", "llama", "opt", "bloom")


def test_truncated_safetensors(capsys, tmp_path, tiny):
    _, path = tiny("opt")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    one_line_error(*run(capsys, "generate", str(bad))[::2], "truncated or corrupt")


def test_missing_tensor(capsys, tmp_path):
    from safetensors.torch import load_file, save_file
    make_checkpoint("llama2-mha", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    one_line_error(*run(capsys, "generate", str(tmp_path))[::2], "model.layers.1.mlp.up_proj.weight", "missing")


def test_prompt_longer_than_context(capsys):
    code, _, err = run(capsys, "generate", "opt-125m", "--dummy", "--prompt", "x" * 2100, "--max-new-tokens", "2")
    one_line_error(code, err, "2100 tokens", "context is 2048")


def test_unknown_preset(capsys):
    one_line_error(*run(capsys, "generate", "opt-7b", "--dummy")[::2], "no built-in config", "opt-6.7b")


def test_generate_prompt_to_stdout(capsys, tiny, tmp_path):
    _, path = tiny("opt")
    code, out, err = run(capsys, "generate", "opt-125m", "--dummy", "--prompt", "hello", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("hello")


def test_jsonl_in_and_out(capsys, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "one"}\n{"prompt": "two two"}\n{"id": 7, "messages": [{"role": "user", "content": "hi"}]}\n')
    code, out, err = run(capsys, "generate", "opt-125m", "--dummy", "--input", str(src), "--output", str(dst),
                         "--max-new-tokens", "4", "--batch-size", "2", "--ordered")
    assert code == 0 and out == ""
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 2, 7] and [r["line"] for r in rows] == [1, 2, 3]
    assert all(r["tokens"] == 4 and r["finish_reason"] == "length" for r in rows)
    assert "3 prompts answered" in err
    # the passes over the weights: 12 tokens in 2 slots take at least 6 (benchmarks/serve_load.py reads them)
    passes = re.search(r"(\d+) passes of ([0-9.]+) s\)", err)
    assert passes and 6 <= int(passes.group(1)) <= 12 and float(passes.group(2)) > 0


def test_input_without_output_is_refused(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n')
    one_line_error(*run(capsys, "generate", "opt-125m", "--dummy", "--input", str(src))[::2], "--output")


def test_no_traceback_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "offloadgen.cli", "generate", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().startswith("offloadgen: error:")


def test_cpu_offload_on_a_cpu_run_is_refused_clearly(capsys):
    one_line_error(*run(capsys, "generate", "opt-125m", "--dummy", "--device", "cpu", "--cpu-offload",
                        "--prompt", "hi")[::2], "streams weights to a GPU")


def test_requests_beyond_the_planned_limits_are_refused():
    import offloadgen
    from offloadgen.errors import OffloadgenError
    from offloadgen.sampling import SamplingParams
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    llm.limits = (2, 16)  # as if placed on a GPU for 2 prompts of 16 tokens
    with pytest.raises(OffloadgenError, match="at most 2 and sequences of at most 16"):
        llm.generate(["a", "b", "c"], SamplingParams(max_new_tokens=2), static=True)
    with pytest.raises(OffloadgenError, match="at most 2 and sequences of at most 16"):
        llm.generate(["a", "b", "c"], SamplingParams(max_new_tokens=2), batch_size=3)
    with pytest.raises(OffloadgenError, match="at most 2 and sequences"):
        llm.generate(["a"], SamplingParams(max_new_tokens=20))
    assert llm.generate(["a", "b"], SamplingParams(max_new_tokens=4))
    # more prompts than planned slots: continuous batching queues them
    assert len(llm.generate(["a", "b", "c"], SamplingParams(max_new_tokens=2))) == 3 and llm._batcher.slots == 2


@pytest.mark.parametrize("argv,needle", [(["generate", "--gpu-memory", "1e400"], "not a usable size"),
                                         (["generate", "--seed", "1e23"], "invalid int value"),
                                         (["bench", "--quant-bits", "3"], "invalid choice"),
                                         (["plan", "--no-such-flag"], "unrecognized arguments"),
                                         (["generate", "--gpu-memory", "-1GiB"], "'-1GiB' is negative"),
                                         (["generate", "--gpu_memory", "-5"], "'-5' is negative"),
                                         (["plan", "--cpu-memory", "0"], "'0' is zero")])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("offloadgen: error:") and needle in err[0], err


def test_what_a_hostile_pass_found_is_one_line(capsys, tmp_path):
    # a seed torch cannot take, plan on the CPU, an output that cannot be sought, a folder as input
    one_line_error(*run(capsys, "generate", "opt-125m", "--dummy", "--prompt", "hi", "--seed",
                        "99999999999999999999999")[::2], "seed must be a whole number that fits in 64 bits")
    one_line_error(*run(capsys, "plan", "opt-125m", "--dummy", "--device", "cpu")[::2], "plan predicts a run on a GPU")
    one_line_error(*run(capsys, "generate", "opt-125m", "--dummy", "--prompt", "hi", "--max-new-tokens", "2",
                        "--output", "/proc/version")[::2], "/proc/version")
    one_line_error(*run(capsys, "generate", "opt-125m", "--dummy", "--input", str(tmp_path), "--output",
                        str(tmp_path / "o.jsonl"))[::2], "a folder")
    one_line_error(*run(capsys, "generate", "opt-125m", "--dummy", "--prompt", "hi", "--prefill-chunk", "0")[::2],
                   "--prefill-chunk must be at least 1; got 0")
    one_line_error(*run(capsys, "plan", "opt-125m", "--dummy", "--cpu-offload", "--quant-bits", "4",
                        "--quant-group-size", "100000")[::2], "--quant-group-size 100000")


def test_a_job_line_with_a_seed_torch_cannot_take_is_its_error(capsys, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "a", "seed": 99999999999999999999999}\n{"prompt": "b"}\n')
    code, _, err = run(capsys, "generate", "opt-125m", "--dummy", "--input", str(src), "--output", str(dst),
                       "--max_new_tokens", "2")  # the underscore spelling too
    assert code == 0, err
    rows = {r["line"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert "seed must be a whole number" in rows[1]["error"] and rows[2]["tokens"] == 2


def never_loaded(monkeypatch):
    def never(*a, **kw):
        raise AssertionError("the model was loaded before the lengths were checked")
    monkeypatch.setattr("offloadgen.api.load", never)


def test_max_seq_len_shorter_than_the_prompt_is_refused_before_loading_on_the_cpu(capsys, monkeypatch):
    never_loaded(monkeypatch)
    code, _, err = run(capsys, "generate", "opt-125m", "--dummy", "--device", "cpu", "--prompt", "x" * 12,
                       "--max-seq-len", "4", "--max-new-tokens", "3")
    one_line_error(code, err, "the prompt has 12 tokens", "needs 15", "more than --max-seq-len 4")
    code, _, err = run(capsys, "generate", "opt-125m", "--dummy", "--device", "cpu", "--prompt", "x" * 12,
                       "--prompt", "y", "--max-seq-len", "13", "--max-new-tokens", "3")
    one_line_error(code, err, "prompt 0 has 12 tokens", "--max-seq-len 13")


def test_a_prompt_and_its_new_tokens_beyond_the_context_are_refused_before_loading(capsys, monkeypatch):
    never_loaded(monkeypatch)
    code, _, err = run(capsys, "generate", "opt-125m", "--dummy", "--prompt", "hi", "--max-new-tokens", "5000")
    one_line_error(code, err, "needs 5002", "the model's context of 2048 tokens", "lower --max-new-tokens to 2046")


def test_a_value_that_starts_with_a_dash_reaches_its_flag(capsys):
    from offloadgen.cli import build_parser
    from offloadgen.flags import glue_dash_values
    args = build_parser().parse_args(glue_dash_values(["generate", "--prompt", "-3dB louder", "--seed", "-1"]))
    assert args.prompt == ["-3dB louder"] and args.seed == -1
    assert glue_dash_values(["generate", "--", "--prompt", "-1x"]) == ["generate", "--", "--prompt", "-1x"]
