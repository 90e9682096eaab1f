"""Load test for `python -m infer serve`: streaming clients at fixed concurrency levels.

    python -m infer.serve.loadtest --url http://127.0.0.1:8000 --model NAME --levels 1:20,32:120
    python -m infer.serve.loadtest --serve runs/demo --levels 1:20,32:120 --out serve-bench.json
    python -m infer bench --model runs/demo --rows compile,batch --batch-sizes 1,32 --json bench.json
    python -m infer.serve.loadtest --serve runs/demo --levels 1:20,32:120 --bench bench.json

Each level runs N clients, each sending one streaming /v1/completions request after
another for the given seconds (requests in flight at the end are allowed to finish).
Reported per level: aggregate generated tokens/s (from the server's `usage` counts),
per-request p50/p99 time to first token, errors, and the server's memory (GPU allocated
and reserved, process RSS from /metrics) sampled through the run, so growth shows.
`--bench` puts the levels beside `python -m infer bench --json` figures of the same model
(per-stream decode and TTFT at 1 client against batch 1, N clients against batch N).

`--random-model DIR --tokenizer TOKDIR` first writes a randomly initialised model of a
public architecture's shape (speed does not depend on weight values; there is no hub on
the GPU machines) and serves that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ("llama-3.2-1b",)  # --shape: architectures of infer.random_model

WORDS = ("river stone lantern orbit copper meadow signal harbor velvet canyon ember tide "
         "quartz willow beacon prism falcon glacier thistle marble cobalt juniper").split()


def make_random_model(out: Path, tokenizer_dir: Path, shape: str) -> Path:
    """Write a random-weight Llama of `shape` (bf16) with the given tokenizer to `out`."""
    import torch
    from transformers import AutoTokenizer

    from infer.random_model import architecture_config, save_random_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Longer context than the config default so long prompts and outputs fit any load level.
    config = architecture_config(shape, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return save_random_model(out, config, tok, dtype=torch.bfloat16, device=device)


def prompt_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(conn, model: str, prompt, max_tokens: int, temperature: float = 0.0,
                      arrivals: list | None = None) -> dict:
    """One streamed completion over `conn` (a stream_client.Connection); `arrivals` (if given)
    collects the arrival time of every chunk that carries tokens, as it arrives (the server
    streams one for each group of tokens, also when they render as no text yet, e.g. a special
    token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage, error = None, None, None
    times = arrivals if arrivals is not None else []
    try:
        async for status, line in conn.post_lines("/v1/completions", body):
            now = time.perf_counter()
            if status != 200:
                return {"error": f"HTTP {status}: {line[:200]!r}"}
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"].get("message")
            elif chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:  # a chunk of tokens
                times.append(now)
                if ttft is None:
                    ttft = now - start
    except Exception as exc:  # a load test counts failures instead of stopping at the first
        return {"error": f"{type(exc).__name__}: {exc}"}
    if error or usage is None:
        return {"error": error or "stream ended without a usage chunk"}
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": ttft, "latency": time.perf_counter() - start, "tokens": usage["completion_tokens"],
            "max_gap": max(gaps, default=0.0), "decode_s": times[-1] - times[0] if len(times) > 1 else 0.0}


async def scrape(client, url: str) -> dict:
    text = (await client.get(f"{url}/metrics")).text
    wanted = ("tunewright_gpu_memory_allocated_bytes", "tunewright_gpu_memory_reserved_bytes",
              "process_resident_memory_bytes", "tunewright_engine_process_resident_memory_bytes",
              "tunewright_sequences_running", "tunewright_sequences_waiting",
              "tunewright_decode_cuda_graphs", "tunewright_prefill_cuda_graphs", "tunewright_compiled_graphs",
              "tunewright_time_to_first_token_seconds_sum", "tunewright_time_to_first_token_seconds_count")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


async def _clients(url: str, model: str, seeds: range, deadline: float, max_tokens: int, prompt_words: int,
                   api_key: str | None, temperature: float) -> list[dict]:
    """One client per seed, each sending one request after another until `deadline`
    (time.time(), so processes agree on it)."""
    from infer.serve.stream_client import Connection

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict] = []

    async def worker(seed: int):
        rng, conn = random.Random(seed), Connection(url, headers)
        try:
            while time.time() < deadline:
                results.append(await one_request(conn, model, prompt_text(rng, prompt_words), max_tokens, temperature))
        finally:
            await conn.close()

    await asyncio.gather(*(worker(seed) for seed in seeds))
    return results


