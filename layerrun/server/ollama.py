"""Ollama's HTTP API on the same server, so Open WebUI, Continue and Ollama's own clients work unchanged.

``/api/chat`` and ``/api/generate`` stream NDJSON by default (one JSON object a
line, the last with ``done: true`` and Ollama's counters in nanoseconds) or
answer once with ``stream: false``; they share the OpenAI endpoints' worker,
so every client is batched with every other. ``options`` map to LayerRun's
sampling (``temperature``, ``top_k``, ``top_p``, ``seed``, ``num_predict``,
``stop``, ``min_p``, ``repeat_penalty``, ``presence_penalty``,
``frequency_penalty``; Ollama's defaults 0.8 / 40 / 0.9 apply to the first three
when absent). Options that tune Ollama's own runtime (``num_ctx``, ``num_gpu``,
``num_thread`` ...) or samplers LayerRun does not have (``mirostat`` ...) are
accepted and ignored, and named in the ``X-LayerRun-Ignored-Options`` header.
``keep_alive`` is accepted: the model stays loaded for the server's life.
``format`` (``"json"``, or a JSON schema) constrains the output by the same
llguidance grammars as OpenAI's ``response_format``. Also ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``, ``/api/pull`` (into the model store), and llama-server's
``/tokenize`` and ``/detokenize``. Errors are Ollama's ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from layerrun import __version__
from layerrun.errors import LayerRunError
from layerrun.server.common import APIError
from layerrun.server.extras import GREEDY_BELOW, Served

OLLAMA_API_VERSION = "0.6.0"  # the Ollama API level these endpoints follow (clients read /api/version)
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's, when a request sets none
SUPPORTED_OPTIONS = {"temperature", "top_k", "top_p", "seed", "num_predict", "stop", "min_p", "repeat_penalty",
                     "presence_penalty", "frequency_penalty"}  # others (num_ctx, num_gpu, mirostat, ...) are ignored
FAR_FUTURE = "2318-06-20T00:00:00Z"  # expires_at of a model that stays loaded (what Ollama shows for keep_alive -1)


class OllamaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _OllamaRoute(APIRoute):
    """Errors in Ollama's shape (``{"error": "..."}``), validation errors included."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                errs = e.errors()
                first = errs[0] if errs else {}
                where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
                return _error(400, f"{where}: {first.get('msg', 'invalid request')}")
            except OllamaError as e:
                return _error(e.status, e.message)
            except APIError as e:  # from the shared backend (context, queue full, worker down)
                return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
            except LayerRunError as e:
                return _error(400, str(e))

        return route


# ---- request bodies -------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field("", description="the served model (its name, optionally with :latest)")
    stream: bool = Field(True, description="NDJSON stream (default) or one response")
    options: dict[str, Any] | None = Field(None, description="temperature, top_k, top_p, seed, num_predict, stop")
    format: Any = Field(None, description='"json" (any JSON value) or a JSON schema: constrained decoding')
    keep_alive: Any = Field(None, description="accepted; the model stays loaded while the server runs")


class GenerateRequest(_Body):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    context: list[int] | None = Field(None, description="token ids returned by a previous /api/generate")
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None


class ChatRequest(_Body):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict] | None = None
    think: Any = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    name: str = ""  # the older field name
    verbose: bool = False


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    name: str = ""
    stream: bool = True
    insecure: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


