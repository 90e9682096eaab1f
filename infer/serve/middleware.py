"""The server's ASGI middleware: every request's body read whole and bounded before any
route sees it, and one log line and one metrics sample per request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from .schemas import error_body

log = logging.getLogger("infer.serve")


class BodyLimits:
    """Read the whole request body before any route (auth included) sees it: over `max_bytes`
    it is refused with 413, not complete within `timeout` seconds with 408."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, 413, f"request body is larger than {self.max_bytes} bytes")
        # Chunked bodies carry no length: read (at most the limit) before the app sees them.
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await _within(receive(), deadline)
            except asyncio.TimeoutError:
                log.info("closed a connection whose request body was not complete within %g s", self.timeout)
                return await self._refuse(send, 408, f"the request body was not complete within {self.timeout:g} s")
            if message["type"] != "http.request":
                return  # client went away mid-body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, 413, f"request body is larger than {self.max_bytes} bytes")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _refuse(self, send, status: int, message: str):
        body = json.dumps(error_body(message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RequestLog:
    """One log line and one metrics sample per request: id, route, status, tokens, latency.
    Prompt text is never logged."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, state):
        self.app, self.state, self.metrics = app, state, state.metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        counted = scope["path"] not in ("/health", "/metrics")  # a drain waits for these
        self.state.in_flight += counted
        # Generation routes replace this with the id they answer with (cmpl-…, chatcmpl-…).
        scope.setdefault("state", {})["request_id"] = "req-" + uuid.uuid4().hex[:16]
        seen = {"status": None, "complete": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                seen["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            # Only the end of a drain cancels requests: one line instead of uvicorn's traceback.
            info = scope["state"]
            log.warning("drain timeout: cut off request id=%s %s %s after %s completion tokens",
                        info.get("request_id", "-"), scope["method"], scope["path"], info.get("completion_tokens", 0))
            raise
        finally:
            self.state.in_flight -= counted
            # 499: the client hung up before the answer was complete (nginx's convention).
            status = seen["status"] or 500
            if seen["status"] is not None and not seen["complete"]:
                status = 499
            path = scope["path"]
            route = next((r for r in self.ROUTES if path == r or path.startswith(r + "/")), "other")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            info = scope["state"]
            level = logging.DEBUG if route in ("/health", "/metrics") else logging.INFO
            log.log(level, "request id=%s %s %s status=%d prompt_tokens=%s completion_tokens=%s latency_ms=%.1f",
                    info.get("request_id", "-"), scope["method"], path, status,
                    info.get("prompt_tokens", 0), info.get("completion_tokens", 0), elapsed * 1000)


async def _within(awaitable, deadline: float):
    """`await awaitable`, raising asyncio.TimeoutError at `deadline` (time.monotonic()).
    Before Python 3.12 asyncio.wait_for ran the awaitable as a task of its own, one more
    trip through the event loop before every request body; asyncio.timeout (3.11) does not."""
    delay = max(0.0, deadline - time.monotonic())
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(awaitable, delay)
    async with asyncio.timeout(delay):
        return await awaitable
