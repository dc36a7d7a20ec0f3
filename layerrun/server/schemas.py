"""Request bodies of the OpenAI-compatible endpoints (pydantic; they are also the OpenAPI schema).

Fields follow the OpenAI API; ``top_k``, ``ignore_eos`` and
``return_token_ids`` are extensions with vLLM's names. The schema lists only
what LayerRun does; OpenAI fields it cannot honour (logprobs, tools,
penalties, ...) are refused with a 400 naming them when set to anything but
their default, and other unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the end of the context
MAX_N = 16
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
        "presence_penalty": _off, "frequency_penalty": _off, "logit_bias": _off, "logprobs": _off,
        "top_logprobs": _off, "tools": _off, "functions": _off,
    }

    model: str | None = Field(None, description="the served model name (GET /v1/models); may be left out")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (capped at the context)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; default 1 (off)")
    top_k: int | None = Field(None, ge=-1, description="extension: sample from the k most likely tokens; 0 or -1 is off")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="stop before this text (one or a list)")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="seed for reproducible sampling")
    stream: bool = Field(False, description="send Server-Sent Events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating after the end-of-sequence token")
    return_token_ids: bool = Field(False, description="extension: add token_ids to each choice (and chunk)")
    speculate: bool = Field(True, description="extension: false decodes one token per pass even when the server "
                                              "has a draft (layerrun serve --draft)")
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
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        ..., description="a string, a list of token ids, or a list of either (one choice set per prompt)"
    )
    _unicode_prompt = field_validator("prompt")(_valid_unicode)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str
    _unicode = field_validator("text")(_valid_unicode)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    _unicode = field_validator("content", "name")(_valid_unicode)

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    REFUSED: ClassVar[dict[str, Callable]] = {
        **_Sampling.REFUSED,
        "tool_choice": lambda v, body: v in (None, "none", "auto"),
        "response_format": lambda v, body: v is None or (isinstance(v, dict) and v.get("type") in (None, "text")),
    }
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