# ---- helpers ---------------------------------------------------------------------------------
def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def sampling(options: dict | None, context_left: int) -> tuple[dict, list[str]]:
    """Ollama ``options`` -> BatchGenerator.request keywords, and the option names ignored."""
    o = dict(options or {})
    ignored = sorted(k for k in o if k not in SUPPORTED_OPTIONS)

    def num(key: str, kind: type, default):
        v = o.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
            raise OllamaError(400, f"options.{key}: expected a number{' (integer)' if kind is int else ''}, got {v!r}")
        return kind(v)

    temperature = num("temperature", float, DEFAULTS["temperature"])
    top_k = num("top_k", int, DEFAULTS["top_k"])
    top_p = num("top_p", float, DEFAULTS["top_p"])
    seed = num("seed", int, None)
    predict = num("num_predict", int, -1)
    if not 0 <= temperature <= 100:
        raise OllamaError(400, f"options.temperature: must be >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise OllamaError(400, f"options.top_p: must be in [0, 1], got {top_p}")
    stop = o.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise OllamaError(400, "options.stop: expected a list of strings")
    if predict == 0:
        raise OllamaError(400, "options.num_predict: must not be 0 (-1 = until the end of the context)")
    max_new = context_left if predict < 0 else min(predict, context_left)
    opts = dict(
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=max(top_k, 0), top_p=max(top_p, GREEDY_BELOW) if top_p else 1.0,
        seed=seed if seed is None or seed >= 0 else None, stop=stop, max_new_tokens=max(1, max_new),
    )
    for ours, theirs in (("min_p", "min_p"), ("repetition_penalty", "repeat_penalty"),
                         ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty")):
        v = num(theirs, float, None)
        if v is not None:
            opts[ours] = v
    return opts, ignored


def _refuse_unsupported(body, served: Served) -> str:
    name = served.model(body.model)
    if not body.model:
        raise OllamaError(400, "model is required")
    if name is None:
        raise OllamaError(404, f"model '{body.model}' not found; this server serves: {', '.join(served.names)}")
    if not served.worker.alive:
        raise OllamaError(503, "the engine worker is not running")
    return name


def _grammar(engine, fmt):
    """Ollama's ``format``: ``"json"`` or a JSON schema -> a compiled grammar (None without one); 400 if bad."""
    if fmt in (None, ""):
        return None
    from layerrun.engine.constrained import from_response_format, processor

    if fmt == "json":
        rf = {"type": "json_object"}
    elif isinstance(fmt, dict):
        rf = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    else:
        raise OllamaError(400, 'format: expected "json" or a JSON schema object')
    try:
        g = from_response_format(rf, what="format")
        g.check()
        processor(engine, g)  # a grammar the matcher cannot start is a 400 now, not a failed sequence later
    except (LayerRunError, ValueError, RuntimeError) as e:
        raise OllamaError(400, f"format: {e}") from None
    return g


def _details(served: Served) -> dict:
    m = served.engine.manifest
    q = (m.quantization or {}).get("method")
    params = _parameters(served)
    return {"parent_model": "", "format": "layerrun", "family": m.model_type, "families": [m.model_type],
            "parameter_size": _human_params(params), "quantization_level": (q or m.dtype).upper()}


def _parameters(served: Served) -> int:
    from layerrun.formats.quant import logical_tensors

    m = served.engine.manifest
    total = 0
    for f in m.files:
        shapes = logical_tensors(f.tensors, m.quantization) if m.quantization else {n: t.shape for n, t in f.tensors.items()}
        for shp in shapes.values():
            n = 1
            for d in shp:
                n *= d
            total += n
    return total


def _human_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}".replace(".0", "")
    return str(n)


def _digest(served: Served) -> str:
    return hashlib.sha256((served.engine.path / "layerrun.json").read_bytes()).hexdigest()


def _listed_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class _Gen:
    """One generation through the worker: NDJSON lines, or the one final object."""

    def __init__(self, served: Served, ids: list[int], opts: dict, model: str, chat: bool):
        self.served, self.ids, self.opts, self.model, self.chat = served, ids, opts, model, chat
        self.t0 = time.perf_counter_ns()
        self.ticket, self.q = served.submit(ids, opts, opts["max_new_tokens"])
        self.first_ns: int | None = None
        self.tokens: list[int] = []

    def chunk(self, text: str, done: bool) -> dict:
        d = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            d["message"] = {"role": "assistant", "content": text}
        else:
            d["response"] = text
        d["done"] = done
        return d

    def final(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        end = time.perf_counter_ns()
        first = self.first_ns or end
        d = self.chunk(text, True)
        d.update(done_reason=reason, total_duration=end - self.t0, load_duration=0,
                 prompt_eval_count=prompt_tokens, prompt_eval_duration=first - self.t0,
                 eval_count=completion_tokens, eval_duration=end - first)
        if not self.chat:
            d["context"] = self.ids + self.tokens
        return d

    async def events(self) -> AsyncIterator[tuple[str, str | None, dict | None]]:
        """(text, finish reason, final object) per worker output."""
        while True:
            _, o = await self.q.get()
            if o.error:
                raise OllamaError(500, o.error)
            if self.first_ns is None and (o.token_id is not None or o.finish_reason):
                self.first_ns = time.perf_counter_ns()
            if o.token_id is not None:
                self.tokens.append(o.token_id)
            if o.finish_reason:
                yield o.text, o.finish_reason, self.final("", o.finish_reason, o.prompt_tokens or len(self.ids),
                                                          o.completion_tokens)
                return
            yield o.text, None, None

    def cancel(self) -> None:
        self.served.worker.cancel(self.ticket)

    async def respond(self, stream: bool, request: Request, headers: dict) -> StreamingResponse | JSONResponse:
        if stream:
            async def lines() -> AsyncIterator[str]:
                try:
                    async for text, _, fin in self.events():
                        if fin is not None:
                            if text:
                                yield json.dumps(self.chunk(text, False), ensure_ascii=False) + "\n"
                            yield json.dumps(fin, ensure_ascii=False) + "\n"
                            return
                        if text:
                            yield json.dumps(self.chunk(text, False), ensure_ascii=False) + "\n"
                except OllamaError as e:
                    yield json.dumps({"error": e.message}) + "\n"
                finally:
                    self.cancel()

            async def after() -> None:
                self.cancel()

            return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers,
                                     background=BackgroundTask(after))
        out = await self.collected(request)
        if out is None:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        return JSONResponse(out, headers=headers)

    async def collected(self, request: Request) -> dict | None:
        parts: list[str] = []

        async def gather() -> dict:
            async for text, _, fin in self.events():
                parts.append(text)
                if fin is not None:
                    body = self.chunk("".join(parts), True)
                    return {**fin, **{k: body[k] for k in ("message", "response") if k in body}}
            raise OllamaError(500, "the generation ended without a result")

        async def left() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(left())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            return work.result() if work.done() else None
        finally:
            work.cancel()
            gone.cancel()
            self.cancel()


def register(app, served: Served) -> None:
    """Add Ollama's API and llama-server's tokenize/detokenize to ``app``."""
    from fastapi import Depends

    async def auth(request: Request) -> None:
        if not served.authorized(request):
            raise OllamaError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    r = APIRouter(route_class=_OllamaRoute, dependencies=[Depends(auth)], tags=["Ollama API"])
    engine = served.engine
    created = now_iso()

    async def start(body, ids: list[int], model: str, chat: bool):
        ctx = served.context
        if len(ids) >= ctx:
            raise OllamaError(400, f"the prompt has {len(ids)} tokens; this model's context is {ctx} (and at least "
                                   "one token must be generated)")
        opts, ignored = sampling(body.options, ctx - len(ids))
        grammar = await run_in_threadpool(_grammar, engine, body.format)
        if grammar is not None:
            opts["grammar"] = grammar
        headers = {"X-LayerRun-Ignored-Options": ",".join(ignored)} if ignored else {}
        return _Gen(served, ids, opts, model, chat), headers

    @r.post("/api/generate", summary="Ollama: generate a completion (NDJSON stream by default)")
    async def generate(body: GenerateRequest, request: Request):
        model = _refuse_unsupported(body, served)
        for field in ("suffix", "template"):
            if getattr(body, field):
                raise OllamaError(400, f"{field}: not supported by LayerRun")
        if body.images:
            raise OllamaError(400, "images: this model takes text only")
        if not body.prompt and not body.context:
            done = "unload" if body.keep_alive in (0, "0", "0s") else "load"
            return {"model": model, "created_at": now_iso(), "response": "", "done": True, "done_reason": done}

        def encode() -> list[int]:
            if body.raw or not engine.has_chat_template:
                text = (body.system + "\n\n" if body.system and not body.raw else "") + body.prompt
                return engine.encode_prompt(text, chat=False)
            return engine.encode_prompt(body.prompt, system=body.system) if body.prompt else []

        ids = await run_in_threadpool(encode)
        if body.context:
            try:
                engine.encode_prompt(list(body.context))  # checks the ids against the vocabulary
            except LayerRunError as e:
                raise OllamaError(400, f"context: {e}") from None
            ids = list(body.context) + ids
        gen, headers = await start(body, ids, body.model, chat=False)
        return await gen.respond(body.stream, request, headers)

    @r.post("/api/chat", summary="Ollama: chat (the model's chat template is applied; NDJSON stream by default)")
    async def chat(body: ChatRequest, request: Request):
        _refuse_unsupported(body, served)
        if body.tools:
            raise OllamaError(400, f"registry.ollama.ai/library/{body.model} does not support tools")
        if body.think:
            raise OllamaError(400, f"\"{body.model}\" does not support thinking")
        if any(m.images for m in body.messages):
            raise OllamaError(400, "images: this model takes text only")
        if not body.messages:
            return {"model": body.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        if not engine.has_chat_template:
            raise OllamaError(400, "this model has no chat template; use /api/generate")
        from jinja2.exceptions import TemplateError

        msgs = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        try:
            ids = await run_in_threadpool(engine.encode_prompt, msgs)
        except TemplateError as e:
            raise OllamaError(400, f"messages: the chat template refused them: {e}") from None
        gen, headers = await start(body, ids, body.model, chat=True)
        return await gen.respond(body.stream, request, headers)

    def tag() -> dict:
        return {"size": sum(f.bytes for f in engine.manifest.files), "digest": _digest(served),
                "details": _details(served)}

    @r.get("/api/tags", summary="Ollama: the models this server serves")
    async def tags():
        t = await run_in_threadpool(tag)
        return {"models": [{"name": _listed_name(n), "model": _listed_name(n), "modified_at": created, **t}
                           for n in served.names]}

    @r.get("/api/ps", summary="Ollama: the loaded model and its memory")
    async def ps():
        from layerrun.server.page import memory_parts

        t = await run_in_threadpool(tag)
        mem = memory_parts(engine, served.worker)
        vram = mem["total"] if engine.device.type == "cuda" else 0
        return {"models": [{"name": _listed_name(n), "model": _listed_name(n), "size": mem["total"],
                            "digest": t["digest"], "details": t["details"], "expires_at": FAR_FUTURE,
                            "size_vram": vram, "context_length": served.context} for n in served.names]}

    @r.get("/api/version", summary="Ollama: the API version")
    async def version():
        return {"version": OLLAMA_API_VERSION, "layerrun": __version__}

    @r.post("/api/show", summary="Ollama: a model's details, parameters and template")
    async def show(body: ShowRequest):
        asked = body.model or body.name
        name = served.model(asked)
        if not asked:
            raise OllamaError(400, "model is required")
        if name is None:
            raise OllamaError(404, f"model '{asked}' not found")
        a, m = engine.args, engine.manifest
        arch = m.model_type
        info = {"general.architecture": arch, "general.parameter_count": await run_in_threadpool(_parameters, served),
                f"{arch}.context_length": a.max_position_embeddings, f"{arch}.embedding_length": a.hidden_size,
                f"{arch}.block_count": a.num_hidden_layers, f"{arch}.attention.head_count": a.num_attention_heads,
                f"{arch}.attention.head_count_kv": a.num_key_value_heads, f"{arch}.feed_forward_length": a.intermediate_size,
                f"{arch}.vocab_size": a.vocab_size, "layerrun.mode": engine.mode, "layerrun.path": str(engine.path)}
        template = engine.tokenizer.chat_template if engine.has_chat_template else ""
        params = "\n".join(f"{k:<16}{v}" for k, v in DEFAULTS.items())
        return {"modelfile": f"# served by LayerRun {__version__} from {engine.path}\nFROM {engine.path}\n",
                "parameters": params, "template": template or "", "details": _details(served), "model_info": info,
                "capabilities": ["completion"], "modified_at": created}

    @r.post("/api/pull", summary="Ollama: pull a model into LayerRun's store", include_in_schema=False)
    async def pull(body: PullRequest):
        from layerrun.formats import store

        name = body.model or body.name
        if not name:
            raise OllamaError(400, "model is required")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def log(line: str) -> None:
            loop.call_soon_threadsafe(q.put_nowait, {"status": line})

        def work() -> None:
            try:
                folder = store.pull(name.removesuffix(":latest"), progress=False, log=log)
                msg = {"status": "success", "path": str(folder)}
            except LayerRunError as e:
                msg = {"error": str(e)}
            loop.call_soon_threadsafe(q.put_nowait, msg)
            loop.call_soon_threadsafe(q.put_nowait, None)

        threading.Thread(target=work, name="layerrun-pull", daemon=True).start()
        if not body.stream:
            last: dict = {}
            while (m := await q.get()) is not None:
                last = m
            return _error(400, last["error"]) if "error" in last else last

        async def lines() -> AsyncIterator[str]:
            yield json.dumps({"status": "pulling manifest"}) + "\n"
            while (m := await q.get()) is not None:
                yield json.dumps(m) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @r.post("/tokenize", summary="llama-server: text to token ids", tags=["llama-server"])
    async def tokenize(body: TokenizeRequest):
        tok = engine.tokenizer
        ids = await run_in_threadpool(tok.encode, body.content, body.add_special)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.decode([i], skip_special_tokens=False)} for i in ids]}
        return {"tokens": ids}

    @r.post("/detokenize", summary="llama-server: token ids to text", tags=["llama-server"])
    async def detokenize(body: DetokenizeRequest):
        vocab = engine.args.vocab_size
        bad = [i for i in body.tokens if not 0 <= i < vocab]
        if bad:
            raise OllamaError(400, f"tokens: {bad[0]} is not a token id (the vocabulary has {vocab})")
        return {"content": await run_in_threadpool(engine.tokenizer.decode, body.tokens, False)}

    app.include_router(r)
