"""A job's output file: never truncated, never someone else's, resumed by id or content, locked,
written whole records at a time; pipes are written without being read. Issue 15, cases 1-6 and
the JSONL ones. The bookkeeping runs on FakeLLM; tests/test_jobs.py keeps the real engine."""
import errno
import json
import os
import threading

import pytest

from offloadgen.cli import main
from offloadgen.errors import OffloadgenError
from offloadgen.jobs import run_job
from offloadgen.sampling import SamplingParams

from fake_llm import FakeLLM, answer

SP = SamplingParams(max_new_tokens=3)


def records(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def job(src, dst, **kw):
    return run_job(kw.pop("llm", None) or FakeLLM(), str(src), str(dst), SP, batch_size=kw.pop("batch_size", 2),
                   progress=False, **kw)


def test_prompt_run_appends_to_a_job_output_instead_of_truncating_it(tmp_path, capsys):
    # case 1: the job's 6 records stay, the prompt's result is appended, and the job still resumes
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"prompt": f"p{i}"} for i in range(6)])
    argv = ["generate", "opt-125m", "--dummy", "--max-new-tokens", "3"]
    assert main([*argv, "--input", str(src), "--output", str(dst)]) == 0
    assert main([*argv, "--prompt", "hi", "--output", str(dst)]) == 0
    rows = records(dst)
    assert len(rows) == 7 and rows[-1]["prompt"] == "hi" and rows[-1]["key"].startswith("prompt:")
    capsys.readouterr()
    assert main([*argv, "--input", str(src), "--output", str(dst)]) == 0
    assert "0 prompts answered this run (6 already done earlier)" in capsys.readouterr().err
    assert len(records(dst)) == 7


@pytest.mark.parametrize("content", ['{"keep":1}\n', '{"keep":1}', "name,value\n1,2\n", '{"key": "x"}\n'])
def test_a_file_that_is_not_ours_is_refused_untouched(tmp_path, content):
    # case 2: only a last line without newline that begins like one of our records is "torn"
    src, dst = tmp_path / "in.jsonl", tmp_path / "c.json"
    write_lines(src, [{"prompt": "a"}])
    dst.write_text(content)
    with pytest.raises(OffloadgenError, match="not an offloadgen record"):
        job(src, dst)
    assert dst.read_text() == content


def test_resume_follows_ids_and_content_when_lines_move(tmp_path, capsys):
    # case 3: a line inserted at the top is answered; no line is answered twice
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    rows = [{"prompt": f"p{i}"} if i % 2 else {"id": f"x{i}", "prompt": f"p{i}"} for i in range(10)]
    rows[9] = rows[3]  # the same line twice, without id: each occurrence is answered
    write_lines(src, rows)
    job(src, dst)
    write_lines(src, [{"prompt": "new"}] + rows[:7] + rows[8:])
    capsys.readouterr()
    s = job(src, dst)
    assert s.done == 1 and s.skipped == 9
    err = capsys.readouterr().err
    assert "9 of 10 input lines answered by earlier runs, 1 to go" in err
    assert "7 answered lines moved since" in err and "1 answered lines are no longer in the input" in err
    prompts = [r["prompt"] for r in records(dst)]
    assert sorted(prompts) == sorted([f"p{i}" for i in range(9)] + ["p3", "new"])  # each once; p7's kept
    assert all(r["text"] == answer(r["prompt"]) for r in records(dst))


def test_duplicate_ids_are_refused_in_one_line(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"id": 7, "prompt": "a"}, {"prompt": "b"}, {"id": 7, "prompt": "c"}])
    with pytest.raises(OffloadgenError, match="lines 1 and 3 have the same id 7") as e:
        job(src, dst)
    assert "\n" not in str(e.value) and not dst.exists()


