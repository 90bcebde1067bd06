"""Batch jobs: kills and resumes lose nothing and repeat nothing; bad lines never stop a job."""
import json
import signal
import subprocess
import sys
import time

import pytest

from offloadgen.errors import OffloadgenError
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offloadgen
from offloadgen.jobs import run_job
from offloadgen.outputs import JobOutput
from offloadgen.sampling import SamplingParams

N_PROMPTS = 48  # the kill lands after 8 answers, the rest still to do (asserted)


@pytest.fixture(scope="module")
def llm():
    return offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)


def write_prompts(path, n=N_PROMPTS):
    # lengths vary so that batches are regrouped by length
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "x" * (1 + i % 37)}) + "\n" for i in range(n)))


def answered(path):
    return [json.loads(line)["line"] for line in path.read_text().split("\n") if line.strip()]


def start_job(src, dst):
    cmd = [sys.executable, "-m", "offloadgen.cli", "generate", "opt-125m", "--dummy", "--input", str(src),
           "--output", str(dst), "--max-new-tokens", "6", "--batch-size", "4"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path, n, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("job made no progress")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_job_resumes_with_every_prompt_answered_exactly_once(tmp_path, sig):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(src)
    proc = start_job(src, dst)
    wait_for_lines(dst, 8, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    partial = answered(dst) if dst.exists() else []
    assert proc.returncode != 0
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "Run the same command again to resume" in err
    assert len(partial) < N_PROMPTS, "the kill came after the job finished: the test proved nothing"
    resumed = start_job(src, dst)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    lines = answered(dst)
    assert sorted(lines) == list(range(1, N_PROMPTS + 1))  # none lost, none duplicated
    assert f"({len(set(partial))} already done earlier)" in err


def test_torn_last_line_is_dropped_and_redone(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(src, 10)
    run_job(llm, src, dst, SamplingParams(max_new_tokens=2), batch_size=3, progress=False)
    full = dst.read_text().split("\n")
    torn = "\n".join(full[:6]) + "\n" + full[6][: len(full[6]) // 2]  # a write cut short
    dst.write_text(torn)
    with JobOutput(dst) as out:
        assert len(out.done) == 6
    assert dst.read_text().endswith("\n")
    run_job(llm, src, dst, SamplingParams(max_new_tokens=2), batch_size=3, progress=False)
    assert sorted(answered(dst)) == list(range(1, 11))


def test_ordered_output_and_bad_lines_reported(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "long long long prompt"}\nnot json\n{"prompt": ""}\n{"prompt": "a"}\n'
                   '{"prompt": "' + "y" * 3000 + '"}\n{"messages": "nope"}\n{"id": [1], "prompt": "b"}\n')
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=2), batch_size=2, ordered=True, progress=False)
    rows = [json.loads(line) for line in dst.read_text().split("\n") if line]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    errors = {r["line"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {2, 3, 5, 6} and s.errors == 4 and s.done == 3
    assert "not valid JSON" in errors[2] and "empty" in errors[3] and "context" in errors[5]


def test_out_of_memory_retries_with_smaller_micro_batches(tmp_path, llm, monkeypatch, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(src, 8)
    real, calls = llm.engine.run_pass, []

    def flaky(batches, cache):
        calls.append(llm.engine.micro_batch_size)
        if llm.engine.micro_batch_size is None or llm.engine.micro_batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batches, cache)

    monkeypatch.setattr(llm.engine, "run_pass", flaky)
    try:
        s = run_job(llm, src, dst, SamplingParams(max_new_tokens=2), batch_size=8, progress=False)
    finally:
        llm.engine.micro_batch_size = None
    assert s.retries == [4, 2] and calls[:3] == [None, 4, 2]
    assert sorted(answered(dst)) == list(range(1, 9))
    assert "start over with micro-batches of 2" in capsys.readouterr().err


def test_lines_set_their_own_sampling_and_records_come_as_requests_end(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "long", "prompt": "aaaa", "max_tokens": 12},  # asked first, ends last
             {"id": "short", "prompt": "bbbb", "max_tokens": 2},
             {"id": "flags", "prompt": "cccc"},  # the command's --max-new-tokens 5
             {"id": "seeded", "prompt": "dddd", "max_tokens": 4, "temperature": 0.8, "top_p": 0.9, "top_k": 40,
              "seed": 3, "stop": None},
             {"id": "bad", "prompt": "eeee", "top_p": 2},
             {"id": "bad2", "prompt": "ffff", "max_tokens": "3"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=5, ignore_eos=True), batch_size=2, progress=False)
    rows = [json.loads(x) for x in dst.read_text().split("\n") if x]
    by_id = {r["id"]: r for r in rows}
    assert "top_p" in by_id["bad"]["error"] and "must be a number" in by_id["bad2"]["error"] and s.errors == 2
    # A job starts the longest max_tokens first: "long" and "flags" take the two slots; "flags"
    # ends first though asked third, "long" last though asked first.
    assert [r["id"] for r in rows if "text" in r][-1] == "long" and [r["id"] for r in rows if "text" in r][0] == "flags"
    assert (by_id["long"]["tokens"], by_id["short"]["tokens"], by_id["flags"]["tokens"]) == (12, 2, 5)
    alone = llm.generate(["dddd"], SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.9, top_k=40, seed=3,
                                                  ignore_eos=True))[0]
    assert by_id["seeded"]["text"] == alone.text and by_id["seeded"]["tokens"] == len(alone.token_ids) == 4


def test_a_line_stop_string_ends_its_request(tmp_path, llm, monkeypatch):
    # each token decodes to '<id>' so that a stop string names a token exactly
    monkeypatch.setattr(llm.tokenizer, "decode", lambda ids: "".join(f"<{i}>" for i in ids))
    [free] = llm.generate(["abc"], SamplingParams(max_new_tokens=8, ignore_eos=True))
    stop = f"<{free.token_ids[2]}>"
    cut = free.token_ids.index(free.token_ids[2]) + 1
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "abc", "stop": stop}) + "\n" + json.dumps({"prompt": "abc"}) + "\n")
    run_job(llm, src, dst, SamplingParams(max_new_tokens=8, ignore_eos=True), batch_size=2, progress=False,
            ordered=True)
    stopped, plain = [json.loads(x) for x in dst.read_text().split("\n") if x]
    assert stopped["finish_reason"] == "stop" and stopped["tokens"] == cut and stop not in stopped["text"]
    assert plain["finish_reason"] == "length" and plain["tokens"] == 8


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
lines = st.one_of(
    st.text(max_size=60).filter(lambda t: "\n" not in t and "\r" not in t),
    json_values.map(json.dumps),
    st.fixed_dictionaries({"prompt": json_values}).map(json.dumps),
    st.fixed_dictionaries({"messages": json_values}).map(json.dumps),
    st.fixed_dictionaries({"id": json_values, "prompt": st.text(max_size=40)}).map(json.dumps),
)


