"""An Ollama Modelfile for an exported GGUF: FROM, the chat template as a Go template, stops.

Ollama does not run Jinja: a Modelfile's TEMPLATE is a Go text/template over `.Messages`.
The common chat templates (ChatML, Llama 3, Qwen2, SmolLM) render every message as

    PREFIX(role) + content + SUFFIX

with an optional default system message when the conversation has none, and a generation
prompt after the last message. `derive_layout` finds those pieces by rendering the Jinja
template on marker conversations, then checks the layout reproduces the Jinja output on
other conversations; a template that is not of this shape (system text folded into the
first user turn, per-message logic, tools) gets no TEMPLATE and a comment saying so, rather
than a translation that silently prompts differently. Every literal is emitted as a Go
string constant, so the template's own whitespace never leaks into prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_MARK = {"system": "SYSMARKQZ", "user1": "USERONEMARKQZ", "assistant": "ASSISTMARKQZ", "user2": "USERTWOMARKQZ"}


@dataclass
class ChatLayout:
    head: str  # written once, before everything (empty when the tokenizer adds BOS itself)
    prefix: dict[str, str]  # per role
    suffix: str  # after every message's content
    generation: str  # after the last message when the model is to answer
    default_system: str | None  # content of the system message the template adds when none is given

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the Go template renders, in Python (used to check the translation)."""
        out = self.head
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            out += self.prefix["system"] + self.default_system + self.suffix
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            out += self.prefix[m["role"]] + m["content"]
            if not (last and m["role"] == "assistant" and add_generation_prompt):
                out += self.suffix
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out += self.generation
        return out


def derive_layout(tokenizer, *, add_bos: bool) -> tuple[ChatLayout | None, str]:
    """(layout, '') for a template of the common shape, else (None, why not)."""
    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    system, user1, assistant, user2 = ({"role": r, "content": _MARK[k]} for r, k in
                                       (("system", "system"), ("user", "user1"), ("assistant", "assistant"), ("user", "user2")))
    try:
        full = render([system, user1, assistant, user2], True)
        no_gen = render([system, user1, assistant, user2], False)
        no_system = render([user1, assistant, user2], False)
    except Exception as exc:  # templates may raise on shapes they do not allow
        return None, f"the chat template refused a system + user/assistant conversation ({exc})"
    if not full.startswith(no_gen):
        return None, "the generation prompt is not appended after the conversation"
    generation = full[len(no_gen):]
    segments = _split(no_gen, [_MARK[k] for k in ("system", "user1", "assistant", "user2")])
    plain = _split(no_system, [_MARK[k] for k in ("user1", "assistant", "user2")])
    if segments is None or plain is None:
        return None, "message contents are not written verbatim, in order"
    seg0, seg1, seg2, seg3, suffix = segments
    if not all(s.startswith(suffix) for s in (seg1, seg2, seg3)) or seg1[len(suffix):] != seg3[len(suffix):]:
        return None, "messages do not share one closing text and one prefix per role"
    prefix = {"system": seg0, "user": seg3[len(suffix):], "assistant": seg2[len(suffix):]}
    if plain[1:] != [seg2, seg3, suffix] or not plain[0].endswith(prefix["user"]):
        return None, "a conversation without a system message is laid out differently"
    before = plain[0][: len(plain[0]) - len(prefix["user"])]
    head, default_system = "", None
    if before and before.startswith(seg0) and before.endswith(suffix):
        default_system = before[len(seg0): len(before) - len(suffix)]
    elif before and seg0.startswith(before):
        head, prefix["system"] = before, seg0[len(before):]
    elif before:
        return None, "the text before the first user message is not a system message"
    bos = getattr(tokenizer, "bos_token", None)
    if add_bos and bos:  # llama.cpp adds BOS itself for such a model; the template must not repeat it
        if head.startswith(bos):
            head = head[len(bos):]
        elif default_system is not None and prefix["system"].startswith(bos):
            prefix["system"] = prefix["system"][len(bos):]
    layout = ChatLayout(head, prefix, suffix, generation, default_system)
    problem = _check(layout, render, bos if add_bos else None)
    return (None, problem) if problem else (layout, "")


