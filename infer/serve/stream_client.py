"""The load test's HTTP client: one keep-alive HTTP/1.1 connection per simulated client, the
response parsed by httptools (the C parser the server itself runs on).

A load test measures the server, so its client should add as little as it can to the times it
reports. On the 2-core CPU machine, a streamed request through httpx spent ~0.9 ms in the client
before its first byte reached the server and ~0.15 ms after the first chunk arrived; this client
spends ~0.1 ms in all. It does what the load test needs and no more: POST a JSON body, read the
status, yield the body's lines as they arrive (chunked or not), and keep the connection for the
next request unless the server closes it.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools


class Response:
    """httptools' callbacks for one response: whether its headers and its whole body have
    arrived, the body bytes not yet consumed, and whether the connection stays open."""

    def __init__(self):
        self.body = bytearray()
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked here: once this callback returns, the parser resets for the next message
        # and answers False.
        self.keep_alive = self.parser.should_keep_alive()


class Connection:
    """One client's connection to `url` (http only); requests go one after another."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"the load test speaks plain http, not {parts.scheme!r} ({url})")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {self.host}:{self.port}\r\nContent-Type: application/json\r\n{extra}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None

    async def post_lines(self, path: str, payload: dict) -> AsyncIterator[tuple[int, bytes]]:
        """POST `payload` as JSON; yield (status, line) for each line of the body as it arrives
        (without its line ending; an error body without line breaks comes as one line)."""
        if self._writer is None:
            # asyncio sets TCP_NODELAY on TCP connections: small requests go out at once.
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self._writer.write(f"POST {path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        response = Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        done = False
        try:
            while not response.complete:
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection mid-response")
                parser.feed_data(data)
                status = parser.get_status_code() if response.headers_done else None
                while (end := response.body.find(b"\n")) >= 0:
                    line = bytes(response.body[:end]).rstrip(b"\r")
                    del response.body[: end + 1]
                    yield status, line
            if response.body:
                yield parser.get_status_code(), bytes(response.body)
            done = response.keep_alive
        finally:
            if not done:  # an error, a cancelled consumer or `Connection: close`: start afresh next time
                await self.close()
