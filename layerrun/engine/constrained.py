"""Constrained decoding: a grammar masks the logits at every step, so the output always parses.

Built on llguidance (see the README's design notes for why): a :class:`Grammar` is a JSON
schema, "any JSON object", a regex or a Lark grammar (Lark may embed JSON schemas with
``%json {...}``, which is how tool calls are constrained). :func:`processor` turns one into a
per-request logits processor for the generation loop's hook
(:func:`layerrun.engine.batch.sample_rows`): before sampling it sets every token the grammar
does not allow to -inf; ``accept(token)`` advances the grammar. Each request has its own
matcher, so every row of a batch follows its own grammar.

When the grammar is complete, only end-of-sequence tokens are allowed, so the sequence ends there.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from layerrun.errors import LayerRunError

_lock = threading.Lock()


@dataclass(frozen=True)
class Grammar:
    """What the output must match. ``kind``: "json_schema", "regex" or "lark"; ``source``: its text."""

    kind: str
    source: str
    what: str = "the grammar"  # how errors name it (a flag or a request field)

    @staticmethod
    def json_schema(schema: dict | str | bool, what: str = "json_schema") -> Grammar:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise LayerRunError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(schema, (dict, bool)):
            raise LayerRunError(f"{what}: a JSON schema must be an object, got {type(schema).__name__}")
        return Grammar("json_schema", json.dumps(schema), what)

    @staticmethod
    def json_object(what: str = "response_format") -> Grammar:
        return Grammar("json_schema", json.dumps({"type": "object"}), what)

    def llguidance(self) -> str:
        """The grammar as llguidance takes it (compact JSON: no optional whitespace, which small
        models tend to repeat without end)."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults={"whitespace_flexible": False})
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.source)
        raise LayerRunError(f"{self.what}: unknown grammar kind {self.kind!r}")

    def check(self) -> None:
        """Raise LayerRunError naming the problem if the grammar (schema) cannot be compiled."""
        _require()
        from llguidance import LLMatcher

        try:
            problem = LLMatcher.validate_grammar(self.llguidance())  # "" when it compiles
        except (ValueError, RuntimeError) as e:
            problem = str(e)
        if problem:
            raise LayerRunError(f"{self.what}: {problem.strip().splitlines()[0]}")


def from_response_format(rf, what: str = "response_format") -> Grammar | None:
    """OpenAI's ``response_format``: {"type": "text"} (none), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise LayerRunError(f"{what}: expected an object with a \"type\" (text, json_object or json_schema)")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object(what)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise LayerRunError(f"{what}.json_schema: expected an object with a \"schema\"")
        schema = js.get("schema", {"type": "object"})  # OpenAI: a missing schema means any JSON object
        return Grammar.json_schema(schema, f"{what}.json_schema.schema")
    raise LayerRunError(f"{what}.type: {kind!r} is not one of: text, json_object, json_schema")


def _require() -> None:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise LayerRunError("structured output needs the llguidance package: pip install llguidance") from None


def _lltokenizer(engine):
    """The llguidance tokenizer for ``engine``'s vocabulary, built once (about 0.4 s for 49k tokens, 4 s for 262k)."""
    _require()
    import llguidance

    tok = engine.tokenizer
    with _lock:
        cached = getattr(tok, "_llguidance", None)
        if cached is None:
            n_vocab = max(engine.args.vocab_size, tok.vocab_size)
            eos = sorted(i for i in engine.eos_token_ids if i < n_vocab)
            if not eos:
                raise LayerRunError(f"{engine.path}: structured output needs an end-of-sequence token "
                                    "(none in generation_config.json, config.json or tokenizer_config.json)")
            text = (tok.folder / "tokenizer.json").read_text()
            try:
                cached = llguidance.LLTokenizer(text, n_vocab=n_vocab, eos_token=eos)
            except (ValueError, RuntimeError) as e:
                raise LayerRunError(f"{tok.folder / 'tokenizer.json'}: llguidance cannot use this tokenizer ({e})") from None
            tok._llguidance = cached
        return cached


def prepare(engine) -> None:
    """Build the engine's llguidance tokenizer now (the server does it at start, not in a request)."""
    _lltokenizer(engine)


class GrammarProcessor:
    """A logits processor that allows only the tokens ``grammar`` can take next."""

    def __init__(self, engine, grammar: Grammar):
        from llguidance import LLMatcher

        lltok = _lltokenizer(engine)
        self.grammar = grammar
        try:
            self.matcher = LLMatcher(lltok, grammar.llguidance())
        except (ValueError, RuntimeError) as e:
            raise LayerRunError(f"{grammar.what}: {str(e).strip().splitlines()[0]}") from None
        if self.matcher.is_error():
            raise LayerRunError(f"{grammar.what}: {self.matcher.get_error()}")
        self.vocab = lltok.vocab_size
        self.eos = sorted(i for i in engine.eos_token_ids if i < self.vocab)
        self.mask = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar takes next (only EOS once it is complete or broken)."""
        return torch.from_numpy(self._allowed_np())

    def _allowed_np(self) -> np.ndarray:
        if self.matcher.is_error() or self.matcher.is_stopped():
            allowed = np.zeros(self.vocab, dtype=np.bool_)
            allowed[self.eos] = True
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        # bit i of word w allows token 32 w + i. numpy, single-threaded: torch's thread pool made this
        # 20x slower on a busy 2-core machine (bench/constrained_mask.py)
        return np.unpackbits(self.mask.numpy().view(np.uint8), bitorder="little")[: self.vocab].view(np.bool_)

    def __call__(self, history: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        n = min(self.vocab, logits.shape[-1])
        allowed = self._allowed_np()[:n]
        if logits.device.type == "cpu":
            out = logits.numpy().astype(np.float32, copy=True) if logits.dtype == torch.float32 else \
                logits.float().numpy().copy()
            out[:n][~allowed] = -np.inf
            out[n:] = -np.inf  # a head wider than the tokenizer: never a real token
            return torch.from_numpy(out)
        out = logits.float().clone()
        out[:n].masked_fill_(~torch.from_numpy(allowed).to(out.device), float("-inf"))
        out[n:] = float("-inf")
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.is_error() and not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` (drafted ahead, e.g. by speculative decoding) the grammar accepts in
        a row from here, without advancing it."""
        if self.matcher.is_error() or self.matcher.is_stopped():
            return 0
        return self.matcher.validate_tokens(list(tokens))

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (a rejected speculative suffix)."""
        if n:
            self.matcher.rollback(n)

    @property
    def complete(self) -> bool:
        """Whether the output so far is a whole match."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()


def processor(engine, grammar: Grammar) -> GrammarProcessor:
    return GrammarProcessor(engine, grammar)