def _clients_in_process(*args) -> list[dict]:
    return asyncio.run(_clients(*args))


async def run_level(url: str, model: str, concurrency: int, seconds: float, max_tokens: int,
                    prompt_words: int, api_key: str | None, temperature: float = 0.0, procs: int = 1) -> dict:
    """`concurrency` clients for `seconds`. `procs` > 1 spreads the clients over that many
    processes: one Python process parsing every streamed chunk of a hundred clients can
    itself become the bottleneck and inflate the latencies it reports."""
    import concurrent.futures
    import multiprocessing

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    seeds = range(1000 * concurrency, 1000 * concurrency + concurrency)
    procs = max(1, min(procs, concurrency))
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600)) as client:
        idle_before = await scrape(client, url)
        memory: list[dict] = []
        start = time.perf_counter()
        deadline = time.time() + seconds
        shares = [seeds[i::procs] for i in range(procs)]
        common = (deadline, max_tokens, prompt_words, api_key, temperature)

        async def sampler():
            while time.time() < deadline:
                memory.append({"t": round(time.perf_counter() - start, 1), **await scrape(client, url)})
                await asyncio.sleep(5)

        if procs == 1:
            _, results = await asyncio.gather(sampler(), _clients(url, model, seeds, *common))
        else:
            loop = asyncio.get_running_loop()
            with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = [loop.run_in_executor(pool, _clients_in_process, url, model, share, *common) for share in shares]
                _, *lists = await asyncio.gather(sampler(), *parts)
            results = [r for part in lists for r in part]
        elapsed = time.perf_counter() - start
        idle_after = await scrape(client, url)

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    streaming = [(r["tokens"] - 1) / r["decode_s"] for r in ok if r["decode_s"] > 0]
    return {
        # Per request, tokens after the first over the time from the first to the last chunk.
        "stream_tok_s_median": round(statistics.median(streaming), 1) if streaming else None,
        "max_gap_p99_ms": round(1000 * _quantile(sorted(r["max_gap"] for r in ok), 0.99), 1) if ok else None,
        "concurrency": concurrency, "seconds": round(elapsed, 1), "requests": len(ok), "errors": len(errors),
        "error_examples": errors[:3], "generated_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_ms": round(1000 * _quantile(ttfts, 0.50), 2) if ttfts else None,
        "ttft_p99_ms": round(1000 * _quantile(ttfts, 0.99), 2) if ttfts else None,
        "latency_p50_s": round(statistics.median(r["latency"] for r in ok), 2) if ok else None,
        # As the server sees it (arrival to the first token's event), from /metrics: the rest
        # of the client's TTFT is HTTP and the client itself.
        "server_ttft_mean_ms": _server_ttft_ms(idle_before, idle_after),
        "idle_before": idle_before, "idle_after": idle_after, "memory": memory,
    }


