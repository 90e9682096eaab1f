"""The load test's own accounting, against a real loopback server on a tiny model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

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


def test_join_profile_times_every_chunk_of_the_joining_prompt(tiny_model_dir, tmp_path):
    """`python -m infer.serve.join_profile`: the joining prompt's chunks (the first fresh, the
    rest extending its row) and the decode groups between them, timed over the join's window."""
    from infer.serve.join_profile import main, profile_join, table
    from infer.serve.engine import build_engine
    from infer.serve.server import build_parser, load_for_serving

    args = build_parser().parse_args([str(tiny_model_dir), "--prefill-chunk", "32", "--max-batch-size", "4"])
    model, tok = load_for_serving(args)
    engine = build_engine(model, tok, args)
    profile = profile_join(engine, tok, streams=2, prompt_tokens=100, stream_tokens=200)
    prefills = [(c["name"], c["detail"]) for c in profile.calls if c["name"] != "decode_group"]
    assert prefills == [("prefill_fresh", "rows=1 tokens=32"), ("prefill_extend", "start=32 tokens=32"),
                        ("prefill_extend", "start=64 tokens=32"), ("prefill_extend", "start=96 tokens=4")]
    # the streams decode a group of steps between any two chunks: the prompt never holds them for two
    names = [c["name"] for c in profile.calls]
    assert names[-1] == "decode_group"
    assert not any(a != "decode_group" and b != "decode_group" for a, b in zip(names, names[1:])), names
    assert all(c["host_ms"] > 0 and c["gpu_ms"] is None for c in profile.calls)  # no CUDA events on the CPU
    assert profile.long_ttft_ms > 0 and profile.max_gap_ms >= profile.median_gap_ms > 0
    assert not engine.has_work and "| prefill_extend | start=96 tokens=4 |" in table(profile)
    out = tmp_path / "join.json"
    assert main([str(tiny_model_dir), "--prefill-chunk", "64", "--streams", "2", "--prompt-tokens", "100",
                 "--stream-tokens", "200", "--runs", "1", "--json", str(out)]) == 0
    assert [c["detail"] for c in json.loads(out.read_text())[0]["calls"] if c["name"] == "prefill_extend"] == \
        ["start=64 tokens=36"]


def test_levels_are_put_beside_bench_figures_of_the_same_batch():
    from infer.serve.loadtest import against_bench, main

    bench = {"rows": [{"name": "static", "batch": 1, "ttft_ms": 9.0, "decode_tok_s": 100.0, "aggregate_tok_s": 100.0},
                      {"name": "static + compile", "batch": 1, "ttft_ms": 2.0, "decode_tok_s": 900.0, "aggregate_tok_s": 900.0},
                      {"name": "static + compile", "batch": 32, "ttft_ms": 20.0, "decode_tok_s": 600.0,
                       "aggregate_tok_s": 19200.0}]}
    level = {"stream_tok_s_median": 945.0, "ttft_p50_ms": 3.0, "tokens_per_s": 880.0}
    levels = [dict(level, concurrency=1), dict(level, concurrency=32, tokens_per_s=14400.0),
              dict(level, concurrency=64, tokens_per_s=30000.0)]
    text = against_bench(levels, {"streams": 16, "prompt_tokens": 4000, "max_gap_during_join_ms": 34.3}, bench)
    assert "| 1 client: per-stream decode tok/s | 945.0 | 900.0 (batch 1) | 105.0% |" in text
    assert "| 1 client: TTFT p50 | 3.00 ms | 2.000 ms (batch 1) | 1.50x |" in text  # the compiled row, not the first
    assert "| 32 clients: generated tok/s | 14400.0 | 19200.0 (batch 32) | 75.0% |" in text
    assert "64 clients" not in text  # bench has no batch 64
    assert "a 4000-token prompt joins: longest gap | 34.3 ms" in text
    with pytest.raises(SystemExit):  # a file that is not bench's JSON is refused before anything runs
        main(["--url", "http://127.0.0.1:9", "--bench", __file__])
