"""The HTTP face of the server: OpenAI-compatible routes, errors, auth, limits, logs.

Every error leaves as OpenAI's error body (`{"error": {"message", "type", "param",
"code"}}`) so that OpenAI's clients raise their usual exceptions with our message in them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from infer.prompts import chat_ids, text_ids

from infer.engine import StreamEvent
from infer.sampling import SamplingParams

from .engine import EngineStoppedError, QueueFullError
from .metrics import CONTENT_TYPE
from .middleware import BodyLimits, RequestLog
from .schemas import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                      error_body)

log = logging.getLogger("infer.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def create_app(state) -> "_Front":
    """`state` is the `ServerState` of infer.serve: engine, tokenizer, limits, metrics."""
    app = FastAPI(title="tunewright", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=state.lifespan)
    app.state.server = state

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.get("/health")
    async def health():
        if state.ready and not state.draining and not state.engine_failed:
            return {"status": "ok"}
        status = "failed" if state.engine_failed else "draining" if state.draining else "loading"
        return JSONResponse({"status": status}, 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def list_models(request: Request):
        await _admit(request)
        return {"object": "list", "data": [_model_card(state)]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        await _admit(request)
        _check_model(state, model_id)
        return _model_card(state)

    # vLLM's token routes, beside /v1 as vLLM has them: count a prompt's tokens as generation
    # will (the same tokenization and chat template), or read ids back as text.
    @app.post("/tokenize")
    async def tokenize(request: Request):
        await _admit(request)
        body = await _body(request, TokenizeRequest)
        _check_model(state, body.model)
        if body.messages is not None:
            ids = _chat_ids(state, body.messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = _completion_ids(state, body.prompt)
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        await _admit(request)
        body = await _body(request, DetokenizeRequest)
        _check_model(state, body.model)
        return {"prompt": state.tokenizer.decode(_known_ids(state, body.tokens, "tokens"))}

    # The generation routes are plain ASGI endpoints that validate their bodies with the
    # schemas' pydantic models themselves, and a POST to either never enters FastAPI: `_Front`
    # hands it to the server's own middleware and the endpoint directly. As FastAPI routes,
    # dependency solving and body handling took ~160 Python calls per request (~0.3 ms on the
    # CPU machine), and FastAPI's stack (its error, telemetry and body-limit middleware, the
    # exception middleware, the router) a few more layers, each also wrapping every send: all
    # of it before the prompt reaches the engine, on the time to first token, or between a
    # token and its client. Their errors become the same bodies through `_error_response`.
    # FastAPI keeps the routes for the other methods (405).
    async def completions(request: Request):
        await _admit(request)
        body = await _body(request, CompletionRequest)
        _check_model(state, body.model)
        prompts = [_completion_ids(state, p) for p in body.prompts()]
        return await _generate(state, request, body, prompts, chat=False)

    async def chat_completions(request: Request):
        await _admit(request)
        body = await _body(request, ChatCompletionRequest)
        _check_model(state, body.model)
        return await _generate(state, request, body, [_chat_ids(state, body.messages)], chat=True)

    generation = {"/v1/completions": _Endpoint(completions), "/v1/chat/completions": _Endpoint(chat_completions)}
    app.include_router(v1)
    app.router.routes[0:0] = [Route(path, endpoint, methods=["POST"]) for path, endpoint in generation.items()]
    limits = dict(max_bytes=state.args.max_body_bytes, timeout=state.args.body_timeout)
    app.add_middleware(BodyLimits, **limits)
    app.add_middleware(RequestLog, state=state)
    return _Front(app, {path: RequestLog(BodyLimits(endpoint, **limits), state=state)
                        for path, endpoint in generation.items()})


class _Front:
    """The ASGI app the server runs: a POST to a generation route goes to `direct[path]`
    (the server's middleware around its endpoint), everything else, the lifespan included,
    to the FastAPI `app`."""

    def __init__(self, app: FastAPI, direct: dict):
        self.app, self.direct = app, direct

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and (route := self.direct.get(scope["path"])):
            scope["app"] = self.app  # what request.app reads, as Starlette sets it
            return await route(scope, receive, send)
        return await self.app(scope, receive, send)


class _Endpoint:
    """An ASGI app of `handler(request) -> response`. An instance, not a function: Starlette's
    Route wraps functions in its request/response layer and takes anything else as ASGI.
    An exception raised before the response starts becomes its error response here, the one
    the app's exception handlers give."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, scope, receive, send):
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except Exception as exc:  # noqa: BLE001 - each kind gets its status and body below
            response = await _error_response(request, exc)
        await response(scope, receive, send)


# ---- errors ---------------------------------------------------------------------------
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(error_body(exc.message, exc.type, param=exc.param, code=exc.code), exc.status)


async def _invalid(request: Request, exc: RequestValidationError):
    message, param = _describe_validation(exc.errors())
    return JSONResponse(error_body(message, param=param), 400)


async def _http_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception):
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


async def _error_response(request: Request, exc: Exception):
    """The response the app's exception handlers give for `exc`."""
    for kind, handler in ((ApiError, _api_error), (RequestValidationError, _invalid),
                          (StarletteHTTPException, _http_error)):
        if isinstance(exc, kind):
            return await handler(request, exc)
    return await _unexpected(request, exc)


