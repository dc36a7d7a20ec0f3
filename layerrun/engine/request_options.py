"""The per-request options beyond the basic sampling fields, checked and turned into what the
generation loop uses: the full :class:`SamplingParams` (min_p, penalties), the logits processors
(penalties, a grammar for structured output), logprobs, and what the chat template gets (tools,
``chat_template_kwargs``).

Every entry point (``Engine.generate``/``stream``, ``generate_batch``, the server, the CLI) passes
these as keyword arguments; unknown ones are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerrun.engine.sampling import Penalties, SamplingParams, make_sampler
from layerrun.errors import LayerRunError

SAMPLING_FIELDS = ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
OPTION_FIELDS = (*SAMPLING_FIELDS, "logprobs", "json_schema", "response_format", "grammar", "tools",
                 "chat_template_kwargs")
MAX_LOGPROBS = 20  # the most top_logprobs per token (OpenAI allows 20 for chat)


@dataclass
class RequestExtras:
    processors: list = field(default_factory=list)
    logprobs: int | None = None


def template_options(options: dict) -> dict:
    """What the chat template is rendered with besides the messages: ``tools`` and ``chat_template_kwargs``."""
    given = options.get("chat_template_kwargs") or {}
    if not isinstance(given, dict):
        raise LayerRunError(f"chat_template_kwargs must be an object (a dict), got {type(given).__name__}")
    extra = dict(given)
    if options.get("tools") is not None:
        extra["tools"] = options["tools"]
    return extra


def grammar_of(options: dict):
    """The :class:`~layerrun.engine.constrained.Grammar` a request's options ask for, or None."""
    from layerrun.engine.constrained import Grammar, from_response_format

    given = [k for k in ("json_schema", "response_format", "grammar") if options.get(k) is not None]
    if len(given) > 1:
        raise LayerRunError(f"give at most one of {', '.join(given)}")
    if options.get("json_schema") is not None:
        return Grammar.json_schema(options["json_schema"])
    if options.get("grammar") is not None:
        g = options["grammar"]
        if not isinstance(g, Grammar):
            raise LayerRunError("grammar must be a layerrun.engine.constrained.Grammar")
        return g
    rf = options.get("response_format")
    if isinstance(rf, str):  # the Python API's shorthand: "json_object" / "text"
        rf = {"type": rf}
    return from_response_format(rf)


def build_request_options(engine, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, system,
                          options: dict):
    """Check a request; returns (prompt ids, max new tokens, params, sampler, stop strings, extras)."""
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise LayerRunError(f"unknown option(s) {unknown}; known: {sorted(OPTION_FIELDS)}")
    template = template_options(options)
    if template:
        if chat is False or not (isinstance(prompt, str) or _is_messages(prompt)):
            raise LayerRunError("tools and chat_template_kwargs apply only to chat prompts (text or messages)")
        # rendered here with the template's extra inputs, then checked as token ids like any other prompt
        prompt = engine.tokenizer.encode(engine.render_chat(prompt, system=system, **template), add_special_tokens=False)
    ids, max_new, params, _, stops = engine.check_request(
        prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, system)
    params = SamplingParams(params.temperature, params.top_k, params.top_p, params.seed,
                            **{k: float(options[k]) for k in SAMPLING_FIELDS if options.get(k) is not None})
    sampler = make_sampler(params)  # checks the new fields too
    extras = RequestExtras()
    if params.penalized:
        extras.processors.append(Penalties(params, len(ids)))
    grammar = grammar_of(options)
    if grammar is not None:
        from layerrun.engine.constrained import processor

        extras.processors.append(processor(engine, grammar))  # last: the grammar has the final say
    lp = options.get("logprobs")
    if lp is not None and lp is not False:
        lp = 0 if lp is True else lp
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS:
            raise LayerRunError(f"logprobs must be True or a number of top tokens in 0..{MAX_LOGPROBS}, got {lp!r}")
        extras.logprobs = lp
    return ids, max_new, params, sampler, stops, extras


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)
