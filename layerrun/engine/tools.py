"""Tool calling: tools into the chat template, tool calls out of the model's text.

The tools go to the model's own chat template (``tools=``, as transformers passes them). A
template that does not use ``tools`` (SmolLM2's, for one) gets them the way Hermes-style models
are prompted: a system message listing the functions and asking for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; assistant tool calls and tool
results in the history are then written in that same form.

The output formats understood (:func:`parse_tool_calls`): Hermes / Qwen ``<tool_call>`` JSON,
Llama 3 JSON (``{"name": ..., "parameters": ...}``, optionally after ``<|python_tag|>``) and
Mistral ``[TOOL_CALLS] [...]``. :func:`call_grammar` builds the grammar that forces a valid call
(``tool_choice`` required or a named function), arguments valid against the function's schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

from layerrun.errors import LayerRunError

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MARKERS = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]", LLAMA3: "<|python_tag|>"}


def template_takes_tools(tokenizer) -> bool:
    return "tools" in (tokenizer.chat_template or "")


def tool_format(tokenizer) -> str:
    """Which call format the model's template teaches (Hermes when it teaches none: our own prompt's)."""
    t = tokenizer.chat_template or ""
    if not template_takes_tools(tokenizer) or "<tool_call>" in t:
        return HERMES
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<|python_tag|>" in t or "ipython" in t:
        return LLAMA3
    return HERMES


def check_tools(tools) -> list[dict]:
    """OpenAI ``tools``: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, list):
        raise LayerRunError("tools: expected a list of {\"type\": \"function\", \"function\": {...}}")
    names = set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise LayerRunError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise LayerRunError(f"tools[{i}].function.name: a non-empty string is required")
        if f["name"] in names:
            raise LayerRunError(f"tools[{i}].function.name: {f['name']!r} appears twice")
        names.add(f["name"])
        if "parameters" in f and not isinstance(f["parameters"], dict):
            raise LayerRunError(f"tools[{i}].function.parameters: expected a JSON schema object")
    return tools


# ---- into the template -----------------------------------------------------------------
def prepare_messages(tokenizer, messages: list[dict], template: dict) -> tuple[list[dict], dict]:
    """Messages and template inputs ready for ``apply_chat_template``.

    Assistant tool calls get their ``arguments`` as objects (templates write them with ``tojson``;
    OpenAI sends a JSON string). A template that does not take tools gets the Hermes prompt instead.
    """
    messages = [_arguments_as_objects(m) for m in messages]
    tools = template.get("tools")
    uses_tools = tools is not None or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not uses_tools or template_takes_tools(tokenizer):
        return messages, template
    template = {k: v for k, v in template.items() if k != "tools"}
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_hermes_call(c) for c in m["tool_calls"])
            m = {"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()}
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        if out and m["role"] == "user" and out[-1]["role"] == "user" and "<tool_response>" in m["content"]:
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + m["content"]}  # templates may need turns to alternate
            continue
        out.append({**m, "content": m.get("content") or ""})
    if tools:
        prompt = hermes_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, template


