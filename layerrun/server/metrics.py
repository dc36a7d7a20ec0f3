"""Prometheus metrics in the text exposition format, without a client library.

The worker thread observes, the event loop renders ``GET /metrics``; one lock
guards every value. Names follow Prometheus conventions (``_total`` counters,
``_seconds`` and ``_bytes`` units).
"""

from __future__ import annotations

import math
import threading

# Latency buckets from 1 ms to a minute: a tiny model's step takes milliseconds, a streamed 70B one seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help: str):
        self.name, self.help, self._lock = name, help, registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, registry: Registry, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(registry, name, help)
        self.label_names = labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(str(labels[k]) for k in self.label_names)
        with self._lock:
            self.values[key] = self.values.get(key, 0) + amount

    def get(self, **labels: str) -> float:
        with self._lock:
            return self.values.get(tuple(str(labels[k]) for k in self.label_names), 0)

    def render(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(dict(zip(self.label_names, k)))} {_num(v)}" for k, v in sorted(self.values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[k]) for k in self.label_names)
        with self._lock:
            self.values[key] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(registry, name, help)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self.counts[i] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        out, acc = self.header(), 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {acc}')
        out += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            lines = [line for m in self.metrics for line in m.render()]
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self, engine, batch_size: int, max_waiting: int):
        r = self.registry = Registry()
        self.running = Gauge(r, "layerrun_requests_running", "Sequences in the live batch")
        self.waiting = Gauge(r, "layerrun_requests_waiting", "Sequences queued for a place in the batch")
        self.batch_limit = Gauge(r, "layerrun_batch_size_limit", "Most sequences run at once (--batch-size)")
        self.waiting_limit = Gauge(r, "layerrun_waiting_limit", "Most sequences queued before 429 (--max-waiting)")
        self.mode = Gauge(r, "layerrun_memory_mode", "Memory mode the governor chose (1 = current)", ("mode",))
        self.resident = Gauge(r, "layerrun_resident_layers", "Decoder layers held in memory")
        self.streamed = Gauge(r, "layerrun_streamed_layers", "Decoder layers streamed from disk every step")
        self.ttft = Histogram(r, "layerrun_time_to_first_token_seconds", "From a request being queued to its first token")
        self.itl = Histogram(r, "layerrun_inter_token_latency_seconds", "Between successive tokens of one sequence")
        self.step = Histogram(r, "layerrun_step_seconds", "One forward step of the whole batch")
        self.batch = Histogram(r, "layerrun_step_batch_rows", "Sequences computed by one step", BATCH_BUCKETS)
        self.prompt_tokens = Counter(r, "layerrun_prompt_tokens_total", "Prompt tokens prefilled")
        self.generation_tokens = Counter(r, "layerrun_generation_tokens_total", "Tokens generated (end-of-sequence included)")
        self.bytes_read = Counter(r, "layerrun_disk_read_bytes_total", "Bytes of layer weights read from disk while serving")
        self.stall = Counter(r, "layerrun_stall_seconds_total", "Time compute waited for a layer read")
        self.expert_bytes_skipped = Counter(
            r, "layerrun_expert_bytes_skipped_total",
            "Mixture-of-experts models: bytes of streamed experts no token routed to, so never read")
        self.steps = Counter(r, "layerrun_steps_total", "Forward steps run")
        self.spec_draft = Counter(r, "layerrun_spec_decode_draft_tokens_total",
                                  "Speculative decoding: drafted tokens the model verified")
        self.spec_accepted = Counter(r, "layerrun_spec_decode_accepted_tokens_total",
                                     "Speculative decoding: drafted tokens the model accepted")
        self.finished = Counter(r, "layerrun_requests_finished_total", "Sequences finished, by reason", ("finish_reason",))
        self.rejected = Counter(r, "layerrun_requests_rejected_total", "Requests refused before queueing, by reason", ("reason",))
        self.batch_limit.set(batch_size)
        self.waiting_limit.set(max_waiting)
        for m in ("stream", "partial", "full"):
            self.mode.set(1 if engine.mode == m else 0, mode=m)
        self.resident.set(len(engine.plan.resident))
        self.streamed.set(len(engine.plan.streamed))

    def render(self) -> str:
        return self.registry.render()
