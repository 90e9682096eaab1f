"""Iteration-level (continuous) batching: one background thread owns the model.

Each iteration the thread (1) drops finished and cancelled sequences from the batch,
(2) admits waiting requests into free slots and prefills them together, (3) runs one
batched decode step for every active sequence, and (4) samples each sequence's next
token with that sequence's own temperature, top_p and random generator. A request that
arrives while others are generating joins at the next iteration instead of waiting for
the whole batch to finish.

Why not transformers' own `ContinuousBatchingManager` (`model.init_continuous_batching`)?
It runs on CPU and CUDA, streams and cancels, but (a) it samples every request from one
global RNG, so a request's `seed` cannot be honoured; (b) per-request temperature/top_p
only exist when the generation config enabled those processors when the manager was
built; (c) it switches the model to paged attention and its internals (cache allocators,
config classes) changed between 5.17 and 5.23, both of which this project supports.
The scheduler below needs only the public `DynamicCache` of both versions.

KV cache layout: one `DynamicCache` for the whole batch, rows right-aligned (left
padding) so that every row's next token lands in the same column and one forward pass
with a 2-D attention mask and per-row position ids serves all rows. Joining rows are
left-padded to the batch width; leaving rows are dropped with an index-select and the
leading columns no row needs any more are trimmed, so memory follows the live requests.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from infer.detokenize import TextStream
from infer.sampling import eos_token_ids, outside_top_p

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should answer 429."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new work."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Event:
    """What the engine reports about one sequence: new text, and at the end why it ended."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    """One choice being generated. Touched by the engine thread only, except `cancelled`."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        *,
        index: int = 0,
        arrival: float | None = None,
    ):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.index = index
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.cancelled = False
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text: TextStream | None = None  # built by the engine, which owns the tokenizer
        self.generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        prefill_token_budget: int = 8192,
        metrics=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.metrics = metrics
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._stopping = False  # set by stop(): no new work; the thread ends once the rest is done
        self._thread = threading.Thread(target=self._run, name="tunewright-engine", daemon=True)
        # Batch state, owned by the engine thread.
        self._active: list[Sequence] = []
        self._cache = None  # DynamicCache, one row per active sequence
        self._mask: torch.Tensor | None = None  # [rows, width], 0 where a row is padding
        # Random generators are reused across requests (re-seeded on admission) so that their
        # number stays bounded by the batch size instead of one new device object per request.
        self._spare_generators: list[torch.Generator] = []

    # ---- called from the HTTP side -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Sequence], *, bounded: bool = True) -> None:
        """Queue sequences for generation; `bounded=False` (the server's own warm-up) skips the queue bound."""
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            if bounded and len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({len(self._waiting)} sequences waiting, "
                    f"limit {self.max_queue}); retry later"
                )
            self._waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cancelled = True  # a plain flag: the engine thread checks it every iteration
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
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    # ---- the engine thread ---------------------------------------------------------
    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._active:
                    return
                admitted = self._admit()
            try:
                with self._attention_backends():
                    self._retire()
                    if admitted:
                        self._prefill(admitted)
                        self._retire()
                    if self._active:
                        self._decode()
            except Exception as exc:  # a failed step must not kill the server
                log.exception("generation step failed; failing the %d sequences in it", len(self._active))
                for seq in self._active + [s for s in admitted if s not in self._active]:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.emit(Event(seq.index, "", "error", len(seq.output_ids), f"{type(exc).__name__}: {exc}"))
                self._release(admitted)
                self._reset_batch()

    def _attention_backends(self):
        """On CUDA, SDPA may use the flash and memory-efficient kernels but not cuDNN's.

        This scheduler's attention shapes change every step (live rows x cache width), and
        cuDNN's attention builds and keeps an execution graph per new shape. On an H200
        (torch 2.11, 1B model shapes) 3000 new shapes grew host memory by 5.5 GB through the
        default (cuDNN) backend and by 14 MB through the memory-efficient kernel: a server
        never stops meeting new shapes, so its memory never stopped growing.
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots while the prefill stays within its token budget."""
        admitted: list[Sequence] = []
        free = self.max_batch_size - len(self._active)
        longest = 0
        while self._waiting and len(admitted) < free:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                seq.finish_reason = "cancelled"
                continue
            longest_if_added = max(longest, len(seq.prompt_ids))
            if admitted and longest_if_added * (len(admitted) + 1) > self.prefill_token_budget:
                break  # the padded prefill would be too large; the rest waits one iteration
            admitted.append(self._waiting.popleft())
            longest = longest_if_added
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[row, width - n :] = torch.tensor(seq.prompt_ids)
            mask[row, width - n :] = 1
            seq.text = TextStream(self.tokenizer, seq.params.stop)
            seq.generator = self._generator(seq.params.seed)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        tokens = self._sample(out.logits[:, -1, :], seqs)
        self._join(seqs, cache, mask)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in seqs))
            self.metrics.generated_tokens.inc(len(tokens))
        now = time.perf_counter()
        for seq, token in zip(seqs, tokens):
            if self.metrics is not None and seq.index == 0:
                self.metrics.ttft.observe(now - seq.arrival)
            self._append(seq, token)

    def _decode(self) -> None:
        rows = len(self._active)
        ids = torch.tensor([[s.output_ids[-1]] for s in self._active], device=self.device)
        # The fed token sits at position num_tokens-1 of its own sequence, whatever the padding.
        positions = torch.tensor([[s.num_tokens - 1] for s in self._active], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        out = self.model(
            input_ids=ids, attention_mask=self._mask, position_ids=positions,
            past_key_values=self._cache, use_cache=True,
        )
        tokens = self._sample(out.logits[:, -1, :], self._active)
        if self.metrics is not None:
            self.metrics.batch_size.observe(rows)
            self.metrics.generated_tokens.inc(len(tokens))  # once per step, not per token
        for seq, token in zip(list(self._active), tokens):
            self._append(seq, token)

    def _append(self, seq: Sequence, token: int) -> None:
        """Record one sampled token; emit its text; decide whether the sequence is finished."""
        seq.output_ids.append(token)
        if seq.cancelled:
            return
        if token in self.eos_ids:
            reason, text = "stop", seq.text.flush()
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                reason, text = "length", text + seq.text.flush()
            else:
                reason = None
        if reason is not None:
            seq.finish_reason = reason
        if text or reason is not None:
            seq.emit(Event(seq.index, text, reason, len(seq.output_ids)))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Greedy rows take the argmax; sampled rows use the exponential-race form of
        multinomial sampling (argmax of p / E, E ~ Exp(1)) with each row's noise drawn from
        its own generator, so a seeded request samples the same tokens in any batch.
        (infer.sampling.choose_tokens draws all rows' noise from the global RNG, which is
        right inside its compiled step but cannot honour per-request seeds.)"""
        logits = logits.float()
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in sampled], device=logits.device)
            scores = logits.index_select(0, rows) / temps[:, None]
            top_p = [seqs[i].params.top_p for i in sampled]
            if any(p < 1.0 for p in top_p):
                scores = _top_p_filter(scores, torch.tensor(top_p, device=logits.device))
            probs = torch.softmax(scores, dim=-1)
            noise = torch.stack(
                [torch.empty_like(probs[0]).exponential_(generator=seqs[i].generator) for i in sampled]
            ).clamp_min_(1e-20)
            chosen[rows] = (probs / noise).argmax(dim=-1)
        return chosen.tolist()

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = self._spare_generators.pop() if self._spare_generators else torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        return gen

    def _release(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.generator is not None:
                self._spare_generators.append(seq.generator)
                seq.generator = None

    # ---- batch bookkeeping ---------------------------------------------------------
    def _join(self, seqs: list[Sequence], cache, mask: torch.Tensor) -> None:
        if not self._active:
            self._active, self._cache, self._mask = list(seqs), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self._cache), _layers(cache)):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._active.extend(seqs)

    def _retire(self) -> None:
        """Drop finished and cancelled rows; trim columns that only padding occupies."""
        keep = [i for i, s in enumerate(self._active) if not s.done]
        for seq in self._active:
            if seq.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
        if len(keep) == len(self._active):
            return
        self._release([s for s in self._active if s.done])
        if not keep:
            self._reset_batch()
            return
        rows = torch.tensor(keep, device=self.device)
        self._active = [self._active[i] for i in keep]
        # A row's cache holds every token but its newest (which the next step feeds).
        trim = self._mask.shape[1] - max(s.num_tokens - 1 for s in self._active)
        for layer in _layers(self._cache):
            layer.keys = layer.keys.index_select(0, rows)[:, :, trim:]
            layer.values = layer.values.index_select(0, rows)[:, :, trim:]
        self._mask = self._mask.index_select(0, rows)[:, trim:]

    def _reset_batch(self) -> None:
        self._release(self._active)
        self._active, self._cache, self._mask = [], None, None


def _layers(cache):
    """The per-layer key/value holders of a DynamicCache (transformers 5.x: `cache.layers`)."""
    from transformers.cache_utils import DynamicLayer

    layers = cache.layers
    for layer in layers:
        # Sliding-window layers keep only a window of columns, which breaks the column
        # arithmetic above; refuse loudly instead of generating garbage.
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"serving supports full-attention KV caches only; this model's cache has a "
                f"{type(layer).__name__} layer"
            )
    return layers


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (dim -2 of a KV tensor, dim -1 of a mask) on the left with zeros."""
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Scores outside each row's top-p nucleus set to -inf (infer.sampling's rule)."""
    ordered, order = scores.sort(dim=-1, descending=True)
    ordered = ordered.masked_fill(outside_top_p(ordered.softmax(dim=-1), top_p), float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)