def hermes_system_prompt(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. The functions you can call are "
            f"listed within <tools></tools>:\n<tools>\n{listed}\n</tools>\n\nFor each function call, return a JSON "
            "object with the function name and arguments within <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _arguments_as_objects(m: dict) -> dict:
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        f = dict(c.get("function") or {})
        if isinstance(f.get("arguments"), str):
            try:
                f["arguments"] = json.loads(f["arguments"])
            except json.JSONDecodeError:
                pass  # kept as written
        calls.append({**c, "function": f})
    return {**m, "tool_calls": calls}


def _hermes_call(c: dict) -> str:
    f = c.get("function") or {}
    return "<tool_call>\n" + json.dumps({"name": f.get("name"), "arguments": f.get("arguments", {})},
                                        ensure_ascii=False) + "\n</tool_call>"


# ---- out of the model's text ----------------------------------------------------------------
def parse_tool_calls(text: str, fmt: str = HERMES) -> tuple[str, list[dict]]:
    """(content before the calls, calls as OpenAI ``tool_calls``); no calls -> (text, [])."""
    calls: list[dict] = []
    content = text
    if "<tool_call>" in text:
        content = text[: text.index("<tool_call>")]
        for body in _HERMES_RE.findall(text):
            calls += _calls_from_json(body)
    elif "[TOOL_CALLS]" in text:
        content, _, body = text.partition("[TOOL_CALLS]")
        calls = _calls_from_json(body.strip())
    else:
        start = text.find("<|python_tag|>")
        body = text[start + len("<|python_tag|>") :] if start >= 0 else text
        stripped = body.strip()
        if stripped.startswith(("{", "[")) and (start >= 0 or fmt == LLAMA3 or _looks_like_call(stripped)):
            calls = _calls_from_json(stripped)
            content = text[:start] if start >= 0 else ""
            if not calls:
                content = text
    if not calls:
        return text, []
    return content.strip(), [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
        for c in calls
    ]


def _looks_like_call(s: str) -> bool:
    return '"name"' in s and ('"arguments"' in s or '"parameters"' in s)


def _calls_from_json(body: str) -> list[dict]:
    """Calls in one JSON value (an object, a list of them, or several objects separated by ; or newlines)."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while i < len(body):
        while i < len(body) and body[i] in " \t\r\n;,":
            i += 1
        if i >= len(body):
            break
        try:
            v, i = dec.raw_decode(body, i)
        except json.JSONDecodeError:
            break
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                args = item.get("arguments", item.get("parameters", {}))
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass
                out.append({"name": item["name"], "arguments": args if args is not None else {}})
    return out


class ToolCallStream:
    """Splits streamed text into content to show now and a tool-call part held until the end.

    Text before a call marker streams as content; from the marker on (and any suffix that could
    begin one) it is held, and :meth:`finish` parses it into calls.
    """

    def __init__(self, fmt: str = HERMES):
        self.fmt = fmt
        self.markers = [m for m in _MARKERS.values()]
        self.held = ""
        self.in_call = False
        self.started = False  # any non-space text seen (Llama 3 calls are bare JSON at the start)

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_call:
            return ""
        if not self.started and self.fmt == LLAMA3:
            s = self.held.lstrip()
            if not s:
                return ""
            self.started = True
            if s.startswith(("{", "[")):
                self.in_call = True
                return ""
        for m in self.markers:
            i = self.held.find(m)
            if i >= 0:
                self.in_call = True
                out, self.held = self.held[:i], self.held[i:]
                return out
        keep = 0
        for m in self.markers:
            for k in range(min(len(m) - 1, len(self.held)), 0, -1):
                if self.held.endswith(m[:k]):
                    keep = max(keep, k)
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        if out.strip():
            self.started = True
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still held, the calls)."""
        content, calls = parse_tool_calls(self.held, self.fmt)
        return content, calls


# ---- forcing a call -------------------------------------------------------------------------
def call_grammar(tools: Sequence[dict], fmt: str, name: str | None = None, parallel: bool = True):
    """A :class:`~layerrun.engine.constrained.Grammar` that admits only a valid call of ``name``
    (or of any tool), in the model's format, with arguments valid against the function's schema;
    several calls when ``parallel``."""
    from layerrun.engine.constrained import Grammar

    funcs = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not funcs:
        raise LayerRunError(f"tool_choice: no tool named {name!r} in tools")
    key = "parameters" if fmt == LLAMA3 else "arguments"
    options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 key: f.get("parameters") or {"type": "object"}},
                "required": ["name", key], "additionalProperties": False} for f in funcs]
    one = options[0] if len(options) == 1 else {"anyOf": options}
    one = {**one, "x-guidance": {"whitespace_flexible": False}}  # compact JSON: small models repeat optional spaces
    if fmt == MISTRAL:
        arr = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1}),
               "x-guidance": {"whitespace_flexible": False}}
        lark = f'start: "[TOOL_CALLS]" calls\ncalls: %json {json.dumps(arr)}'
    elif fmt == LLAMA3:
        lark = f"start: call\ncall: %json {json.dumps(one)}"  # Llama 3 makes one call per turn
    else:
        lark = ('start: call' + (' ("\\n" call)*' if parallel else '') + '\n'
                'call: "<tool_call>\\n" obj "\\n</tool_call>"\n'
                f'obj: %json {json.dumps(one)}')
    return Grammar("lark", lark, "tool_choice")
