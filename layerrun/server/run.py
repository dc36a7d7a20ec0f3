"""Running the server: blocking (``layerrun serve``) or in a background thread (tests, notebooks)."""

from __future__ import annotations

import ipaddress
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from layerrun.errors import LayerRunError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
STARTUP_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish on Ctrl-C
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: a request body larger than this gets 413
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable from other machines."""
    if is_loopback(host):
        return None
    tail = "" if api_key else "; without --api-key anyone who can reach it can use it"
    return f"warning: binding {host}: the server is reachable beyond this machine{tail}"


def check_cors_origins(origins) -> list[str]:
    """``--cors-origin`` values as browsers send ``Origin`` (``scheme://host[:port]``, lower case), or ``*``."""
    out = []
    for origin in [origins] if isinstance(origins, str) else origins or []:
        o = origin.strip().lower().removesuffix("/")
        if o != "*" and not _ORIGIN.fullmatch(o):
            raise LayerRunError(f"--cors-origin: {origin!r} is not an origin (examples: http://localhost:3000, "
                                "https://app.example.com, or * for any)")
        out.append(o)
    return out


def cors_warning(origins, api_key: str | None) -> str | None:
    """A warning when any web page may call the server."""
    if "*" not in (origins or []) or api_key:
        return None
    return ("warning: --cors-origin *: any web page open in a browser that can reach the server can use it; "
            "name the origins, or set --api-key")


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def allowed_hosts_for(host: str, extra=None) -> list[str] | None:
    """The ``Host`` header names the server answers to, or None for any.

    Bound to loopback, only loopback names (plus ``extra``, e.g. ``--allowed-host``): a web page
    that re-binds its own domain to 127.0.0.1 (DNS rebinding) then sends its own name in ``Host``
    and is refused, so it cannot use a local server it could otherwise reach as same-origin.
    Bound beyond loopback, the names this machine is reached by are unknown: any, unless given.
    """
    extra = [h.strip().lower().strip("[]") for h in (extra or []) if h.strip()]
    if "*" in extra:
        return None
    if is_loopback(host):
        return list(LOOPBACK_NAMES) + [h for h in extra if h not in LOOPBACK_NAMES]
    return extra or None


def _config(app, host: str, port: int, log_level: str):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def serve(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info", **app_options) -> None:
    """Serve ``engine`` until interrupted (Ctrl-C). ``app_options`` go to :func:`create_app`."""
    import uvicorn

    from layerrun.server.app import create_app

    key = app_options.get("api_key")
    for warning in (exposure_warning(host, key), cors_warning(check_cors_origins(app_options.get("cors_origins")), key)):
        if warning:
            print(warning, file=sys.stderr)
    app_options.setdefault("allowed_hosts", allowed_hosts_for(host))
    app = create_app(engine, **app_options)
    uvicorn.Server(_config(app, host, port, log_level)).run()


@dataclass
class RunningServer:
    app: object
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return self.url + "/v1"


@contextmanager
def running_server(engine, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                   **app_options) -> Iterator[RunningServer]:
    """Run the server in a background thread for the ``with`` block; ``port=0`` picks a free port.

    >>> with running_server(engine) as s:
    ...     OpenAI(base_url=s.base_url, api_key="-").completions.create(model=..., prompt="Hi")
    """
    import uvicorn

    from layerrun.server.app import create_app

    app_options.setdefault("allowed_hosts", allowed_hosts_for(host))
    app = create_app(engine, **app_options)
    server = uvicorn.Server(_config(app, host, port, log_level))
    thread = threading.Thread(target=server.run, name="layerrun-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise LayerRunError(f"the server did not start on {host}:{port} (see the log above)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(app, host, bound)
    finally:
        server.should_exit = True
        thread.join(STARTUP_TIMEOUT_S)