def _server_ttft_ms(before: dict, after: dict) -> float | None:
    name = "tunewright_time_to_first_token_seconds"
    n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    if n <= 0:
        return None
    return round(1000 * (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / n, 1)


async def run_join(url: str, model: str, api_key: str | None, streams: int = 16, prompt_tokens: int = 4000,
                   vocab: int = 1000, stream_tokens: int = 3000) -> dict:
    """`streams` running streamed requests; a prompt of `prompt_tokens` tokens joins them.
    Reported: the longest gap between two chunks of any running stream while the long
    prompt is prefilled (from its submission to its first token, plus 0.2 s)."""
    from infer.serve.stream_client import Connection

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    conns = [Connection(url, headers) for _ in range(streams + 1)]
    try:
        arrivals = [[] for _ in range(streams)]
        rng = random.Random(7)
        running = [asyncio.create_task(one_request(conns[i], model, prompt_text(rng, 48), stream_tokens, 0.0,
                                                   arrivals[i]))
                   for i in range(streams)]
        while not all(arrivals) and not any(t.done() for t in running):  # every stream is decoding
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        joined = time.perf_counter()
        long = await one_request(conns[-1], model, [rng.randrange(10, vocab) for _ in range(prompt_tokens)], 8)
        window_end = joined + (long.get("ttft") or 0.0) + 0.2
        await asyncio.gather(*running)
    finally:
        for conn in conns:
            await conn.close()
    # A stream that ended inside the window says nothing about the gaps there.
    early = sum(1 for times in arrivals if not times or times[-1] < window_end)
    gaps = []
    for times in arrivals:
        inside = [t for t in times if joined - 0.1 <= t <= window_end]
        before = [t for t in times if t < joined - 0.1][-1:]
        seq = before + inside
        gaps += [b - a for a, b in zip(seq, seq[1:])]
    return {"streams": streams, "prompt_tokens": prompt_tokens, "long_ttft_ms": round(1000 * (long.get("ttft") or -1), 1),
            "long_error": long.get("error"), "max_gap_during_join_ms": round(1000 * max(gaps, default=0.0), 1),
            "streams_ended_before_the_window_closed": early}


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def start_server(run: str, extra: list[str], log: Path, *, env: dict | None = None, cwd=None,
                 timeout: float = 900) -> tuple[subprocess.Popen, str]:
    """Start `python -m infer serve RUN` on a free port, its output in `log`; (process, URL) once
    /health answers. `env` replaces the environment (unbuffered output is added either way)."""
    cmd = [sys.executable, "-m", "infer.serve", run, "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd,
                            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        found = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text())
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return proc, found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready after {timeout:.0f} s; see {log}")


async def _final_counts(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        return await scrape(client, url)


def summarize(levels: list[dict]) -> str:
    base = levels[0]["tokens_per_s"] or float("nan")
    lines = ["| clients | requests | errors | generated tok/s | vs 1st level | per-stream tok/s (median) | TTFT p50 | "
             "TTFT p99 | server TTFT mean | longest chunk gap p99 | GPU alloc idle before → after | GPU reserved first → last sample | "
             "server RSS first → last sample | engine RSS first → last sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        mem = lv["memory"] or [{}]
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['tokens_per_s']} | "
            f"{lv['tokens_per_s'] / base:.1f}x | {lv['stream_tok_s_median']} | {lv['ttft_p50_ms']} ms | "
            f"{lv['ttft_p99_ms']} ms | {lv.get('server_ttft_mean_ms')} ms | {lv['max_gap_p99_ms']} ms | "
            f"{_mib(lv['idle_before'], 'tunewright_gpu_memory_allocated_bytes')} → "
            f"{_mib(lv['idle_after'], 'tunewright_gpu_memory_allocated_bytes')} | "
            f"{_mib(mem[0], 'tunewright_gpu_memory_reserved_bytes')} → "
            f"{_mib(mem[-1], 'tunewright_gpu_memory_reserved_bytes')} | "
            f"{_mib(mem[0], 'process_resident_memory_bytes')} → {_mib(mem[-1], 'process_resident_memory_bytes')} | "
            f"{_mib(mem[0], _ENGINE_RSS)} → {_mib(mem[-1], _ENGINE_RSS)} |"
        )
    return "\n".join(lines)


def against_bench(levels: list[dict], join: dict | None, bench: dict) -> str:
    """The levels beside `python -m infer bench --json` figures of the same model: per-stream
    decode and TTFT at 1 client against bench's batch 1, aggregate tokens/s at N clients against
    bench's batch N (where bench measured that batch), and the join's longest gap. Bench's
    compiled static-cache rows are used, else its first row of each batch size."""
    by_batch: dict[int, dict] = {}
    for row in bench["rows"]:
        if row["batch"] not in by_batch or row["name"] == "static + compile":
            by_batch[row["batch"]] = row
    lines = ["| | server | `infer bench` | server / bench |", "|---|---|---|---|"]
    one = by_batch.get(1)
    for lv in levels:
        n = lv["concurrency"]
        if n == 1 and one is not None:
            if lv["stream_tok_s_median"]:
                lines.append(f"| 1 client: per-stream decode tok/s | {lv['stream_tok_s_median']:.1f} | "
                             f"{one['decode_tok_s']:.1f} (batch 1) | {lv['stream_tok_s_median'] / one['decode_tok_s']:.1%} |")
            if lv["ttft_p50_ms"]:
                lines.append(f"| 1 client: TTFT p50 | {lv['ttft_p50_ms']:.2f} ms | {one['ttft_ms']:.3f} ms (batch 1) | "
                             f"{lv['ttft_p50_ms'] / one['ttft_ms']:.2f}x |")
        elif n in by_batch:
            ref = by_batch[n]["aggregate_tok_s"]
            lines.append(f"| {n} clients: generated tok/s | {lv['tokens_per_s']:.1f} | {ref:.1f} (batch {n}) | "
                         f"{lv['tokens_per_s'] / ref:.1%} |")
    if join:
        lines.append(f"| {join['streams']} streams, a {join['prompt_tokens']}-token prompt joins: longest gap | "
                     f"{join['max_gap_during_join_ms']} ms | | |")
    return "\n".join(lines)


_ENGINE_RSS = "tunewright_engine_process_resident_memory_bytes"


def _mib(sample: dict, key: str) -> str:
    return f"{sample[key] / 2**20:.0f} MiB" if key in sample else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (else --serve starts one)")
    p.add_argument("--serve", metavar="RUN", help="start `python -m infer serve RUN` for the test")
    p.add_argument("--serve-args", default="", help="extra server arguments, one string")
    p.add_argument("--random-model", type=Path, help="write a random-weight model here first and serve it")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory for --random-model")
    p.add_argument("--shape", default="llama-3.2-1b", choices=SHAPES)
    p.add_argument("--model", help="model id to send (default: the server's first /v1/models entry)")
    p.add_argument("--api-key", default=os.environ.get("TUNEWRIGHT_API_KEY"))
    p.add_argument("--levels", default="1:20,32:120", help="concurrency:seconds,... (default 1:20,32:120)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (greedy, as `infer bench` measures) or a sampling temperature")
    p.add_argument("--join", metavar="STREAMS:TOKENS",
                   help="also measure the longest chunk gap of STREAMS running streams while a prompt of TOKENS "
                   "tokens joins them (e.g. 16:4000)")
    p.add_argument("--procs", type=int, default=1,
                   help="client processes the clients of a level are spread over (default 1)")
    p.add_argument("--out", type=Path, help="write all numbers as JSON here")
    p.add_argument("--bench", type=Path, metavar="JSON",
                   help="`python -m infer bench --json` output of the same model: print the levels beside it")
    args = p.parse_args(argv)
    bench = None
    if args.bench:
        try:
            bench = json.loads(args.bench.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--bench {args.bench}: not a `python -m infer bench --json` file ({exc})")
        if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list):
            p.error(f"--bench {args.bench}: not a `python -m infer bench --json` file (no list of rows)")

    import httpx

    proc = None
    if args.random_model:
        if not args.tokenizer:
            p.error("--random-model needs --tokenizer")
        t = time.perf_counter()
        args.serve = str(make_random_model(args.random_model, args.tokenizer, args.shape))
        print(f"wrote random {args.shape} to {args.serve} in {time.perf_counter() - t:.0f}s", flush=True)
    if args.serve:
        log = (args.out.parent if args.out else Path(".")) / "loadtest-server.log"
        proc, args.url = start_server(args.serve, args.serve_args.split(), log)
    if not args.url:
        p.error("give --url of a running server, or --serve RUN")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    levels, join, counts = [], None, {}
    try:
        for spec in args.levels.split(","):
            conc, secs = spec.split(":")
            print(f"level: {conc} clients for {secs}s ...", flush=True)
            levels.append(asyncio.run(run_level(args.url, model, int(conc), float(secs), args.max_tokens,
                                                args.prompt_words, args.api_key, args.temperature, args.procs)))
            print({k: v for k, v in levels[-1].items() if k != "memory"}, flush=True)
        if args.join:
            streams, tokens = (int(x) for x in args.join.split(":"))
            join = asyncio.run(run_join(args.url, model, args.api_key, streams, tokens))
            print(f"join: {join}", flush=True)
        counts = asyncio.run(_final_counts(args.url))
        print(f"compiled graphs {counts.get('tunewright_compiled_graphs')}, decode CUDA graphs "
              f"{counts.get('tunewright_decode_cuda_graphs')}, prefill CUDA graphs "
              f"{counts.get('tunewright_prefill_cuda_graphs')} (whole run, warm-up included)", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            print(f"server exited with {proc.wait(timeout=300)} after SIGTERM", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": model, "max_tokens": args.max_tokens, "levels": levels,
                                        "join": join if args.join else None, "counts": counts}, indent=1))
    print(summarize(levels))
    if bench is not None:
        print()
        print(against_bench(levels, join, bench))
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
