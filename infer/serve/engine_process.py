"""The engine in a process of its own (`--engine process`, the default), as vLLM runs its
engine core: the HTTP event loop (JSON, SSE, tokenization) and the scheduler's Python work
no longer take turns on one GIL.

    server process (event loop)                     engine process
    HTTP routes ─ EngineClient ──── requests ────▶  infer.engine.Engine.step() loop
                  (one handle per   ◀── events ────  (model, KV cache, sampler,
                   sequence)          + counts       detokenizer, stop rules)

Requests are validated on the server side (`infer.engine.check_request`, the engine's own
rule) before they are sent, so what reaches the engine runs. Each step's events travel as
one message of plain tuples. If the engine process dies, every sequence in flight ends
with an error event, new requests get 503 and `on_exit` tells the server, which exits
non-zero for its supervisor to restart it.

Messages to the engine: ("add", [(sid, prompt, params, index, arrival)]), ("cancel", [sid]),
("warmed_up",), ("stop",). From it: ("ready", info, tokenizer), ("failed", message),
("events", [event tuple], running, decode_rows, stats or None), ("stopped",).
A counter of the messages sent, in memory both processes share, lets an idle engine watch
for the next one without a system call (`--idle-spin`); for the same time the server's event
loop polls instead of sleeping (`EngineClient.keep_awake`).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time

from infer.engine import StreamEvent, check_request

from .engine import (EngineStoppedError, build_engine, check_admission, compiled_graphs, freeze_startup_objects,
                     gpu_memory, observe, queue_time, step_or_fail)

log = logging.getLogger("infer.serve")

STATS_INTERVAL = 0.5  # seconds between the engine's memory / compilation reports while it is busy


class EngineLoadError(RuntimeError):
    """The engine process could not load the model or build the engine; the message says why."""


class _Handle:
    """The server side of one sequence: what the routes and the metrics read."""

    __slots__ = ("sid", "prompt", "params", "index", "arrival", "emit", "finish_reason", "cancelled",
                 "last_event_at")

    def __init__(self, sid, prompt, params, index, arrival, emit):
        self.sid, self.prompt, self.params, self.index, self.emit = sid, prompt, params, index, emit
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.finish_reason = None
        self.cancelled = False
        self.last_event_at = None


class EngineClient:
    """Runs `build_engine(*loader(args), args)` in a child process and offers the HTTP side
    the methods of the in-process `ServingEngine`."""

    def __init__(self, loader, args, *, max_queue: int = 256, metrics=None, log_level: str = "info",
                 on_exit=None, loop):
        self.loader, self.args, self.max_queue, self.metrics = loader, args, max_queue, metrics
        self.log_level, self.on_exit = log_level, on_exit
        # The server's event loop reads the engine's messages itself (`loop.add_reader`), as
        # vLLM's API process reads its engine core's socket: an event reaches its request's
        # queue on the thread that serves it, with no wake-up of a second thread and no
        # hand-over between threads.
        self.loop = loop
        # Set once the engine has said it stopped or has died; set too while nothing is read
        # (before start), so that `stop` has nothing to wait for then.
        self._stopped = threading.Event()
        self._stopped.set()
        self._lock = threading.Lock()  # the live handles and the send side of the pipe
        self._live: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._dead: str | None = None
        self._proc = None
        self.running = 0
        self.idle_spin_s = 0.0
        self._awake_until = 0.0  # the event loop polls without sleeping until then (`keep_awake`)
        self._spinning = False
        self._loop_thread = None
        self._stats = {"graphs": 0, "prefill_graphs": 0, "compiled": 0, "gpu": (0, 0), "rss": 0}

    # ---- start-up ------------------------------------------------------------------
    def start(self):
        """Start the engine process and wait until its model is loaded; returns the tokenizer.
        Raises EngineLoadError with the engine's reason if it cannot load."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        to_engine_r, self._to_engine = ctx.Pipe(duplex=False)
        self._sent = ctx.RawValue("Q", 0)  # messages sent so far: what an idle engine spins on
        self._from_engine, from_engine_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_main, name="tunewright-engine",
                                 args=(to_engine_r, from_engine_w, self._sent, self.loader, self.args, self.log_level))
        self._proc.start()
        atexit.register(self._kill)  # runs before multiprocessing's own exit hook, which would wait for it
        to_engine_r.close()
        from_engine_w.close()
        while not self._from_engine.poll(1.0):
            if not self._proc.is_alive():
                raise EngineLoadError(f"the engine process exited with code {self._proc.exitcode} while loading")
        try:
            msg = self._from_engine.recv()
        except EOFError:
            self._proc.join(5)
            raise EngineLoadError(f"the engine process exited with code {self._proc.exitcode} while loading") from None
        if msg[0] == "failed":
            self._proc.join(30)
            raise EngineLoadError(msg[1])
        info, tokenizer = msg[1], msg[2]
        self.max_batch_size, self.max_model_len = info["max_batch_size"], info["max_model_len"]
        self.vocab_size, self.max_logprobs = info["vocab_size"], info["max_logprobs"]
        self.device_type, self.device_name = info["device_type"], info["device"]
        self.group_steps, self.kv_cache_bytes = info["group_steps"], info["kv_cache_bytes"]
        self.idle_spin_s = info["idle_spin_s"]  # as the engine process resolved it for its device
        self._stopped.clear()
        self.loop.call_soon_threadsafe(self._start_reading)
        return tokenizer

    # ---- called from the HTTP side -------------------------------------------------
    def new_sequence(self, prompt: list[int], params, emit, *, index: int = 0, arrival: float | None = None):
        check_request(prompt, params, vocab_size=self.vocab_size, max_seq_len=self.max_model_len,
                      max_logprobs=self.max_logprobs)  # ValueError: a 400
        return _Handle(next(self._ids), list(prompt), params, index, arrival, emit)

    def submit(self, seqs: list[_Handle], *, bounded: bool = True) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineStoppedError(f"{self._dead}; the server is stopping")
            check_admission(self._stopping, self.queue_depth, len(seqs), self.max_queue if bounded else None)
            for h in seqs:
                self._live[h.sid] = h
            self._send(("add", [(h.sid, h.prompt, h.params, h.index, h.arrival) for h in seqs]))
        self.keep_awake()

    def cancel(self, seqs: list[_Handle]) -> None:
        with self._lock:
            sids = [h.sid for h in seqs if self._live.pop(h.sid, None) is not None]
            for h in seqs:
                h.cancelled = True
            if sids and self._dead is None:
                self._send(("cancel", sids))

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, let the engine finish what it has, then end its process."""
        with self._lock:
            self._stopping = True
            if self._dead is None:
                self._send(("stop",))
        self._stopped.wait(timeout)
        if self._proc is not None:
            self._proc.join(5)
            self._kill()

    def warmed_up(self) -> None:
        """Serving starts now: the engine process freezes its start-up objects (see
        `freeze_startup_objects`) before its next step."""
        with self._lock:
            self._send(("warmed_up",))

    @property
    def queue_depth(self) -> int:
        return max(0, len(self._live) - self.running)

    # ---- what the metrics and the warm-up read -------------------------------------
    @property
    def graph_count(self) -> int:
        return self._stats["graphs"]

    @property
    def prefill_graph_count(self) -> int:
        return self._stats["prefill_graphs"]

    def compiled_graphs(self) -> int:
        return self._stats["compiled"]

    def gpu_memory(self) -> tuple[int, int]:
        return self._stats["gpu"]

    def engine_rss(self) -> int:
        return self._stats["rss"]

    # ---- messages from the engine (on the event loop) -------------------------------
    def _send(self, msg) -> None:
        try:
            self._to_engine.send(msg)
        except OSError:  # the engine is gone; `_on_readable` reports it
            return
        self._sent.value += 1  # after the message is in the pipe: a spinning engine then finds it

    def _on_readable(self) -> None:
        """On the event loop: every message the engine has sent so far."""
        try:
            while self._from_engine.poll():
                msg = self._from_engine.recv()
                if msg[0] == "events":
                    self._dispatch(*msg[1:])
                elif msg[0] == "stopped":
                    self._stop_reading()
                    return
        except (EOFError, OSError):
            self._stop_reading()
            self._engine_died()

    def _start_reading(self) -> None:
        self._loop_thread = threading.get_ident()
        self.loop.add_reader(self._from_engine.fileno(), self._on_readable)

    def _stop_reading(self) -> None:
        self.loop.remove_reader(self._from_engine.fileno())
        self._stopped.set()

    def keep_awake(self) -> None:
        """Keep the event loop from sleeping for the next `idle_spin_s` (`--idle-spin`, on the
        event loop's thread): the engine's next message and the client's next request are
        then read by a CPU that is awake, with the server's code in its caches, instead of one
        woken from a sleep. Under load the loop is never idle and this costs nothing more; a
        server with nothing to do stops spinning after `idle_spin_s`."""
        if self.idle_spin_s <= 0 or threading.get_ident() != self._loop_thread:  # the warm-up's thread: no need
            return
        self._awake_until = time.perf_counter() + self.idle_spin_s
        if not self._spinning:
            self._spinning = True
            self.loop.call_soon(self._spin)

    def _spin(self) -> None:
        # A callback that is always ready makes the loop poll its sockets and pipes with a
        # zero timeout (asyncio and uvloop both do), so it turns without blocking.
        if time.perf_counter() < self._awake_until:
            self.loop.call_soon(self._spin)
        else:
            self._spinning = False

    def _dispatch(self, events, running, decode_rows, stats) -> None:
        now = time.perf_counter()
        self.keep_awake()
        self.running = running
        if stats is not None:
            self._stats = stats
        m = self.metrics
        if m is not None and decode_rows:
            m.batch_size.observe(decode_rows)
        for sid, token_ids, text, finished, reason, logprobs, completion, error, queued in events:
            h = self._live.get(sid)
            if h is None:  # cancelled: nobody waits for it
                continue
            if finished:
                self._live.pop(sid, None)
                h.finish_reason = reason
            event = StreamEvent(h.index, token_ids, text, finished, reason, logprobs, completion, error, h)
            if m is not None:
                observe(m, h, event, now, queued)
            if h.emit is not None:
                h.emit(event)

    def _engine_died(self) -> None:
        self._proc.join(5)
        reason = f"the engine process exited unexpectedly (exit code {self._proc.exitcode})"
        with self._lock:
            self._dead = reason
            lost = list(self._live.values())
            self._live.clear()
        log.error("%s; failing the %d sequences in flight", reason, len(lost))
        for h in lost:
            h.finish_reason = "error"
            if h.emit is not None:
                h.emit(StreamEvent(h.index, [], "", True, "error", None, 0, reason, h))
        if self.on_exit is not None:
            self.on_exit(reason)

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)


# ---- the engine process -------------------------------------------------------------
def _engine_main(inbox, outbox, sent, loader, args, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The server process decides when the engine stops (after its drain); a Ctrl-C that
    # reaches the whole process group must not cut the engine off mid-drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model, tokenizer = loader(args)
        engine = build_engine(model, tokenizer, args)
    except BaseException as exc:  # noqa: BLE001 - every reason goes back to the server
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    idle_spin = idle_spin_seconds(args.idle_spin, engine.device.type)
    info = {"max_batch_size": engine.max_batch_size, "max_model_len": engine.max_seq_len,
            "vocab_size": engine.runner.vocab_size, "max_logprobs": engine.max_logprobs,
            "device_type": engine.device.type, "device": str(engine.device),
            "group_steps": engine.runner.group_steps, "kv_cache_bytes": engine.runner.cache.nbytes,
            "idle_spin_s": idle_spin}
    outbox.send(("ready", info, tokenizer))
    try:
        _run(engine, inbox, outbox, sent, idle_spin)
    except (EOFError, BrokenPipeError):  # the server process is gone: nothing left to serve
        pass


def _run(engine, inbox, outbox, sent, idle_spin: float) -> None:
    seqs: dict = {}
    stopping = False
    stats_at = 0.0
    while True:
        messages = []
        if not engine.has_work:
            if stopping:
                outbox.send(("stopped",))
                return
            outbox.send(("events", [], 0, 0, _stats(engine)))  # the idle picture
            if idle_spin > 0:
                _spin(inbox, sent, idle_spin)
            messages.append(inbox.recv())  # nothing to do until a request comes
        while inbox.poll():
            messages.append(inbox.recv())
        refused = []
        for msg in messages:
            if msg[0] == "add":
                for sid, prompt, params, index, arrival in msg[1]:
                    try:
                        seq = engine.new_sequence(prompt, params, index=index, arrival=arrival)
                    except ValueError as exc:  # the server checks first; this is the engine's last word
                        refused.append((sid, [], "", True, "error", None, 0, str(exc), None))
                        continue
                    seq.sid = sid
                    seqs[sid] = seq
                    engine.submit(seq)
            elif msg[0] == "cancel":
                for sid in msg[1]:
                    if (seq := seqs.pop(sid, None)) is not None:
                        seq.cancelled = True
            elif msg[0] == "warmed_up":
                freeze_startup_objects()
            elif msg[0] == "stop":
                stopping = True
        events = step_or_fail(engine)
        out = refused
        for event in events:
            seq = event.sequence
            if seq.cancelled:
                continue
            if event.finished:
                seqs.pop(seq.sid, None)
            out.append((seq.sid, event.token_ids, event.text, event.finished, event.finish_reason, event.logprobs,
                        event.completion_tokens, event.error, queue_time(seq, event)))
        now = time.monotonic()
        stats = None
        if now - stats_at >= STATS_INTERVAL:
            stats, stats_at = _stats(engine), now
        if out or stats is not None or engine.last_decode_rows:
            outbox.send(("events", out, engine.running, engine.last_decode_rows, stats))


# `--idle-spin`'s default with a GPU. On one H100 (1B model, one streaming client, back to back) the
# time to first token's median is 3.7-3.8 ms with it against 3.9-4.0 ms without (BENCHMARKS.md);
# the spin only runs while no request is in, so under load it costs nothing.
GPU_IDLE_SPIN_MS = 50.0


def idle_spin_seconds(setting_ms: float | None, device_type: str) -> float:
    """Seconds the engine process spins when it runs out of work: `--idle-spin` when given, else
    GPU_IDLE_SPIN_MS with a GPU, and none on the CPU: there the cores are the model's compute and
    the server's, and a spinning core is one less for them."""
    if setting_ms is None:
        setting_ms = GPU_IDLE_SPIN_MS if device_type == "cuda" else 0.0
    return setting_ms / 1000


def _spin(inbox, sent, seconds: float) -> None:
    """Wait up to `seconds` for the server to send something, watching the shared counter
    `sent` in user space (`--idle-spin`): no system call, so the CPU stays awake with the
    engine's code and data in its caches, and a request that comes within that time starts
    as fast as one that finds the engine busy (a blocking read after an idle spell starts
    on a core that slept). The server bumps the counter after each message is in the pipe,
    so one sent before the count is read is found by the poll."""
    seen = sent.value
    if inbox.poll():
        return
    deadline = time.perf_counter() + seconds
    while sent.value == seen and time.perf_counter() < deadline:
        pass


def _stats(engine) -> dict:
    return {"graphs": engine.graph_count, "prefill_graphs": engine.prefill_graph_count, "compiled": compiled_graphs(),
            "gpu": gpu_memory(engine.device), "rss": _rss()}


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
