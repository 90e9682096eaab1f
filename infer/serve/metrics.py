"""Prometheus metrics of the server, in a registry of its own (no global state to leak
between servers built in one process, e.g. in tests)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # RSS, CPU time, open files: the numbers a memory-growth check reads.
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "tunewright_requests", "HTTP requests answered, by route and status code",
            ["route", "status"], registry=r,
        )
        self.latency = Histogram(
            "tunewright_request_latency_seconds", "Time from request arrival to the last byte sent",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "tunewright_time_to_first_token_seconds",
            "Time from request arrival to its first generated token", buckets=_TTFT_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("tunewright_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("tunewright_generated_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "tunewright_batch_size", "Sequences in each batched decode step",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("tunewright_queue_depth", "Sequences waiting for a batch slot", registry=r)
        self.running = Gauge("tunewright_running_sequences", "Sequences in the running batch", registry=r)
        self.gpu_memory = Gauge(
            "tunewright_gpu_memory_allocated_bytes", "Bytes held by live tensors on the GPU (0 on CPU)",
            registry=r,
        )
        self.gpu_memory_reserved = Gauge(
            "tunewright_gpu_memory_reserved_bytes", "Bytes the CUDA caching allocator holds (0 on CPU)",
            registry=r,
        )

    def bind_engine(self, engine) -> None:
        """Read queue depth and batch occupancy from the engine at scrape time."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.running)

    def bind_device(self, device) -> None:
        import torch

        if getattr(device, "type", None) == "cuda":
            self.gpu_memory.set_function(lambda: torch.cuda.memory_allocated(device))
            self.gpu_memory_reserved.set_function(lambda: torch.cuda.memory_reserved(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