def test_line_separators_inside_prompts_do_not_split_records(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "a\u0085b\u2028c"}, ensure_ascii=False) + "\n" + json.dumps({"prompt": "d"}) + "\n")
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=1), batch_size=2, ordered=True, progress=False)
    assert s.done == 2 and s.errors == 0
    assert [json.loads(line)["prompt"] for line in dst.read_text().split("\n") if line] == ["a\u0085b\u2028c", "d"]


def _json_or_none(text):
    try:
        return json.loads(text.replace("\n", " ").replace("\r", " "))
    except ValueError:
        return None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, min_size=1, max_size=6))
def test_fuzzed_input_lines_never_crash_the_job(tmp_path_factory, llm, input_lines):
    folder = tmp_path_factory.mktemp("fuzz")
    src, dst = folder / "in.jsonl", folder / "out.jsonl"
    src.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in input_lines) + "\n")
    ids = [rec["id"] for rec in map(_json_or_none, input_lines) if isinstance(rec, dict) and rec.get("id") is not None]
    if len({json.dumps(i, sort_keys=True) for i in ids}) < len(ids):  # one clear refusal, nothing written
        with pytest.raises(OffloadgenError, match="have the same id"):
            run_job(llm, src, dst, SamplingParams(max_new_tokens=1), batch_size=4, progress=False)
        assert not dst.exists() or dst.read_text() == ""
        return
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=1), batch_size=4, progress=False)
    rows = [json.loads(line) for line in dst.read_text().split("\n") if line]
    assert len(rows) == s.total == s.done + s.errors
    assert all(("error" in r) != ("text" in r) for r in rows)


def test_a_prompt_without_room_for_the_new_tokens_is_that_lines_error(tmp_path, llm):
    # issue 15, case 9: it aborted every batch it was in, so the job could never finish
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "y" * 2040}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=16), batch_size=2, progress=False)
    rows = {r["line"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert s.errors == 1 and s.done == 1 and rows[2]["tokens"] == 16
    assert "2040 tokens" in rows[1]["error"] and "leaves 2032 for a prompt with 16 new tokens" in rows[1]["error"]


def test_max_seq_len_limits_a_cpu_jobs_lines(tmp_path, llm):
    # a CPU run plans no GPU memory, yet the --max-seq-len given is the limit, as on a GPU
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "y" * 20}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=4), batch_size=2, progress=False, max_seq_len=16)
    rows = {r["line"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert s.errors == 1 and rows[2]["tokens"] == 4
    assert "prompt has 20 tokens; sequences may have 16" in rows[1]["error"]


@pytest.mark.parametrize("limit", [None, 16])
def test_max_seq_len_limits_a_job_across_ranks_as_in_one_process(tmp_path, llm, limit):
    """Rank 0's preparation of a job across ranks refuses the same lines one process does."""
    from offloadgen.jobs import _prepare_on_rank_0, open_job
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "y" * 20}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    with open_job(str(src), str(dst)) as job:
        summary, shares = _prepare_on_rank_0(llm, job, SamplingParams(max_new_tokens=4), 2, 512, "jsonl", limit)
    dealt = sorted(it.line for share in shares for it in share)
    if limit is None:
        assert summary.errors == 0 and dealt == [1, 2]
    else:
        assert summary.errors == 1 and dealt == [2]
        assert "prompt has 20 tokens; sequences may have 16" in json.loads(dst.read_text())["error"]


def test_a_line_whose_max_tokens_alone_exceeds_the_limit_is_told_so(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "x", "max_tokens": 100000}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
    s = run_job(llm, src, dst, SamplingParams(max_new_tokens=2), batch_size=2, progress=False, max_seq_len=16)
    rows = {r["line"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert s.errors == 1 and rows[2]["tokens"] == 2
    assert rows[1]["error"] == ("line 1: max_tokens 100000 leaves no room for a prompt: sequences may have 16 tokens "
                                "(the model's context, or the --max-seq-len planned for)")
