"""Fast generation for any transformers causal LM: a static KV cache, prompt-length buckets
and a compiled per-token decode step (gpt-fast style), with sampling, streaming and
speculative decoding.

API (a fixed-batch engine; the HTTP server in infer/serve/ runs its own continuous-batching scheduler):

    gen = Generator(model, tokenizer, max_batch_size=8, max_seq_len=2048, compile="auto")
    results = gen.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0.7))
    for event in gen.stream(prompts, params):   # StreamEvent(index, token_ids, text, finished, finish_reason)
        ...

* `prompts` is a list; each item is a string, a list of token ids, or a conversation
  (list of {"role", "content"} dicts). Strings get the chat template when `chat=True`
  (default: when the tokenizer has one); conversations always do. `params` is one
  SamplingParams for all prompts or one per prompt.
* `generate` returns one GenerationResult per prompt, in order: token_ids (without the
  end-of-sequence token), text (stop string excluded), finish_reason ("stop" | "length"),
  prompt_tokens, ttft_s, seconds. `gen.last_stats` holds the timing of the last call.
* More prompts than `max_batch_size` run in consecutive batches. A batch is padded up to
  a power of two and each prompt is left-padded to a length bucket, so the set of shapes
  (and compiled graphs) stays small. `prompt bucket + max_new_tokens` must fit `max_seq_len`.
* `assistant_model=` (same vocabulary) or `prompt_lookup=N` turn on speculative decoding;
  prompts then run one at a time. Greedy output is identical to plain greedy decoding;
  sampled output follows the same distribution (a draft token is kept only when it equals
  the token the target model samples at that position).
* Not thread-safe: the cache and state buffers are shared; serve one call at a time.
* `compile`: "auto" (CUDA: inductor + CUDA graphs, `mode="reduce-overhead"`; CPU: eager),
  False, True, an inductor mode name, or a dynamo backend (name or callable, e.g. tests'
  compile counters). On CUDA, "reduce-overhead" and "max-autotune" record each decode
  step as a CUDA graph with infer.graphs. Warm-up (`gen.warmup()`) compiles and records
  graphs before timing.
* `quant_kernels`: for bitsandbytes-quantized models, "compiled" swaps their layers (in
  place) for ones whose dequantization inductor fuses into the matmul (infer.quantize);
  "bitsandbytes" keeps bitsandbytes' kernels; "auto" = compiled when inductor runs on CUDA.

* `fused`: for llama / mistral / qwen2 models, "auto" (default) runs infer.decoder's lean
  forward (fused q/k/v and gate/up matmuls, no K/V copies for grouped-query attention)
  instead of the transformers forward; False forces the transformers forward.
* `kernels`: with the fused forward on CUDA (16-bit or nf4 weights), "auto" runs batch-1
  decode steps through infer.kernels' Triton kernels (5 per layer: norms, rotary, cache
  write, SiLU and residual adds folded into the matvecs and attention); "none" leaves the
  whole step to inductor; "triton" insists (an error if the model cannot).

How it stays fast: all decode state (token history, current slot, per-row sampling
parameters, KV cache) lives in device buffers allocated once, so the compiled decode step
takes no inputs and returns nothing; one step is one CUDA-graph replay. The host reads new
tokens every `sync_interval` steps, not every step, and on CUDA it queues the next
`sync_interval` steps before reading, so the GPU does not wait while it detokenizes.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from infer.cache import StaticKVCache, check_supported, use_masked_attention
from infer.detokenize import TextStream
from infer.graphs import compile_mode, raise_dynamo_limits
from infer.records import chat_ids
from infer.sampling import SamplingParams, choose_tokens, eos_token_ids

log = logging.getLogger(__name__)

INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class GenerationResult:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or stop string) or "length"
    prompt_tokens: int
    ttft_s: float = 0.0
    seconds: float = 0.0


@dataclass
class StreamEvent:
    index: int  # which prompt of the call
    token_ids: list[int]  # tokens new since the previous event for this prompt
    text: str  # text new since the previous event (held back while it may start a stop string)
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class GenerationStats:
    batch: int = 0  # padded batch size actually run
    prompt_bucket: int = 0
    new_tokens: int = 0  # summed over prompts
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # model calls after the first token (decode or verify)
    drafted: int = 0
    accepted: int = 0
    extra: dict = field(default_factory=dict)


class _Row:
    """Host-side state of one prompt: tokens so far, end conditions, text already emitted.

    Text goes through infer.detokenize.TextStream (as in the server): incremental decoding,
    stop strings cut before the match, and a tail that could start a stop string held back.
    """

    def __init__(self, index, prompt_len, params: SamplingParams, tokenizer, eos_ids):
        self.index, self.prompt_len, self.params = index, prompt_len, params
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.stream = TextStream(tokenizer, tuple(params.stop))
        self.pending = ""  # released text not yet handed out in an event
        self.emitted_tokens = 0
        self.finish_reason: str | None = None
        self.ttft_s = 0.0

    @property
    def text(self) -> str:
        return self.stream.text

    def add(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            if self.finish_reason:
                return
            if tok in self.eos_ids and not self.params.ignore_eos:
                self._finish("stop")
                return
            self.token_ids.append(tok)  # kept up to the token that completes a stop string
            self.pending += self.stream.push(tok)
            if self.stream.stopped:
                self._finish("stop")
            elif len(self.token_ids) >= self.params.max_new_tokens:
                self._finish("length")

    def _finish(self, reason: str) -> None:
        self.pending += self.stream.flush()
        self.finish_reason = reason

    def event(self) -> StreamEvent | None:
        new_tokens = self.token_ids[self.emitted_tokens:]
        if not new_tokens and not self.pending and not self.finish_reason:
            return None
        event = StreamEvent(self.index, new_tokens, self.pending, bool(self.finish_reason), self.finish_reason)
        self.emitted_tokens, self.pending = len(self.token_ids), ""
        return event


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Generator:
    """Batched, streaming generation with a static cache; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        compile: bool | str | Callable = "auto",
        compile_prefill: bool = False,
        prompt_buckets: Sequence[int] | None = None,
        assistant_model=None,
        num_assistant_tokens: int = 5,
        prompt_lookup: int = 0,
        sync_interval: int = 8,
        quant_kernels: str = "auto",
        fused: bool | str = "auto",
        kernels: str = "auto",
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        # The cache is a multiple of 64 slots long: SDPA's fused kernels want aligned masks.
        cache_len = -(-max_seq_len // 64) * 64
        self.sync_interval = max(1, sync_interval)
        self.device = next(model.parameters()).device
        self._groups_in_flight = 2 if self.device.type == "cuda" else 1  # see _batch_events
        self.config = model.config
        check_supported(self.config, max_seq_len)
        use_masked_attention(model)
        model.eval()
        self.compile_mode = compile_mode(compile, self.device)
        if quant_kernels not in ("auto", "bitsandbytes", "compiled"):
            raise ValueError(f"quant_kernels must be auto, bitsandbytes or compiled, got {quant_kernels!r}")
        inductor_on_gpu = self.compile_mode in INDUCTOR_MODES and self.device.type == "cuda"
        if quant_kernels == "compiled" or (quant_kernels == "auto" and inductor_on_gpu):
            from infer.quantize import use_compiled_kernels

            use_compiled_kernels(model)  # in place: same packed weights, fusable dequantization
        self.decoder = None
        if fused not in ("auto", True, False):
            raise ValueError(f"fused must be auto, True or False, got {fused!r}")
        if fused:
            from infer.decoder import FusedDecoder, unsupported_reason

            reason = unsupported_reason(model)
            if reason is None:
                self.decoder = FusedDecoder(model, kernels=kernels if self.compile_mode else "none", cache_slots=cache_len)
            elif fused is True:
                raise ValueError(f"fused=True, but {reason}; use fused='auto' to fall back to the transformers forward")
            else:
                log.info("transformers forward (not the fused decoder): %s", reason)

        embed = model.get_input_embeddings().weight
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else embed.shape[0]
        self.pad_id = _first(tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.buckets = sorted(set(prompt_buckets or [16 << i for i in range(16) if 16 << i < max_seq_len] + [max_seq_len]))

        dev, B, T = self.device, max_batch_size, cache_len
        # Decode state lives on the device, allocated once; compiled steps read and advance it.
        self._seq = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)  # token by slot
        self._start = torch.zeros(B, dtype=torch.long, device=dev)  # first real slot per row
        self._slot = torch.zeros((), dtype=torch.long, device=dev)  # slot of the newest token
        self._temperature = torch.zeros(B, device=dev)
        self._top_k = torch.zeros(B, dtype=torch.long, device=dev)
        self._top_p = torch.ones(B, device=dev)
        self._penalty = torch.ones(B, device=dev)
        self._key_slots = torch.arange(T, device=dev)
        for t in (self._seq, self._start, self._slot, self._temperature, self._top_k, self._top_p, self._penalty, self._key_slots):
            torch._dynamo.mark_static_address(t)
        self.cache = StaticKVCache(self.config, B, T, embed.dtype, dev, self._slot, self._start)

        params = inspect.signature(model.forward).parameters
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # CUDA graphs are recorded by infer.graphs (not by inductor's cudagraph trees, whose
        # per-call host work was 12% of a batch-1 step); inductor compiles without them.
        self._graphs = None
        if self.device.type == "cuda" and self.compile_mode in ("reduce-overhead", "max-autotune"):
            from infer.graphs import CUDAGraphs

            self._graphs = CUDAGraphs(self.device)
        self._decode = self._compiled(self._decode_impl, self.compile_mode)
        self._verify = self._compiled(self._verify_impl, self.compile_mode)
        self._prefill = self._compiled(self._prefill_impl, self.compile_mode) if compile_prefill else self._prefill_impl
        self.last_stats = GenerationStats()

        self.drafter = None
        if assistant_model is not None and prompt_lookup:
            raise ValueError("choose one of assistant_model and prompt_lookup, not both")
        if assistant_model is not None or prompt_lookup:
            from infer.speculative import AssistantDrafter, PromptLookupDrafter

            if assistant_model is not None:
                self.drafter = AssistantDrafter(self, assistant_model, num_assistant_tokens)
            else:
                self.drafter = PromptLookupDrafter(prompt_lookup)

    # ---- compiled pieces -------------------------------------------------------------

    def _compiled(self, fn, mode):
        if mode is None:
            return fn
        raise_dynamo_limits()
        if callable(mode) or mode not in INDUCTOR_MODES:
            return torch.compile(fn, backend=mode, fullgraph=True, dynamic=False)
        mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        if self.device.type == "cuda":
            import torch._inductor.config as inductor_config

            # Lets inductor turn batch-1 matmuls into fused reductions that reach peak
            # bandwidth, and fuse weight dequantization into them (as gpt-fast does).
            inductor_config.coordinate_descent_tuning = True
        return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)

    def _forward(self, tokens: torch.Tensor, b: int, last_only: bool = False) -> torch.Tensor:
        """Run the model on `tokens` (b, q) placed at slots `_slot + arange(q)`."""
        q = tokens.shape[1]
        slots = self._slot + torch.arange(q, device=tokens.device)
        start = self._start[:b]
        positions = (slots[None, :] - start[:, None]).clamp(min=0)
        keys = self._key_slots[None, None, :]
        # Causal over slots, never into a row's left padding; a padding query attends to
        # itself so its softmax is never empty (an all-masked row would give NaN).
        allowed = (keys <= slots[None, :, None]) & ((keys >= start[:, None, None]) | (keys == slots[None, :, None]))
        if self.decoder is not None:
            return self.decoder(tokens, positions, allowed[:, None], self.cache, last_only)
        out = self.model(
            input_ids=tokens, position_ids=positions, attention_mask=allowed[:, None],
            past_key_values=self.cache, use_cache=True, **(self._prefill_kwargs if last_only else {}),
        )
        return out.logits

    def _choose(self, logits, b: int, sampling: bool, upto: torch.Tensor | None = None):
        """Next token per row; `b` rows of parameters, or row 0's for all when b == 1."""
        if not sampling:
            return choose_tokens(logits, sampling=False)
        rows = logits.shape[0]

        def per_row(buf):
            return buf[:b] if b == rows else buf[:1].expand(rows)

        history = valid = None
        if upto is not None:  # repetition penalty needs the row's history (prompt + output)
            history = self._seq[:b]
            valid = (self._key_slots[None, :] >= self._start[:b, None]) & (self._key_slots[None, :] <= upto)
        return choose_tokens(
            logits, sampling=True, temperature=per_row(self._temperature), top_k=per_row(self._top_k),
            top_p=per_row(self._top_p), penalty=per_row(self._penalty), history=history, history_valid=valid,
        )

    def _prefill_impl(self, b: int, length: int, sampling: bool) -> None:
        # _slot is 0 here: the prompt occupies slots [0, length); first new token goes to `length`.
        logits = self._forward(self._seq[:b, :length], b, last_only=True)[:, -1]
        nxt = self._choose(logits, b, sampling, upto=self._slot + length - 1)
        self._seq[:b, length] = nxt

    def _decode_impl(self, b: int, sampling: bool) -> None:
        tok = self._seq[:b].index_select(1, self._slot.view(1))
        logits = self._forward(tok, b)[:, -1]
        nxt = self._choose(logits, b, sampling, upto=self._slot)
        self._seq[:b].index_copy_(1, (self._slot + 1).view(1), nxt[:, None])
        self._slot.add_(1)

    def _verify_impl(self, k: int, sampling: bool) -> torch.Tensor:
        """Target-model choices after each of [newest token, k drafts] (batch 1)."""
        slots = self._slot + torch.arange(k + 1, device=self._slot.device)
        logits = self._forward(self._seq[:1].index_select(1, slots), 1)[0]
        return self._choose(logits, 1, sampling)

    # ---- host loop -------------------------------------------------------------------

    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Token ids for one prompt (see the module docstring for what a prompt may be)."""
        if chat is None:
            chat = bool(getattr(self.tokenizer, "chat_template", None))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str) and not chat:
            return list(self.tokenizer(prompt).input_ids)
        conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: pass plain strings with chat=False")
        return chat_ids(self.tokenizer, conversation, add_generation_prompt=True)

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *, chat: bool | None = None) -> list[GenerationResult]:
        t0 = time.perf_counter()
        rows: dict[int, _Row] = {}
        for event in self._events(prompts, params, chat, self.sync_interval, rows):
            pass
        seconds = time.perf_counter() - t0
        return [
            GenerationResult(r.index, r.token_ids, r.text, r.finish_reason or "length", r.prompt_len, r.ttft_s, seconds)
            for r in sorted(rows.values(), key=lambda r: r.index)
        ]

    def stream(self, prompts, params=None, *, chat: bool | None = None, interval: int = 1) -> Iterator[StreamEvent]:
        """Yield StreamEvents as tokens arrive (host sync every `interval` steps)."""
        yield from self._events(prompts, params, chat, interval, {})

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_len: int = 16, sampling: bool = False) -> None:
        """Compile and record graphs for these shapes so no timed call pays for it."""
        params = SamplingParams(max_new_tokens=4, temperature=0.7 if sampling else 0.0, ignore_eos=True)
        for b in batch_sizes:
            for _ in range(2):  # the first call compiles and records graphs, the second replays
                self.generate([[self.pad_id] * prompt_len] * b, params)

    def _events(self, prompts, params, chat, interval, rows: dict) -> Iterator[StreamEvent]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (strings, token-id lists or conversations)")
        token_lists = [self.encode(p, chat) for p in prompts]
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(token_lists)
        if len(plist) != len(token_lists):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(token_lists)} prompts")
        chunk = 1 if self.drafter is not None else self.max_batch_size
        self.last_stats = stats = GenerationStats()
        for lo in range(0, len(token_lists), chunk):
            group = {}
            for i in range(lo, min(lo + chunk, len(token_lists))):
                group[i] = rows[i] = _Row(i, len(token_lists[i]), plist[i], self.tokenizer, self.eos_ids)
            toks = [token_lists[i] for i in group]
            if self.drafter is not None:
                from infer.speculative import speculative_events

                yield from speculative_events(self, toks[0], group[lo], interval, stats)
            else:
                yield from self._batch_events(toks, list(group.values()), interval, stats)

    def _start_batch(self, token_lists, plist, max_new: int) -> tuple[int, int, bool]:
        """Left-pad prompts into a bucket, load the state buffers and run the prefill."""
        n = len(token_lists)
        b = min(_pow2_at_least(n), self.max_batch_size)
        longest = max(len(t) for t in token_lists)
        if longest == 0:
            raise ValueError("empty prompt: give at least one token")
        if longest + max_new > self.max_seq_len:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new} exceeds max_seq_len "
                f"{self.max_seq_len}: shorten the prompt, lower max_new_tokens, or build the "
                "Generator with a larger max_seq_len"
            )
        length = next((x for x in self.buckets if x >= longest), longest)
        if length + max_new > self.max_seq_len:
            length = longest  # the bucket would not fit; an exact length costs one extra compile
        seq = torch.full((b, length), self.pad_id, dtype=torch.long)
        start = torch.full((b,), length - 1, dtype=torch.long)  # batch-padding rows: one pad token
        for r, toks in enumerate(token_lists):
            seq[r, length - len(toks):] = torch.tensor(toks, dtype=torch.long)
            start[r] = length - len(toks)
        self._seq[:b, :length].copy_(seq)
        self._start[:b].copy_(start)
        p = plist + [plist[0]] * (b - n)
        self._temperature[:b].copy_(torch.tensor([x.temperature for x in p]))
        self._top_k[:b].copy_(torch.tensor([x.top_k for x in p]))
        self._top_p[:b].copy_(torch.tensor([x.top_p for x in p]))
        self._penalty[:b].copy_(torch.tensor([x.repetition_penalty for x in p]))
        sampling = any(not x.greedy or x.repetition_penalty != 1.0 for x in p)
        seeds = [x.seed for x in plist if x.seed is not None]
        if seeds:
            torch.manual_seed(seeds[0])
        self._slot.fill_(0)
        with torch.inference_mode():
            self._prefill(b, length, sampling)
        self._slot.fill_(length)
        return b, length, sampling

    def _run(self, fn, *args):
        """fn(*args), replayed from its recorded CUDA graph when this generator records them."""
        return self._graphs(fn, *args) if self._graphs is not None else fn(*args)

    @torch.inference_mode()
    def _step(self, b: int, sampling: bool) -> None:
        self._run(self._decode, b, sampling)

    @torch.inference_mode()
    def _verify_step(self, k: int, sampling: bool) -> list[int]:
        return self._run(self._verify, k, sampling).tolist()

    def _read(self, n: int, lo: int, hi: int) -> list[list[int]]:
        return self._seq[:n, lo:hi].tolist()

    def _fetch(self, n: int, lo: int, hi: int) -> Callable[[], list[list[int]]]:
        """Tokens at slots [lo, hi) of the first n rows, once the queued steps have made
        them: on CUDA an asynchronous copy to pinned memory and an event, so reading them
        waits for these steps only, not for steps queued after them."""
        if self.device.type != "cuda":
            tokens = self._read(n, lo, hi)
            return lambda: tokens
        host = torch.empty((n, hi - lo), dtype=torch.long, pin_memory=True)
        host.copy_(self._seq[:n, lo:hi], non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def result():
            done.synchronize()
            return host.tolist()

        return result

    def _batch_events(self, token_lists, rows: list[_Row], interval, stats) -> Iterator[StreamEvent]:
        t0 = time.perf_counter()
        max_new = max(r.params.max_new_tokens for r in rows)
        b, length, sampling = self._start_batch(token_lists, [r.params for r in rows], max_new)
        n = len(rows)
        first = self._read(n, length, length + 1)
        t_first = time.perf_counter()
        for r, toks in zip(rows, first):
            r.ttft_s = t_first - t0
            r.add(toks)
        yield from _events_of(rows)
        # Decode steps go out in groups of `interval`. On CUDA the next group is queued
        # before the host reads (detokenizes, checks stop strings of) the current one, so the
        # GPU never waits for the host; when every row has stopped, at most that one queued
        # group is wasted. On CPU a step runs as it is called: nothing is run ahead.
        total = max_new - 1  # the prefill made the first token
        queued: list[Callable[[], list[list[int]]]] = []
        launched = steps = 0
        while not all(r.finish_reason for r in rows) and steps < total:
            while launched < total and len(queued) < self._groups_in_flight:
                todo = min(interval, total - launched)
                for _ in range(todo):
                    self._step(b, sampling)
                lo = length + 1 + launched
                queued.append(self._fetch(n, lo, lo + todo))
                launched += todo
            new = queued.pop(0)()
            steps += len(new[0])
            for r, toks in zip(rows, new):
                r.add(toks)
            yield from _events_of(rows)
        t_end = time.perf_counter()
        stats.batch, stats.prompt_bucket = b, length
        stats.ttft_s += t_first - t0
        stats.decode_s += t_end - t_first
        stats.decode_steps += steps
        stats.new_tokens += sum(len(r.token_ids) for r in rows)


def _events_of(rows) -> Iterator[StreamEvent]:
    for r in rows:
        if (e := r.event()) is not None:
            yield e


def _first(*values):
    return next(v for v in values if v is not None)
