"""The page at ``/``: chat with the model, and watch the engine live.

Static files (``layerrun/server/static``: one HTML, one script, one stylesheet;
no build step, nothing from a CDN, so it works on an offline machine) and one
Server-Sent Events stream, ``GET /live/events``, sent with sse-starlette
(keep-alive pings every 15 s). Every half second it carries the pipeline events
recorded since the last message (reads per ring slot, host -> device copies,
computes and stalls per layer, from the engine's bounded ring of recent trace
events), memory by part (embeddings and head, resident layers, the staging
ring, the KV cache), the mode and the governor's reasoning, and tokens/s.

``/docs`` is served from the same machine too: FastAPI's default page loads
Swagger UI from a CDN and stays blank offline; the assets come from the
``fastapi-offline`` package instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch
from fastapi.responses import FileResponse, HTMLResponse

from layerrun.server.extras import Served

STATIC = Path(__file__).parent / "static"
RECENT_EVENTS = 8192  # trace events kept for the live view (a few steps of an 80-layer model)
INTERVAL_S = 0.5
PING_S = 15


def _nbytes(weights) -> int:
    total = 0
    for t in (weights or {}).values():
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        else:
            total += int(getattr(t, "nbytes", 0) or 0)  # QuantizedWeight
    return total


def memory_parts(engine, worker=None) -> dict:
    """Bytes held now, by part: embeddings + head, resident layers, the staging ring, the KV cache."""
    resident = sum(_nbytes(w) for w in getattr(engine, "_resident", {}).values())
    resident += sum(_nbytes(w) for w in getattr(engine, "_dense", {}).values())
    ring = 0
    stream = getattr(engine, "_stream", None)
    if stream is not None:
        ring = sum(s.numel() for s in getattr(stream, "slots", []))
        ring += sum(s.numel() for s in getattr(stream, "dev_slots", []) or [])
    kv = 0
    bg = getattr(worker, "bg", None)
    if bg is not None:
        kv = sum(getattr(layer, "nbytes", 0) for layer in bg.cache.layers)
    parts = {"embeddings_head": _nbytes(engine.embeddings) + _nbytes(engine.final), "resident_layers": resident,
             "ring": ring, "kv_cache": kv}
    parts["total"] = sum(parts.values())
    return parts


def snapshot(served: Served, since: int, last: dict) -> dict:
    """One live message: events after ``since``, memory, plan, throughput since the previous message."""
    eng, m = served.engine, served.metrics
    events = eng.trace.since(since)
    now = time.perf_counter()
    tokens = m.generation_tokens.get()
    dt_s = now - last.get("t", now)
    tok_s = (tokens - last.get("tokens", tokens)) / dt_s if dt_s > 0 else 0.0
    last.update(t=now, tokens=tokens)
    plan = eng.plan
    return {
        "now": now - eng.trace.origin,
        "events": [list(e) for e in events],
        "memory": memory_parts(eng, served.worker),
        "mode": eng.mode,
        "plan": list(plan.lines),
        "layers": eng.args.num_hidden_layers,
        "resident": len(plan.resident),
        "streamed": len(plan.streamed),
        "prefetch": plan.prefetch,
        "slots": plan.prefetch + 1 if plan.streamed else 0,
        "device": str(eng.device),
        "reader": eng.reader_backend,
        "dtype": str(eng.dtype).replace("torch.", ""),
        "tok_s": round(tok_s, 3),
        "running": m.running.get(),
        "waiting": m.waiting.get(),
        "model": served.names[0],
    }


def register(app, served: Served) -> None:
    """``/``, its static files, ``/live/events`` and CDN-free ``/docs``."""
    from sse_starlette.sse import EventSourceResponse

    served.engine.trace.keep_recent(RECENT_EVENTS)
    _offline_docs(app)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()}:  # only the files shipped there, by exact name
            return HTMLResponse("not found", status_code=404)
        return FileResponse(path)

    @app.get("/live/events", include_in_schema=False)  # an endless stream: nothing for a schema-driven client
    async def live():
        async def stream():
            since, last = 0, {}
            while True:
                msg = snapshot(served, since, last)
                if msg["events"]:
                    since = msg["events"][-1][0]
                yield {"event": "live", "data": json.dumps(msg, separators=(",", ":"))}
                await asyncio.sleep(INTERVAL_S)

        return EventSourceResponse(stream(), ping=PING_S, headers={"Cache-Control": "no-cache"})


def _offline_docs(app) -> None:
    """Replace FastAPI's CDN-based /docs and /redoc with pages whose assets this server serves."""
    try:
        import fastapi_offline
    except ImportError:
        fastapi_offline = None
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/docs", "/redoc")]
    if fastapi_offline is None:
        return  # without the assets there is no /docs page; /openapi.json stays
    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")