def test_a_second_job_on_the_same_output_is_refused_naming_the_first(tmp_path):
    # case 4: the lock is held for the whole job; the rival touches nothing
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"prompt": f"p{i}"} for i in range(6)])
    seen = []

    def rival():
        if not seen:
            before = dst.read_bytes()
            with pytest.raises(OffloadgenError, match=f"in use by process {os.getpid()}"):
                job(src, dst)
            seen.append(dst.read_bytes() == before)

    job(src, dst, llm=FakeLLM(on_generate=rival))
    assert seen == [True] and sorted(r["line"] for r in records(dst)) == list(range(1, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "o.jsonl"]


def test_a_pipe_is_written_without_a_resume_scan(tmp_path):
    # case 5: `--output /dev/stdout | cat` read the pipe and hung
    src = tmp_path / "in.jsonl"
    write_lines(src, [{"prompt": f"p{i}"} for i in range(3)])
    r, w = os.pipe()  # three records fit in the pipe's buffer: no reader needed while the job runs
    fired = []  # a job stuck reading the pipe gets its EOF after 20 s, and the test fails
    watchdog = threading.Timer(20, lambda: fired.append(os.close(w)))
    watchdog.start()
    s = job(src, f"/proc/self/fd/{w}")
    watchdog.cancel()
    assert not fired, "the job hung reading the pipe"
    os.close(w)
    with os.fdopen(r) as f:
        rows = [json.loads(line) for line in f.read().splitlines()]
    assert s.done == 3 and sorted(r["line"] for r in rows) == [1, 2, 3]
    with pytest.raises(OffloadgenError, match="not a regular file"):
        job(src, "/dev/null", ordered=True)


def test_ordered_writes_through_a_symlink(tmp_path):
    # case 6: the link stays a link; its target gets the records in input order
    src, target, link = tmp_path / "in.jsonl", tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    write_lines(src, [{"prompt": "x" * (10 - i)} for i in range(5)])
    link.symlink_to(target)
    job(src, link, ordered=True)
    assert link.is_symlink() and [r["line"] for r in records(target)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl", "real.jsonl"]


def test_bom_invalid_utf8_and_nan_ids(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"prompt": "bom"}\n{"prompt": "caf\xe9"}\n{"id": NaN, "prompt": "n"}\n'
                    b'{"id": "\\ud800", "prompt": "s"}\n')
    s = job(src, dst)
    assert s.done == 4 and s.errors == 0
    rows = {r["line"]: r for r in (json.loads(line, parse_constant=pytest.fail) for line in dst.read_text().splitlines())}
    assert rows[1]["prompt"] == "bom" and "warning" not in rows[1]
    assert rows[2]["prompt"] == "caf\ufffd" and "invalid UTF-8" in rows[2]["warning"]
    assert rows[3]["id"] == "NaN" and rows[4]["id"] == "\ud800"  # a lone surrogate, as JSON escapes it


def test_a_full_disk_leaves_no_half_record_and_the_job_resumes(tmp_path, monkeypatch):
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"prompt": f"p{i}"} for i in range(6)])
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(1)
        if len(calls) == 2:  # the second batch: half of it lands, then the disk is full
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr("offloadgen.outputs.os.write", full_disk)
    with pytest.raises(OffloadgenError, match="No space left on device.*free some space and run the same command"):
        job(src, dst)
    assert len(records(dst)) == 2  # the first batch, whole; nothing of the second
    monkeypatch.undo()
    job(src, dst)
    assert sorted(r["line"] for r in records(dst)) == list(range(1, 7))


def test_a_job_can_be_driven_from_another_thread(tmp_path):
    # a scheduler's thread: signal handlers can only be set from the main thread, so none are
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"prompt": "a"}])
    got = []
    worker = threading.Thread(target=lambda: got.append(job(src, dst)))
    worker.start()
    worker.join(30)
    assert got and got[0].done == 1


def test_a_jobs_files_are_refused_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "in.jsonl", tmp_path / "c.json"
    write_lines(src, [{"prompt": "a"}])
    dst.write_text('{"keep":1}\n')

    def never(*a, **kw):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr("offloadgen.api.load", never)
    capsys.readouterr()
    assert main(["generate", "opt-125m", "--dummy", "--input", str(src), "--output", str(dst)]) == 2
    assert "not an offloadgen record" in capsys.readouterr().err and dst.read_text() == '{"keep":1}\n'


def test_a_damaged_middle_record_is_named_by_its_line_with_what_to_do(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"prompt": f"p{i}"} for i in range(3)])
    job(src, dst)
    rows = dst.read_text().split("\n")
    damaged = "\n".join([rows[0], rows[1][:20], rows[2]]) + "\n"  # line 2 cut short, line 3 whole after it
    dst.write_text(damaged)
    with pytest.raises(OffloadgenError) as e:
        job(src, dst)
    assert "line 2 is a damaged offloadgen record" in str(e.value) and f"sed -i '2d' {dst}" in str(e.value)
    assert dst.read_text() == damaged  # untouched
    # doing what it says: the dropped record's input line is answered again, the others are kept
    dst.write_text("\n".join([rows[0], rows[2]]) + "\n")
    assert job(src, dst).done == 1 and sorted(r["line"] for r in records(dst)) == [1, 2, 3]


def test_an_older_offloadgens_records_are_given_their_keys_and_resumed(tmp_path, capsys):
    # records of the version that resumed by line number: no "key"; the id is the line's or its number
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"prompt": "a"}, {"id": "b", "prompt": "b"}, {"prompt": "c"}])
    old = [{"id": 1, "line": 1, "prompt": "a", "text": "x"}, {"id": "b", "line": 2, "prompt": "b", "text": "y"}]
    write_lines(dst, old)
    s = job(src, dst)
    assert (s.skipped, s.done) == (2, 1)
    rows = records(dst)
    assert [r["line"] for r in rows] == [1, 2, 3] and all(isinstance(r["key"], str) for r in rows)
    assert rows[1]["key"] == 'id:"b"' and rows[0]["text"] == "x"
    assert "gave 2 records of an older offloadgen their keys" in capsys.readouterr().err
    assert job(src, dst).done == 0  # keyed now: a rerun has nothing to do


def test_older_records_that_no_longer_match_the_input_say_what_to_do(tmp_path):
    from offloadgen.outputs import JobOutput
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_lines(src, [{"id": "new", "prompt": "a"}])
    content = json.dumps({"id": "old", "line": 1, "prompt": "a", "text": "x"}) + "\n"
    dst.write_text(content)
    with pytest.raises(OffloadgenError, match='record for line 1 \\(id "old"\\), and --input .* has id "new" there'):
        job(src, dst)
    with pytest.raises(OffloadgenError, match="1 record of an older offloadgen .* resume it with --input"):
        JobOutput(dst)  # a --prompt run has no input to key them by
    assert dst.read_text() == content
