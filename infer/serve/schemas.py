"""Request bodies of the OpenAI-compatible routes, and OpenAI's error body.

Unknown fields are refused (as OpenAI does: "Unrecognized request argument"), so a typo
such as `max_token` is an error instead of a silently ignored setting. Fields that
OpenAI defines but this server cannot honour are accepted only at values that change
nothing, and otherwise answered with a message naming the field. `top_k`,
`repetition_penalty` and `ignore_eos` are accepted as vLLM accepts them (clients send them in `extra_body`).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)


def error_body(message: str, type_: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None  # optional, as in vLLM: the one model this server serves
    max_tokens: StrictInt | None = Field(None, ge=1)
    # OpenAI's clients may send null for any of these; null means the default.
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None  # any integer: the engine uses it modulo 2**64
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted and ignored: it only labels the caller

    # Defined by OpenAI, honoured here only at their neutral value.
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions.
    top_k: StrictInt | None = Field(None, ge=-1)
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0)
    ignore_eos: StrictBool = False

    @model_validator(mode="after")
    def _check_common(self):
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.n = 1 if self.n is None else self.n
        self.stream = bool(self.stream)
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise ValueError(f"{name}: not supported by this server; leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=max(0, self.top_k or 0),
                    repetition_penalty=self.repetition_penalty or 1.0, stop=self.stop_strings(),
                    ignore_eos=self.ignore_eos)


PromptType = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_Common):
    prompt: PromptType
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ValueError("echo: not supported by this server")
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.best_of not in (None, self.n or 1):
            raise ValueError("best_of: not supported by this server (set it equal to n or leave it out)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be an empty list")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def alternatives(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: tool calling is not supported by this server")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def alternatives(self) -> int | None:
        """Log-probability alternatives per token, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: the token ids a completions request with this `prompt`, or a chat request
    with these `messages`, would prefill."""
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: StrictBool = True  # messages only; a chat request always adds it

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (text) or messages (a conversation), not both or neither")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: the text of token ids."""
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[StrictInt]
