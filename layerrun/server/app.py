"""The OpenAI-compatible HTTP API (FastAPI) in front of one engine.

Requests are checked and tokenized on the event loop's thread pool, then
queued to the :class:`~layerrun.server.worker.Worker`, which batches every
live sequence through each layer load. Responses are JSON or Server-Sent
Events. Every refusal is an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}`` naming the field.

Middleware, outermost first: CORS (only with ``cors_origins``, so that
preflights need no API key and refusals carry the CORS headers), the API key
check, then the request-body limit (413).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerrun import __version__
from layerrun.errors import LayerRunError
from layerrun.io.throttle import parse_size
from layerrun.server.metrics import CONTENT_TYPE, ServerMetrics
from layerrun.server.run import DEFAULT_MAX_BODY, check_cors_origins
from layerrun.server.schemas import DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from layerrun.server.worker import DEFAULT_MAX_WAITING, Output, Ticket, Worker

GREEDY_BELOW = 1e-5
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")
# What a field takes, for fields whose type is a union (pydantic would only name the member it tried first).
_EXPECTED = {
    "prompt": "a string, a list of token ids, or a list of strings or of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
    "tool_choice": "a string or an object",
}


class APIError(Exception):
    """A refusal, sent as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _AsciiJSON(self.body(), status_code=self.status, headers=self.headers)


