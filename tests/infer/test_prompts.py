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


def test_text_ids_are_what_the_tokenizer_call_gives(default_model_dir):
    from transformers import AutoTokenizer

    from infer.prompts import text_ids

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    texts = ["What is the capital of France?", "", " leading space", "tabs\tand\nnew lines\n\n",
             "ünïcödé 日本語 emoji 🙂", "<|im_start|>user\nhi<|im_end|>", "x" * 3000]
    for text in texts:
        for special in (True, False):
            assert text_ids(tokenizer, text, add_special_tokens=special) == \
                tokenizer(text, add_special_tokens=special).input_ids, (text[:40], special)
    # A backend left truncating (by a direct call, or by its tokenizer.json) is not used as it is.
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    assert text_ids(tokenizer, "x" * 3000) == tokenizer("x" * 3000).input_ids
    assert len(text_ids(tokenizer, "a b c d e f g h")) == 8
