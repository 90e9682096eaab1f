"""`python -m infer.serve`: a real server process on loopback, driven by OpenAI's client.

One server (the tiny random Llama with the real SmolLM2 tokenizer and chat template) is
shared by most tests; the queue-bound and SIGTERM tests start their own small one, and the
loading test runs the app in-process with a loader it holds back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from infer.serve.loadtest import start_server

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
MODEL = "tiny"
CONTEXT = 512  # --max-model-len: makes "prompt longer than the context" cheap to build
SLOW_CLIENT_TIMEOUT = 2  # --header-timeout and --body-timeout of the shared server


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def post(self, path: str, body=None, *, content=None, headers=None, key=KEY) -> httpx.Response:
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        hdrs.update(headers or {})
        return httpx.post(f"{self.url}{path}", json=body, content=content, headers=hdrs, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(model_dir: Path, log: Path, *args: str) -> Server:
    # One intra-op thread: the tiny model gains nothing from more, and OpenMP threads that
    # spin against the test process on a 2-core machine make every step ~10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TUNEWRIGHT_API_KEY", None)
    proc, url = start_server(str(model_dir), list(args), log, env=env, cwd=REPO, timeout=240)
    return Server(proc, url, log)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = launch(tiny_model_dir, log, "--api-key", KEY, "--served-model-name", MODEL,
                 "--max-model-len", str(CONTEXT), "--max-body-bytes", "65536", "--max-batch-size", "32",
                 "--header-timeout", str(SLOW_CLIENT_TIMEOUT), "--body-timeout", str(SLOW_CLIENT_TIMEOUT))
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy continuations from plain transformers `generate`, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def greedy(prompt: str, max_tokens: int) -> str:
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return greedy


PROMPTS = [f"Request {i}: the {w} of {i * 7} is" for i, w in
           enumerate("cat dog sun moon tree rock sea sky map key cup pen box hat car bus".split())]


def test_completions_match_transformers_generate(server, reference):
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert resp.choices[0].text == reference(PROMPTS[0], 20)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 20 and resp.usage.prompt_tokens > 0
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def test_chat_completions_streamed_and_not(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    message = resp.choices[0].message
    assert message.role == "assistant" and message.content
    assert resp.object == "chat.completion" and resp.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_sixteen_concurrent_clients_get_what_infer_generate_gives(server, reference):
    """Mixed prompt and output lengths, half streamed: each answer is greedy `generate`'s
    token for token (through the text), and the requests were decoded together."""
    lengths = [6 + (i * 7) % 29 for i in range(16)]
    expected = [reference(p, n) for p, n in zip(PROMPTS, lengths)]
    before = server.metrics()
    client = server.client()

    def ask(i: int) -> str:
        kw = dict(model=MODEL, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        if i % 2:  # half stream, half do not: both paths share the batch
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected
    after = server.metrics()
    groups = after["tunewright_decode_batch_rows_count"] - before["tunewright_decode_batch_rows_count"]
    rows = after["tunewright_decode_batch_rows_sum"] - before["tunewright_decode_batch_rows_sum"]
    assert rows / groups > 2, "requests were not decoded together"


def test_logprobs_in_openai_shapes(server):
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=5, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == logprob and top[token] == logprob  # greedy: the argmax
        assert all(v <= 0 for v in top.values())
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    assert all(bytes(c.bytes).decode() == c.token for c in content)
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0, logprobs=True, stream=True)
    tokens = [c.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for c in chunk.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == resp.choices[0].text


def test_a_huge_seed_fails_nobody(server):
    """Seeds of any size are taken modulo 2**64: a 64-bit random seed (or a bigger one)
    among other requests leaves their text as it is without it."""
    client = server.client()
    kw = dict(model=MODEL, max_tokens=12, temperature=1.0)
    alone = [client.completions.create(prompt=p, seed=7 + i, **kw).choices[0].text for i, p in enumerate(PROMPTS[:3])]
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(client.completions.create, prompt=p, seed=7 + i, **kw) for i, p in enumerate(PROMPTS[:3])]
        huge = [pool.submit(client.completions.create, prompt=PROMPTS[4], seed=s, **kw) for s in (2**64 - 1, 2**70 + 3, -5)]
        assert [f.result().choices[0].text for f in others] == alone
        assert all(f.result().usage.completion_tokens == 12 for f in huge)
    again = client.completions.create(prompt=PROMPTS[4], seed=2**64 - 1, **kw).choices[0].text
    assert again == huge[0].result().choices[0].text


def test_max_completion_tokens_and_error_param(server):
    client = server.client()
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=3, temperature=0)
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    for body, param in [({"model": MODEL, "prompt": "hi", "temperature": 9.0}, "temperature"),
                        ({"model": MODEL, "prompt": "hi", "max_tokens": "x"}, "max_tokens"),
                        ({"model": MODEL, "prompt": "hi", "n": 0}, "n"),
                        ({"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT}, "max_tokens"),
                        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None)]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        resp = server.post(path, body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if param:
            assert error["param"] == param, error


def test_disconnected_non_streaming_client_frees_its_rows_before_they_finish(server):
    """The client hangs up as soon as its rows generate: they stop long before their 16 x 400
    tokens (about 1.6 s of this CPU's decoding, more beside other test workers) are done. The
    hang-up is timed from the server's own count of running rows, not from a client timeout that a
    fast machine could outrun; the token count, not the wait, says whether they stopped early."""
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 400, "n": 16, "temperature": 0,
                       "ignore_eos": True}).encode()
    before = server.metrics()["tunewright_generation_tokens_total"]
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while server.metrics()["tunewright_sequences_running"] == 0:
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.005)
    sock.close()
    deadline = time.monotonic() + 30
    while server.metrics()["tunewright_sequences_running"] > 0:
        assert time.monotonic() < deadline, "the abandoned rows are still generating"
        time.sleep(0.05)
    assert server.metrics()["tunewright_generation_tokens_total"] - before < 16 * 400


def test_seed_n_and_stop(server):
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=1.0, top_p=0.9)
    first = client.completions.create(seed=1234, n=3, **kw)
    with ThreadPoolExecutor(4) as pool:  # the same seed gives the same draws inside a busier batch
        busy = [pool.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=16, temperature=1.0)
                for p in PROMPTS[6:9]]
        again = client.completions.create(seed=1234, n=3, **kw)
        assert all(f.result().usage.completion_tokens == 16 for f in busy)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1  # n choices are distinct draws
    assert first.usage.completion_tokens == 48
    one = client.completions.create(n=1, **kw).usage.prompt_tokens
    assert first.usage.prompt_tokens == one  # the prompt counts once, not once per choice
    two = client.completions.create(**{**kw, "prompt": [PROMPTS[3], PROMPTS[4]]}, n=2).usage.prompt_tokens
    assert two == one + client.completions.create(**{**kw, "prompt": PROMPTS[4]}).usage.prompt_tokens

    full = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


BAD = {
    "malformed json": (b'{"model": "tiny", "prompt": ', 400),
    "body is a list": (_json([1, 2]), 400),
    "max_tokens wrong type": (_json({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}), 400),
    "temperature wrong type": (_json({"model": MODEL, "prompt": "hi", "temperature": "hot"}), 400),
    "stream wrong type": (_json({"model": MODEL, "prompt": "hi", "stream": "yes"}), 400),
    "negative max_tokens": (_json({"model": MODEL, "prompt": "hi", "max_tokens": -5}), 400),
    "huge max_tokens": (_json({"model": MODEL, "prompt": "hi", "max_tokens": 10**12}), 400),
    "max_tokens past context": (_json({"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT}), 400),
    "prompt longer than context": (_json({"model": MODEL, "prompt": "word " * (CONTEXT + 10)}), 400),
    "unknown field": (_json({"model": MODEL, "prompt": "hi", "max_tokenz": 3}), 400),
    "missing prompt": (_json({"model": MODEL}), 400),
    "token id outside vocab": (_json({"model": MODEL, "prompt": [1, 10**9]}), 400),
    "too many choices": (_json({"model": MODEL, "prompt": "hi", "n": 10_000}), 400),
    "more sequences than the queue holds": (_json({"model": MODEL, "prompt": ["hi"] * 40, "n": 8}), 400),
    "unsupported feature": (_json({"model": MODEL, "prompt": "hi", "suffix": "x"}), 400),
    "too many logprobs": (_json({"model": MODEL, "prompt": "hi", "logprobs": 50}), 400),
    "unknown model": (_json({"model": "gpt-4", "prompt": "hi"}), 404),
    "body too large": (_json({"model": MODEL, "prompt": "x" * 100_000}), 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_openai_error_and_server_survives(server, case):
    content, status = BAD[case]
    resp = server.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    ok = server.client().completions.create(model=MODEL, prompt="still alive?", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_the_model_field_may_be_left_out_but_not_misnamed(server):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    resp = server.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == MODEL and resp.json()["usage"]["completion_tokens"] == 2
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert server.post("/v1/chat/completions", chat).status_code == 200
    resp = server.post("/v1/chat/completions", {**chat, "model": "gpt-4"})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'gpt-4' is not served here" in error["message"] and repr(MODEL) in error["message"]


def test_tokenize_counts_what_generation_prefills_and_detokenize_reads_it_back(server):
    client = server.client()
    text = PROMPTS[3]
    tokens = server.post("/tokenize", {"prompt": text}).json()
    completion = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
    assert tokens["count"] == len(tokens["tokens"]) == completion.usage.prompt_tokens
    assert tokens["max_model_len"] == client.models.list().data[0].max_model_len
    assert server.post("/detokenize", {"model": MODEL, "tokens": tokens["tokens"]}).json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    chat = server.post("/tokenize", {"messages": messages}).json()
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert chat["count"] == reply.usage.prompt_tokens > tokens["count"]
    bare = server.post("/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][:bare["count"]] and bare["count"] < chat["count"]

    for path, body, status, param in [
        ("/tokenize", {"prompt": text, "messages": messages}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": text, "model": "gpt-4"}, 404, "model"),
        ("/detokenize", {"tokens": [0, 10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
    ]:
        resp = server.post(path, body)
        assert resp.status_code == status, (body, resp.text)
        assert resp.json()["error"]["param"] == param, (body, resp.text)
    assert "either prompt" in server.post("/tokenize", {}).json()["error"]["message"]
    assert server.post("/tokenize", {"prompt": text}, key=None).status_code == 401


def test_body_errors_say_what_is_wrong(server):
    cases = {b'{"model": "tiny", "prompt": ': ("request body is not valid JSON", None),
             b"": ("request body is not valid JSON", None),
             _json([1, 2]): ("request body: ", None),
             _json({"model": MODEL}): ("prompt: Field required", "prompt"),
             _json({"model": MODEL, "prompt": "hi", "max_tokenz": 3}): ("max_tokenz: Extra inputs", "max_tokenz")}
    for content, (message, param) in cases.items():
        resp = server.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert resp.status_code == 400, (content, resp.text)
        error = resp.json()["error"]
        assert error["message"].startswith(message) and error["param"] == param, (content, error)


def test_bad_chat_inputs(server):
    cases = [
        ({"model": MODEL, "messages": []}, 400),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * CONTEXT}]}, 400),
    ]
    for body, status in cases:
        resp = server.post("/v1/chat/completions", body)
        assert resp.status_code == status, (body, resp.text)
        assert resp.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=CONTEXT)


def test_api_key_required_on_v1_only(server):
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    # The generation routes answer POST directly; any other method still gets FastAPI's 405.
    wrong_method = httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"] == "Method Not Allowed"


def test_an_unexpected_error_in_a_generation_route_is_a_500_error_body(caplog):
    """The generation endpoints run outside FastAPI's exception handling; theirs gives the
    same answers: an unexpected exception is a 500 with OpenAI's error body, logged once."""
    import asyncio

    from infer.serve.app import ApiError, _Endpoint

    async def call(handler) -> tuple[int, dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        await _Endpoint(handler)(scope, receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    async def broken(request):
        raise RuntimeError("boom")

    async def refused(request):
        raise ApiError(400, "max_tokens: too many", param="max_tokens")

    status, body = asyncio.run(call(broken))
    assert status == 500 and body["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                               "param": None, "code": None}
    assert "unhandled error in /v1/completions" in caplog.text and "boom" in caplog.text
    status, body = asyncio.run(call(refused))
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_metrics_count_what_was_served(server):
    before = server.metrics()
    client = server.client()
    usages = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).usage for p in PROMPTS[:3]]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    usages.append(chat.usage)
    server.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1})
    after = server.metrics()

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('tunewright_requests_total{route="/v1/completions",status="200"}') == 3
    assert delta('tunewright_requests_total{route="/v1/chat/completions",status="200"}') == 1
    assert delta('tunewright_requests_total{route="/v1/completions",status="400"}') == 1
    assert delta("tunewright_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("tunewright_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("tunewright_time_to_first_token_seconds_count") == 4
    assert delta('tunewright_request_latency_seconds_count{route="/v1/completions"}') == 4
    assert after["tunewright_sequences_waiting"] == 0 and after["tunewright_sequences_running"] == 0


def test_disconnected_stream_frees_its_slots(server):
    """16 x 400 tokens (about 1.6 s of this CPU's decoding, where one row's 400 take 0.4 s): the
    hang-up after the first chunk must stop them well before they are done."""
    before = server.metrics()["tunewright_generation_tokens_total"]
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 400, "n": 16, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 30
    while server.metrics()["tunewright_sequences_running"] > 0:
        assert time.monotonic() < deadline, "the abandoned sequence is still generating"
        time.sleep(0.1)
    assert server.metrics()["tunewright_generation_tokens_total"] - before < 16 * 400


def test_one_log_line_per_request_without_prompt_text(server):
    secret = "purple-elephant-password"
    resp = server.client().completions.create(model=MODEL, prompt=secret, max_tokens=3, temperature=0)
    time.sleep(0.2)
    log = server.log.read_text()
    lines = [line for line in log.splitlines() if f"id={resp.id} " in line]
    assert len(lines) == 1, log[-2000:]
    assert "status=200" in lines[0] and "completion_tokens=3" in lines[0] and "latency_ms=" in lines[0]
    assert secret not in log


def test_incomplete_requests_are_closed_and_health_answers_throughout(server):
    """50 connections that stop halfway through their headers or their body (no API key: they
    are closed before auth) are closed after the timeout; /health answers all the while."""
    port = int(server.url.rsplit(":", 1)[1])
    conns = []
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        if i % 2:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half-A-Hea")
        else:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 200\r\n\r\n{\"model\": \"ti")
        conns.append(sock)
    started = time.monotonic()
    closed: dict[int, bytes] = {}

    def read_until_closed(i: int, sock: socket.socket) -> None:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        closed[i] = data

    readers = [threading.Thread(target=read_until_closed, args=(i, s), daemon=True) for i, s in enumerate(conns)]
    for reader in readers:
        reader.start()
    health = []
    while len(closed) < len(conns) and time.monotonic() - started < 60:
        health.append(httpx.get(f"{server.url}/health", timeout=10).status_code)
        time.sleep(0.2)
    for sock in conns:
        sock.close()
    assert len(closed) == len(conns), f"{len(conns) - len(closed)} connections still open after 60 s"
    assert set(health) == {200} and len(health) >= 3
    for i, data in closed.items():
        # Half a body: 408 from the server; half the headers: closed without a word (nothing to answer).
        assert data.startswith(b"HTTP/1.1 408") if i % 2 == 0 else data == b""
    served = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert served.status_code == 200  # and everyone else is served


def test_repeated_log_lines_are_held_back():
    import logging

    from infer.serve.connections import RepeatLimiter

    limiter = RepeatLimiter(interval=60)
    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed: %s", ("Too many open files",),
                                 None) for _ in range(1000)]
    shown = [r for r in records if limiter.filter(r)]
    assert len(shown) == 1
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed: %s", ("other",), None)
    assert limiter.filter(other)
    limiter.interval = 0
    later = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed: %s", ("Too many open files",),
                              None)
    assert limiter.filter(later) and "999 more like it" in later.getMessage()