# ---- admission ------------------------------------------------------------------------
async def _admit(request: Request) -> None:
    """Every /v1 route first: the API key, then whether the engine takes requests."""
    await _require_api_key(request)
    await _require_ready(request)


async def _body(request: Request, model: type[BaseModel]):
    """The JSON body validated by `model`; a body that is not JSON or does not fit gets a 400,
    as FastAPI's own body handling would answer."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _require_api_key(request: Request) -> None:
    key = request.app.state.server.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _require_ready(request: Request) -> None:
    state = request.app.state.server
    if state.engine_failed:
        raise ApiError(503, f"{state.engine_failed}; the server is stopping", "server_error", code="engine_failed")
    if state.draining:
        raise ApiError(503, "the server is shutting down and takes no new requests", "server_error",
                       code="shutting_down")
    if not state.ready:
        raise ApiError(503, "the model is still loading; retry when GET /health answers 200",
                       "server_error", code="model_loading")


def _model_card(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "tunewright", "max_model_len": state.max_model_len}


def _check_model(state, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


# ---- prompts --------------------------------------------------------------------------
def _completion_ids(state, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return text_ids(state.tokenizer, prompt)
    return _known_ids(state, prompt, "prompt")


def _known_ids(state, ids: list[int], field: str) -> list[int]:
    vocab = len(state.tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"{field}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                       param=field)
    return list(ids)


def _chat_ids(state, messages: list[ChatMessage], *, add_generation_prompt: bool = True) -> list[int]:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model has no chat template; send a plain prompt instead (/v1/completions)",
                       param="messages")
    # Templates know system/user/assistant; OpenAI's newer "developer" role is a system prompt.
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return chat_ids(tok, turns, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises for conversations its template refuses
        raise ApiError(400, f"messages: the chat template refused them ({exc})", param="messages") from None


def _budget(state, prompt_len: int, requested: int | None, chat: bool) -> int:
    """max_tokens for one prompt: what was asked if it fits the context, else a 400."""
    limit = state.max_model_len
    if prompt_len == 0:
        raise ApiError(400, "prompt: it is empty after tokenization", param="prompt")
    if prompt_len >= limit:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens, but the prompt "
                       f"has {prompt_len}; shorten it", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    room = limit - prompt_len
    if requested is None:
        default = state.args.default_max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        return min(room, default)
    if requested > room:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                       f"{prompt_len} and max_tokens asks for {requested} more (at most {room} fit)",
                       param="max_tokens", code="context_length_exceeded")
    return requested


# ---- generation -----------------------------------------------------------------------
class _Job:
    """The sequences of one HTTP request and the queue their events arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.thread = threading.get_ident()  # the event loop's
        self.events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.seqs: list = []

    def emit(self, event: StreamEvent) -> None:
        """Called on the event loop (events read from the engine process) or on the engine's thread."""
        if threading.get_ident() == self.thread:
            self.events.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody to tell
            pass


async def _generate(state, request: Request, body, prompts: list[list[int]], chat: bool):
    requested = body.requested_max_tokens
    budgets = [_budget(state, len(ids), requested, chat) for ids in prompts]
    if len(prompts) * body.n > state.engine.max_queue:  # could never be queued: a 429 would invite useless retries
        raise ApiError(400, f"the request asks for {len(prompts) * body.n} sequences (prompts x n); this server "
                       f"queues at most {state.engine.max_queue}", param="n")
    arrival = time.perf_counter()
    job = _Job(asyncio.get_running_loop())
    for p, (ids, max_tokens) in enumerate(zip(prompts, budgets)):
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j  # n choices must differ
            try:
                params = SamplingParams(max_new_tokens=max_tokens, seed=seed, logprobs=body.alternatives,
                                        **body.sampling_kwargs())
                job.seqs.append(state.engine.new_sequence(ids, params, job.emit, index=p * body.n + j, arrival=arrival))
            except ValueError as exc:
                raise ApiError(400, str(exc), param=_param_of(str(exc), chat)) from None
    try:
        state.engine.submit(job.seqs)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded") from None
    except EngineStoppedError as exc:
        raise ApiError(503, str(exc), "server_error", code="shutting_down") from None

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    info = request.state
    # A prompt counts once however many choices (n) it has, as OpenAI and vLLM count it.
    info.request_id, info.prompt_tokens, info.completion_tokens = rid, sum(len(s.prompt) for s in job.seqs[::body.n]), 0
    if body.stream:
        stream = _sse(state, job, body, rid, chat, info)
        return _CancelOnClose(stream, lambda: state.engine.cancel(job.seqs), media_type="text/event-stream")
    return await _collect(state, request, job, body, rid, chat, info)


def _param_of(message: str, chat: bool) -> str:
    field = message.split(":", 1)[0].split()[0] if ":" in message else ""
    if field in ("logprobs", "seed", "temperature", "top_p", "top_k", "repetition_penalty"):
        return field
    return "messages" if chat else "prompt"


