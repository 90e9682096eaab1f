"""The server's engine, in-process: infer.engine's scheduler (the one `Generator` drives)
run on a thread of the server process, fed by the HTTP handlers (`--engine thread`). The
default runs the same scheduler in a process of its own (infer.serve.engine_process); both
offer the HTTP side the same methods. Neither owns a decode loop: they move submitted
sequences into the engine, call `step()`, hand each event to its request, and keep the
serving metrics.

A request is validated when its sequences are built (`new_sequence`, on the HTTP side),
so nothing that one client sends can fail a step that other clients share. Should a step
fail anyway (a bug, the GPU out of memory), the sequences in flight end with an error
event and the engine starts clean; the server keeps serving.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time

import torch

from infer.engine import Engine, Sequence, StreamEvent

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should answer 429."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new work."""


class ServingEngine:
    def __init__(self, engine: Engine, *, max_queue: int = 256, metrics=None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.max_batch_size = engine.max_batch_size
        self.max_model_len = engine.max_seq_len
        self.device = engine.device
        self.device_name = str(engine.device)
        self.kv_cache_bytes = engine.runner.cache.nbytes
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._stopping = False  # set by stop(): no new work; the thread ends once the rest is done
        self._thread = threading.Thread(target=self._run, name="tunewright-engine", daemon=True)

    # ---- called from the HTTP side -------------------------------------------------
    def new_sequence(self, prompt: list[int], params, emit, *, index: int = 0, arrival: float | None = None) -> Sequence:
        seq = self.engine.new_sequence(prompt, params, index=index, arrival=arrival)  # ValueError: a 400
        seq.emit = emit
        return seq

    def start(self) -> None:
        # This thread shares the GIL with the HTTP event loop. Python hands the GIL over
        # every 5 ms by default, so a step returning from a wait on the GPU could sit that
        # long behind the event loop's JSON work while the GPU idles; 1 ms keeps the GPU fed.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._thread.start()

    def submit(self, seqs: list[Sequence], *, bounded: bool = True) -> None:
        """Queue sequences for generation; `bounded=False` (the server's own warm-up) skips the queue bound."""
        with self._cond:
            check_admission(self._stopping, self.queue_depth, len(seqs), self.max_queue if bounded else None)
            self._inbox.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cancelled = True  # a plain flag: the engine retires the sequence at its next step
        with self._cond:
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish everything queued and running, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + sum(1 for s in list(self.engine.waiting) if not s.cancelled)

    @property
    def running(self) -> int:
        return self.engine.running

    # ---- the engine thread ---------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not engine.has_work and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._inbox and not engine.has_work:
                    return
                for seq in self._inbox:
                    engine.submit(seq)
                self._inbox.clear()
            events = step_or_fail(engine)
            now = time.perf_counter()
            if self.metrics is not None and engine.last_decode_rows:
                self.metrics.batch_size.observe(engine.last_decode_rows)
            for event in events:
                seq = event.sequence
                if self.metrics is not None:
                    observe(self.metrics, seq, event, now, queue_time(seq, event))
                if seq.emit is not None and not seq.cancelled:
                    seq.emit(event)

    # ---- what the metrics and the warm-up read -------------------------------------
    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def group_steps(self) -> int:
        return self.engine.runner.group_steps

    @property
    def graph_count(self) -> int:
        return self.engine.graph_count

    @property
    def prefill_graph_count(self) -> int:
        return self.engine.prefill_graph_count

    def gpu_memory(self) -> tuple[int, int]:
        """(allocated, reserved) bytes on the engine's GPU; zeros on the CPU."""
        return gpu_memory(self.device)

    def compiled_graphs(self) -> int:
        return compiled_graphs()

    def engine_rss(self) -> int:
        return 0  # the engine lives in the server process: its memory is the process's own

    def warmed_up(self) -> None:
        """Serving starts now (the server process freezes its start-up objects itself)."""


def check_admission(stopping: bool, waiting: int, new: int, max_queue: int | None) -> None:
    """Raise what the HTTP side turns into a 503 (stopping) or a 429 (the queue is full)."""
    if stopping:
        raise EngineStoppedError("the server is shutting down and takes no new requests")
    if max_queue is not None and waiting + new > max_queue:
        raise QueueFullError(f"the request queue is full ({waiting} sequences waiting, limit {max_queue}); retry later")


def build_engine(model, tokenizer, args) -> Engine:
    """The server's engine for a loaded model, sized by the serve options (`args`)."""
    from .schemas import MAX_LOGPROBS

    gpu = next(model.parameters()).device.type == "cuda"
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 2048
    max_len = args.max_model_len or min(context, 4096 if gpu else 2048)
    batch = args.max_batch_size or (64 if gpu else 8)
    engine = Engine(model, tokenizer, max_batch_size=batch, max_seq_len=max_len, prefill_chunk=args.prefill_chunk,
                    sync_interval=args.sync_interval, max_logprobs=MAX_LOGPROBS)
    if getattr(args, "warm_up", "all") != "none" and engine.runner.prefill_graphs is not None:
        start = time.perf_counter()
        count = engine.record_prefill_graphs()
        log.info("warm-up: %d prefill graphs recorded in %.1f s", count, time.perf_counter() - start)
    return engine


def freeze_startup_objects() -> None:
    """Take everything alive after the warm-up (modules, the model, compiled code) out of the
    garbage collector's sight, so that a full collection walks only what serving allocates
    rather than millions of start-up objects (a pause that streams would see as a token gap)."""
    gc.collect()
    gc.freeze()


def step_or_fail(engine: Engine) -> list[StreamEvent]:
    """One scheduler step. Should it fail (a bug, the GPU out of memory), the sequences in
    flight end with an error event and the engine starts clean: the server keeps serving."""
    try:
        return engine.step()
    except Exception as exc:
        lost = engine.reset()
        log.exception("generation step failed; failing the %d sequences in flight", len(lost))
        return [seq.fail(f"{type(exc).__name__}: {exc}") for seq in lost if not seq.cancelled]


def queue_time(seq: Sequence, event: StreamEvent) -> float | None:
    """Seconds the sequence waited for a KV-cache row, with its first event; None with the others."""
    if event.completion_tokens != len(event.token_ids) or seq.admitted_at is None:
        return None
    return seq.admitted_at - seq.arrival


def observe(m, seq, event: StreamEvent, now: float, queued: float | None) -> None:
    """Per-sequence latency metrics from one event; `seq` has `prompt`, `arrival` and
    `last_event_at`; `queued` is the sequence's wait for a row (with its first event)."""
    new = len(event.token_ids)
    if event.completion_tokens == new and (new or event.finished):  # its first event
        m.prompt_tokens.inc(len(seq.prompt))
        m.ttft.observe(now - seq.arrival)
        if queued is not None:
            m.queue_time.observe(queued)
    elif new:
        gap = (now - seq.last_event_at) / new
        for _ in range(new):
            m.inter_token.observe(gap)
    m.generated_tokens.inc(new)
    seq.last_event_at = now
    if event.finished:
        m.e2e.observe(now - seq.arrival)
        m.finished.labels(event.finish_reason or "unknown").inc()


def gpu_memory(device) -> tuple[int, int]:
    if getattr(device, "type", None) != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (dynamo's unique graphs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(serving, tokenizer, *, with_sampling: bool = True, timeout: float = 900, prefill_chunk: int = 0) -> None:
    """Requests through the real engine before the port answers 200: every batch-size bucket
    compiles and records its CUDA graph here (not on a user's request), and a model whose
    cache the engine cannot run fails at start-up. `with_sampling=False`: greedy steps only.
    On CUDA, one prompt longer than `prefill_chunk` then runs a full-width first chunk and a
    later chunk once, so the first long prompt a user sends does not pay for their one-time
    costs (allocator growth, kernel plans for the large shapes) while streams are running."""
    from infer.sampling import SamplingParams

    ids = tokenizer("Hello, world. This is a warm-up.")["input_ids"] or [0]
    sizes = [1]
    while sizes[-1] < serving.max_batch_size:
        sizes.append(min(2 * sizes[-1], serving.max_batch_size))
    if serving.device_type != "cuda":
        sizes = [1, min(2, serving.max_batch_size)]  # nothing to record on the CPU: check that it runs
    steps = 2 * serving.group_steps + 2
    runs = [(size, sampled, ids) for size in sizes for sampled in ((False, True) if with_sampling else (False,))]
    long_len = min(prefill_chunk + 64, serving.max_model_len - steps)
    if serving.device_type == "cuda" and 0 < prefill_chunk < long_len:
        runs.append((1, False, (ids * (long_len // len(ids) + 1))[:long_len]))
    for size, sampled, prompt in runs:
        start = time.perf_counter()
        done = threading.Event()
        events: list[StreamEvent] = []

        def emit(event, size=size):
            events.append(event)
            if sum(1 for e in events if e.finished) == size:
                done.set()

        params = SamplingParams(max_new_tokens=steps, temperature=1.0 if sampled else 0.0, seed=0, ignore_eos=True)
        seqs = [serving.new_sequence(prompt, params, emit, index=i) for i in range(size)]
        serving.submit(seqs, bounded=False)
        if not done.wait(timeout=timeout):
            raise RuntimeError(f"warm-up generation did not finish within {timeout:.0f} s")
        errors = [e.error for e in events if e.error]
        if errors:
            raise RuntimeError(f"warm-up generation failed: {errors[0]}")
        log.info("warm-up: %d %s sequence(s) of %d prompt tokens in %.1f s", size, "sampled" if sampled else "greedy",
                 len(prompt), time.perf_counter() - start)
    log.info("warm-up: %d decode graphs recorded", serving.graph_count)