def test_queue_bound_gives_429_and_sigterm_drains(tiny_model_dir, tmp_path):
    srv = launch(tiny_model_dir, tmp_path / "server.log", "--max-batch-size", "1", "--max-queue", "1")
    try:
        # Long enough (no end of sequence; about 1.8 s on this CPU) that the first request still runs
        # when the third arrives.
        body = {"model": tiny_model_dir.name, "prompt": PROMPTS[2], "max_tokens": 1800, "ignore_eos": True,
                "temperature": 0}
        results = {}

        def run(name):
            results[name] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300)

        running = threading.Thread(target=run, args=("running",))
        running.start()
        _wait_for(lambda: srv.metrics()["tunewright_sequences_running"] == 1)
        waiting = threading.Thread(target=run, args=("waiting",))
        waiting.start()
        _wait_for(lambda: srv.metrics()["tunewright_sequences_waiting"] == 1)
        refused = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"

        assert "waiting" not in results  # it cannot have started yet: the slot is taken
        srv.proc.send_signal(signal.SIGTERM)
        # Draining: /health still answers, with 503, and new work is turned away.
        _wait_for(lambda: _status(f"{srv.url}/health") == 503)
        late = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        running.join(timeout=240)
        waiting.join(timeout=240)
        assert srv.proc.wait(timeout=240) == 0
        for name in ("running", "waiting"):  # both in-flight requests finished in full
            assert results[name].status_code == 200, results[name].text
            assert results[name].json()["usage"]["completion_tokens"] == body["max_tokens"]
    finally:
        srv.stop()


