"""The OpenAI-compatible HTTP API (FastAPI) in front of one engine.

Requests are checked and tokenized on the event loop's thread pool, then
queued to the :class:`~layerrun.server.worker.Worker`, which batches every
live sequence through each layer load. Responses are JSON or Server-Sent
Events. Every refusal is an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}`` naming the field.

This module builds the app (middleware, errors, health, metrics, models); the
generation routes are in ``openai_api.py``, on the shared
:class:`~layerrun.server.common.Backend` (``app.state.backend``).

Middleware, outermost first: CORS (only with ``cors_origins``, so that
preflights need no API key and refusals carry the CORS headers), the API key
check, then the request-body limit (413).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerrun import __version__
from layerrun.errors import FileChangedError, FormatError, LayerRunError
from layerrun.io.throttle import parse_size
from layerrun.server.common import APIError, Backend
from layerrun.server.extras import register_extras
from layerrun.server.metrics import CONTENT_TYPE, ServerMetrics
from layerrun.server.openai_api import add_openai_routes
from layerrun.server.run import DEFAULT_MAX_BODY, check_cors_origins
from layerrun.server.worker import DEFAULT_MAX_WAITING, Worker

_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")
# What a field takes, for fields whose type is a union (pydantic would only name the member it tried first).
_EXPECTED = {
    "prompt": "a string, a list of token ids, or a list of strings or of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
    "tool_choice": "a string or an object",
}


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
    metrics = ServerMetrics(engine, batch_size, max_waiting, names[0])
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
    backend = Backend(engine, worker, metrics, batch_size, max_waiting, context, names)
    app.state.engine, app.state.worker, app.state.metrics, app.state.backend = engine, worker, metrics, backend
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

    @app.exception_handler(FormatError)
    async def _file_error(request: Request, e: FormatError):  # a model file damaged or changed on disk (it names it)
        code = "model_file_changed" if isinstance(e, FileChangedError) else "model_file_error"
        return APIError(500, str(e), type="server_error", code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").response()

    # ---- plain endpoints ------------------------------------------------------
    @app.get("/health", summary="200 while the engine worker runs and the model files are intact")
    async def health():
        backend.check_alive()  # 503: the worker stopped, or (torchrun) a stage is gone, naming it
        problems = await backend.file_problems()
        if problems:
            return JSONResponse({"status": "model_file_changed", "files": problems,
                                 "message": " ".join(problems.values())}, status_code=503)
        stage = getattr(engine, "stage", None)
        return {"status": "ok"} if stage is None else {"status": "ok", "stages": stage.world}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        stage = getattr(engine, "stage", None)
        extra = stage.prometheus() if stage is not None else ""
        return PlainTextResponse(metrics.render() + extra, media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "layerrun", "max_model_len": context,
                "root": str(engine.path), "mode": engine.mode}

    @app.get("/v1/models", summary="The served model")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model}", summary="One served model")
    async def get_model(model: str):
        backend.check_model(model)
        return model_card(model)

    # ---- generation -----------------------------------------------------------------
    add_openai_routes(app, backend)

    register_extras(app, api_key=api_key)  # Ollama API, embeddings, tokenize, the page at / (server/extras.py)
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
