"""Where a joining prompt's stall goes: the server's engine in this process, streams decoding,
one long prompt joins. Every prefill chunk and decode group in the join's window is timed on
the host and, on CUDA, with events on the stream; the streams' longest gap between token
events is what a client of the server sees as a stall (`loadtest --join` measures it over HTTP).

    python -m infer.serve.join_profile runs/demo --prefill-chunk 1024
    python -m infer.serve.join_profile /tmp/rand1b --max-batch-size 128 --streams 16 --prompt-tokens 4000

Takes the options of `python -m infer serve` (model, quantization, --prefill-chunk,
--max-batch-size, --sync-interval) and builds the same engine. One run warms up (compiles,
records graphs, grows the allocator for the long prompt); `--runs` more are reported.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

PROFILED = ("prefill_fresh", "prefill_extend", "decode_group")


@dataclass
class Call:
    name: str
    detail: str
    host_start: float
    host_s: float
    events: tuple | None  # CUDA (start, end) events, or None on the CPU

    def gpu_ms(self) -> float | None:
        return self.events[0].elapsed_time(self.events[1]) if self.events else None


@dataclass
class Profile:
    long_ttft_ms: float
    max_gap_ms: float
    median_gap_ms: float
    calls: list[dict] = field(default_factory=list)  # each: name, detail, start_ms (from the join), host_ms, gpu_ms


class _Recorder:
    """Times the runner's prefill and decode calls while installed (instance attributes that
    shadow its methods; `remove` deletes them)."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []
        self.cuda = runner.device.type == "cuda"

    def install(self) -> "_Recorder":
        for name in PROFILED:
            setattr(self.runner, name, self._timed(name, getattr(self.runner, name)))
        return self

    def remove(self) -> None:
        for name in PROFILED:
            self.runner.__dict__.pop(name, None)

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            events = None
            if self.cuda:
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            host = time.perf_counter() - start
            if events:
                events[1].record()
            self.calls.append(Call(name, _detail(name, args), start, host, events))
            return out

        return call


def _detail(name: str, args: tuple) -> str:
    if name == "prefill_fresh":
        rows, chunks = args[0], args[1]
        return f"rows={len(rows)} tokens={sum(map(len, chunks))}"
    if name == "prefill_extend":
        return f"start={args[1]} tokens={len(args[2])}"
    return f"steps={args[0]} rows={args[1]}{' single' if args[2] else ''}"


def profile_join(engine, tokenizer, *, streams: int = 16, prompt_tokens: int = 4000, stream_tokens: int = 600,
                 seed: int = 7) -> Profile:
    """`streams` sequences of 48 words decode (`stream_tokens` at most); once each has had six
    events, a prompt of `prompt_tokens` random token ids joins. Returns its time to first
    token, the streams' longest and median gap between events from 50 ms before the join to
    200 ms after its first token, and every timed call in that window."""
    from infer.prompts import text_ids
    from infer.sampling import SamplingParams

    from .loadtest import prompt_text

    if engine.has_work:
        raise RuntimeError("the engine must be idle")
    rng = random.Random(seed)
    vocab = engine.runner.vocab_size

    params = SamplingParams(max_new_tokens=stream_tokens, ignore_eos=True)
    # the streams' prompts are the load test's (`loadtest --join` measures the same over HTTP)
    running = [engine.new_sequence(text_ids(tokenizer, prompt_text(rng, 48)), params, index=i) for i in range(streams)]
    for seq in running:
        engine.submit(seq)
    seen: dict[int, list[float]] = {id(s): [] for s in running}
    recorder = _Recorder(engine.runner).install()
    long = joined = None
    try:
        while engine.has_work:
            events = engine.step()
            now = time.perf_counter()
            for event in events:
                if id(event.sequence) in seen:
                    seen[id(event.sequence)].append(now)
            if long is None and all(len(t) >= 6 for t in seen.values()):
                recorder.calls.clear()
                long = engine.new_sequence([rng.randrange(10, min(1000, vocab)) for _ in range(prompt_tokens)],
                                           SamplingParams(max_new_tokens=8, ignore_eos=True))
                joined = time.perf_counter()
                engine.submit(long)
            if long is not None and long.done:
                for seq in running:
                    seq.cancelled = True
            if long is None and all(s.done for s in running):
                raise RuntimeError(f"the streams ended before the join: give them more than {stream_tokens} tokens")
    finally:
        recorder.remove()
    if recorder.cuda:
        torch.cuda.synchronize()
    end = long.first_token_at + 0.2
    gaps = []
    for times in seen.values():
        window = [t for t in times if joined - 0.05 <= t <= end]
        gaps += [b - a for a, b in zip(window, window[1:])]
    calls = [dict(name=c.name, detail=c.detail, start_ms=round(1e3 * (c.host_start - joined), 2),
                  host_ms=round(1e3 * c.host_s, 2), gpu_ms=None if c.events is None else round(c.gpu_ms(), 2))
             for c in recorder.calls if c.host_start <= end]
    return Profile(long_ttft_ms=1e3 * (long.first_token_at - joined), max_gap_ms=1e3 * max(gaps, default=0.0),
                   median_gap_ms=1e3 * statistics.median(gaps) if gaps else 0.0, calls=calls)


def table(profile: Profile) -> str:
    lines = [f"long prompt's TTFT {profile.long_ttft_ms:.1f} ms; streams' longest gap {profile.max_gap_ms:.1f} ms "
             f"(median {profile.median_gap_ms:.1f} ms)", "",
             "| from the join | call | | host ms | GPU ms |", "|---|---|---|---|---|"]
    for c in profile.calls:
        gpu = "-" if c["gpu_ms"] is None else f"{c['gpu_ms']:.2f}"
        lines.append(f"| {c['start_ms']:+.2f} ms | {c['name']} | {c['detail']} | {c['host_ms']:.2f} | {gpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .engine import build_engine
    from .server import build_parser, load_for_serving

    p = build_parser()
    p.prog = "python -m infer.serve.join_profile"
    p.description = "Time each prefill chunk and decode group while a long prompt joins running streams."
    p.add_argument("--streams", type=int, default=16, help="sequences decoding when the prompt joins (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=4000, help="the joining prompt's length (default 4000)")
    p.add_argument("--stream-tokens", type=int, default=600, help="tokens each stream may decode (default 600)")
    p.add_argument("--runs", type=int, default=2, help="profiled runs after one warm-up run (default 2)")
    p.add_argument("--json", help="write the profiles here too")
    args = p.parse_args(argv)
    model, tokenizer = load_for_serving(args)
    engine = build_engine(model, tokenizer, args)
    needed = args.prompt_tokens + 8
    if needed > engine.max_seq_len:
        p.error(f"--prompt-tokens {args.prompt_tokens} needs a context of {needed}; the engine has "
                f"{engine.max_seq_len} (raise --max-model-len)")
    options = dict(streams=args.streams, prompt_tokens=args.prompt_tokens, stream_tokens=args.stream_tokens)
    profile_join(engine, tokenizer, **options)  # warm-up
    profiles = []
    for run in range(1, args.runs + 1):
        profiles.append(profile_join(engine, tokenizer, **options))
        print(f"run {run}: {table(profiles[-1])}\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([vars(pr) for pr in profiles], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