def test_a_drain_timeout_cuts_off_with_one_line(tiny_model_dir, tmp_path):
    srv = launch(tiny_model_dir, tmp_path / "server.log", "--drain-timeout", "1", "--warm-up", "none")
    try:
        # 16 x 2000 tokens: several seconds on this CPU, where one row's 2000 take about 2 s, so the
        # 1 s drain timeout runs out with a wide margin.
        body = {"model": tiny_model_dir.name, "prompt": PROMPTS[0], "max_tokens": 2000, "n": 16, "ignore_eos": True}
        result = {}
        request = threading.Thread(target=lambda: result.update(r=httpx.post(f"{srv.url}/v1/completions", json=body,
                                                                            timeout=120)))
        request.start()
        _wait_for(lambda: srv.metrics()["tunewright_sequences_running"] >= 1)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=120) == 0
        request.join(timeout=60)
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log
    assert re.search(r"drain timeout: cut off request id=cmpl-\w+ POST /v1/completions", log), log[-3000:]
    assert result["r"].status_code == 500


def _engine_pid(server_pid: int) -> int:
    """The engine process: the server's child started by multiprocessing's spawn."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no engine process under server pid {server_pid}")


def test_a_dead_engine_process_fails_its_requests_and_stops_the_server(tiny_model_dir, tmp_path):
    srv = launch(tiny_model_dir, tmp_path / "server.log", "--max-batch-size", "4", "--warm-up", "none")
    result = {}
    try:
        body = {"model": tiny_model_dir.name, "prompt": PROMPTS[0], "max_tokens": 2000, "ignore_eos": True}
        request = threading.Thread(target=lambda: result.update(r=httpx.post(f"{srv.url}/v1/completions", json=body,
                                                                            timeout=120)))
        request.start()
        _wait_for(lambda: srv.metrics()["tunewright_sequences_running"] == 1)
        os.kill(_engine_pid(srv.proc.pid), signal.SIGKILL)
        assert srv.proc.wait(timeout=60) == 1  # for a supervisor to restart it
        request.join(timeout=60)
    finally:
        srv.stop()
    assert result["r"].status_code == 500
    assert "engine process exited unexpectedly" in result["r"].json()["error"]["message"]
    assert "engine process exited unexpectedly" in srv.log.read_text()


def _load_when_released(release: Path, args):
    """A loader that waits for `release` to exist (module level: the engine process unpickles it)."""
    from infer.serve import load_for_serving

    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return load_for_serving(args)


@pytest.mark.parametrize("engine", ["process", "thread"])
def test_health_is_503_until_the_model_is_loaded(tiny_model_dir, tmp_path, engine):
    import functools

    import uvicorn

    from infer.serve import ServerState, build_parser
    from infer.serve.app import create_app

    release = tmp_path / "release"
    args = build_parser().parse_args([str(tiny_model_dir), "--port", "0", "--engine", engine, "--warm-up", "none"])
    state = ServerState(args, loader=functools.partial(_load_when_released, release))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _status(f"{url}/health") is not None)
        assert _status(f"{url}/health") == 503
        loading = httpx.get(f"{url}/v1/models", timeout=10)
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        release.touch()
        _wait_for(lambda: _status(f"{url}/health") == 200, timeout=120)
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == tiny_model_dir.name
        done = httpx.post(f"{url}/v1/completions", json={"model": tiny_model_dir.name, "prompt": "Hi", "max_tokens": 3},
                          timeout=60)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
    finally:
        release.touch()
        server.should_exit = True
        thread.join(timeout=60)


def test_unloadable_model_exits_nonzero_with_reason(tmp_path):
    log = tmp_path / "server.log"
    proc = subprocess.run([sys.executable, "-m", "infer.serve", str(tmp_path / "missing"), "--port", "0"],
                          stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "does not exist" in log.read_text()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_serve_loads_with_the_same_quantization_options(tiny_model_dir):
    import bitsandbytes as bnb

    from infer.serve import build_parser, load_for_serving

    args = build_parser().parse_args([str(tiny_model_dir), "--quant", "nf4", "--keep-modules", "down_proj"])
    model, _ = load_for_serving(args)
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj) is torch.nn.Linear and isinstance(layer.mlp.up_proj, bnb.nn.Linear4bit)
    args = build_parser().parse_args([str(tiny_model_dir), "--adapter"])
    with pytest.raises(ValueError, match="adapter/adapter_config.json"):
        load_for_serving(args)


def test_a_stream_carries_a_chunk_for_tokens_that_render_no_text_yet():
    """A token that renders as nothing yet (half a character, a special token) still gets a
    chunk, as vLLM streams one: the client sees the first token when it is made, not one
    read-back group later, and the text adds up all the same."""
    import asyncio
    from types import SimpleNamespace

    from infer.engine import StreamEvent
    from infer.serve.app import _sse

    events = [StreamEvent(0, [7], "", completion_tokens=1), StreamEvent(0, [8, 9], "é!", completion_tokens=3),
              StreamEvent(0, [10], "", True, "length", completion_tokens=4)]
    job = SimpleNamespace(seqs=[None], events=asyncio.Queue())
    for e in events:
        job.events.put_nowait(e)
    body = SimpleNamespace(include_usage=True, alternatives=None)
    info = SimpleNamespace(prompt_tokens=3, completion_tokens=0)
    state = SimpleNamespace(model_name="m")

    async def collect():
        return [line async for line in _sse(state, job, body, "cmpl-1", False, info)]

    chunks = [json.loads(line[6:]) for line in asyncio.run(collect()) if line != "data: [DONE]\n\n"]
    token_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    assert [c["choices"][0]["text"] for c in token_chunks] == ["", "é!", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []


def test_an_idle_spin_ends_when_a_message_comes_and_never_misses_one():
    """`--idle-spin`: the engine process waits for the server's next message by watching a
    shared counter. A message already in the pipe, or one sent during the spin, ends it at
    once; with none it ends after its time, and the blocking read takes over."""
    import multiprocessing

    from infer.serve.engine_process import _spin

    ctx = multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Pipe(duplex=False)
    sent = ctx.RawValue("Q", 0)

    def send(msg):  # as EngineClient._send: the message first, then the count
        outbox.send(msg)
        sent.value += 1

    send(("add", []))  # already waiting: found by the poll, not by the count
    start = time.perf_counter()
    _spin(inbox, sent, 30.0)
    assert time.perf_counter() - start < 5 and inbox.recv() == ("add", [])

    timer = threading.Timer(0.2, send, args=(("cancel", [1]),))
    start = time.perf_counter()
    timer.start()
    _spin(inbox, sent, 30.0)
    assert 0.15 < time.perf_counter() - start < 5 and inbox.recv() == ("cancel", [1])

    start = time.perf_counter()
    _spin(inbox, sent, 0.1)
    assert 0.09 < time.perf_counter() - start < 5 and not inbox.poll()


def test_the_event_loop_keeps_awake_for_the_idle_spin_after_engine_messages_and_requests():
    """With `--idle-spin`, the server's event loop polls without blocking for that long after
    the engine's last message or the last request sent to it, then sleeps in its selector
    again; with no spin it never stops to poll."""
    import asyncio
    import selectors

    from infer.serve.engine_process import EngineClient

    timeouts = []

    class Recording(selectors.DefaultSelector):
        def select(self, timeout=None):
            timeouts.append(timeout)
            return super().select(timeout)

    loop = asyncio.SelectorEventLoop(Recording())
    try:
        client = EngineClient(None, None, loop=loop)
        client._loop_thread = threading.get_ident()
        client.idle_spin_s = 0.1

        async def run():
            client._dispatch([], 0, 0, None)  # a message from the engine
            await asyncio.sleep(0.06)
            awake = list(timeouts)
            await asyncio.sleep(0.1)
            return awake

        awake = loop.run_until_complete(run())
        # The first sleep only ends on a timer; the spin keeps every poll in it from blocking.
        assert len(awake) > 50 and all(t == 0 for t in awake[1:]), awake[:20]
        assert not client._spinning and any(t is None or t > 0 for t in timeouts[len(awake):])
        timeouts.clear()
        client.idle_spin_s = 0.0
        client._dispatch([], 0, 0, None)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert not client._spinning and len(timeouts) < 10
    finally:
        loop.close()


def test_the_idle_spin_defaults_to_50_ms_with_a_gpu_and_to_none_on_the_cpu():
    from infer.serve.engine_process import idle_spin_seconds
    from infer.serve.server import build_parser

    default = build_parser().parse_args(["run"]).idle_spin
    assert idle_spin_seconds(default, "cuda") == 0.05 and idle_spin_seconds(default, "cpu") == 0
    given = build_parser().parse_args(["run", "--idle-spin", "5"]).idle_spin
    assert idle_spin_seconds(given, "cpu") == idle_spin_seconds(given, "cuda") == 0.005
    assert idle_spin_seconds(build_parser().parse_args(["run", "--idle-spin", "0"]).idle_spin, "cuda") == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accepted_connections_have_tcp_nodelay_on_the_asyncio_event_loop(host):
    # Without uvloop, uvicorn runs asyncio's loop, whose transports set TCP_NODELAY only on
    # sockets created for IPPROTO_TCP: with Nagle on, a stream's first chunk, written right
    # after the response headers, waits ~40 ms for their delayed ACK.
    import asyncio

    from infer.serve.server import _bind

    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        listener = _bind(host, 0)
    except SystemExit as exc:
        pytest.skip(f"cannot listen on {host}: {exc}")
    seen = []

    class Record(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def accept_one():
        server = await asyncio.get_running_loop().create_server(Record, sock=listener)
        _, writer = await asyncio.open_connection(host, listener.getsockname()[1])
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(accept_one())
    assert seen and seen[0] != 0
