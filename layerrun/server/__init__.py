"""A local OpenAI-compatible HTTP server: ``layerrun serve [MODEL]``.

``create_app(engine)`` builds the ASGI app; ``serve(engine, host, port)`` runs
it until Ctrl-C; ``running_server(engine)`` runs it in a background thread for
a ``with`` block. FastAPI and uvicorn are imported only when a server starts,
so the rest of the CLI does not need them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from layerrun.errors import LayerRunError
from layerrun.server.run import DEFAULT_HOST, DEFAULT_MAX_BODY, DEFAULT_PORT, allowed_hosts_for, check_cors_origins
from layerrun.server.worker import DEFAULT_MAX_WAITING

API_KEY_ENV = "LAYERRUN_API_KEY"

__all__ = ["add_serve_parser", "create_app", "running_server", "serve"]


def create_app(engine, **options):
    """The FastAPI app serving ``engine``; see :func:`layerrun.server.app.create_app`."""
    from layerrun.server.app import create_app as _create_app

    return _create_app(engine, **options)


def serve(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options) -> None:
    """Serve ``engine`` on ``host:port`` until interrupted; see :func:`layerrun.server.run.serve`."""
    from layerrun.server.run import serve as _serve

    _serve(engine, host=host, port=port, **options)


def running_server(engine, **options):
    """Context manager: the server in a background thread; see :func:`layerrun.server.run.running_server`."""
    from layerrun.server.run import running_server as _running

    return _running(engine, **options)


def _require_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LayerRunError(f"the server needs fastapi and uvicorn ({e.name} is missing): pip install fastapi uvicorn") from None


def _resolve_model(model: str | None) -> tuple[str, str]:
    """(what to load, the name clients use): a folder's name, a store name as given, or the default model."""
    if model is None:
        try:
            from layerrun.formats.store import DEFAULT_MODEL, ensure_default
        except ImportError:
            raise LayerRunError("usage: layerrun serve MODEL (a model folder or a local model name)") from None
        ensure_default(log=lambda s: print(s, file=sys.stderr))
        return DEFAULT_MODEL, DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":  # converted into the store once; served by its store name
        from layerrun.formats.store import ensure_gguf, stored

        folder = ensure_gguf(p, log=lambda s: print(s, file=sys.stderr))
        return str(folder), next((m.name for m in stored() if m.folder == folder), folder.name)
    return model, (p.resolve().name if p.exists() else model)


def cmd_serve(a) -> int:
    import layerrun
    from layerrun.io.throttle import parse_size
    from layerrun.options import engine_options

    _require_server_packages()
    if not 0 <= a.port <= 65535:
        raise LayerRunError(f"--port must be in 0..65535, got {a.port}")
    if a.max_waiting < 0:
        raise LayerRunError(f"--max-waiting must be >= 0, got {a.max_waiting}")
    max_body = parse_size(a.max_body, "--max-body")
    if max_body < 1:
        raise LayerRunError(f"--max-body must be at least 1 byte, got {a.max_body!r}")
    cors_origins = check_cors_origins(a.cors_origin)
    model, name = _resolve_model(a.model)
    names = a.served_model_name or [name]
    api_key = a.api_key or os.environ.get(API_KEY_ENV) or None
    with layerrun.load(model, **engine_options(a), progress=True) as engine:
        print("\n".join(engine.explain_lines), file=sys.stderr)
        host = f"[{a.host}]" if ":" in a.host else a.host
        print(f"serving {names[0]} ({engine.mode}, batch size {engine.batch_size}, up to {a.max_waiting} waiting) "
              f"at http://{host}:{a.port}/v1{' (API key required)' if api_key else ''}; Ollama's API at /api, "
              f"a page with a chat and the engine's live view at http://{host}:{a.port}/", file=sys.stderr)
        try:
            serve(engine, host=a.host, port=a.port, log_level=a.log_level, model_name=names,
                  batch_size=engine.batch_size, max_waiting=a.max_waiting, api_key=api_key, max_body=max_body,
                  cors_origins=cors_origins, allowed_hosts=allowed_hosts_for(a.host, a.allowed_host))
        except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: the normal way out
            pass
    print("server stopped", file=sys.stderr)
    return 0


def add_serve_parser(subparsers) -> None:
    """Register ``layerrun serve`` on the CLI's subparsers."""
    from layerrun.options import add_engine_flags, add_stage_flags

    c = subparsers.add_parser("serve", help="serve a model over OpenAI's and Ollama's HTTP APIs, with a page at /")
    c.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model folder or local model name (default: the default model)")
    c.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it)")
    c.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    c.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    c.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="sequences queued beyond --batch-size before requests get 429")
    c.add_argument("--max-body", default=str(DEFAULT_MAX_BODY), metavar="SIZE",
                   help="largest request body, e.g. 4MiB; larger ones get 413 (default 1MiB)")
    c.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or * for any) call the API "
                        "(repeatable; default: no CORS headers)")
    c.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; * for any). Bound to loopback, "
                        "only localhost / 127.0.0.1 / ::1 are answered by default, against DNS rebinding")
    c.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="the name clients use as `model` (repeatable; default: the folder or store name)")
    c.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (info logs every request)")
    add_engine_flags(c)
    add_stage_flags(c)
    c.set_defaults(fn=cmd_serve)
