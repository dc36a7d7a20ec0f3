"""The OpenAI-compatible server, tested over loopback HTTP with the official openai client.

Every server binds 127.0.0.1 on a free port. The model is the tiny random
"qwen2" (tokenizer and chat template included), so the generated text is
gibberish; what is checked is that it is exactly what the engine gives alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import layerrun

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from layerrun.errors import LayerRunError  # noqa: E402
from layerrun.server import running_server  # noqa: E402
from layerrun.server.run import DEFAULT_MAX_BODY, check_cors_origins, cors_warning, exposure_warning  # noqa: E402

MODEL = "qwen2"


@pytest.fixture(scope="module")
def engine(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=1, batch_size=8)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, model_name=MODEL) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def metric(server, name: str) -> float:
    """A sample's value from GET /metrics (name with labels, exactly as exposed)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(cond, timeout: float = 120.0) -> bool:
    """Poll ``cond`` until it holds; the timeout only bounds a hang (it returns as soon as it holds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def sse_lines(resp: httpx.Response):
    for line in resp.iter_lines():
        if line.startswith("data: "):
            yield line[6:]


def extra(obj, key: str, default=None):
    return (obj.model_extra or {}).get(key, default)


# ---- the API with the openai client --------------------------------------------------
def test_models_health_and_plain_requests(server, engine):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}

    want = engine.generate("Hello there", max_new_tokens=12, chat=False)
    r = c.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0,
                             extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.text == want.text and extra(ch, "token_ids") == want.token_ids
    assert ch.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(engine.encode_prompt("Hello there", chat=False))
    assert r.usage.completion_tokens == want.stats.generated_tokens

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    want = engine.generate(msgs, max_new_tokens=10)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(engine.encode_prompt(msgs))

    # streaming chat: a role chunk, content chunks, a finish reason, then usage when asked for
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.stats.generated_tokens

    # n choices for each of several prompts, stop strings, seeded sampling
    r = c.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=5, temperature=0)
    assert [x.index for x in r.choices] == [0, 1, 2, 3] and r.choices[0].text == r.choices[1].text
    full = engine.generate("Hello there", max_new_tokens=12, chat=False, ignore_eos=True).text
    stop = full[3:5]
    r = c.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    seeded = [c.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0.9, seed=3).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1] == engine.generate("Hi", max_new_tokens=8, chat=False, temperature=0.9, seed=3).text


def test_64_concurrent_streams_each_match_running_alone(server, engine):
    """Continuous batching: 64 greedy streams (8 at a time, the rest waiting) give exactly the tokens of
    each prompt alone (bench/server_soak.py does the same with a real model)."""
    n = 64
    jobs = []
    for i in range(n):
        max_tokens = 4 + (i * 7) % 17
        if i % 4 == 3:
            prompt = [{"role": "user", "content": f"Question {i}: " + "why " * (i % 5)}]
            want = engine.generate(prompt, max_new_tokens=max_tokens)
        else:
            prompt = f"Story {i}:" + " once" * (i % 9)
            want = engine.generate(prompt, max_new_tokens=max_tokens, chat=False)
        jobs.append((prompt, max_tokens, want))

    async def one(c: openai.AsyncOpenAI, prompt, max_tokens: int):
        kw = dict(model=MODEL, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"return_token_ids": True})
        if isinstance(prompt, list):
            stream, pick = await c.chat.completions.create(messages=prompt, **kw), (lambda ch: ch.delta.content)
        else:
            stream, pick = await c.completions.create(prompt=prompt, **kw), (lambda ch: ch.text)
        ids, text, finish = [], [], None
        async for chunk in stream:
            ch = chunk.choices[0]
            ids += extra(ch, "token_ids", [])
            text.append(pick(ch) or "")
            finish = ch.finish_reason or finish
        return ids, "".join(text), finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(one(c, p, m) for p, m, _ in jobs))

    steps0 = metric(server, "layerrun_steps_total")
    results = asyncio.run(run_all())
    for (prompt, _, want), (ids, text, finish) in zip(jobs, results):
        assert ids == want.token_ids, prompt
        assert text == want.text and finish == want.finish_reason
    # they shared steps: far fewer forward passes than tokens
    steps = metric(server, "layerrun_steps_total") - steps0
    assert steps < sum(len(w.token_ids) + 1 for *_, w in jobs) / 3
    assert server.app.state.worker.bg.rows == [] or wait_for(lambda: metric(server, "layerrun_requests_running") == 0)


def test_health_answers_while_8_streams_generate(server, engine):
    """/health answers while the batch computes, because no model code runs on the server's event loop
    thread: asserted on the thread of every layer computed meanwhile (load cannot change that), not on
    a latency bound (which a busy machine breaks)."""
    stop = threading.Event()
    started = threading.Barrier(9)
    computed: list[str] = []
    real_layer = engine.model.layer

    def layer(*args, **kwargs):
        computed.append(threading.current_thread().name)
        return real_layer(*args, **kwargs)

    def stream_one(i: int):
        body = {"model": MODEL, "prompt": f"Tell me {i}", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
            lines = sse_lines(r)
            next(lines)
            started.wait()
            for _ in lines:
                if stop.is_set():
                    return

    threads = [threading.Thread(target=stream_one, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=300)
    latencies, running = [], []
    engine.model.layer = layer  # observes the real computation while the probes run
    try:
        with httpx.Client(timeout=60) as h:
            for _ in range(25):
                t0 = time.perf_counter()
                assert h.get(server.url + "/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                running.append(metric(server, "layerrun_requests_running"))
                time.sleep(0.01)
    finally:
        engine.model.layer = real_layer
    stop.set()
    for t in threads:
        t.join(timeout=300)
    assert max(running) == 8, running  # the probes did run while all 8 were in the batch
    print(f"health latency under 8 streams: median {sorted(latencies)[12]*1e3:.1f} ms, max {max(latencies)*1e3:.1f} ms")
    assert computed, "no layer computed while /health was probed"
    assert set(computed) == {"layerrun-scheduler"}, set(computed)  # the worker, never the loop's thread ("layerrun-server")
    # the clients left mid-stream: their sequences were cancelled and left the batch
    assert wait_for(lambda: metric(server, "layerrun_requests_running") == 0)


def test_client_disconnect_frees_the_sequence(server):
    cancelled = 'layerrun_requests_finished_total{finish_reason="cancelled"}'
    before = metric(server, cancelled)
    body = {"model": MODEL, "prompt": "Go on", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
        lines = sse_lines(r)
        got = [json.loads(next(lines)) for _ in range(3)]
        assert all(g["choices"][0]["finish_reason"] is None for g in got)
        assert metric(server, "layerrun_requests_running") == 1
    # closing the response drops the connection; the sequence leaves the batch at the next step
    assert wait_for(lambda: metric(server, cancelled) == before + 1)
    assert wait_for(lambda: not server.app.state.worker.bg.busy and metric(server, "layerrun_requests_running") == 0)

    # the same for a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 250}, timeout=0.3)
    assert wait_for(lambda: metric(server, cancelled) == before + 2)
    assert wait_for(lambda: not server.app.state.worker.bg.busy)
    assert server.app.state.worker.active == 0


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("layerrun_requests_running", "layerrun_requests_waiting", "layerrun_time_to_first_token_seconds_bucket",
                 "layerrun_inter_token_latency_seconds_sum", "layerrun_prompt_tokens_total",
                 "layerrun_generation_tokens_total", "layerrun_disk_read_bytes_total", "layerrun_stall_seconds_total"):
        assert f"\n{name}" in text, name
    assert 'layerrun_memory_mode{mode="stream"} 1' in text and 'layerrun_memory_mode{mode="full"} 0' in text
    assert metric(server, "layerrun_disk_read_bytes_total") > 0  # stream mode reads layers on every step
    assert metric(server, "layerrun_time_to_first_token_seconds_count") > 0


def test_queue_full_is_429(engine):
    with running_server(engine, model_name=MODEL, batch_size=1, max_waiting=1) as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=300) as a:
            lines = sse_lines(a)  # keep a reference: closing the iterator would close the connection
            next(lines)  # running
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=300) as b:
                assert b.status_code == 200  # waiting
                with pytest.raises(openai.RateLimitError) as e:
                    client(s).completions.create(model=MODEL, prompt="y", max_tokens=2)
                assert e.value.body["code"] == "queue_full" and "--max-waiting 1" in e.value.body["message"]
                assert metric(s, "layerrun_requests_waiting") == 1
        assert wait_for(lambda: s.app.state.worker.active == 0)
        assert client(s).completions.create(model=MODEL, prompt="y", max_tokens=2).choices[0].finish_reason


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'"a string"', 400, None),
    (b"", 400, None),
    ({"prompt": 3}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed"),
    ({"prompt": "x", "stream": "yes please"}, 400, "stream"),
    ({"prompt": "x", "logprobs": 30}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3.0}, 400, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),  # known, not implemented: refused by name
    ({"prompt": "x", "min_tokens": 4}, 400, "min_tokens"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**6]}, 400, "prompt"),
    ({"prompt": "word " * 400}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": ["a", "b", "c", "d", "e"], "n": 16}, 400, "n"),  # more sequences than the server ever holds at once
    (b'{"prompt": "\\udb54"}', 400, "prompt"),  # a lone surrogate is not text
    (b'{"prompt": "x", "stop": ["\\udb54"]}', 400, "stop"),
    (b'{"prompt": "x", "model": "\\udb54"}', 400, "model"),
    ({}, 400, "prompt"),
])
def test_bad_completion_requests_are_4xx_naming_the_field(server, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if param:
        assert param in err["message"]


def test_bad_chat_requests(server):
    c = client(server)
    for messages, param in [([], "messages"), ([{"role": "robot", "content": "hi"}], "messages.0.role"),
                            ([{"role": "user", "content": 5}], "messages.0.content"),
                            ([{"role": "user", "content": "why " * 300}], "messages")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=messages)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logit_bias={"3": 1})
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == "logit_bias"
    # a lone surrogate (the openai client cannot even send one)
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\udb54"}]}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key(engine):
    with running_server(engine, model_name=MODEL, api_key="s3cret") as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="nope").models.list()
        assert client(s, api_key="s3cret").completions.create(model=MODEL, prompt="a", max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200  # health and metrics stay open, as in vLLM


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert "anyone" in exposure_warning("0.0.0.0", None)
    assert "reachable" in exposure_warning("192.168.1.5", "key") and "anyone" not in exposure_warning("::", "key")


# ---- request-body limit and CORS -------------------------------------------------------
def padded(size: int) -> bytes:
    """A valid completion request of exactly ``size`` bytes (JSON padded with spaces)."""
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def assert_413(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert str(limit) in err["message"] and "--max-body" in err["message"]


def test_body_over_the_default_limit_is_413_and_the_server_keeps_serving(server):
    rejected = 'layerrun_requests_rejected_total{reason="body_too_large"}'
    before = metric(server, rejected)
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=300) as h:  # one keep-alive connection throughout
        assert h.post("/v1/completions", content=padded(DEFAULT_MAX_BODY), headers=headers).status_code == 200
        assert_413(h.post("/v1/completions", content=padded(DEFAULT_MAX_BODY + 1), headers=headers), DEFAULT_MAX_BODY)
        assert_413(h.post("/v1/chat/completions", content=b"x" * (8 * DEFAULT_MAX_BODY), headers=headers),
                   DEFAULT_MAX_BODY)
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
    assert metric(server, rejected) == before + 2
    # the openai client sees it as an API error with the body
    with pytest.raises(openai.APIStatusError) as e:
        client(server).completions.create(model=MODEL, prompt="word " * DEFAULT_MAX_BODY, max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_cut_off(engine):
    limit = 64 * 1024
    with running_server(engine, model_name=MODEL, max_body="64KiB") as s:
        def chunks(total: int, size: int = 4096):  # a valid request, padded with spaces to about `total` bytes
            head = b'{"prompt": "Hi", "max_tokens": 1'
            yield head
            sent = len(head)
            while sent < total:
                yield b" " * min(size, total - sent)
                sent += size
            yield b"}"

        with httpx.Client(base_url=s.url, timeout=300) as h:
            headers = {"content-type": "application/json"}
            r = h.post("/v1/completions", content=chunks(limit * 4), headers=headers)  # a generator: chunked
            assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
            assert_413(r, limit)
            r = h.post("/v1/completions", content=chunks(limit // 2), headers=headers)  # under the limit: served
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 1

        # A raw upload that never ends: the 413 comes once the limit is passed, while the client is still sending.
        with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
            for _ in range(limit // 1024 + 8):  # no final 0-length chunk: the body is unfinished
                sock.sendall(chunk)
            reply = b""
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                assert data, reply
                reply += data
            assert reply.startswith(b"HTTP/1.1 413 ")
            head, _, rest = reply.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(rest) < length:
                rest += sock.recv(65536)
            assert json.loads(rest)["error"]["code"] == "request_too_large"

        # Content-Length over the limit with Expect: 100-continue: refused without asking for the body, and closed.
        r = httpx.post(s.url + "/v1/completions", content=b"x" * (limit + 1), headers={"Expect": "100-continue"})
        assert_413(r, limit)
        assert r.headers["connection"] == "close"
        assert client(s).completions.create(model=MODEL, prompt="a", max_tokens=1).choices  # still serving


def test_cors_is_off_by_default(server):
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allowed_origins(engine):
    allowed, other = "http://localhost:3000", "https://evil.example"
    with running_server(engine, model_name=MODEL, api_key="s3cret",
                        cors_origins=["http://localhost:3000/", "https://App.example.com"]) as s:
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(s.url + "/v1/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})

        # the preflight needs no API key (browsers send none with it) and allows the Authorization header
        r = preflight(allowed)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert preflight("https://app.example.com").headers["access-control-allow-origin"] == "https://app.example.com"
        r = preflight(other)
        assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers

        # the request itself: allowed origins get the header, on refusals (401, 413) too
        auth = {"Authorization": "Bearer s3cret"}
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                       headers={"Origin": allowed, **auth})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        assert "Origin" in r.headers["vary"]
        r = httpx.get(s.url + "/v1/models", headers={"Origin": allowed})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == allowed
        r = httpx.post(s.url + "/v1/completions", content=b"x" * (DEFAULT_MAX_BODY + 1),
                       headers={"Origin": allowed, **auth})
        assert r.status_code == 413 and r.headers["access-control-allow-origin"] == allowed
        r = httpx.get(s.url + "/v1/models", headers={"Origin": other, **auth})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    with running_server(engine, model_name=MODEL, cors_origins=["*"]) as s:
        r = httpx.options(s.url + "/v1/completions", headers={"Origin": other, "Access-Control-Request-Method": "POST",
                                                               "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        r = httpx.get(s.url + "/v1/models", headers={"Origin": other})
        assert r.headers["access-control-allow-origin"] == "*"


def test_body_limit_and_cors_options_are_checked(engine):
    assert check_cors_origins(["HTTP://LocalHost:3000/", "*", "https://a.example"]) == [
        "http://localhost:3000", "*", "https://a.example"]
    for bad in ("localhost:3000", "http://a.example/path", "null", ""):
        with pytest.raises(LayerRunError, match="--cors-origin"):
            check_cors_origins([bad])
    assert "--api-key" in cors_warning(["*"], None)
    assert cors_warning(["*"], "key") is None and cors_warning(["http://a.example"], None) is None
    assert cors_warning(None, None) is None
    assert check_cors_origins("https://a.example") == ["https://a.example"]  # one origin as a plain string
    from layerrun.server import create_app

    for bad in (0, "0", "lots"):
        with pytest.raises(LayerRunError, match="--max-body"):
            create_app(engine, max_body=bad)


# ---- fuzzing from the OpenAPI schema ---------------------------------------------------
def test_fuzz_from_openapi_schema_finds_no_server_error(tiny_layered, tmp_path):
    """Bodies generated from the server's own schema, valid and invalid: never a 500."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    # a short context keeps every generated request to a few milliseconds of compute
    src = tmp_path / "m"
    shutil.copytree(tiny_layered("qwen2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = 24  # the chat template alone takes ~19
    (src / "config.json").write_text(json.dumps(cfg))
    eng = layerrun.load(src, mode="full")
    with running_server(eng, model_name=MODEL, batch_size=8, max_waiting=4) as s:  # at most 12 sequences a request
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        ops = [op.ok() for op in schema.get_all_operations()]
        assert {f"{o.method.upper()} {o.path}" for o in ops} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                                                 "GET /v1/models", "GET /health", "GET /metrics"}
        seen = set()
        for op in ops:
            # 50 bodies per POST endpoint, 30 valid and 20 invalid; GET operations have no body to make invalid
            if op.method.upper() == "POST":
                plan = [(schemathesis.GenerationMode.POSITIVE, 30), (schemathesis.GenerationMode.NEGATIVE, 20)]
            else:
                plan = [(schemathesis.GenerationMode.POSITIVE, 5)]
            for mode, examples in plan:

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    r = case.call(base_url=s.url, timeout=300)
                    assert r.status_code < 500, (case.body, r.text)
                    seen.add(r.status_code)
                    if r.status_code >= 400:  # OpenAI's error object, or Ollama's {"error": "..."} on /api/*
                        err = r.json()["error"]
                        assert err["message"] if isinstance(err, dict) else err

                check()
        assert 200 in seen and 400 in seen
    eng.close()


# ---- the CLI ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(tiny_layered):
    """`layerrun serve MODEL --port P` serves, and exits 0 on Ctrl-C."""
    port = free_port()
    cmd = [sys.executable, "-m", "layerrun", "serve", str(tiny_layered("qwen2")), "--port", str(port),
           "--served-model-name", "tiny", "--batch-size", "4", "--log-level", "warning",
           "--max-body", "2KiB", "--cors-origin", "http://localhost:3000"]
    env = {**os.environ, "LAYERRUN_API_KEY": ""}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=10).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(up, timeout=300), p.stderr.read() if p.poll() is not None else "not up"
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices
        r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 2048}, headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "serving tiny" in err and "batch size 4" in err


