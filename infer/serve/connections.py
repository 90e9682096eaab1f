"""What a connection may hold, and for how long: request timeouts, a bound on open
connections, and log lines that stay readable when one error repeats thousands of times.

uvicorn bounds concurrency (`limit_concurrency`: requests beyond it get its own 503) and idle
keep-alive connections (`timeout_keep_alive`), but it waits forever for a request's headers.
A client that opens a connection and never finishes its headers therefore holds a file
descriptor before any route, auth included, sees it; enough of them exhaust the process's
descriptors and `/health` stops answering. `guarded_protocol` steps around that in uvicorn's
own (httptools) HTTP protocol: it closes a connection whose headers are not complete within the header
timeout, and closes at once a connection accepted beyond the bound, so descriptors stay
bounded. Slow bodies are timed out where the body is read (`BodyLimits` in middleware.py), so the
client gets a 408.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("infer.serve")

# Connections accepted beyond --max-connections still get uvicorn's 503 up to this many more;
# past that they are closed unread (a 503 needs the request, which costs a descriptor to wait for).
OVERFLOW_ANSWERED = 64
DESCRIPTORS_KEPT = 256  # for model files, logs, the engine: never handed to connections


def connection_limit(requested: int) -> int:
    """`requested`, lowered to what the descriptor limit allows (raising the soft limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = requested + OVERFLOW_ANSWERED + DESCRIPTORS_KEPT
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return requested
    allowed = max(1, soft - OVERFLOW_ANSWERED - DESCRIPTORS_KEPT)
    if allowed < requested:
        log.warning("--max-connections %d lowered to %d: the process may open %d files", requested, allowed, soft)
    return min(requested, allowed)


def guarded_protocol(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol (C parser: less Python time per request than h11) with a
    header timeout and a hard bound on open connections."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        # The header timer runs while a request's headers are awaited: from the connection's
        # start and from each request's first byte, until its headers are complete.
        def connection_made(self, transport) -> None:
            self._header_timer = None
            super().connection_made(transport)
            if len(self.connections) > max_connections + OVERFLOW_ANSWERED:
                log.warning("closed a new connection: %d are open, the limit is %d (--max-connections)",
                            len(self.connections) - 1, max_connections)
                transport.close()
                return
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closed a connection that sent no complete request headers within %g s", header_timeout)
                self.transport.close()

    return GuardedHttpToolsProtocol


class RepeatLimiter(logging.Filter):
    """Let a log line through once per `interval` seconds when it repeats word for word (same
    logger, level, text and exception type), then say how many were held back. Without it a
    failing accept() ("Too many open files") logs a traceback per attempt."""

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple, list] = {}  # key -> [last time shown, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.name, record.levelno, record.getMessage(), type(exc).__name__ if exc else "",
               getattr(exc, "errno", None))
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        held = seen[1] if seen else 0
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = [now, 0]
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.interval:g} s, not shown)"
        return True


def _not_a_cancelled_request(record: logging.LogRecord) -> bool:
    # A drain that times out cancels the requests left; RequestLog says which, in one line.
    # uvicorn would add a traceback of some 60 lines per request.
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def limit_repeated_log_lines(interval: float = 10.0) -> RepeatLimiter:
    """Install one `RepeatLimiter` on every handler of the root and uvicorn loggers."""
    limiter = RepeatLimiter(interval)
    for name in (None, "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(limiter)
    logging.getLogger("uvicorn.error").addFilter(_not_a_cancelled_request)
    return limiter
