"""The load test's own accounting, against a real loopback server on a tiny model."""

from __future__ import annotations

import asyncio

import httpx

from infer.serve.loadtest import run_level, start_server, summarize


def test_a_level_counts_every_request_whether_clients_share_a_process_or_not(tiny_model_dir, tmp_path):
    proc, url = start_server(str(tiny_model_dir), ["--max-batch-size", "4"], tmp_path / "server.log")
    try:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        levels = [asyncio.run(run_level(url, model, 4, 2.0, 6, 5, None, procs=procs)) for procs in (1, 2)]
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