def test_loopback_server_refuses_other_host_names(engine):
    """DNS rebinding: a page re-binding evil.example to 127.0.0.1 sends Host: evil.example and is refused."""
    from layerrun.server.run import allowed_hosts_for

    assert allowed_hosts_for("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("0.0.0.0", ["box.lan"]) == ["box.lan"]
    assert allowed_hosts_for("127.0.0.1", ["*"]) is None
    with running_server(engine, model_name=MODEL) as s:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        bad = httpx.post(s.url + "/v1/completions", json=body, headers={"Host": f"evil.example:{s.port}"}, timeout=300)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_host"
        assert httpx.get(s.url + "/health", headers={"Host": "evil.example"}, timeout=300).status_code == 400
        for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", f"[::1]:{s.port}", "LOCALHOST"):
            assert httpx.get(s.url + "/health", headers={"Host": host}, timeout=300).status_code == 200, host
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=300).status_code == 200
        assert metric(s, 'layerrun_requests_rejected_total{reason="host"}') == 2
    with running_server(engine, model_name=MODEL, allowed_hosts=allowed_hosts_for("127.0.0.1", ["box.lan"])) as s:
        assert httpx.get(s.url + "/health", headers={"Host": f"box.lan:{s.port}"}, timeout=300).status_code == 200
        assert httpx.get(s.url + "/health", headers={"Host": "other.lan"}, timeout=300).status_code == 400
