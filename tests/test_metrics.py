"""GET /metrics through prometheus_client: layerrun_* names, their vLLM mirrors, process metrics.

The exposition is parsed with prometheus_client's own parser (what a Prometheus
server would read), over a real server on loopback.
"""

from __future__ import annotations

import threading

import httpx
import pytest

import layerrun

pytest.importorskip("fastapi")
prom = pytest.importorskip("prometheus_client.parser")

from layerrun.server import running_server  # noqa: E402
from layerrun.server.metrics import Counter, Registry  # noqa: E402


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for fam in prom.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_vllm_names_process_metrics_and_request_latencies(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=1)
    with running_server(eng, model_name="tiny") as s:
        before = samples(s.url)
        assert before[("vllm:num_requests_running", (("model_name", "tiny"),))] == 0
        assert before[("layerrun_memory_mode", (("mode", "stream"),))] == 1
        assert ("process_resident_memory_bytes", ()) in before and before[("process_resident_memory_bytes", ())] > 0
        seen_kv = []
        stop = threading.Event()

        def watch():  # KV usage while a long request runs
            while not stop.is_set():
                seen_kv.append(samples(s.url)[("vllm:kv_cache_usage_perc", (("model_name", "tiny"),))])

        t = threading.Thread(target=watch)
        t.start()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hello there", "max_tokens": 40, "ignore_eos": True},
                       timeout=120)
        stop.set()
        t.join()
        assert r.status_code == 200
        after = samples(s.url)
    eng.close()
    tiny = (("model_name", "tiny"),)
    for name in ("vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:time_to_first_token_seconds_count"):
        assert after[(name, tiny)] == before.get((name, tiny), 0) + 1, name
    assert after[("layerrun_e2e_request_latency_seconds_count", ())] == 1
    assert after[("vllm:generation_tokens_total", tiny)] == after[("layerrun_generation_tokens_total", ())] == 40
    assert after[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "tiny")))] == 1
    assert after[("layerrun_requests_finished_total", (("finish_reason", "length"),))] == 1
    # queueing is part of end-to-end latency
    assert after[("vllm:request_queue_time_seconds_sum", tiny)] <= after[("vllm:e2e_request_latency_seconds_sum", tiny)]
    assert max(seen_kv) > 0  # the running sequence's cache was counted


def test_registry_is_per_app_and_easy_to_extend():
    """Two registries never collide (two servers in one process), and a new metric is one line."""
    a, b = Registry("m", process=False), Registry("m", process=False)
    ca = Counter(a, "layerrun_spec_decode_draft_tokens_total", "drafted", vllm="vllm:spec_decode_num_draft_tokens_total")
    cb = Counter(b, "layerrun_spec_decode_draft_tokens_total", "drafted")
    ca.inc(3)
    cb.inc()
    assert "layerrun_spec_decode_draft_tokens_total 3.0" in a.render()
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 3.0' in a.render()
    assert "layerrun_spec_decode_draft_tokens_total 1.0" in b.render() and ca.get() == 3
