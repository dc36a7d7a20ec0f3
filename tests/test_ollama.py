"""Ollama's API, embeddings and tokenize/detokenize, over loopback HTTP.

Clients: the official ``ollama`` Python package (its pydantic response types
check every shape), the ``openai`` package for ``/v1/embeddings``, and raw
httpx requests shaped exactly as Open WebUI sends them. The model is the tiny
random "qwen2" (tokenizer and chat template included); what is checked is that
the server returns what the engine gives alone, and transformers' hidden
states for the embeddings.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import subprocess
import sys

import httpx
import pytest
import torch

import layerrun

ollama = pytest.importorskip("ollama")
pytest.importorskip("fastapi")

from layerrun.server import running_server  # noqa: E402

MODEL = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def engine(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=1, batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, model_name=MODEL) as s:
        yield s


def client(server, **kw) -> ollama.Client:
    return ollama.Client(host=server.url, **kw)


def greedy(engine, prompt, n: int, **kw):
    return engine.generate(prompt, max_new_tokens=n, **kw)


def test_chat_stream_and_generate_match_the_engine(server, engine):
    c = client(server)
    want = greedy(engine, CHAT, 12)
    parts, final = [], None
    for ch in c.chat(model=MODEL, messages=CHAT, stream=True, options={"temperature": 0, "num_predict": 12}):
        assert ch.model == MODEL and ch.message.role == "assistant"
        if ch.done:
            final = ch
        else:
            parts.append(ch.message.content)
    assert "".join(parts) + final.message.content == want.text
    assert final.eval_count == len(want.token_ids) + (want.finish_reason == "stop")  # EOS is counted, as Ollama does
    assert final.done_reason == ("length" if want.finish_reason == "length" else "stop")
    assert final.prompt_eval_count == len(engine.encode_prompt(CHAT)) and final.total_duration >= final.eval_duration

    # /api/generate, not streamed: the chat template wraps the prompt; `context` continues the conversation
    g = c.generate(model=f"{MODEL}:latest", prompt="Tell me a story", stream=False,
                   options={"temperature": 0, "num_predict": 8})
    want = greedy(engine, "Tell me a story", 8)
    assert g.response == want.text and g.done and g.context == engine.encode_prompt("Tell me a story") + want.token_ids
    g2 = c.generate(model=MODEL, prompt="and then?", context=g.context, stream=False,
                    options={"temperature": 0, "num_predict": 5})
    assert g2.response == greedy(engine, g.context + engine.encode_prompt("and then?"), 5).text
    # raw: no template
    raw = c.generate(model=MODEL, prompt="Once upon", raw=True, stream=False, options={"temperature": 0, "num_predict": 6})
    assert raw.response == greedy(engine, "Once upon", 6, chat=False).text


def test_sampling_options(server):
    c = client(server)
    opts = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 7, "num_predict": 10}
    a = c.generate(model=MODEL, prompt="hi", stream=False, options=opts).response
    b = c.generate(model=MODEL, prompt="hi", stream=False, options=opts).response
    other = {c.generate(model=MODEL, prompt="hi", stream=False, options={**opts, "seed": s}).response for s in range(4)}
    assert a == b and len(other) > 1  # the seed decides, and different seeds differ
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                       "options": {"num_predict": 3, "num_ctx": 2048, "mirostat": 0}})
    assert r.status_code == 200 and r.json()["eval_count"] <= 3
    assert r.headers["x-layerrun-ignored-options"] == "mirostat,num_ctx"
    assert "x-layerrun-ignored-options" not in httpx.post(server.url + "/api/generate", json={
        "model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2, "repeat_penalty": 1.2,
                                                                      "min_p": 0.05}}).headers


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "hi"}, 400, "model is required"),
    ({"model": "nope", "prompt": "hi"}, 404, "model 'nope' not found"),
    ({"model": MODEL, "prompt": "hi", "format": "yaml"}, 400, 'format: expected "json"'),
    ({"model": MODEL, "prompt": "hi", "format": {"type": "nonsense"}}, 400, "format"),
    ({"model": MODEL, "prompt": "hi", "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ({"model": MODEL, "prompt": "hi", "options": {"num_predict": 0}}, 400, "options.num_predict"),
    ({"model": MODEL, "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x " * 400}, 400, "context"),
])
def test_generate_errors_are_ollama_shaped(server, body, status, message):
    r = httpx.post(server.url + "/api/generate", json={**body, "stream": False})
    assert r.status_code == status and message in r.json()["error"], r.text


def test_load_and_chat_errors(server):
    c = client(server)
    g = c.generate(model=MODEL, prompt="")  # Ollama's "load the model" request
    assert g.done and g.done_reason == "load" and g.response == ""
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}])
    assert e.value.status_code == 400 and "does not support tools" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="other", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


def test_tags_show_ps_version(server, engine):
    c = client(server)
    tags = c.list().models
    assert [m.model for m in tags] == [f"{MODEL}:latest"]
    assert tags[0].size == sum(f.bytes for f in engine.manifest.files) and len(tags[0].digest) == 64
    assert tags[0].details.family == "qwen2" and tags[0].details.quantization_level == "FLOAT32"
    s = c.show(MODEL)
    assert s.modelinfo["general.architecture"] == "qwen2"
    assert s.modelinfo["qwen2.block_count"] == engine.args.num_hidden_layers
    assert s.template == engine.tokenizer.chat_template and "completion" in s.capabilities
    ps = c.ps().models
    assert ps[0].name == f"{MODEL}:latest" and ps[0].size > 0 and ps[0].size_vram == 0
    assert httpx.get(server.url + "/api/version").json()["version"]


def test_open_webui_request_shapes(server, engine):
    """What Open WebUI sends to an Ollama connection: the model list, then a streamed chat."""
    h = {"Content-Type": "application/json"}
    assert httpx.get(server.url + "/api/version", headers=h).status_code == 200
    names = [m["name"] for m in httpx.get(server.url + "/api/tags", headers=h).json()["models"]]
    assert names == [f"{MODEL}:latest"]
    body = {"model": names[0], "stream": True, "keep_alive": "5m",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
            "options": {"temperature": 0.0, "num_predict": 10, "repeat_penalty": 1.1, "num_ctx": 2048}}
    lines = []
    with httpx.stream("POST", server.url + "/api/chat", json=body, headers=h, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    text = "".join(x["message"]["content"] for x in lines)
    assert text == greedy(engine, CHAT, 10, repetition_penalty=1.1).text  # Ollama's repeat_penalty, mapped


def test_embeddings_are_pooled_transformers_hidden_states(server, engine, tiny_hf):
    transformers = pytest.importorskip("transformers")
    texts = ["The sky is blue.", "Rayleigh scattering of sunlight"]
    got = client(server).embed(model=MODEL, input=texts).embeddings
    ref = transformers.AutoModel.from_pretrained(tiny_hf("qwen2"), dtype=torch.float32).eval()
    for text, vec in zip(texts, got):
        ids = engine.encode_prompt(text, chat=False)
        with torch.no_grad():
            h = ref(torch.tensor([ids])).last_hidden_state[0]  # (T, H), after the final norm
        want = torch.nn.functional.normalize(h.mean(0), dim=0)
        assert torch.allclose(torch.tensor(vec), want, atol=1e-5)
    # one input alone gives the same vector as inside a padded batch
    alone = client(server).embed(model=MODEL, input=texts[1]).embeddings[0]
    assert torch.allclose(torch.tensor(alone), torch.tensor(got[1]), atol=1e-5)
    legacy = client(server).embeddings(model=MODEL, prompt=texts[0]).embedding
    assert torch.allclose(torch.tensor(legacy), torch.tensor(got[0]), atol=1e-6)

    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    r = oc.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    assert torch.allclose(torch.tensor(r.data[0].embedding), torch.tensor(got[0]), atol=1e-6)
    b64 = oc.embeddings.create(model=MODEL, input=texts[0], encoding_format="base64").data[0].embedding
    vec = struct.unpack(f"<{len(got[0])}f", base64.b64decode(b64))  # little-endian float32, as OpenAI sends
    assert torch.allclose(torch.tensor(vec), torch.tensor(got[0]), atol=1e-6)
    bad = httpx.post(server.url + "/v1/embeddings", json={"input": "x", "dimensions": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
    too_long = httpx.post(server.url + "/api/embed", json={"model": MODEL, "input": "x " * 400, "truncate": False})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]


def test_tokenize_detokenize(server, engine):
    text = "Hello world, 12345!"
    r = httpx.post(server.url + "/tokenize", json={"content": text}).json()
    assert r["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)
    pieces = httpx.post(server.url + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == r["tokens"] and "".join(p["piece"] for p in pieces) == text
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["content"] == text
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "not a token id" in bad.json()["error"]


def test_api_key_guards_the_ollama_api(engine):
    with running_server(engine, model_name=MODEL, api_key="sekrit") as s:
        r = httpx.post(s.url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.post(s.url + "/tokenize", json={"content": "hi"}).status_code == 401
        assert httpx.post(s.url + "/v1/embeddings", json={"input": "hi"}).status_code == 401
        ok = ollama.Client(host=s.url, headers={"Authorization": "Bearer sekrit"})
        assert ok.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}).done
        assert httpx.get(s.url + "/").status_code == 200  # the page itself is open; its chat sends the key


def test_ollama_client_against_layerrun_serve(tiny_layered):
    """A real `layerrun serve` process on loopback, used through the ollama client."""
    from test_server import free_port, wait_for

    port = free_port()
    cmd = [sys.executable, "-m", "layerrun", "serve", str(tiny_layered("qwen2")), "--port", str(port),
           "--served-model-name", "tiny", "--log-level", "warning"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "LAYERRUN_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/api/version", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(up, timeout=120), p.stderr.read() if p.poll() is not None else "not up"
        c = ollama.Client(host=url)
        assert [m.model for m in c.list().models] == ["tiny:latest"]
        chunks = list(c.chat(model="tiny", messages=CHAT, stream=True, options={"num_predict": 6, "temperature": 0}))
        assert chunks[-1].done and chunks[-1].eval_count >= 1
        assert len(c.embed(model="tiny", input="hello").embeddings[0]) == json.loads(
            (tiny_layered("qwen2") / "config.json").read_text())["hidden_size"]
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    assert p.returncode == 0


def test_openai_streams_send_keepalive_pings(tiny_layered, monkeypatch):
    """SSE comment pings (sse-starlette) while a slow step has no token to send; clients skip them."""
    from layerrun.server import openai_api as server_app

    monkeypatch.setattr(server_app, "SSE_PING_S", 0.02)
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=1, throttle="2MB/s")  # ~75 ms a layer
    try:
        with running_server(eng, model_name=MODEL) as s:
            body = {"prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True, "temperature": 0}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
                lines = [ln for ln in r.iter_lines() if ln]
            openai = pytest.importorskip("openai")
            oc = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
            chunks = list(oc.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True, temperature=0,
                                                extra_body={"ignore_eos": True}))
    finally:
        eng.close()
    assert any(ln.startswith(": ping") for ln in lines)
    data = [ln for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "".join(c.choices[0].text for c in chunks) == "".join(json.loads(d[6:])["choices"][0]["text"] for d in data[:-1])


def test_format_constrains_the_output(server):
    """Ollama's `format`: "json" gives JSON, a schema gives JSON valid against it (llguidance grammars)."""
    jsonschema = pytest.importorskip("jsonschema")
    c = client(server)
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "blue"]},
                                               "ok": {"type": "boolean"}}, "required": ["color", "ok"],
              "additionalProperties": False}  # bounded: the answer ends within num_predict
    for seed in range(3):
        r = c.chat(model=MODEL, messages=[{"role": "user", "content": "Answer in JSON."}], format=schema,
                   options={"temperature": 1.0, "seed": seed, "num_predict": 64})
        jsonschema.validate(json.loads(r.message.content), schema)
        assert r.done_reason == "stop"
    g = c.generate(model=MODEL, prompt="Some JSON please", format="json", options={"num_predict": 48, "seed": 1})
    if g.done_reason == "stop":
        json.loads(g.response)