async def _collect(state, request: Request, job: _Job, body, rid: str, chat: bool, info):
    total = len(job.seqs)
    texts, reasons, tokens = [""] * total, [None] * total, [0] * total
    logprobs: list[list] = [[] for _ in range(total)]
    remaining = total
    checked = time.monotonic()
    # One pending get at a time, awaited through asyncio.wait: asyncio.wait_for (before
    # Python 3.12) can swallow a cancellation that lands as its inner get completes, and a
    # drain's cancellation must always end the request.
    getter = None
    try:
        while remaining:
            getter = getter or asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait((getter,), timeout=0.5)
            event, getter = (getter.result(), None) if done else (None, getter)
            # Asked at least twice a second, also while tokens keep arriving: a client that
            # hung up frees its rows within a second.
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the log records the hang-up
            if event is None:
                continue
            if event.error:
                raise ApiError(500, f"generation failed: {event.error}", "server_error")
            texts[event.index] += event.text
            tokens[event.index] = event.completion_tokens
            logprobs[event.index] += event.logprobs or []
            if event.finished:
                reasons[event.index] = event.finish_reason
                remaining -= 1
    finally:
        if getter is not None:
            getter.cancel()
        state.engine.cancel([s for s in job.seqs if s.finish_reason is None])
        info.completion_tokens = sum(tokens)
    usage = _usage(info)
    wants = body.alternatives is not None
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": _chat_logprobs(state, logprobs[i]) if wants else None,
                    "finish_reason": reasons[i]} for i in range(total)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": state.model_name, "choices": choices, "usage": usage})
    choices = [{"index": i, "text": texts[i], "logprobs": _completion_logprobs(state, logprobs[i]) if wants else None,
                "finish_reason": reasons[i]} for i in range(total)]
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": state.model_name, "choices": choices, "usage": usage})


async def _sse(state, job: _Job, body, rid: str, chat: bool, info):
    created, total = int(time.time()), len(job.seqs)
    tokens = [0] * total
    offsets = [0] * total  # text offsets of completions' logprobs
    remaining = total
    usage_field = {"usage": None} if body.include_usage else {}
    wants = body.alternatives is not None

    def chunk(choices: list[dict], **extra) -> str:
        obj = "chat.completion.chunk" if chat else "text_completion"
        payload = {"id": rid, "object": obj, "created": created, "model": state.model_name,
                   "choices": choices, **usage_field, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish: str | None, lps=None, role: bool = False) -> dict:
        if not chat:
            lp = _completion_logprobs(state, lps, offsets[index]) if wants and lps else None
            if lp:
                offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        lp = _chat_logprobs(state, lps) if wants and lps else None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    if chat:  # OpenAI opens each choice with the assistant role and empty content
        for i in range(total):
            yield chunk([choice(i, "", None, role=True)])
    while remaining:
        event = await job.events.get()
        if event.error:
            yield f"data: {json.dumps(error_body(f'generation failed: {event.error}', 'server_error'))}\n\n"
            break
        tokens[event.index] = event.completion_tokens
        info.completion_tokens = sum(tokens)
        # A chunk for every event that carries tokens, also when they render as no text yet
        # (half a character, a special token): a streaming client sees each token arrive, as
        # vLLM streams them.
        if event.text or event.logprobs or event.token_ids:
            yield chunk([choice(event.index, event.text, None, event.logprobs)])
        if event.finished:
            remaining -= 1
            yield chunk([choice(event.index, None if chat else "", event.finish_reason)])
    if body.include_usage and not remaining:
        yield chunk([], usage=_usage(info))
    yield "data: [DONE]\n\n"


def _token_text(state, token_id: int) -> str:
    return state.token_text(token_id)


def _chat_logprobs(state, entries: list) -> dict:
    """OpenAI's chat form: content = [{token, logprob, bytes, top_logprobs}]."""
    def item(token_id, logprob):
        text = _token_text(state, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(tok, lp), "top_logprobs": [item(t, l) for t, l in top]} for tok, lp, top in entries]}


def _completion_logprobs(state, entries: list, offset: int = 0) -> dict:
    """The completions (legacy) form: parallel lists of tokens, their log-probabilities,
    the top alternatives as {token: logprob} and each token's offset in the text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, top in entries:
        text = _token_text(state, tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({_token_text(state, t): l for t, l in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _usage(info) -> dict:
    return {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
            "total_tokens": info.prompt_tokens + info.completion_tokens}


class _CancelOnClose(StreamingResponse):
    """A streamed response that frees its batch slots however the stream ends: finished,
    client gone (the send fails) or server cancelled."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _describe_validation(errors) -> tuple[str, str | None]:
    """One message for all problems, and the first problem's field as OpenAI's `param`."""
    parts, param = [], None
    for err in errors[:8]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        field = loc.split(".")[0] if loc else (msg.split(":", 1)[0] if ":" in msg and " " not in msg.split(":", 1)[0] else None)
        param = param or field
        if not field:  # about the body as a whole, e.g. a JSON list instead of an object
            msg = f"request body: {msg}"
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}:") else msg)
    return "; ".join(parts) or "invalid request", param
