"""The inference engine: one scheduler over infer.runner's static KV cache, driven by every
caller (`Generator.generate/stream`, eval, bench, chat, and the HTTP server's thread).

    engine = Engine(model, tokenizer, max_batch_size=32, max_seq_len=4096)
    seq = engine.new_sequence(prompt_ids, SamplingParams(max_new_tokens=64))  # validates
    engine.submit(seq)
    while engine.has_work:
        for event in engine.step():          # StreamEvent: new tokens and text of one sequence
            ...

Each `step()`:
1. retires finished and cancelled sequences (their cache rows become free),
2. admits waiting sequences into free rows, lowest row first (continuous batching: rows
   join and leave between steps; nothing in the cache moves),
3. prefills prompts in chunks within a token budget (`prefill_chunk`), so a long prompt
   never stalls the running streams for more than one chunk,
4. queues a group of `sync_interval` decode steps for every decoding row (one batch of
   rows [0, n), or the single row through the Triton kernels),
5. reads back the oldest group once the next one is queued (on CUDA; the GPU never waits
   for the host to detokenize), and turns tokens into events: one rule for end of
   sequence, stop strings and length, one detokenizer, one event type.
"""

from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from infer.detokenize import TextStream
from infer.runner import ModelRunner
from infer.sampling import SamplingParams, combined_sampling, eos_token_ids


@dataclass
class StreamEvent:
    index: int  # the caller's index of the sequence (prompt number, or choice number)
    token_ids: list[int]  # tokens new since the previous event of this sequence
    text: str  # text new since then (held back while it may start a stop string)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end of sequence or stop string), "length", "error"
    # One (token id, log-probability, [(id, log-probability) of the most likely tokens]) per
    # new token, when the sequence asked for logprobs.
    logprobs: list | None = None
    completion_tokens: int = 0  # tokens generated so far
    error: str | None = None
    sequence: "Sequence | None" = field(default=None, repr=False, compare=False)