class _AsciiJSON(JSONResponse):
    """Error bodies may quote the request (a model name, a template's message), which may hold lone surrogates."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def create_app(
    engine,
    model_name: str | list[str] | None = None,
    batch_size: int | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    api_key: str | None = None,
    max_body: int | str | None = DEFAULT_MAX_BODY,
    cors_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The ASGI app serving ``engine``.

    ``model_name``: the name(s) requests may use in ``model`` (the first is the
    one ``GET /v1/models`` reports first; default: the model folder's name).
    ``batch_size``: most sequences per step (default: the engine's). Up to
    ``max_waiting`` more wait for a place; beyond that requests get 429.
    ``api_key``: when set, ``/v1/*`` requires ``Authorization: Bearer <key>``.
    ``max_body``: largest request body in bytes (or a size such as ``"4MiB"``);
    larger ones get 413, counted as they arrive (``None``: no limit).
    ``cors_origins``: origins (``scheme://host[:port]``, or ``"*"``) whose web
    pages may call the API; default none (no CORS headers).
    ``allowed_hosts``: host names the ``Host`` header may carry (others get 400,
    a guard against DNS rebinding); None: any. :func:`~layerrun.server.serve`
    and ``running_server`` pass the loopback names when bound to loopback.
    """
    names = [model_name] if isinstance(model_name, str) else list(model_name or [engine.path.name])
    batch_size = int(batch_size or engine.batch_size)
    if batch_size < 1:
        raise LayerRunError(f"--batch-size must be >= 1, got {batch_size}")
    if max_waiting < 0:
        raise LayerRunError(f"--max-waiting must be >= 0, got {max_waiting}")
    if max_body is not None:
        max_body = parse_size(max_body, "--max-body")
        if max_body < 1:
            raise LayerRunError(f"--max-body must be at least 1 byte, got {max_body}")
    cors_origins = check_cors_origins(cors_origins)
    if engine.has_tokenizer:
        engine.tokenizer  # noqa: B018 - load it now, not concurrently from two request threads
    metrics = ServerMetrics(engine, batch_size, max_waiting)
    worker = Worker(engine, batch_size, max_waiting, metrics)
    context = min(engine.context, engine.args.max_position_embeddings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="LayerRun", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of a LayerRun engine (continuous batching).")
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics
    app.state.model_names = names
    # add_middleware puts each one outside those added before it
    if max_body is not None:
        app.add_middleware(_BodyLimit, limit=max_body, on_refuse=lambda: metrics.rejected.inc(reason="body_too_large"))
    if api_key:
        app.add_middleware(_KeyCheck, key=api_key)
    if cors_origins:
        _add_cors(app, cors_origins)
    if allowed_hosts is not None:  # outermost: a request for another host is refused before anything else
        app.add_middleware(_HostCheck, allowed=allowed_hosts, on_refuse=lambda: metrics.rejected.inc(reason="host"))
    base_openapi = app.openapi

    def openapi() -> dict:
        # Tell clients (and fuzzers) which model names are served; any other gets 404, not a validation error.
        schema = base_openapi()
        for req in ("CompletionRequest", "ChatCompletionRequest"):
            prop = schema.get("components", {}).get("schemas", {}).get(req, {}).get("properties", {}).get("model")
            if prop is not None:
                prop["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}]
        return schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, msg, type=kind, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").response()

    # ---- plain endpoints ------------------------------------------------------
    async def file_problems() -> dict[str, str]:
        """Model files found changed on disk, checked again now (off the loop: it may hash a file)."""
        if not engine.file_problems():
            return {}
        return await run_in_threadpool(engine.recheck_files)

    @app.get("/health", summary="200 while the engine worker runs and the model files are intact")
    async def health():
        if not worker.alive:
            raise APIError(503, "the engine worker is not running", type="service_unavailable")
        problems = await file_problems()
        if problems:
            return JSONResponse({"status": "model_file_changed", "files": problems,
                                 "message": " ".join(problems.values())}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "layerrun", "max_model_len": context,
                "root": str(engine.path), "mode": engine.mode}

    @app.get("/v1/models", summary="The served model")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model}", summary="One served model")
    async def get_model(model: str):
        _check_model(model, names)
        return model_card(model)

    # ---- generation ---------------------------------------------------------------
    def sampling_options(body, j: int) -> dict:
        seed = body.seed
        if seed is not None and j:  # n > 1 with a seed: distinct, reproducible choices
            seed = (seed + j) % 2**63
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        temperature = 1.0 if body.temperature is None else body.temperature
        return dict(
            # as vLLM: below 1e-5 is greedy (logits / 1e-300 overflow to inf, and sampling would fail)
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            # a top_p that rounds to 0 in float32 would drop every token (the sampler keeps none)
            top_p=1.0 if body.top_p is None else max(body.top_p, GREEDY_BELOW),
            top_k=top_k, seed=seed, ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        )

    def check(body) -> None:
        _check_model(body.model, names)
        field = body.unsupported()
        if field:
            raise APIError(400, f"{field}: not supported by this server (LayerRun)", param=field, code="unsupported_parameter")
        if not worker.alive:
            raise APIError(503, "the engine worker is not running", type="service_unavailable")

    async def check_files() -> None:
        problems = await file_problems()
        if problems:
            raise APIError(503, " ".join(problems.values()) + " (checked again on every request)",
                           type="service_unavailable", code="model_file_changed", headers={"Retry-After": "5"})

    async def start(body, prompts: list[list[int]], max_tokens: int | None, param: str) -> tuple[list[Ticket], asyncio.Queue]:
        await check_files()
        for ids in prompts:
            if not ids:
                raise APIError(400, f"{param}: the prompt is empty", param=param)
            if len(ids) >= context:
                raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this model's context is {context} "
                                    "(and at least one token must be generated)", param=param,
                               code="context_length_exceeded")
        k = len(prompts) * body.n
        if k > batch_size + max_waiting:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} is {k} sequences; this server takes at most "
                                f"{batch_size + max_waiting} at once (--batch-size + --max-waiting)", param="n")
        if worker.room() < k:
            metrics.rejected.inc(reason="queue_full")
            waiting = max(worker.active - batch_size, 0)
            raise APIError(429, f"the server is at capacity: {min(worker.active, batch_size)} sequences running and "
                                f"{waiting} waiting (--batch-size {batch_size}, --max-waiting {max_waiting}); "
                                "retry later", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        q: asyncio.Queue = asyncio.Queue()
        tickets = []
        for i, ids in enumerate(prompts):
            for j in range(body.n):
                opts = sampling_options(body, j)
                opts["max_new_tokens"] = min(max_tokens or context, context - len(ids))
                try:  # its KV cache could never fit the memory budget, even with every layer streamed
                    engine.check_memory(len(ids), opts["max_new_tokens"])
                except LayerRunError as e:
                    raise APIError(400, str(e), param="max_tokens", code="insufficient_memory") from None
                tickets.append(Ticket(ids, opts, q, index=i * body.n + j))
        worker.submit(tickets)
        return tickets, q

    @app.post("/v1/completions", summary="Text completion (no chat template)")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        prompts = await run_in_threadpool(_encode_completion_prompts, engine, body.prompt)
        tickets, q = await start(body, prompts, body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        rid, model = f"cmpl-{uuid.uuid4().hex}", body.model or names[0]

        def choice(index: int, text: str, finish: str | None, ids: list[int] | None) -> dict:
            c = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            if ids is not None:
                c["token_ids"] = ids
            return c

        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return _sse(worker, tickets, q, head, lambda i, o: choice(i, o.text, o.finish_reason, _ids(body, o)),
                        None, body, prompt_tokens)
        outs = await _collect(request, worker, tickets, q)
        if outs is None:
            return Response(status_code=499)
        choices = [choice(i, text, fin, ids if body.return_token_ids else None) for i, (text, ids, fin, _) in outs.items()]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, outs)}

    @app.post("/v1/chat/completions", summary="Chat completion (the model's chat template is applied)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check(body)
        messages = [m.as_dict() for m in body.messages]
        ids = await run_in_threadpool(_encode_chat, engine, messages)
        tickets, q = await start(body, [ids], body.max_completion_tokens or body.max_tokens, "messages")
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", body.model or names[0]
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
        if body.stream:
            def chunk_choice(i: int, o: Output) -> dict:
                delta = {"content": o.text} if o.text or not o.finish_reason else {}
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": o.finish_reason}
                if body.return_token_ids:
                    c["token_ids"] = _ids(body, o)
                return c

            first = [{"index": t.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for t in tickets]
            return _sse(worker, tickets, q, {**head, "object": "chat.completion.chunk"}, chunk_choice, first, body, len(ids))
        outs = await _collect(request, worker, tickets, q)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for i, (text, tids, fin, _) in outs.items():
            c = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": fin}
            if body.return_token_ids:
                c["token_ids"] = tids
            choices.append(c)
        return {**head, "choices": choices, "usage": _usage(len(ids), outs)}

    return app


# ---- helpers ------------------------------------------------------------------------
class _KeyCheck:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer <key>`` (health and metrics stay open, as in vLLM)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _HostCheck:
    """ASGI middleware: the ``Host`` header must name one of ``allowed`` (port ignored), else 400.

    A page that re-binds its own domain to 127.0.0.1 (DNS rebinding) reaches a loopback server
    as same-origin, but its requests still say ``Host: its-domain``. A request with no Host header
    (HTTP/1.0) passes: browsers always send one.
    """

    def __init__(self, app, allowed: list[str], on_refuse=None):
        self.app, self.allowed, self.on_refuse = app, {h.lower() for h in allowed}, on_refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(b"host")
            if raw is not None and _host_name(raw.decode("latin-1")) not in self.allowed:
                if self.on_refuse:
                    self.on_refuse()
                err = APIError(400, f"this server does not answer to Host {raw.decode('latin-1')!r}; allowed: "
                                    f"{', '.join(sorted(self.allowed))} (layerrun serve --allowed-host NAME)",
                               code="invalid_host")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """``Host`` header value -> lower-case name without the port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 and never reaches the app.

    A Content-Length over the limit is refused before any of the body is read.
    Otherwise the body is read here, counting bytes as they arrive, so that a
    chunked upload (no Content-Length) is cut off as soon as it passes the
    limit: at most ``limit`` bytes are ever kept. The app then gets the body
    in one message. After a 413 the HTTP server (uvicorn) discards the rest of
    the upload, so the client, which sends its whole body before reading,
    still reads the 413, and the connection stays usable.
    """

    def __init__(self, app, limit: int, on_refuse=None):
        self.app, self.limit, self.on_refuse = app, limit, on_refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b""))
        except ValueError:
            declared = None  # absent (chunked, or no body); a malformed one never gets past the HTTP server
        if declared is not None and declared > self.limit:
            # Expecting "100 Continue", the client has sent none of the body: close rather than read it as a request.
            close = headers.get(b"expect", b"").lower() == b"100-continue"
            await self._refuse(scope, receive, send, close)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left mid-upload: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, False)
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal pending
            if pending is None:
                return await receive()  # what comes after the body: http.disconnect
            message, pending = pending, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, close: bool) -> None:
        if self.on_refuse:
            self.on_refuse()
        err = APIError(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                            "(layerrun serve --max-body)", code="request_too_large",
                       headers={"Connection": "close"} if close else None)
        await err.response()(scope, receive, send)


