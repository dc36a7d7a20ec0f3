"""Embeddings: ``POST /v1/embeddings`` (OpenAI), ``POST /api/embed`` and ``/api/embeddings`` (Ollama).

An embedding is the mean, over the input's tokens, of the model's final hidden
states (the last layer's output after the final norm, what the LM head reads),
L2-normalised. Mean rather than last-token pooling: the models served here are
generative, not trained as embedders, and a causal LM's last state is shaped
to predict the next token, while the mean over positions carries the content
(SGPT, Muennighoff 2022, found mean pooling ahead for causal LMs not tuned for
last-token use); it also does not depend on a trailing EOS the caller may not
add. Unit length makes cosine similarity a dot product, as Ollama's
``/api/embed`` promises.

Inputs of one request run as one left-padded batch (in stream mode one read of
each layer serves all of them), between the generation worker's steps.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import torch
from fastapi import Depends, Request
from fastapi.routing import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from layerrun.errors import LayerRunError

MAX_INPUTS = 256  # inputs per request
CHUNK = 16  # inputs per forward pass


def pool(hidden: torch.Tensor, valid: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, T, H) hidden states and a (B, T) validity mask -> (B, H) unit vectors."""
    if how == "last":
        v = hidden[:, -1]  # rows are left-padded: the last column is every row's last token
    else:
        m = valid.to(hidden.dtype)[..., None]  # (B, T, 1)
        v = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(v, dim=-1)


def embed_ids(engine, batch: list[list[int]], how: str = "mean") -> list[list[float]]:
    """Unit-length embeddings of token-id lists (left-padded into batches of :data:`CHUNK`)."""
    out: list[list[float]] = []
    for i in range(0, len(batch), CHUNK):
        rows = batch[i : i + CHUNK]
        T = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        valid = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :] = torch.tensor(r)
            valid[b, T - len(r) :] = True
        hidden = engine.final_hidden_states(ids, None if bool(valid.all()) else valid)
        out += pool(hidden, valid, how).tolist()
    return out


def encode_inputs(engine, inputs, context: int, truncate: bool) -> list[list[int]]:
    """Strings or token-id lists -> token ids, each within the context (cut to it when ``truncate``)."""
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise LayerRunError("input: give a string, a list of strings, or token ids")
    if len(inputs) > MAX_INPUTS:
        raise LayerRunError(f"input: at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
    out = []
    for k, x in enumerate(inputs):
        ids = engine.encode_prompt(x, chat=False) if isinstance(x, str) else engine.encode_prompt(list(x))
        if not ids:
            raise LayerRunError(f"input[{k}]: is empty")
        if len(ids) > context:
            if not truncate:
                raise LayerRunError(f"input[{k}]: {len(ids)} tokens is more than the context ({context}); "
                                    "shorten it, or allow truncation")
            ids = ids[:context]
        out.append(ids)
    return out


def as_base64(v: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()


# ---- routes ------------------------------------------------------------------------------
class OpenAIEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, a list of texts, token ids, or a list of token-id lists")
    model: str | None = None
    encoding_format: str = Field("float", description="float or base64 (little-endian float32)")
    dimensions: int | None = Field(None, description="not supported: the model's hidden size is the dimension")
    user: str | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    input: str | list[str] | list[int] | list[list[int]] = ""
    truncate: bool = True
    options: dict | None = None
    keep_alive: Any = None


class LegacyEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    prompt: str = ""
    options: dict | None = None
    keep_alive: Any = None


def register(app, served) -> None:
    """``POST /v1/embeddings`` (OpenAI shape), ``/api/embed`` and ``/api/embeddings`` (Ollama shapes)."""
    from layerrun.server.ollama import OllamaError, _OllamaRoute

    engine = served.engine

    def run(inputs, truncate: bool) -> tuple[list[list[float]], int]:
        ids = encode_inputs(engine, inputs, served.context, truncate)
        return embed_ids(engine, ids), sum(len(x) for x in ids)

    from layerrun.server.common import APIError

    @app.post("/v1/embeddings", summary="Embeddings: mean-pooled final hidden states, unit length",
              tags=["OpenAI API"])
    async def openai_embeddings(body: OpenAIEmbeddingRequest):
        if served.model(body.model) is None:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves: "
                                f"{', '.join(served.names)}", param="model", code="model_not_found")
        if body.encoding_format not in ("float", "base64"):
            raise APIError(400, "encoding_format: expected float or base64", param="encoding_format")
        if body.dimensions not in (None, engine.args.hidden_size):
            raise APIError(400, f"dimensions: this model's embeddings have {engine.args.hidden_size} dimensions",
                           param="dimensions", code="unsupported_parameter")
        try:
            vecs, n = await run_in_threadpool(run, body.input, False)
        except LayerRunError as e:
            raise APIError(400, str(e), param="input") from None
        data = [{"object": "embedding", "index": i, "embedding": as_base64(v) if body.encoding_format == "base64" else v}
                for i, v in enumerate(vecs)]
        return {"object": "list", "data": data, "model": body.model or served.names[0],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    async def auth(request: Request) -> None:
        if not served.authorized(request):
            raise OllamaError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    r = APIRouter(route_class=_OllamaRoute, dependencies=[Depends(auth)], tags=["Ollama API"])



    def check(model: str) -> None:
        if not model:
            raise OllamaError(400, "model is required")
        if served.model(model) is None:
            raise OllamaError(404, f"model '{model}' not found")

    @r.post("/api/embed", summary="Ollama: embeddings of one or more inputs (unit length)")
    async def embed(body: EmbedRequest):
        check(body.model)
        t0 = time.perf_counter_ns()
        if body.input in ("", []):
            return {"model": body.model, "embeddings": []}
        vecs, n = await run_in_threadpool(run, body.input, body.truncate)
        return {"model": body.model, "embeddings": vecs, "total_duration": time.perf_counter_ns() - t0,
                "load_duration": 0, "prompt_eval_count": n}

    @r.post("/api/embeddings", summary="Ollama (older endpoint): the embedding of one prompt")
    async def embeddings(body: LegacyEmbeddingRequest):
        check(body.model)
        if not body.prompt:
            return {"embedding": []}
        vecs, _ = await run_in_threadpool(run, body.prompt, True)
        return {"embedding": vecs[0]}

    app.include_router(r)
