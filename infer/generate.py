"""Offline generation: `Generator.generate/stream` are loops over the engine's `step()`
(infer.engine), the same scheduler the HTTP server runs.

    gen = Generator(model, tokenizer, max_batch_size=8, max_seq_len=2048, compile="auto")
    results = gen.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0.7))
    for event in gen.stream(prompts, params):   # StreamEvent(index, token_ids, text, finished, finish_reason, ...)
        ...

* `prompts` is a list; each item is a string, a list of token ids, or a conversation
  (list of {"role", "content"} dicts). Strings get the chat template when `chat=True`
  (default: when the tokenizer has one); conversations always do. `params` is one
  SamplingParams for all prompts or one per prompt.
* `generate` returns one GenerationResult per prompt, in order: token_ids (without the
  end-of-sequence token), text (stop string excluded), finish_reason ("stop" | "length"),
  prompt_tokens, ttft_s, seconds, logprobs. `gen.last_stats` holds the timing of the last call;
  `on_finished=` is called with each prompt's index as it ends.
* More prompts than `max_batch_size` share the cache's rows: a prompt takes the row of
  one that finished (continuous batching). `prompt + max_new_tokens` must fit `max_seq_len`.
* `assistant_model=` (same vocabulary) or `prompt_lookup=N` turn on speculative decoding
  (infer.speculative); prompts then run one at a time. Greedy output is identical to plain
  greedy decoding; sampled output is the same as without speculation for the same seed.
* Not thread-safe: one call at a time (the server gives the engine a thread of its own).
* `compile`: "auto" (CUDA: inductor + CUDA graphs; CPU: eager), False, True, an inductor
  mode name, or a dynamo backend (name or callable, e.g. tests' compile counters).
* `compile_prefill`: compile the first chunk of prompts too (symbolic batch and length:
  two graphs); "auto" = on CUDA when the decode step compiles and runs infer.decoder's forward.
* `quant_kernels`: for bitsandbytes-quantized models, "compiled" swaps their layers (in
  place) for ones whose dequantization inductor fuses into the matmul (infer.quantized_layers);
  "bitsandbytes" keeps bitsandbytes' kernels; "auto" = compiled when inductor runs on CUDA.
* `fused`: for llama / mistral / qwen2 models, "auto" (default) runs infer.decoder's lean
  forward instead of the transformers forward; False forces the transformers forward.
* `kernels`: with the fused forward on CUDA (16-bit or nf4 weights), "auto" runs steps
  with one decoding sequence through infer.kernels' Triton kernels; "none" leaves the
  whole step to inductor; "triton" insists (an error if the model cannot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from infer.engine import Engine, StreamEvent
from infer.prompts import chat_ids, text_ids
from infer.sampling import SamplingParams

__all__ = ["Generator", "GenerationResult", "GenerationStats", "StreamEvent", "SamplingParams"]


@dataclass
class GenerationResult:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or stop string) or "length"
    prompt_tokens: int
    ttft_s: float = 0.0
    seconds: float = 0.0
    logprobs: list | None = None


@dataclass
class GenerationStats:
    batch: int = 0  # sequences run together at most
    new_tokens: int = 0  # summed over prompts
    ttft_s: float = 0.0  # until every prompt of the call had its first token
    decode_s: float = 0.0  # from then to the end
    decode_steps: int = 0  # model calls after the first token (decode or verify)
    drafted: int = 0
    accepted: int = 0
    extra: dict = field(default_factory=dict)


MIN_SHARED_PREFIX = 16  # tokens; a shorter common beginning is not worth a second prefill call


def common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest beginning every prompt shares, leaving each prompt at least one token."""
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return first[:n]


