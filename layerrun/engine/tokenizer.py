"""Tokenizer and chat template, from ``tokenizer.json`` + ``tokenizer_config.json``.

Uses the ``tokenizers`` library directly (no transformers at run time) and
renders chat templates with a sandboxed jinja2 environment configured the way
transformers renders them, so prompts are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

from layerrun.errors import FormatError
from layerrun.formats.files import MAX_TOKENIZER_BYTES, MissingFileError, optional_json, read_text

MAX_TEMPLATE_BYTES = 4 * 2**20


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        try:
            text = read_text(self.folder, "tokenizer.json", "tokenizer", MAX_TOKENIZER_BYTES)
        except MissingFileError:
            raise FormatError(
                f"{self.folder}: tokenizer.json is missing; text prompts need it "
                "(copy it from the original model folder, or pass token ids)"
            ) from None
        try:
            self._tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exceptions
            raise FormatError(f"{path}: cannot load tokenizer ({e})") from None
        self.config = optional_json(self.folder, "tokenizer_config.json", "tokenizer config") or {}
        self.template_source: Path | None = None
        self.chat_template = self._find_chat_template()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.eos_token_ids = self._eos_ids()
        self._template = None

    # ---- basics -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            v = (optional_json(self.folder, name, "config") or {}).get("eos_token_id")
            if v is None:
                continue
            for i in v if isinstance(v, list) else [v]:
                if not isinstance(i, int) or isinstance(i, bool):
                    raise FormatError(f"{self.folder / name}: eos_token_id {v!r} is not a token id (or a list of them)")
                ids.add(i)
        if self.eos_token:
            i = self._tok.token_to_id(self.eos_token)
            if i is not None:
                ids.add(i)
        return ids

    # ---- chat template ----------------------------------------------------
    def _find_chat_template(self) -> str | None:
        """The template and (in ``template_source``) the file it came from, for error messages."""
        try:
            t = read_text(self.folder, "chat_template.jinja", "chat template", MAX_TEMPLATE_BYTES)
            self.template_source = self.folder / "chat_template.jinja"
            return t
        except MissingFileError:
            pass
        ct = optional_json(self.folder, "chat_template.json", "chat template")
        if ct is not None:
            self.template_source = self.folder / "chat_template.json"
            t = ct.get("chat_template")
        else:
            self.template_source = self.folder / "tokenizer_config.json"
            t = self.config.get("chat_template")
        if isinstance(t, list):  # named templates: take "default"
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if t is not None and not isinstance(t, str):
            raise FormatError(f"{self.template_source}: chat_template must be a string (or a list of named ones)")
        return t or None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt for ``messages``; the template runs sandboxed and within a budget
        (:mod:`layerrun.engine.template`), and any failure names the template's file."""
        from layerrun.engine.template import compile_template, make_environment, render

        if not self.chat_template:
            raise FormatError(f"{self.folder}: the model has no chat template; use a raw prompt (--raw)")
        if self._template is None:
            self._template = compile_template(make_environment(), self.chat_template, self.template_source)
        special = {k: _token_str(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            size = len(json.dumps(messages, default=str))
        except (TypeError, ValueError, RecursionError):
            size = 0
        return render(self._template, self.template_source, size,
                      messages=messages, add_generation_prompt=add_generation_prompt, **{**special, **kwargs})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template already contains any BOS token, so no special tokens are added.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class StreamDecoder:
    """Incremental detokenisation: emits text only once it is complete UTF-8.

    Decodes a short window of recent tokens (prefix/read offsets, as TGI and
    vLLM do) so each step costs O(1), and spaces that SentencePiece-style
    tokenizers attach to the next token come out right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text) :]
            self.prefix = self.read
            self.read = len(self.ids)
            return out
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text) :]