class Sequence:
    """Host-side state of one sequence: prompt, tokens so far, text, end conditions.
    Touched by the engine's caller only, except `cancelled`."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer, eos_ids: set[int], *,
                 index: int = 0, arrival: float | None = None):
        self.prompt, self.params, self.index = prompt, params, index
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.admitted_at = self.first_token_at = self.finished_at = self.last_event_at = None
        self.row: int | None = None
        self.cached = 0  # prompt tokens prefilled so far
        self.queued = 0  # decode steps queued for it and not read back yet
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.stream = TextStream(tokenizer, params.stop)
        self.pending = ""  # released text not yet handed out in an event
        self.emitted = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.emit: Callable[[StreamEvent], None] | None = None  # for callers that dispatch events

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.cached == len(self.prompt)

    def add(self, token: int, logprob=None) -> None:
        if self.done:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            self._finish("stop")
            return
        self.token_ids.append(token)  # kept up to the token that completes a stop string
        if logprob is not None:
            self.logprobs.append(logprob)
        self.pending += self.stream.push(token)
        if self.stream.stopped:
            self._finish("stop")
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.pending += self.stream.flush()
        self.finish_reason = reason
        self.finished_at = time.perf_counter()

    def fail(self, error: str) -> StreamEvent:
        self.finish_reason, self.finished_at = "error", time.perf_counter()
        return StreamEvent(self.index, [], "", True, "error", None, len(self.token_ids), error, self)

    def event(self) -> StreamEvent | None:
        new = self.token_ids[self.emitted:]
        if not new and not self.pending and not self.finish_reason:
            return None
        logprobs = self.logprobs[self.emitted:] if self.params.logprobs is not None else None
        event = StreamEvent(self.index, new, self.pending, self.finish_reason is not None, self.finish_reason,
                            logprobs, len(self.token_ids), None, self)
        self.emitted, self.pending = len(self.token_ids), ""
        return event


def check_request(prompt: list[int], params: SamplingParams, *, vocab_size: int, max_seq_len: int,
                  max_logprobs: int) -> None:
    """Raise ValueError saying what to change if an engine with these limits cannot run the request.
    The server checks on its HTTP side with this too, before anything reaches the engine."""
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt: token id {bad!r} is outside the vocabulary (0..{vocab_size - 1})")
    if len(prompt) + params.max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceeds max_seq_len "
            f"{max_seq_len}: shorten the prompt, lower max_new_tokens, or build the engine with a "
            "larger max_seq_len"
        )
    if params.logprobs is not None and params.logprobs > max_logprobs:
        raise ValueError(f"logprobs: at most {max_logprobs} alternatives per token here, got {params.logprobs}")


@dataclass
class _Fetch:
    read: Callable[[], tuple]
    columns: list[tuple[int, Sequence]]  # (column of the output, sequence)
    steps: int
    logprobs: bool


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_seq_len: int = 2048, compile="auto",
                 quant_kernels: str = "auto", fused="auto", kernels: str = "auto", sync_interval: int = 8,
                 prefill_chunk: int = 2048, max_logprobs: int = 0, compile_prefill="auto"):
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
        self.runner = ModelRunner(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, compile=compile,
                                  quant_kernels=quant_kernels, fused=fused, kernels=kernels,
                                  max_logprobs=max_logprobs, group_steps=sync_interval, pad_id=pad,
                                  compile_prefill=compile_prefill)
        self.device = self.runner.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_logprobs = max_logprobs
        # CUDA: keep two groups of steps queued; CPU steps run as they are called.
        self.groups_in_flight = 2 if self.device.type == "cuda" else 1
        self._held_decode = False  # the last step handed out first tokens and left its decode group for this one
        self._prefix: tuple[list[int], list] | None = None  # share_prefix: (tokens, their KV per layer)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.rows: list[Sequence | None] = [None] * max_batch_size
        self.pending: collections.deque[_Fetch] = collections.deque()
        self._active: set[int] = set()  # rows the device keeps decode outputs for
        self._single = 0
        self.decode_steps = 0  # decode steps queued since the engine was built
        self.last_decode_rows = 0  # sequences in the group of steps the last step() queued

    # ---- requests ----------------------------------------------------------------------

    def new_sequence(self, prompt: list[int], params: SamplingParams, *, index: int = 0,
                     arrival: float | None = None) -> Sequence:
        """A validated sequence, ready to submit. Raises ValueError saying what to change."""
        check_request(prompt, params, vocab_size=self.runner.vocab_size, max_seq_len=self.max_seq_len,
                      max_logprobs=self.max_logprobs)
        return Sequence(list(prompt), params, self.tokenizer, self.eos_ids, index=index, arrival=arrival)

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def share_prefix(self, tokens: list[int]) -> bool:
        """Prefill `tokens` once and keep their KV: every later prompt that starts with them
        (and goes on) gets a copy in its cache row and is prefilled from there, in batches of
        rows that share the same start. For a set of prompts with one long common beginning
        (a chat template, an instruction: `infer eval`), most prefill work is then done once.
        The engine must be idle (it uses row 0); returns whether the prefix is in place.

        This is the place a general prefix cache grows from: several prefixes found by
        hashing prompt blocks as requests arrive, instead of one the caller names."""
        tokens = list(tokens)
        if self._prefix is not None and self._prefix[0] == tokens:
            return True
        self._prefix = None
        if not tokens or len(tokens) > min(self.prefill_chunk, self.max_seq_len - 1) or self.has_work:
            return False
        self.runner.load(0, tokens, SamplingParams(max_new_tokens=1), 0)
        self.runner.prefill_fresh([0], [tokens], [False], None, False)
        self._prefix = (tokens, self.runner.cache.read_prefix(0, len(tokens)))
        return True

    def record_prefill_graphs(self) -> int:
        """Record every short-prefill CUDA graph now (the engine must be idle; it writes
        throw-away keys and values into the first rows, which `_admit` resets), so that no
        request pays for a recording. Returns how many graphs exist; 0 where there are none."""
        from infer.runner import PREFILL_GRAPH_ROWS, PREFILL_GRAPH_STEP, PREFILL_GRAPH_TOKENS

        if self.runner.prefill_graphs is None or self.has_work:
            return self.prefill_graph_count
        widest = min(PREFILL_GRAPH_TOKENS, self.runner.slots)
        for k in range(1, min(PREFILL_GRAPH_ROWS, self.max_batch_size) + 1):
            for width in range(PREFILL_GRAPH_STEP, widest + 1, PREFILL_GRAPH_STEP):
                self.runner.prefill_fresh(list(range(k)), [[0] * width] * k, [False] * k, False, False)
        return self.prefill_graph_count

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.pending or any(s is not None for s in self.rows))

    @property
    def running(self) -> int:
        return sum(1 for s in self.rows if s is not None and not s.done)

    @property
    def graph_count(self) -> int:
        """CUDA graphs recorded for the decode step (one per batch bucket and variant)."""
        return len(self.runner.graphs) if self.runner.graphs is not None else 0

    @property
    def prefill_graph_count(self) -> int:
        """CUDA graphs recorded for short prefills (one per row count and width bucket)."""
        return len(self.runner.prefill_graphs) if self.runner.prefill_graphs is not None else 0

    def reset(self) -> list[Sequence]:
        """Forget every sequence (after a failed step); returns those that were unfinished."""
        lost = [s for s in list(self.waiting) + [s for s in self.rows if s is not None] if not s.done]
        self.waiting.clear()
        self.pending.clear()
        self.rows = [None] * self.max_batch_size
        self.runner.set_active(sorted(self._active), False)
        self._active.clear()
        return lost

    # ---- one scheduler iteration -------------------------------------------------------

    def step(self) -> list[StreamEvent]:
        self.last_decode_rows = 0
        self._retire()
        self._admit()
        queued = self._prefill()
        events: list[StreamEvent] = []
        if self.groups_in_flight == 1:  # steps run as they are called: hand out first tokens first
            while self.pending:
                events += self._read(self.pending.popleft())
            # ... before the decode group runs (it would hold them back by `sync_interval`
            # steps), but at most every other step, so a stream of joining prompts never
            # keeps the running rows from decoding.
            if events and not self._held_decode:
                self._held_decode = True
                return events
        self._held_decode = False
        queued = self._decode() or queued
        while self.pending and (len(self.pending) >= self.groups_in_flight or not queued):
            events += self._read(self.pending.popleft())
        return events

    def _retire(self) -> None:
        # A retired row may still be in a queued group: those steps run and their outputs
        # are skipped when read (the group names the sequence, which is done).
        done = [r for r, seq in enumerate(self.rows) if seq is not None and seq.done]
        for r in done:
            self.rows[r] = None
        self.runner.set_active(sorted(self._active.intersection(done)), False)
        self._active.difference_update(done)

    def _admit(self) -> None:
        for r in range(self.max_batch_size):
            if not self.waiting:
                return
            if self.rows[r] is not None:
                continue
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft().finish_reason = "cancelled"
            if not self.waiting:
                return
            seq = self.waiting.popleft()
            self.runner.load(r, seq.prompt, seq.params, seq.seed)  # also marks the row inactive
            self._active.discard(r)
            seq.row, seq.cached, seq.admitted_at = r, 0, time.perf_counter()
            if self._prefix is not None:
                prefix, kv = self._prefix
                if len(seq.prompt) > len(prefix) and seq.prompt[: len(prefix)] == prefix:
                    self.runner.cache.write_prefix(r, kv)
                    self.runner.set_length(r, len(prefix))
                    seq.cached = len(prefix)
            self.rows[r] = seq

    def _prefill(self) -> bool:
        budget = self.prefill_chunk
        fresh, extend = [], []
        for seq in sorted((s for s in self.rows if s is not None and not s.done and not s.decoding),
                          key=lambda s: s.admitted_at):
            if budget <= 0:
                break
            take = min(len(seq.prompt) - seq.cached, budget)
            (fresh if seq.cached == 0 else extend).append((seq, take))
            budget -= take
        # Rows that continue after the shared prefix (share_prefix) prefill as one batch.
        start = len(self._prefix[0]) if self._prefix is not None else None
        shared = [(seq, take) for seq, take in extend if seq.cached == start]
        if len(shared) > 1:
            extend = [(seq, take) for seq, take in extend if seq.cached != start]
        else:
            shared = []
        finished: list[Sequence] = []
        if fresh:
            finished += self._prefill_batch(fresh, 0)
        if shared:
            finished += self._prefill_batch(shared, start)
        for seq, take in extend:
            final = seq.cached + take == len(seq.prompt)
            self.runner.prefill_extend(seq.row, seq.cached, seq.prompt[seq.cached : seq.cached + take], final,
                                       seq.params.sampling, self._wants_logprobs([seq]))
            seq.cached += take
            if final:
                finished.append(seq)
        if not finished:
            return bool(fresh or shared or extend)
        logprobs = self._wants_logprobs(finished)
        columns = [(s.row, s) for s in finished]
        for seq in finished:
            seq.queued = 1  # its first token, chosen by the prefill
        self.pending.append(_Fetch(self.runner.fetch(1, max(s.row for s in finished) + 1, logprobs), columns, 1, logprobs))
        return True

    def _prefill_batch(self, group: list[tuple[Sequence, int]], start: int) -> list[Sequence]:
        """Prefill `take` tokens of each sequence's prompt from `start` (0: first chunks; else
        after the shared prefix) as one right-padded batch; returns those whose prompt ended."""
        final = [start + take == len(seq.prompt) for seq, take in group]
        done = [seq for (seq, _), f in zip(group, final) if f]
        rows, chunks = [s.row for s, _ in group], [s.prompt[start : start + take] for s, take in group]
        args = (final, combined_sampling(s.params.sampling for s in done), self._wants_logprobs(done))
        if start == 0:
            self.runner.prefill_fresh(rows, chunks, *args)
        else:
            self.runner.prefill_shared(rows, start, chunks, *args)
        for seq, take in group:
            seq.cached = start + take
        return done

    def _decode(self) -> bool:
        decoding = [s for s in self.rows if s is not None and not s.done and s.decoding]
        # Steps still to queue: a sequence needs at most its remaining tokens.
        need = max((s.params.max_new_tokens - len(s.token_ids) - s.queued for s in decoding), default=0)
        if need <= 0:
            return False
        rows = [s.row for s in decoding]
        self.runner.set_active(sorted(set(rows) - self._active), True)
        self.runner.set_active(sorted(self._active - set(rows)), False)
        self._active = set(rows)
        single = self.runner.single_row_kernels and len(rows) == 1
        if single:
            if self._single != rows[0]:
                self.runner.set_single(rows[0])
                self._single = rows[0]
            n, columns = 1, [(0, decoding[0])]
        else:
            n = min(1 << max(rows).bit_length(), self.max_batch_size)
            columns = [(s.row, s) for s in decoding]
        steps = min(self.runner.group_steps, need)
        logprobs = self._wants_logprobs(decoding)
        longest = max(len(s.prompt) + len(s.token_ids) + s.queued for s in decoding) + steps
        self.runner.decode_group(steps, n, single, combined_sampling(s.params.sampling for s in decoding), logprobs,
                                 longest)
        self.decode_steps += steps
        self.last_decode_rows = len(decoding)
        for s in decoding:
            s.queued += steps
        self.pending.append(_Fetch(self.runner.fetch(steps, n, logprobs), columns, steps, logprobs))
        return True

    def _read(self, fetch: _Fetch) -> list[StreamEvent]:
        values = fetch.read()
        tokens = values[0]
        for step in range(fetch.steps):
            for col, seq in fetch.columns:
                if seq.done:
                    continue
                logprob = None
                if fetch.logprobs and seq.params.logprobs is not None:
                    top = list(zip(values[3][step][col], values[2][step][col]))[: seq.params.logprobs]
                    logprob = (tokens[step][col], values[1][step][col], top)
                seq.add(tokens[step][col], logprob)
        events = []
        for _, seq in fetch.columns:
            seq.queued -= fetch.steps
            if (event := seq.event()) is not None:
                events.append(event)
        return events

    def _wants_logprobs(self, seqs) -> bool:
        return self.max_logprobs > 0 and any(s.params.logprobs is not None for s in seqs)
