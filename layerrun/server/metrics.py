"""Prometheus metrics, through ``prometheus_client``.

Each app gets its own :class:`Registry` (a ``CollectorRegistry``), so several
servers in one process (tests, notebooks) never collide, and the process
collector adds the usual ``process_*`` series (CPU seconds, resident memory,
open files). Every LayerRun metric is ``layerrun_*``; those that vLLM also
exposes are mirrored under vLLM's name with a ``model_name`` label
(``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``,
``vllm:e2e_request_latency_seconds``, ``vllm:kv_cache_usage_perc``, ...), so
dashboards built for vLLM work unchanged.

Adding a metric is one line in :class:`ServerMetrics` (or on its registry from
another module): ``Counter(registry, "layerrun_x_total", "help", vllm="vllm:x_total")``.
The worker thread observes, the event loop renders ``GET /metrics``;
prometheus_client's values are thread-safe.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram

# Latency buckets from 1 ms to a minute: a tiny model's step takes milliseconds, a streamed 70B one seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A whole request (vLLM's e2e / queue buckets go to minutes too).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Registry:
    """One app's metrics: a prometheus_client registry plus the model name the vLLM mirrors carry."""

    def __init__(self, model_name: str = "", process: bool = True):
        self.prom = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        if process:
            ProcessCollector(registry=self.prom)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
            PlatformCollector(registry=self.prom)  # python_info

    def render(self) -> str:
        return generate_latest(self.prom).decode()


class _Metric:
    """A layerrun_* metric and, optionally, its vLLM-named mirror (same values, plus ``model_name``)."""

    _cls: type = _Counter

    def __init__(self, registry: Registry, name: str, help: str, labels: tuple[str, ...] = (), vllm: str | None = None,
                 vllm_labels: tuple[str, ...] | None = None, **kw):
        self.name, self.label_names, self._model = name, tuple(labels), registry.model_name
        self._own = self._cls(name, help, list(labels), registry=registry.prom, **kw)
        self._mirror = None
        if vllm:  # vLLM's label names where they differ from ours (finished_reason)
            self._mirror = self._cls(vllm, help, ["model_name", *(vllm_labels or labels)], registry=registry.prom, **kw)
        if not labels:  # a labelless metric exists (at 0) from the start, as Prometheus expects
            self._own_child = self._own
            self._mirror_child = self._mirror.labels(model_name=self._model) if self._mirror else None

    def _children(self, labels: dict):
        if not self.label_names:
            return self._own_child, self._mirror_child
        values = [str(labels[k]) for k in self.label_names]
        own = self._own.labels(*values)
        return own, (self._mirror.labels(self._model, *values) if self._mirror else None)

    def _apply(self, method: str, value, labels: dict) -> None:
        for child in self._children(labels):
            if child is not None:
                getattr(child, method)(value)


class Counter(_Metric):
    _cls = _Counter

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount:
            self._apply("inc", amount, labels)
        elif self.label_names:
            self._children(labels)  # create the series at 0

    def get(self, **labels: str) -> float:
        return self._children(labels)[0]._value.get()


class Gauge(_Metric):
    _cls = _Gauge

    def set(self, value: float, **labels: str) -> None:
        self._apply("set", value, labels)

    def get(self, **labels: str) -> float:
        return self._children(labels)[0]._value.get()


class Histogram(_Metric):
    _cls = _Histogram

    def __init__(self, registry: Registry, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS,
                 vllm: str | None = None):
        super().__init__(registry, name, help, (), vllm, buckets=tuple(buckets))

    def observe(self, value: float) -> None:
        self._apply("observe", value, {})


class ServerMetrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self, engine, batch_size: int, max_waiting: int, model_name: str | None = None):
        r = self.registry = Registry(model_name or engine.path.name)
        self.running = Gauge(r, "layerrun_requests_running", "Sequences in the live batch",
                             vllm="vllm:num_requests_running")
        self.waiting = Gauge(r, "layerrun_requests_waiting", "Sequences queued for a place in the batch",
                             vllm="vllm:num_requests_waiting")
        self.batch_limit = Gauge(r, "layerrun_batch_size_limit", "Most sequences run at once (--batch-size)")
        self.waiting_limit = Gauge(r, "layerrun_waiting_limit", "Most sequences queued before 429 (--max-waiting)")
        self.mode = Gauge(r, "layerrun_memory_mode", "Memory mode the governor chose (1 = current)", ("mode",))
        self.resident = Gauge(r, "layerrun_resident_layers", "Decoder layers held in memory")
        self.streamed = Gauge(r, "layerrun_streamed_layers", "Decoder layers streamed from disk every step")
        self.kv_usage = Gauge(r, "layerrun_kv_cache_usage_ratio",
                              "KV cache entries in use / the entries planned for (batch size x context)",
                              vllm="vllm:kv_cache_usage_perc")
        self.kv_bytes = Gauge(r, "layerrun_kv_cache_bytes", "Bytes the KV cache buffers hold now")
        self.ttft = Histogram(r, "layerrun_time_to_first_token_seconds", "From a request being queued to its first token",
                              vllm="vllm:time_to_first_token_seconds")
        self.itl = Histogram(r, "layerrun_inter_token_latency_seconds", "Between successive tokens of one sequence",
                             vllm="vllm:inter_token_latency_seconds")
        self.e2e = Histogram(r, "layerrun_e2e_request_latency_seconds", "From a sequence being queued to its end",
                             REQUEST_BUCKETS, vllm="vllm:e2e_request_latency_seconds")
        self.queue_time = Histogram(r, "layerrun_request_queue_time_seconds",
                                    "From a sequence being queued to joining the batch",
                                    REQUEST_BUCKETS, vllm="vllm:request_queue_time_seconds")
        self.step = Histogram(r, "layerrun_step_seconds", "One forward step of the whole batch")
        self.batch = Histogram(r, "layerrun_step_batch_rows", "Sequences computed by one step", BATCH_BUCKETS)
        self.prompt_tokens = Counter(r, "layerrun_prompt_tokens_total", "Prompt tokens prefilled",
                                     vllm="vllm:prompt_tokens_total")
        self.generation_tokens = Counter(r, "layerrun_generation_tokens_total",
                                         "Tokens generated (end-of-sequence included)",
                                         vllm="vllm:generation_tokens_total")
        self.bytes_read = Counter(r, "layerrun_disk_read_bytes_total", "Bytes of layer weights read from disk while serving")
        self.stall = Counter(r, "layerrun_stall_seconds_total", "Time compute waited for a layer read")
        self.expert_bytes_skipped = Counter(
            r, "layerrun_expert_bytes_skipped_total",
            "Mixture-of-experts models: bytes of streamed experts no token routed to, so never read")
        self.steps = Counter(r, "layerrun_steps_total", "Forward steps run")
        self.finished = Counter(r, "layerrun_requests_finished_total", "Sequences finished, by reason", ("finish_reason",),
                                vllm="vllm:request_success_total", vllm_labels=("finished_reason",))
        self.rejected = Counter(r, "layerrun_requests_rejected_total", "Requests refused before queueing, by reason", ("reason",))
        self.batch_limit.set(batch_size)
        self.waiting_limit.set(max_waiting)
        for m in ("stream", "partial", "full"):
            self.mode.set(1 if engine.mode == m else 0, mode=m)
        self.resident.set(len(engine.plan.resident))
        self.streamed.set(len(engine.plan.streamed))
        self._kv_capacity = max(1, batch_size * min(engine.context, engine.args.max_position_embeddings))

    def observe_kv(self, bg) -> None:
        """KV cache figures of a batch generator (its ``key_pos`` marks the cached positions, -1 = padding)."""
        kp = bg.key_pos
        used = int((kp >= 0).sum()) if kp is not None else 0
        self.kv_usage.set(min(1.0, used / self._kv_capacity))
        self.kv_bytes.set(sum(getattr(layer, "nbytes", 0) for layer in bg.cache.layers))

    def render(self) -> str:
        return self.registry.render()
