"""Speculative decoding on the engine's model runner (row 0, one sequence at a time): draft
k tokens cheaply, check them with one target-model call over k + 1 positions, keep the
agreeing prefix.

Two draft sources:
* `AssistantDrafter`: a smaller model with the same vocabulary, run greedily on a model
  runner of its own (static cache, compiled decode step).
* `PromptLookupDrafter`: copies what followed the latest earlier occurrence of the last
  n-gram (n = 3, 2, 1) in prompt + output; free, and strong when output quotes the input.

Correctness does not depend on draft quality. A draft token is kept only when it equals the
token the target itself chooses at that position (argmax, or a sample from the target's
processed distribution with the noise that position draws in plain decoding), and the
first disagreement is replaced by the target's choice. So greedy output is token-for-token
plain greedy output, and sampled output is plain sampled output for the same seed. Rejected drafts leave stale KV entries beyond the newest slot; the
causal mask never reads them and the next write overwrites them.
"""

from __future__ import annotations

from typing import Iterator

from infer.engine import Sequence, StreamEvent
from infer.runner import ModelRunner
from infer.sampling import SamplingParams


class PromptLookupDrafter:
    def __init__(self, num_tokens: int, max_ngram: int = 3):
        if num_tokens < 1:
            raise ValueError(f"prompt_lookup must be >= 1 draft token, got {num_tokens}")
        self.k, self.max_ngram = num_tokens, max_ngram

    def begin(self, prompt: list[int]) -> None:
        # n-gram -> index right after its latest occurrence; extended as the sequence grows
        self._next_after: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def propose(self, seq: list[int], newest_slot: int) -> list[int]:
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
    def __init__(self, target_model, assistant_model, num_tokens: int, *, max_seq_len: int, compile):
        if num_tokens < 1:
            raise ValueError(f"num_assistant_tokens must be >= 1, got {num_tokens}")
        t_vocab = target_model.get_input_embeddings().weight.shape[0]
        a_vocab = assistant_model.get_input_embeddings().weight.shape[0]
        if t_vocab != a_vocab:
            raise ValueError(
                f"the assistant model's vocabulary ({a_vocab} tokens) differs from the target's ({t_vocab}); "
                "speculative decoding needs the same tokenizer: pick an assistant of the same model family"
            )
        self.k = num_tokens
        self.runner = ModelRunner(assistant_model, max_batch_size=1, max_seq_len=max_seq_len, compile=compile,
                                  group_steps=max(8, num_tokens))
        self.fed = 0  # the assistant's cache holds positions [0, fed) of the current sequence

    def begin(self, prompt: list[int]) -> None:
        a = self.runner
        a.load(0, prompt, GREEDY, 0)
        a.prefill_fresh([0], [prompt], [False], False, False)
        a.set_active([0], True)
        a.set_single(0)
        self.fed = len(prompt)

    def propose(self, seq: list[int], newest: int) -> list[int]:
        a = self.runner
        # Bring the assistant up to the target's sequence (at most two tokens behind), then
        # let it continue greedily from the newest token.
        if self.fed < newest:
            a.prefill_extend(0, self.fed, seq[self.fed : newest], False, False, False)
        a.write(0, newest, [seq[newest]])
        a.set_length(0, newest)
        a.decode_group(self.k, 1, a.single_row_kernels, False, False)
        self.fed = newest + self.k
        return [row[0] for row in a.fetch(self.k, 1, False)()[0]]

    def accepted(self, newest: int, n: int) -> None:
        # Cached drafts past the first rejected one are wrong for the new sequence.
        self.fed = min(self.fed, newest + n + 1)


GREEDY = SamplingParams(max_new_tokens=1)


def speculative_events(runner: ModelRunner, drafter, seq: Sequence, stats, *, max_seq_len: int,
                       sync_interval: int) -> Iterator[StreamEvent]:
    """Generate `seq` alone in row 0 of `runner`, with `drafter`'s drafts, yielding its events
    every `sync_interval` target-model calls. `stats` (infer.generate's GenerationStats) gets
    the tokens drafted and accepted and the target-model calls after the first token."""
    params = seq.params
    if params.repetition_penalty != 1.0:
        raise ValueError(
            "repetition_penalty is not supported with speculative decoding (the penalty of a "
            "position would depend on unverified drafts); drop one of the two"
        )
    if params.logprobs is not None:
        raise ValueError("logprobs are not supported with speculative decoding; drop one of the two")
    prompt = seq.prompt
    runner.load(0, prompt, params, seq.seed)
    runner.prefill_fresh([0], [prompt], [True], params.sampling, False)
    runner.set_active([0], True)
    runner.set_single(0)
    seq.add(runner.fetch(1, 1, False)()[0][0][0])
    if (event := seq.event()) is not None:
        yield event
    drafter.begin(prompt)
    tokens = prompt + seq.token_ids
    newest, calls, k = len(prompt), 0, drafter.k
    try:
        while not seq.done and newest - len(prompt) + 1 < params.max_new_tokens:
            # Near the end of the cache, verify would write past it: fall back to single steps.
            draft = drafter.propose(tokens, newest) if newest + k < max_seq_len else []
            if draft:
                draft = (draft + [draft[-1]] * k)[:k]  # fixed verify shape: one compiled graph
                runner.write(0, newest + 1, draft)
                choices = runner.verify(k, params.sampling)
                n = 0
                while n < k and draft[n] == choices[n]:
                    n += 1
                new = draft[:n] + [choices[n]]
                runner.write(0, newest + 1 + n, [choices[n]])
                runner.set_length(0, newest + n + 1)
                drafter.accepted(newest, n)
                stats.drafted += k
                stats.accepted += n
            else:
                runner.decode_group(1, 1, runner.single_row_kernels, params.sampling, False)
                new = [runner.fetch(1, 1, False)()[0][0][0]]
            newest += len(new)
            tokens += new
            calls += 1
            for token in new:
                seq.add(token)
            if calls % sync_interval == 0 or seq.done:
                if (event := seq.event()) is not None:
                    yield event
        if (event := seq.event()) is not None:
            yield event
    finally:
        runner.set_active([0], False)
    stats.decode_steps += calls
