"""Tokenizer and chat template, from ``tokenizer.json`` + ``tokenizer_config.json``.

Uses the ``tokenizers`` library directly (no transformers at run time) and
renders chat templates with a sandboxed jinja2 environment configured the way
transformers renders them, so prompts are byte-identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from layerrun.errors import FormatError


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise FormatError(
                f"{self.folder}: tokenizer.json is missing; text prompts need it "
                "(copy it from the original model folder, or pass token ids)"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise FormatError(f"{path}: cannot load tokenizer ({e})") from None
        cfg_path = self.folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
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

    def vocab(self) -> dict[str, int]:
        """Every token string (added tokens included) -> its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            p = self.folder / name
            if p.is_file():
                v = json.loads(p.read_text()).get("eos_token_id")
                if isinstance(v, int):
                    ids.add(v)
                elif isinstance(v, list):
                    ids.update(int(x) for x in v)
        if self.eos_token:
            i = self._tok.token_to_id(self.eos_token)
            if i is not None:
                ids.add(i)
        return ids

    # ---- chat template ----------------------------------------------------
    def _find_chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        ct_json = self.folder / "chat_template.json"
        if ct_json.is_file():
            return json.loads(ct_json.read_text()).get("chat_template")
        t = self.config.get("chat_template")
        if isinstance(t, list):  # named templates: take "default"
            named = {d.get("name"): d.get("template") for d in t}
            return named.get("default") or next(iter(named.values()), None)
        return t

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise FormatError(f"{self.folder}: the model has no chat template; use a raw prompt (--raw)")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise TemplateError(msg)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

            def strftime_now(fmt):
                return datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            self._template = env.from_string(self.chat_template)
        special = {k: _token_str(v) for k, v in self.config.items() if k.endswith("_token")}
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs
        )

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
