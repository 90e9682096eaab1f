"""Prometheus metrics of the server, in a registry of its own (no global state to leak
between servers built in one process, e.g. in tests). Names say what is counted and in
which unit; the latency histograms are the ones vLLM users chart (time to first token,
inter-token latency, end-to-end latency, queue time)."""

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
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
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
            "Per sequence: time from request arrival to its first generated token", buckets=_TTFT_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "tunewright_inter_token_latency_seconds",
            "Per generated token after the first: time since the sequence's previous tokens reached the server "
            "thread, divided by the tokens that arrived", buckets=_ITL_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "tunewright_e2e_sequence_latency_seconds", "Per sequence: time from request arrival to its last token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "tunewright_queue_time_seconds", "Per sequence: time from request arrival to a KV-cache row",
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("tunewright_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("tunewright_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("tunewright_sequences_finished", "Sequences finished, by finish reason",
                                ["reason"], registry=r)
        self.batch_size = Histogram(
            "tunewright_decode_batch_rows", "Sequences decoded together, per group of decode steps",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.waiting = Gauge("tunewright_sequences_waiting", "Sequences waiting for a KV-cache row", registry=r)
        self.running = Gauge("tunewright_sequences_running", "Sequences holding a KV-cache row", registry=r)
        self.kv_rows = Gauge("tunewright_kv_cache_rows", "KV-cache rows (the most sequences decoded together)",
                             registry=r)
        self.kv_usage = Gauge("tunewright_kv_cache_usage_ratio", "Fraction of KV-cache rows in use", registry=r)
        self.graphs = Gauge("tunewright_decode_cuda_graphs", "CUDA graphs recorded for the decode step", registry=r)
        self.prefill_graphs = Gauge("tunewright_prefill_cuda_graphs",
                                    "CUDA graphs recorded for short prefills (per row count and width bucket)",
                                    registry=r)
        self.compiles = Gauge("tunewright_compiled_graphs",
                              "Graphs torch.compile has compiled in this process (dynamo's unique graphs)", registry=r)
        self.gpu_memory = Gauge(
            "tunewright_gpu_memory_allocated_bytes", "Bytes held by live tensors on the GPU (0 on CPU)",
            registry=r,
        )
        self.gpu_memory_reserved = Gauge(
            "tunewright_gpu_memory_reserved_bytes", "Bytes the CUDA caching allocator holds (0 on CPU)",
            registry=r,
        )
        self.engine_rss = Gauge(
            "tunewright_engine_process_resident_memory_bytes",
            "Resident memory of the engine process (0 when the engine runs on a thread of this process, whose "
            "memory process_resident_memory_bytes shows)", registry=r,
        )

    def bind_engine(self, serving) -> None:
        """Read queue depth, row occupancy, compilations and memory from the engine at scrape time."""
        rows = serving.max_batch_size
        self.kv_rows.set(rows)
        self.waiting.set_function(lambda: serving.queue_depth)
        self.running.set_function(lambda: serving.running)
        self.kv_usage.set_function(lambda: serving.running / rows)
        self.graphs.set_function(lambda: serving.graph_count)
        self.prefill_graphs.set_function(lambda: serving.prefill_graph_count)
        self.compiles.set_function(serving.compiled_graphs)
        self.gpu_memory.set_function(lambda: serving.gpu_memory()[0])
        self.gpu_memory_reserved.set_function(lambda: serving.gpu_memory()[1])
        self.engine_rss.set_function(serving.engine_rss)

    def render(self) -> bytes:
        return generate_latest(self.registry)