def _add_cors(app: FastAPI, origins: list[str]) -> None:
    from starlette.middleware.cors import CORSMiddleware

    options = dict(
        allow_origins=origins, allow_methods=["GET", "POST"],
        allow_headers=["*"],  # mirrors what a preflight asks for, Authorization included (a bare * would not cover it)
        expose_headers=["Retry-After"],  # sent with 429; the openai clients read it
        allow_credentials=False,  # the API key is a header, not a cookie: no credentialed requests needed
    )
    # Newer Starlette refuses a preflight asking for private-network access (a public page calling this machine)
    # unless told; the operator named these origins, so allow it. Older versions ignore that header anyway.
    if "allow_private_network" in inspect.signature(CORSMiddleware.__init__).parameters:
        options["allow_private_network"] = True
    app.add_middleware(CORSMiddleware, **options)


def _check_model(model: str | None, names: list[str]) -> None:
    # As vLLM: a name other than a served one is 404 model_not_found; leaving it out means the served model.
    if model is not None and model not in names:
        raise APIError(404, f"the model `{model}` does not exist; this server serves: {', '.join(names)}",
                       param="model", code="model_not_found")


def _validation_error(errors) -> APIError:
    """One 400 naming the first offending field (pydantic's error list, cleaned up)."""
    errors = list(errors)
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}",
                        code="invalid_json")
    path, union = [], False
    for part in e.get("loc", ())[1:] if e.get("loc", ("",))[0] == "body" else e.get("loc", ()):
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            union = True  # pydantic names the union member it tried; the user did not write that
            break
        path.append(str(part))
    param = ".".join(path) or None
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    if union and path and path[-1] in _EXPECTED:
        msg = f"expected {_EXPECTED[path[-1]]}"
    if not path:
        msg = f"the request body: {msg}"
        if e.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object"
    else:
        msg = f"{param}: {msg}"
    more = len({tuple(x.get("loc", ())[:2]) for x in errors}) - 1
    if more > 0:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return APIError(400, msg, param=param, code="invalid_value" if path else "invalid_request")


