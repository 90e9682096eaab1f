"""Chat templates by name or from a file (`data.chat_template`).

    auto         the tokenizer's own template when it has one, else plain prompt + completion text
    true / false the tokenizer's own (required) / none: plain prompt + completion text
    chatml       <|im_start|>{role}\n{content}<|im_end|>\n ...    then <|im_start|>assistant\n
    llama3       <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|> ...
    zephyr       <|{role}|>\n{content}{eos}\n ...                  then <|assistant|>\n
    PATH.jinja   a Jinja template file, as transformers renders them

Each built-in is written from its format's published description (ChatML; Meta's Llama 3 prompt
format; the Zephyr model card). None adds a default system prompt. A template set here
replaces the tokenizer's, is what training rows are rendered with, and is saved with the
tokenizer in model/ and adapter/, so `infer` prompts the tuned model the same way.

A template must end an assistant turn with a special token of the tokenizer (its end-of-turn):
that token is what the model learns to stop on and what generation stops at. Llama 3's
`<|eot_id|>` exists only in Llama 3 tokenizers, so `llama3` on another tokenizer is refused
rather than trained into a model that never stops.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{%- if bos_token is defined and bos_token %}{{- bos_token }}{%- endif %}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "zephyr": (
        "{%- for message in messages %}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
    ),
}


class ChatTemplateError(ValueError):
    """A data.chat_template that cannot be used with this tokenizer."""


def check_template_setting(setting) -> None:
    """ValueError for a data.chat_template that is neither a keyword, a built-in name nor a .jinja file."""
    if isinstance(setting, bool) or setting == "auto" or setting in BUILTIN_TEMPLATES:
        return
    if not str(setting).endswith(".jinja"):
        raise ValueError(f"{setting!r} is not a template: use auto, true, false, one of "
                         f"{', '.join(BUILTIN_TEMPLATES)}, or the path of a .jinja file")
    if not Path(setting).expanduser().is_file():
        raise ValueError(f"template file not found: {setting} (relative paths are taken from the current "
                         f"directory, {Path.cwd()})")


def template_text(setting) -> str | None:
    """The template `setting` names (a built-in's text or a file's), or None for auto / true / false."""
    if isinstance(setting, bool) or setting == "auto":
        return None
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    try:
        return Path(setting).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"data.chat_template: cannot read {setting}: {exc}") from None


def apply_template_setting(tokenizer, setting) -> None:
    """Give `tokenizer` the template data.chat_template names (when it names one), checked to render a
    conversation and to end an assistant turn with a special token."""
    text = template_text(setting)
    if text is None:
        return
    tokenizer.chat_template = text
    try:
        end = end_of_turn_id(tokenizer)
    except Exception as exc:  # a template file that does not render: Jinja syntax, a missing variable
        raise ChatTemplateError(f"data.chat_template {setting}: the template does not render a conversation "
                                f"({type(exc).__name__}: {exc})") from None
    if end is None:
        turn = _assistant_turn(tokenizer)
        raise ChatTemplateError(
            f"data.chat_template {setting}: the template ends an assistant turn with {turn!r}, which holds no "
            "special token of this tokenizer, so a tuned model would never learn where to stop. Use a template "
            "whose end-of-turn marker is one of the tokenizer's special tokens "
            f"({', '.join(tokenizer.all_special_tokens)}), or auto."
        )


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _assistant_turn(tokenizer) -> str:
    prompt = tokenizer.apply_chat_template(_PROBE[:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    return whole[len(prompt):] if whole.startswith(prompt) else whole


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the tokenizer's template ends an assistant turn with (the last special token
    of a rendered answer, as training masks it), or None when the turn holds none."""
    from infer.prompts import chat_ids

    prompt = chat_ids(tokenizer, _PROBE[:1], add_generation_prompt=True)
    whole = chat_ids(tokenizer, _PROBE, add_generation_prompt=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    found = [token for token in whole[len(prompt):] if token in special]
    return found[-1] if found else None