def _split(text: str, marks: list[str]) -> list[str] | None:
    out, rest = [], text
    for mark in marks:
        if rest.count(mark) != 1:
            return None
        before, rest = rest.split(mark)
        out.append(before)
    return out + [rest]


def _check(layout: ChatLayout, render, stripped_bos: str | None) -> str:
    samples = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    ]
    for messages in samples:
        expected = render(messages, True)
        if stripped_bos:
            expected = expected.removeprefix(stripped_bos)
        if layout.render(messages) != expected:
            return f"the derived layout renders {json.dumps(layout.render(messages))[:160]} where the chat template renders {json.dumps(expected)[:160]}"
    return ""


def _go(text: str) -> str:
    """A Go text/template action printing `text`: a JSON string is a valid Go string literal."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(layout: ChatLayout) -> str:
    p, s = layout.prefix, _go(layout.suffix)
    default = legacy_default = ""
    if layout.default_system is not None:
        block = _go(p["system"] + layout.default_system + layout.suffix)
        default = '{{- if ne (index .Messages 0).Role "system" }}' + block + "{{ end }}\n"
        legacy_default = "{{ else }}" + block
    return (
        "{{- if .Messages }}" + _go(layout.head) + "\n"
        + default
        + "{{- range $i, $m := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        '{{- if eq $m.Role "system" }}' + _go(p["system"]) + "{{ $m.Content }}" + s + "\n"
        '{{- else if eq $m.Role "user" }}' + _go(p["user"]) + "{{ $m.Content }}" + s + "\n"
        '{{- else if eq $m.Role "assistant" }}' + _go(p["assistant"]) + "{{ $m.Content }}{{ if not $last }}" + s + "{{ end }}\n"
        "{{- end }}\n"
        '{{- if and $last (ne $m.Role "assistant") }}' + _go(layout.generation) + "{{ end }}\n"
        "{{- end }}\n"
        # Ollama's generate endpoint (no .Messages): one system + one prompt.
        "{{- else }}" + _go(layout.head)
        + "{{ if .System }}" + _go(p["system"]) + "{{ .System }}" + s + legacy_default + "{{ end }}"
        + "{{ if .Prompt }}" + _go(p["user"]) + "{{ .Prompt }}" + s + "{{ end }}"
        + _go(layout.generation) + "{{ .Response }}{{ end }}"
    )


def modelfile(gguf_name: str, tokenizer, vocab: dict, extra_stops=()) -> str:
    """The Modelfile text for `gguf_name` (a file in the same directory). Generation stops at
    the end-of-turn token, eos, and `extra_stops` (the generation config's other eos tokens)."""
    stops = [t for t in dict.fromkeys([vocab.get("end_of_turn"), tokenizer.eos_token, *extra_stops]) if t]
    lines = ["# Ollama: ollama create NAME -f Modelfile   (then: ollama run NAME)", f"FROM ./{gguf_name}", ""]
    if getattr(tokenizer, "chat_template", None):
        layout, why = derive_layout(tokenizer, add_bos=vocab["add_bos"])
        if layout is None:
            lines += ["# No TEMPLATE: the chat template could not be translated faithfully to Ollama's Go template",
                      f"# ({why}). Ollama falls back to its own detection of the GGUF's chat template; check",
                      "# `ollama show NAME --template` against the training template before relying on it."]
        else:
            lines += ["# TEMPLATE: the training chat template, translated. It assumes each message is written as",
                      "# PREFIX(role) + content + SUFFIX (checked against the Jinja template on sample chats);",
                      "# tools, images and any per-message logic of the Jinja template are not carried over.",
                      f'TEMPLATE """{go_template(layout)}"""']
    else:
        lines += ["# TEMPLATE: the model was trained on plain prompt + completion text (no chat template):",
                  "# the system text and the prompt joined by a blank line, the answer right after.",
                  'TEMPLATE """{{ if .System }}{{ .System }}' + _go("\n\n") + '{{ end }}{{ .Prompt }}{{ .Response }}"""']
    lines.append("")
    lines += [f"PARAMETER stop {json.dumps(t, ensure_ascii=False)}" for t in stops]
    text = "\n".join(lines) + "\n"
    if text.count('"""') % 2:
        raise ValueError("the Modelfile template contains a triple quote; it cannot be written as a TEMPLATE block")
    return text