class Generator:
    """Batched, streaming generation over infer.engine; see the module docstring."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_seq_len: int = 2048,
                 compile: bool | str | Callable = "auto", assistant_model=None, num_assistant_tokens: int = 5,
                 prompt_lookup: int = 0, sync_interval: int = 8, quant_kernels: str = "auto",
                 fused: bool | str = "auto", kernels: str = "auto", prefill_chunk: int = 8192,
                 max_logprobs: int = 0, compile_prefill="auto", share_prefix="auto"):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.sync_interval = max(1, sync_interval)
        if assistant_model is not None and prompt_lookup:
            raise ValueError("choose one of assistant_model and prompt_lookup, not both")
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, compile=compile,
                             quant_kernels=quant_kernels, fused=fused, kernels=kernels,
                             sync_interval=max(self.sync_interval, num_assistant_tokens if assistant_model is not None else 1),
                             prefill_chunk=prefill_chunk, max_logprobs=max_logprobs,
                             compile_prefill=compile_prefill)
        self.runner = self.engine.runner
        self.device, self.decoder, self.compile_mode = self.runner.device, self.runner.decoder, self.runner.compile_mode
        # A call's prompts that begin alike (a chat template, an instruction) prefill their
        # common beginning once (Engine.share_prefix). auto: on the CPU, where prefill is
        # most of an evaluation's time; on CUDA it is not measured yet.
        self.share_prefix = self.device.type == "cpu" if share_prefix == "auto" else bool(share_prefix)
        self.last_stats = GenerationStats()
        self.drafter = None
        if assistant_model is not None or prompt_lookup:
            from infer.speculative import AssistantDrafter, PromptLookupDrafter

            if assistant_model is not None:
                self.drafter = AssistantDrafter(model, assistant_model, num_assistant_tokens, max_seq_len=max_seq_len,
                                                compile=self.compile_mode or False)
            else:
                self.drafter = PromptLookupDrafter(prompt_lookup)

    @property
    def eos_ids(self) -> set[int]:
        return self.engine.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self.engine.eos_ids = set(ids)

    @property
    def graph_count(self) -> int:
        return self.engine.graph_count

    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Token ids for one prompt (see the module docstring for what a prompt may be)."""
        if chat is None:
            chat = bool(getattr(self.tokenizer, "chat_template", None))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str) and not chat:
            return text_ids(self.tokenizer, prompt)
        conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: pass plain strings with chat=False")
        return chat_ids(self.tokenizer, conversation, add_generation_prompt=True)

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 chat: bool | None = None, on_finished: Callable[[int], None] | None = None) -> list[GenerationResult]:
        """`on_finished(index)` is called as each prompt's generation ends (e.g. to move a progress bar)."""
        t0 = time.perf_counter()
        seqs = []
        for event in self._events(prompts, params, chat, seqs):
            if event.finished and on_finished is not None:
                on_finished(event.index)
        seconds = time.perf_counter() - t0
        return [GenerationResult(s.index, s.token_ids, s.text, s.finish_reason or "length", len(s.prompt),
                                 (s.first_token_at or t0) - s.arrival, seconds,
                                 s.logprobs if s.params.logprobs is not None else None) for s in seqs]

    def stream(self, prompts, params=None, *, chat: bool | None = None) -> Iterator[StreamEvent]:
        """Yield StreamEvents as tokens arrive (read back every `sync_interval` steps)."""
        yield from self._events(prompts, params, chat, [])

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_len: int = 16, sampling: bool = False) -> None:
        """Compile and record graphs for these batch sizes so no timed call pays for it."""
        params = SamplingParams(max_new_tokens=2 * self.sync_interval + 1, temperature=0.7 if sampling else 0.0,
                                ignore_eos=True)
        for b in batch_sizes:
            for _ in range(2):  # the first call compiles and records graphs, the second replays
                self.generate([[0] * prompt_len] * b, params)

    def _events(self, prompts, params, chat, seqs: list) -> Iterator[StreamEvent]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (strings, token-id lists or conversations)")
        token_lists = [self.encode(p, chat) for p in prompts]
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(token_lists)
        if len(plist) != len(token_lists):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(token_lists)} prompts")
        engine = self.engine
        if engine.has_work:
            raise RuntimeError("the engine is busy: a Generator runs one call at a time")
        t0 = time.perf_counter()
        seqs += [engine.new_sequence(toks, p, index=i, arrival=t0) for i, (toks, p) in enumerate(zip(token_lists, plist))]
        self.last_stats = stats = GenerationStats(batch=min(len(seqs), self.max_batch_size))
        steps_before = engine.decode_steps
        if self.drafter is not None:
            from infer.speculative import speculative_events

            for seq in seqs:
                yield from speculative_events(self.runner, self.drafter, seq, stats, max_seq_len=self.max_seq_len,
                                              sync_interval=self.sync_interval)
        else:
            if self.share_prefix and len(seqs) > 1:
                common = common_prefix([s.prompt for s in seqs])
                if len(common) >= MIN_SHARED_PREFIX:
                    engine.share_prefix(common)
            for seq in seqs:
                engine.submit(seq)
            try:
                while engine.has_work:
                    yield from engine.step()
            finally:
                if engine.has_work:  # the caller stopped early (or a step failed): free the rows
                    engine.reset()
            stats.decode_steps = engine.decode_steps - steps_before
        t_end = time.perf_counter()
        t_first = max((s.first_token_at or t_end) for s in seqs) if seqs else t_end
        stats.ttft_s, stats.decode_s = t_first - t0, t_end - t_first
        stats.new_tokens = sum(len(s.token_ids) for s in seqs)
