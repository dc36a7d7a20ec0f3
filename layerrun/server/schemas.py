"""Request bodies of the OpenAI-compatible endpoints (pydantic; they are also the OpenAPI schema).

Fields follow the OpenAI API; ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``return_token_ids`` and ``chat_template_kwargs`` are
extensions with vLLM's names. The schema lists only what LayerRun does; OpenAI
(and vLLM) fields it cannot honour (``logit_bias``, ``echo``, ``best_of``,
``min_tokens``, ...) are refused with a 400 naming them when set to anything but
their default, and other unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the end of the context
MAX_N = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions: 5; vLLM allows more, so do we)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
TokenId = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]  # checked against the vocabulary later


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with token counts and no choices")


def _valid_unicode(v):
    """JSON may carry lone UTF-16 surrogates (\\ud800); they are not text, and the tokenizer cannot take them."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains invalid Unicode (a lone UTF-16 surrogate)") from None
    elif isinstance(v, list):
        for x in v:
            _valid_unicode(x)
    return v


def _off(v, body) -> bool:
    return not v  # absent, null, false, 0, empty


class _Sampling(BaseModel):
    # Extra fields are kept (not in the schema) so that known OpenAI fields LayerRun cannot honour are refused
    # by name when set (see REFUSED); any other unknown field is ignored, as vLLM does.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    REFUSED: ClassVar[dict[str, Callable]] = {
        "logit_bias": _off, "functions": _off, "function_call": _off,
        # vLLM extensions a client may send expecting them to work
        "min_tokens": _off, "stop_token_ids": _off, "bad_words": _off, "use_beam_search": _off,
        "length_penalty": lambda v, body: v in (None, 1, 1.0), "prompt_logprobs": _off,
        "include_stop_str_in_output": _off, "guided_json": _off, "guided_regex": _off, "guided_choice": _off,
        "guided_grammar": _off, "structured_outputs": _off, "prediction": _off, "audio": _off,
        "modalities": lambda v, body: v in (None, [], ["text"]),
    }

    model: str | None = Field(None, description="the served model name (GET /v1/models); may be left out")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (capped at the context)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; default 1 (off)")
    top_k: int | None = Field(None, ge=-1, description="extension: sample from the k most likely tokens; 0 or -1 is off")
    min_p: float | None = Field(None, ge=0, le=1, description="extension: drop tokens below min_p x the best one's probability")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="extension (vLLM): >1 discourages tokens "
                                             "of the prompt and output; 1 is off")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="subtract this x each token's count so far")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="subtract this from tokens already generated")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="stop before this text (one or a list)")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="seed for reproducible sampling")
    stream: bool = Field(False, description="send Server-Sent Events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating after the end-of-sequence token")
    return_token_ids: bool = Field(False, description="extension: add token_ids to each choice (and chunk)")
    user: str | None = None

    _unicode = field_validator("model", "stop", "user")(_valid_unicode)

    def unsupported(self) -> str | None:
        """The first field set to something LayerRun does not do, or None."""
        extra = self.model_extra or {}
        return next((k for k, ok in self.REFUSED.items() if k in extra and not ok(extra[k], self)), None)


class CompletionRequest(_Sampling):
    REFUSED: ClassVar[dict[str, Callable]] = {
        **_Sampling.REFUSED, "echo": _off, "suffix": _off,
        "best_of": lambda v, body: v is None or v == 1 or v == body.n,
    }
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="the log-probability of each token and of the N most likely ones")
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        ..., description="a string, a list of token ids, or a list of either (one choice set per prompt)"
    )
    _unicode_prompt = field_validator("prompt")(_valid_unicode)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str
    _unicode = field_validator("text")(_valid_unicode)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict = Field("{}", description="a JSON string (OpenAI) or an object")
    _unicode = field_validator("name")(_valid_unicode)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier tool calls")
    tool_call_id: str | None = Field(None, description="for role tool: the call this result answers")
    _unicode = field_validator("content", "name", "tool_call_id")(_valid_unicode)

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        m: dict = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        return m


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema for the arguments")
    strict: bool | None = None
    _unicode = field_validator("description")(_valid_unicode)


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the output must follow")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict | None:
        if self.type == "json_schema":
            js = self.json_schema.schema_ if self.json_schema is not None else None
            return {"type": "json_schema", "json_schema": {"schema": js if js is not None else {"type": "object"}}}
        return {"type": self.type}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = Field(False, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: also the N most likely tokens at each position")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained "
                                                   "decoding makes the output parse (and follow the schema)")
    tools: list[Tool] | None = Field(None, description="functions the model may call (rendered by its chat template)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or {type: function, function: {name}}: "
                          "required and named force a valid call")
    parallel_tool_calls: bool = Field(True, description="allow several calls in one answer")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extension: more inputs for the chat template, e.g. {\"enable_thinking\": false}")
