"""The load test's own accounting, against a real loopback server on a tiny model."""

from __future__ import annotations

import asyncio
import json

import httpx

from infer.serve.loadtest import one_request, run_level, start_server, summarize
from infer.serve.stream_client import Connection


def test_a_level_counts_every_request_whether_clients_share_a_process_or_not(tiny_model_dir, tmp_path):
    proc, url = start_server(str(tiny_model_dir), ["--max-batch-size", "4"], tmp_path / "server.log")
    try:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        levels = [asyncio.run(run_level(url, model, 4, 2.0, 6, 5, None, procs=procs)) for procs in (1, 2)]
        streamed = asyncio.run(_stream_twice(url, model))
        plain = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "river stone", "max_tokens": 6,
                                                         "temperature": 0, "ignore_eos": True}, timeout=60).json()
    finally:
        proc.terminate()
        assert proc.wait(timeout=120) == 0
    for level in levels:
        assert level["errors"] == 0, level["error_examples"]
        assert level["requests"] >= 4  # every client finished at least one request
        # ignore_eos: each request generates exactly max_tokens, as the server's usage says
        assert level["generated_tokens"] == 6 * level["requests"]
        assert level["ttft_p50_ms"] > 0 and level["idle_before"] and level["idle_after"]
    assert "| 4 |" in summarize(levels)
    # The load test's client: the streamed text is the server's answer, a refusal keeps its
    # status and body, and one connection carries request after request.
    texts, refusal, same_socket, result = streamed
    assert texts[0] == texts[1] == plain["choices"][0]["text"]
    assert refusal[0] == 404 and b"model_not_found" in refusal[1]
    assert same_socket
    assert "error" not in result and result["tokens"] == 6 and result["ttft"] > 0


async def _stream_twice(url: str, model: str):
    conn = Connection(url)
    texts, sockets = [], []
    for _ in range(2):
        text = ""
        async for status, line in conn.post_lines("/v1/completions", {
                "model": model, "prompt": "river stone", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "stream": True}):
            assert status == 200
            if line.startswith(b"data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
        texts.append(text)
        sockets.append(conn._writer)  # still open after a complete keep-alive response
    same_socket = sockets[0] is not None and sockets[1] is sockets[0]
    refusal = [(status, line) async for status, line in conn.post_lines("/v1/completions", {
        "model": "nope", "prompt": "x", "max_tokens": 1})]
    result = await one_request(conn, model, "river stone", 6)
    await conn.close()
    return texts, refusal[0], same_socket, result
