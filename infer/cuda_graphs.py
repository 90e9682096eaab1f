"""Compiled decode steps (and short prefills) captured as CUDA graphs by hand, one graph per step shape.

Why not `torch.compile(mode="reduce-overhead")` (CUDA-graph trees)? It records the same
graphs, but every call still evaluates dynamo's guards and walks the tree's bookkeeping
in Python: measured on an H200 (1B model, batch 1) that was ~0.14 ms per token, 12% of
the step. The generator's steps take no tensor inputs (all state lives in device buffers
with fixed addresses) and their arguments are a few Python ints and bools, so a graph
keyed by those arguments is valid for every later call with the same arguments: replaying
it directly skips all of that host work.

The first call with new arguments runs the compiled step for real (it compiles there,
warms up on a side stream as CUDA graph capture requires) and then records the graph;
later calls replay it. Capture executes nothing, so no step is run twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


class CUDAGraphs:
    """`graphs(fn, *args)` runs fn(*args), from a recorded CUDA graph once one exists.

    fn must read and write only tensors whose addresses never change (module parameters,
    buffers marked with `torch._dynamo.mark_static_address`) and depend on `args` only
    through their values. A returned tensor lives in the graphs' shared memory pool and is
    overwritten by the next replay of any graph: read it before the next call.
    """

    def __init__(self, device: torch.device, *, share_pool_with: "CUDAGraphs | None" = None):
        self.device = device
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = None
        # Graphs of two sets that never run concurrently (decode steps, prefills) share one pool.
        self._pool_owner = share_pool_with if share_pool_with is not None else self

    def __len__(self) -> int:
        return len(self.graphs)

    def __call__(self, fn: Callable, *args):
        key = (fn, *args)
        entry = self.graphs.get(key)
        if entry is not None:
            graph, out = entry
            graph.replay()
            return out
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = fn(*args)  # the real step (compiles on first use)
            torch.cuda.current_stream().wait_stream(side)
            owner = self._pool_owner
            if owner.pool is None:
                owner.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # Intermediates of all graphs share one pool: steps never run concurrently, and
            # callers read a step's returned tensor before the next step (see class docstring).
            with torch.cuda.graph(graph, pool=owner.pool):
                out = fn(*args)
        self.graphs[key] = (graph, out)
        log.info("CUDA graph %d recorded in %.1f s (compile included) for %s%s", len(self.graphs),
                 time.perf_counter() - start, getattr(fn, "__name__", fn), _describe(args))
        return result


def _describe(args) -> tuple:
    # A 1-d tensor argument is a rows view (its length is the batch bucket); others show their shape.
    return tuple((f"rows[{a.shape[0]}]" if a.dim() == 1 else f"tensor{tuple(a.shape)}") if isinstance(a, torch.Tensor)
                 else a for a in args)


def compile_mode(compile, device) -> Any:
    """The Generator's `compile` argument as an inductor mode, a dynamo backend, or None (eager)."""
    if compile in (False, None, "none", "off"):
        return None
    if compile == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    return compile


def raise_dynamo_limits() -> None:
    # More graphs per function than dynamo's default of 8 recompiles: decoding makes one per
    # (batch bucket, sampling) and per prompt bucket; training's kept products (train.kept_products)
    # add a keep and a replay graph of each compiled decoder layer.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, 64) < 64:
            setattr(dynamo_config, name, 64)