def _encode_completion_prompts(engine, prompt) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) or prompt == []:
        prompt = [prompt]
    out = []
    for p in prompt:
        try:
            out.append(engine.encode_prompt(p, chat=False) if isinstance(p, str) else engine.encode_prompt(list(p)))
        except LayerRunError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
    return out


def _encode_chat(engine, messages: list[dict]) -> list[int]:
    from jinja2.exceptions import TemplateError

    if not engine.has_chat_template:
        raise APIError(400, "messages: this model has no chat template; use /v1/completions with a plain prompt",
                       param="messages")
    try:
        return engine.encode_prompt(messages)
    except (LayerRunError, TemplateError) as e:
        raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None


def _ids(body, o: Output) -> list[int] | None:
    if not body.return_token_ids:
        return None
    return [] if o.token_id is None else [o.token_id]


def _usage(prompt_tokens: int, outs: dict) -> dict:
    completion = sum(n for *_, n in outs.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _next(q: asyncio.Queue) -> tuple[int, Output]:
    i, o = await q.get()
    if o.error:
        kind = "invalid_request_error" if o.error_status < 500 else "server_error" if o.error_code else "internal_error"
        raise APIError(o.error_status, o.error, type=kind, code=o.error_code)
    return i, o


async def _collect(request: Request, worker: Worker, tickets: list[Ticket], q: asyncio.Queue):
    """Every choice's (text, token ids, finish reason, completion tokens), or None if the client left."""

    async def gather() -> dict:
        acc = {t.index: ([], [], None, 0) for t in tickets}
        left = len(tickets)
        while left:
            i, o = await _next(q)
            text, ids, _, _ = acc[i]
            text.append(o.text)
            if o.token_id is not None:
                ids.append(o.token_id)
            if o.finish_reason:
                acc[i] = (text, ids, o.finish_reason, o.completion_tokens)
                left -= 1
        return {i: ("".join(t), ids, fin, n) for i, (t, ids, fin, n) in sorted(acc.items())}

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        return None
    finally:
        for task in (work, gone):
            task.cancel()
        for t in tickets:
            worker.cancel(t)  # a no-op for finished ones


def _sse(worker: Worker, tickets: list[Ticket], q: asyncio.Queue, head: dict, make_choice, first: list | None,
         body, prompt_tokens: int) -> StreamingResponse:
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def stream() -> AsyncIterator[str]:
        left, completion = len(tickets), 0
        try:
            if first:
                yield event({**head, "choices": first})
            while left:
                try:
                    i, o = await _next(q)
                except APIError as e:
                    yield event(e.body())
                    break
                if o.finish_reason:
                    left -= 1
                    completion += o.completion_tokens
                elif not o.text and not body.return_token_ids:
                    continue  # nothing to show yet (incomplete UTF-8, or text held back for a stop string)
                yield event({**head, "choices": [make_choice(i, o)]})
            if body.stream_options and body.stream_options.include_usage and not left:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                yield event({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            cancel_all()

    def cancel_all() -> None:
        for t in tickets:
            worker.cancel(t)

    async def after() -> None:  # on the event loop (a sync task would run in a thread), also when the client
        cancel_all()  # left before the stream began, so that the generator's finally never ran

    return StreamingResponse(stream(), media_type="text/event-stream", background=BackgroundTask(after),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
