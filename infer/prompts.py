"""Prompt layout: how a conversation becomes token ids, the same way in training
(prompt/answer masks), evaluation, calibration, generation and the server.

* `text_ids` tokenizes plain text, as `tokenizer(text).input_ids` does, for less time;
* `chat_ids` renders messages with the tokenizer's chat template;
* `plain_prompt` lays out a conversation for a model without one;
* `prompt_ids` / `answer_ids` split an example into what inference sends and the reference
  answer as training scores it (`through_end_of_turn` cuts an answer after its end-of-turn).
"""

from __future__ import annotations


def plain_prompt(messages: list[dict[str, str]], eos_token: str = "") -> str:
    """The prompt for a model without a chat template (and `data.chat_template: false`).

    Consecutive non-assistant messages are joined by a blank line; an assistant message is
    followed by `eos_token`. The answer follows the prompt directly, with no separator, so a
    dataset that wants one puts it at the end of its prompts. `train.data` lays out training
    rows the same way, so for single-turn rows the prompt tokens match exactly.
    """
    text, previous = "", None
    for message in messages:
        if message["role"] == "assistant":
            text += message["content"] + eos_token
        else:
            text += ("\n\n" if previous not in (None, "assistant") else "") + message["content"]
        previous = message["role"]
    return text


def text_ids(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer(text, add_special_tokens=...).input_ids` as a list.

    A fast tokenizer's Rust backend is called directly: transformers' `__call__` wraps one
    text in a batch of one and a `BatchEncoding`, which costs a third of the encoding itself
    on a short prompt (~60 us of ~220 us on the CPU machine), on every server request. The
    backend's `encode_batch_fast` skips the character offsets `encode` tracks, a quarter of
    what is left (48 words: 62 against 81 us, 98 against 122 us when the CPU comes back from
    idle, as a server's does between requests). The backend is used only while it is
    configured as `__call__` would configure it (no truncation, no padding, the same
    special-token splitting); otherwise `__call__` runs.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template: the one renderer
    training (prompt/answer masks), evaluation, generation and the server share, so a prompt
    is tokenized the same way everywhere. The template writes any BOS itself, so the
    tokenizer adds no special tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text_ids(tokenizer, text, add_special_tokens=False)


def through_end_of_turn(tokenizer, answer: list[int]) -> list[int]:
    """An assistant turn's tokens as rendered by a chat template, cut after its last special
    token (the end-of-turn): what the template writes after it (ChatML's newline) belongs to
    the next prompt. Training masks exactly this span and evaluation scores it.

    Special means the tokenizer's named special tokens and any added token flagged special
    (some end-of-turn tokens are only the latter).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    ends = [k for k, token in enumerate(answer) if token in special]
    return answer[: ends[-1] + 1] if ends else answer


def prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids of the prompt inference sends for `conversation` (its last turn excluded)."""
    context = conversation[:-1]
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, context, add_generation_prompt=True)
    return text_ids(tokenizer, plain_prompt(context))


def answer_ids(tokenizer, conversation: list[dict], prompt: list[int]) -> list[int]:
    """Reference answer tokens as training lays them out (ending with end-of-turn / eos)."""
    if getattr(tokenizer, "chat_template", None):
        full = chat_ids(tokenizer, conversation, add_generation_prompt=False)
        if full[: len(prompt)] == prompt:
            return through_end_of_turn(tokenizer, full[len(prompt):])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return text_ids(tokenizer, conversation[-1]["content"], add_special_tokens=False) + eos
