"""The OpenAI routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Chat requests may carry ``tools`` (rendered by the model's chat template; calls in the output
are parsed into ``tool_calls``, streamed as ``tool_calls`` deltas), ``tool_choice`` (required or a
named function force a valid call by constrained decoding), ``response_format`` (json_object /
json_schema, by constrained decoding), ``logprobs`` / ``top_logprobs`` and ``chat_template_kwargs``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from layerrun.errors import LayerRunError
from layerrun.server.common import APIError, Backend, sampling_options
from layerrun.server.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
)
from layerrun.server.worker import Output, Ticket

SSE_PING_S = 15  # keep-alive comment lines while a stream has nothing to send (a long prefill)


def add_openai_routes(app: FastAPI, backend: Backend) -> None:
    engine = backend.engine

    def check(body) -> None:
        backend.check_model(body.model)
        field = body.unsupported()
        if field:
            raise APIError(400, f"{field}: not supported by this server (LayerRun)", param=field, code="unsupported_parameter")
        backend.check_alive()

    async def ready(body) -> None:
        check(body)
        await backend.check_files()

    @app.post("/v1/completions", summary="Text completion (no chat template)")
    async def completions(body: CompletionRequest, request: Request):
        await ready(body)
        prompts = await run_in_threadpool(_encode_completion_prompts, engine, body.prompt)

        def options(j: int) -> dict:
            return {**sampling_options(body, j), **({"logprobs": body.logprobs} if body.logprobs is not None else {})}

        tickets, q = backend.start(prompts, body.n, options, body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        rid, model = f"cmpl-{uuid.uuid4().hex}", body.model or backend.names[0]
        tokens = _TokenText(engine)

        def choice(index: int, text: str, finish: str | None, ids: list[int] | None, lps: list | None) -> dict:
            c = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            if lps is not None:
                c["logprobs"] = tokens.completion_logprobs(lps)
            if ids is not None:
                c["token_ids"] = ids
            return c

        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        prompt_tokens = sum(len(p) for p in prompts)
        want_lp = body.logprobs is not None
        if body.stream:
            def chunk(i: int, o: Output) -> list[dict]:
                if not o.text and not body.return_token_ids and not (want_lp and o.token_id is not None):
                    if not o.finish_reason:
                        return []  # nothing to show yet (incomplete UTF-8, or text held back for a stop string)
                lps = _one_lp(o) if want_lp else None
                return [choice(i, o.text, o.finish_reason, _ids(body, o), lps)]

            return _sse(backend, tickets, q, head, chunk, None, body, prompt_tokens)
        outs = await backend.collect(request, tickets, q)
        if outs is None:
            return Response(status_code=499)
        choices = [choice(i, c.content, c.finish_reason, c.ids if body.return_token_ids else None,
                          c.logprobs if want_lp else None) for i, c in outs.items()]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, outs)}

    @app.post("/v1/chat/completions", summary="Chat completion (the model's chat template is applied)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        await ready(body)
        plan = _ChatPlan(engine, body)
        ids = await run_in_threadpool(plan.encode)
        tickets, q = backend.start([ids], body.n, plan.options, body.max_completion_tokens or body.max_tokens,
                                   "messages")
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", body.model or backend.names[0]
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
        tokens = _TokenText(engine)
        if body.stream:
            splitters = {t.index: plan.splitter() for t in tickets}

            def chunk(i: int, o: Output) -> list[dict]:
                out = []
                lp = {"content": tokens.chat_logprobs(_one_lp(o), body.top_logprobs)} if body.logprobs else None
                sp = splitters[i]
                text = sp.feed(o.text) if sp is not None else o.text
                if text or (lp and o.token_id is not None) or body.return_token_ids and o.token_id is not None:
                    c = {"index": i, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": None}
                    if body.return_token_ids:
                        c["token_ids"] = _ids(body, o)
                    out.append(c)
                if o.finish_reason:
                    finish, delta = o.finish_reason, {}
                    if sp is not None:
                        rest, calls = sp.finish()
                        calls = calls if body.parallel_tool_calls else calls[:1]
                        if rest:
                            delta["content"] = rest
                        if calls:
                            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                            finish = "tool_calls"
                    out.append({"index": i, "delta": delta, "logprobs": None, "finish_reason": finish})
                return out

            first = [{"index": t.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for t in tickets]
            return _sse(backend, tickets, q, {**head, "object": "chat.completion.chunk"}, chunk, first, body, len(ids))
        outs = await backend.collect(request, tickets, q)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for i, c in outs.items():
            message: dict = {"role": "assistant", "content": c.content}
            finish = c.finish_reason
            if plan.parse_calls:
                content, calls = plan.parse(c.content)
                if calls:
                    message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                    finish = "tool_calls"
            ch = {"index": i, "message": message, "finish_reason": finish,
                  "logprobs": {"content": tokens.chat_logprobs(c.logprobs, body.top_logprobs)} if body.logprobs else None}
            if body.return_token_ids:
                ch["token_ids"] = c.ids
            choices.append(ch)
        return {**head, "choices": choices, "usage": _usage(len(ids), outs)}


class _ChatPlan:
    """What a chat request asks of the template, the grammar and the output parser."""

    def __init__(self, engine, body: ChatCompletionRequest):
        from layerrun.engine.constrained import from_response_format

        self.engine, self.body = engine, body
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice
        if tools is None and choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice: needs tools", param="tool_choice")
        self.tools = None if choice == "none" else tools  # none: the model is not told about them
        self.parse_calls = self.tools is not None
        self.fmt = None
        self.grammar = None
        try:
            if body.response_format is not None:
                self.grammar = from_response_format(body.response_format.as_dict())
        except LayerRunError as e:
            raise APIError(400, str(e), param="response_format") from None
        self.force = choice == "required" or not isinstance(choice, (str, type(None)))
        if self.force and self.grammar is not None:
            raise APIError(400, "response_format: cannot be combined with a required or named tool_choice",
                           param="response_format")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t["function"]["name"] for t in tools}:
                raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} in tools",
                               param="tool_choice.function.name")

    def encode(self) -> list[int]:
        """Render and tokenize the messages, and compile the grammar (on a worker thread: both can take a while)."""
        from jinja2.exceptions import TemplateError

        from layerrun.engine.tools import call_grammar, check_tools, tool_format

        engine, body = self.engine, self.body
        if not engine.has_chat_template:
            raise APIError(400, "messages: this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages")
        template = dict(body.chat_template_kwargs or {})
        if self.tools is not None:
            try:
                check_tools(self.tools)
            except LayerRunError as e:
                raise APIError(400, str(e), param="tools") from None
            template["tools"] = self.tools
            self.fmt = tool_format(engine.tokenizer)
        try:
            text = engine.render_chat([m.as_dict() for m in body.messages], **template)
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
        except (LayerRunError, TemplateError, TypeError, ValueError) as e:
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        if self.force:
            name = None if body.tool_choice == "required" else body.tool_choice.function.name
            self.grammar = call_grammar(self.tools, self.fmt, name, parallel=body.parallel_tool_calls)
        if self.grammar is not None:
            from layerrun.engine.constrained import processor

            try:
                self.grammar.check()
                # Built once here (and thrown away): a grammar the matcher cannot start is a 400 now, not a
                # failed sequence later; the first structured request also builds the vocabulary's index here.
                processor(engine, self.grammar)
            except (LayerRunError, ValueError, RuntimeError) as e:
                param = "tools" if self.force else "response_format"
                raise APIError(400, f"{param}: {e}", param=param) from None
        return ids

    def options(self, j: int) -> dict:
        opts = sampling_options(self.body, j)
        if self.grammar is not None:
            opts["grammar"] = self.grammar
        if self.body.logprobs:
            opts["logprobs"] = self.body.top_logprobs or 0
        return opts

    def splitter(self):
        from layerrun.engine.tools import ToolCallStream

        return ToolCallStream(self.fmt) if self.parse_calls else None

    def parse(self, text: str) -> tuple[str, list[dict]]:
        from layerrun.engine.tools import parse_tool_calls

        content, calls = parse_tool_calls(text, self.fmt)
        if calls and not self.body.parallel_tool_calls:
            calls = calls[:1]
        return content, calls


class _TokenText:
    """Token strings for logprobs, in OpenAI's shapes: the token's text, or ``bytes:\\xe6\\x97`` for a
    token that is only part of a UTF-8 character (as OpenAI writes them), and its exact bytes."""

    def __init__(self, engine):
        self.tok = engine.tokenizer if engine.has_tokenizer else None
        self._byte_level = self.tok is not None and "ByteLevel" in repr(self.tok._tok.decoder)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, i: int) -> tuple[str, list[int]]:
        if i not in self._cache:
            b = self._bytes(i)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            self._cache[i] = (s, list(b))
        return self._cache[i]

    def _bytes(self, i: int) -> bytes:
        if self.tok is None:
            return f"<{i}>".encode()
        raw = self.tok.id_to_token(i)
        if raw is None:
            return b""
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)  # SentencePiece byte fallback
        if m:
            return bytes([int(m.group(1), 16)])
        if self._byte_level and all(c in _BYTE_DECODER for c in raw):
            return bytes(_BYTE_DECODER[c] for c in raw)
        if not self._byte_level:
            return raw.replace("\u2581", " ").encode()  # SentencePiece's word-start mark is a space
        return self.tok.decode([i], skip_special_tokens=False).encode()

    def entry(self, i: int, lp: float) -> dict:
        s, b = self.token(i)
        return {"token": s, "logprob": _finite(lp), "bytes": b}

    def chat_logprobs(self, lps: list, top: int | None) -> list[dict]:
        return [{**self.entry(i, lp), "top_logprobs": [self.entry(j, v) for j, v in (tops or [])[: top or 0]]}
                for i, lp, tops in lps]

    def completion_logprobs(self, lps: list) -> dict:
        from layerrun.engine.tokenizer import StreamDecoder

        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        dec, offset = (StreamDecoder(self.tok) if self.tok is not None else None), 0
        for i, lp, tops in lps:
            out["tokens"].append(self.token(i)[0])
            out["token_logprobs"].append(_finite(lp))
            out["top_logprobs"].append({self.token(j)[0]: _finite(v) for j, v in tops})
            out["text_offset"].append(offset)  # where the token's text starts in the completion
            offset += len(dec.push(i)) if dec is not None else 0
        return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def _finite(x: float) -> float:
    return max(float(x), -9999.0)  # JSON has no -inf (a token the model gives zero probability)


def _one_lp(o: Output) -> list:
    return [(o.token_id, o.logprob, o.top_logprobs or [])] if o.token_id is not None and o.logprob is not None else []


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


def _ids(body, o: Output) -> list[int] | None:
    if not body.return_token_ids:
        return None
    return [] if o.token_id is None else [o.token_id]


def _usage(prompt_tokens: int, outs: dict) -> dict:
    completion = sum(c.completion_tokens for c in outs.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(backend: Backend, tickets: list[Ticket], q, head: dict, make_choices, first: list | None,
         body, prompt_tokens: int) -> EventSourceResponse:
    def event(obj) -> dict:
        return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}

    async def stream() -> AsyncIterator[dict]:
        left, completion = len(tickets), 0
        try:
            if first:
                yield event({**head, "choices": first})
            while left:
                try:
                    i, o = await backend.next(q)
                except APIError as e:
                    yield event(e.body())
                    break
                if o.finish_reason:
                    left -= 1
                    completion += o.completion_tokens
                for c in make_choices(i, o):
                    yield event({**head, "choices": [c]})
            if body.stream_options and body.stream_options.include_usage and not left:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                yield event({**head, "choices": [], "usage": usage})
            yield {"data": "[DONE]"}
        finally:  # the client went away (the task is cancelled) or the stream ended
            backend.cancel(tickets)

    async def after() -> None:  # on the event loop (a sync task would run in a thread), also when the client
        backend.cancel(tickets)  # left before the stream began, so that the generator's finally never ran

    # sse-starlette: a ": ping" comment every SSE_PING_S keeps proxies and clients from timing out a long prefill
    return EventSourceResponse(stream(), background=BackgroundTask(after), ping=SSE_PING_S, sep="\n",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
