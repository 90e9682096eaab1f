"""infer.prompts: the layout of a prompt without a chat template."""

from __future__ import annotations

from infer.prompts import plain_prompt


def test_plain_prompt_layout():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    assert plain_prompt(messages) == "S\n\nU1A1U2"
    assert plain_prompt(messages, eos_token="</s>") == "S\n\nU1A1</s>U2"
