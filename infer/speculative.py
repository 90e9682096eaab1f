"""Speculative decoding on top of `infer.generate.Generator`: draft k tokens cheaply, check
them with one target-model call over k + 1 positions, keep the agreeing prefix.

Two draft sources:
* `AssistantDrafter`: a smaller model with the same vocabulary, run greedily with its own
  static cache and compiled decode step.
* `PromptLookupDrafter`: copies what followed the latest earlier occurrence of the last
  n-gram (n = 3, 2, 1) in prompt + output; free, and strong when output quotes the input.

Correctness does not depend on draft quality. A draft token is kept only when it equals the
token the target itself chooses at that position (argmax, or a sample from the target's
processed distribution), and the first disagreement is replaced by the target's choice.
So greedy output is token-for-token plain greedy output, and sampled output has exactly the
target's distribution. Rejected drafts leave stale KV entries beyond the newest slot; the
causal mask never reads them and the next write overwrites them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from infer.generate import Generator, GenerationStats, StreamEvent, _Row


class PromptLookupDrafter:
    def __init__(self, num_tokens: int, max_ngram: int = 3):
        if num_tokens < 1:
            raise ValueError(f"prompt_lookup must be >= 1 draft token, got {num_tokens}")
        self.k, self.max_ngram = num_tokens, max_ngram

    def begin(self, gen: Generator, length: int) -> None:
        # n-gram -> index right after its latest occurrence; extended as the sequence grows
        self._next_after: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def propose(self, gen: Generator, seq: list[int], newest_slot: int) -> list[int]:
        for j in range(max(self._indexed, 1), len(seq)):
            for n in range(1, self.max_ngram + 1):
                if j - n >= 0:
                    self._next_after[tuple(seq[j - n : j])] = j
        self._indexed = len(seq)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            j = self._next_after.get(tuple(seq[-n:]))
            if j is not None:
                return seq[j : j + self.k]
        return []

    def accepted(self, newest_slot: int, n: int) -> None:
        pass


class AssistantDrafter:
    def __init__(self, target: Generator, assistant_model, num_tokens: int):
        from infer.generate import Generator

        if num_tokens < 1:
            raise ValueError(f"num_assistant_tokens must be >= 1, got {num_tokens}")
        t_vocab = target.model.get_input_embeddings().weight.shape[0]
        a_vocab = assistant_model.get_input_embeddings().weight.shape[0]
        if t_vocab != a_vocab:
            raise ValueError(
                f"the assistant model's vocabulary ({a_vocab} tokens) differs from the target's ({t_vocab}); "
                "speculative decoding needs the same tokenizer: pick an assistant of the same model family"
            )
        self.k = num_tokens
        self.gen = Generator(
            assistant_model, target.tokenizer, max_batch_size=1, max_seq_len=target.max_seq_len,
            compile=target.compile_mode or False, prompt_buckets=target.buckets,
        )
        self.fed = 0  # the assistant's cache holds slots [0, fed) of the current sequence

    def begin(self, gen: Generator, length: int) -> None:
        a = self.gen
        a._seq[:1, :length].copy_(gen._seq[:1, :length])
        a._start[:1].copy_(gen._start[:1])
        a._slot.fill_(0)
        with torch.inference_mode():
            a._prefill(1, length, False)
        self.fed = length

    def propose(self, gen: Generator, seq: list[int], newest_slot: int) -> list[int]:
        a = self.gen
        # Bring the assistant up to the target's sequence (at most two tokens behind).
        a._seq[:1, self.fed : newest_slot + 1].copy_(gen._seq[:1, self.fed : newest_slot + 1])
        for slot in range(self.fed, newest_slot):
            a._slot.fill_(slot)
            a._step(1, False)
            a._seq[0, slot + 1] = gen._seq[0, slot + 1]  # the step wrote its own guess there
        a._slot.fill_(newest_slot)
        for _ in range(self.k):
            a._step(1, False)
        self.fed = newest_slot + self.k
        return a._seq[0, newest_slot + 1 : newest_slot + 1 + self.k].tolist()

    def accepted(self, newest_slot: int, n: int) -> None:
        # Cached drafts past the first rejected one are wrong for the new sequence.
        self.fed = min(self.fed, newest_slot + n + 1)


def speculative_events(gen: Generator, prompt: list[int], row: _Row, interval: int, stats: GenerationStats) -> Iterator[StreamEvent]:
    from infer.generate import _events_of

    params = row.params
    if params.repetition_penalty != 1.0:
        raise ValueError(
            "repetition_penalty is not supported with speculative decoding (the penalty of a "
            "position would depend on unverified drafts); drop one of the two"
        )
    drafter = gen.drafter
    t0 = time.perf_counter()
    _, length, sampling = gen._start_batch([prompt], [params], params.max_new_tokens)
    first = gen._read(1, length, length + 1)[0]
    t_first = time.perf_counter()
    row.ttft_s = t_first - t0
    row.add(first)
    yield from _events_of([row])
    drafter.begin(gen, length)
    seq = list(prompt) + first
    newest, calls, k = length, 0, drafter.k
    while not row.finish_reason and newest - length + 1 < params.max_new_tokens:
        # Near the end of the cache, verify would write past it: fall back to single steps.
        draft = drafter.propose(gen, seq, newest) if newest + k < gen.max_seq_len else []
        if draft:
            draft = (draft + [draft[-1]] * k)[:k]  # fixed verify shape: one compiled graph
            gen._seq[0, newest + 1 : newest + 1 + k] = torch.tensor(draft, device=gen.device)
            choices = gen._verify_step(k, sampling)
            n = 0
            while n < k and draft[n] == choices[n]:
                n += 1
            new = draft[:n] + [choices[n]]
            gen._seq[0, newest + 1 + n] = choices[n]
            drafter.accepted(newest, n)
            stats.drafted += k
            stats.accepted += n
        else:
            gen._step(1, sampling)
            new = gen._read(1, newest + 1, newest + 2)[0]
        newest += len(new)
        gen._slot.fill_(newest)
        seq += new
        calls += 1
        row.add(new)
        if calls % interval == 0 or row.finish_reason:
            yield from _events_of([row])
    yield from _events_of([row])
    stats.batch, stats.prompt_bucket = 1, length
    stats.ttft_s += t_first - t0
    stats.decode_s += time.perf_counter() - t_first
    stats.decode_steps += calls
    stats.new_tokens += len(row.token_ids)
