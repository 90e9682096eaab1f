"""The OpenAI-compatible HTTP server (`python -m infer serve RUN`).

    server.py          CLI options, server state, start-up, drain and exit
    app.py             routes, OpenAI error bodies, auth
    middleware.py      body limits (413 / 408) and the request log
    schemas.py         request models and their validation
    engine_process.py  the engine in a process of its own (the default) and its client
    engine.py          the engine on a thread of the server process; what both share
    connections.py     header timeout and connection bound on uvicorn's protocol
    metrics.py         Prometheus metrics
    loadtest.py        `python -m infer.serve.loadtest`: the server under N streaming clients
    stream_client.py   the load test's HTTP/1.1 client (one keep-alive connection per client)
"""

from .server import ServerState, build_parser, load_for_serving, main, serve

__all__ = ["ServerState", "build_parser", "load_for_serving", "main", "serve"]
