"""`python -m infer serve RUN`: an OpenAI-compatible HTTP server for a tuned model.

The process binds its socket first and answers `GET /health` with 503 while the model
loads in a background thread, so an orchestrator can tell "starting" from "dead".
SIGTERM (or Ctrl-C) turns `/health` and new requests to 503, lets in-flight requests
finish (at most --drain-timeout seconds), then stops listening, stops the batching engine
and exits 0. Slow or idle clients are bounded in infer.serve.connections.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from infer.errors import ArgumentParser, UserError
from infer.loading import add_load_options, load_kwargs

log = logging.getLogger("infer.serve")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m infer serve",
        description="Serve a run directory (or checkpoint directory, or builtin model name) "
        "over an OpenAI-compatible HTTP API with continuous batching.",
    )
    p.add_argument("run", help="runs/<name>, a checkpoint directory, or a builtin model name")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: reachable from this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port; 0 picks a free one (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("TUNEWRIGHT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TUNEWRIGHT_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the run's name)")
    p.add_argument("--max-batch-size", type=int,
                   help="sequences decoded together: rows of the KV cache (default 64 on a GPU, 8 on the CPU)")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens prefilled per scheduler step, so a long prompt never stalls running "
                   "streams for long (default 2048)")
    p.add_argument("--sync-interval", type=int, default=8,
                   help="decode steps queued per scheduler step: fewer let joining requests in sooner and "
                   "show a finished one sooner, more cost the host less per token (default 8)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences allowed to wait for a slot; beyond it requests get 429 (default 256)")
    p.add_argument("--max-model-len", type=int,
                   help="cap on prompt + completion tokens: slots per KV-cache row (default: the model's context "
                   "length, at most 4096 on a GPU and 2048 on the CPU)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="chat completions without max_tokens stop here at most (default 1024)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds SIGTERM waits for in-flight requests before closing them (default 300)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request may take to send its body before it gets 408 (default 30)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections served at once; requests beyond get 503, and connections far "
                   "beyond are closed when accepted (default 1000)")
    p.add_argument("--warm-up", choices=("all", "greedy", "none"), default="all",
                   help="decode graphs compiled and recorded before the port answers: every batch bucket for "
                   "greedy and sampled requests (all), greedy only (a first sampled request then compiles "
                   "while others wait), or none (default all)")
    p.add_argument("--engine", choices=("process", "thread"), default="process",
                   help="where the engine runs: a process of its own, so that HTTP work and the scheduler do "
                   "not share one GIL (default), or a thread of the server process")
    p.add_argument("--idle-spin", type=float, default=None, metavar="MS",
                   help="milliseconds the engine process keeps checking for a new request after it runs out "
                   "of work, and the server's event loop keeps polling after the engine's last message or "
                   "the last request it was sent, before they sleep: a request or a token within that time "
                   "is handled by a CPU that has not gone idle, at the cost of up to two busy cores while it "
                   "lasts (default: 50 with a GPU, where the host's cores are not the model's compute; 0, "
                   "sleep at once, on the CPU)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_load_options(p)
    return p


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535; 0 picks a free one)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_batch_size", "sync_interval", "max_queue", "default_max_tokens", "max_body_bytes", "prefill_chunk",
                 "max_model_len", "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("drain_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.idle_spin is not None and not 0 <= args.idle_spin < float("inf"):
        parser.error("--idle-spin must be 0 or a positive number of milliseconds")
    if args.idle_spin and args.engine != "process":
        parser.error("--idle-spin applies to the engine process; drop it or use --engine process")
    return serve(args)


def load_for_serving(args):
    """(model, tokenizer) through infer.load, the loader every infer command shares
    (run directories, builtin names, bitsandbytes quantization, dtype and device)."""
    from infer.loading import load

    return load(args.run, **load_kwargs(args))


class ServerState:
    """Everything the routes share: settings, the engine once loaded, metrics."""

    def __init__(self, args, loader=load_for_serving):
        from .metrics import ServerMetrics

        self.args = args
        self.loader = loader
        self.api_key = args.api_key or None
        self.model_name = args.served_model_name or _default_model_name(args.run)
        self.created = int(time.time())
        self.metrics = ServerMetrics()
        self.engine = None
        self.tokenizer = None
        self.max_model_len = 0
        self.ready = False
        self.draining = False
        self.in_flight = 0  # requests other than /health and /metrics being answered
        self.load_error: BaseException | None = None
        self.engine_client = None  # the engine process, once started
        self.engine_failed: str | None = None  # why the engine process died, if it did
        self.server = None  # the uvicorn.Server, told to exit if loading fails
        self.loop = None  # the server's event loop, once it runs

    def load(self) -> None:
        import functools

        from .engine import freeze_startup_objects, warm_up
        from .engine_process import EngineLoadError

        try:
            started = time.perf_counter()
            serving, tokenizer = self._start_engine()
            if self.args.warm_up != "none":
                warm_up(serving, tokenizer, with_sampling=self.args.warm_up == "all",
                        prefill_chunk=self.args.prefill_chunk)
            serving.warmed_up()
            freeze_startup_objects()
            # Metrics start after the warm-up so that they count user requests only.
            serving.metrics = self.metrics
            self.metrics.bind_engine(serving)
            self.max_model_len = serving.max_model_len
            self.token_text = functools.lru_cache(maxsize=65536)(
                lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False))
            self.tokenizer, self.engine = tokenizer, serving
            self.ready = True
            log.info("model %s ready on %s in %.1fs (context %d tokens, batch %d, KV cache %.2f GiB, queue %d, "
                     "engine on a %s%s, %s event loop)", self.model_name, serving.device_name,
                     time.perf_counter() - started, serving.max_model_len, serving.max_batch_size,
                     serving.kv_cache_bytes / 2**30, self.args.max_queue, self.args.engine,
                     self._idle_spin_text(serving), type(self.loop).__module__.split(".")[0])
        except BaseException as exc:  # noqa: BLE001 - any failure must end the server, not hang it
            message = str(exc) if isinstance(exc, EngineLoadError) else f"{type(exc).__name__}: {exc}"
            log.error("could not load %s: %s", self.args.run, message)
            self.load_error = exc
            if self.engine_client is not None:
                self.engine_client.stop(5)
            if self.server is not None:
                self.server.should_exit = True

    def _idle_spin_text(self, serving) -> str:
        if self.args.engine != "process":
            return ""
        return f", idle spin {serving.idle_spin_s * 1000:g} ms" if serving.idle_spin_s else ", no idle spin"

    def _start_engine(self):
        """(engine, tokenizer): the engine in a process of its own, or on a thread of this one."""
        from .engine import ServingEngine, build_engine
        from .engine_process import EngineClient

        if self.args.engine == "process":
            self.engine_client = EngineClient(self.loader, self.args, max_queue=self.args.max_queue,
                                              log_level=self.args.log_level, on_exit=self._engine_exited,
                                              loop=self.loop)
            return self.engine_client, self.engine_client.start()
        model, tokenizer = self.loader(self.args)
        serving = ServingEngine(build_engine(model, tokenizer, self.args), max_queue=self.args.max_queue)
        serving.start()
        return serving, tokenizer

    def _engine_exited(self, reason: str) -> None:
        """The engine process died: /health and new requests answer 503 and the server exits 1."""
        self.engine_failed = reason
        if self.server is not None:
            self.server.should_exit = True

    @asynccontextmanager
    async def lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self.load, name="tunewright-load", daemon=True).start()
        yield
        # uvicorn has already waited for open connections; this drains whatever is left.
        if self.engine is not None:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(self.engine.stop, self.args.drain_timeout)


def _default_model_name(run: str) -> str:
    path = Path(run).expanduser()
    if path.exists():
        path = path.resolve()
        return path.parent.name if path.name == "model" else path.name
    return run


_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there: stop it, or pass another --port (--port 0 takes a free one)",
    errno.EACCES: "ports below 1024 need privileges: pass a --port above 1023",
    errno.EADDRNOTAVAIL: "--host is not an address of this machine (127.0.0.1 or 0.0.0.0 are)",
}


def _bind(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts so that `--port 0` can report the port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio's transports set TCP_NODELAY only on sockets
    # that name TCP as their protocol (accepted ones inherit it). Without it, the event loop
    # that runs when uvloop is absent leaves Nagle's algorithm on, and a streamed chunk written
    # right after the response headers waits for their delayed ACK (~40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = _BIND_HINTS.get(exc.errno)
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}" + (f"; {hint}" if hint else "")) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(args) -> int:
    import signal

    import uvicorn

    from .app import create_app
    from .connections import connection_limit, guarded_protocol, limit_repeated_log_lines

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState(args)
    app = create_app(state)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # /health turns 503 so a load balancer stops sending work
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            # uvicorn stops listening first; then /health would refuse connections during the
            # drain. Keep answering (503 on /health and on new requests) until the requests in
            # flight are done, then let uvicorn close what is left within the remaining time.
            deadline = time.monotonic() + args.drain_timeout
            while state.in_flight and not self.force_exit and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            self.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())
            await super().shutdown(sockets)

    max_connections = connection_limit(args.max_connections)
    # proxy_headers off: uvicorn's proxy-header middleware rewrites the client address from
    # X-Forwarded-For, which nothing here reads (no access log), on every request.
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on", proxy_headers=False,
                            timeout_graceful_shutdown=args.drain_timeout, limit_concurrency=max_connections,
                            http=guarded_protocol(args.header_timeout, max_connections))
    limit_repeated_log_lines()  # after uvicorn.Config, which installs uvicorn's handlers
    server = state.server = _Server(config)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"tunewright serve: listening on http://{host}:{port} (model {state.model_name})", flush=True)
    # uvicorn re-raises the signal that stopped it once shutdown is done; with Python's
    # default handlers that turns a clean drain into "killed by SIGTERM". No-op handlers
    # here make that re-raise harmless, so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return 1 if state.load_error is not None or state.engine_failed else 0
