"""Everything the server offers beside the OpenAI API, registered on the app in one call.

``register_extras(app, api_key)`` adds: Ollama's API (:mod:`layerrun.server.ollama`),
embeddings (:mod:`layerrun.server.embeddings`), llama-server's ``/tokenize`` and
``/detokenize``, and the page at ``/`` with its live view of the engine
(:mod:`layerrun.server.page`). They use what ``create_app`` put on
``app.state`` (engine, worker, metrics, model names).
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import Request

from layerrun.server.common import GREEDY_BELOW  # noqa: F401 - re-exported for the API modules


@dataclass
class Served:
    """The served engine and its worker, as the extra routes see them."""

    app: object
    api_key: str | None

    @property
    def engine(self):
        return self.app.state.engine

    @property
    def worker(self):
        return self.app.state.worker

    @property
    def metrics(self):
        return self.app.state.metrics

    @property
    def names(self) -> list[str]:
        return self.app.state.model_names

    @property
    def context(self) -> int:
        e = self.engine
        return min(e.context, e.args.max_position_embeddings)

    def model(self, name: str | None) -> str | None:
        """The served name ``name`` refers to (``:latest`` and a missing name mean the served model), else None."""
        if not name:
            return self.names[0]
        for n in self.names:
            if name in (n, f"{n}:latest") or name.removesuffix(":latest") == n:
                return n
        return None

    def authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def submit(self, ids: list[int], options: dict, max_new: int) -> tuple[object, asyncio.Queue]:
        """Queue one sequence through the OpenAI routes' backend (context, 429 and worker checks);
        refusals are :class:`~layerrun.server.common.APIError`."""
        tickets, q = self.app.state.backend.start([ids], 1, lambda j: dict(options), max_new, "prompt")
        return tickets[0], q


def register_extras(app, api_key: str | None = None) -> None:
    """Add the Ollama API, embeddings, tokenize/detokenize and the page (see the module docstring)."""
    from layerrun.server import embeddings, ollama, page

    served = Served(app, api_key)
    ollama.register(app, served)
    embeddings.register(app, served)
    page.register(app, served)
